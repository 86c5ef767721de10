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
    set_in(root_for(rel), rel, value)
}

/// Where `rel` is written: the host's mounted `/proc/sys` when it holds it, else `/proc/sys`.
fn root_for(rel: &str) -> &'static Path {
    let host = Path::new(HOST_PROC_SYS);
    if host.join(rel).exists() { host } else { Path::new("/proc/sys") }
}

/// The value of `rel` (relative to `/proc/sys`), where [`set`] would write it; None if it
/// cannot be read.
pub fn get(rel: &str) -> Option<String> {
    std::fs::read_to_string(root_for(rel).join(rel)).ok()
}

/// [`set`] under `root`: read first, written only if it differs.
pub fn set_in(root: &Path, rel: &str, value: &str) -> Result<(), SysctlError> {
    let path = root.join(rel);
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| SysctlError { path, value: value.to_owned(), source })
}

/// The ports the datapath owns on the node's addresses: Kubernetes' NodePort range and
/// the SNAT range (61000-65535) it gives flows to backends on other nodes.
pub const DATAPATH_PORTS: [(u16, u16); 2] = [(30000, 32767), (61000, 65535)];

/// Adds `ranges` to `net/ipv4/ip_local_reserved_ports`, keeping what is there: the kernel
/// then never picks them as a local socket's ephemeral port, even with an
/// `ip_local_port_range` widened over them (a node's own connection from such a port would
/// take a NodePort or SNAT flow's reply for its own). Explicit binds are unaffected.
pub fn reserve_ports(ranges: &[(u16, u16)]) -> Result<(), SysctlError> {
    reserve_ports_in(root_for(RESERVED_PORTS), ranges)
}

const RESERVED_PORTS: &str = "net/ipv4/ip_local_reserved_ports";

/// [`reserve_ports`] under `root`.
pub fn reserve_ports_in(root: &Path, ranges: &[(u16, u16)]) -> Result<(), SysctlError> {
    let current = std::fs::read_to_string(root.join(RESERVED_PORTS)).unwrap_or_default();
    let mut all: Vec<(u16, u16)> = parse_port_list(&current);
    all.extend_from_slice(ranges);
    set_in(root, RESERVED_PORTS, &format_port_list(all))
}

/// `a-b,c,...` as the kernel prints a port list (malformed items are left out).
fn parse_port_list(text: &str) -> Vec<(u16, u16)> {
    text.trim()
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .filter(|(a, b)| a <= b)
        .collect()
}

/// Ranges merged where they overlap or touch, in order, as the kernel prints them.
fn format_port_list(mut ranges: Vec<(u16, u16)>) -> String {
    ranges.sort_unstable();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let item = |(a, b): (u16, u16)| if a == b { a.to_string() } else { format!("{a}-{b}") };
    merged.into_iter().map(item).collect::<Vec<_>>().join(",")
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

    #[test]
    fn reserved_ports_are_added_to_what_the_node_reserved() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        let file = dir.path().join("net/ipv4/ip_local_reserved_ports");
        std::fs::write(&file, "\n").unwrap();
        reserve_ports_in(dir.path(), &DATAPATH_PORTS).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "30000-32767,61000-65535");
        // The node's own reservations stay; touching and overlapping ranges merge.
        std::fs::write(&file, "8080,29990-30005,32768,40000-40010\n").unwrap();
        reserve_ports_in(dir.path(), &DATAPATH_PORTS).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "8080,29990-32768,40000-40010,61000-65535");
        let before = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        reserve_ports_in(dir.path(), &DATAPATH_PORTS).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), before, "already reserved: not rewritten");
    }

    /// Root: the kernel takes the list as written, in a namespace of the test's own.
    #[test]
    fn the_kernel_takes_the_reserved_port_list() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let name = format!("ctsys{}", std::process::id());
        assert!(std::process::Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
        struct Ns(String);
        impl Drop for Ns {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }
        let ns = Ns(name);
        let read = || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &ns.0, "cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let value = format_port_list(DATAPATH_PORTS.to_vec());
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0, "sh", "-c"])
            .arg(format!("echo {value} > /proc/sys/net/ipv4/ip_local_reserved_ports"))
            .status()
            .unwrap();
        assert!(out.success());
        assert_eq!(read(), value);
    }
}
