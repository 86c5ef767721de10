//! What VPP must hold for one node, as plain values ([`VppDesired`]), and the pure function
//! that renders it from plain inputs ([`render`]), with its subset that needs no cluster
//! store ([`render_bootstrap`]: the uplink and the host interconnect, applied before the
//! agent joins the store). No I/O: the reconciler applies it.
//!
//! # The node in `uplink = "vpp"` mode
//! ```text
//!  pods ─TC─▶ cslow0 ══veth══ cslow1 ─XDP─▶ AF_XDP ─▶ VPP af_xdp "xdp-cslow1" (gateway IP + MAC)
//!                                                       │ routes: local pod subnet ─▶ xdp-cslow1
//!                                                       │         remote pod subnet ─▶ vxlan_tunnel<node id>
//!                                                       │           (via a next hop: no ARP on an L3 tunnel)
//!  host ◀── tap "vpp1" (host interconnect) ◀── tap0 ────┤ NAT44-ED: inside xdp-cslow1, tap0;
//!                                                       │           outside the uplink; pool = node IP
//!  wire ◀── DPDK NIC "uplink0" (node IP and routes handed over by contiv-stn) ──┘
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::{AfXdpMode, VppConfig};

/// IP protocol numbers used here.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// The VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;

/// Everything VPP must hold for this node. Interfaces, routes and neighbours refer to
/// interfaces by their VPP name (the key of [`VppDesired::interfaces`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VppDesired {
    /// Interfaces by VPP name.
    pub interfaces: BTreeMap<String, InterfaceSpec>,
    /// IPv4 routes in the default table.
    pub routes: BTreeSet<RouteSpec>,
    /// Static neighbours.
    pub neighbors: BTreeSet<NeighborSpec>,
    /// NAT44-ED; None leaves NAT alone.
    pub nat: Option<NatSpec>,
    /// Input ACLs by the VPP name of the interface they guard.
    pub input_acls: BTreeMap<String, InputAcl>,
}

/// The prefix of the tags of the ACLs the reconciler owns: it deletes those no interface
/// wants, and never touches an ACL tagged otherwise.
pub const ACL_TAG_PREFIX: &str = "contiv-";

/// The tag of the uplink's input ACL.
pub const UPLINK_ACL_TAG: &str = "contiv-uplink";

/// An input ACL of VPP's ACL plugin on one interface, stateless: the first rule whose
/// source prefix holds a packet's source decides (any destination, any protocol); a packet
/// no rule matches is dropped by the plugin's implicit deny at the end of the interface's
/// ACLs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InputAcl {
    /// The ACL's tag in VPP, starting with [`ACL_TAG_PREFIX`]: VPP numbers ACLs itself, so
    /// the tag is how the reconciler finds it again after an agent or VPP restart.
    pub tag: String,
    /// The rules, in order.
    pub rules: Vec<AclRuleSpec>,
    /// Whether the interface stays closed (no address, no unnumbered source, down) while
    /// this ACL is not bound to it: for an interface the ACL makes safe to open, not for
    /// one that must carry traffic anyway.
    pub fail_closed: bool,
}

/// One rule of an [`InputAcl`]: packets from `src` are let through or dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AclRuleSpec {
    /// Let through (true) or drop (false).
    pub permit: bool,
    /// The sources the rule applies to.
    pub src: Ipv4Net,
}

impl AclRuleSpec {
    /// Lets packets from `src` through.
    pub fn permit(src: Ipv4Net) -> Self {
        Self { permit: true, src: src.trunc() }
    }

    /// Drops packets from `src`.
    pub fn deny(src: Ipv4Net) -> Self {
        Self { permit: false, src: src.trunc() }
    }
}

/// What kind of interface, with the parameters it is created with (changing them means
/// re-creating it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InterfaceKind {
    /// VPP's af_xdp interface on a Linux interface (`af_xdp_create_v3`).
    AfXdp {
        /// The Linux interface (the slow-path port's vswitch end).
        host_if: String,
        /// Receive queues.
        rxq_num: u16,
        /// Bind mode.
        mode: AfXdpMode,
    },
    /// A tap to the host (`tap_create_v3`); VPP names it `tap<id>`.
    Tap {
        /// Tap id.
        id: u32,
        /// The Linux end's name.
        host_if_name: String,
        /// The Linux end's address.
        host_ip4: Ipv4Net,
        /// The Linux end's MAC.
        host_mac: [u8; 6],
        /// Default route the host gets through the tap (when VPP owns the NIC).
        host_gateway: Option<Ipv4Addr>,
    },
    /// A VXLAN tunnel in L3 mode (`vxlan_add_del_tunnel_v3`); VPP names it
    /// `vxlan_tunnel<instance>`.
    Vxlan {
        /// Local tunnel end (the node IP).
        src: Ipv4Addr,
        /// Remote tunnel end (the other node's IP).
        dst: Ipv4Addr,
        /// VNI.
        vni: u32,
        /// Instance (the remote node's ID), which fixes the name.
        instance: u32,
    },
    /// An interface VPP has from boot (the DPDK NIC): configured, never created or deleted.
    Existing,
}

/// One interface's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceSpec {
    /// Kind and creation parameters.
    pub kind: InterfaceKind,
    /// Admin state up.
    pub admin_up: bool,
    /// MAC address, if it must be a given one.
    pub mac: Option<[u8; 6]>,
    /// L3 MTU, if it must be a given one.
    pub mtu: Option<u32>,
    /// IPv4 addresses.
    pub addresses: BTreeSet<Ipv4Net>,
    /// Borrows the addresses of this interface (VPP name).
    pub unnumbered_to: Option<String>,
}

/// An IPv4 route of the default table: `dst` via `next_hop` out of `interface`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RouteSpec {
    /// Destination.
    pub dst: Ipv4Net,
    /// Next hop; None for an attached route (every address on the link, or a tunnel).
    pub next_hop: Option<Ipv4Addr>,
    /// Outgoing interface (VPP name).
    pub interface: String,
}

/// A static neighbour.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NeighborSpec {
    /// Interface (VPP name).
    pub interface: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// MAC.
    pub mac: [u8; 6],
}

/// A NAT44 identity mapping (traffic to `ip:port` is not translated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct IdentityMapping {
    /// Address.
    pub ip: Ipv4Addr,
    /// IP protocol.
    pub proto: u8,
    /// Port.
    pub port: u16,
}

/// A NAT44 static mapping `external:port` <-> `local:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct StaticMapping {
    /// IP protocol.
    pub proto: u8,
    /// External address.
    pub external: Ipv4Addr,
    /// External port.
    pub external_port: u16,
    /// Local address.
    pub local: Ipv4Addr,
    /// Local port.
    pub local_port: u16,
}

/// NAT44-ED configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NatSpec {
    /// Session table size (0: VPP's default).
    pub sessions: u32,
    /// Inside interfaces (VPP names).
    pub inside: BTreeSet<String>,
    /// Outside interfaces (VPP names).
    pub outside: BTreeSet<String>,
    /// Address pool.
    pub pool: BTreeSet<Ipv4Addr>,
    /// Identity mappings.
    pub identity: BTreeSet<IdentityMapping>,
    /// Static mappings.
    pub static_mappings: BTreeSet<StaticMapping>,
}

// === inputs ===

/// A route contiv-stn took from the NIC (the default route included).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UplinkRoute {
    /// Destination.
    pub dst: Ipv4Net,
    /// Gateway; None for a link route.
    pub gateway: Option<Ipv4Addr>,
}

/// The NIC's configuration handed over by contiv-stn (or given by configuration).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkHandover {
    /// Addresses; the first is the node IP.
    pub addresses: Vec<Ipv4Net>,
    /// Routes through the NIC.
    pub routes: Vec<UplinkRoute>,
    /// MTU.
    pub mtu: Option<u32>,
}

/// The handover could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The file could not be read (contiv-stn is not running, or has not taken the NIC yet).
    #[error("reading the NIC handover {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file has no valid `handover` object.
    #[error("the NIC handover {path} is not valid: {reason}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
}

impl UplinkHandover {
    /// The handover `[vpp] uplinkAddress` / `uplinkGateway` / `uplinkMtu` describe, if the
    /// configuration gives the uplink's address (no contiv-stn on this node).
    pub fn from_config(cfg: &VppConfig) -> Option<Self> {
        let address = cfg.uplink_address?;
        Some(Self {
            addresses: vec![address],
            routes: cfg
                .uplink_gateway
                .map(|gw| UplinkRoute { dst: Ipv4Net::default(), gateway: Some(gw) })
                .into_iter()
                .collect(),
            mtu: cfg.uplink_mtu,
        })
    }

    /// The node IP: the first address.
    pub fn node_ip(&self) -> Option<Ipv4Addr> {
        self.addresses.first().map(|a| a.addr())
    }

    /// Reads the `handover` object of contiv-stn's state file (`[vpp] stnStateFile`).
    pub fn from_stn_state_file(path: &std::path::Path) -> Result<Self, HandoverError> {
        let bytes = std::fs::read(path).map_err(|source| HandoverError::Read { path: path.to_owned(), source })?;
        #[derive(Deserialize)]
        struct StateFile {
            handover: UplinkHandover,
        }
        let f: StateFile = serde_json::from_slice(&bytes)
            .map_err(|e| HandoverError::Invalid { path: path.to_owned(), reason: e.to_string() })?;
        if f.handover.addresses.is_empty() {
            return Err(HandoverError::Invalid { path: path.to_owned(), reason: "no IPv4 address".into() });
        }
        Ok(f.handover)
    }
}

/// Another node of the cluster, from the node registry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemoteNode {
    /// Node ID (unique, from the registry).
    pub id: u32,
    /// Node name (for messages).
    pub name: String,
    /// Its pod subnet.
    pub pod_subnet: Ipv4Net,
    /// Its node IP (tunnel end).
    pub node_ip: Ipv4Addr,
}

/// What [`render`] needs, as plain values.
#[derive(Clone, Debug)]
pub struct NodeInputs<'a> {
    /// The `[vpp]` configuration.
    pub config: &'a VppConfig,
    /// This node's ID.
    pub node_id: u32,
    /// This node's pod subnet.
    pub pod_subnet: Ipv4Net,
    /// The pods' gateway address (inside `pod_subnet`).
    pub gateway: Ipv4Addr,
    /// The MAC pods resolve the gateway to.
    pub gateway_mac: [u8; 6],
    /// The slow-path port's vswitch end (where the af_xdp interface binds).
    pub slowpath_ifname: &'a str,
    /// Pod MTU.
    pub mtu: u32,
    /// The NIC's configuration (node IP first).
    pub uplink: &'a UplinkHandover,
    /// The other nodes (this node may be in the list; it is skipped).
    pub remote_nodes: &'a [RemoteNode],
    /// The cluster's pod range (every node's pod subnet is taken from it); None: the
    /// uplink gets no input ACL.
    pub cluster_pod_cidr: Option<Ipv4Net>,
    /// The host's address in the pod subnet (a host address of it no pod holds, not the
    /// gateway): the source the host gives its traffic to other nodes' pods, which must
    /// come back to it. VPP routes it to the host through the tap. None: no such route.
    pub host_pod_address: Option<Ipv4Addr>,
}

/// The inputs are inconsistent; nothing is rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    /// No address for the node on the uplink.
    #[error("the uplink has no IPv4 address: contiv-stn has not handed the NIC over (or nothing is configured)")]
    NoNodeIp,
    /// The gateway is not a host address of the pod subnet.
    #[error("gateway {gateway} is not a host address of the pod subnet {subnet}")]
    GatewayOutsideSubnet {
        /// Gateway.
        gateway: Ipv4Addr,
        /// Pod subnet.
        subnet: Ipv4Net,
    },
    /// Two nodes claim overlapping pod subnets.
    #[error("pod subnet {subnet} of node {node} overlaps {other}")]
    OverlappingSubnets {
        /// The node.
        node: String,
        /// Its subnet.
        subnet: Ipv4Net,
        /// The subnet it overlaps.
        other: Ipv4Net,
    },
    /// The host's address in the pod subnet is not one of its host addresses, or is the
    /// gateway.
    #[error("the host's pod address {address} is not a host address of the pod subnet {subnet} other than the gateway")]
    HostAddressOutsideSubnet {
        /// The address.
        address: Ipv4Addr,
        /// Pod subnet.
        subnet: Ipv4Net,
    },
    /// Two remote nodes share an ID or an IP.
    #[error("nodes {a} and {b} share {what}")]
    DuplicateNode {
        /// One node.
        a: String,
        /// The other.
        b: String,
        /// "node ID 3", "node IP 192.0.2.1".
        what: String,
    },
}

/// VPP's `interface_dev_type` of an af_xdp interface: the af_xdp plugin's device class name
/// (plugins/af_xdp/device.c).
pub const AF_XDP_DEV_TYPE: &str = "AF_XDP interface";

/// The next hop of the route to a remote node's pod subnet through its VXLAN L3 tunnel: the
/// subnet's first host address (where that node's pods have their gateway).
///
/// VPP registers an L3 tunnel with `vxlan_hw_class` (plugins/vxlan/vxlan.c): not
/// point-to-point, not Ethernet. A route through it without a next hop gets a glean
/// adjacency (`fib_path_attached_get_adj`): every packet is dropped while VPP tries ARP,
/// which cannot work over an L3 tunnel. With a next hop the path gets a neighbour
/// adjacency, which that class's `default_update_adjacency` completes at once with the
/// empty rewrite of a header-less interface: no ARP, and no neighbour entry. Nor must
/// there be one: VPP's ip-neighbor code completes its neighbours' adjacencies with an
/// Ethernet rewrite (`ip_neighbor_mk_complete`), which on this interface would put an
/// Ethernet header inside the tunnel whenever it walks them (neighbour added after the
/// route, tunnel set up again). The address itself never appears in a packet.
pub fn tunnel_next_hop(remote_pod_subnet: Ipv4Net) -> Ipv4Addr {
    let net = remote_pod_subnet.trunc();
    if net.prefix_len() <= 30 { Ipv4Addr::from(u32::from(net.network()) + 1) } else { net.network() }
}

/// VPP's name of the af_xdp interface on `host_if`.
pub fn af_xdp_name(host_if: &str) -> String {
    format!("xdp-{host_if}")
}

/// VPP's name of tap `id`.
pub fn tap_name(id: u32) -> String {
    format!("tap{id}")
}

/// VPP's name of VXLAN tunnel `instance`.
pub fn vxlan_name(instance: u32) -> String {
    format!("vxlan_tunnel{instance}")
}

/// The tag of the input ACL of the tunnel called `tunnel`.
pub fn tunnel_acl_tag(tunnel: &str) -> String {
    format!("{ACL_TAG_PREFIX}tunnel-{tunnel}")
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Renders what VPP must hold before the node has joined the cluster store: what needs
/// only the `[vpp]` configuration and the NIC handed over by contiv-stn, so that the host
/// gets its network back through VPP (on a single-NIC node the store is only reachable
/// that way). It is a subset of [`render`]'s result for the same `cfg` and `uplink`, with the
/// same names and specs, so growing into the full state only adds:
/// - the uplink (DPDK, named in startup.conf): the handed-over addresses and routes;
/// - the host interconnect: tap `tap<id>` (`vpp1` on the host) with a /30, a static
///   neighbour for the host end, and the host's default route via VPP when the NIC's
///   default route was handed over;
/// - NAT44-ED: inside = the tap, outside = the uplink, pool = node IP, the identity mapping
///   for VXLAN and the static mappings of `hostPorts`.
///
/// The af_xdp port, the pod subnet's route, the tunnels and the af_xdp port's NAT inside
/// feature need the pod subnet, gateway or other nodes, so only [`render`] has them.
pub fn render_bootstrap(cfg: &VppConfig, uplink: &UplinkHandover) -> Result<VppDesired, RenderError> {
    let node_ip = uplink.node_ip().ok_or(RenderError::NoNodeIp)?;
    let mut d = VppDesired::default();
    let uplink_name = cfg.uplink_name.clone();
    let tap = tap_name(cfg.host_tap_id);

    // The uplink NIC: the addresses and routes contiv-stn took from the host.
    d.interfaces.insert(
        uplink_name.clone(),
        InterfaceSpec {
            kind: InterfaceKind::Existing,
            admin_up: true,
            mac: None,
            mtu: uplink.mtu,
            addresses: uplink
                .addresses
                .iter()
                .map(|a| Ipv4Net::new(a.addr(), a.prefix_len()).expect("valid"))
                .collect(),
            unnumbered_to: None,
        },
    );
    // One route per destination: VPP's API route replaces the one before, so two (a host's
    // DHCP and static default routes, metrics 100 and 200) would take turns every pass. The
    // first is kept: contiv-stn hands them over in the kernel's order, lowest metric first.
    let mut destinations = BTreeSet::new();
    for r in &uplink.routes {
        let dst = r.dst.trunc();
        if !destinations.insert(dst) {
            log::info!("VPP gets one route to {dst} of the uplink's: {:?} is left out", r.gateway);
            continue;
        }
        d.routes.insert(RouteSpec { dst, next_hop: r.gateway, interface: uplink_name.clone() });
    }

    // The host interconnect: host <-> pods and host <-> outside while VPP holds the NIC.
    let vpp_side = cfg.host_interconnect_vpp();
    let host_side = cfg.host_interconnect_host();
    let host_mac = [0x02, 0xfe, 0xca, 0xfe, 0x00, 0x02];
    let has_default = uplink.routes.iter().any(|r| r.dst.prefix_len() == 0);
    d.interfaces.insert(
        tap.clone(),
        InterfaceSpec {
            kind: InterfaceKind::Tap {
                id: cfg.host_tap_id,
                host_if_name: cfg.host_if_name.clone(),
                host_ip4: host_side,
                host_mac,
                host_gateway: has_default.then_some(vpp_side.addr()),
            },
            admin_up: true,
            mac: None,
            mtu: None,
            addresses: BTreeSet::from([vpp_side]),
            unnumbered_to: None,
        },
    );
    d.neighbors.insert(NeighborSpec { interface: tap.clone(), ip: host_side.addr(), mac: host_mac });

    // The host's traffic leaves with the node IP; VXLAN to this node and the host's
    // services are not translated away.
    d.nat = Some(NatSpec {
        sessions: cfg.nat_sessions,
        inside: BTreeSet::from([tap]),
        outside: BTreeSet::from([uplink_name]),
        pool: BTreeSet::from([node_ip]),
        identity: BTreeSet::from([IdentityMapping { ip: node_ip, proto: PROTO_UDP, port: VXLAN_PORT }]),
        static_mappings: cfg
            .host_ports
            .iter()
            .map(|p| StaticMapping {
                proto: p.proto,
                external: node_ip,
                external_port: p.port,
                local: host_side.addr(),
                local_port: p.port,
            })
            .collect(),
    });
    Ok(d)
}

/// Renders what VPP must hold for this node: [`render_bootstrap`]'s uplink, host
/// interconnect and NAT44, plus the af_xdp port with the pods' gateway, the pod subnet's
/// route and a tunnel per remote node, with a route through it via a next hop
/// ([`tunnel_next_hop`]) and an input ACL, and, given the cluster's pod range, the
/// uplink's input ACL.
pub fn render(inp: &NodeInputs<'_>) -> Result<VppDesired, RenderError> {
    let cfg = inp.config;
    let mut d = render_bootstrap(cfg, inp.uplink)?;
    let node_ip = inp.uplink.node_ip().ok_or(RenderError::NoNodeIp)?;
    let pod_subnet = inp.pod_subnet.trunc();
    if !pod_subnet.contains(&inp.gateway)
        || inp.gateway == pod_subnet.network()
        || inp.gateway == pod_subnet.broadcast()
    {
        return Err(RenderError::GatewayOutsideSubnet { gateway: inp.gateway, subnet: pod_subnet });
    }
    if let Some(address) = inp.host_pod_address
        && (!pod_subnet.contains(&address)
            || address == pod_subnet.network()
            || address == pod_subnet.broadcast()
            || address == inp.gateway)
    {
        return Err(RenderError::HostAddressOutsideSubnet { address, subnet: pod_subnet });
    }

    let mut remotes: Vec<&RemoteNode> = inp.remote_nodes.iter().filter(|n| n.id != inp.node_id).collect();
    remotes.sort();
    for (i, a) in remotes.iter().enumerate() {
        let subnet = a.pod_subnet.trunc();
        if overlaps(&subnet, &pod_subnet) {
            return Err(RenderError::OverlappingSubnets { node: a.name.clone(), subnet, other: pod_subnet });
        }
        for b in &remotes[i + 1..] {
            let dup = if a.id == b.id {
                Some(format!("node ID {}", a.id))
            } else if a.node_ip == b.node_ip {
                Some(format!("node IP {}", a.node_ip))
            } else {
                None
            };
            if let Some(what) = dup {
                return Err(RenderError::DuplicateNode { a: a.name.clone(), b: b.name.clone(), what });
            }
            if overlaps(&subnet, &b.pod_subnet.trunc()) {
                return Err(RenderError::OverlappingSubnets { node: a.name.clone(), subnet, other: b.pod_subnet });
            }
        }
    }

    let uplink = cfg.uplink_name.clone();
    let xdp = af_xdp_name(inp.slowpath_ifname);

    // The slow-path port's vswitch end: VPP plays the pods' gateway there.
    d.interfaces.insert(
        xdp.clone(),
        InterfaceSpec {
            kind: InterfaceKind::AfXdp {
                host_if: inp.slowpath_ifname.to_owned(),
                rxq_num: cfg.af_xdp_rx_queues,
                mode: cfg.af_xdp_mode,
            },
            admin_up: true,
            mac: Some(inp.gateway_mac),
            mtu: Some(inp.mtu),
            addresses: BTreeSet::from([Ipv4Net::new(inp.gateway, pod_subnet.prefix_len()).expect("valid")]),
            unnumbered_to: None,
        },
    );
    d.routes.insert(RouteSpec { dst: pod_subnet, next_hop: None, interface: xdp.clone() });
    // The host's address in the pod subnet: the host's traffic to other nodes' pods leaves
    // from it (the tap's own address is the same on every node and would be answered by
    // the answering node's host; the tunnels carry it untranslated, as they do pods'
    // traffic). Their answers come back through a tunnel like any packet to this node's
    // pods, and this route takes them to the host instead of the af_xdp port.
    if let Some(address) = inp.host_pod_address {
        let host_side = cfg.host_interconnect_host().addr();
        d.routes.insert(RouteSpec {
            dst: Ipv4Net::from(address),
            next_hop: Some(host_side),
            interface: tap_name(cfg.host_tap_id),
        });
    }

    // One L3 VXLAN tunnel per remote node, with a route through it via a next hop, and an
    // input ACL that lets in only what that node may send: decapsulated packets reach the
    // pods through the af_xdp port, where tc_from_vswitch can no longer tell which tunnel
    // they came through, so without it a packet from one node could carry another node's
    // pod address, or any address a NetworkPolicy allows. As in kernel mode, that is the
    // node's pod subnet and its node IP, the source of the ICMP errors its VPP sends (TTL
    // exceeded, fragmentation needed) from the uplink address its tunnels borrow. A tunnel
    // whose ACL cannot be bound stays closed: better no traffic from that node than traffic
    // from any source.
    let remote_subnets: Vec<Ipv4Net> = remotes.iter().map(|n| n.pod_subnet.trunc()).collect();
    for n in remotes {
        let name = vxlan_name(n.id);
        d.input_acls.insert(
            name.clone(),
            InputAcl {
                tag: tunnel_acl_tag(&name),
                rules: vec![AclRuleSpec::permit(n.pod_subnet), AclRuleSpec::permit(Ipv4Net::from(n.node_ip))],
                fail_closed: true,
            },
        );
        d.interfaces.insert(
            name.clone(),
            InterfaceSpec {
                kind: InterfaceKind::Vxlan { src: node_ip, dst: n.node_ip, vni: cfg.vxlan_vni, instance: n.id },
                admin_up: true,
                mac: None,
                mtu: None,
                addresses: BTreeSet::new(),
                unnumbered_to: Some(uplink.clone()),
            },
        );
        let next_hop = Some(tunnel_next_hop(n.pod_subnet));
        d.routes.insert(RouteSpec { dst: n.pod_subnet.trunc(), next_hop, interface: name });
    }

    // The uplink's input ACL: no plain packet from the wire comes from a pod (pods' traffic
    // leaves NAT'ed to the node IP, or inside VXLAN from a node address), from the host's
    // end of the interconnect (NAT'ed too), or from this node's own addresses; VPP would
    // route such a packet to a local pod through the af_xdp port, where tc_from_vswitch
    // judges it by that source alone, and every isolated pod admits the pods' gateway and
    // the node's addresses (the host's tap address among them). Kernel mode drops the pod
    // range in tc_from_uplink, and its stack drops its own addresses as martians. Pod
    // subnets outside the cluster's range (a configured podSubnet) are denied on their own.
    // Everything else passes: return traffic to the node IP comes from outside addresses
    // (the ACL plugin runs before NAT44-ED's out2in, on untranslated packets), and VXLAN
    // from node addresses. The uplink is never held closed for it: it carries the node's
    // own traffic, the store's included, and is open from the bootstrap on.
    if let Some(cluster) = inp.cluster_pod_cidr {
        let cluster = cluster.trunc();
        let mut rules = vec![AclRuleSpec::deny(cluster)];
        let uncovered = std::iter::once(pod_subnet).chain(remote_subnets).filter(|s| !cluster.contains(s));
        rules.extend(uncovered.map(AclRuleSpec::deny));
        rules.push(AclRuleSpec::deny(cfg.host_interconnect_subnet));
        rules.extend(inp.uplink.addresses.iter().map(|a| AclRuleSpec::deny(Ipv4Net::from(a.addr()))));
        rules.push(AclRuleSpec::permit(Ipv4Net::default()));
        d.input_acls.insert(uplink, InputAcl { tag: UPLINK_ACL_TAG.into(), rules, fail_closed: false });
    }

    // Pod egress leaves with the node IP too.
    d.nat.as_mut().expect("rendered by render_bootstrap").inside.insert(xdp);
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn uplink() -> UplinkHandover {
        UplinkHandover {
            addresses: vec![net("192.168.16.1/24")],
            routes: vec![UplinkRoute { dst: net("0.0.0.0/0"), gateway: Some("192.168.16.254".parse().unwrap()) }],
            mtu: Some(1500),
        }
    }

    fn nodes() -> Vec<RemoteNode> {
        (1..=3)
            .map(|i| RemoteNode {
                id: i,
                name: format!("n{i}"),
                pod_subnet: net(&format!("10.1.{i}.0/24")),
                node_ip: format!("192.168.16.{i}").parse().unwrap(),
            })
            .collect()
    }

    fn inputs<'a>(cfg: &'a VppConfig, up: &'a UplinkHandover, remotes: &'a [RemoteNode]) -> NodeInputs<'a> {
        NodeInputs {
            config: cfg,
            node_id: 1,
            pod_subnet: net("10.1.1.0/24"),
            gateway: "10.1.1.1".parse().unwrap(),
            gateway_mac: [2, 0xfe, 0, 0, 0, 1],
            slowpath_ifname: "cslow1",
            mtu: 1450,
            uplink: up,
            remote_nodes: remotes,
            cluster_pod_cidr: Some(net("10.1.0.0/16")),
            host_pod_address: Some("10.1.1.254".parse().unwrap()),
        }
    }

    #[test]
    fn a_node_gets_its_port_routes_tunnels_interconnect_and_nat() {
        let cfg = VppConfig::default();
        let (up, remotes) = (uplink(), nodes());
        let d = render(&inputs(&cfg, &up, &remotes)).unwrap();
        let names: Vec<&str> = d.interfaces.keys().map(String::as_str).collect();
        assert_eq!(names, ["tap0", "uplink0", "vxlan_tunnel2", "vxlan_tunnel3", "xdp-cslow1"]);
        let xdp = &d.interfaces["xdp-cslow1"];
        assert_eq!(xdp.addresses, BTreeSet::from([net("10.1.1.1/24")]));
        assert_eq!(xdp.mac, Some([2, 0xfe, 0, 0, 0, 1]));
        assert!(
            matches!(&xdp.kind, InterfaceKind::AfXdp { host_if, rxq_num: 1, mode: AfXdpMode::Copy } if host_if == "cslow1")
        );
        assert_eq!(
            d.interfaces["vxlan_tunnel3"].kind,
            InterfaceKind::Vxlan {
                src: "192.168.16.1".parse().unwrap(),
                dst: "192.168.16.3".parse().unwrap(),
                vni: 10,
                instance: 3
            }
        );
        assert_eq!(d.interfaces["vxlan_tunnel3"].unnumbered_to.as_deref(), Some("uplink0"));
        // Each tunnel lets in its node's pods and the node itself, nothing else, and opens
        // only with its ACL bound.
        assert_eq!(d.input_acls.keys().collect::<Vec<_>>(), ["uplink0", "vxlan_tunnel2", "vxlan_tunnel3"]);
        assert_eq!(
            d.input_acls["vxlan_tunnel3"],
            InputAcl {
                tag: "contiv-tunnel-vxlan_tunnel3".into(),
                rules: vec![AclRuleSpec::permit(net("10.1.3.0/24")), AclRuleSpec::permit(net("192.168.16.3/32"))],
                fail_closed: true,
            }
        );
        // The uplink lets in everything but the pods, the host's interconnect and the node's
        // own address, and stays open without its ACL.
        assert_eq!(
            d.input_acls["uplink0"],
            InputAcl {
                tag: "contiv-uplink".into(),
                rules: vec![
                    AclRuleSpec::deny(net("10.1.0.0/16")),
                    AclRuleSpec::deny(net("172.30.255.0/30")),
                    AclRuleSpec::deny(net("192.168.16.1/32")),
                    AclRuleSpec::permit(net("0.0.0.0/0")),
                ],
                fail_closed: false,
            }
        );
        let routes: Vec<(String, Option<String>, &str)> = d
            .routes
            .iter()
            .map(|r| (r.dst.to_string(), r.next_hop.map(|h| h.to_string()), r.interface.as_str()))
            .collect();
        assert_eq!(
            routes,
            [
                ("0.0.0.0/0".into(), Some("192.168.16.254".into()), "uplink0"),
                ("10.1.1.0/24".into(), None, "xdp-cslow1"),
                // Answers to the host's traffic to other nodes' pods go to the host.
                ("10.1.1.254/32".into(), Some("172.30.255.2".into()), "tap0"),
                ("10.1.2.0/24".into(), Some("10.1.2.1".into()), "vxlan_tunnel2"),
                ("10.1.3.0/24".into(), Some("10.1.3.1".into()), "vxlan_tunnel3"),
            ]
        );
        let without = render(&NodeInputs { host_pod_address: None, ..inputs(&cfg, &up, &remotes) }).unwrap();
        assert_eq!(
            d.routes.difference(&without.routes).map(|r| r.dst.to_string()).collect::<Vec<_>>(),
            ["10.1.1.254/32"]
        );
        // VPP would ARP for an attached route through an L3 tunnel: a next hop instead, and
        // no neighbour on the tunnel (VPP would give its adjacency an Ethernet rewrite).
        assert!(d.neighbors.iter().all(|n| !n.interface.starts_with("vxlan")), "{:?}", d.neighbors);
        assert_eq!(tunnel_next_hop(net("10.9.0.0/16")), "10.9.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(tunnel_next_hop(net("10.9.0.7/32")), "10.9.0.7".parse::<Ipv4Addr>().unwrap());
        let nat = d.nat.as_ref().unwrap();
        assert_eq!(nat.inside, BTreeSet::from(["tap0".to_owned(), "xdp-cslow1".to_owned()]));
        assert_eq!(nat.outside, BTreeSet::from(["uplink0".to_owned()]));
        assert_eq!(nat.pool, BTreeSet::from(["192.168.16.1".parse().unwrap()]));
        assert!(nat.identity.contains(&IdentityMapping {
            ip: "192.168.16.1".parse().unwrap(),
            proto: PROTO_UDP,
            port: 4789
        }));
        assert_eq!(nat.static_mappings.len(), 2, "ssh and kubelet reach the host");
        match &d.interfaces["tap0"].kind {
            InterfaceKind::Tap { host_ip4, host_gateway, .. } => {
                assert_eq!(host_ip4.to_string(), "172.30.255.2/30");
                assert_eq!(
                    *host_gateway,
                    Some("172.30.255.1".parse().unwrap()),
                    "the host's default route goes via VPP"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_uplinks_acl_denies_every_pod_subnet_and_needs_the_clusters_range() {
        let cfg = VppConfig::default();
        let (up, mut remotes) = (uplink(), nodes());
        // A node whose pod subnet lies outside the cluster's range, and this node's too.
        remotes[2].pod_subnet = net("10.9.3.0/24");
        let mut inp = inputs(&cfg, &up, &remotes);
        inp.pod_subnet = net("10.8.1.0/24");
        inp.gateway = "10.8.1.1".parse().unwrap();
        inp.host_pod_address = Some("10.8.1.254".parse().unwrap());
        let d = render(&inp).unwrap();
        let denied: Vec<Ipv4Net> = d.input_acls["uplink0"].rules.iter().filter(|r| !r.permit).map(|r| r.src).collect();
        assert_eq!(
            denied,
            [
                net("10.1.0.0/16"),
                net("10.8.1.0/24"),
                net("10.9.3.0/24"),
                net("172.30.255.0/30"),
                net("192.168.16.1/32")
            ]
        );
        // Without the cluster's range the uplink has no ACL; the tunnels keep theirs.
        inp.cluster_pod_cidr = None;
        let d = render(&inp).unwrap();
        assert_eq!(d.input_acls.keys().collect::<Vec<_>>(), ["vxlan_tunnel2", "vxlan_tunnel3"]);
    }

    #[test]
    fn the_bootstrap_is_the_full_state_without_what_needs_the_cluster() {
        let cfg = VppConfig { nat_sessions: 4096, ..Default::default() };
        let (up, remotes) = (uplink(), nodes());
        let boot = render_bootstrap(&cfg, &up).unwrap();
        let full = render(&inputs(&cfg, &up, &remotes)).unwrap();

        // The uplink with the handed-over address and default route, the tap with the host's
        // default route via VPP, NAT44 for the tap: nothing of the pods or other nodes.
        let names: Vec<&str> = boot.interfaces.keys().map(String::as_str).collect();
        assert_eq!(names, ["tap0", "uplink0"]);
        assert_eq!(boot.interfaces["uplink0"].addresses, BTreeSet::from([net("192.168.16.1/24")]));
        let routes: Vec<String> =
            boot.routes.iter().map(|r| format!("{} {:?} {}", r.dst, r.next_hop, r.interface)).collect();
        assert_eq!(routes, ["0.0.0.0/0 Some(192.168.16.254) uplink0"]);
        assert!(matches!(
            &boot.interfaces["tap0"].kind,
            InterfaceKind::Tap { host_if_name, host_gateway: Some(gw), .. } if host_if_name == "vpp1" && gw.to_string() == "172.30.255.1"
        ));
        let nat = boot.nat.as_ref().unwrap();
        assert_eq!(nat.inside, BTreeSet::from(["tap0".to_owned()]));
        assert_eq!(nat.outside, BTreeSet::from(["uplink0".to_owned()]));
        assert_eq!(nat.pool, BTreeSet::from(["192.168.16.1".parse().unwrap()]));

        // A subset of the full state with the same names and specs: growing into it only adds.
        for (name, spec) in &boot.interfaces {
            assert_eq!(full.interfaces.get(name), Some(spec), "{name} is the same in the full state");
        }
        assert!(boot.routes.is_subset(&full.routes));
        assert!(boot.neighbors.is_subset(&full.neighbors));
        let full_nat = full.nat.as_ref().unwrap();
        assert!(nat.inside.is_subset(&full_nat.inside));
        assert_eq!(
            NatSpec { inside: full_nat.inside.clone(), ..nat.clone() },
            *full_nat,
            "the full NAT44 config only adds inside interfaces"
        );
        // What the full state adds: the af_xdp port, its route and NAT feature, the tunnels.
        let added: Vec<&str> =
            full.interfaces.keys().filter(|n| !boot.interfaces.contains_key(*n)).map(String::as_str).collect();
        assert_eq!(added, ["vxlan_tunnel2", "vxlan_tunnel3", "xdp-cslow1"]);
        assert_eq!(
            full.routes.difference(&boot.routes).count(),
            4,
            "the pod subnet, the host's address in it and two remote subnets"
        );
        assert_eq!(full_nat.inside.difference(&nat.inside).collect::<Vec<_>>(), ["xdp-cslow1"]);
        assert!(boot.input_acls.is_empty(), "no tunnels, no ACLs, and the uplink's waits for the cluster's range");

        // No node IP: nothing to bootstrap.
        assert_eq!(render_bootstrap(&cfg, &UplinkHandover::default()).unwrap_err(), RenderError::NoNodeIp);
        // Without a handed-over default route the host keeps its own (no gateway on the tap).
        let no_default = UplinkHandover { routes: vec![], ..uplink() };
        let boot = render_bootstrap(&cfg, &no_default).unwrap();
        assert!(boot.routes.is_empty());
        assert!(matches!(&boot.interfaces["tap0"].kind, InterfaceKind::Tap { host_gateway: None, .. }));
    }

    #[test]
    fn the_uplink_can_come_from_the_configuration() {
        #[derive(serde::Deserialize)]
        struct W {
            vpp: VppConfig,
        }
        let cfg = toml::from_str::<W>("[vpp]\nuplinkAddress = \"192.168.16.1/24\"\nuplinkGateway = \"192.168.16.254\"")
            .unwrap()
            .vpp;
        assert_eq!(UplinkHandover::from_config(&cfg), Some(uplink()).map(|u| UplinkHandover { mtu: None, ..u }));
        assert_eq!(UplinkHandover::from_config(&VppConfig::default()), None, "default: contiv-stn hands it over");
    }

    #[test]
    fn rendering_is_deterministic_and_ignores_node_order() {
        let cfg = VppConfig::default();
        let up = uplink();
        let mut remotes = nodes();
        let a = render(&inputs(&cfg, &up, &remotes)).unwrap();
        remotes.reverse();
        assert_eq!(render(&inputs(&cfg, &up, &remotes)).unwrap(), a);
    }

    #[test]
    fn inconsistent_inputs_are_refused_with_the_reason() {
        let cfg = VppConfig::default();
        let up = uplink();
        let mut remotes = nodes();
        remotes[2].pod_subnet = net("10.1.2.128/25");
        let err = render(&inputs(&cfg, &up, &remotes)).unwrap_err();
        assert!(matches!(err, RenderError::OverlappingSubnets { .. }), "{err}");
        let mut remotes = nodes();
        remotes[2].node_ip = remotes[1].node_ip;
        assert!(render(&inputs(&cfg, &up, &remotes)).unwrap_err().to_string().contains("node IP"));
        let none = UplinkHandover::default();
        assert_eq!(render(&inputs(&cfg, &none, &[])).unwrap_err(), RenderError::NoNodeIp);
        let mut bad = inputs(&cfg, &up, &[]);
        bad.gateway = "10.9.9.9".parse().unwrap();
        assert!(matches!(render(&bad), Err(RenderError::GatewayOutsideSubnet { .. })));
        // The host's pod address: a host address of the subnet that is not the gateway.
        for address in ["10.1.2.7", "10.1.1.0", "10.1.1.255", "10.1.1.1"] {
            let bad = NodeInputs { host_pod_address: Some(address.parse().unwrap()), ..inputs(&cfg, &up, &[]) };
            assert!(matches!(render(&bad), Err(RenderError::HostAddressOutsideSubnet { .. })), "{address}");
        }
    }
}
