//! The `CNI_*` environment variables (spec section 2, "Parameters").
//!
//! Read through the [`Env`] trait so tests hand in a map instead of touching the process
//! environment.

use std::collections::HashMap;

use crate::error::CniError;

/// Where the `CNI_*` variables come from.
pub trait Env {
    /// The value of `name`, or `None` if unset (or not valid UTF-8).
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Env for HashMap<&str, &str> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| (*v).to_owned())
    }
}

/// The operation the runtime asked for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Version,
    Gc,
}

impl Command {
    /// Parses the exact (upper-case) spelling the spec uses.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            _ => return None,
        })
    }

    /// The spec spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Version => "VERSION",
            Self::Gc => "GC",
        }
    }

    /// Whether the command concerns one attachment (container id + interface).
    fn is_attachment(self) -> bool {
        matches!(self, Self::Add | Self::Del | Self::Check)
    }

    /// Whether the spec requires `CNI_NETNS` for this command (ADD and CHECK; DEL may run after
    /// the namespace is gone).
    fn needs_netns(self) -> bool {
        matches!(self, Self::Add | Self::Check)
    }
}

/// The invocation parameters, validated for the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    /// `CNI_CONTAINERID`; empty for STATUS, VERSION and GC.
    pub container_id: String,
    /// `CNI_NETNS`; may be empty on DEL and is empty for STATUS, VERSION and GC.
    pub netns: String,
    /// `CNI_IFNAME`; empty for STATUS, VERSION and GC.
    pub ifname: String,
    /// `CNI_ARGS`, verbatim (`K=V;K=V`), possibly empty.
    pub args: String,
    /// `CNI_PATH`, verbatim, possibly empty (contiv-cni delegates to no plugin).
    pub path: String,
}

/// Reads and validates the `CNI_*` variables.
///
/// Errors with code 4 naming every missing variable, an unknown `CNI_COMMAND`, or an invalid
/// `CNI_CONTAINERID` / `CNI_IFNAME`. An empty variable counts as missing (as libcni's skel does).
pub fn read(env: &dyn Env) -> Result<CniEnv, CniError> {
    let get = |name: &str| env.var(name).unwrap_or_default();
    let command_raw = get("CNI_COMMAND");
    if command_raw.is_empty() {
        return Err(CniError::invalid_env("required env variables [CNI_COMMAND] missing", ""));
    }
    let command = Command::parse(&command_raw).ok_or_else(|| {
        CniError::invalid_env(
            format!("unknown CNI_COMMAND: {command_raw:?}"),
            "CNI_COMMAND must be one of ADD, DEL, CHECK, STATUS, VERSION, GC",
        )
    })?;

    let mut out = CniEnv {
        command,
        container_id: String::new(),
        netns: String::new(),
        ifname: String::new(),
        args: get("CNI_ARGS"),
        path: get("CNI_PATH"),
    };
    if !command.is_attachment() {
        return Ok(out);
    }
    out.container_id = get("CNI_CONTAINERID");
    out.netns = get("CNI_NETNS");
    out.ifname = get("CNI_IFNAME");

    let mut missing = Vec::new();
    if out.container_id.is_empty() {
        missing.push("CNI_CONTAINERID");
    }
    if command.needs_netns() && out.netns.is_empty() {
        missing.push("CNI_NETNS");
    }
    if out.ifname.is_empty() {
        missing.push("CNI_IFNAME");
    }
    if !missing.is_empty() {
        return Err(CniError::invalid_env(
            format!("required env variables [{}] missing", missing.join(",")),
            format!("CNI_COMMAND={}", command.as_str()),
        ));
    }
    validate_container_id(&out.container_id)?;
    validate_ifname(&out.ifname)?;
    Ok(out)
}

/// Spec: starts with an alphanumeric character, then alphanumerics, `_`, `.` or `-`.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(CniError::invalid_env(
            "invalid CNI_CONTAINERID",
            format!("{id:?}: must start with an alphanumeric character, followed by alphanumerics, '_', '.' or '-'"),
        ))
    }
}

/// A Linux interface name: 1..=15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    const IFNAMSIZ: usize = 16;
    let ok = name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid_env(
            "invalid CNI_IFNAME",
            format!("{name:?}: must be at most 15 bytes, not '.' or '..', without '/', ':' or whitespace"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contiv_cni_api::codes;

    fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn missing_command_is_code_4_naming_it() {
        let e = read(&env(&[])).unwrap_err();
        assert_eq!(e.code, codes::INVALID_ENV);
        assert!(e.msg.contains("CNI_COMMAND"), "{e}");
    }

    #[test]
    fn unknown_command_is_code_4() {
        let e = read(&env(&[("CNI_COMMAND", "add")])).unwrap_err();
        assert_eq!(e.code, codes::INVALID_ENV);
        assert!(e.msg.contains("CNI_COMMAND"), "{e}");
    }

    #[test]
    fn add_requires_containerid_netns_ifname_and_names_all_missing() {
        let e = read(&env(&[("CNI_COMMAND", "ADD")])).unwrap_err();
        assert_eq!(e.code, codes::INVALID_ENV);
        for v in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            assert!(e.msg.contains(v), "{v} not in {e}");
        }
        let e = read(&env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")])).unwrap_err();
        assert_eq!(e.msg, "required env variables [CNI_NETNS] missing");
    }

    #[test]
    fn empty_variable_counts_as_missing() {
        let e =
            read(&env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", ""), ("CNI_IFNAME", "eth0")]))
                .unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"), "{e}");
    }

    #[test]
    fn del_does_not_require_netns() {
        let e = read(&env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")])).unwrap();
        assert_eq!(e.command, Command::Del);
        assert_eq!(e.netns, "");
        let e = read(&env(&[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")])).unwrap_err();
        assert_eq!(e.code, codes::INVALID_ENV);
        assert!(e.msg.contains("CNI_CONTAINERID") && !e.msg.contains("CNI_NETNS"), "{e}");
    }

    #[test]
    fn check_requires_netns_like_add() {
        let e = read(&env(&[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "c1")])).unwrap_err();
        assert!(e.msg.contains("CNI_NETNS") && e.msg.contains("CNI_IFNAME"), "{e}");
    }

    #[test]
    fn status_version_gc_need_only_the_command() {
        for c in ["STATUS", "VERSION", "GC"] {
            let e = read(&env(&[("CNI_COMMAND", c)])).unwrap();
            assert_eq!(e.command.as_str(), c);
        }
    }

    #[test]
    fn invalid_container_id_and_ifname_are_code_4() {
        let base = [("CNI_COMMAND", "ADD"), ("CNI_NETNS", "/run/netns/x")];
        let mut m = env(&base);
        m.insert("CNI_CONTAINERID", "-bad");
        m.insert("CNI_IFNAME", "eth0");
        let e = read(&m).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (codes::INVALID_ENV, "invalid CNI_CONTAINERID"));
        m.insert("CNI_CONTAINERID", "abc_1.2-3");
        for bad in ["a/b", "a:b", "a b", ".", "..", "sixteen-chars-xx"] {
            m.insert("CNI_IFNAME", bad);
            let e = read(&m).unwrap_err();
            assert_eq!((e.code, e.msg.as_str()), (codes::INVALID_ENV, "invalid CNI_IFNAME"), "{bad}");
        }
        m.insert("CNI_IFNAME", "fifteen-chars-x");
        let ok = read(&m).unwrap();
        assert_eq!(ok.ifname, "fifteen-chars-x");
        assert_eq!(ok.container_id, "abc_1.2-3");
    }

    #[test]
    fn args_and_path_are_passed_verbatim() {
        let e = read(&env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .unwrap();
        assert_eq!(e.args, "K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns");
        assert_eq!(e.path, "/opt/cni/bin");
    }
}
