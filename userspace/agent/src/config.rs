//! Agent configuration: a TOML file, every field optional with a documented default.
//! Parsed and validated before anything starts; a bad file exits with a clear message.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

pub use contiv_vpp_backend::VppConfig;
use ipnet::Ipv4Net;
use serde::Deserialize;

/// Errors found while reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown/ill-typed fields.
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value parsed but makes no sense.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Default TTL of the node's registration lease (`nodeLeaseSeconds`).
pub const DEFAULT_NODE_LEASE_SECONDS: u32 = 60;

/// The raw file format. Field names are camelCase, like the original Contiv config.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    node_name: Option<String>,
    pod_subnet: Option<Ipv4Net>,
    gateway: Option<Ipv4Addr>,
    gateway_mac: Option<String>,
    mtu: Option<u32>,
    cni_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    bpf_pin_dir: Option<PathBuf>,
    host_proc_dir: Option<PathBuf>,
    cni_conf_staged: Option<PathBuf>,
    slowpath_host_ifname: Option<String>,
    slowpath_vswitch_ifname: Option<String>,
    dns: Option<DnsConfig>,
    etcd_endpoints: Option<Vec<String>>,
    store_dir: Option<PathBuf>,
    #[serde(rename = "podSubnetCIDR")]
    pod_subnet_cidr: Option<Ipv4Net>,
    pod_prefix_len: Option<u8>,
    status_addr: Option<std::net::SocketAddr>,
    uplink_interface: Option<String>,
    #[serde(rename = "nodeIP")]
    node_ip: Option<Ipv4Addr>,
    overlay_ifname: Option<String>,
    vxlan_vni: Option<u32>,
    vxlan_port: Option<u16>,
    overlay_encap: Option<String>,
    masquerade: Option<bool>,
    pod_rps: Option<bool>,
    allow_private_bpffs: Option<bool>,
    node_lease_seconds: Option<u32>,
    resync_seconds: Option<u32>,
    etcd_tls: Option<contiv_store::TlsConfig>,
    uplink: Option<Uplink>,
    vpp: Option<VppConfig>,
    services: Option<ServicesConfig>,
    monitor: Option<MonitorConfig>,
}

/// `[monitor]`: the datapath event stream (`GET /monitor`, `netctl monitor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct MonitorConfig {
    /// Events each CPU may emit per second, drops and flows each (default 1000; 0: no
    /// events). Beyond it events are not emitted but counted as suppressed; forwarding and
    /// the drop counters are unaffected.
    pub rate: u32,
    /// Events a CPU may emit at once after a quiet spell (default 2000).
    pub burst: u32,
    /// Also emit an event for every allowed new flow's first packet (default false: the
    /// forwarding path then never reaches the monitor).
    pub flows: bool,
    /// Streams served at once (default 16); more are refused with 503.
    pub max_clients: u32,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            rate: contiv_common::MONITOR_DEFAULT_RATE,
            burst: contiv_common::MONITOR_DEFAULT_BURST,
            flows: false,
            max_clients: 16,
        }
    }
}

/// The largest `[monitor] rate` and `burst` (events per second per CPU).
pub const MAX_MONITOR_RATE: u32 = 1_000_000;

/// `[services]`: the kube-proxy replacement.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicesConfig {
    /// Program Services (default true). Off: another proxy serves them.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The `service.kubernetes.io/service-proxy-name` this proxy answers to; services
    /// labelled with another name are left to their proxy. Default: none (the default
    /// proxy, which serves only unlabelled services).
    #[serde(default)]
    pub proxy_name: Option<String>,
    /// Entries of the conntrack map (both directions of a flow take one each). Default
    /// 262144; 1024 to 16777216. A change takes effect when the agent restarts: the pinned
    /// map is resized and keeps its flows.
    #[serde(default = "ServicesConfig::default_ct_entries")]
    pub conntrack_entries: u32,
    /// Entries of the fragment map (LRU): fragmented datagrams whose first fragment passed
    /// and whose later ones the datapath can still place (Cilium's `bpf-fragments-map-max`).
    /// Default 8192; 1024 to 1048576. A change takes effect when the agent restarts, as
    /// `conntrackEntries` does.
    #[serde(default = "ServicesConfig::default_fragment_entries")]
    pub fragment_entries: u32,
    /// Entries of SOCK_UDP_BACKEND: how many connected UDP sockets of the node, balanced to
    /// a service, the agent can abort when their backend leaves (allocated as used). A
    /// socket connected while it is full keeps its backend, and is counted
    /// (`contiv_service_udp_sockets_untracked_total`). Default 65536; 16 to 4194304. A
    /// change takes effect when the agent restarts, as `conntrackEntries` does.
    #[serde(default = "ServicesConfig::default_connected_udp_sockets")]
    pub connected_udp_sockets: u32,
    /// The cgroup2 hierarchy's root, where the socket programs attach. Default: found in
    /// /proc/self/mountinfo (/sys/fs/cgroup on most hosts).
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
    /// Conntrack timeouts in seconds.
    #[serde(default)]
    pub timeouts: CtTimeouts,
    /// Where the proxy's health server listens (`/healthz`, `/livez`), as kube-proxy's
    /// `--healthz-bind-address`: load balancers of `externalTrafficPolicy: Cluster` services
    /// probe it. Default `0.0.0.0:10256`, kube-proxy's; `""` for none.
    #[serde(default = "ServicesConfig::default_healthz_address")]
    pub healthz_address: String,
    /// Seconds a service or endpoint change may wait to reach the maps before `/healthz`
    /// says 503 (kube-proxy: twice its sync period). Default 60.
    #[serde(default = "ServicesConfig::default_healthz_timeout")]
    pub healthz_timeout: u32,
    /// Which node addresses NodePorts are served on, as kube-proxy's `nodePortAddresses`:
    /// CIDRs (a node address inside one of them; `127.0.0.0/8` also serves the node's own
    /// `127.0.0.1:<nodePort>`), or `["primary"]` (each node's primary address: its Node's
    /// first InternalIP, else its first ExternalIP). Default empty: every node address, and
    /// localhost.
    #[serde(default)]
    pub node_port_addresses: Vec<String>,
}

/// `[services] nodePortAddresses`, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NodePortAddresses {
    /// Every node address, and the node's loopback address (the default).
    #[default]
    All,
    /// Each node's primary address only.
    Primary,
    /// Node addresses inside one of these (IPv6 ones are accepted and match no IPv4
    /// address, as kube-proxy's IPv4 side ignores them).
    Cidrs(Vec<ipnet::IpNet>),
}

impl NodePortAddresses {
    /// Whether NodePorts are served on `ip`, a node address (`primary`: whether it is its
    /// node's primary one).
    pub fn takes(&self, ip: Ipv4Addr, primary: bool) -> bool {
        match self {
            NodePortAddresses::All => true,
            NodePortAddresses::Primary => primary,
            NodePortAddresses::Cidrs(nets) => nets.iter().any(|n| n.contains(&std::net::IpAddr::V4(ip))),
        }
    }

    /// Whether the node's own `127.0.0.1:<nodePort>` is served.
    pub fn takes_loopback(&self) -> bool {
        self.takes(Ipv4Addr::LOCALHOST, false)
    }
}

fn yes() -> bool {
    true
}

/// How long an idle flow's conntrack entries live, by protocol and state (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CtTimeouts {
    /// TCP after the handshake (no FIN or RST seen).
    pub tcp_established: u32,
    /// TCP before the handshake completes.
    pub tcp_syn: u32,
    /// TCP after a FIN or RST.
    pub tcp_closing: u32,
    pub udp: u32,
    pub icmp: u32,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self { tcp_established: 21600, tcp_syn: 60, tcp_closing: 10, udp: 60, icmp: 30 }
    }
}

impl ServicesConfig {
    fn default_ct_entries() -> u32 {
        contiv_common::MAX_CT
    }

    fn default_fragment_entries() -> u32 {
        contiv_common::MAX_FRAGS
    }

    fn default_connected_udp_sockets() -> u32 {
        contiv_common::MAX_SOCK_UDP_BACKEND
    }

    fn default_healthz_address() -> String {
        "0.0.0.0:10256".into()
    }

    fn default_healthz_timeout() -> u32 {
        60
    }

    /// The health server's address; none when `healthzAddress` is empty.
    pub fn healthz_addr(&self) -> Option<std::net::SocketAddr> {
        self.healthz_address.parse().ok()
    }

    /// `nodePortAddresses`, parsed; the error says which entry is wrong.
    pub fn node_ports(&self) -> Result<NodePortAddresses, String> {
        match self.node_port_addresses.as_slice() {
            [] => Ok(NodePortAddresses::All),
            [one] if one == "primary" => Ok(NodePortAddresses::Primary),
            list => list
                .iter()
                .map(|s| {
                    s.parse::<ipnet::IpNet>().map(|n| n.trunc()).map_err(|_| {
                        if s == "primary" {
                            "\"primary\" must be the only entry".to_owned()
                        } else {
                            format!("{s:?} is not a CIDR (\"192.168.0.0/16\")")
                        }
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|nets| {
                    // As kube-proxy's IPv4 side: a zero CIDR, or no IPv4 CIDR at all, takes
                    // every address.
                    let v4: Vec<&ipnet::IpNet> = nets.iter().filter(|n| matches!(n, ipnet::IpNet::V4(_))).collect();
                    if v4.is_empty() || v4.iter().any(|n| n.prefix_len() == 0) {
                        NodePortAddresses::All
                    } else {
                        NodePortAddresses::Cidrs(nets)
                    }
                }),
        }
    }
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            proxy_name: None,
            conntrack_entries: Self::default_ct_entries(),
            fragment_entries: Self::default_fragment_entries(),
            connected_udp_sockets: Self::default_connected_udp_sockets(),
            cgroup_root: None,
            timeouts: CtTimeouts::default(),
            healthz_address: Self::default_healthz_address(),
            healthz_timeout: Self::default_healthz_timeout(),
            node_port_addresses: Vec::new(),
        }
    }
}

/// Who owns the node's uplink NIC (see the architecture: one owner per node).
#[derive(Debug, Deserialize, serde::Serialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Uplink {
    /// The kernel owns the NIC; eBPF encapsulates cross-node traffic (the default).
    #[default]
    Kernel,
    /// FD.io VPP owns the NIC (DPDK): everything pods send that leaves the node crosses the
    /// slow-path port (XDP -> AF_XDP) into VPP, which tunnels to other nodes, routes, NATs
    /// and reaches the host over its tap. Configured by `[vpp]`.
    Vpp,
}

impl Uplink {
    /// The config file's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Uplink::Kernel => "kernel",
            Uplink::Vpp => "vpp",
        }
    }
}

/// The VXLAN overlay between nodes (kernel uplink mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    /// Name of the flow-based VXLAN device. Default cvx0.
    pub ifname: String,
    /// VXLAN network identifier. Default 1.
    pub vni: u32,
    /// UDP destination port. Default 4789 (IANA).
    pub port: u16,
    /// Who builds the outer headers of pods' packets. Default [`OverlayEncap::Datapath`].
    pub encap: OverlayEncap,
}

impl OverlayConfig {
    /// The UDP port the eBPF programs put in the outer headers they build; `None` when the
    /// device builds them (`overlayEncap = "device"`).
    pub fn datapath_encap_port(&self) -> Option<u16> {
        (self.encap == OverlayEncap::Datapath).then_some(self.port)
    }
}

/// `overlayEncap`: who puts the outer headers on a pod's packet for another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayEncap {
    /// `"datapath"`: `tc_from_pod` writes them and hands the packet to the uplink.
    Datapath,
    /// `"device"`: `tc_from_pod` sets a tunnel key and the VXLAN device writes them (a route
    /// lookup and the node's netfilter hooks per packet).
    Device,
}

/// Bytes the VXLAN encapsulation adds to a packet (outer IPv4 20, UDP 8, VXLAN 8, inner
/// Ethernet 14): pods get the underlay MTU minus this.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The pod MTUs the agent accepts, from its file and from a CNI network config, and the
/// bounds of the default it derives from the uplink (shared with contiv-cni).
pub use contiv_cni_api::{POD_MTU_MAX, POD_MTU_MIN};

/// DNS settings handed to pods in the CNI result.
#[derive(Debug, Deserialize, serde::Serialize, Default, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DnsConfig {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// Validated configuration of one node's agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Name of this node. Default: the host name.
    pub node_name: String,
    /// This node's pod subnet. When the file sets `podSubnet`, that; otherwise the node
    /// registry allocates it from `podSubnetCIDR` by node ID (10.1.<id>.0/24 by default).
    pub pod_subnet: Ipv4Net,
    /// True when `podSubnet` was set in the file (no allocation from the registry).
    pub pod_subnet_fixed: bool,
    /// The pods' gateway. Default: the first host address of `pod_subnet`.
    pub gateway: Ipv4Addr,
    /// True when `gateway` was set in the file.
    pub gateway_fixed: bool,
    /// The cluster's pod subnet, cut into per-node subnets. Default 10.1.0.0/16.
    pub pod_subnet_cidr: Ipv4Net,
    /// Prefix length of one node's subnet. Default 24.
    pub pod_prefix_len: u8,
    /// etcd endpoints of the cluster store; empty: the embedded store in `store_dir`.
    pub etcd_endpoints: Vec<String>,
    /// TLS towards etcd (`https://` endpoints): CA, client certificate and key.
    pub etcd_tls: Option<contiv_store::TlsConfig>,
    /// Who owns the uplink NIC. Default kernel.
    pub uplink: Uplink,
    /// Directory of the embedded store. Default `<stateDir>/store`.
    pub store_dir: PathBuf,
    /// Status endpoint (healthz, readyz, pods, vswitch, metrics). Default 127.0.0.1:9192.
    pub status_addr: std::net::SocketAddr,
    /// MAC address pods resolve the gateway to. Default 02:fe:00:00:00:01.
    pub gateway_mac: [u8; 6],
    /// MTU of pod interfaces. Default: the uplink's MTU minus [`VXLAN_OVERHEAD`] when there
    /// is an uplink (the overlay is on), else 1500. `None` until the uplink is known.
    pub mtu: Option<u32>,
    /// The node's uplink interface: its address is the node's underlay address and the
    /// overlay's tunnel endpoint. Default: the interface holding `node_ip` if set (not
    /// loopback), else the interface of the default route; none (a single node without
    /// overlay) if there is no default route.
    pub uplink_interface: Option<String>,
    /// The node's underlay address. Default: the first IPv4 address of the uplink.
    pub node_ip: Option<Ipv4Addr>,
    /// The overlay device.
    pub overlay: OverlayConfig,
    /// Masquerade pod traffic leaving the cluster to the node's address. Default true.
    pub masquerade: bool,
    /// Receive packet steering on the host end of every pod veth: each flow a pod sends is
    /// queued on one CPU's backlog (by flow hash), so TCP segments its sender transmits from
    /// two CPUs are delivered in order (see src/rps.rs). It costs a cross-CPU interrupt
    /// whenever the hash picks another CPU. Default false.
    pub pod_rps: bool,
    /// Run even when /sys/fs/bpf is not the host's bpffs (pins would die with the agent's
    /// mount namespace, and a restart would stop pod traffic). Default false.
    pub allow_private_bpffs: bool,
    /// TTL of the node's registration lease: other nodes drop this node's routes when its
    /// agent has been away this long. Longer than an agent restart or upgrade takes (the
    /// pods forward without their agent meanwhile). Default 60 s.
    pub node_lease_seconds: u32,
    /// How often the node's plan (pod entries, routes, neighbours, policy, masquerade) is
    /// compared with what the kernel holds and repaired. Default 60 s.
    pub resync_seconds: u32,
    /// The CNI gRPC socket (mode 0600). Default /run/contiv/cni.sock.
    pub cni_socket: PathBuf,
    /// Where the agent keeps its state (IPAM, attachments). Default /var/lib/contiv.
    pub state_dir: PathBuf,
    /// bpffs directory for pinned maps. Default /sys/fs/bpf/contiv.
    pub bpf_pin_dir: PathBuf,
    /// The host's procfs as the agent sees it, when the agent runs in a PID namespace of its
    /// own (a DaemonSet without hostPID): a runtime that names a pod's namespace by process
    /// (`CNI_NETNS=/proc/<pid>/ns/net`, as cri-dockerd does) gives a host PID, which the
    /// agent opens here instead (`<hostProcDir>/<pid>/ns/net`). Default: none (`/proc` as it
    /// is, right when the agent shares the host's PIDs).
    pub host_proc_dir: Option<PathBuf>,
    /// A network config list `contiv-cni install --staged` left under the name a runtime
    /// does not load (`<name>.staged`): the agent renames it to `<name>` once it is ready,
    /// so a node whose agent cannot start does not look ready for pods. Default: none.
    pub cni_conf_staged: Option<PathBuf>,
    /// Host end of the slow-path port. Default cslow0.
    pub slowpath_host_ifname: String,
    /// vswitch end of the slow-path port (AF_XDP). Default cslow1.
    pub slowpath_vswitch_ifname: String,
    /// DNS for pods. Default: none.
    pub dns: DnsConfig,
    /// The `[vpp]` section (used with `uplink = "vpp"`): VPP's API socket, the NIC DPDK
    /// takes, CPUs, the host interconnect, NAT (see contiv-vpp-backend).
    pub vpp: VppConfig,
    /// The `[services]` section: the kube-proxy replacement.
    pub services: ServicesConfig,
    /// The `[monitor]` section: the datapath event stream.
    pub monitor: MonitorConfig,
}

pub const DEFAULT_POD_SUBNET: &str = "10.1.1.0/24";
/// A node's pod subnet: at most a /16 (65,534 addresses; far more than one node runs) and
/// at least a /30 (network, gateway, broadcast and one pod).
pub const POD_SUBNET_PREFIXES: std::ops::RangeInclusive<u8> = 16..=30;
/// The cluster's pod subnet: at most a /8 (the largest private range).
pub const MIN_POD_SUBNET_CIDR_PREFIX: u8 = 8;
/// The longest path a unix socket address holds (108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;
pub const DEFAULT_POD_SUBNET_CIDR: &str = "10.1.0.0/16";
pub const DEFAULT_GATEWAY_MAC: [u8; 6] = [0x02, 0xfe, 0x00, 0x00, 0x00, 0x01];

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|source| ConfigError::Parse { path: PathBuf::from("<config>"), source: Box::new(source) })?;
        Self::from_raw(raw)
    }

    /// Adopts the subnet the node registry allocated (unless the file fixed one); the
    /// gateway follows it unless the file fixed that too.
    pub fn with_allocated_subnet(mut self, subnet: Ipv4Net) -> Result<Self, ConfigError> {
        if self.pod_subnet_fixed {
            return Ok(self);
        }
        self.pod_subnet = subnet.trunc();
        if !self.gateway_fixed {
            self.gateway = Ipv4Addr::from(u32::from(self.pod_subnet.network()) + 1);
        }
        if !self.pod_subnet.contains(&self.gateway) {
            return Err(ConfigError::Invalid(format!(
                "gateway {} is outside the allocated pod subnet {}",
                self.gateway, self.pod_subnet
            )));
        }
        Ok(self)
    }

    /// All defaults.
    pub fn defaults() -> Self {
        Self::from_raw(RawConfig::default()).expect("defaults are valid")
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let pod_subnet_fixed = raw.pod_subnet.is_some();
        let gateway_fixed = raw.gateway.is_some();
        let given_cidr = raw.pod_subnet_cidr.unwrap_or_else(|| DEFAULT_POD_SUBNET_CIDR.parse().expect("valid default"));
        if given_cidr.prefix_len() < MIN_POD_SUBNET_CIDR_PREFIX {
            return Err(ConfigError::Invalid(format!(
                "podSubnetCIDR {given_cidr}: a /{} covers public and reserved addresses; the cluster's pod subnet \
                 can be at most a /{MIN_POD_SUBNET_CIDR_PREFIX} (e.g. 10.0.0.0/8)",
                given_cidr.prefix_len()
            )));
        }
        let pod_subnet_cidr = given_cidr.trunc();
        check_usable_range("podSubnetCIDR", &given_cidr)?;
        let pod_prefix_len = raw.pod_prefix_len.unwrap_or(24);
        if pod_prefix_len <= pod_subnet_cidr.prefix_len() || !POD_SUBNET_PREFIXES.contains(&pod_prefix_len) {
            return Err(ConfigError::Invalid(format!(
                "podPrefixLen {pod_prefix_len} must be longer than podSubnetCIDR {pod_subnet_cidr} and between {} and {}",
                POD_SUBNET_PREFIXES.start(),
                POD_SUBNET_PREFIXES.end()
            )));
        }
        let store = contiv_store::StoreConfig {
            etcd_endpoints: raw.etcd_endpoints.clone().unwrap_or_default(),
            etcd_tls: raw.etcd_tls.clone(),
            ..contiv_store::StoreConfig::default()
        };
        if let Err(e) = store.validate() {
            let detail = e.to_string();
            let detail = detail.strip_prefix("invalid store configuration: ").unwrap_or(&detail);
            return Err(ConfigError::Invalid(format!("etcdEndpoints / [etcdTls]: {detail}")));
        }
        let uplink = raw.uplink.unwrap_or_default();
        if raw.vpp.is_some() && uplink != Uplink::Vpp {
            return Err(ConfigError::Invalid("the [vpp] table applies only with uplink = \"vpp\"".into()));
        }
        let given_subnet = raw.pod_subnet.unwrap_or_else(|| DEFAULT_POD_SUBNET.parse().expect("valid default"));
        if given_subnet.prefix_len() > *POD_SUBNET_PREFIXES.end() {
            return Err(ConfigError::Invalid(format!("podSubnet {given_subnet} is too small: need at least a /30")));
        }
        if given_subnet.prefix_len() < *POD_SUBNET_PREFIXES.start() {
            return Err(ConfigError::Invalid(format!(
                "podSubnet {given_subnet} is too large for one node: a node's pod subnet is at most a /{} \
                 (the cluster-wide range is podSubnetCIDR)",
                POD_SUBNET_PREFIXES.start()
            )));
        }
        check_usable_range("podSubnet", &given_subnet)?;
        let pod_subnet = given_subnet.trunc();
        let first_host = Ipv4Addr::from(u32::from(pod_subnet.network()) + 1);
        let gateway = raw.gateway.unwrap_or(first_host);
        if !pod_subnet.contains(&gateway) || gateway == pod_subnet.network() || gateway == pod_subnet.broadcast() {
            return Err(ConfigError::Invalid(format!(
                "gateway {gateway} must be a host address inside podSubnet {pod_subnet}"
            )));
        }
        let gateway_mac = match raw.gateway_mac {
            Some(s) => parse_mac(&s).ok_or_else(|| {
                ConfigError::Invalid(format!("gatewayMac {s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
            })?,
            None => DEFAULT_GATEWAY_MAC,
        };
        if gateway_mac[0] & 1 == 1 || gateway_mac == [0; 6] {
            return Err(ConfigError::Invalid("gatewayMac must be a unicast, non-zero MAC".into()));
        }
        if let Some(mtu) = raw.mtu
            && !(POD_MTU_MIN..=POD_MTU_MAX).contains(&mtu)
        {
            return Err(ConfigError::Invalid(format!("mtu {mtu} out of range {POD_MTU_MIN}..={POD_MTU_MAX}")));
        }
        if uplink == Uplink::Vpp
            && let Some(mtu) = raw.mtu.filter(|m| *m > contiv_common::SLOW_PORT_MTU)
        {
            return Err(ConfigError::Invalid(format!(
                "mtu {mtu}: with uplink = \"vpp\" pods' traffic crosses the slow-path port to VPP, whose MTU is {}",
                contiv_common::SLOW_PORT_MTU
            )));
        }
        if uplink == Uplink::Vpp {
            // The host's tap and the pods must not share addresses: VPP routes the pod range
            // to the pods, and the agent owns the host's address in it on the tap.
            let interconnect = raw
                .vpp
                .as_ref()
                .map_or_else(|| VppConfig::default().host_interconnect_subnet, |v| v.host_interconnect_subnet);
            let overlaps = |a: &Ipv4Net, b: &Ipv4Net| a.contains(&b.network()) || b.contains(&a.network());
            let pod_subnet = raw.pod_subnet.map(|s| s.trunc());
            if let Some(pods) =
                [Some(pod_subnet_cidr), pod_subnet].into_iter().flatten().find(|p| overlaps(p, &interconnect))
            {
                return Err(ConfigError::Invalid(format!(
                    "[vpp] hostInterconnectSubnet {interconnect} overlaps the pods' {pods}; pick one outside it"
                )));
            }
            // VPP holds the NIC: the kernel-side wire settings would be silently ignored.
            for (set, field) in [
                (raw.uplink_interface.is_some(), "uplinkInterface"),
                (raw.node_ip.is_some(), "nodeIP"),
                (raw.overlay_ifname.is_some(), "overlayIfname"),
                (raw.vxlan_vni.is_some(), "vxlanVni"),
                (raw.vxlan_port.is_some(), "vxlanPort"),
                (raw.overlay_encap.is_some(), "overlayEncap"),
                (raw.masquerade.is_some(), "masquerade"),
            ] {
                if set {
                    return Err(ConfigError::Invalid(format!(
                        "{field} is a kernel-uplink setting; with uplink = \"vpp\" VPP owns the NIC (the node IP \
                         is [vpp] uplinkAddress or contiv-stn's handover, the tunnels' VNI is [vpp] vxlanVni)"
                    )));
                }
            }
        }
        let services = raw.services.unwrap_or_default();
        if !(1024..=16 * 1024 * 1024).contains(&services.conntrack_entries) {
            return Err(ConfigError::Invalid(format!(
                "[services] conntrackEntries {} out of range 1024..=16777216",
                services.conntrack_entries
            )));
        }
        if !(1024..=1024 * 1024).contains(&services.fragment_entries) {
            return Err(ConfigError::Invalid(format!(
                "[services] fragmentEntries {} out of range 1024..=1048576",
                services.fragment_entries
            )));
        }
        if !(16..=4 * 1024 * 1024).contains(&services.connected_udp_sockets) {
            return Err(ConfigError::Invalid(format!(
                "[services] connectedUdpSockets {} out of range 16..=4194304",
                services.connected_udp_sockets
            )));
        }
        if let Some(root) = &services.cgroup_root
            && !root.is_absolute()
        {
            return Err(ConfigError::Invalid(format!("[services] cgroupRoot {} must be absolute", root.display())));
        }
        if !services.healthz_address.is_empty() && services.healthz_addr().is_none() {
            return Err(ConfigError::Invalid(format!(
                "[services] healthzAddress {:?} is not an address:port (\"0.0.0.0:10256\"), nor \"\" for none",
                services.healthz_address
            )));
        }
        if let Err(e) = services.node_ports() {
            return Err(ConfigError::Invalid(format!(
                "[services] nodePortAddresses: {e}; expected CIDRs, or [\"primary\"] alone, or [] for every node address"
            )));
        }
        if services.healthz_timeout == 0 {
            return Err(ConfigError::Invalid("[services] healthzTimeout must be at least 1 second".into()));
        }
        let t = services.timeouts;
        if [t.tcp_established, t.tcp_syn, t.tcp_closing, t.udp, t.icmp].contains(&0) {
            return Err(ConfigError::Invalid("[services] timeouts must be at least 1 second".into()));
        }
        let monitor = raw.monitor.unwrap_or_default();
        if monitor.rate > MAX_MONITOR_RATE {
            return Err(ConfigError::Invalid(format!(
                "[monitor] rate {} out of range 0..={MAX_MONITOR_RATE} (events per second per CPU)",
                monitor.rate
            )));
        }
        if !(1..=MAX_MONITOR_RATE).contains(&monitor.burst) {
            return Err(ConfigError::Invalid(format!(
                "[monitor] burst {} out of range 1..={MAX_MONITOR_RATE}",
                monitor.burst
            )));
        }
        if !(1..=1024).contains(&monitor.max_clients) {
            return Err(ConfigError::Invalid(format!(
                "[monitor] maxClients {} out of range 1..=1024",
                monitor.max_clients
            )));
        }
        let overlay = OverlayConfig {
            ifname: ifname_check(raw.overlay_ifname, "cvx0", "overlayIfname")?,
            vni: raw.vxlan_vni.unwrap_or(1),
            port: raw.vxlan_port.unwrap_or(4789),
            encap: match raw.overlay_encap.as_deref() {
                None | Some("datapath") => OverlayEncap::Datapath,
                Some("device") => OverlayEncap::Device,
                Some(other) => {
                    return Err(ConfigError::Invalid(format!(
                        "overlayEncap {other:?}: expected \"datapath\" (the eBPF programs build the VXLAN headers) \
                         or \"device\" (the VXLAN device does)"
                    )));
                }
            },
        };
        if overlay.vni == 0 || overlay.vni >= 1 << 24 {
            return Err(ConfigError::Invalid(format!("vxlanVni {} must be in 1..16777215", overlay.vni)));
        }
        if overlay.port == 0 {
            return Err(ConfigError::Invalid("vxlanPort must not be 0".into()));
        }
        let uplink_interface = match raw.uplink_interface {
            Some(name) => Some(ifname_check(Some(name), "", "uplinkInterface")?),
            None => None,
        };
        let slowpath_host_ifname = ifname_check(raw.slowpath_host_ifname, "cslow0", "slowpathHostIfname")?;
        let slowpath_vswitch_ifname = ifname_check(raw.slowpath_vswitch_ifname, "cslow1", "slowpathVswitchIfname")?;
        if slowpath_host_ifname == slowpath_vswitch_ifname {
            return Err(ConfigError::Invalid("the two ends of the slow-path port need different names".into()));
        }
        let node_name = match raw.node_name {
            Some(n) if n.is_empty() => return Err(ConfigError::Invalid("nodeName must not be empty".into())),
            // The name is part of store keys: no separators, no spaces, DNS length.
            Some(n) if n.len() > 253 || n.contains(|c: char| c == '/' || c.is_whitespace() || c.is_control()) => {
                return Err(ConfigError::Invalid(format!(
                    "nodeName {n:?} must be a host name: at most 253 characters, no '/', spaces or control characters"
                )));
            }
            Some(n) => n,
            None => {
                nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
            }
        };
        let cni_socket = raw.cni_socket.unwrap_or_else(|| contiv_cni_api::DEFAULT_SOCKET.into());
        check_path("cniSocket", &cni_socket)?;
        if cni_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ConfigError::Invalid(format!(
                "cniSocket {cni_socket:?} is {} bytes long; a unix socket path holds at most {MAX_SOCKET_PATH}",
                cni_socket.as_os_str().len()
            )));
        }
        if cni_socket.as_os_str().as_encoded_bytes().ends_with(b"/") {
            return Err(ConfigError::Invalid(format!("cniSocket {cni_socket:?} names a directory, not a socket file")));
        }
        let state_dir = raw.state_dir.unwrap_or_else(|| "/var/lib/contiv".into());
        check_path("stateDir", &state_dir)?;
        if let Some(dir) = &raw.store_dir {
            check_path("storeDir", dir)?;
        }
        let bpf_pin_dir = raw.bpf_pin_dir.unwrap_or_else(|| contiv_common::DEFAULT_PIN_DIR.into());
        check_path("bpfPinDir", &bpf_pin_dir)?;
        if let Some(dir) = &raw.host_proc_dir {
            check_path("hostProcDir", dir)?;
        }
        if let Some(file) = &raw.cni_conf_staged {
            check_path("cniConfStaged", file)?;
            if !file.to_string_lossy().ends_with(".staged") {
                return Err(ConfigError::Invalid(format!(
                    "cniConfStaged {} must end in .staged (the name the agent renames it to is without it)",
                    file.display()
                )));
            }
        }
        let node_lease_seconds = raw.node_lease_seconds.unwrap_or(DEFAULT_NODE_LEASE_SECONDS);
        if !(2..=3600).contains(&node_lease_seconds) {
            return Err(ConfigError::Invalid(format!("nodeLeaseSeconds {node_lease_seconds} is outside 2..=3600")));
        }
        let resync_seconds = raw.resync_seconds.unwrap_or(60);
        if !(1..=3600).contains(&resync_seconds) {
            return Err(ConfigError::Invalid(format!("resyncSeconds {resync_seconds} is outside 1..=3600")));
        }
        let dns = raw.dns.unwrap_or_default();
        if let Some(bad) = dns.nameservers.iter().find(|n| n.parse::<std::net::IpAddr>().is_err()) {
            return Err(ConfigError::Invalid(format!("dns.nameservers entry {bad:?} is not an IP address")));
        }
        Ok(Self {
            node_name,
            pod_subnet,
            pod_subnet_fixed,
            gateway,
            gateway_fixed,
            pod_subnet_cidr,
            pod_prefix_len,
            etcd_endpoints: raw.etcd_endpoints.unwrap_or_default(),
            etcd_tls: raw.etcd_tls,
            uplink,
            vpp: raw.vpp.unwrap_or_default(),
            store_dir: raw.store_dir.unwrap_or_else(|| state_dir.join("store")),
            status_addr: raw.status_addr.unwrap_or_else(|| "127.0.0.1:9192".parse().expect("valid default")),
            gateway_mac,
            mtu: raw.mtu,
            uplink_interface,
            node_ip: raw.node_ip,
            overlay,
            masquerade: raw.masquerade.unwrap_or(true),
            pod_rps: raw.pod_rps.unwrap_or(false),
            allow_private_bpffs: raw.allow_private_bpffs.unwrap_or(false),
            node_lease_seconds,
            resync_seconds,
            services,
            monitor,
            cni_socket,
            state_dir,
            bpf_pin_dir,
            host_proc_dir: raw.host_proc_dir,
            cni_conf_staged: raw.cni_conf_staged,
            slowpath_host_ifname,
            slowpath_vswitch_ifname,
            dns,
        })
    }
}

/// An interface name from the file (or `default`), checked against the kernel's rules.
fn ifname_check(v: Option<String>, default: &str, field: &str) -> Result<String, ConfigError> {
    let name = v.unwrap_or_else(|| default.to_owned());
    if !valid_ifname(&name) {
        return Err(ConfigError::Invalid(format!("{field} {name:?} is not a valid interface name")));
    }
    Ok(name)
}

impl AgentConfig {
    /// The pod MTU once the uplink is known: the file's `mtu`, else the uplink MTU minus the
    /// overlay's overhead (within the 576..=9000 the file's `mtu` and the CNI's accept; a
    /// jumbo uplink above 9050 gives 9000), else 1500. In VPP mode no more than the
    /// slow-path port's MTU: every frame a pod sends off the node crosses it to VPP.
    pub fn pod_mtu(&self, uplink_mtu: Option<u32>) -> u32 {
        self.mtu.unwrap_or_else(|| {
            uplink_mtu
                .map_or(1500, |m| m.saturating_sub(VXLAN_OVERHEAD).clamp(POD_MTU_MIN, POD_MTU_MAX))
                .min(self.max_pod_mtu())
        })
    }

    /// The largest MTU this node's pods can use: in VPP mode the slow-path port's (every
    /// frame a pod sends off the node crosses it to VPP), else [`POD_MTU_MAX`].
    pub fn max_pod_mtu(&self) -> u32 {
        match self.uplink {
            Uplink::Vpp => contiv_common::SLOW_PORT_MTU,
            Uplink::Kernel => POD_MTU_MAX,
        }
    }
}

/// A Linux interface name: 1-15 bytes, not `.` or `..`, no `/`, `:` or whitespace.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// A path field: set to something, and absolute (the agent is a daemon; a relative path
/// would depend on the directory it happens to start in).
fn check_path(field: &str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::Invalid(format!("{field} must not be empty (leave it out for the default)")));
    }
    if !path.is_absolute() {
        return Err(ConfigError::Invalid(format!("{field} {path:?} must be an absolute path")));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(ConfigError::Invalid(format!("{field} {path:?} contains a NUL byte")));
    }
    Ok(())
}

/// Pod addresses must be ordinary unicast addresses: not "this network" (0/8), loopback,
/// link-local, multicast or the reserved/broadcast block.
fn check_usable_range(field: &str, net: &Ipv4Net) -> Result<(), ConfigError> {
    const RESERVED: [(&str, &str); 5] = [
        ("0.0.0.0/8", "\"this network\""),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved and broadcast"),
    ];
    for (cidr, what) in RESERVED {
        let reserved: Ipv4Net = cidr.parse().expect("literal CIDR");
        if net.contains(&reserved.network()) || reserved.contains(&net.network()) {
            return Err(ConfigError::Invalid(format!("{field} {net} overlaps {cidr} ({what} addresses)")));
        }
    }
    Ok(())
}

impl AgentConfig {
    /// Where the cluster store is: etcd (with TLS when configured), else the embedded store.
    pub fn store_config(&self) -> contiv_store::StoreConfig {
        contiv_store::StoreConfig {
            etcd_endpoints: self.etcd_endpoints.clone(),
            embedded_path: self.store_dir.clone(),
            etcd_tls: self.etcd_tls.clone(),
            ..contiv_store::StoreConfig::default()
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_section_defaults_and_bounds() {
        let c = AgentConfig::from_toml("").unwrap();
        assert_eq!(c.monitor, MonitorConfig { rate: 1000, burst: 2000, flows: false, max_clients: 16 });
        let c = AgentConfig::from_toml("[monitor]\nrate = 0\nflows = true\n").unwrap();
        assert_eq!((c.monitor.rate, c.monitor.flows, c.monitor.burst), (0, true, 2000));
        for (text, field) in [
            ("[monitor]\nrate = 1000001\n", "rate"),
            ("[monitor]\nburst = 0\n", "burst"),
            ("[monitor]\nmaxClients = 0\n", "maxClients"),
        ] {
            let e = AgentConfig::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
        assert!(AgentConfig::from_toml("[monitor]\nrates = 5\n").is_err(), "unknown fields are refused");
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = AgentConfig::from_toml("").unwrap();
        assert_eq!(c.pod_subnet.to_string(), "10.1.1.0/24");
        assert_eq!(c.gateway, Ipv4Addr::new(10, 1, 1, 1));
        assert_eq!(c.gateway_mac, DEFAULT_GATEWAY_MAC);
        assert_eq!(c.mtu, None);
        assert_eq!(c.pod_mtu(None), 1500);
        assert_eq!(c.pod_mtu(Some(1500)), 1450, "the overlay's 50 bytes come off the uplink MTU");
        // Every ADD checks the pod MTU against 576..=9000: a 9216-byte uplink must not put
        // the default outside it.
        assert_eq!(c.pod_mtu(Some(9216)), 9000);
        assert_eq!(c.pod_mtu(Some(9050)), 9000);
        assert_eq!(c.pod_mtu(Some(600)), 576);
        assert_eq!(c.uplink, Uplink::Kernel);
        assert_eq!(
            c.overlay,
            OverlayConfig { ifname: "cvx0".into(), vni: 1, port: 4789, encap: OverlayEncap::Datapath }
        );
        assert!(c.masquerade);
        assert!(!c.pod_rps);
        assert_eq!(c.node_lease_seconds, 60, "outlasts an agent upgrade");
        assert_eq!(c.resync_seconds, 60);
        assert_eq!(c.cni_socket, PathBuf::from("/run/contiv/cni.sock"));
        assert_eq!(c.bpf_pin_dir, PathBuf::from("/sys/fs/bpf/contiv"));
        assert_eq!(c.slowpath_host_ifname, "cslow0");
        assert_eq!(c.services.healthz_addr(), Some("0.0.0.0:10256".parse().unwrap()), "kube-proxy's port");
        assert_eq!(c.services.healthz_timeout, 60);
    }

    #[test]
    fn fields_are_read() {
        let c = AgentConfig::from_toml(
            r#"
            nodeName = "n1"
            podSubnet = "10.1.7.0/24"
            mtu = 1450
            gatewayMac = "02:aa:bb:cc:dd:ee"
            overlayEncap = "device"
            [dns]
            nameservers = ["10.96.0.10"]
            search = ["svc.cluster.local"]
            "#,
        )
        .unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.gateway, Ipv4Addr::new(10, 1, 7, 1));
        assert_eq!(c.mtu, Some(1450));
        assert_eq!(c.pod_mtu(Some(9000)), 1450, "an explicit mtu wins");
        // VPP mode: pods' traffic crosses the slow-path port, 1500 bytes.
        let vpp = AgentConfig::from_toml("uplink = \"vpp\"\n").unwrap();
        assert_eq!((vpp.pod_mtu(Some(9000)), vpp.pod_mtu(Some(1500))), (1500, 1450));
        let e = AgentConfig::from_toml("uplink = \"vpp\"\nmtu = 9000\n").unwrap_err().to_string();
        assert!(e.contains("slow-path port"), "{e}");
        assert_eq!(AgentConfig::from_toml("uplink = \"vpp\"\nmtu = 1500\n").unwrap().mtu, Some(1500));
        assert_eq!(c.gateway_mac, [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
        assert_eq!(c.dns.nameservers, vec!["10.96.0.10"]);
        assert_eq!(c.overlay.encap, OverlayEncap::Device);
    }

    #[test]
    fn bad_values_are_rejected_with_the_field_named() {
        for (text, needle) in [
            ("podSubnet = \"nonsense\"", "podSubnet"),
            ("unknownField = 1", "unknownField"),
            ("mtu = 10", "mtu"),
            ("gatewayMac = \"zz\"", "gatewayMac"),
            ("gatewayMac = \"01:00:00:00:00:01\"", "gatewayMac"),
            ("gateway = \"10.2.0.1\"", "gateway"),
            ("podSubnet = \"10.1.1.0/31\"", "podSubnet"),
            ("slowpathHostIfname = \"this-name-is-way-too-long\"", "slowpathHostIfname"),
            ("podPrefixLen = 8", "podPrefixLen"),
            ("nodeLeaseSeconds = 1", "nodeLeaseSeconds"),
            ("resyncSeconds = 0", "resyncSeconds"),
            ("nodeLeaseSeconds = 86400", "nodeLeaseSeconds"),
            ("etcdEndpoints = [\"127.0.0.1:2379\"]", "etcdEndpoints"),
            ("uplink = \"dpdk\"", "uplink"),
            ("uplinkInterface = \"a/b\"", "uplinkInterface"),
            ("vxlanVni = 0", "vxlanVni"),
            ("vxlanVni = 16777216", "vxlanVni"),
            ("overlayEncap = \"kernel\"", "overlayEncap \"kernel\""),
            ("nodeIP = \"x\"", "nodeIP"),
            ("cniConfStaged = \"/etc/cni/net.d/05-contiv.conflist\"", "cniConfStaged"),
            ("cniConfStaged = \"net.d/05-contiv.conflist.staged\"", "cniConfStaged"),
            // A new user's mistakes: the whole address space, an empty or relative path.
            ("podSubnet = \"10.0.0.0/0\"", "podSubnet 10.0.0.0/0"),
            ("podSubnet = \"10.0.0.0/8\"", "podSubnet"),
            ("podSubnet = \"127.0.0.0/24\"", "loopback"),
            ("podSubnetCIDR = \"10.0.0.0/0\"", "podSubnetCIDR 10.0.0.0/0"),
            ("podSubnetCIDR = \"224.0.0.0/8\"", "multicast"),
            ("podPrefixLen = 31", "podPrefixLen"),
            ("podSubnetCIDR = \"10.0.0.0/8\"\npodPrefixLen = 12", "podPrefixLen"),
            ("cniSocket = \"\"", "cniSocket"),
            ("cniSocket = \"run/cni.sock\"", "cniSocket"),
            ("cniSocket = \"/run/contiv/\"", "cniSocket"),
            (&format!("cniSocket = \"/{}\"", "s".repeat(120)), "cniSocket"),
            ("stateDir = \"\"", "stateDir"),
            ("storeDir = \"store\"", "storeDir"),
            ("bpfPinDir = \"\"", "bpfPinDir"),
            ("hostProcDir = \"hostproc\"", "hostProcDir"),
            ("nodeName = \"a/b\"", "nodeName"),
            ("slowpathHostIfname = \"a:b\"", "slowpathHostIfname"),
            ("[dns]\nnameservers = [\"dns.example\"]", "dns.nameservers"),
            ("etcdEndpoints = [\"https://e:2379\"]", "TLS"),
            ("etcdEndpoints = [\"http://e:2379\"]\n[etcdTls]\ncaFile = \"/ca.pem\"", "http://"),
            ("etcdEndpoints = [\"https://e:2379\"]\n[etcdTls]\ncertFile = \"/c.pem\"", "caFile"),
            ("etcdEndpoints = [\"https://e:2379\"]\n[etcdTls]\ncaFile = \"/ca\"\ncertFile = \"/c\"", "key"),
            ("[etcdTls]\ncaFile = \"/ca\"\nbogus = 1", "bogus"),
            ("[vpp]\napiSocket = \"/run/vpp/api.sock\"", "uplink"),
            ("[services]\nhealthzAddress = \"10256\"", "healthzAddress"),
            ("[services]\nhealthzTimeout = 0", "healthzTimeout"),
            ("[services]\nconntrackEntries = 1023", "conntrackEntries 1023"),
            ("[services]\nfragmentEntries = 1023", "fragmentEntries 1023"),
            ("[services]\nfragmentEntries = 1048577", "fragmentEntries 1048577"),
            ("[services]\nconnectedUdpSockets = 15", "connectedUdpSockets 15"),
            ("[services]\nconnectedUdpSockets = 4194305", "connectedUdpSockets 4194305"),
            ("[services]\nnodePortAddresses = [\"192.168.0.0\"]", "\"192.168.0.0\" is not a CIDR"),
            ("[services]\nnodePortAddresses = [\"primary\", \"10.0.0.0/8\"]", "\"primary\" must be the only"),
            ("[services]\nnodePortAddresses = \"primary\"", "nodePortAddresses"),
        ] {
            let err = AgentConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: error {err:?} should name {needle}");
        }
    }

    #[test]
    fn boundary_values_are_accepted() {
        for text in [
            "podSubnet = \"10.1.0.0/16\"",
            "podSubnet = \"10.1.1.0/30\"",
            "podSubnetCIDR = \"10.0.0.0/8\"\npodPrefixLen = 16",
            "cniSocket = \"/run/c.sock\"",
            "[services]\nconntrackEntries = 1024\nfragmentEntries = 1024\nconnectedUdpSockets = 16",
            "[services]\nconntrackEntries = 16777216\nfragmentEntries = 1048576\nconnectedUdpSockets = 4194304",
        ] {
            AgentConfig::from_toml(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        let off = AgentConfig::from_toml("[services]\nhealthzAddress = \"\"").unwrap();
        assert_eq!(off.services.healthz_addr(), None, "an empty address turns the server off");
        let v6 = AgentConfig::from_toml("[services]\nhealthzAddress = \"[::]:10256\"\nhealthzTimeout = 1").unwrap();
        assert_eq!(v6.services.healthz_addr(), Some("[::]:10256".parse().unwrap()));
    }

    #[test]
    fn node_port_addresses_read_as_kube_proxy_reads_them() {
        let read = |text: &str| AgentConfig::from_toml(text).unwrap().services.node_ports().unwrap();
        assert_eq!(read(""), NodePortAddresses::All);
        assert!(read("").takes_loopback(), "by default the node's 127.0.0.1:<nodePort> is served");
        assert_eq!(read("[services]\nnodePortAddresses = [\"primary\"]"), NodePortAddresses::Primary);
        assert!(!read("[services]\nnodePortAddresses = [\"primary\"]").takes_loopback());
        // Host bits are dropped; IPv6 CIDRs are accepted and take no IPv4 address.
        let cidrs = read("[services]\nnodePortAddresses = [\"192.168.100.9/28\", \"2001:db8::/32\"]");
        assert_eq!(
            cidrs,
            NodePortAddresses::Cidrs(vec!["192.168.100.0/28".parse().unwrap(), "2001:db8::/32".parse().unwrap()])
        );
        assert!(cidrs.takes(Ipv4Addr::new(192, 168, 100, 11), false));
        assert!(!cidrs.takes(Ipv4Addr::new(192, 168, 100, 111), true));
        assert!(!cidrs.takes_loopback());
        assert!(read("[services]\nnodePortAddresses = [\"127.0.0.0/8\"]").takes_loopback());
        // A zero CIDR, or IPv6 CIDRs alone, take every address (kube-proxy's matchAll).
        assert_eq!(read("[services]\nnodePortAddresses = [\"10.0.0.0/8\", \"0.0.0.0/0\"]"), NodePortAddresses::All);
        assert_eq!(read("[services]\nnodePortAddresses = [\"2001:db8::/32\"]"), NodePortAddresses::All);
    }

    #[test]
    fn vpp_uplink_reads_the_vpp_section() {
        let c = AgentConfig::from_toml(
            r#"
            uplink = "vpp"
            [vpp]
            apiSocket = "/run/vpp/contiv.sock"
            uplinkPci = "0000:00:08.0"
            uplinkAddress = "192.168.16.1/24"
            uplinkGateway = "192.168.16.254"
            workerCores = [1]
            "#,
        )
        .unwrap();
        assert_eq!(c.uplink, Uplink::Vpp);
        assert_eq!(c.vpp.api_socket, PathBuf::from("/run/vpp/contiv.sock"));
        assert_eq!(c.vpp.uplink_pci.as_deref(), Some("0000:00:08.0"));
        assert_eq!(c.vpp.worker_cores, vec![1]);
        let printed = format!("{c:#?}");
        assert!(printed.contains("Vpp") && printed.contains("0000:00:08.0"), "check-config shows it: {printed}");
        // Kernel mode stays the default, and a [vpp] table alone is refused rather than ignored.
        assert_eq!(AgentConfig::from_toml("").unwrap().uplink, Uplink::Kernel);
        assert!(AgentConfig::from_toml("[vpp]\nuplinkPci = \"0000:00:08.0\"").is_err());
    }

    #[test]
    fn vpp_uplink_refuses_kernel_wire_settings_and_bad_vpp_values() {
        for (text, needle) in [
            ("uplink = \"vpp\"\nnodeIP = \"192.0.2.1\"", "nodeIP"),
            ("uplink = \"vpp\"\nmasquerade = false", "masquerade"),
            ("uplink = \"vpp\"\nvxlanVni = 5", "vxlanVni"),
            ("uplink = \"vpp\"\n[vpp]\nuplinkPci = \"eth0\"", "uplinkPci"),
            ("uplink = \"vpp\"\n[vpp]\nnoSuchKey = 1", "noSuchKey"),
            (
                "uplink = \"vpp\"\npodSubnetCIDR = \"172.16.0.0/12\"\npodPrefixLen = 24",
                "hostInterconnectSubnet 172.30.255.0/30 overlaps the pods' 172.16.0.0/12",
            ),
        ] {
            let err = AgentConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: error {err:?} should name {needle}");
        }
    }

    #[test]
    fn etcd_tls_and_vpp_uplink_are_read() {
        let c = AgentConfig::from_toml(
            r#"
            etcdEndpoints = ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"]
            uplink = "vpp"
            [etcdTls]
            caFile = "/etc/contiv/etcd-tls/ca.crt"
            certFile = "/etc/contiv/etcd-tls/tls.crt"
            keyFile = "/etc/contiv/etcd-tls/tls.key"
            [vpp]
            apiSocket = "/run/vpp/api.sock"
            "#,
        )
        .unwrap();
        let tls = c.etcd_tls.clone().expect("tls");
        assert_eq!(tls.ca_file, PathBuf::from("/etc/contiv/etcd-tls/ca.crt"));
        assert_eq!(tls.key_file, Some(PathBuf::from("/etc/contiv/etcd-tls/tls.key")));
        assert_eq!(c.uplink, Uplink::Vpp);
        assert_eq!(c.vpp.stats_socket, PathBuf::from("/run/vpp/stats.sock"));
        let store = c.store_config();
        assert_eq!(store.etcd_tls, Some(tls));
        assert_eq!(store.embedded_path, c.store_dir);
        assert_eq!(AgentConfig::from_toml("").unwrap().uplink, Uplink::Kernel);
    }

    #[test]
    fn allocated_subnet_applies_unless_fixed() {
        let c = AgentConfig::from_toml("").unwrap();
        assert!(!c.pod_subnet_fixed);
        assert_eq!(c.store_dir, PathBuf::from("/var/lib/contiv/store"));
        let c = c.with_allocated_subnet("10.1.7.0/24".parse().unwrap()).unwrap();
        assert_eq!(c.pod_subnet.to_string(), "10.1.7.0/24");
        assert_eq!(c.gateway, Ipv4Addr::new(10, 1, 7, 1));
        let fixed = AgentConfig::from_toml("podSubnet = \"10.9.0.0/24\"").unwrap();
        let fixed = fixed.with_allocated_subnet("10.1.7.0/24".parse().unwrap()).unwrap();
        assert_eq!(fixed.pod_subnet.to_string(), "10.9.0.0/24");
    }

    #[test]
    fn mac_round_trip() {
        let mac = parse_mac("02:fe:00:00:00:01").unwrap();
        assert_eq!(format_mac(&mac), "02:fe:00:00:00:01");
        assert!(parse_mac("02:fe:00:00:00").is_none());
        assert!(parse_mac("02:fe:00:00:00:01:02").is_none());
    }
}
