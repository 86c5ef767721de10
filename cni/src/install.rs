//! Installing contiv-cni on a node (the agent DaemonSet's init container runs
//! `contiv-cni install`) and removing it (`contiv-cni uninstall`).
//!
//! Every file lands atomically: written under a temporary name in the target directory,
//! synced, then renamed over the final name, so kubelet and the runtime never see half a
//! binary or half a config. The binary lands before the config list (a config naming a
//! missing plugin would fail pods). The config list is checked first the way the runtime
//! will use it: it must be a conflist whose `contiv-cni` entry, with the list's `name` and
//! `cniVersion` added, passes contiv-cni's own config validation. Leftover temporary files
//! and other contiv config files in the config directory (an older name) are removed, so
//! exactly one contiv network config remains. `uninstall` removes the config list first,
//! then the binary; it is idempotent.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Default host paths (as the init container mounts them at the same place).
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// The config list's file name. containerd (one network by default) and CRI-O use the
/// config that sorts first: this sorts before the usual `10-*` names, among them
/// `10-containerd-net.conflist`, which containerd's own set-up script writes.
pub const DEFAULT_CONF_NAME: &str = "05-contiv.conflist";
/// Prefix of the temporary files written next to the targets.
const TMP_PREFIX: &str = ".contiv-install-";

/// Why installing or uninstalling failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file could not be read, written, renamed or removed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config list is not one contiv-cni and the runtime can use.
    #[error("invalid config list: {0}")]
    Conflist(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.to_owned(), source }
}

/// What to install where.
#[derive(Debug, Clone)]
pub struct Install {
    /// The contiv-cni binary to copy (normally this process's own executable).
    pub binary: PathBuf,
    /// CNI binary directory.
    pub bin_dir: PathBuf,
    /// CNI config directory.
    pub conf_dir: PathBuf,
    /// File name of the config list in `conf_dir`.
    pub conf_name: String,
    /// The config list (JSON).
    pub conflist: Vec<u8>,
    /// Write the config list as `<conf_name>.staged`, a name runtimes do not load: the agent
    /// renames it once it is ready (its `cniConfStaged`). A config list already in place
    /// under `conf_name` (the previous agent's) stays until then.
    pub staged: bool,
}

/// The name a staged config list waits under: runtimes load `*.conf`, `*.conflist` and
/// `*.json` only.
pub fn staged_name(conf_name: &str) -> String {
    format!("{conf_name}.staged")
}

/// Checks a config list the way the runtime will use it (see the module docs).
pub fn validate_conflist(conflist: &[u8]) -> Result<(), InstallError> {
    let bad = |m: String| InstallError::Conflist(m);
    let list: Value = serde_json::from_slice(conflist).map_err(|e| bad(format!("not JSON: {e}")))?;
    let obj = list.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
    let name = obj.get("name").and_then(Value::as_str).ok_or_else(|| bad("missing \"name\"".into()))?;
    let version = obj.get("cniVersion").and_then(Value::as_str).ok_or_else(|| bad("missing \"cniVersion\"".into()))?;
    let plugins = obj
        .get("plugins")
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("\"plugins\" must be a non-empty list (a .conflist)".into()))?;
    let first = plugins[0].as_object().ok_or_else(|| bad("plugins[0] is not an object".into()))?;
    if first.get("type").and_then(Value::as_str) != Some("contiv-cni") {
        return Err(bad("plugins[0] must be {\"type\": \"contiv-cni\", ...}: contiv assigns the pod's address".into()));
    }
    for (i, p) in plugins.iter().enumerate() {
        if p.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err(bad(format!("plugins[{i}] has no \"type\"")));
        }
    }
    // What the runtime passes the plugin: its entry plus the list's name and version.
    let mut conf = first.clone();
    conf.insert("name".into(), Value::String(name.into()));
    conf.insert("cniVersion".into(), Value::String(version.into()));
    let bytes = serde_json::to_vec(&Value::Object(conf)).map_err(|e| bad(e.to_string()))?;
    crate::config::parse(&bytes).map_err(|e| bad(format!("contiv-cni refuses its entry: {e}")))?;
    Ok(())
}

/// Writes `data` to `dir/name` atomically with `mode`.
fn write_atomically(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<PathBuf, InstallError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let target = dir.join(name);
    let tmp = dir.join(format!("{TMP_PREFIX}{name}.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(io(&target))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(target.clone())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn remove_if_present(path: &Path) -> Result<bool, InstallError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InstallError::Io { path: path.to_owned(), source: e }),
    }
}

/// What an install or uninstall changed, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Files written.
    pub written: Vec<PathBuf>,
    /// Files removed.
    pub removed: Vec<PathBuf>,
    /// Other networks' configs in the config directory that sort before the one installed:
    /// a runtime that uses the first config gives pods that network, not contiv's.
    pub shadowed_by: Vec<PathBuf>,
}

/// Other networks' configs in `conf_dir` (the runtimes read `*.conf`, `*.conflist` and
/// `*.json`) whose names sort before `ours`.
fn configs_before(conf_dir: &Path, ours: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(conf_dir) else { return vec![] };
    let mut before: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.as_str() < ours && !n.starts_with('.'))
        .filter(|n| [".conf", ".conflist", ".json"].iter().any(|x| n.ends_with(x)))
        .map(|n| conf_dir.join(n))
        .collect();
    before.sort();
    before
}

/// Stale files of ours in `conf_dir`: temporary leftovers and contiv configs under
/// another name than `keep`.
fn stale_configs(conf_dir: &Path, keep: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(conf_dir) else { return vec![] };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != keep)
        .filter(|n| {
            n.starts_with(TMP_PREFIX)
                || (n.contains("contiv") && (n.ends_with(".conflist") || n.ends_with(".conf") || n.ends_with(".json")))
        })
        .map(|n| conf_dir.join(n))
        .collect()
}

impl Install {
    /// Installs the binary, then the config list, then removes stale configs.
    pub fn run(&self) -> Result<Report, InstallError> {
        validate_conflist(&self.conflist)?;
        let binary = std::fs::read(&self.binary).map_err(io(&self.binary))?;
        let mut report = Report::default();
        for leftover in std::fs::read_dir(&self.bin_dir).into_iter().flatten().filter_map(Result::ok) {
            if leftover.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let p = leftover.path();
                if remove_if_present(&p)? {
                    report.removed.push(p);
                }
            }
        }
        report.written.push(write_atomically(&self.bin_dir, "contiv-cni", &binary, 0o755)?);
        let name = if self.staged { staged_name(&self.conf_name) } else { self.conf_name.clone() };
        report.written.push(write_atomically(&self.conf_dir, &name, &self.conflist, 0o644)?);
        // Staged with no list of ours in place yet under this name (an upgrade from an older
        // name): an older contiv list stays until the agent has put this one in place, or
        // the node would have no network config meanwhile; the next install removes it.
        let keep_older = self.staged && !self.conf_dir.join(&self.conf_name).exists();
        for stale in stale_configs(&self.conf_dir, &self.conf_name) {
            let leftover = stale.file_name().is_some_and(|n| n.to_string_lossy().starts_with(TMP_PREFIX));
            if keep_older && !leftover {
                continue;
            }
            if remove_if_present(&stale)? {
                report.removed.push(stale);
            }
        }
        report.shadowed_by = configs_before(&self.conf_dir, &self.conf_name);
        Ok(report)
    }
}

/// Removes the config list (and any other contiv config), then the binary.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path, conf_name: &str) -> Result<Report, InstallError> {
    let mut report = Report::default();
    let mut configs = stale_configs(conf_dir, "");
    configs.push(conf_dir.join(conf_name));
    configs.push(conf_dir.join(staged_name(conf_name)));
    configs.sort();
    configs.dedup();
    for path in configs {
        if remove_if_present(&path)? {
            report.removed.push(path);
        }
    }
    let bin = bin_dir.join("contiv-cni");
    if remove_if_present(&bin)? {
        report.removed.push(bin);
    }
    Ok(report)
}

/// The config list installed when none is given: contiv-cni, then portmap for hostPorts.
pub fn default_conflist(agent_socket: &str) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "contiv",
        "plugins": [
            {"type": "contiv-cni", "agentSocket": agent_socket, "capabilities": {"bandwidth": true}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install(dir: &Path, conflist: &str) -> Install {
        let binary = dir.join("src-bin");
        std::fs::write(&binary, b"\x7fELF fake").unwrap();
        Install {
            binary,
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            conf_name: DEFAULT_CONF_NAME.into(),
            conflist: conflist.as_bytes().to_vec(),
            staged: false,
        }
    }

    /// Staged, the list waits under a name runtimes do not load, the one in place stays,
    /// and uninstall removes both.
    #[test]
    fn a_staged_install_leaves_the_published_config_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut i = install(dir.path(), &default_conflist("/run/contiv/cni.sock"));
        std::fs::create_dir_all(&i.conf_dir).unwrap();
        std::fs::write(i.conf_dir.join(DEFAULT_CONF_NAME), "the previous agent's").unwrap();
        i.staged = true;
        let report = i.run().unwrap();
        assert!(report.written.contains(&i.conf_dir.join("05-contiv.conflist.staged")), "{report:?}");
        assert!(report.removed.is_empty(), "{report:?}");
        assert_eq!(std::fs::read_to_string(i.conf_dir.join(DEFAULT_CONF_NAME)).unwrap(), "the previous agent's");
        let report = uninstall(&i.bin_dir, &i.conf_dir, DEFAULT_CONF_NAME).unwrap();
        assert_eq!(report.removed.len(), 3, "both configs and the binary: {report:?}");
        // An upgrade from the older name: that list serves until the agent put this one in
        // place, and goes at the next install.
        std::fs::write(i.conf_dir.join("10-contiv.conflist"), "the older release's").unwrap();
        assert!(i.run().unwrap().removed.is_empty());
        assert!(i.conf_dir.join("10-contiv.conflist").exists(), "kept while nothing of ours is in place");
        std::fs::rename(i.conf_dir.join("05-contiv.conflist.staged"), i.conf_dir.join(DEFAULT_CONF_NAME)).unwrap();
        assert_eq!(i.run().unwrap().removed, vec![i.conf_dir.join("10-contiv.conflist")]);
    }

    #[test]
    fn installs_atomically_removes_stale_and_uninstalls() {
        let dir = tempfile::tempdir().unwrap();
        let i = install(dir.path(), &default_conflist("/run/contiv/cni.sock"));
        std::fs::create_dir_all(&i.conf_dir).unwrap();
        std::fs::write(i.conf_dir.join("05-contiv.conf"), "{}").unwrap();
        std::fs::write(i.conf_dir.join("10-contiv.conflist"), "{}").unwrap(); // the older default name
        std::fs::write(i.conf_dir.join(".contiv-install-05-contiv.conflist.999"), "half").unwrap();
        std::fs::write(i.conf_dir.join("20-other.conflist"), "{}").unwrap();
        let report = i.run().unwrap();
        assert_eq!(report.written.len(), 2);
        assert_eq!(report.removed.len(), 3, "{report:?}");
        assert!(report.shadowed_by.is_empty(), "{report:?}");
        let mut names: Vec<String> =
            std::fs::read_dir(&i.conf_dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["05-contiv.conflist", "20-other.conflist"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(i.bin_dir.join("contiv-cni")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(std::fs::read(i.bin_dir.join("contiv-cni")).unwrap(), b"\x7fELF fake");
        // Installing again is a no-op in effect.
        assert!(i.run().unwrap().removed.is_empty());
        let report = uninstall(&i.bin_dir, &i.conf_dir, DEFAULT_CONF_NAME).unwrap();
        assert_eq!(report.removed.len(), 2);
        assert!(!i.conf_dir.join(DEFAULT_CONF_NAME).exists());
        assert!(i.conf_dir.join("20-other.conflist").exists(), "other networks are left alone");
        assert!(uninstall(&i.bin_dir, &i.conf_dir, DEFAULT_CONF_NAME).unwrap().removed.is_empty());
    }

    /// A runtime uses the config that sorts first: another network's that sorts before
    /// contiv's is reported (and left alone).
    #[test]
    fn another_networks_config_sorting_first_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let i = install(dir.path(), &default_conflist("/run/contiv/cni.sock"));
        std::fs::create_dir_all(&i.conf_dir).unwrap();
        for name in ["01-loopback.conf", "04-x.json", "10-containerd-net.conflist", ".hidden.conf", "00-notes.txt"] {
            std::fs::write(i.conf_dir.join(name), "{}").unwrap();
        }
        assert!("10-containerd-net.conflist" > DEFAULT_CONF_NAME, "contiv's sorts before containerd's own");
        let report = i.run().unwrap();
        let names: Vec<String> =
            report.shadowed_by.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["01-loopback.conf", "04-x.json"]);
        assert!(i.conf_dir.join("01-loopback.conf").exists());
    }

    #[test]
    fn bad_conflists_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        for (conflist, needle) in [
            ("not json", "not JSON"),
            (r#"{"cniVersion":"1.0.0","name":"contiv","type":"contiv-cni"}"#, "conflist"),
            (r#"{"cniVersion":"1.0.0","name":"contiv","plugins":[{"type":"bridge"}]}"#, "contiv-cni"),
            (r#"{"cniVersion":"9.9.9","name":"contiv","plugins":[{"type":"contiv-cni"}]}"#, "refuses"),
            (
                r#"{"cniVersion":"1.0.0","name":"contiv","plugins":[{"type":"contiv-cni","agentSocket":"rel/x"}]}"#,
                "agentSocket",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"contiv","plugins":[{"type":"contiv-cni"},{"capabilities":{}}]}"#,
                "plugins[1]",
            ),
        ] {
            let i = install(dir.path(), conflist);
            let err = i.run().unwrap_err().to_string();
            assert!(err.contains(needle), "{conflist}: {err}");
            assert!(!i.bin_dir.join("contiv-cni").exists(), "nothing written for {conflist}");
        }
    }
}
