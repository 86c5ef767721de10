//! The request configuration on stdin (spec section 1 and 3): decoding and validation.
//!
//! contiv-cni consumes only a few keys itself; the whole document is forwarded to the agent
//! verbatim (`CniRequest.network_config`), so runtime-added keys (`runtimeConfig`, `args`,
//! `prevResult`, `cni.dev/*`, `capabilities`, ...) and unknown keys are tolerated.

use std::net::IpAddr;
use std::path::PathBuf;

use contiv_cni_api::{POD_MTU_MAX, POD_MTU_MIN};
use serde_json::{Map, Value};

use crate::error::CniError;

/// The spec versions contiv-cni speaks, oldest first (what VERSION reports).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version used when the input names none we can use (VERSION without input, errors
/// before the config is understood).
pub const DEFAULT_VERSION: &str = "1.1.0";

/// Key the runtime adds for GC: the attachments that are still valid.
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";

/// A supported CNI spec version; ordered oldest to newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    /// Exact match against [`SUPPORTED_VERSIONS`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "0.3.0" => Self::V0_3_0,
            "0.3.1" => Self::V0_3_1,
            "0.4.0" => Self::V0_4_0,
            "1.0.0" => Self::V1_0_0,
            "1.1.0" => Self::V1_1_0,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK exists since spec 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// STATUS and GC exist since spec 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= Self::V1_1_0
    }

    /// Interface `mtu` in results exists since spec 1.1.0.
    pub fn interfaces_carry_mtu(self) -> bool {
        self >= Self::V1_1_0
    }

    /// Results before 1.0.0 carry `"version": "4"|"6"` in each `ips` entry.
    pub fn ips_carry_version(self) -> bool {
        self < Self::V1_0_0
    }
}

/// One still-valid attachment from `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidAttachment {
    pub container_id: String,
    pub ifname: String,
}

/// The validated configuration, plus the raw bytes to forward.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    pub cni_version: CniVersion,
    /// Network name (`name`).
    pub name: String,
    /// Plugin type (`type`), normally `contiv-cni`.
    pub plugin_type: String,
    /// The agent's CNI socket (`agentSocket`, default `contiv_cni_api::DEFAULT_SOCKET`).
    pub agent_socket: PathBuf,
    /// Interface MTU asked for (`mtu`); the agent applies it.
    pub mtu: Option<u32>,
    /// `prevResult` as given (not null); parsed by the command that needs it.
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments`, if present.
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// The config exactly as read from stdin.
    pub raw: Vec<u8>,
}

/// The `cniVersion` an answer to this input should carry: the requested one if we support it,
/// else [`DEFAULT_VERSION`]. Never fails (used for error output too).
pub fn reply_version(stdin: &[u8]) -> &'static str {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).and_then(CniVersion::parse))
        .map_or(DEFAULT_VERSION, CniVersion::as_str)
}

/// The `cniVersion` a VERSION request asks about: echoed verbatim, [`DEFAULT_VERSION`] if the
/// input is empty or has none. Code 6 if the input is not a JSON object.
pub fn requested_version(stdin: &[u8]) -> Result<String, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Ok(DEFAULT_VERSION.to_owned());
    }
    let obj = decode_object(stdin)?;
    match obj.get("cniVersion") {
        None | Some(Value::Null) => Ok(DEFAULT_VERSION.to_owned()),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(other) => Err(CniError::decode_failure(
            "error decoding version info",
            format!("cniVersion must be a non-empty string, got {other}"),
        )),
    }
}

fn decode_object(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(CniError::decode_failure(
            "error decoding network config",
            format!("expected a JSON object, got {}", json_kind(&other)),
        )),
        Err(e) => Err(CniError::decode_failure("error decoding network config", e.to_string())),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::invalid_config(msg, details)
}

/// Decodes (code 6) and validates (code 7, or 1 for an unsupported `cniVersion`) the config.
pub fn parse(stdin: &[u8]) -> Result<NetworkConfig, CniError> {
    parse_as(stdin, true)
}

/// DEL's reading of the config: best effort, as the spec asks of DEL ("plugins should
/// always complete a DEL action without error to the fullest extent possible"). What DEL
/// uses is checked as for every command (a supported `cniVersion`, `name`, `type`,
/// `agentSocket`); what only ADD, CHECK or GC use (`mtu`, `dns`, `runtimeConfig`, `args`,
/// `prevResult`, the valid attachments) is not read, so a config edited since the ADD, or
/// a plugin that checks more than the one that did the ADD, cannot keep a pod from being
/// torn down.
pub fn parse_for_del(stdin: &[u8]) -> Result<NetworkConfig, CniError> {
    parse_as(stdin, false)
}

fn parse_as(stdin: &[u8], whole: bool) -> Result<NetworkConfig, CniError> {
    let obj = decode_object(stdin)?;

    let version_str = required_string(&obj, "cniVersion")?;
    let cni_version = CniVersion::parse(version_str).ok_or_else(|| {
        CniError::incompatible_version(
            "incompatible CNI versions",
            format!("config is {version_str:?}, plugin supports [{}]", SUPPORTED_VERSIONS.join(", ")),
        )
    })?;

    let name = required_string(&obj, "name")?;
    if !is_valid_network_name(name) {
        return Err(invalid(
            "invalid network name",
            format!("{name:?}: must start with an alphanumeric character, followed by alphanumerics, '_', '.' or '-'"),
        ));
    }
    let plugin_type = required_string(&obj, "type")?;
    if plugin_type.contains(['/', '\\']) {
        return Err(invalid("invalid plugin type", format!("{plugin_type:?} must not contain '/' or '\\'")));
    }

    let agent_socket = match obj.get("agentSocket") {
        None | Some(Value::Null) => PathBuf::from(contiv_cni_api::DEFAULT_SOCKET),
        Some(Value::String(s)) => validate_socket_path(s)?,
        Some(other) => {
            return Err(invalid("invalid agentSocket", format!("must be a string, got {}", json_kind(other))));
        }
    };

    if !whole {
        return Ok(NetworkConfig {
            cni_version,
            name: name.to_owned(),
            plugin_type: plugin_type.to_owned(),
            agent_socket,
            mtu: None,
            prev_result: None,
            valid_attachments: None,
            raw: stdin.to_vec(),
        });
    }

    let mtu = match obj.get("mtu") {
        None | Some(Value::Null) => None,
        Some(v) => Some(validate_mtu(v)?),
    };

    if let Some(dns) = obj.get("dns")
        && !dns.is_null()
    {
        validate_dns(dns)?;
    }

    for key in ["runtimeConfig", "args"] {
        if let Some(v) = obj.get(key)
            && !(v.is_object() || v.is_null())
        {
            return Err(invalid(format!("invalid {key}"), format!("must be an object, got {}", json_kind(v))));
        }
    }

    let prev_result = match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(other) => {
            return Err(invalid("invalid prevResult", format!("must be an object, got {}", json_kind(other))));
        }
    };

    let valid_attachments = match obj.get(VALID_ATTACHMENTS_KEY) {
        None => None,
        // What libcni writes when the runtime's list for this network is empty (Go's nil
        // slice): no attachment is valid.
        Some(Value::Null) => Some(vec![]),
        Some(v) => Some(parse_valid_attachments(v)?),
    };

    Ok(NetworkConfig {
        cni_version,
        name: name.to_owned(),
        plugin_type: plugin_type.to_owned(),
        agent_socket,
        mtu,
        prev_result,
        valid_attachments,
        raw: stdin.to_vec(),
    })
}

fn required_string<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, CniError> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(invalid(format!("{key} must not be empty"), "")),
        None | Some(Value::Null) => Err(invalid(format!("missing {key}"), "")),
        Some(other) => Err(invalid(format!("invalid {key}"), format!("must be a string, got {}", json_kind(other)))),
    }
}

/// Spec: starts alphanumeric, then alphanumerics, `_`, `.`, `-`.
fn is_valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// An absolute path short enough for `sockaddr_un` (107 bytes plus the NUL).
fn validate_socket_path(s: &str) -> Result<PathBuf, CniError> {
    const SUN_PATH_MAX: usize = 107;
    let why = if s.is_empty() {
        "must not be empty"
    } else if !s.starts_with('/') {
        "must be an absolute path"
    } else if s.contains('\0') {
        "must not contain NUL"
    } else if s.len() > SUN_PATH_MAX {
        "is longer than a unix socket path can be (107 bytes)"
    } else {
        return Ok(PathBuf::from(s));
    };
    Err(invalid("invalid agentSocket", format!("{s:?} {why}")))
}

/// An integer in the range the agent accepts for a pod ([`POD_MTU_MIN`]..=[`POD_MTU_MAX`]).
fn validate_mtu(v: &Value) -> Result<u32, CniError> {
    v.as_u64()
        .and_then(|m| u32::try_from(m).ok())
        .filter(|m| (POD_MTU_MIN..=POD_MTU_MAX).contains(m))
        .ok_or_else(|| invalid("invalid mtu", format!("must be an integer in {POD_MTU_MIN}..={POD_MTU_MAX}, got {v}")))
}

fn validate_dns(v: &Value) -> Result<(), CniError> {
    let obj =
        v.as_object().ok_or_else(|| invalid("invalid dns", format!("must be an object, got {}", json_kind(v))))?;
    for key in ["nameservers", "search", "options"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for item in items {
                    let s = item.as_str().ok_or_else(|| {
                        invalid(format!("invalid dns.{key}"), format!("entries must be strings, got {item}"))
                    })?;
                    if key == "nameservers" && s.parse::<IpAddr>().is_err() {
                        return Err(invalid(
                            "invalid dns.nameservers",
                            format!("{s:?} is not an IPv4 or IPv6 address"),
                        ));
                    }
                }
            }
            Some(other) => {
                return Err(invalid(
                    format!("invalid dns.{key}"),
                    format!("must be a list of strings, got {}", json_kind(other)),
                ));
            }
        }
    }
    match obj.get("domain") {
        None | Some(Value::Null | Value::String(_)) => Ok(()),
        Some(other) => Err(invalid("invalid dns.domain", format!("must be a string, got {}", json_kind(other)))),
    }
}

fn parse_valid_attachments(v: &Value) -> Result<Vec<ValidAttachment>, CniError> {
    let bad = |details: String| invalid(format!("invalid {VALID_ATTACHMENTS_KEY}"), details);
    let items = v.as_array().ok_or_else(|| bad(format!("must be a list, got {}", json_kind(v))))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |key: &str| {
                item.get(key)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| bad(format!("entry {i}: {key} must be a non-empty string")))
            };
            Ok(ValidAttachment { container_id: field("containerID")?, ifname: field("ifname")? })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use contiv_cni_api::codes;
    use serde_json::json;

    fn parse_json(v: Value) -> Result<NetworkConfig, CniError> {
        parse(v.to_string().as_bytes())
    }

    fn base() -> Value {
        json!({"cniVersion": "1.1.0", "name": "contiv", "type": "contiv-cni"})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = base();
        v[key] = value;
        v
    }

    fn without(key: &str) -> Value {
        let mut v = base();
        v.as_object_mut().unwrap().remove(key);
        v
    }

    #[test]
    fn minimal_config_uses_default_socket() {
        let c = parse_json(base()).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_1_0);
        assert_eq!(c.name, "contiv");
        assert_eq!(c.plugin_type, "contiv-cni");
        assert_eq!(c.agent_socket, PathBuf::from(contiv_cni_api::DEFAULT_SOCKET));
        assert_eq!((c.mtu, c.prev_result, c.valid_attachments), (None, None, None));
    }

    #[test]
    fn all_our_fields_and_runtime_fields_are_accepted() {
        let raw = json!({
            "cniVersion": "1.0.0", "cniVersions": ["0.4.0", "1.0.0"], "name": "k8s-pod-network",
            "type": "contiv-cni", "agentSocket": "/tmp/x/cni.sock", "mtu": 1450,
            "dns": {"nameservers": ["10.96.0.10", "fd00::a"], "domain": "cluster.local",
                    "search": ["svc.cluster.local"], "options": ["ndots:5"]},
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": []}, "args": {"cni": {"ips": []}},
            "prevResult": {"interfaces": []}, "cni.dev/attachments": [], "somethingElse": 1
        })
        .to_string();
        let c = parse(raw.as_bytes()).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.agent_socket, PathBuf::from("/tmp/x/cni.sock"));
        assert_eq!(c.mtu, Some(1450));
        assert_eq!(c.prev_result, Some(json!({"interfaces": []})));
        assert_eq!(c.raw, raw.as_bytes(), "forwarded verbatim");
    }

    #[test]
    fn undecodable_json_is_code_6() {
        for bad in [&b"{bad"[..], b"", b"[1,2]", b"\"x\""] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, codes::DECODE_FAILURE, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn missing_or_empty_or_mistyped_required_fields_are_code_7() {
        for key in ["cniVersion", "name", "type"] {
            for cfg in [without(key), with(key, json!("")), with(key, json!(3))] {
                let e = parse_json(cfg.clone()).unwrap_err();
                assert_eq!(e.code, codes::INVALID_CONFIG, "{cfg}");
                assert!(e.msg.contains(key), "{e}");
            }
        }
    }

    #[test]
    fn bad_name_and_type_are_code_7() {
        for cfg in [with("name", json!("-x")), with("name", json!("a/b")), with("type", json!("../contiv-cni"))] {
            assert_eq!(parse_json(cfg.clone()).unwrap_err().code, codes::INVALID_CONFIG, "{cfg}");
        }
    }

    #[test]
    fn unsupported_version_is_code_1_listing_supported() {
        for v in ["9.9.9", "0.2.0", "1.0", "0.1.0"] {
            let e = parse_json(with("cniVersion", json!(v))).unwrap_err();
            assert_eq!(e.code, codes::INCOMPATIBLE_VERSION);
            for s in SUPPORTED_VERSIONS {
                assert!(e.details.contains(s), "{e}");
            }
        }
    }

    #[test]
    fn bad_agent_socket_is_code_7() {
        let long = format!("/{}", "x".repeat(200));
        for v in [json!(""), json!("relative.sock"), json!(5), json!(long), json!("/a\u{0}b")] {
            let e = parse_json(with("agentSocket", v.clone())).unwrap_err();
            assert_eq!((e.code, e.msg.as_str()), (codes::INVALID_CONFIG, "invalid agentSocket"), "{v}");
        }
    }

    #[test]
    fn bad_mtu_is_code_7() {
        for v in [json!("1500"), json!(-1), json!(0), json!(67), json!(575), json!(9001), json!(70000), json!(1500.5)] {
            let e = parse_json(with("mtu", v.clone())).unwrap_err();
            assert_eq!((e.code, e.msg.as_str()), (codes::INVALID_CONFIG, "invalid mtu"), "{v}");
        }
        assert_eq!(parse_json(with("mtu", json!(9000))).unwrap().mtu, Some(9000));
        assert_eq!(parse_json(with("mtu", json!(576))).unwrap().mtu, Some(576));
    }

    #[test]
    fn bad_dns_is_code_7() {
        for v in [
            json!("8.8.8.8"),
            json!({"nameservers": "8.8.8.8"}),
            json!({"nameservers": ["not-an-ip"]}),
            json!({"search": [1]}),
            json!({"options": {}}),
            json!({"domain": ["x"]}),
        ] {
            let e = parse_json(with("dns", v.clone())).unwrap_err();
            assert_eq!(e.code, codes::INVALID_CONFIG, "{v}");
        }
        parse_json(with("dns", json!({}))).unwrap();
    }

    #[test]
    fn mistyped_runtime_fields_are_code_7() {
        for (k, v) in [
            ("prevResult", json!([])),
            ("runtimeConfig", json!("x")),
            ("args", json!(1)),
            (VALID_ATTACHMENTS_KEY, json!({})),
            (VALID_ATTACHMENTS_KEY, json!([{"containerID": "a"}])),
            (VALID_ATTACHMENTS_KEY, json!([{"containerID": 1, "ifname": "eth0"}])),
        ] {
            let e = parse_json(with(k, v.clone())).unwrap_err();
            assert_eq!(e.code, codes::INVALID_CONFIG, "{k}: {v}");
        }
    }

    #[test]
    fn valid_attachments_are_parsed() {
        let c = parse_json(with(
            VALID_ATTACHMENTS_KEY,
            json!([{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1", "x": 1}]),
        ))
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![
                ValidAttachment { container_id: "a".into(), ifname: "eth0".into() },
                ValidAttachment { container_id: "b".into(), ifname: "net1".into() },
            ]
        );
    }

    #[test]
    fn reply_version_falls_back_to_default() {
        assert_eq!(reply_version(br#"{"cniVersion":"0.3.1"}"#), "0.3.1");
        assert_eq!(reply_version(br#"{"cniVersion":"9.9.9"}"#), DEFAULT_VERSION);
        assert_eq!(reply_version(b"{bad"), DEFAULT_VERSION);
    }

    #[test]
    fn requested_version_echoes_input() {
        assert_eq!(requested_version(b"").unwrap(), "1.1.0");
        assert_eq!(requested_version(b"{}").unwrap(), "1.1.0");
        assert_eq!(requested_version(br#"{"cniVersion":"0.4.0"}"#).unwrap(), "0.4.0");
        assert_eq!(requested_version(b"{bad").unwrap_err().code, codes::DECODE_FAILURE);
    }

    #[test]
    fn version_gates() {
        assert!(!CniVersion::V0_3_1.has_check() && CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_status_and_gc() && CniVersion::V1_1_0.has_status_and_gc());
        assert!(CniVersion::V0_4_0.ips_carry_version() && !CniVersion::V1_0_0.ips_carry_version());
        assert!(!CniVersion::V1_0_0.interfaces_carry_mtu() && CniVersion::V1_1_0.interfaces_carry_mtu());
        for s in SUPPORTED_VERSIONS {
            assert_eq!(CniVersion::parse(s).unwrap().as_str(), s);
        }
    }
}
