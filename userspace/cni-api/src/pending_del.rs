//! DELs contiv-cni could not hand to the agent because it was not running (crash-looping,
//! between an upgrade's old and new pod, uninstalled). The CNI spec asks DEL to succeed as
//! far as it can: a failed DEL keeps a pod Terminating and a drain waiting for as long as
//! the agent is away. contiv-cni records the request in a directory beside the agent's
//! socket and succeeds; the agent carries the DEL out when it runs again. The pod's network
//! namespace, and with it its interface, is the runtime's to remove; what waits is the
//! release of its address and its datapath entries.

use std::path::{Path, PathBuf};

use prost::Message;

use crate::v1::CniRequest;

/// The directory's name, beside the socket.
pub const DIR_NAME: &str = "pending-del";

/// Where DELs for the agent at `socket` wait.
pub fn dir_for(socket: &Path) -> PathBuf {
    socket.parent().unwrap_or_else(|| Path::new("/")).join(DIR_NAME)
}

/// A file name for the attachment: its container ID and interface name, with anything but
/// `[A-Za-z0-9._-]` replaced (the runtime's IDs are hex; the name is only for people).
fn file_name(req: &CniRequest) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect()
    };
    format!("{}@{}.del", clean(&req.container_id), clean(&req.ifname))
}

/// Records `req` for the agent at `socket`, atomically (written under a temporary name,
/// synced, renamed). Returns the file.
pub fn record(socket: &Path, req: &CniRequest) -> std::io::Result<PathBuf> {
    use std::io::Write;
    let dir = dir_for(socket);
    std::fs::create_dir_all(&dir)?;
    let target = dir.join(file_name(req));
    let tmp = dir.join(format!(".{}.{}", file_name(req), std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&req.encode_to_vec())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| target)
}

/// The recorded DELs in `dir`, each with its file; a file that does not decode comes with
/// the reason. Temporary files (a record in progress) are left out.
pub fn recorded(dir: &Path) -> Vec<(PathBuf, Result<CniRequest, String>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut out: Vec<(PathBuf, Result<CniRequest, String>)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "del"))
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .map(|p| {
            let req = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|bytes| CniRequest::decode(bytes.as_slice()).map_err(|e| e.to_string()));
            (p, req)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_del_reads_back_and_a_damaged_one_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let req = CniRequest {
            container_id: "abc123".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/cni-1".into(),
            ..Default::default()
        };
        let file = record(&socket, &req).unwrap();
        assert_eq!(file, dir.path().join("pending-del/abc123@eth0.del"));
        std::fs::write(dir.path().join("pending-del/x@eth0.del"), b"\xff\xff\xff").unwrap();
        std::fs::write(dir.path().join("pending-del/.y@eth0.del.7"), b"").unwrap();
        let all = recorded(&dir_for(&socket));
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0].1.as_ref().unwrap(), &req);
        assert!(all[1].1.is_err());
        assert!(recorded(&dir.path().join("none")).is_empty());
    }
}
