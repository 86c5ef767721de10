//! Everything both sides of the datapath agree on: map names, pin layout,
//! limits and the `#[repr(C)]` types stored in the maps.
//!
//! Rules for the types here: `#[repr(C)]`, `Copy`, padding written out as
//! explicit fields, no `bool` (use `u8`/`u32` flags). The eBPF crate reads them
//! on the kernel side; user space gets `aya::Pod` with the `user` feature.
#![no_std]

/// Default directory (on bpffs) under which the agent pins every map.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/contiv";

/// Map names. The ELF symbol, the pinned file name and the BTF name are all this string.
pub mod map_names {
    /// Pod IPv4 address -> [`super::PodEndpoint`]: where to deliver traffic for a local pod.
    pub const PODS: &str = "PODS";
    /// Host-side veth ifindex -> [`super::PodEndpoint`]: who may send from that interface.
    pub const POD_IFACES: &str = "POD_IFACES";
    /// Pod IPv4 address -> [`super::PodCounters`] (per CPU).
    pub const POD_COUNTERS: &str = "POD_COUNTERS";
    /// Single entry array: [`super::DatapathConfig`].
    pub const CONFIG: &str = "CONFIG";
    /// Slow-path port rx queue -> AF_XDP socket served by the vswitch.
    pub const SLOWPATH_XSKS: &str = "SLOWPATH_XSKS";
    /// Slow-path port rx queue -> AF_XDP socket of VPP's af_xdp interface (`uplink = "vpp"`).
    /// The name is the one libbpf/libxdp look up in the XDP program already attached to an
    /// interface: VPP's af_xdp plugin registers its own sockets here (see `xdp_to_vpp`).
    pub const VPP_XSKS: &str = "xsks_map";
    /// [`super::SlowPortCounters`] (per CPU, one entry) for the slow-path port programs.
    pub const SLOWPORT_COUNTERS: &str = "SLOWPORT_COUNTERS";
    /// LPM trie: remote pod subnet or remote node address -> [`super::RemoteRoute`] (the node
    /// that owns it, reached over the overlay).
    pub const REMOTE_ROUTES: &str = "REMOTE_ROUTES";
    /// [`super::OverlayCounters`] (per CPU, one entry) for the overlay device's programs.
    pub const OVERLAY_COUNTERS: &str = "OVERLAY_COUNTERS";
    /// Map name -> layout version of the pinned map ([`super::schema`]).
    pub const SCHEMA: &str = "SCHEMA";
    /// Service frontend (address, port, protocol) -> [`super::SvcFrontend`].
    pub const SVC_FRONTENDS: &str = "SVC_FRONTENDS";
    /// (service port id, ordinal) -> [`super::SvcBackend`]; local backends first.
    pub const SVC_BACKENDS: &str = "SVC_BACKENDS";
    /// (service port id, client) -> [`super::SvcAffinity`]: sessionAffinity ClientIP (LRU).
    pub const SVC_AFFINITY: &str = "SVC_AFFINITY";
    /// [`super::SvcSlotKey`] (service port id, backend, set) -> the backend's ordinal in
    /// SVC_BACKENDS: where a client's affinity finds its backend again after endpoints came
    /// or went and the ordinals moved.
    pub const SVC_BACKEND_SLOTS: &str = "SVC_BACKEND_SLOTS";
    /// (service port id, source prefix) LPM trie: loadBalancerSourceRanges.
    pub const SVC_SOURCE_RANGES: &str = "SVC_SOURCE_RANGES";
    /// Service port id -> [`super::SvcCounters`] (per CPU).
    pub const SVC_COUNTERS: &str = "SVC_COUNTERS";
    /// (socket cookie, backend) -> [`super::SockRevNat`]: what a balanced socket was asked
    /// for, so recvmsg() shows an unconnected UDP socket's service address (LRU).
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    /// Socket cookie -> [`super::SockUdpBackend`]: the service port and backend each
    /// connected UDP socket of the node was balanced to, so the agent can abort it when
    /// that backend leaves the service. Removed when the socket is connected again or
    /// closed (`sock_release`): it holds live sockets only and evicts none.
    pub const SOCK_UDP_BACKEND: &str = "SOCK_UDP_BACKEND";
    /// Per CPU, one [`super::SockCounters`]: what the socket programs could not record.
    pub const SOCK_COUNTERS: &str = "SOCK_COUNTERS";
    /// Socket storage: [`super::SockOrigin`], the service a connected socket's connect()
    /// asked for, so getpeername()/recvmsg() show it. It lives and dies with the socket:
    /// no capacity to outgrow, and a socket that has none (an accepted one, say) costs one
    /// pointer test. (SOCK_REVNAT keeps unconnected UDP, whose sendmsg() may name a
    /// different service every time.)
    pub const SOCK_ORIGIN: &str = "SOCK_ORIGIN";
    /// Network-namespace cookie -> 1 for the namespaces this node's socket programs serve
    /// (its pods and the node itself); others' sockets are left alone.
    pub const NODE_NETNS: &str = "NODE_NETNS";
    /// Addresses of the cluster's nodes (this one and the others) -> [`super::NodeAddr`]:
    /// NodePorts are served on them.
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// Connection tracking for services and policy: [`super::CtKey`] -> [`super::CtEntry`]
    /// (LRU). A NAT'ed flow has two entries, the original direction and the reply.
    pub const CT: &str = "CT";
    /// Backends removed a short while ago: (address, port, protocol) -> 1. Connections to
    /// them are refused by the slow path instead of hanging.
    pub const DEAD_BACKENDS: &str = "DEAD_BACKENDS";
    /// The cluster IPs of programmed services: [`super::Ipv4Key`] -> 1. A connection from
    /// this node to one of them on a port no frontend serves is refused at once (as
    /// kube-proxy's nftables mode rejects traffic to undefined ports of ClusterIPs), not
    /// routed away to time out.
    pub const SVC_CLUSTER_IPS: &str = "SVC_CLUSTER_IPS";
    /// NetworkPolicy (LPM trie): (local pod, direction, peer prefix) -> [`super::PolicyPorts`],
    /// what the pod may exchange with the peers of that prefix. Consulted only for pods
    /// isolated in that direction ([`super::pod_flags`]) and only on a flow's first packet.
    pub const POLICY: &str = "POLICY";
    /// Ring buffer of [`super::MonitorEvent`]s: every counted drop (and, with
    /// [`super::config_flags::MONITOR_FLOWS`], allowed new flows), within the per-CPU rate of
    /// [`super::DatapathConfig::monitor_rate`]. The agent reads it (`netctl monitor`).
    pub const MONITOR_EVENTS: &str = "MONITOR_EVENTS";
    /// Per CPU, [`super::MonitorBucket`] per [`super::monitor_bucket`]: the token buckets
    /// that bound the event rate, with what they let through, held back and lost.
    pub const MONITOR_RATE: &str = "MONITOR_RATE";
    /// Per CPU, one [`super::TraceRecord`]: the decisions `tc_from_pod` (or, for the second
    /// hop, `tc_from_overlay`) took for a packet the agent ran through it with
    /// `BPF_PROG_TEST_RUN` in trace mode (`netctl trace`).
    pub const TRACE_STEPS: &str = "TRACE_STEPS";
    /// Fragmented datagrams in flight (LRU): [`super::FragKey`] -> [`super::FragHead`], the
    /// ports a datagram's first fragment carried, which its later fragments (no transport
    /// header of their own) use for conntrack, policy and NAT.
    pub const FRAGS: &str = "FRAGS";
}

/// Layout versions of the pinned maps. A map's version changes whenever its key, value or
/// type changes; an agent that finds a pinned map of another version migrates it
/// make-before-break (see the agent's datapath module). Maps pinned by agents that predate
/// the `SCHEMA` map are version 1.
pub mod schema {
    use super::map_names::*;

    /// Every pinned map with its current layout version.
    pub const LAYOUTS: &[(&str, u32)] = &[
        (PODS, 1),
        (POD_IFACES, 1),
        // v2: tunnel, host and from-tunnel counters appended. v3: `drop_fragment` appended.
        // v4: `drop_no_route` and `drop_overlay_port` appended.
        (POD_COUNTERS, 4),
        // v2: pod subnet, overlay device, VNI and node address appended. (The trailing padding
        // became `flags` without a layout change: an older agent's zeros mean kernel mode.
        // Likewise the padding after the gateway MAC became `overlay_port`: zero means the
        // overlay device builds the outer headers.)
        // v3: monitor rate and burst appended. v4: the cluster's pod range and the UDP
        // stickiness of the node's sockets appended.
        (CONFIG, 4),
        (SLOWPATH_XSKS, 1),
        (VPP_XSKS, 1),
        (SLOWPORT_COUNTERS, 1),
        (REMOTE_ROUTES, 1),
        // v2: `rx_fragment` appended.
        (OVERLAY_COUNTERS, 2),
        (SCHEMA, 1),
        (SVC_FRONTENDS, 1),
        (SVC_BACKENDS, 1),
        (SVC_AFFINITY, 1),
        (SVC_BACKEND_SLOTS, 1),
        (SVC_SOURCE_RANGES, 1),
        // v2: `snat_exhausted` appended.
        (SVC_COUNTERS, 2),
        (SOCK_REVNAT, 1),
        (SOCK_ORIGIN, 1),
        (SOCK_UDP_BACKEND, 1),
        (SOCK_COUNTERS, 1),
        (NODE_NETNS, 1),
        (NODE_ADDRS, 1),
        (CT, 1),
        (DEAD_BACKENDS, 1),
        (SVC_CLUSTER_IPS, 1),
        (POLICY, 1),
        (MONITOR_EVENTS, 1),
        (MONITOR_RATE, 1),
        (TRACE_STEPS, 1),
        (FRAGS, 1),
    ];

    /// The current layout version of a map (0 if the name is unknown).
    pub fn layout(name: &str) -> u32 {
        LAYOUTS.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v)
    }
}

/// A key of the `SCHEMA` map: a map name, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MapName {
    pub name: [u8; 32],
}

impl MapName {
    /// The key for `name` (truncated to 31 bytes).
    pub fn new(name: &str) -> Self {
        let mut key = Self::default();
        let n = name.len().min(31);
        key.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        key
    }
}

/// Program names (function names in the eBPF object).
pub mod program_names {
    /// TC ingress on each pod's host-side veth: frames sent by a pod.
    pub const FROM_POD: &str = "tc_from_pod";
    /// TC ingress on the host end of the slow-path port: frames the vswitch sends to pods.
    pub const FROM_VSWITCH: &str = "tc_from_vswitch";
    /// XDP on the vswitch end of the slow-path port: steers frames into the AF_XDP socket.
    pub const TO_VSWITCH: &str = "xdp_to_vswitch";
    /// XDP on the vswitch end of the slow-path port in `uplink = "vpp"` mode: steers frames
    /// into the AF_XDP socket VPP's af_xdp interface registered in `xsks_map`.
    pub const TO_VPP: &str = "xdp_to_vpp";
    /// TC ingress on the overlay (VXLAN) device: decapsulated traffic from other nodes.
    pub const FROM_OVERLAY: &str = "tc_from_overlay";
    /// TC egress on the overlay device: gives host-originated packets their tunnel key.
    pub const TO_OVERLAY: &str = "tc_to_overlay";
    /// TC ingress on the uplink: NodePort, externalIP and load-balancer traffic from outside.
    pub const FROM_UPLINK: &str = "tc_from_uplink";
    /// TC egress on the uplink: answers of this node's own (hostNetwork) backends to
    /// clients outside get their frontend back as source.
    pub const TO_UPLINK: &str = "tc_to_uplink";
    /// TC egress on each pod's host-side veth: answers of this node's own (hostNetwork)
    /// backends to a pod whose UDP the packet path balanced get their frontend back.
    pub const TO_POD: &str = "tc_to_pod";
    /// cgroup connect4 at the cgroup2 root: socket-level service balancing.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    /// cgroup sendmsg4: socket-level balancing of unconnected UDP (the node's own sockets).
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// cgroup recvmsg4: shows the service address as the source of UDP answers.
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup getpeername4: shows the service address as a balanced socket's peer.
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// cgroup connect6, recvmsg6 and getpeername6: the same for IPv6 sockets reaching IPv4
    /// addresses as IPv4-mapped ones (`::ffff:a.b.c.d`: Java's and .NET's default). Their
    /// unconnected UDP datagrams take the IPv4 path, so sendmsg4 balances those.
    pub const SOCK_CONNECT6: &str = "sock_connect6";
    pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";
    /// cgroup sock_release: forgets a closing UDP socket's SOCK_UDP_BACKEND entry.
    pub const SOCK_RELEASE: &str = "sock_release";
}

/// Maximum number of pods on one node (sizes PODS, POD_IFACES, POD_COUNTERS).
pub const MAX_PODS: u32 = 4096;
/// Maximum rx queues of the slow-path port served by AF_XDP sockets.
pub const MAX_SLOWPATH_QUEUES: u32 = 64;
/// Maximum entries of REMOTE_ROUTES (a pod subnet and an address per remote node).
pub const MAX_REMOTE_ROUTES: u32 = 16384;
/// Default sizes of the service maps (the agent may size them from its config).
pub const MAX_SVC_FRONTENDS: u32 = 65536;
pub const MAX_SVC_BACKENDS: u32 = 262144;
pub const MAX_SVC_AFFINITY: u32 = 65536;
pub const MAX_SOCK_REVNAT: u32 = 262144;
/// Connected UDP sockets of one node balanced to a service at once (allocated as used;
/// the agent may size it from its config).
pub const MAX_SOCK_UDP_BACKEND: u32 = 65536;
pub const MAX_CT: u32 = 262144;
pub const MAX_NODE_ADDRS: u32 = 16384;
pub const MAX_DEAD_BACKENDS: u32 = 16384;
/// Entries of SVC_SOURCE_RANGES: one per loadBalancerSourceRange of a service port.
pub const MAX_SVC_SOURCE_RANGES: u32 = 16384;
/// Fragmented datagrams whose later fragments the datapath can still place (LRU): an entry
/// is needed only while the datagram's fragments pass, a few microseconds.
pub const MAX_FRAGS: u32 = 8192;
/// Maximum entries of the POLICY trie (not preallocated: memory follows the entries).
pub const MAX_POLICY_ENTRIES: u32 = 1 << 20;
/// Port ranges one POLICY entry holds (after the agent merged overlapping ones).
pub const MAX_POLICY_PORT_RANGES: usize = 32;

/// An IPv4 address as it appears on the wire (network byte order), as a map key.
/// Shown by bpftool as four bytes, e.g. `[10,1,1,2]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ipv4Key {
    pub addr: [u8; 4],
}

impl Ipv4Key {
    pub const fn new(addr: [u8; 4]) -> Self {
        Self { addr }
    }
}

/// A pod attached to this node, as the datapath needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodEndpoint {
    /// The pod's IPv4 address (network byte order).
    pub ip: [u8; 4],
    /// ifindex of the host-side veth of the pod (in the node's namespace).
    pub host_ifindex: u32,
    /// MAC address of the pod's own interface (inside the pod).
    pub mac: [u8; 6],
    /// [`pod_flags`] bits.
    pub flags: u8,
    pub _pad: u8,
}

/// Bits of [`PodEndpoint::flags`].
pub mod pod_flags {
    /// What the pod sends is shaped (a `tbf` qdisc on the pod's own interface).
    pub const EGRESS_LIMITED: u8 = 1;
    /// What the pod receives is shaped (a `tbf` qdisc on its host veth): the fast path hands
    /// packets for it to that veth's egress instead of straight into the pod.
    pub const INGRESS_LIMITED: u8 = 2;
    /// NetworkPolicy isolates the pod for ingress: a new flow into it needs a POLICY entry
    /// for its source (traffic from the pod's own node never reaches this check).
    pub const INGRESS_ISOLATED: u8 = 4;
    /// NetworkPolicy isolates the pod for egress: a new flow out of it needs a POLICY entry
    /// for its (post-DNAT) destination.
    pub const EGRESS_ISOLATED: u8 = 8;
    /// Both isolation bits.
    pub const ISOLATION: u8 = INGRESS_ISOLATED | EGRESS_ISOLATED;
}

/// Per-pod counters, counted on frames the pod sends (and on slow-path replies to it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodCounters {
    /// Frames forwarded by the fast path straight into another pod.
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    /// Frames steered to the slow path (vswitch).
    pub slow_packets: u64,
    pub slow_bytes: u64,
    /// Frames the vswitch sent back to this pod.
    pub from_slow_packets: u64,
    pub from_slow_bytes: u64,
    /// Dropped: source IPv4 address is not the pod's own.
    pub drop_spoofed_ip: u64,
    /// Dropped: source MAC address is not the pod's own.
    pub drop_spoofed_mac: u64,
    /// Dropped: frame too short / malformed header.
    pub drop_malformed: u64,
    /// Dropped: TTL would reach zero when routed.
    pub drop_ttl_exceeded: u64,
    /// Dropped: a slow-path frame could not be handed over (no slow-path port yet).
    pub drop_no_slowpath: u64,
    /// Frames encapsulated to another node (its pods or the node itself) over the overlay.
    pub tunnel_packets: u64,
    pub tunnel_bytes: u64,
    /// Frames handed to the node's own stack: the host, node addresses, outside the cluster.
    pub host_packets: u64,
    pub host_bytes: u64,
    /// Frames received from other nodes over the overlay and delivered to this pod.
    pub from_tunnel_packets: u64,
    pub from_tunnel_bytes: u64,
    /// Dropped by the service stage: no local backend under a Local traffic policy, or a
    /// rewrite the kernel refused.
    pub drop_service: u64,
    /// Dropped by NetworkPolicy: a new flow into this pod its ingress rules do not allow
    /// (counted on the receiving pod).
    pub drop_policy_ingress: u64,
    /// Dropped by NetworkPolicy: a new flow out of this pod its egress rules do not allow.
    pub drop_policy_egress: u64,
    /// Dropped: a later fragment of a datagram from this pod whose first fragment this node
    /// did not pass (refused, not sent yet, or forgotten), so its flow is unknown.
    pub drop_fragment: u64,
    /// Dropped: for an address of the cluster's pod range that no node owns (a node that
    /// left, or is not known here yet).
    pub drop_no_route: u64,
    /// Dropped: a tunnel packet of the pod's own, which a node could take as its own: UDP
    /// to the overlay's port anywhere but another pod (VXLAN), or IPIP, SIT or GRE to a
    /// node's address.
    pub drop_overlay_port: u64,
}

/// Node-wide datapath configuration written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// The pods' default gateway (network byte order).
    pub gateway_ip: [u8; 4],
    /// ifindex of the host end of the slow-path port (0 = none yet).
    pub slowport_ifindex: u32,
    /// MAC the pods resolve the gateway to; source MAC of frames the fast path delivers.
    pub gateway_mac: [u8; 6],
    /// UDP port of the overlay (host byte order): pods' own UDP to it is dropped outside
    /// the cluster's pod range, and the programs build outer headers with it unless
    /// `DEVICE_ENCAP`; 0 (an older agent's padding): pods' packets go through the overlay
    /// device. With `VPP_UPLINK`, VPP's tunnels' port.
    pub overlay_port: u16,
    /// This node's pod subnet (network and mask, network byte order): an address in it that
    /// is no local pod is an unknown destination (slow path), never the host's.
    pub pod_subnet: [u8; 4],
    pub pod_mask: [u8; 4],
    /// ifindex of the overlay (flow-based VXLAN) device; 0 = no overlay.
    pub overlay_ifindex: u32,
    /// VXLAN network identifier of the overlay.
    pub vni: u32,
    /// This node's address on the underlay (the tunnel endpoint other nodes send to).
    pub node_ip: [u8; 4],
    /// ifindex of the uplink: replies to clients outside the cluster leave by it.
    pub uplink_ifindex: u32,
    /// [`config_flags`] bits.
    pub flags: u32,
    /// Monitor events each CPU may emit per second, per [`monitor_bucket`] (0: none at all).
    /// Events beyond it are not emitted, only counted ([`MonitorBucket::suppressed`]); the
    /// drop counters are never affected.
    pub monitor_rate: u32,
    /// Events a CPU may emit at once after a quiet spell (the bucket's depth).
    pub monitor_burst: u32,
    /// The cluster's pod range (`podSubnetCIDR`: network and mask, network byte order):
    /// an address in it that no route names is no pod yet, never a place outside the
    /// cluster. All zero (an older agent's config): every address counts as in it.
    pub cluster_pod_net: [u8; 4],
    pub cluster_pod_mask: [u8; 4],
    /// How long an unconnected UDP socket of the node keeps its backend for a service
    /// address while it sends nothing there (seconds; the conntrack UDP timeout). 0: for
    /// as long as the backend serves.
    pub udp_sticky_s: u32,
    pub _pad2: u32,
}

/// MTU of the slow-path port's veth pair. A frame the datapath hands to the built-in
/// vswitch that is bigger (a jumbo pod interface, a GSO packet too big for the overlay)
/// is cut to this size plus its Ethernet header first: the veth would drop it whole, and
/// the vswitch answers from the headers (refusals, "fragmentation needed"), with the IPv4
/// total length still the original's. In VPP mode nothing is cut: VPP forwards what it
/// gets, so the pod MTU is held to this size instead.
pub const SLOW_PORT_MTU: u32 = 1500;

/// Bits of [`DatapathConfig::flags`].
pub mod config_flags {
    /// `uplink = "vpp"`: VPP owns the wire. Everything a pod sends that is not for a local
    /// pod (other nodes' pods, node addresses, the host, the outside) goes to the slow-path
    /// port, whose vswitch end is VPP's af_xdp interface; the kernel overlay and the host
    /// stack are not used for pod traffic.
    pub const VPP_UPLINK: u32 = 1;
    /// Monitor allowed new flows too (one event per flow's first packet, within the flow
    /// bucket's rate). Off by default: the fast path then never reaches the monitor.
    pub const MONITOR_FLOWS: u32 = 2;
    /// `[services] nodePortAddresses` leaves out the loopback address: the node's own
    /// connections to `127.0.0.1:<nodePort>` are not balanced (zero, as older agents write
    /// it: they are, as kube-proxy's iptables mode serves localhost NodePorts).
    pub const NO_LOOPBACK_NODE_PORTS: u32 = 4;
    /// `overlayEncap = "device"`: the overlay device builds the outer headers of pods'
    /// packets for other nodes (`overlay_port` still names the overlay's port, whose UDP
    /// pods may not send to node addresses). An older agent wrote port 0 instead.
    pub const DEVICE_ENCAP: u32 = 8;
}

/// Where REMOTE_ROUTES sends a prefix: the node that owns it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RemoteRoute {
    /// The owning node's underlay address (network byte order): the tunnel's remote end.
    pub node_ip: [u8; 4],
    /// [`route_flags`] bits.
    pub flags: u32,
}

/// Bits of [`RemoteRoute::flags`].
pub mod route_flags {
    /// The prefix is the node's own address (not its pod subnet).
    pub const NODE_ADDRESS: u32 = 1;
}

/// Counters of the overlay device's programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OverlayCounters {
    /// Decapsulated frames delivered to a local pod.
    pub rx_delivered: u64,
    /// Decapsulated frames for this node itself, handed to its stack.
    pub rx_to_host: u64,
    /// Dropped: inner source neither the sending node nor one of its pods (spoofed).
    pub rx_spoofed: u64,
    /// Dropped: inner destination neither a local pod nor this node.
    pub rx_no_destination: u64,
    /// Dropped: malformed or not IPv4, or TTL exhausted.
    pub rx_malformed: u64,
    /// Host-originated packets given a tunnel key.
    pub tx_host_encapsulated: u64,
    /// Dropped: host-originated packet to a destination no node owns.
    pub tx_no_route: u64,
    /// Dropped: a later fragment whose first fragment this node did not pass (refused, not
    /// arrived yet, or forgotten), so its flow is unknown.
    pub rx_fragment: u64,
}

/// Counters of the slow-path port's own programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SlowPortCounters {
    /// Frames handed to an AF_XDP socket.
    pub to_vswitch_packets: u64,
    /// Frames dropped because no AF_XDP socket serves the queue.
    pub to_vswitch_no_socket: u64,
    /// Frames from the vswitch delivered to a local pod.
    pub from_vswitch_delivered: u64,
    /// Frames from the vswitch for which no local pod was found.
    pub from_vswitch_no_pod: u64,
}

/// A service frontend: where clients reach a service port. `port` in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SvcKey {
    /// The frontend address (network byte order); 0.0.0.0 = every node address (NodePort).
    pub ip: [u8; 4],
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub _pad: u8,
}

/// What a frontend leads to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcFrontend {
    /// The service port's id (keys its backends, affinity, counters, conntrack).
    pub svc_id: u32,
    /// The Cluster set: ordinals `0..count` of SVC_BACKENDS.
    pub count: u16,
    /// The Local set: ordinals `SVC_LOCAL_BASE..SVC_LOCAL_BASE + local_count`.
    pub local_count: u16,
    /// [`svc_flags`].
    pub flags: u32,
    /// sessionAffinity ClientIP timeout in seconds (with [`svc_flags::AFFINITY`]).
    pub affinity_timeout_s: u32,
}

/// Bits of [`SvcFrontend::flags`].
pub mod svc_flags {
    /// A ClusterIP: internal traffic (internalTrafficPolicy applies).
    pub const CLUSTER_IP: u32 = 1;
    /// A NodePort (keyed on 0.0.0.0): served on every node address.
    pub const NODE_PORT: u32 = 2;
    /// An externalIP or a load-balancer ingress IP.
    pub const EXTERNAL_IP: u32 = 4;
    /// externalTrafficPolicy Local: traffic from outside uses only local backends.
    pub const ETP_LOCAL: u32 = 8;
    /// internalTrafficPolicy Local: ClusterIP traffic uses only local backends.
    pub const ITP_LOCAL: u32 = 16;
    /// sessionAffinity ClientIP.
    pub const AFFINITY: u32 = 32;
    /// loadBalancerSourceRanges restrict who may connect (SVC_SOURCE_RANGES).
    pub const SOURCE_RANGES: u32 = 64;
}

/// Ordinal of the first backend of a service port's Local set (its endpoints on this
/// node, as externalTrafficPolicy / internalTrafficPolicy Local use them): the Local set is
/// chosen on its own (ready local endpoints, else serving-and-terminating local ones), so
/// it is stored apart from the Cluster set at ordinals `0..count`.
pub const SVC_LOCAL_BASE: u32 = 1 << 31;

/// One backend of a service port (`port` in host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SvcBackendKey {
    pub svc_id: u32,
    pub ordinal: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcBackend {
    pub ip: [u8; 4],
    pub port: u16,
    /// 1 when the backend runs on this node.
    pub local: u8,
    pub _pad: u8,
}

/// Where a backend sits in a service port's set (`port` in host byte order): the key of
/// SVC_BACKEND_SLOTS, whose value is the ordinal.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SvcSlotKey {
    pub svc_id: u32,
    pub ip: [u8; 4],
    pub port: u16,
    /// 1 for the Local set (ordinals from [`SVC_LOCAL_BASE`]), 0 for the Cluster set.
    pub local_set: u8,
    pub _pad: u8,
}

impl SvcSlotKey {
    /// The slot key of the backend `b` at `k`.
    pub const fn of(k: &SvcBackendKey, b: &SvcBackend) -> Self {
        SvcSlotKey { svc_id: k.svc_id, ip: b.ip, port: b.port, local_set: (k.ordinal >= SVC_LOCAL_BASE) as u8, _pad: 0 }
    }
}

/// Session affinity: which backend a client was given, and when last.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SvcAffinityKey {
    pub svc_id: u32,
    pub _pad: u32,
    /// The client: its IPv4 address (packet path) or its network namespace's cookie
    /// (socket path: one namespace = one pod = one client IP).
    pub client: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcAffinity {
    pub last_used_ns: u64,
    pub ordinal: u32,
    pub ip: [u8; 4],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A loadBalancerSourceRanges prefix of a service port (LPM key data after the length).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcSourceRange {
    /// Big-endian service port id, so the trie matches it as a full prefix.
    pub svc_id_be: [u8; 4],
    pub ip: [u8; 4],
}

/// Per service port, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcCounters {
    /// Connections (sockets) and flows (packet path) given a backend.
    pub connections: u64,
    /// Refused or dropped: no usable backend.
    pub no_backend: u64,
    /// Dropped: source outside loadBalancerSourceRanges.
    pub source_denied: u64,
    /// Dropped: a flow from outside to a backend on another node found no free source port
    /// on the node's address (layout v2).
    pub snat_exhausted: u64,
}

/// SOCK_REVNAT's key: an unconnected UDP socket of the node (`cookie`) and an address it
/// exchanged datagrams with, of a [`revnat_kind`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub ip: [u8; 4],
    pub port: u16,
    /// [`revnat_kind`] (this was padding, always 0, before sticky entries).
    pub kind: u16,
}

/// Values of [`SockRevNatKey::kind`].
pub mod revnat_kind {
    /// `ip`:`port` is a backend; the value the service address the socket sent to (shown
    /// as the source of the backend's answers).
    pub const REVERSE: u16 = 0;
    /// `ip`:`port` is a service address; the value the backend the socket's datagrams to it
    /// went to last, which its next ones go to while it stays in the service (as
    /// netfilter's conntrack keeps a UDP flow on one backend).
    pub const STICKY: u16 = 1;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevNat {
    pub ip: [u8; 4],
    pub port: u16,
    /// A sticky entry's last use, in units of 2^30 ns (about a second), wrapping; 0 in a
    /// reverse entry. (Padding, always 0, before sticky entries.)
    pub stamp: u16,
    pub svc_id: u32,
}

/// SOCK_UDP_BACKEND's value: the service port and backend a connected UDP socket was
/// balanced to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockUdpBackend {
    pub backend_ip: [u8; 4],
    pub backend_port: u16,
    pub _pad: u16,
    pub svc_id: u32,
}

/// Counters of the socket programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockCounters {
    /// Connected UDP sockets of the node balanced to a service but not noted in
    /// SOCK_UDP_BACKEND (full): the agent cannot abort them when their backend leaves.
    pub udp_untracked: u64,
}

/// SOCK_ORIGIN's value: what a connected socket's connect() was translated from and to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockOrigin {
    /// The service frontend the socket asked for (what getpeername() shows).
    pub frontend_ip: [u8; 4],
    /// The backend it was given, the socket's real peer. The storage applies only while
    /// the peer is this one: a UDP socket dissolved with `AF_UNSPEC` keeps its storage
    /// (a new connect() removes it).
    pub backend_ip: [u8; 4],
    pub frontend_port: u16,
    pub backend_port: u16,
}

/// An address of a node of the cluster: NodePorts are served on it unless
/// `nodePortAddresses` leaves it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeAddr {
    /// 1 for this node's own address.
    pub local: u8,
    /// 1: no NodePort is served on this address (`[services] nodePortAddresses` does not
    /// take it). Was padding, so an older agent's zero means served, as it was then.
    pub no_node_ports: u8,
    pub _pad: [u8; 2],
}

/// A conntrack key: one direction of a flow (`ports` in host byte order; for an ICMP
/// echo the identifier on the requester's side and the identifier plus one on the
/// responder's, so that requests and replies in one direction never share a key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct CtKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// A fragmented IPv4 datagram as its fragments show it at one hook: addresses,
/// identification (host byte order) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// What a datagram's first fragment carried (host byte order): TCP/UDP/SCTP ports, or an
/// ICMP echo's conntrack ports (see [`CtKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragHead {
    pub sport: u16,
    pub dport: u16,
}

/// One direction of a tracked flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// CLOCK_MONOTONIC ns of the last packet (refreshed at most every [`CT_TOUCH_TICKS`]).
    pub last_seen_ns: u64,
    /// Destination rewrite ([`ct_flags::DNAT`]) or source rewrite ([`ct_flags::REV_DNAT`]).
    pub nat_ip: [u8; 4],
    pub nat_port: u16,
    /// [`ct_flags`].
    pub flags: u16,
    /// The second rewrite of a doubly NAT'ed flow: source ([`ct_flags::SNAT`]) or
    /// destination ([`ct_flags::REV_SNAT`]).
    pub nat2_ip: [u8; 4],
    pub nat2_port: u16,
    /// TCP flags seen in this direction (SYN, FIN, RST, ACK), for timeouts.
    pub tcp_flags: u8,
    pub _pad: u8,
    pub svc_id: u32,
    /// Low 32 bits of jiffies when `last_seen_ns` was last refreshed: the datapath reads
    /// the clock for a flow only once this is [`CT_TOUCH_TICKS`] old (0 from an agent
    /// older than this field: the next packet refreshes).
    pub touched: u32,
}

/// Ticks between two refreshes of a flow's [`CtEntry::last_seen_ns`] (0.128 s at HZ=1000,
/// 1.28 s at HZ=100): idle times are compared in seconds.
pub const CT_TOUCH_TICKS: u32 = 128;

/// Bits of [`CtEntry::flags`].
pub mod ct_flags {
    /// Original direction: rewrite the destination to nat_ip:nat_port (a service backend).
    pub const DNAT: u16 = 1;
    /// Original direction: rewrite the source to nat2_ip:nat2_port too (hairpin, NodePort
    /// to a remote backend).
    pub const SNAT: u16 = 2;
    /// Reply direction: rewrite the source back to nat_ip:nat_port (the service frontend).
    pub const REV_DNAT: u16 = 4;
    /// Reply direction: rewrite the destination back to nat2_ip:nat2_port (the client).
    pub const REV_SNAT: u16 = 8;
    /// The client came from outside the cluster (through the uplink): replies leave by it.
    pub const FROM_UPLINK: u16 = 16;
    /// Reply direction of a flow the node's own stack delivered: into the overlay
    /// (`tc_to_overlay`), or to a pod that answers a TCP connection conntrack never saw
    /// (`tc_from_pod`); a flow the stack forwarded, perhaps after translating it (a
    /// hostPort's DNAT by the `portmap` plugin, a DNAT rule). Replies are handed back to
    /// that stack, which translates them back and routes them, instead of being forwarded
    /// past it.
    pub const VIA_HOST: u16 = 32;
    /// Any rewrite.
    pub const NAT: u16 = DNAT | SNAT | REV_DNAT | REV_SNAT;
}

/// The key of a POLICY entry (the LPM data after the prefix length): the local pod and the
/// direction are always matched in full (prefix length 64 + the peer prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PolicyKey {
    /// The local pod the rules are for (network byte order).
    pub pod: [u8; 4],
    /// [`policy_dir`]: ingress (the peer is the source) or egress (the destination).
    pub direction: u8,
    pub _pad: [u8; 3],
    /// The peer address (network byte order); matched up to the entry's peer prefix.
    pub peer: [u8; 4],
}

impl PolicyKey {
    /// Bits of the key before the peer address (always matched).
    pub const FIXED_BITS: u32 = 64;
}

/// Values of [`PolicyKey::direction`].
pub mod policy_dir {
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;
}

/// A range of ports of one protocol (host byte order, both ends included).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
    /// IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP.
    pub protocol: u8,
    pub _pad: u8,
}

/// What a POLICY entry allows with the peers of its prefix: the union of every rule of every
/// policy that selects the pod, flattened by the agent (the longest match carries it all).
/// No flag and no range: nothing (an `except` carved out of a wider block).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyPorts {
    /// [`policy_ports`] bits.
    pub flags: u16,
    /// Ranges in use, `ranges[..count]`.
    pub count: u16,
    pub ranges: [PortRange; MAX_POLICY_PORT_RANGES],
}

impl Default for PolicyPorts {
    fn default() -> Self {
        Self { flags: 0, count: 0, ranges: [PortRange::default(); MAX_POLICY_PORT_RANGES] }
    }
}

/// Bits of [`PolicyPorts::flags`].
pub mod policy_ports {
    /// Every protocol and port (a rule without ports), ICMP included.
    pub const ANY: u16 = 1;
}

/// Bytes of the `MONITOR_EVENTS` ring buffer (a power of two, whole pages): about 9,000
/// events, many times what the agent reads between two wake-ups at the highest rate.
pub const MONITOR_RING_BYTES: u32 = 512 * 1024;
/// Default of [`DatapathConfig::monitor_rate`] (events per second per CPU and bucket).
pub const MONITOR_DEFAULT_RATE: u32 = 1000;
/// Default of [`DatapathConfig::monitor_burst`].
pub const MONITOR_DEFAULT_BURST: u32 = 2000;

/// One datapath event for `netctl monitor` (`MONITOR_EVENTS`), as seen where it happened:
/// after any service translation. 48 bytes, 8-aligned (the ring buffer's record alignment).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorEvent {
    /// CLOCK_MONOTONIC ns (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// The local pod the event is about (the sender; the receiver for ingress policy, and
    /// for traffic from other nodes or outside); 0.0.0.0 when none is (overlay drops).
    pub pod: [u8; 4],
    /// ifindex of the interface the packet arrived on.
    pub ifindex: u32,
    /// IPv4 source and destination (ARP: sender and target address).
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// TCP/UDP/SCTP ports (host byte order); ICMP: type and code.
    pub sport: u16,
    pub dport: u16,
    /// IP protocol (0 for ARP and other non-IPv4 frames).
    pub proto: u8,
    /// [`monitor_kind`].
    pub kind: u8,
    /// A drop: [`drop_reason`]; a flow: [`verdict`].
    pub reason: u8,
    /// [`hook`]: the program that saw it.
    pub hook: u8,
    /// Bytes of the packet.
    pub len: u32,
    /// Ethertype of the frame (host byte order).
    pub ethertype: u16,
    /// TCP flags (0 otherwise).
    pub tcp_flags: u8,
    pub _pad: u8,
    /// A flow into the overlay: the node it was tunnelled to; else 0.0.0.0.
    pub next_hop: [u8; 4],
}

/// Values of [`MonitorEvent::kind`].
pub mod monitor_kind {
    /// A dropped packet (every drop a counter counts).
    pub const DROP: u8 = 1;
    /// The first packet of an allowed new flow (with [`super::config_flags::MONITOR_FLOWS`]).
    pub const FLOW: u8 = 2;
}

/// Why a packet was dropped ([`MonitorEvent::reason`], trace verdicts): the per-pod drop
/// counters' reasons, and the overlay's.
pub mod drop_reason {
    pub const MALFORMED: u8 = 1;
    pub const SPOOFED_MAC: u8 = 2;
    pub const SPOOFED_IP: u8 = 3;
    pub const TTL_EXCEEDED: u8 = 4;
    pub const NO_SLOWPATH: u8 = 5;
    pub const SERVICE: u8 = 6;
    pub const POLICY_INGRESS: u8 = 7;
    pub const POLICY_EGRESS: u8 = 8;
    /// From another node: the inner source is neither that node nor one of its pods.
    pub const OVERLAY_SPOOFED: u8 = 9;
    /// From another node: for neither a local pod nor this node.
    pub const NO_DESTINATION: u8 = 10;
    /// Sent from an interface the datapath does not know as a pod's (yet, or any more).
    pub const UNKNOWN_INTERFACE: u8 = 11;
    /// A later fragment of a datagram whose first fragment this node did not pass (not seen
    /// yet, dropped, or forgotten): its ports are unknown.
    pub const FRAGMENT: u8 = 12;
    /// For an address of the cluster's pod range that no node owns (a node that left, or is
    /// not known here yet): never sent on with a pod's address as source.
    pub const NO_ROUTE: u8 = 13;
    /// A tunnel packet of a pod's own, which a node could take as its own: UDP to the
    /// overlay's port anywhere but another pod (VXLAN), or IPIP, SIT or GRE to an address
    /// of a node (NODE_ADDRS: each node's registered and Node object addresses).
    pub const OVERLAY_PORT: u8 = 14;
    /// From the overlay's port with another VXLAN network identifier than the overlay's
    /// (another VXLAN user of the same port on the underlay); counted as spoofed.
    pub const OVERLAY_VNI: u8 = 15;
    /// From outside to a NodePort, externalIP or load-balancer IP whose backend is on
    /// another node: no source port on the node's address was free for the flow's reply
    /// (the SNAT range, 61000-65535, holds a flow to that backend on every port tried).
    pub const SNAT_EXHAUSTED: u8 = 16;

    /// The name the counters and metrics use for a reason.
    pub fn name(reason: u8) -> &'static str {
        match reason {
            MALFORMED => "malformed",
            SPOOFED_MAC => "spoofed_mac",
            SPOOFED_IP => "spoofed_ip",
            TTL_EXCEEDED => "ttl_exceeded",
            NO_SLOWPATH => "no_slowpath",
            SERVICE => "service",
            POLICY_INGRESS => "policy_ingress",
            POLICY_EGRESS => "policy_egress",
            OVERLAY_SPOOFED => "overlay_spoofed",
            NO_DESTINATION => "no_destination",
            UNKNOWN_INTERFACE => "unknown_interface",
            FRAGMENT => "fragment",
            NO_ROUTE => "no_route",
            OVERLAY_PORT => "overlay_port",
            OVERLAY_VNI => "overlay_vni",
            SNAT_EXHAUSTED => "snat_exhausted",
            _ => "unknown",
        }
    }
}

/// What the datapath did with a packet it let through ([`MonitorEvent::reason`] of a flow,
/// the final trace step).
pub mod verdict {
    /// Into a local pod (`bpf_redirect_peer`).
    pub const LOCAL: u8 = 1;
    /// Into a local pod through its host veth's qdisc (ingress shaped).
    pub const LOCAL_SHAPED: u8 = 2;
    /// Encapsulated to another node over the overlay.
    pub const TUNNEL: u8 = 3;
    /// Handed to the node's own stack (the host, node addresses, outside the cluster).
    pub const HOST: u8 = 4;
    /// Out of the uplink (a reply to a client outside the cluster).
    pub const UPLINK: u8 = 5;
    /// To the slow path (vswitch or VPP).
    pub const SLOW_PATH: u8 = 6;
    /// Dropped (the trace's final step; the reason in its `port`).
    pub const DROP: u8 = 7;

    pub fn name(v: u8) -> &'static str {
        match v {
            LOCAL => "local",
            LOCAL_SHAPED => "local_shaped",
            TUNNEL => "overlay",
            HOST => "host",
            UPLINK => "uplink",
            SLOW_PATH => "slow_path",
            DROP => "drop",
            _ => "unknown",
        }
    }
}

/// Values of [`MonitorEvent::hook`]: which program saw the packet.
pub mod hook {
    pub const FROM_POD: u8 = 1;
    pub const FROM_OVERLAY: u8 = 2;
    pub const FROM_UPLINK: u8 = 3;
    pub const FROM_VSWITCH: u8 = 4;

    /// The program's name.
    pub fn name(h: u8) -> &'static str {
        match h {
            FROM_POD => super::program_names::FROM_POD,
            FROM_OVERLAY => super::program_names::FROM_OVERLAY,
            FROM_UPLINK => super::program_names::FROM_UPLINK,
            FROM_VSWITCH => super::program_names::FROM_VSWITCH,
            _ => "unknown",
        }
    }
}

/// Indexes of `MONITOR_RATE`: drops and flows have buckets of their own, so a flood of new
/// flows never starves the drop events.
pub mod monitor_bucket {
    pub const DROPS: u32 = 0;
    pub const FLOWS: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// A per-CPU token bucket of the monitor (`MONITOR_RATE`), with its counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorBucket {
    /// Credit in event-nanoseconds: an event costs 10^9, a nanosecond adds `monitor_rate`,
    /// at most `monitor_burst` events' worth.
    pub tokens: u64,
    /// When the credit was last brought up to date (CLOCK_MONOTONIC ns).
    pub last_ns: u64,
    /// Events written to the ring buffer.
    pub emitted: u64,
    /// Events not emitted: over the rate (the packets were handled and counted as usual).
    pub suppressed: u64,
    /// Events within the rate that found the ring buffer full (the agent reads too slowly).
    pub lost: u64,
}

/// `skb->mark` of a packet the agent runs through `tc_from_pod` with `BPF_PROG_TEST_RUN`
/// to trace it. Trace mode also needs `ingress_ifindex` 0, which no packet that really
/// arrived on an interface has (and a pod's marks are scrubbed crossing into the node).
pub const TRACE_MARK: u32 = 0xc0de_7ace;
/// Steps a trace records at most.
pub const MAX_TRACE_STEPS: usize = 24;

/// One decision of a traced packet ([`trace_step`] says what each field holds).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceStep {
    pub code: u16,
    pub arg: u16,
    pub ip: [u8; 4],
    pub port: u16,
    pub aux: u16,
    pub value: u32,
}

/// What a trace run recorded (`TRACE_STEPS`, on the CPU it ran on). `tc_from_overlay` takes
/// the sending node from `cb[1]` of a trace run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceRecord {
    /// `cb[0]` of the run, so the agent finds its own record among the CPUs'.
    pub nonce: u32,
    /// Steps in use (`steps[..count]`).
    pub count: u32,
    pub steps: [TraceStep; MAX_TRACE_STEPS],
}

impl Default for TraceRecord {
    fn default() -> Self {
        Self { nonce: 0, count: 0, steps: [TraceStep::default(); MAX_TRACE_STEPS] }
    }
}

/// Codes of [`TraceStep::code`] and what the other fields hold.
pub mod trace_step {
    /// The frame's source MAC and IPv4 address (or ARP sender) are the pod's. `ip`: its address.
    pub const SOURCE_OK: u16 = 1;
    /// The source is not the pod's: `arg` [`super::drop_reason`] SPOOFED_MAC or SPOOFED_IP,
    /// `ip`: the claimed address.
    pub const SOURCE_SPOOFED: u16 = 2;
    /// Not IPv4 (`arg`: the ethertype; ARP included): the slow path answers it.
    pub const NOT_IPV4: u16 = 3;
    // 4 is retired: packets with IPv4 options took the slow path.
    /// A header could not be read.
    pub const MALFORMED: u16 = 5;
    /// Conntrack knows the flow: `arg` the entry's [`super::ct_flags`], `ip`/`port` its
    /// rewrite (DNAT or reverse DNAT), `value` its service id. No policy check follows.
    pub const CT_HIT: u16 = 6;
    /// Conntrack does not know the flow: a new flow.
    pub const CT_MISS: u16 = 7;
    /// The destination (`ip`:`port`) is a backend removed a moment ago: refused.
    pub const DEAD_BACKEND: u16 = 8;
    /// A service frontend (`ip`:`port`): `value` the service port id, `arg` its Cluster
    /// set's size, `aux` its Local set's.
    pub const SVC_FRONTEND: u16 = 9;
    /// No service frontend for the destination.
    pub const SVC_NONE: u16 = 10;
    /// The source is outside the service's loadBalancerSourceRanges (`value`: service id).
    pub const SVC_SOURCE_DENIED: u16 = 11;
    /// No usable backend (`value`: service id, `arg` 1 when the Local set was asked).
    pub const SVC_NO_BACKEND: u16 = 12;
    /// The backend chosen (`ip`:`port`): `value` service id, `aux` its ordinal, `arg` bits:
    /// 1 from the Local set, 2 the client's session affinity.
    pub const SVC_BACKEND: u16 = 13;
    /// The source rewritten too (`ip`:`port`): `arg` 0 so the reply comes back through
    /// here, 1 because another flow's reply entry has this flow's reply addresses.
    pub const SVC_SNAT: u16 = 14;
    /// A NetworkPolicy check: `arg` = direction ([`super::policy_dir`]) | result
    /// ([`super::trace_policy`]) << 4; `ip` the peer, `port` the port checked, `aux` the
    /// protocol, `value` the local pod's address (its four bytes). (The agent names the
    /// entry that decided: the longest POLICY prefix of that pod and direction holding the
    /// peer.)
    pub const POLICY: u16 = 15;
    /// The route for the (translated) destination: `arg` [`super::trace_route`], `ip` the
    /// destination or the next hop, `value` the interface.
    pub const ROUTE: u16 = 16;
    /// The TTL would reach zero.
    pub const TTL_EXCEEDED: u16 = 17;
    /// The new flow is recorded in conntrack (not in trace mode: nothing is written).
    pub const CT_RECORD: u16 = 18;
    /// The outcome: `arg` [`super::verdict`], `value` the interface it leaves by, `ip` the
    /// next hop (overlay), `port` the drop reason.
    pub const VERDICT: u16 = 19;
    /// The sending interface is no pod's.
    pub const UNKNOWN_INTERFACE: u16 = 20;
    /// From another node over the overlay: `ip` the sending node, `arg` 1 when the inner
    /// source is that node or one of its pods (0: spoofed), `value` the node owning the
    /// inner source (its four bytes; 0: none).
    pub const OVERLAY_SOURCE: u16 = 21;
    /// The destination is a cluster IP (`ip`) and no frontend serves its port (`port`,
    /// `aux` the protocol): refused.
    pub const SVC_PORT_UNDEFINED: u16 = 22;
    /// A later fragment of a datagram: `arg` 1 when its first fragment's ports were found
    /// (`port` the source port, `aux` the destination port), 0 when not (dropped).
    pub const FRAGMENT: u16 = 23;
}

/// Results of a [`trace_step::POLICY`] step.
pub mod trace_policy {
    /// The pod is not isolated in that direction: everything is allowed.
    pub const NOT_ISOLATED: u16 = 0;
    pub const ALLOWED: u16 = 1;
    /// No entry matches the peer: denied.
    pub const NO_MATCH: u16 = 2;
    /// The matching entry does not allow the protocol and port (or is an except).
    pub const PORT_DENIED: u16 = 3;
}

/// Kinds of a [`trace_step::ROUTE`] step.
pub mod trace_route {
    pub const LOCAL_POD: u16 = 1;
    pub const GATEWAY: u16 = 2;
    pub const VPP: u16 = 3;
    pub const REMOTE_NODE: u16 = 4;
    pub const TOO_BIG: u16 = 5;
    pub const UNKNOWN_LOCAL: u16 = 6;
    pub const HOST: u16 = 7;
    pub const UPLINK: u16 = 8;
    pub const NO_CONFIG: u16 = 9;
    /// From the overlay: neither a local pod nor this node.
    pub const NO_DESTINATION: u16 = 10;
    /// In the cluster's pod range, but no node owns it.
    pub const NO_ROUTE: u16 = 11;
}

/// TCP flag bits of [`CtEntry::tcp_flags`].
pub mod ct_tcp {
    pub const FIN: u8 = 1;
    pub const SYN: u8 = 2;
    pub const RST: u8 = 4;
    pub const ACK: u8 = 16;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C), Copy, made of integers and byte arrays with
    // explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::Ipv4Key {}
    unsafe impl aya::Pod for super::PodEndpoint {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::SlowPortCounters {}
    unsafe impl aya::Pod for super::RemoteRoute {}
    unsafe impl aya::Pod for super::OverlayCounters {}
    unsafe impl aya::Pod for super::MapName {}
    unsafe impl aya::Pod for super::SvcKey {}
    unsafe impl aya::Pod for super::SvcFrontend {}
    unsafe impl aya::Pod for super::SvcBackendKey {}
    unsafe impl aya::Pod for super::SvcBackend {}
    unsafe impl aya::Pod for super::SvcSlotKey {}
    unsafe impl aya::Pod for super::SvcAffinityKey {}
    unsafe impl aya::Pod for super::SvcAffinity {}
    unsafe impl aya::Pod for super::SvcSourceRange {}
    unsafe impl aya::Pod for super::SvcCounters {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNat {}
    unsafe impl aya::Pod for super::SockOrigin {}
    unsafe impl aya::Pod for super::SockUdpBackend {}
    unsafe impl aya::Pod for super::SockCounters {}
    unsafe impl aya::Pod for super::NodeAddr {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragHead {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PortRange {}
    unsafe impl aya::Pod for super::PolicyPorts {}
    unsafe impl aya::Pod for super::MonitorEvent {}
    unsafe impl aya::Pod for super::MonitorBucket {}
    unsafe impl aya::Pod for super::TraceStep {}
    unsafe impl aya::Pod for super::TraceRecord {}
}
