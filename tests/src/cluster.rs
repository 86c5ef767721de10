//! A cluster in a box: several nodes on one machine, each a network namespace with its own
//! `contiv-agent`, joined by an underlay, with a real etcd and an "outside world".
//!
//! ```text
//!            fabric namespace: bridge br0 (the underlay, 192.168.100.0/24)
//!     ┌──────────┬──────────┬─────────────┬───────────────────────────┐
//!   node-1     node-2     ...          control                     external
//!   eth0 .11   eth0 .12                eth0 .2 (etcd :2379)        eth0 .1 (the nodes' default
//!   agent      agent                                               router) + 203.0.113.10 on lo
//!   pods...    pods...                                             (an address outside every
//!                                                                  cluster range: "the internet")
//! ```
//!
//! Pods are namespaces wired the way a runtime under kubelet wires them: the Pod object is
//! applied with `netctl apply` first (spec.nodeName, labels, ports), then `contiv-cni ADD`
//! runs with `K8S_POD_NAMESPACE`/`K8S_POD_NAME` in `CNI_ARGS`, then the Pod's status gets
//! its IP (as kubelet reports it). Everything a box holds is recorded in one state
//! directory, so separate invocations (`cargo xtask cluster ...`) work on the same box, and
//! every namespace, pin directory and process carries the box id, so `down` removes it all,
//! also after a crash. Agents run under `nsenter --net` (the host's mount namespace, so
//! their pins live in the host's bpffs, as a hostNetwork DaemonSet's do).
//!
//! **VPP mode** (`BoxOptions::fake_vpp`): no VPP can run here, so every node gets its own
//! FAKE VPP (`contiv-fake-vpp --af-xdp --host-taps`, in the node's namespace, socket in the node's
//! directory) and its agent runs with `uplink = "vpp"`, the uplink's address given as
//! `[vpp] uplinkAddress` (the node's own eth0 address; no contiv-stn takes the NIC). The
//! fake keeps what the agent programs and answers ARP/ping for its af_xdp interface's
//! address over a real AF_XDP socket, and gives its taps their Linux end in the node's
//! namespace (address, MAC; not the default route); it forwards nothing between nodes.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{CniOutput, invoke_plugin, run};

/// The underlay subnet and its fixed members.
pub const UNDERLAY_PREFIX: u8 = 24;
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
/// "The internet": an address outside every cluster range, on the external namespace.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A client past the external router ([`ClusterBox::add_beyond`]), and the router's side of
/// their link.
pub const BEYOND_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const BEYOND_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The cluster's pod range (node N gets 10.1.N.0/24).
pub const CLUSTER_POD_CIDR: &str = "10.1.0.0/16";
/// The CNI network name pods are attached to.
pub const NETWORK: &str = "contiv";

/// Node `i`'s (1-based) underlay address.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, 10 + i as u8)
}

/// Where the CLI keeps its box (one per machine unless `--dir` says otherwise).
pub const DEFAULT_DIR: &str = "/run/contiv-box/default";
/// The CLI box's id (prefix of its namespaces and pin directory).
pub const DEFAULT_ID: &str = "cbox";

/// How to build a box.
#[derive(Debug, Clone)]
pub struct BoxOptions {
    pub nodes: usize,
    /// Prefix of every namespace (short; unique per box).
    pub id: String,
    /// The state directory.
    pub dir: PathBuf,
    /// Keep everything when the handle is dropped (the CLI); tests tear down on drop.
    pub persist: bool,
    /// Extra agent config lines for every node.
    pub agent_config: String,
    /// VPP mode: each node gets a fake VPP started with these extra arguments (e.g.
    /// `--crc-override NAME=CRC`); None: kernel uplink mode.
    pub fake_vpp: Option<Vec<String>>,
    /// Say on stderr what is being built and how long each part took (the CLI, benchmarks).
    pub progress: bool,
}

impl BoxOptions {
    /// A throwaway box for a test: unique id, temporary directory, torn down on drop.
    pub fn for_test(nodes: usize) -> Self {
        let id = crate::unique("cb");
        let dir = std::env::temp_dir().join(format!("contiv-{id}"));
        Self { nodes, id, dir, persist: false, agent_config: String::new(), fake_vpp: None, progress: false }
    }

    /// A throwaway box in VPP mode: every node with its own fake VPP.
    pub fn for_test_vpp(nodes: usize) -> Self {
        Self { fake_vpp: Some(Vec::new()), ..Self::for_test(nodes) }
    }
}

/// A node of the box.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoxNode {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub config: PathBuf,
    pub agent_pid: Option<u32>,
    /// VPP mode: the fake VPP's API socket.
    #[serde(default)]
    pub vpp_socket: Option<PathBuf>,
    /// VPP mode: the fake VPP's pid while it runs.
    #[serde(default)]
    pub vpp_pid: Option<u32>,
}

/// A pod of the box.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoxPod {
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    /// hostPorts its Pod object declares, also mapped by the `portmap` plugin after
    /// `contiv-cni` (see [`ClusterBox::add_pod_with_host_ports`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<HostPort>,
}

/// A pod's hostPort, as a runtime hands it to the plugins of its network config list that
/// declare the `portMappings` capability (`runtimeConfig.portMappings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPort {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

impl HostPort {
    pub fn new(host_port: u16, container_port: u16, protocol: &str) -> Self {
        Self { host_port, container_port, protocol: protocol.into() }
    }
}

/// Debian's `portmap` plugin (package containernetworking-plugins), which deploy/'s network
/// config list chains after contiv-cni.
pub const PORTMAP_PLUGIN: &str = "/usr/lib/cni/portmap";

impl BoxPod {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Everything a box holds; saved as `box.json` in its directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoxState {
    pub id: String,
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    pub fabric: String,
    pub control: String,
    pub external: String,
    pub etcd_pid: Option<u32>,
    pub nodes: Vec<BoxNode>,
    pub pods: Vec<BoxPod>,
    pub agent_config: String,
    /// VPP mode: the fake VPPs' extra arguments.
    #[serde(default)]
    pub fake_vpp: Option<Vec<String>>,
}

/// A running box.
pub struct ClusterBox {
    pub state: BoxState,
    persist: bool,
}

/// A port a pod's container declares (for named target ports and policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

impl std::str::FromStr for ContainerPort {
    type Err = String;
    /// `name=8080` or `name=53/UDP`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s.split_once('=').ok_or_else(|| format!("port {s:?}: expected name=PORT[/PROTO]"))?;
        let (port, protocol) = rest.split_once('/').unwrap_or((rest, "TCP"));
        let port = port.parse().map_err(|_| format!("port {s:?}: {port:?} is not a port number"))?;
        Ok(Self { name: name.into(), port, protocol: protocol.to_ascii_uppercase() })
    }
}

fn ip_netns(args: &[&str]) -> String {
    run(Command::new("ip").arg("netns").args(args))
}

/// `ip -n NS ARGS`.
pub fn ip_in(ns: &str, args: &[&str]) -> String {
    run(Command::new("ip").args(["-n", ns]).args(args))
}

/// A command run inside a namespace (`ip netns exec`).
pub fn cmd_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// Runs `f` on a thread inside the namespace (sockets made there stay there).
pub fn enter<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(Path::new("/run/netns").join(ns)).expect("open netns");
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only; the fd is valid.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// Sends `frame` out of `ifname` in namespace `ns` as it is (AF_PACKET: no stack).
pub fn send_frame(ns: &str, ifname: &str, frame: Vec<u8>) {
    let ifname = std::ffi::CString::new(ifname).unwrap();
    let sent = enter(ns, move || {
        // SAFETY: plain socket calls on a descriptor this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            (n, frame.len(), err)
        }
    });
    assert_eq!(sent.0, sent.1 as isize, "sending a frame in {ns}: {}", sent.2);
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Stops a process we started (by pid): SIGTERM, then SIGKILL after `grace`.
fn stop_pid(pid: u32, grace: Duration) {
    // SAFETY: plain kill(2) on a pid this box recorded for its own process.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        reap(pid);
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(50));
    }
    reap(pid);
}

/// Collects a child's exit status if it is ours (no zombie left behind).
fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: non-blocking waitpid on a pid; fails harmlessly if it is not our child.
    unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
}

/// Spawns a process detached from the caller (own session), output to `log`.
fn spawn_detached(mut cmd: Command, log: &Path) -> u32 {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
    // SAFETY: setsid is async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")).id()
}

impl ClusterBox {
    /// Builds a box: fabric, control plane with etcd, external world, nodes with agents;
    /// returns once every agent serves the CNI and sees every other node.
    pub fn up(opts: BoxOptions) -> Self {
        assert!((1..=50).contains(&opts.nodes), "1 to 50 nodes");
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "a cluster in a box needs root (network namespaces, BPF)");
        std::fs::create_dir_all(&opts.dir).expect("box directory");
        let id = opts.id.clone();
        let state = BoxState {
            id: id.clone(),
            dir: opts.dir.clone(),
            bin_dir: crate::bin_dir(),
            fabric: format!("{id}-fabric"),
            control: format!("{id}-control"),
            external: format!("{id}-external"),
            etcd_pid: None,
            nodes: vec![],
            pods: vec![],
            agent_config: opts.agent_config.clone(),
            fake_vpp: opts.fake_vpp.clone(),
        };
        let mut b = Self { state, persist: opts.persist };
        b.save();
        // From here on a failure (panic) tears down what was built unless the box persists.
        let fabric = b.state.fabric.clone();
        ip_netns(&["add", &fabric]);
        ip_in(&fabric, &["link", "set", "lo", "up"]);
        ip_in(&fabric, &["link", "add", "br0", "type", "bridge"]);
        ip_in(&fabric, &["link", "set", "br0", "up"]);
        let _ = run(cmd_in(&fabric, "sysctl").args(["-qw", "net.ipv6.conf.all.disable_ipv6=1"]));

        let control = b.state.control.clone();
        b.attach_host(&control, "ctl", CONTROL_IP, None);
        let external = b.state.external.clone();
        b.attach_host(&external, "ext", ROUTER_IP, None);
        ip_in(&external, &["addr", "add", &format!("{EXTERNAL_IP}/32"), "dev", "lo"]);
        let started = std::time::Instant::now();
        let say = |what: &str| {
            if opts.progress {
                eprintln!("    box: {what} ({:.1} s)", started.elapsed().as_secs_f64());
            }
        };
        b.start_etcd();
        say("fabric, external world and etcd up");
        for i in 1..=opts.nodes {
            b.add_node(i);
            say(&format!("node-{i} of {}: agent ready", opts.nodes));
        }
        b.save();
        b.wait_converged(Duration::from_secs(60));
        say("every node routes to every other");
        b
    }

    /// The box recorded in `dir` (for separate CLI invocations).
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(dir.join("box.json"))?;
        let state: BoxState = serde_json::from_str(&text).map_err(std::io::Error::other)?;
        Ok(Self { state, persist: true })
    }

    fn save(&self) {
        let tmp = self.state.dir.join("box.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state).expect("state JSON")).expect("box state");
        std::fs::rename(&tmp, self.state.dir.join("box.json")).expect("box state");
    }

    /// Puts a namespace on the fabric: `eth0` with `ip`/24, default route via `gateway`.
    fn attach_host(&self, ns: &str, port: &str, ip: Ipv4Addr, gateway: Option<Ipv4Addr>) {
        let fabric = &self.state.fabric;
        if !ip_netns(&["list"]).lines().any(|l| l.split_whitespace().next() == Some(ns)) {
            ip_netns(&["add", ns]);
        }
        ip_in(ns, &["link", "set", "lo", "up"]);
        let _ = Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
            .status();
        ip_in(fabric, &["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns]);
        ip_in(fabric, &["link", "set", port, "master", "br0", "up"]);
        ip_in(ns, &["addr", "add", &format!("{ip}/{UNDERLAY_PREFIX}"), "dev", "eth0"]);
        ip_in(ns, &["link", "set", "eth0", "up"]);
        if let Some(gw) = gateway {
            ip_in(ns, &["route", "add", "default", "via", &gw.to_string()]);
        }
    }

    fn start_etcd(&mut self) {
        let data = self.state.dir.join("etcd");
        std::fs::create_dir_all(&data).expect("etcd dir");
        let mut cmd = cmd_in(&self.state.control, "etcd");
        cmd.arg("--data-dir").arg(data.join("data")).args([
            "--name",
            "control",
            "--listen-client-urls",
            "http://0.0.0.0:2379",
            "--advertise-client-urls",
            &format!("http://{CONTROL_IP}:2379"),
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "control=http://127.0.0.1:2380",
        ]);
        self.state.etcd_pid = Some(spawn_detached(cmd, &data.join("etcd.log")));
        self.save();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = cmd_in(&self.state.control, "etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", "http://127.0.0.1:2379", "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy (log in {})", data.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn add_node(&mut self, i: usize) {
        let name = format!("node-{i}");
        let netns = format!("{}-{name}", self.state.id);
        let ip = node_ip(i);
        self.attach_host(&netns, &format!("n{i}"), ip, Some(ROUTER_IP));
        let dir = self.state.dir.join(&name);
        std::fs::create_dir_all(&dir).expect("node dir");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&self.state.id).join(&name);
        let socket = dir.join("cni.sock");
        let config = dir.join("agent.toml");
        let vpp_socket = self.state.fake_vpp.is_some().then(|| dir.join("vpp").join("api.sock"));
        let mut text = format!(
            "nodeName = \"{name}\"\ncniSocket = \"{}\"\nstateDir = \"{}\"\nbpfPinDir = \"{}\"\n\
             etcdEndpoints = [\"http://{CONTROL_IP}:2379\"]\npodSubnetCIDR = \"{CLUSTER_POD_CIDR}\"\n",
            socket.display(),
            dir.join("state").display(),
            pin_dir.display(),
        );
        if vpp_socket.is_some() {
            text.push_str("uplink = \"vpp\"\n");
        }
        text.push_str(&self.state.agent_config);
        if let Some(vpp_socket) = &vpp_socket {
            // VPP holds the node's uplink address (here: given, as on a node whose VPP NIC the
            // host never configured) and reaches the underlay's router through it.
            text.push_str(&format!(
                "\n[vpp]\napiSocket = \"{}\"\nuplinkName = \"uplink0\"\nuplinkAddress = \"{ip}/{UNDERLAY_PREFIX}\"\n\
                 uplinkGateway = \"{ROUTER_IP}\"\nuplinkMtu = 1500\n",
                vpp_socket.display()
            ));
        }
        std::fs::write(&config, text).expect("agent config");
        self.state.nodes.push(BoxNode {
            name: name.clone(),
            netns,
            ip,
            dir,
            socket,
            pin_dir,
            config,
            agent_pid: None,
            vpp_socket,
            vpp_pid: None,
        });
        if self.state.fake_vpp.is_some() {
            self.start_vpp(&name);
        }
        self.start_agent(&name);
    }

    pub fn node(&self, name: &str) -> &BoxNode {
        self.state.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name} in the box"))
    }

    fn node_mut(&mut self, name: &str) -> &mut BoxNode {
        self.state.nodes.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name} in the box"))
    }

    /// Starts a node's agent and waits until it serves the CNI and its status endpoint.
    pub fn start_agent(&mut self, node: &str) {
        let n = self.node(node).clone();
        assert!(n.agent_pid.is_none_or(|p| !alive(p)), "agent of {node} already running");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", n.netns))
            .arg(self.state.bin_dir.join("contiv-agent"))
            .arg("--config")
            .arg(&n.config);
        let pid = spawn_detached(cmd, &n.dir.join("agent.log"));
        self.node_mut(node).agent_pid = Some(pid);
        self.save();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Its status endpoint too: bound a moment after the CNI answers.
            if self.cni(node, "STATUS", "", "", "", "").exit_code == 0 && self.status(node, "/healthz").is_some() {
                return;
            }
            reap(pid);
            assert!(alive(pid), "agent of {node} exited:\n{}", self.agent_log(node));
            assert!(Instant::now() < deadline, "agent of {node} not ready in 60 s:\n{}", self.agent_log(node));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops a node's agent: SIGTERM (graceful: its registration is withdrawn), or
    /// SIGKILL (`kill`, a crash: the registration expires with its lease).
    pub fn stop_agent(&mut self, node: &str, kill: bool) {
        let Some(pid) = self.node(node).agent_pid else { return };
        if kill {
            // SAFETY: the pid of the agent this box started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(50));
            reap(pid);
        } else {
            stop_pid(pid, Duration::from_secs(20));
        }
        self.node_mut(node).agent_pid = None;
        self.save();
    }

    /// VPP mode: starts a node's fake VPP (in the node's namespace) and waits until its API
    /// socket accepts connections. It starts with no state, as a restarted VPP does.
    pub fn start_vpp(&mut self, node: &str) {
        let n = self.node(node).clone();
        let (Some(args), Some(socket)) = (self.state.fake_vpp.clone(), n.vpp_socket.clone()) else {
            panic!("{node} has no fake VPP (not a VPP-mode box)")
        };
        assert!(n.vpp_pid.is_none_or(|p| !alive(p)), "fake VPP of {node} already running");
        std::fs::create_dir_all(socket.parent().expect("socket dir")).expect("VPP socket dir");
        let index: u8 = node.trim_start_matches("node-").parse().unwrap_or(0);
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", n.netns))
            .arg(self.state.bin_dir.join("contiv-fake-vpp"))
            .arg("--socket")
            .arg(&socket)
            .args(["--nic", &format!("uplink0=52:54:00:00:01:{index:02x}"), "--af-xdp", "--host-taps"])
            .args(&args);
        let pid = spawn_detached(cmd, &n.dir.join("vpp.log"));
        self.node_mut(node).vpp_pid = Some(pid);
        self.save();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            reap(pid);
            assert!(alive(pid), "fake VPP of {node} exited:\n{}", self.vpp_log(node));
            assert!(Instant::now() < deadline, "fake VPP of {node} not listening in 20 s:\n{}", self.vpp_log(node));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// VPP mode: stops a node's fake VPP (`kill`: SIGKILL, a crash). What it held is gone.
    pub fn stop_vpp(&mut self, node: &str, kill: bool) {
        let Some(pid) = self.node(node).vpp_pid else { return };
        if kill {
            // SAFETY: the pid of the fake VPP this box started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < deadline {
                reap(pid);
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            stop_pid(pid, Duration::from_secs(5));
        }
        self.node_mut(node).vpp_pid = None;
        self.save();
    }

    /// VPP mode: the fake VPP's API socket of a node.
    pub fn vpp_socket(&self, node: &str) -> PathBuf {
        self.node(node).vpp_socket.clone().unwrap_or_else(|| panic!("{node} has no fake VPP"))
    }

    pub fn vpp_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.node(node).dir.join("vpp.log")).unwrap_or_default()
    }

    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.node(node).dir.join("agent.log")).unwrap_or_default()
    }

    /// Waits until every running agent routes to every other node (or panics): a pod
    /// subnet and a node address per other node in the kernel's overlay routes, or, in VPP
    /// mode, a tunnel per other node in what the agent has VPP hold.
    pub fn wait_converged(&self, timeout: Duration) {
        let running: Vec<&BoxNode> = self.state.nodes.iter().filter(|n| n.agent_pid.is_some()).collect();
        let others = running.len().saturating_sub(1);
        self.wait_for(timeout, "every node routes to every other", || {
            running.iter().all(|n| {
                let Some(v) = self.status_json(&n.name, "/node") else { return false };
                match v["vpp"]["remoteNodes"].as_object() {
                    Some(tunnels) => tunnels.len() == others,
                    None => v["remoteRoutes"].as_object().is_some_and(|m| m.len() == 2 * others),
                }
            })
        });
    }

    /// Polls `cond` until it holds; panics with `what` and the agents' logs otherwise.
    pub fn wait_for(&self, timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .state
                    .nodes
                    .iter()
                    .map(|n| format!("--- {} ---\n{}", n.name, tail(&self.agent_log(&n.name), 40)))
                    .collect();
                panic!("timed out waiting until {what}\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET a path of a node's status endpoint; `None` if it does not answer 200.
    pub fn status(&self, node: &str, path: &str) -> Option<String> {
        let path = path.to_owned();
        enter(&self.node(node).netns, move || {
            let mut s =
                std::net::TcpStream::connect_timeout(&"127.0.0.1:9192".parse().unwrap(), Duration::from_secs(2))
                    .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
            let mut resp = String::new();
            s.read_to_string(&mut resp).ok()?;
            let (head, body) = resp.split_once("\r\n\r\n")?;
            head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
        })
    }

    /// Runs `etcdctl ARGS` against the box's etcd; fails the test when it fails.
    pub fn etcdctl(&self, args: &[&str]) {
        let out = cmd_in(&self.state.control, "etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", "http://127.0.0.1:2379"])
            .args(args)
            .output()
            .expect("etcdctl");
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn status_json(&self, node: &str, path: &str) -> Option<Value> {
        self.status(node, path).and_then(|b| serde_json::from_str(&b).ok())
    }

    /// Runs contiv-cni against a node's agent.
    pub fn cni(
        &self,
        node: &str,
        command: &str,
        container_id: &str,
        netns: &str,
        args: &str,
        extra: &str,
    ) -> CniOutput {
        let n = self.node(node);
        let mut conf = serde_json::json!({"cniVersion": "1.1.0", "name": NETWORK, "type": "contiv-cni",
            "agentSocket": n.socket});
        if !extra.is_empty() {
            let extra: Value = serde_json::from_str(extra).expect("extra network config JSON");
            for (k, v) in extra.as_object().into_iter().flatten() {
                conf[k] = v.clone();
            }
        }
        let mut env = vec![("CNI_COMMAND", command), ("CNI_PATH", "/usr/lib/cni")];
        if !container_id.is_empty() {
            env.push(("CNI_CONTAINERID", container_id));
            env.push(("CNI_IFNAME", "eth0"));
        }
        if !netns.is_empty() {
            env.push(("CNI_NETNS", netns));
        }
        if !args.is_empty() {
            env.push(("CNI_ARGS", args));
        }
        invoke_plugin(&self.state.bin_dir.join("contiv-cni"), &env, &conf.to_string(), None)
    }

    /// `netctl ARGS` against the box's etcd (run inside the control namespace).
    pub fn netctl(&self, args: &[&str]) -> std::process::Output {
        self.netctl_cmd(args).output().expect("running netctl")
    }

    /// The `netctl ARGS` command against the box's etcd.
    pub fn netctl_cmd(&self, args: &[&str]) -> Command {
        let mut c = cmd_in(&self.state.control, self.state.bin_dir.join("netctl"));
        c.args(["--etcd", "http://127.0.0.1:2379"]).args(args);
        c
    }

    /// `netctl apply` of a YAML text; panics with netctl's errors if it refuses.
    pub fn apply_yaml(&self, yaml: &str) {
        let file = self.state.dir.join(format!("apply-{}.yaml", crate::unique("m")));
        std::fs::write(&file, yaml).expect("manifest");
        let out = self.netctl(&["apply", "-f", &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        assert!(out.status.success(), "netctl apply failed: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
    }

    /// `netctl delete` of a YAML text.
    pub fn delete_yaml(&self, yaml: &str) {
        let file = self.state.dir.join(format!("delete-{}.yaml", crate::unique("m")));
        std::fs::write(&file, yaml).expect("manifest");
        let out = self.netctl(&["delete", "-f", &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        assert!(out.status.success(), "netctl delete failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Creates a pod the way kubelet and a runtime do: the Pod object (and its Namespace)
    /// into the store, a sandbox namespace, `contiv-cni ADD` with the pod's identity in
    /// `CNI_ARGS`, then the Pod's status with its IP.
    pub fn add_pod(&mut self, node: &str, id: &str, labels: &[(&str, &str)], ports: &[ContainerPort]) -> BoxPod {
        self.add_pod_with(node, id, labels, ports, "")
    }

    /// Like [`ClusterBox::add_pod`] with extra network config keys (e.g. `runtimeConfig`).
    pub fn add_pod_with(
        &mut self,
        node: &str,
        id: &str,
        labels: &[(&str, &str)],
        ports: &[ContainerPort],
        extra_conf: &str,
    ) -> BoxPod {
        self.add_pod_chained(node, id, labels, ports, extra_conf, &[])
    }

    /// Like [`ClusterBox::add_pod`] for a pod whose Pod object declares `hostPort`s, run the
    /// way a runtime runs deploy/'s network config list: `contiv-cni ADD`, then the
    /// `portmap` plugin's ADD in the node's namespace with contiv-cni's result as
    /// `prevResult` and the pod's hostPorts as `runtimeConfig.portMappings` (portmap DNATs
    /// them with iptables rules on the node; the agent serves them in its datapath unless
    /// services are off).
    pub fn add_pod_with_host_ports(
        &mut self,
        node: &str,
        id: &str,
        labels: &[(&str, &str)],
        host_ports: &[HostPort],
    ) -> BoxPod {
        self.add_pod_chained(node, id, labels, &[], "", host_ports)
    }

    /// The `portmap` plugin for `pod` (ADD with contiv-cni's `result`, or DEL).
    fn portmap(&self, command: &str, pod: &BoxPod, result: Option<&Value>) -> CniOutput {
        let mut conf = serde_json::json!({"cniVersion": "1.0.0", "name": NETWORK, "type": "portmap",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": pod.host_ports}});
        if let Some(result) = result {
            // The result in the list's version: portmap 1.1 takes 0.4.0 and 1.0.0.
            let mut prev = result.clone();
            prev["cniVersion"] = "1.0.0".into();
            conf["prevResult"] = prev;
        }
        let netns = format!("/run/netns/{}", pod.netns);
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", pod.container_id.as_str()),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        invoke_plugin(Path::new(PORTMAP_PLUGIN), &env, &conf.to_string(), Some(&self.node(&pod.node).netns))
    }

    fn add_pod_chained(
        &mut self,
        node: &str,
        id: &str,
        labels: &[(&str, &str)],
        ports: &[ContainerPort],
        extra_conf: &str,
        host_ports: &[HostPort],
    ) -> BoxPod {
        let (namespace, name) = id.split_once('/').unwrap_or(("default", id));
        assert!(self.pod_opt(id).is_none(), "pod {id} exists already");
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.apply_yaml(&pod_yaml_with_host_ports(namespace, name, node, &labels, ports, host_ports, None));
        let netns = format!("{}-pod-{namespace}-{name}", self.state.id);
        ip_netns(&["add", &netns]);
        ip_in(&netns, &["link", "set", "lo", "up"]);
        let container_id = format!("{}-{namespace}-{name}", self.state.id);
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id}"
        );
        let out = self.cni(node, "ADD", &container_id, &format!("/run/netns/{netns}"), &args, extra_conf);
        if out.exit_code != 0 {
            let _ = Command::new("ip").args(["netns", "del", &netns]).status();
            panic!("contiv-cni ADD of {id} on {node} failed: {} {}\n{}", out.stdout, out.stderr, self.agent_log(node));
        }
        let result = out.json();
        let ip = crate::pod_ip(&result);
        let pod = BoxPod {
            node: node.into(),
            namespace: namespace.into(),
            name: name.into(),
            netns,
            container_id,
            ip,
            labels,
            host_ports: host_ports.to_vec(),
        };
        if !host_ports.is_empty() {
            let out = self.portmap("ADD", &pod, Some(&result));
            assert_eq!(out.exit_code, 0, "portmap ADD of {id}: {} {}", out.stdout, out.stderr);
        }
        self.apply_yaml(&pod_yaml_with_host_ports(namespace, name, node, &pod.labels, ports, host_ports, Some(ip)));
        self.state.pods.push(pod.clone());
        self.save();
        pod
    }

    pub fn pod_opt(&self, id: &str) -> Option<&BoxPod> {
        let (ns, name) = id.split_once('/').unwrap_or(("default", id));
        self.state.pods.iter().find(|p| p.namespace == ns && p.name == name)
    }

    pub fn pod(&self, id: &str) -> &BoxPod {
        self.pod_opt(id).unwrap_or_else(|| panic!("no pod {id} in the box"))
    }

    /// `portmap DEL` for a pod with hostPorts, `contiv-cni DEL`, the sandbox namespace
    /// removed, the Pod object deleted.
    pub fn del_pod(&mut self, id: &str) {
        let pod = self.pod(id).clone();
        if !pod.host_ports.is_empty() {
            // A list's DEL runs its plugins in reverse order.
            let out = self.portmap("DEL", &pod, None);
            assert_eq!(out.exit_code, 0, "portmap DEL of {id}: {} {}", out.stdout, out.stderr);
        }
        let out = self.cni(&pod.node, "DEL", &pod.container_id, &format!("/run/netns/{}", pod.netns), "", "");
        assert_eq!(out.exit_code, 0, "DEL of {id}: {} {}", out.stdout, out.stderr);
        let _ = Command::new("ip").args(["netns", "del", &pod.netns]).status();
        // The Pod only: its Namespace stays, like the API server's.
        let doc = pod_yaml(&pod.namespace, &pod.name, &pod.node, &pod.labels, &[], None);
        self.delete_yaml(doc.split("---\n").nth(1).expect("the Pod document"));
        self.state.pods.retain(|p| !(p.namespace == pod.namespace && p.name == pod.name));
        self.save();
    }

    /// A client past the external router, on a link narrower than the underlay on the
    /// router's side: the namespace `<id>-beyond` (removed with the box), with [`BEYOND_IP`],
    /// its default route via the router, which forwards. The router's end of the link has
    /// MTU `router_mtu` and the client's 1500, so the client's connections announce
    /// full-size segments that the router cannot pass on: it answers them with
    /// "fragmentation needed" from its own address, as a router on the way does.
    pub fn add_beyond(&self, router_mtu: u32) -> String {
        let ns = format!("{}-beyond", self.state.id);
        let external = &self.state.external;
        ip_netns(&["add", &ns]);
        ip_in(&ns, &["link", "set", "lo", "up"]);
        let _ = run(cmd_in(&ns, "sysctl").args(["-qw", "net.ipv6.conf.all.disable_ipv6=1"]));
        ip_in(external, &["link", "add", "beyond", "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        ip_in(external, &["link", "set", "beyond", "mtu", &router_mtu.to_string(), "up"]);
        ip_in(external, &["addr", "add", &format!("{BEYOND_ROUTER_IP}/24"), "dev", "beyond"]);
        ip_in(&ns, &["addr", "add", &format!("{BEYOND_IP}/24"), "dev", "eth0"]);
        ip_in(&ns, &["link", "set", "eth0", "up"]);
        ip_in(&ns, &["route", "add", "default", "via", &BEYOND_ROUTER_IP.to_string()]);
        run(cmd_in(external, "sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        ns
    }

    /// The namespace of a node name, pod id (`ns/name`), `external` or `control`.
    pub fn netns_of(&self, target: &str) -> Option<String> {
        match target {
            "external" => Some(self.state.external.clone()),
            "control" => Some(self.state.control.clone()),
            "fabric" => Some(self.state.fabric.clone()),
            _ => self
                .state
                .nodes
                .iter()
                .find(|n| n.name == target)
                .map(|n| n.netns.clone())
                .or_else(|| self.pod_opt(target).map(|p| p.netns.clone())),
        }
    }

    /// A command run in a node, pod, `external` or `control`.
    pub fn cmd(&self, target: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        cmd_in(&self.netns_of(target).unwrap_or_else(|| panic!("no {target} in the box")), program)
    }

    /// Removes everything: agents and etcd (by their recorded pids), namespaces, pins,
    /// the state directory. Idempotent.
    pub fn down(&mut self) {
        for n in &self.state.nodes {
            if let Some(pid) = n.agent_pid {
                stop_pid(pid, Duration::from_secs(10));
            }
            if let Some(pid) = n.vpp_pid {
                stop_pid(pid, Duration::from_secs(5));
            }
        }
        if let Some(pid) = self.state.etcd_pid {
            stop_pid(pid, Duration::from_secs(5));
        }
        remove_by_id(&self.state.id);
        let _ = std::fs::remove_dir_all(&self.state.dir);
    }
}

/// Removes the namespaces and pins of box `id` whatever state is left (after a crash).
pub fn remove_by_id(id: &str) {
    let prefix = format!("{id}-");
    let listed = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    // Pods first, nodes next, the fabric last (veths go with their namespaces).
    let mut names: Vec<String> = String::from_utf8_lossy(&listed)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    names.sort_by_key(|n| (!n.contains("-pod-"), n.ends_with("-fabric")));
    for n in names {
        let _ = Command::new("ip").args(["netns", "del", &n]).stderr(Stdio::null()).status();
    }
    let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(id));
}

impl Drop for ClusterBox {
    fn drop(&mut self) {
        if self.persist {
            return;
        }
        if std::thread::panicking() {
            for n in &self.state.nodes {
                eprintln!("--- agent log of {} ---\n{}", n.name, tail(&self.agent_log(&n.name), 60));
                if n.vpp_socket.is_some() {
                    eprintln!("--- fake VPP log of {} ---\n{}", n.name, tail(&self.vpp_log(&n.name), 20));
                }
            }
        }
        self.down();
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A Pod (with its Namespace) as the API server would hold it.
pub fn pod_yaml(
    namespace: &str,
    name: &str,
    node: &str,
    labels: &BTreeMap<String, String>,
    ports: &[ContainerPort],
    ip: Option<Ipv4Addr>,
) -> String {
    pod_yaml_with_host_ports(namespace, name, node, labels, ports, &[], ip)
}

/// [`pod_yaml`] with container ports that declare a `hostPort`.
pub fn pod_yaml_with_host_ports(
    namespace: &str,
    name: &str,
    node: &str,
    labels: &BTreeMap<String, String>,
    ports: &[ContainerPort],
    host_ports: &[HostPort],
    ip: Option<Ipv4Addr>,
) -> String {
    let labels_json = serde_json::to_string(labels).expect("labels");
    let mut ports_json: Vec<Value> = ports
        .iter()
        .map(|p| serde_json::json!({"name": p.name, "containerPort": p.port, "protocol": p.protocol}))
        .collect();
    ports_json.extend(host_ports.iter().map(|h| {
        serde_json::json!({"containerPort": h.container_port, "hostPort": h.host_port,
            "protocol": h.protocol.to_ascii_uppercase()})
    }));
    let status = match ip {
        Some(ip) => format!("status:\n  phase: Running\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}]\n"),
        None => String::new(),
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n  labels: {{kubernetes.io/metadata.name: {namespace}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {labels_json}\n\
         spec:\n  nodeName: {node}\n  containers:\n    - name: app\n      image: contiv/box\n      ports: {}\n{status}",
        serde_json::to_string(&ports_json).expect("ports")
    )
}
