//! One invocation: environment + stdin in, stdout text + exit code out.
//!
//! [`plan`] does everything that needs no agent (env, config, version gates, prevResult); a
//! [`Forward`] is then sent to the agent by [`forward`]. [`run`] drives both for `main`,
//! building a single-threaded tokio runtime only when the agent is actually called.

use std::io::Read;
use std::path::PathBuf;

use contiv_cni_api::v1;

use crate::agent::{Agent, AgentError, Timeouts};
use crate::config::{self, CniVersion, NetworkConfig, SUPPORTED_VERSIONS};
use crate::env::{self, CniEnv, Command, Env};
use crate::error::CniError;
use crate::result::{self, AddResult};

/// What the binary prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Text for stdout (compact JSON or empty), without a trailing newline.
    pub stdout: String,
    /// 0 on success, 1 on any error.
    pub exit_code: i32,
    /// The error, if any, for a log line on stderr.
    pub error: Option<CniError>,
}

impl Outcome {
    fn success(stdout: String) -> Self {
        Self { stdout, exit_code: 0, error: None }
    }

    fn failure(error: CniError, cni_version: &str) -> Self {
        Self { stdout: error.to_json(cni_version), exit_code: 1, error: Some(error) }
    }
}

/// The result of the agent-free part of an invocation.
#[derive(Debug)]
pub enum Plan {
    /// Print this and exit 0 (VERSION).
    Print(String),
    /// Send a request to the agent.
    Forward(Box<Forward>),
}

/// A request for the agent, with what is needed to answer the runtime.
#[derive(Debug)]
pub struct Forward {
    pub socket: PathBuf,
    pub version: CniVersion,
    pub request: AgentRequest,
}

/// The RPC to make.
#[derive(Debug)]
pub enum AgentRequest {
    /// `prev` is a validated `prevResult` to extend with the agent's result.
    Add {
        request: v1::CniRequest,
        prev: Option<AddResult>,
    },
    Del(v1::CniRequest),
    Check(v1::CniRequest),
    Status(v1::StatusRequest),
    Gc(v1::GcRequest),
}

/// VERSION's answer for the requested version.
pub fn version_json(requested: &str) -> String {
    serde_json::json!({"cniVersion": requested, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// Decides what to do without contacting the agent.
pub fn plan(env: &CniEnv, stdin: &[u8]) -> Result<Plan, CniError> {
    if env.command == Command::Version {
        return config::requested_version(stdin).map(|v| Plan::Print(version_json(&v)));
    }
    let cfg = if env.command == Command::Del { config::parse_for_del(stdin)? } else { config::parse(stdin)? };
    let version = cfg.cni_version;
    let too_old = |since: &str| {
        CniError::incompatible_version(
            format!("config version does not allow {}", env.command.as_str()),
            format!("{} needs cniVersion {since} or later, config is {}", env.command.as_str(), version.as_str()),
        )
    };
    let request = match env.command {
        // Answered above without a config; never forwarded.
        Command::Version => {
            return Err(CniError::internal("VERSION is not forwarded to the agent", ""));
        }
        Command::Add => {
            let prev = cfg.prev_result.as_ref().map(result::parse_prev_result).transpose()?;
            AgentRequest::Add { request: cni_request(env, &cfg), prev }
        }
        Command::Del => AgentRequest::Del(cni_request(env, &cfg)),
        Command::Check => {
            if !version.has_check() {
                return Err(too_old("0.4.0"));
            }
            let prev = cfg.prev_result.as_ref().ok_or_else(|| {
                CniError::invalid_config("CHECK requires prevResult", "the runtime must pass the result of ADD")
            })?;
            result::parse_prev_result(prev)?;
            AgentRequest::Check(cni_request(env, &cfg))
        }
        Command::Status => {
            if !version.has_status_and_gc() {
                return Err(too_old("1.1.0"));
            }
            AgentRequest::Status(v1::StatusRequest { network_config: cfg.raw.clone() })
        }
        Command::Gc => {
            if !version.has_status_and_gc() {
                return Err(too_old("1.1.0"));
            }
            let valid = cfg.valid_attachments.as_ref().ok_or_else(|| {
                CniError::invalid_config(
                    format!("GC requires {}", config::VALID_ATTACHMENTS_KEY),
                    "refusing to treat a missing list as 'no attachment is valid'",
                )
            })?;
            AgentRequest::Gc(v1::GcRequest {
                network_name: cfg.name.clone(),
                network_config: cfg.raw.clone(),
                valid_attachments: valid
                    .iter()
                    .map(|a| v1::Attachment { container_id: a.container_id.clone(), ifname: a.ifname.clone() })
                    .collect(),
            })
        }
    };
    Ok(Plan::Forward(Box::new(Forward { socket: cfg.agent_socket, version, request })))
}

fn cni_request(env: &CniEnv, cfg: &NetworkConfig) -> v1::CniRequest {
    v1::CniRequest {
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        args: env.args.clone(),
        network_name: cfg.name.clone(),
        network_config: cfg.raw.clone(),
    }
}

/// An in-band agent error (code != 0), if any.
fn in_band(error: Option<v1::CniError>) -> Result<(), CniError> {
    match error {
        Some(e) if e.code != 0 => Err(e.into()),
        _ => Ok(()),
    }
}

/// Transport failures: code 5 when this process may not use the socket (not root; retrying
/// cannot help), 11 when transient (agent down, timeout), else 100.
fn transport_error(e: AgentError) -> CniError {
    if let AgentError::PermissionDenied { .. } = e {
        CniError::io_failure(
            "permission denied on the vswitch agent's socket: contiv-cni must run as root",
            e.to_string(),
        )
    } else if e.is_transient() {
        CniError::try_again_later("vswitch agent not reachable, try again later", e.to_string())
    } else {
        CniError::internal("vswitch agent call failed", e.to_string())
    }
}

/// Sends the request to the agent and turns the reply into stdout text (possibly empty).
pub async fn forward(f: Forward, timeouts: Timeouts) -> Result<String, CniError> {
    let is_status = matches!(f.request, AgentRequest::Status(_));
    let timeouts =
        if is_status { Timeouts { request: timeouts.status.min(timeouts.request), ..timeouts } } else { timeouts };
    let connected = Agent::connect(&f.socket, timeouts).await;
    let mut agent = match connected {
        Ok(a) => a,
        Err(e @ AgentError::PermissionDenied { .. }) => return Err(transport_error(e)),
        // STATUS: an unreachable agent means the plugin cannot service ADD.
        Err(e) if is_status => {
            return Err(CniError::not_available("vswitch agent not available", e.to_string()));
        }
        // DEL succeeds as far as it can (the spec): with no agent running, it is recorded
        // for the agent to carry out when it runs again (contiv_cni_api::pending_del).
        Err(e @ AgentError::NotRunning { .. }) if matches!(f.request, AgentRequest::Del(_)) => {
            let AgentRequest::Del(request) = &f.request else { unreachable!("matched above") };
            return match contiv_cni_api::pending_del::record(&f.socket, request) {
                Ok(file) => {
                    eprintln!("contiv-cni: {e}; the DEL is recorded in {} for it", file.display());
                    Ok(String::new())
                }
                Err(io) => Err(CniError::try_again_later(
                    "vswitch agent not running, and the DEL could not be recorded for it",
                    format!("{e}; recording: {io}"),
                )),
            };
        }
        Err(e) => return Err(transport_error(e)),
    };
    match f.request {
        AgentRequest::Add { request, prev } => {
            let reply = agent.add(request).await.map_err(transport_error)?;
            in_band(reply.error.clone())?;
            Ok(result::add_result(f.version, &reply, prev)?.to_json())
        }
        AgentRequest::Del(request) => {
            in_band(agent.del(request).await.map_err(transport_error)?.error)?;
            Ok(String::new())
        }
        AgentRequest::Check(request) => {
            in_band(agent.check(request).await.map_err(transport_error)?.error)?;
            Ok(String::new())
        }
        AgentRequest::Status(request) => {
            let reply = agent
                .status(request)
                .await
                .map_err(|e| CniError::not_available("vswitch agent not available", e.to_string()))?;
            in_band(reply.error)?;
            Ok(String::new())
        }
        AgentRequest::Gc(request) => {
            in_band(agent.gc(request).await.map_err(transport_error)?.error)?;
            Ok(String::new())
        }
    }
}

/// Env + stdin -> an agent call, or the finished outcome (VERSION, or an error before the call).
/// The config is read first: an error, also one of the environment, is given in the
/// config's `cniVersion` (CNI spec, "Error": "the same value as provided by the
/// configuration"), or in [`config::DEFAULT_VERSION`] if it names none the plugin speaks.
fn prepare(env: &dyn Env, stdin: &mut dyn Read) -> Result<Forward, Outcome> {
    let mut input = Vec::new();
    stdin.read_to_end(&mut input).map_err(|e| {
        Outcome::failure(
            CniError::io_failure("error reading network config from stdin", e.to_string()),
            config::DEFAULT_VERSION,
        )
    })?;
    let reply_version = config::reply_version(&input);
    let cni_env = env::read(env).map_err(|e| Outcome::failure(e, reply_version))?;
    match plan(&cni_env, &input) {
        Ok(Plan::Print(s)) => Err(Outcome::success(s)),
        Ok(Plan::Forward(f)) => Ok(*f),
        Err(e) => Err(Outcome::failure(e, reply_version)),
    }
}

/// The whole invocation, for `main`: runs the agent call on a current-thread runtime.
pub fn run(env: &dyn Env, stdin: &mut dyn Read, timeouts: Timeouts) -> Outcome {
    let f = match prepare(env, stdin) {
        Ok(f) => f,
        Err(done) => return done,
    };
    let version = f.version.as_str();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            return Outcome::failure(CniError::internal("cannot start the async runtime", e.to_string()), version);
        }
    };
    finish(rt.block_on(forward(f, timeouts)), version)
}

/// The whole invocation from inside an existing tokio runtime (tests, embedding).
pub async fn run_async(env: &dyn Env, mut stdin: &[u8], timeouts: Timeouts) -> Outcome {
    match prepare(env, &mut stdin) {
        Ok(f) => {
            let version = f.version.as_str();
            finish(forward(f, timeouts).await, version)
        }
        Err(done) => done,
    }
}

fn finish(r: Result<String, CniError>, version: &str) -> Outcome {
    match r {
        Ok(stdout) => Outcome::success(stdout),
        Err(e) => Outcome::failure(e, version),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use contiv_cni_api::codes;
    use serde_json::{Value, json};

    use super::*;

    fn env_for(command: &str) -> HashMap<&'static str, String> {
        let mut m = HashMap::from([("CNI_COMMAND", command.to_owned())]);
        if matches!(command, "ADD" | "DEL" | "CHECK") {
            m.insert("CNI_CONTAINERID", "c1".into());
            m.insert("CNI_NETNS", "/run/netns/pod1".into());
            m.insert("CNI_IFNAME", "eth0".into());
            m.insert("CNI_ARGS", "K8S_POD_NAME=p1".into());
        }
        m
    }

    struct MapEnv(HashMap<&'static str, String>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    fn config(version: &str, socket: &str) -> Value {
        json!({"cniVersion": version, "name": "contiv", "type": "contiv-cni", "agentSocket": socket})
    }

    fn short() -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(500),
            request: Duration::from_millis(500),
            status: Duration::from_millis(500),
        }
    }

    async fn invoke(command: &str, cfg: &Value) -> Outcome {
        run_async(&MapEnv(env_for(command)), cfg.to_string().as_bytes(), short()).await
    }

    fn error_of(o: &Outcome) -> Value {
        assert_eq!(o.exit_code, 1, "{o:?}");
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        for k in ["cniVersion", "code", "msg", "details"] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        v
    }

    fn planned(command: &str, cfg: &Value) -> Result<Plan, CniError> {
        let env = env::read(&MapEnv(env_for(command))).unwrap();
        plan(&env, cfg.to_string().as_bytes())
    }

    #[test]
    fn version_json_lists_supported_versions() {
        let v: Value = serde_json::from_str(&version_json("0.4.0")).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
    }

    #[tokio::test]
    async fn version_needs_no_agent_and_defaults_to_1_1_0() {
        let o = run_async(&MapEnv(env_for("VERSION")), b"", short()).await;
        assert_eq!(o.exit_code, 0);
        assert_eq!(o.stdout, r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#);
        let o = invoke("VERSION", &json!({"cniVersion": "0.3.1"})).await;
        assert_eq!(serde_json::from_str::<Value>(&o.stdout).unwrap()["cniVersion"], "0.3.1");
    }

    #[test]
    fn add_request_carries_env_and_verbatim_config() {
        let cfg = config("1.0.0", "/run/x.sock");
        let Ok(Plan::Forward(f)) = planned("ADD", &cfg) else { panic!("not forwarded") };
        assert_eq!(f.socket, PathBuf::from("/run/x.sock"));
        assert_eq!(f.version, CniVersion::V1_0_0);
        let AgentRequest::Add { request, prev } = f.request else { panic!("not ADD") };
        assert_eq!(
            request,
            v1::CniRequest {
                container_id: "c1".into(),
                netns: "/run/netns/pod1".into(),
                ifname: "eth0".into(),
                args: "K8S_POD_NAME=p1".into(),
                network_name: "contiv".into(),
                network_config: cfg.to_string().into_bytes(),
            }
        );
        assert!(prev.is_none());
    }

    /// DEL reads only what it uses: a config whose ADD-only fields went bad since the ADD
    /// (or that a stricter plugin refuses) still tears the pod down; ADD refuses it.
    #[test]
    fn del_is_not_refused_for_fields_only_add_uses() {
        let mut cfg = config("1.0.0", "/run/x.sock");
        cfg["mtu"] = json!(9001);
        cfg["dns"] = json!({"nameservers": ["kube-dns"]});
        cfg["runtimeConfig"] = json!("bad");
        cfg["prevResult"] = json!(7);
        assert!(matches!(planned("ADD", &cfg), Err(e) if e.code == codes::INVALID_CONFIG));
        let Ok(Plan::Forward(f)) = planned("DEL", &cfg) else { panic!("DEL not forwarded") };
        let AgentRequest::Del(request) = f.request else { panic!("not DEL") };
        assert_eq!((request.container_id.as_str(), request.ifname.as_str()), ("c1", "eth0"));
        assert_eq!(f.socket, PathBuf::from("/run/x.sock"));
        // What DEL uses is still checked.
        let mut bad = config("1.0.0", "x.sock");
        assert!(matches!(planned("DEL", &bad), Err(e) if e.code == codes::INVALID_CONFIG), "a relative agentSocket");
        bad = config("9.9.9", "/run/x.sock");
        assert!(matches!(planned("DEL", &bad), Err(e) if e.code == codes::INCOMPATIBLE_VERSION));
    }

    #[test]
    fn gc_request_carries_valid_attachments() {
        let mut cfg = config("1.1.0", "/run/x.sock");
        cfg["cni.dev/valid-attachments"] = json!([{"containerID": "c9", "ifname": "eth0"}]);
        let Ok(Plan::Forward(f)) = planned("GC", &cfg) else { panic!("not forwarded") };
        let AgentRequest::Gc(gc) = f.request else { panic!("not GC") };
        assert_eq!(gc.network_name, "contiv");
        assert_eq!(gc.network_config, cfg.to_string().into_bytes());
        assert_eq!(gc.valid_attachments, vec![v1::Attachment { container_id: "c9".into(), ifname: "eth0".into() }]);
    }

    #[tokio::test]
    async fn check_before_0_4_0_is_code_1() {
        let mut cfg = config("0.3.1", "/run/x.sock");
        cfg["prevResult"] = json!({});
        let v = error_of(&invoke("CHECK", &cfg).await);
        assert_eq!((v["code"].as_u64(), v["cniVersion"].as_str()), (Some(1), Some("0.3.1")));
    }

    #[tokio::test]
    async fn status_and_gc_before_1_1_0_are_code_1() {
        for cmd in ["STATUS", "GC"] {
            let mut cfg = config("1.0.0", "/run/x.sock");
            cfg["cni.dev/valid-attachments"] = json!([]);
            let v = error_of(&invoke(cmd, &cfg).await);
            assert_eq!(v["code"], 1, "{cmd}");
            assert_eq!(v["cniVersion"], "1.0.0");
            assert!(v["msg"].as_str().unwrap().contains(cmd));
        }
    }

    #[tokio::test]
    async fn check_without_prev_result_is_code_7() {
        let v = error_of(&invoke("CHECK", &config("1.1.0", "/run/x.sock")).await);
        assert_eq!(v["code"], codes::INVALID_CONFIG);
    }

    #[tokio::test]
    async fn gc_without_valid_attachments_is_code_7() {
        let v = error_of(&invoke("GC", &config("1.1.0", "/run/x.sock")).await);
        assert_eq!(v["code"], codes::INVALID_CONFIG);
        assert!(v["msg"].as_str().unwrap().contains("cni.dev/valid-attachments"));
    }

    #[tokio::test]
    async fn add_with_bad_prev_result_is_code_7() {
        let mut cfg = config("1.0.0", "/run/x.sock");
        cfg["prevResult"] = json!({"ips": [{"address": "nope"}]});
        let v = error_of(&invoke("ADD", &cfg).await);
        assert_eq!((v["code"].as_u64(), v["msg"].as_str()), (Some(7), Some("invalid prevResult")));
    }

    #[tokio::test]
    async fn environment_errors_carry_the_configs_version() {
        let cfg = config("0.4.0", "/run/x.sock").to_string();
        let out = run_async(&MapEnv(Default::default()), cfg.as_bytes(), short()).await;
        let v = error_of(&out);
        assert_eq!((v["code"].as_u64(), v["cniVersion"].as_str()), (Some(4), Some("0.4.0")), "{v}");
        let out = run_async(&MapEnv(Default::default()), b"{bad", short()).await;
        assert_eq!(error_of(&out)["cniVersion"], "1.1.0", "no version to echo");
    }

    #[tokio::test]
    async fn config_errors_carry_requested_version() {
        let mut cfg = config("0.4.0", "/run/x.sock");
        cfg["mtu"] = json!("big");
        let v = error_of(&invoke("ADD", &cfg).await);
        assert_eq!((v["code"].as_u64(), v["cniVersion"].as_str()), (Some(7), Some("0.4.0")));
        // An unsupported version cannot be echoed: errors then speak 1.1.0.
        let v = error_of(&invoke("ADD", &config("9.9.9", "/run/x.sock")).await);
        assert_eq!((v["code"].as_u64(), v["cniVersion"].as_str()), (Some(1), Some("1.1.0")));
    }

    #[tokio::test]
    async fn missing_socket_is_code_11_a_recorded_del_and_status_50() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("absent.sock");
        let mut cfg = config("1.1.0", sock.to_str().unwrap());
        cfg["prevResult"] = json!({});
        cfg["cni.dev/valid-attachments"] = json!([]);
        for cmd in ["ADD", "CHECK", "GC"] {
            let v = error_of(&invoke(cmd, &cfg).await);
            assert_eq!(v["code"], codes::TRY_AGAIN_LATER, "{cmd}: {v}");
            assert!(v["details"].as_str().unwrap().contains("absent.sock"), "{v}");
        }
        let v = error_of(&invoke("STATUS", &cfg).await);
        assert_eq!(v["code"], codes::NOT_AVAILABLE);
        // DEL succeeds, recorded for the agent.
        let o = invoke("DEL", &cfg).await;
        assert_eq!((o.exit_code, o.stdout.as_str()), (0, ""), "{o:?}");
        let recorded = contiv_cni_api::pending_del::recorded(&dir.path().join("pending-del"));
        assert_eq!(recorded.len(), 1);
        let req = recorded[0].1.as_ref().unwrap();
        assert_eq!((req.container_id.as_str(), req.ifname.as_str()), ("c1", "eth0"));
    }

    #[tokio::test]
    async fn refused_socket_is_code_11_and_a_del_that_cannot_be_recorded_too() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("stale.sock");
        // Bind and close: the socket file stays, connecting is refused.
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let v = error_of(&invoke("ADD", &config("1.1.0", sock.to_str().unwrap())).await);
        assert_eq!(v["code"], codes::TRY_AGAIN_LATER, "{v}");
        assert_eq!(invoke("DEL", &config("1.1.0", sock.to_str().unwrap())).await.exit_code, 0, "recorded");
        // Where the record cannot go (a file where its directory would be): the runtime retries.
        std::fs::remove_dir_all(dir.path().join("pending-del")).unwrap();
        std::fs::write(dir.path().join("pending-del"), "").unwrap();
        let v = error_of(&invoke("DEL", &config("1.1.0", sock.to_str().unwrap())).await);
        assert_eq!(v["code"], codes::TRY_AGAIN_LATER, "{v}");
        assert!(v["details"].as_str().unwrap().contains("recording"), "{v}");
    }

    #[tokio::test]
    async fn silent_agent_times_out_with_code_11() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("silent.sock");
        // Accepts connections (kernel backlog) but never speaks HTTP/2.
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let start = Instant::now();
        let o = invoke("ADD", &config("1.1.0", sock.to_str().unwrap())).await;
        let v = error_of(&o);
        assert_eq!(v["code"], codes::TRY_AGAIN_LATER, "{v}");
        assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    }

    #[tokio::test]
    async fn silent_agent_status_is_code_50() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("silent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // STATUS is bounded by its own, shorter timeout, not the request timeout.
        let timeouts = Timeouts {
            connect: Duration::from_millis(500),
            request: Duration::from_secs(30),
            status: Duration::from_millis(300),
        };
        let cfg = config("1.1.0", sock.to_str().unwrap()).to_string();
        let start = Instant::now();
        let o = run_async(&MapEnv(env_for("STATUS")), cfg.as_bytes(), timeouts).await;
        let v = error_of(&o);
        assert_eq!(v["code"], codes::NOT_AVAILABLE, "{v}");
        assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    }
}
