//! The node's network sysctls (`/proc/sys/net/...`), as the agent sets them.
//!
//! A container runtime mounts `/proc/sys` read-only in every container that is not
//! privileged, whatever its capabilities, and the agent's container is not (it runs with
//! named capabilities). The DaemonSet therefore mounts the host's `/proc/sys/net` at
//! `/host/proc/sys/net` (a net sysctl file acts on the network namespace of whoever opens
//! it: the node's, for the host-network agent), which is used when present. A value that
//! is already what the agent wants is left alone, so a node prepared by other means works
//! without any writable mount.

use std::path::{Path, PathBuf};

/// Where the host's sysctls are writable in the agent's container.
const HOST_PROC_SYS: &str = "/host/proc/sys";

/// Sets `rel` (relative to `/proc/sys`, e.g. `net/ipv4/ip_forward`) to `value`.
pub fn set(rel: &str, value: &str) -> Result<(), SysctlError> {
    let host = Path::new(HOST_PROC_SYS);
    let root = if host.join(rel).exists() { host } else { Path::new("/proc/sys") };
    set_in(root, rel, value)
}

/// [`set`] under `root`: read first, written only if it differs.
pub fn set_in(root: &Path, rel: &str, value: &str) -> Result<(), SysctlError> {
    let path = root.join(rel);
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| SysctlError { path, value: value.to_owned(), source })
}

#[derive(Debug, thiserror::Error)]
#[error(
    "setting {} to {value}: {source} (in a container that is not privileged, mount the host's \
     /proc/sys/net at /host/proc/sys/net, as deploy/base does; or set it on the node)",
    path.display()
)]
pub struct SysctlError {
    pub path: PathBuf,
    pub value: String,
    #[source]
    pub source: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_already_set_is_not_written_and_another_is() {
        let dir = tempfile::tempdir().unwrap();
        let rel = "net/ipv4/ip_forward";
        std::fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        // A directory where the file would be: any write fails, as on a read-only /proc/sys.
        std::fs::create_dir(dir.path().join(rel)).unwrap();
        let err = set_in(dir.path(), rel, "1").unwrap_err();
        assert!(err.to_string().contains("/host/proc/sys/net"), "{err}");
        std::fs::remove_dir(dir.path().join(rel)).unwrap();
        std::fs::write(dir.path().join(rel), "1\n").unwrap();
        let before = std::fs::metadata(dir.path().join(rel)).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        set_in(dir.path(), rel, "1").expect("already 1: nothing to write");
        assert_eq!(std::fs::metadata(dir.path().join(rel)).unwrap().modified().unwrap(), before, "not rewritten");
        std::fs::write(dir.path().join(rel), "0\n").unwrap();
        set_in(dir.path(), rel, "1").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join(rel)).unwrap(), "1");
    }
}
