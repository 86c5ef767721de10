//! Publishing the network config list that `contiv-cni install --staged` left under a name
//! runtimes do not load (`cniConfStaged`, `<name>.staged`): renamed to `<name>` once the
//! agent is ready. Until then the runtime finds no network config for contiv, so kubelet
//! reports the node's network as not ready and no pod is scheduled to a node whose agent
//! cannot start (an old kernel, a bad config, a store out of reach). A config published
//! before (the previous agent's, during an upgrade) stays in place meanwhile.

use std::path::{Path, PathBuf};

/// Renames `staged` to its name without `.staged`, in the same directory, durably.
/// `Ok(None)` when nothing is staged (published already, or never staged).
pub fn publish(staged: &Path) -> std::io::Result<Option<PathBuf>> {
    let Some(target) = staged.to_str().and_then(|s| s.strip_suffix(".staged")) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} does not end in .staged", staged.display()),
        ));
    };
    let target = PathBuf::from(target);
    match std::fs::rename(staged, &target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    if let Some(dir) = target.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        d.sync_all()?;
    }
    Ok(Some(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_config_is_renamed_once_and_an_earlier_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let staged = dir.path().join("05-contiv.conflist.staged");
        let target = dir.path().join("05-contiv.conflist");
        std::fs::write(&target, "old").unwrap();
        std::fs::write(&staged, "new").unwrap();
        assert_eq!(publish(&staged).unwrap(), Some(target.clone()));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert!(!staged.exists());
        assert_eq!(publish(&staged).unwrap(), None, "nothing staged any more");
        assert!(publish(&dir.path().join("x.conflist")).is_err(), "not a staged name");
    }
}
