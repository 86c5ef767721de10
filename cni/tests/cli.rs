//! Runs the built `contiv-cni` binary the way a container runtime does: `CNI_*` variables, the
//! config on stdin, the answer on stdout. ADD/DEL/CHECK/STATUS/GC go to an in-process fake agent
//! (a tonic server on a temporary unix socket) that records what it received.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contiv_cni_api::v1::cni_server::{Cni, CniServer};
use contiv_cni_api::v1::{
    AddReply, Attachment, CheckReply, CniError, CniRequest, DelReply, Dns, GcReply, GcRequest, Interface, IpConfig,
    Route, StatusReply, StatusRequest,
};
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_contiv-cni");
const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

// === test scaffolding ===

/// What one run of the binary produced.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The error JSON; asserts exit 1, a single compact line, and all four keys.
    fn error(&self) -> Value {
        assert_eq!(self.code, 1, "{self:?}");
        let v = self.json();
        for k in ["cniVersion", "code", "msg", "details"] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        v
    }

    fn json(&self) -> Value {
        let line = self.stdout.strip_suffix('\n').unwrap_or(&self.stdout);
        assert!(!line.contains('\n'), "stdout must be one compact JSON line: {:?}", self.stdout);
        serde_json::from_str(line).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    fn assert_silent_success(&self) {
        assert_eq!((self.code, self.stdout.as_str()), (0, ""), "{self:?}");
    }
}

/// Runs the binary with exactly `env` (nothing inherited) and `stdin`.
fn run_cni(env: &[(&str, &str)], stdin: &str) -> Run {
    let mut child = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn contiv-cni");
    // The binary may exit before reading stdin (env errors): ignore a broken pipe.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().expect("exited by signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn attachment_env(command: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "ctr-1"),
        ("CNI_NETNS", "/run/netns/pod-1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

fn config(version: &str, socket: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "contiv-net",
        "type": "contiv-cni",
        "agentSocket": socket.to_str().unwrap(),
        "mtu": 1450,
        "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]}
    })
}

/// A socket path nobody listens on.
fn absent_socket(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("no-agent.sock")
}

// === fake agent ===

/// One request the fake agent received.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Add(CniRequest),
    Del(CniRequest),
    Check(CniRequest),
    Status(StatusRequest),
    Gc(GcRequest),
}

/// What the fake agent answers; `Err` is a gRPC status instead of a reply.
#[derive(Clone)]
struct Script {
    add: Result<AddReply, Status>,
    del: Result<DelReply, Status>,
    check: Result<CheckReply, Status>,
    status: Result<StatusReply, Status>,
    gc: Result<GcReply, Status>,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            add: Ok(pod_reply()),
            del: Ok(DelReply::default()),
            check: Ok(CheckReply::default()),
            status: Ok(StatusReply::default()),
            gc: Ok(GcReply { error: None, removed: 2 }),
        }
    }
}

struct FakeCni {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Script,
}

#[tonic::async_trait]
impl Cni for FakeCni {
    async fn add(&self, r: Request<CniRequest>) -> Result<Response<AddReply>, Status> {
        self.seen.lock().unwrap().push(Seen::Add(r.into_inner()));
        self.script.add.clone().map(Response::new)
    }
    async fn del(&self, r: Request<CniRequest>) -> Result<Response<DelReply>, Status> {
        self.seen.lock().unwrap().push(Seen::Del(r.into_inner()));
        self.script.del.clone().map(Response::new)
    }
    async fn check(&self, r: Request<CniRequest>) -> Result<Response<CheckReply>, Status> {
        self.seen.lock().unwrap().push(Seen::Check(r.into_inner()));
        self.script.check.clone().map(Response::new)
    }
    async fn status(&self, r: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        self.seen.lock().unwrap().push(Seen::Status(r.into_inner()));
        self.script.status.clone().map(Response::new)
    }
    async fn gc(&self, r: Request<GcRequest>) -> Result<Response<GcReply>, Status> {
        self.seen.lock().unwrap().push(Seen::Gc(r.into_inner()));
        self.script.gc.clone().map(Response::new)
    }
}

/// A fake vswitch agent serving the CNI API on a temporary unix socket; stops on drop.
struct FakeAgent {
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl FakeAgent {
    fn start(script: Script) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(async { tokio::net::UnixListener::bind(&socket) }).unwrap();
        let svc = CniServer::new(FakeCni { seen: seen.clone(), script });
        runtime.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await
                .expect("fake agent server");
        });
        Self { socket, seen, runtime: Some(runtime), _dir: dir }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn only_request(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(seen.len(), 1, "expected exactly one request, got {seen:?}");
        seen.into_iter().next().unwrap()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// The agent's answer for a pod: host veth, pod eth0, a v4 and a v6 address, routes, DNS.
fn pod_reply() -> AddReply {
    AddReply {
        error: None,
        interfaces: vec![
            Interface { name: "veth-ctr1".into(), mac: "02:fe:00:00:00:01".into(), mtu: 0, sandbox: String::new() },
            Interface {
                name: "eth0".into(),
                mac: "02:fe:00:00:00:02".into(),
                mtu: 1450,
                sandbox: "/run/netns/pod-1".into(),
            },
        ],
        ips: vec![
            IpConfig { address: "10.1.1.2/32".into(), gateway: "10.1.1.1".into(), interface: 1 },
            IpConfig { address: "fd00:1::2/128".into(), gateway: "fd00:1::1".into(), interface: 1 },
        ],
        routes: vec![
            Route { dst: "0.0.0.0/0".into(), gw: "10.1.1.1".into() },
            Route { dst: "::/0".into(), gw: String::new() },
        ],
        dns: Some(Dns {
            nameservers: vec!["10.96.0.10".into()],
            domain: "cluster.local".into(),
            search: vec!["default.svc.cluster.local".into()],
            options: vec![],
        }),
    }
}

fn expected_add_result(version: &str) -> Value {
    let mut ips = json!([
        {"interface": 1, "address": "10.1.1.2/32", "gateway": "10.1.1.1"},
        {"interface": 1, "address": "fd00:1::2/128", "gateway": "fd00:1::1"}
    ]);
    if matches!(version, "0.3.0" | "0.3.1" | "0.4.0") {
        ips[0]["version"] = json!("4");
        ips[1]["version"] = json!("6");
    }
    // Interface `mtu` is a spec 1.1.0 field.
    let mut eth0 = json!({"name": "eth0", "mac": "02:fe:00:00:00:02", "sandbox": "/run/netns/pod-1"});
    if version == "1.1.0" {
        eth0["mtu"] = json!(1450);
    }
    json!({
        "cniVersion": version,
        "interfaces": [{"name": "veth-ctr1", "mac": "02:fe:00:00:00:01"}, eth0],
        "ips": ips,
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.1.1"}, {"dst": "::/0"}],
        "dns": {"nameservers": ["10.96.0.10"], "domain": "cluster.local", "search": ["default.svc.cluster.local"]}
    })
}

// === VERSION ===

#[test]
fn cli_version_echoes_requested_version() {
    let r = run_cni(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json(), json!({"cniVersion": "0.4.0", "supportedVersions": SUPPORTED}));
}

#[test]
fn cli_version_without_input_is_1_1_0() {
    let r = run_cni(&[("CNI_COMMAND", "VERSION")], "");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n"
    );
}

// === environment errors (code 4) ===

#[test]
fn cli_missing_cni_command_is_code_4() {
    let r = run_cni(&[], "{}");
    let v = r.error();
    assert_eq!(v["code"], 4);
    assert!(v["msg"].as_str().unwrap().contains("CNI_COMMAND"), "{v}");
    assert!(!r.stderr.is_empty(), "error is logged on stderr too");
}

#[test]
fn cli_unknown_cni_command_is_code_4() {
    let v = run_cni(&[("CNI_COMMAND", "FROB")], "{}").error();
    assert_eq!(v["code"], 4);
    assert!(v["msg"].as_str().unwrap().contains("CNI_COMMAND"), "{v}");
}

#[test]
fn cli_add_names_each_missing_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("1.1.0", &absent_socket(&dir)).to_string();
    for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let env: Vec<_> = attachment_env("ADD").into_iter().filter(|(k, _)| *k != missing).collect();
        let v = run_cni(&env, &cfg).error();
        assert_eq!(v["code"], 4, "{missing}");
        assert_eq!(v["msg"], format!("required env variables [{missing}] missing"));
    }
}

#[test]
fn cli_del_and_check_require_containerid_and_ifname() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("1.1.0", &absent_socket(&dir));
    cfg["prevResult"] = json!({});
    for cmd in ["DEL", "CHECK"] {
        for missing in ["CNI_CONTAINERID", "CNI_IFNAME"] {
            let env: Vec<_> = attachment_env(cmd).into_iter().filter(|(k, _)| *k != missing).collect();
            let v = run_cni(&env, &cfg.to_string()).error();
            assert_eq!(v["code"], 4, "{cmd} without {missing}");
            assert!(v["msg"].as_str().unwrap().contains(missing), "{v}");
        }
    }
}

#[test]
fn cli_del_does_not_require_netns() {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<_> = attachment_env("DEL").into_iter().filter(|(k, _)| *k != "CNI_NETNS").collect();
    // It gets past the env check; with no agent listening it is recorded for the agent.
    let run = run_cni(&env, &config("1.1.0", &absent_socket(&dir)).to_string());
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:?}");
    assert!(dir.path().join("pending-del").read_dir().unwrap().count() == 1, "{run:?}");
}

// === config errors (6, 7, 1) ===

#[test]
fn cli_undecodable_config_is_code_6() {
    for input in ["{bad", "", "[]"] {
        let v = run_cni(&attachment_env("ADD"), input).error();
        assert_eq!(v["code"], 6, "{input:?}: {v}");
        assert_eq!(v["cniVersion"], "1.1.0");
    }
}

#[test]
fn cli_invalid_config_is_code_7() {
    let dir = tempfile::tempdir().unwrap();
    let good = config("1.0.0", &absent_socket(&dir));
    let cases: Vec<(&str, Option<Value>)> = vec![
        ("name", None),
        ("name", Some(json!(""))),
        ("name", Some(json!(["x"]))),
        ("type", None),
        ("type", Some(json!(""))),
        ("cniVersion", None),
        ("cniVersion", Some(json!(""))),
        ("cniVersion", Some(json!(1.0))),
        ("agentSocket", Some(json!("relative/cni.sock"))),
        ("agentSocket", Some(json!(true))),
        ("mtu", Some(json!("1500"))),
        ("dns", Some(json!({"nameservers": "10.96.0.10"}))),
    ];
    for (key, value) in cases {
        let mut cfg = good.clone();
        match &value {
            None => {
                cfg.as_object_mut().unwrap().remove(key);
            }
            Some(v) => cfg[key] = v.clone(),
        }
        let v = run_cni(&attachment_env("ADD"), &cfg.to_string()).error();
        assert_eq!(v["code"], 7, "{key}={value:?}: {v}");
    }
}

#[test]
fn cli_unsupported_version_is_code_1_listing_supported() {
    let dir = tempfile::tempdir().unwrap();
    let v = run_cni(&attachment_env("ADD"), &config("9.9.9", &absent_socket(&dir)).to_string()).error();
    assert_eq!(v["code"], 1);
    let details = v["details"].as_str().unwrap();
    for s in SUPPORTED {
        assert!(details.contains(s), "{details}");
    }
}

#[test]
fn cli_check_needs_0_4_0_status_and_gc_need_1_1_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("0.3.1", &absent_socket(&dir));
    cfg["prevResult"] = json!({});
    let v = run_cni(&attachment_env("CHECK"), &cfg.to_string()).error();
    assert_eq!((v["code"].as_u64(), v["cniVersion"].as_str()), (Some(1), Some("0.3.1")));

    let mut cfg = config("1.0.0", &absent_socket(&dir));
    cfg["cni.dev/valid-attachments"] = json!([]);
    for cmd in ["STATUS", "GC"] {
        let v = run_cni(&[("CNI_COMMAND", cmd)], &cfg.to_string()).error();
        assert_eq!(v["code"], 1, "{cmd}: {v}");
    }
}

// === agent not reachable ===

#[test]
fn cli_unreachable_agent_is_code_11_a_recorded_del_and_status_50() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("1.1.0", &absent_socket(&dir));
    cfg["prevResult"] = json!({});
    cfg["cni.dev/valid-attachments"] = json!([]);
    let cfg = cfg.to_string();
    for cmd in ["ADD", "CHECK"] {
        let v = run_cni(&attachment_env(cmd), &cfg).error();
        assert_eq!(v["code"], 11, "{cmd}: {v}");
    }
    // DEL succeeds, recorded for the agent (the spec: DEL completes as far as it can).
    let del = run_cni(&attachment_env("DEL"), &cfg);
    assert_eq!((del.code, del.stdout.as_str()), (0, ""), "{del:?}");
    assert!(del.stderr.contains("recorded"), "{del:?}");
    let v = run_cni(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")], &cfg).error();
    assert_eq!(v["code"], 11);
    let v = run_cni(&[("CNI_COMMAND", "STATUS")], &cfg).error();
    assert_eq!(v["code"], 50);
}

/// An agent socket this process may not use: as root, contiv-cni runs as `nobody` (setpriv)
/// against a root-owned 0600 socket, as the agent creates it; otherwise the socket is ours
/// with mode 0000. Either way connect(2) fails with EACCES.
#[test]
fn cli_permission_denied_on_the_socket_is_code_5_not_try_again() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("cni.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(if root { 0o600 } else { 0 })).unwrap();
    // A copy of the binary any user can run (the build directory may not be).
    let bin = dir.path().join("contiv-cni");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = config("1.1.0", &socket).to_string();
    for env in [attachment_env("ADD"), attachment_env("DEL"), vec![("CNI_COMMAND", "STATUS")]] {
        let mut cmd = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let mut child = cmd
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn contiv-cni (as root this needs setpriv from util-linux)");
        let _ = child.stdin.take().unwrap().write_all(cfg.as_bytes());
        let out = child.wait_with_output().unwrap();
        let run = Run {
            code: out.status.code().expect("exited by signal"),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        };
        let v = run.error();
        assert_eq!(v["code"], 5, "{env:?}: {v}");
        assert!(v["msg"].as_str().unwrap().contains("must run as root"), "{v}");
        let details = v["details"].as_str().unwrap();
        assert!(details.contains("permission denied") && details.contains("cni.sock"), "{v}");
        if root {
            assert!(details.contains("owned by uid 0") && details.contains("runs as uid 65534"), "{v}");
        }
    }
}

// === forwarding to the (fake) agent ===

#[test]
fn fake_agent_add_forwards_request_fields() {
    let agent = FakeAgent::start(Script::default());
    let mut cfg = config("1.1.0", &agent.socket);
    cfg["runtimeConfig"] = json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]});
    cfg["args"] = json!({"cni": {"labels": []}});
    cfg["cni.dev/attachments"] = json!([]);
    let stdin = cfg.to_string();
    let r = run_cni(&attachment_env("ADD"), &stdin);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        agent.only_request(),
        Seen::Add(CniRequest {
            container_id: "ctr-1".into(),
            netns: "/run/netns/pod-1".into(),
            ifname: "eth0".into(),
            args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1".into(),
            network_name: "contiv-net".into(),
            network_config: stdin.into_bytes(),
        })
    );
}

#[test]
fn fake_agent_add_result_for_each_version() {
    let agent = FakeAgent::start(Script::default());
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let r = run_cni(&attachment_env("ADD"), &config(version, &agent.socket).to_string());
        assert_eq!(r.code, 0, "{version}: {r:?}");
        assert_eq!(r.json(), expected_add_result(version), "{version}");
    }
}

#[test]
fn fake_agent_add_empty_dns_prints_empty_object() {
    let mut reply = pod_reply();
    reply.dns = None;
    let agent = FakeAgent::start(Script { add: Ok(reply), ..Script::default() });
    let r = run_cni(&attachment_env("ADD"), &config("1.0.0", &agent.socket).to_string());
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["dns"], json!({}));
}

#[test]
fn fake_agent_add_extends_prev_result() {
    let agent = FakeAgent::start(Script::default());
    let mut cfg = config("1.1.0", &agent.socket);
    cfg["prevResult"] = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "net0", "mac": "aa:bb:cc:00:00:01", "sandbox": "/run/netns/pod-1"}],
        "ips": [{"interface": 0, "address": "192.168.5.2/24", "gateway": "192.168.5.1"}],
        "dns": {}
    });
    let r = run_cni(&attachment_env("ADD"), &cfg.to_string());
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    let names: Vec<_> = v["interfaces"].as_array().unwrap().iter().map(|i| i["name"].clone()).collect();
    assert_eq!(names, [json!("net0"), json!("veth-ctr1"), json!("eth0")]);
    assert_eq!(v["ips"][0]["address"], "192.168.5.2/24");
    assert_eq!(v["ips"][1], json!({"interface": 2, "address": "10.1.1.2/32", "gateway": "10.1.1.1"}));
    assert_eq!(v["dns"]["domain"], "cluster.local");
}

#[test]
fn fake_agent_add_bad_prev_result_is_code_7_and_not_forwarded() {
    let agent = FakeAgent::start(Script::default());
    let mut cfg = config("1.1.0", &agent.socket);
    cfg["prevResult"] = json!({"interfaces": [{"mac": "no name"}]});
    let v = run_cni(&attachment_env("ADD"), &cfg.to_string()).error();
    assert_eq!(v["code"], 7);
    assert!(agent.seen().is_empty());
}

#[test]
fn fake_agent_add_in_band_error_is_printed_as_is() {
    let reply = AddReply {
        error: Some(CniError { code: 101, msg: "no free address".into(), details: "pool 10.1.1.0/24".into() }),
        ..AddReply::default()
    };
    let agent = FakeAgent::start(Script { add: Ok(reply), ..Script::default() });
    let r = run_cni(&attachment_env("ADD"), &config("0.4.0", &agent.socket).to_string());
    assert_eq!(
        r.error(),
        json!({"cniVersion": "0.4.0", "code": 101, "msg": "no free address", "details": "pool 10.1.1.0/24"})
    );
}

#[test]
fn fake_agent_error_code_zero_is_success() {
    let mut reply = pod_reply();
    reply.error = Some(CniError::default());
    let agent = FakeAgent::start(Script { add: Ok(reply), ..Script::default() });
    let r = run_cni(&attachment_env("ADD"), &config("1.1.0", &agent.socket).to_string());
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json(), expected_add_result("1.1.0"));
}

#[test]
fn fake_agent_del_forwards_without_netns() {
    let agent = FakeAgent::start(Script::default());
    let mut cfg = config("1.1.0", &agent.socket);
    cfg["prevResult"] = json!({"interfaces": [{"name": "eth0"}]});
    let stdin = cfg.to_string();
    let env: Vec<_> = attachment_env("DEL").into_iter().filter(|(k, _)| *k != "CNI_NETNS").collect();
    run_cni(&env, &stdin).assert_silent_success();
    let Seen::Del(req) = agent.only_request() else { panic!("not DEL") };
    assert_eq!((req.container_id.as_str(), req.ifname.as_str(), req.netns.as_str()), ("ctr-1", "eth0", ""));
    assert_eq!(req.network_config, stdin.as_bytes(), "prevResult passed through");
}

#[test]
fn fake_agent_del_in_band_error_is_printed() {
    let reply =
        DelReply { error: Some(CniError { code: 100, msg: "tc detach failed".into(), details: String::new() }) };
    let agent = FakeAgent::start(Script { del: Ok(reply), ..Script::default() });
    let v = run_cni(&attachment_env("DEL"), &config("1.0.0", &agent.socket).to_string()).error();
    assert_eq!((v["code"].as_u64(), v["cniVersion"].as_str()), (Some(100), Some("1.0.0")));
}

#[test]
fn fake_agent_check_forwards_prev_result() {
    let agent = FakeAgent::start(Script::default());
    let mut cfg = config("1.0.0", &agent.socket);
    cfg["prevResult"] = expected_add_result("1.0.0");
    let stdin = cfg.to_string();
    run_cni(&attachment_env("CHECK"), &stdin).assert_silent_success();
    let Seen::Check(req) = agent.only_request() else { panic!("not CHECK") };
    assert_eq!(req.netns, "/run/netns/pod-1");
    let forwarded: Value = serde_json::from_slice(&req.network_config).unwrap();
    assert_eq!(forwarded["prevResult"], expected_add_result("1.0.0"));
}

#[test]
fn fake_agent_check_mismatch_is_printed() {
    let reply = CheckReply {
        error: Some(CniError { code: 100, msg: "address 10.1.1.2/32 missing on eth0".into(), details: String::new() }),
    };
    let agent = FakeAgent::start(Script { check: Ok(reply), ..Script::default() });
    let mut cfg = config("1.1.0", &agent.socket);
    cfg["prevResult"] = expected_add_result("1.1.0");
    let v = run_cni(&attachment_env("CHECK"), &cfg.to_string()).error();
    assert_eq!(v["msg"], "address 10.1.1.2/32 missing on eth0");
}

#[test]
fn fake_agent_check_without_prev_result_is_code_7() {
    let agent = FakeAgent::start(Script::default());
    let v = run_cni(&attachment_env("CHECK"), &config("1.1.0", &agent.socket).to_string()).error();
    assert_eq!(v["code"], 7);
    assert!(agent.seen().is_empty());
}

#[test]
fn fake_agent_gc_forwards_valid_attachments() {
    let agent = FakeAgent::start(Script::default());
    let mut cfg = config("1.1.0", &agent.socket);
    cfg["cni.dev/valid-attachments"] =
        json!([{"containerID": "ctr-1", "ifname": "eth0"}, {"containerID": "ctr-2", "ifname": "net1"}]);
    let stdin = cfg.to_string();
    run_cni(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")], &stdin).assert_silent_success();
    assert_eq!(
        agent.only_request(),
        Seen::Gc(GcRequest {
            network_name: "contiv-net".into(),
            network_config: stdin.into_bytes(),
            valid_attachments: vec![
                Attachment { container_id: "ctr-1".into(), ifname: "eth0".into() },
                Attachment { container_id: "ctr-2".into(), ifname: "net1".into() },
            ],
        })
    );
}

/// libcni writes `null` when no attachment of the network is valid (the runtime's list
/// for it is empty, e.g. after a drain): every attachment is then garbage.
#[test]
fn fake_agent_gc_with_null_valid_attachments_collects_everything() {
    let agent = FakeAgent::start(Script::default());
    let mut cfg = config("1.1.0", &agent.socket);
    cfg["cni.dev/valid-attachments"] = serde_json::Value::Null;
    let stdin = cfg.to_string();
    run_cni(&[("CNI_COMMAND", "GC")], &stdin).assert_silent_success();
    assert_eq!(
        agent.only_request(),
        Seen::Gc(GcRequest {
            network_name: "contiv-net".into(),
            network_config: stdin.into_bytes(),
            valid_attachments: vec![]
        })
    );
}

#[test]
fn fake_agent_gc_malformed_attachments_is_code_7() {
    let agent = FakeAgent::start(Script::default());
    let mut cfg = config("1.1.0", &agent.socket);
    cfg["cni.dev/valid-attachments"] = json!([{"containerID": "ctr-1"}]);
    let v = run_cni(&[("CNI_COMMAND", "GC")], &cfg.to_string()).error();
    assert_eq!(v["code"], 7);
    assert!(agent.seen().is_empty());
}

#[test]
fn fake_agent_status_ready_prints_nothing() {
    let agent = FakeAgent::start(Script::default());
    let stdin = config("1.1.0", &agent.socket).to_string();
    run_cni(&[("CNI_COMMAND", "STATUS")], &stdin).assert_silent_success();
    assert_eq!(agent.only_request(), Seen::Status(StatusRequest { network_config: stdin.into_bytes() }));
}

#[test]
fn fake_agent_status_not_ready_is_50() {
    let reply = StatusReply {
        error: Some(CniError { code: 50, msg: "datapath not loaded".into(), details: "waiting for BPF".into() }),
    };
    let agent = FakeAgent::start(Script { status: Ok(reply), ..Script::default() });
    let v = run_cni(&[("CNI_COMMAND", "STATUS")], &config("1.1.0", &agent.socket).to_string()).error();
    assert_eq!(
        v,
        json!({"cniVersion": "1.1.0", "code": 50, "msg": "datapath not loaded", "details": "waiting for BPF"})
    );
}

#[test]
fn fake_agent_status_rpc_failure_is_50() {
    let agent = FakeAgent::start(Script { status: Err(Status::internal("boom")), ..Script::default() });
    let v = run_cni(&[("CNI_COMMAND", "STATUS")], &config("1.1.0", &agent.socket).to_string()).error();
    assert_eq!(v["code"], 50);
}

#[test]
fn fake_agent_unavailable_status_is_code_11_other_rpc_errors_100() {
    let agent = FakeAgent::start(Script {
        add: Err(Status::unavailable("shutting down")),
        gc: Err(Status::unimplemented("GC")),
        ..Script::default()
    });
    let v = run_cni(&attachment_env("ADD"), &config("1.1.0", &agent.socket).to_string()).error();
    assert_eq!(v["code"], 11, "{v}");
    let mut cfg = config("1.1.0", &agent.socket);
    cfg["cni.dev/valid-attachments"] = json!([]);
    let v = run_cni(&[("CNI_COMMAND", "GC")], &cfg.to_string()).error();
    assert_eq!(v["code"], 100, "{v}");
}

#[test]
fn fake_agent_round_trip_is_fast() {
    let agent = FakeAgent::start(Script::default());
    let cfg = config("1.1.0", &agent.socket).to_string();
    let start = Instant::now();
    for _ in 0..5 {
        assert_eq!(run_cni(&attachment_env("ADD"), &cfg).code, 0);
    }
    let per_call = start.elapsed() / 5;
    assert!(per_call < Duration::from_secs(1), "one ADD took {per_call:?}");
}
