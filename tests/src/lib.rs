//! A throwaway node for end-to-end tests, the demo and the benchmarks.
//!
//! A [`Node`] is a network namespace with a real `contiv-agent` running in it (entered
//! with `nsenter --net`, so it shares the host's bpffs like a hostNetwork DaemonSet pod)
//! and its own socket, state and pin directories. Pods are namespaces wired by invoking
//! the built `contiv-cni` binary exactly as a runtime does: CNI_* variables and the
//! config on stdin. Everything is uniquely named and removed on Drop, also on panic.
//! Nothing here touches the machine's own interfaces.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod cluster;
pub mod netpol;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Gives every packet `socket` sends IPv4 options: three NOPs and an End of Options List,
/// a 24-byte header (IHL 6). Each NOP is one byte, so reading the transport header at the
/// fixed 20 bytes would read them as ports.
pub fn set_ip_options(socket: &impl std::os::fd::AsRawFd) {
    let options: [u8; 4] = [1, 1, 1, 0];
    // SAFETY: a valid socket, and a buffer of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            options.as_ptr().cast(),
            options.len() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
}

/// Makes closing `socket` send a reset (SO_LINGER 0): thousands of short connections in a
/// test or benchmark leave no TIME_WAIT behind.
pub fn close_with_reset(socket: &impl std::os::fd::AsRawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a linger value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// A unique short name: `<prefix><pid>x<counter>` (fits interface/netns name limits).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Directory holding the built binaries (target/debug or target/release).
/// `CONTIV_BIN_DIR` overrides; otherwise the directory this test binary lives in.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CONTIV_BIN_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a built binary of this workspace; panics with a hint if it is missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: build it first (`cargo xtask test` does)", p.display());
    p
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// === impl Netns ===

/// A named network namespace (`ip netns add`), deleted on Drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the end-to-end tests need root (network namespaces, BPF): run them with `cargo xtask test`"
        );
        let name = unique(prefix);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path a runtime passes as CNI_NETNS.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ARGS`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread inside the namespace. Sockets created there stay in this
    /// namespace, wherever they are used afterwards.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only; the fd is valid.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

// === impl ControlPlane ===

/// A control-plane host: its own namespace running a real etcd (Debian's etcd-server),
/// reachable from each linked node over a point-to-point veth (10.255.<n>.0/30), as a
/// cluster's etcd is reached over the node network. Stopped (by pid) and removed on Drop.
pub struct ControlPlane {
    etcd: std::sync::Mutex<Option<Child>>,
    pub ns: Netns,
    data_dir: PathBuf,
    links: AtomicU32,
}

impl ControlPlane {
    pub fn start() -> Self {
        let ns = Netns::new("ctcp");
        let data_dir = std::env::temp_dir().join(unique("contiv-etcd-"));
        std::fs::create_dir_all(&data_dir).expect("etcd data dir");
        let log = std::fs::File::create(data_dir.with_extension("log")).expect("etcd log");
        let child = ns
            .cmd("etcd")
            .arg("--data-dir")
            .arg(data_dir.join("data"))
            .args([
                "--listen-client-urls",
                "http://0.0.0.0:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "default=http://127.0.0.1:2380",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting etcd (cargo xtask setup installs etcd-server)");
        let cp = Self { etcd: std::sync::Mutex::new(Some(child)), ns, data_dir, links: AtomicU32::new(0) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cp.etcdctl(&["endpoint", "health"]).status.success() {
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        cp
    }

    /// The endpoint as seen from inside the control plane's namespace.
    pub fn local_endpoint(&self) -> &'static str {
        "http://127.0.0.1:2379"
    }

    /// `etcdctl ARGS` inside the control plane.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        self.ns
            .cmd("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", self.local_endpoint()])
            .args(args)
            .output()
            .expect("etcdctl")
    }

    /// A command run inside the control plane (e.g. netctl against its etcd).
    pub fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns.name()]).arg(program);
        c
    }

    /// Connects a node namespace to the control plane; returns the etcd endpoint the node uses.
    pub fn link(&self, node: &Netns) -> String {
        let n = self.links.fetch_add(1, Ordering::Relaxed);
        assert!(n < 250, "too many nodes on one control plane");
        let (cp_if, node_if) = (format!("cp{n}"), format!("cpl{n}"));
        self.ns.ip(&["link", "add", &cp_if, "type", "veth", "peer", "name", &node_if]);
        self.ns.ip(&["link", "set", &node_if, "netns", node.name()]);
        self.ns.ip(&["addr", "add", &format!("10.255.{n}.1/30"), "dev", &cp_if]);
        self.ns.ip(&["link", "set", &cp_if, "up"]);
        node.ip(&["addr", "add", &format!("10.255.{n}.2/30"), "dev", &node_if]);
        node.ip(&["link", "set", &node_if, "up"]);
        format!("http://10.255.{n}.1:2379")
    }

    /// Stops etcd (SIGKILL, by pid) — a store outage.
    pub fn kill_etcd(&self) {
        if let Some(mut c) = self.etcd.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill_etcd();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(self.data_dir.with_extension("log"));
    }
}

// === impl CniOutput ===

/// What a CNI invocation returned.
#[derive(Debug)]
pub struct CniOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    /// stdout parsed as JSON (panics if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?} / stderr {:?}", self.stdout, self.stderr))
    }

    /// The CNI error code (the `code` field), if stdout is an error object.
    pub fn error_code(&self) -> Option<u64> {
        serde_json::from_str::<Value>(&self.stdout).ok().and_then(|v| v.get("code").and_then(Value::as_u64))
    }

    pub fn ok(&self) -> &Self {
        assert_eq!(self.exit_code, 0, "CNI failed: {} / {}", self.stdout, self.stderr);
        self
    }
}

/// Invokes a CNI plugin binary the way a runtime does. `env` holds the CNI_* variables.
pub fn invoke_plugin(plugin: &Path, env: &[(&str, &str)], stdin: &str, in_netns: Option<&str>) -> CniOutput {
    let mut cmd = match in_netns {
        // Debian's plugins act on the namespace they run in: the node's.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(plugin);
            c
        }
        None => Command::new(plugin),
    };
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {}: {e}", plugin.display()));
    // A plugin may exit before reading its input (e.g. a missing variable): EPIPE is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().expect("waiting for plugin");
    CniOutput {
        exit_code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// === impl Node ===

/// Options for a node.
#[derive(Clone)]
pub struct NodeOptions {
    /// A fixed pod subnet; `None` lets the node registry allocate one by node ID.
    pub pod_subnet: Option<String>,
    pub mtu: u32,
    /// Cluster store: link the node to this control plane's etcd; `None`: the agent's
    /// embedded store in its own state directory.
    pub control_plane: Option<std::sync::Arc<ControlPlane>>,
    /// Node name; default: the node namespace's name.
    pub node_name: Option<String>,
    /// The agent binary; default: this build's `contiv-agent`.
    pub agent_binary: Option<PathBuf>,
    /// More agent configuration (TOML lines appended to the file).
    pub extra_config: String,
    /// Run the agent in a PID namespace of its own (with its own /proc), as in a DaemonSet
    /// without hostPID: `unshare --pid --fork --mount-proc`, mounts propagating from here.
    pub own_pid_namespace: bool,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            pod_subnet: Some("10.1.1.0/24".into()),
            mtu: 1500,
            control_plane: None,
            node_name: None,
            agent_binary: None,
            extra_config: String::new(),
            own_pid_namespace: false,
        }
    }
}

/// A node: its namespace, a running agent, and its private directories.
pub struct Node {
    // Field order matters for Drop: agent first, then the namespace.
    agent: Option<Child>,
    /// The binary `start_agent` runs (an upgrade test swaps it).
    pub agent_binary: PathBuf,
    pub ns: Netns,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub config_path: PathBuf,
    pub network_name: String,
    own_pid_namespace: bool,
}

/// A pod wired through the CNI.
pub struct Pod {
    pub ns: Netns,
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub result: Value,
}

impl Node {
    pub fn start(opts: NodeOptions) -> Self {
        let ns = Netns::new("ctn");
        let dir = std::env::temp_dir().join(unique("contiv-node-"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("contiv-test-"));
        let socket = dir.join("cni.sock");
        let config_path = dir.join("agent.toml");
        let mut config = format!(
            "nodeName = \"{}\"\nmtu = {}\ncniSocket = \"{}\"\nstateDir = \"{}\"\nbpfPinDir = \"{}\"\n",
            opts.node_name.as_deref().unwrap_or(ns.name()),
            opts.mtu,
            socket.display(),
            dir.join("state").display(),
            pin_dir.display()
        );
        if let Some(subnet) = &opts.pod_subnet {
            config.push_str(&format!("podSubnet = \"{subnet}\"\n"));
        }
        if let Some(cp) = &opts.control_plane {
            let endpoint = cp.link(&ns);
            config.push_str(&format!("etcdEndpoints = [\"{endpoint}\"]\n"));
        }
        config.push_str(&opts.extra_config);
        std::fs::write(&config_path, config).expect("agent config");
        let agent_binary = opts.agent_binary.clone().unwrap_or_else(|| bin("contiv-agent"));
        let mut node = Self {
            agent: None,
            agent_binary,
            ns,
            dir,
            socket,
            pin_dir,
            config_path,
            network_name: "contiv-test".into(),
            own_pid_namespace: opts.own_pid_namespace,
        };
        node.start_agent();
        node
    }

    /// Starts the agent and waits until STATUS says ready.
    pub fn start_agent(&mut self) {
        self.spawn_agent();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.cni("STATUS", "", "", "", "1.1.0");
            if out.exit_code == 0 {
                return;
            }
            if let Some(status) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}:\n{}", self.agent_log());
            }
            assert!(Instant::now() < deadline, "agent not ready in 30 s:\n{}", self.agent_log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the agent without waiting for it.
    pub fn spawn_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log")).expect("agent log");
        let mut cmd = if self.own_pid_namespace {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--mount-proc", "--propagation", "slave", "nsenter"]);
            c
        } else {
            Command::new("nsenter")
        };
        let child = cmd
            .arg(format!("--net={}", self.ns.path().display()))
            .arg(&self.agent_binary)
            .arg("--config")
            .arg(&self.config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting contiv-agent");
        self.agent = Some(child);
    }

    /// The container IDs the agent's durable state holds: the snapshot (state.json) with the
    /// journal of later changes (state.log) applied, as a restarted agent would read them.
    pub fn durable_attachments(&self) -> Vec<String> {
        let dir = self.dir.join("state");
        let snapshot: Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
        let mut held: std::collections::BTreeSet<String> = snapshot["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["containerId"].as_str().unwrap().to_owned())
            .collect();
        for line in std::fs::read_to_string(dir.join("state.log")).unwrap_or_default().lines() {
            let change: Value = serde_json::from_str(line).unwrap();
            match change["op"].as_str() {
                Some("put") => held.insert(change["attachment"]["containerId"].as_str().unwrap().to_owned()),
                Some("remove") => held.remove(change["key"]["containerId"].as_str().unwrap()),
                other => panic!("unknown journal record {other:?}: {line}"),
            };
        }
        held.into_iter().collect()
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn stop_agent(&mut self) -> std::process::ExitStatus {
        let agent = self.agent_pid();
        let mut child = self.agent.take().expect("agent not running");
        // SAFETY: plain kill(2) on our own child (or its forked child, the agent).
        unsafe { libc::kill(agent, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process: the child, or under `own_pid_namespace` the child unshare forked
    /// (nsenter execs the agent in it), which is what takes SIGTERM (unshare's parent only
    /// waits for it, and exits with it).
    fn agent_pid(&self) -> i32 {
        let child = self.agent.as_ref().expect("agent not running").id() as i32;
        if !self.own_pid_namespace {
            return child;
        }
        let children = format!("/proc/{child}/task/{child}/children");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                return pid;
            }
            if Instant::now() > deadline {
                return child;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The network config a runtime would pass for this node's network.
    pub fn net_conf(&self, cni_version: &str) -> String {
        serde_json::json!({
            "cniVersion": cni_version,
            "name": self.network_name,
            "type": "contiv-cni",
            "agentSocket": self.socket,
        })
        .to_string()
    }

    /// Runs contiv-cni with the given command and this node's config.
    pub fn cni(&self, command: &str, container_id: &str, netns: &str, ifname: &str, version: &str) -> CniOutput {
        self.cni_with_conf(command, container_id, netns, ifname, &self.net_conf(version))
    }

    pub fn cni_with_conf(&self, command: &str, container_id: &str, netns: &str, ifname: &str, conf: &str) -> CniOutput {
        let mut env = vec![("CNI_COMMAND", command), ("CNI_PATH", "/usr/lib/cni")];
        if !container_id.is_empty() {
            env.push(("CNI_CONTAINERID", container_id));
        }
        if !netns.is_empty() {
            env.push(("CNI_NETNS", netns));
        }
        if !ifname.is_empty() {
            env.push(("CNI_IFNAME", ifname));
        }
        invoke_plugin(&bin("contiv-cni"), &env, conf, None)
    }

    /// Creates a pod namespace and wires it through `contiv-cni ADD`.
    pub fn add_pod(&self) -> Pod {
        self.add_pod_with(serde_json::json!({}))
    }

    /// Like [`Node::add_pod`], with `extra` keys merged into the network config (e.g. the
    /// `runtimeConfig` a runtime adds for a capability).
    pub fn add_pod_with(&self, extra: Value) -> Pod {
        self.add_pod_in(Netns::new("ctp"), extra)
    }

    /// A pod whose stack has IPv6 off from the start, for tests that count the pod's
    /// slow-path packets exactly: a stack with IPv6 sends its own chatter (duplicate address
    /// detection, MLD reports) there whenever its timers say, up to seconds after ADD.
    pub fn add_pod_ipv4_only(&self) -> Pod {
        let ns = Netns::new("ctp");
        let ok = ns.cmd("sysctl").args(["-qw", "net.ipv6.conf.all.disable_ipv6=1"]).status();
        assert!(ok.is_ok_and(|s| s.success()), "IPv6 off in {}", ns.name());
        self.add_pod_in(ns, serde_json::json!({}))
    }

    fn add_pod_in(&self, ns: Netns, extra: Value) -> Pod {
        let container_id = unique("ctr");
        let mut conf: Value = serde_json::from_str(&self.net_conf("1.0.0")).expect("net conf");
        for (k, v) in extra.as_object().into_iter().flatten() {
            conf[k] = v.clone();
        }
        let out = self.cni_with_conf("ADD", &container_id, &ns.path().to_string_lossy(), "eth0", &conf.to_string());
        out.ok();
        let result = out.json();
        let ip = pod_ip(&result);
        Pod { ns, container_id, ifname: "eth0".into(), ip, result }
    }

    /// `contiv-cni DEL` for a pod.
    pub fn del_pod(&self, pod: &Pod) -> CniOutput {
        self.cni("DEL", &pod.container_id, &pod.ns.path().to_string_lossy(), &pod.ifname, "1.0.0")
    }

    /// `bpftool map dump pinned <pin_dir>/<map>` as JSON.
    pub fn dump_map(&self, map: &str) -> Vec<Value> {
        dump_pinned_map(&self.pin_dir.join(map))
    }

    /// A pod's counters from the pinned POD_COUNTERS map, summed over CPUs.
    pub fn pod_counters(&self, ip: Ipv4Addr) -> Option<serde_json::Map<String, Value>> {
        let want: Vec<Value> = ip.octets().iter().map(|b| Value::from(*b)).collect();
        let entry = self.dump_map("POD_COUNTERS").into_iter().find(|e| e["key"]["addr"].as_array() == Some(&want))?;
        Some(sum_per_cpu(&entry["values"]))
    }

    /// The slow-path port counters summed over CPUs.
    pub fn slowport_counters(&self) -> serde_json::Map<String, Value> {
        let entries = self.dump_map("SLOWPORT_COUNTERS");
        sum_per_cpu(&entries[0]["values"])
    }

    /// GET a path of the agent's status endpoint (from inside the node) and return the body.
    pub fn status(&self, path: &str) -> String {
        let path = path.to_owned();
        let (head, body) = self.ns.enter(move || {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect(("127.0.0.1", 9192)).expect("status endpoint");
            write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).expect("status response");
            let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
            (head.to_owned(), body.to_owned())
        });
        assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
        body
    }

    /// The vswitch's drop counter for a reason (from `/vswitch`).
    pub fn vswitch_drops(&self, reason: &str) -> u64 {
        let v: Value = serde_json::from_str(&self.status("/vswitch")).expect("vswitch JSON");
        v["vswitch"]["drops"][reason].as_u64().unwrap_or_else(|| panic!("no vswitch drop counter {reason} in {v}"))
    }

    /// Host-side veth names in the node (pod interfaces).
    pub fn pod_links(&self) -> Vec<String> {
        self.ns
            .ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .filter(|n| n.starts_with("cv"))
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.agent.is_some() {
            let agent = self.agent_pid();
            let mut child = self.agent.take().unwrap();
            // SAFETY: kill(2) on our own child (or its forked child, the agent).
            unsafe { libc::kill(agent, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if std::thread::panicking() {
            eprintln!("--- agent log ({}) ---\n{}", self.dir.display(), self.agent_log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sums `[{cpu, value:{...}}]` into one object of counters.
pub fn sum_per_cpu(values: &Value) -> serde_json::Map<String, Value> {
    let mut sum = serde_json::Map::new();
    for v in values.as_array().into_iter().flatten() {
        for (k, n) in v["value"].as_object().into_iter().flatten() {
            let add = n.as_u64().unwrap_or(0);
            let cur = sum.get(k).and_then(Value::as_u64).unwrap_or(0);
            sum.insert(k.clone(), Value::from(cur + add));
        }
    }
    sum
}

/// Reads a counter out of a summed map.
pub fn counter(c: &serde_json::Map<String, Value>, name: &str) -> u64 {
    c.get(name).and_then(Value::as_u64).unwrap_or_else(|| panic!("no counter {name} in {c:?}"))
}

/// The pod's address from an ADD result (`ips[0].address` without the prefix).
pub fn pod_ip(result: &Value) -> Ipv4Addr {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address in {result}"))
}

/// TCP throughput (bit/s received) of a `seconds`-long iperf3 run from `client` to an
/// iperf3 server started in `server` (which must have the address `server_ip`).
pub fn iperf3_bps(client: &Netns, server: &Netns, server_ip: Ipv4Addr, seconds: u32) -> f64 {
    let port = 5201 + (COUNTER.fetch_add(1, Ordering::Relaxed) % 500) as u16;
    let mut srv = server
        .cmd("iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let out = client
        .cmd("iperf3")
        .args(["-c", &server_ip.to_string(), "-p", &port.to_string(), "-t", &seconds.to_string(), "-J"])
        .output()
        .expect("iperf3 client");
    let _ = srv.kill();
    let _ = srv.wait();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 output is not JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no received throughput in iperf3 output: {v}"))
}

/// `ping -c N` from a namespace; true if all answered.
pub fn ping(ns: &Netns, dst: Ipv4Addr, count: u32) -> bool {
    ns.cmd("ping")
        .args(["-c", &count.to_string(), "-i", "0.2", "-W", "2", &dst.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Sends, from the calling thread's network namespace, an IPv4 packet as it is given (a
/// raw socket with the header included: whatever its source, no checksum, nothing
/// expected back): protocol `proto` from `src` to `dst`'s address, IP id `id`, the
/// flags-and-offset field `fragment`, then `payload`.
fn send_raw_ipv4(proto: u8, src: Ipv4Addr, dst: std::net::SocketAddrV4, id: u16, fragment: u16, payload: &[u8]) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(i32::from(proto).into()))
        .expect("raw socket");
    s.set_header_included_v4(true).expect("IP_HDRINCL");
    let mut pkt = vec![0u8; 20];
    pkt[0] = 0x45;
    pkt[2..4].copy_from_slice(&(20 + payload.len() as u16).to_be_bytes());
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&fragment.to_be_bytes());
    pkt[8] = 64;
    pkt[9] = proto;
    pkt[12..16].copy_from_slice(&src.octets());
    pkt[16..20].copy_from_slice(&dst.ip().octets());
    pkt.extend_from_slice(payload);
    s.send_to(&pkt, &std::net::SocketAddr::V4(dst).into()).expect("send the packet");
}

/// Sends, from the calling thread's network namespace, one unfragmented IPv4 packet of
/// protocol `proto` from `src` to `dst` carrying `payload` (a tunnel packet, say).
pub fn send_ip_packet(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) {
    send_raw_ipv4(proto, src, std::net::SocketAddrV4::new(dst, 0), 0x4343, 0, payload);
}

/// Sends, from the calling thread's network namespace, a lone later fragment (offset 1480,
/// the last) of a UDP datagram `src` -> `dst`, with no first fragment before it. Its first
/// bytes, were they read as a header, would name `dst`'s port as both ports.
pub fn send_lone_later_fragment(src: Ipv4Addr, dst: std::net::SocketAddrV4) {
    let mut payload = vec![0u8; 64];
    payload[0..2].copy_from_slice(&dst.port().to_be_bytes());
    payload[2..4].copy_from_slice(&dst.port().to_be_bytes());
    // Offset 1480 bytes (185 units of 8), more fragments: no.
    send_raw_ipv4(17, src, dst, 0x4242, 185, &payload);
}

/// Sends a TCP SYN to `dst` claiming to come from `src` (port 40000), whatever the
/// sender's own addresses.
pub fn send_spoofed_syn(src: Ipv4Addr, dst: std::net::SocketAddrV4) {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    send_raw_ipv4(6, src, dst, 0, 0, &tcp);
}

/// Sends, from `src` (inside its pod's namespace) to `dst`, the two fragments RFC 1858
/// describes for hiding a TCP header from a filter: a first fragment of 8 bytes (ports and
/// sequence number, no flags) and a fragment at offset 8 carrying the rest of the header
/// (a SYN). No stack sends either.
pub fn send_header_hiding_fragments(src: Ipv4Addr, dst: std::net::SocketAddrV4) {
    // Offset 0, more fragments: the ports and the sequence number alone.
    let mut first = Vec::with_capacity(8);
    first.extend_from_slice(&40000u16.to_be_bytes());
    first.extend_from_slice(&dst.port().to_be_bytes());
    first.extend_from_slice(&1u32.to_be_bytes());
    send_raw_ipv4(6, src, dst, 0x4343, 0x2000, &first);
    // Offset 1 unit (8 bytes), the last: acknowledgement, offset and flags (SYN), window,
    // checksum, urgent pointer.
    send_raw_ipv4(6, src, dst, 0x4343, 1, &[0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
}

/// A descriptor of the BPF object pinned at `pin` (`BPF_OBJ_GET`): a link held by it stays
/// attached after its pin and every other holder let go.
pub fn open_pinned(pin: &Path) -> std::os::fd::OwnedFd {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    // The `obj_get` member of `union bpf_attr`: pathname, bpf_fd, file_flags, path_fd, and
    // the padding the kernel wants zero.
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).unwrap();
    let attr: [u32; 6] = {
        let p = path.as_ptr() as u64;
        [p as u32, (p >> 32) as u32, 0, 0, 0, 0]
    };
    // SAFETY: the attribute and the path it points to are valid for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7 as libc::c_long, attr.as_ptr(), 24u32) };
    assert!(fd >= 0, "BPF_OBJ_GET {}: {}", pin.display(), std::io::Error::last_os_error());
    // SAFETY: a descriptor the kernel just opened for us.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// `bpftool map dump pinned <pin>` as JSON, each entry its typed view (with BTF, bpftool's
/// JSON carries it under "formatted").
pub fn dump_pinned_map(pin: &Path) -> Vec<Value> {
    let out = run(Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(pin));
    serde_json::from_str::<Value>(&out)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.get("formatted").cloned().unwrap_or(e))
        .collect()
}
