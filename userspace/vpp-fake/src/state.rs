//! What the fake VPP holds: the objects a client programs, kept close to VPP's own model
//! (sw_if_index numbering, FIB tables with paths, neighbour table, NAT44-ED and ACL plugin
//! state). Lost on a simulated restart, like VPP's.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use contiv_vpp_binapi::api;
use ipnet::{IpNet, Ipv4Net};

/// What created an interface and with which parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum InterfaceKind {
    /// `local0`, always sw_if_index 0.
    Local,
    /// A NIC owned by the DPDK plugin (configured in startup.conf, present from boot).
    Dpdk,
    /// `af_xdp_create_v3`.
    AfXdp(api::AfXdpCreateV3),
    /// `tap_create_v3` (id resolved).
    Tap { id: u32, create: api::TapCreateV3 },
    /// `vxlan_add_del_tunnel_v3` (instance and ports resolved).
    Vxlan(api::VxlanAddDelTunnelV3),
    /// `create_loopback_instance` (instance resolved).
    Loopback { instance: u32 },
}

impl InterfaceKind {
    /// VPP's `interface_dev_type` string: the name of the interface's device class
    /// (`VNET_DEVICE_CLASS (...) = { .name = ... }` in VPP's sources: vnet/interface.c,
    /// plugins/dpdk, plugins/af_xdp/device.c, plugins/tap/tap.c, plugins/vxlan/vxlan.c,
    /// vnet/ethernet/interface.c).
    pub fn dev_type(&self) -> &'static str {
        match self {
            InterfaceKind::Local => "local",
            InterfaceKind::Dpdk => "dpdk",
            InterfaceKind::AfXdp(_) => "AF_XDP interface",
            InterfaceKind::Tap { .. } => "tap",
            InterfaceKind::Vxlan(_) => "VXLAN",
            InterfaceKind::Loopback { .. } => "Loopback",
        }
    }

    /// A VXLAN tunnel created in L3 mode. VPP registers it with `vxlan_hw_class`, which
    /// is not Ethernet, not point-to-point and has neither `build_rewrite` nor
    /// `update_adjacency` of its own: an attached route through it gets a glean (ARP)
    /// adjacency, which can never resolve; a route with a next hop gets a neighbour
    /// adjacency that `default_update_adjacency` completes at once with an empty rewrite.
    pub fn is_l3_tunnel(&self) -> bool {
        matches!(self, InterfaceKind::Vxlan(t) if t.is_l3)
    }
}

/// One software interface.
#[derive(Clone, Debug, PartialEq)]
pub struct Interface {
    /// Its index.
    pub sw_if_index: u32,
    /// VPP's name (`interface_name`).
    pub name: String,
    /// What it is.
    pub kind: InterfaceKind,
    /// L2 address.
    pub mac: [u8; 6],
    /// Admin state.
    pub admin_up: bool,
    /// Hardware MTU.
    pub link_mtu: u16,
    /// L3, IPv4, IPv6, MPLS MTUs.
    pub mtu: [u32; 4],
    /// IPv4 FIB table.
    pub ip4_table: u32,
    /// IPv6 FIB table.
    pub ip6_table: u32,
    /// Borrows the addresses of this interface (`sw_interface_set_unnumbered`).
    pub unnumbered_to: Option<u32>,
    /// Addresses, in the order they were added.
    pub addresses: Vec<IpNet>,
    /// Tag.
    pub tag: String,
}

impl Interface {
    /// Link state: virtual interfaces follow the admin state; local0 is always down.
    pub fn link_up(&self) -> bool {
        self.admin_up && self.kind != InterfaceKind::Local
    }

    /// `if_status_flags`.
    pub fn flags(&self) -> api::IfStatusFlags {
        let mut f = 0;
        if self.admin_up {
            f |= api::IfStatusFlags::IF_STATUS_API_FLAG_ADMIN_UP.0;
        }
        if self.link_up() {
            f |= api::IfStatusFlags::IF_STATUS_API_FLAG_LINK_UP.0;
        }
        api::IfStatusFlags(f)
    }
}

/// A neighbour entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbor {
    /// MAC address.
    pub mac: [u8; 6],
    /// `ip_neighbor_flags`.
    pub flags: api::IpNeighborFlags,
}

/// NAT44-ED plugin state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NatState {
    /// The plugin's enable request, while enabled, with `sessions` as VPP keeps it (0 is
    /// replaced by VPP's default, [`NAT_DEFAULT_SESSIONS`]).
    pub enabled: Option<api::Nat44EdPluginEnableDisable>,
    /// Timeouts and translation buckets set by the last enable: VPP keeps them (and shows
    /// them in `nat44_show_running_config`) after a disable.
    pub last_timeouts: api::NatTimeouts,
    /// See `last_timeouts`.
    pub last_translation_buckets: u32,
    /// NAT44-ED's records of interfaces with the in2out/out2in feature: sw_if_index ->
    /// NAT_IS_INSIDE / NAT_IS_OUTSIDE bits (what `nat44_interface_dump` lists). As in VPP,
    /// a record outlives its interface's deletion.
    pub interfaces: BTreeMap<u32, u8>,
    /// The features actually on the interfaces' arcs (what translates packets): set with a
    /// record, and stripped when the interface is deleted while its record stays.
    pub active: BTreeMap<u32, u8>,
    /// Interfaces with the output feature.
    pub output_interfaces: BTreeSet<u32>,
    /// Address pool: address -> (vrf, flags).
    pub addresses: BTreeMap<Ipv4Addr, (u32, api::NatConfigFlags)>,
    /// Static mappings.
    pub static_mappings: Vec<api::Nat44AddDelStaticMappingV2>,
    /// Identity mappings.
    pub identity_mappings: Vec<api::Nat44AddDelIdentityMapping>,
}

/// Sessions per thread NAT44-ED gets when enabled with `sessions = 0`
/// (`nat44_plugin_enable`, plugins/nat/nat44-ed/nat44_ed.c).
pub const NAT_DEFAULT_SESSIONS: u32 = 63 * 1024;

/// FIB sources as VPP numbers them (`fib_source_t`, vnet/fib/fib_source.h), the value
/// `ip_route_v2_details.route.src` carries and `ip_route_v2_dump.src` filters on.
pub mod fib_source {
    /// Special entries of every table (240.0.0.0/4, 224.0.0.0/4 drops).
    pub const SPECIAL: u8 = 1;
    /// Connected and local routes of interface addresses.
    pub const INTERFACE: u8 = 4;
    /// Routes added with `ip_route_add_del`.
    pub const API: u8 = 8;
    /// The /32 VPP adds for every neighbour (`ip_neighbor_adj_fib_add`).
    pub const ADJ: u8 = 15;
    /// 0.0.0.0/0, 0.0.0.0/32 and 255.255.255.255/32 drops of every table.
    pub const DEFAULT_ROUTE: u8 = 20;

    /// The priority VPP gives a source (lower wins; `foreach_fib_source`).
    pub fn priority(src: u8) -> u8 {
        match src {
            SPECIAL => 0x00,
            INTERFACE => 0x03,
            API => 0x80,
            ADJ => 0xd0,
            DEFAULT_ROUTE => 0xfd,
            _ => 0xff,
        }
    }
}

/// A route's paths as `(next hop, sw_if_index)`, for quick assertions.
pub type Hops = Vec<(Option<IpAddr>, u32)>;

/// One entry of a FIB table as VPP's route dumps show it: the paths of its best source.
#[derive(Clone, Debug, PartialEq)]
pub struct FibEntry {
    /// The prefix.
    pub prefix: IpNet,
    /// The best source ([`fib_source`]).
    pub src: u8,
    /// That source's paths.
    pub paths: Vec<api::FibPath>,
}

/// Where VPP would send a packet ([`FakeState::ip4_lookup`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forwarding {
    /// No route at all.
    NoRoute,
    /// Dropped.
    Drop,
    /// For VPP itself (an address of `sw_if_index`).
    Local {
        /// The interface holding the address.
        sw_if_index: u32,
    },
    /// Sent out of `sw_if_index` to `next_hop` through a complete adjacency: VPP knows the
    /// next hop's MAC, or, through a VXLAN L3 tunnel, needs none (no link-layer header) and
    /// encapsulates the packet to the tunnel's far end.
    Complete {
        /// The interface.
        sw_if_index: u32,
        /// The next hop.
        next_hop: IpAddr,
    },
    /// Through a VXLAN L3 tunnel with a neighbour entry for `next_hop` on it: VPP's
    /// ip-neighbor code completes the adjacencies of its neighbours with an Ethernet
    /// rewrite (`ip_neighbor_mk_complete` -> `ethernet_build_rewrite`, which takes the
    /// interface for an Ethernet one) whenever it walks them (the neighbour added after the
    /// route, the tunnel set up again), so the tunnel carries an Ethernet header the far
    /// end's ip4-input drops. Real VPP gets there only in those orders; the fake says so
    /// whenever such a neighbour exists.
    EthernetRewriteOnTunnel {
        /// The tunnel.
        sw_if_index: u32,
        /// The next hop.
        next_hop: IpAddr,
    },
    /// VPP has to resolve `next_hop` with ARP on `sw_if_index` first (a glean or
    /// incomplete adjacency); `possible` is false where ARP cannot work (a VXLAN L3 tunnel):
    /// the packet is lost.
    Arp {
        /// The interface.
        sw_if_index: u32,
        /// The address to resolve.
        next_hop: IpAddr,
        /// Whether ARP can work there.
        possible: bool,
    },
}

impl Forwarding {
    /// Whether the packet leaves VPP (or reaches it, for [`Forwarding::Local`]).
    pub fn delivers(&self) -> bool {
        matches!(self, Forwarding::Local { .. } | Forwarding::Complete { .. } | Forwarding::Arp { possible: true, .. })
    }
}

/// An IPv4 packet as VPP's ACL plugin matches it: addresses, protocol and ports (ICMP type
/// and code in the ports' places, as in the plugin's 5-tuple). TCP flags are not modelled:
/// a rule with a flags mask matches no packet here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet4 {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IP protocol.
    pub proto: u8,
    /// Source port, or ICMP type.
    pub src_port: u16,
    /// Destination port, or ICMP code.
    pub dst_port: u16,
}

impl Packet4 {
    /// A UDP datagram.
    pub fn udp(src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Self {
        Self { src, dst, proto: 17, src_port, dst_port }
    }

    /// An ICMP message of `icmp_type` and `code`.
    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, code: u8) -> Self {
        Self { src, dst, proto: 1, src_port: icmp_type.into(), dst_port: code.into() }
    }
}

/// What VPP does with a VXLAN packet for one of its addresses ([`FakeState::vxlan4_rx`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VxlanRx {
    /// No tunnel has these ends and VNI: vxlan4-input drops it.
    NoTunnel,
    /// Decapsulated on tunnel `sw_if_index` and dropped by its input ACLs: by a deny rule
    /// of `acl_index`, or, with None, because no rule of its ACLs matched (the plugin's
    /// implicit deny).
    Denied {
        /// The tunnel.
        sw_if_index: u32,
        /// The ACL whose deny rule matched.
        acl_index: Option<u32>,
    },
    /// Decapsulated on tunnel `sw_if_index`, let through by its input ACLs (or it has
    /// none), and looked up in its table.
    Forward {
        /// The tunnel.
        sw_if_index: u32,
        /// Where the inner packet goes.
        forwarding: Forwarding,
    },
}

/// What VPP does with a plain IPv4 packet received on an interface ([`FakeState::ip4_rx`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ip4Rx {
    /// Dropped by the interface's input ACLs: by a deny rule of `acl_index`, or, with None,
    /// because no rule of its ACLs matched (the plugin's implicit deny).
    Denied {
        /// The ACL whose deny rule matched.
        acl_index: Option<u32>,
    },
    /// Let through by its input ACLs (or it has none), and looked up in its table.
    Forward(Forwarding),
}

/// Whether ACL rule `r` matches `p` (`single_acl_match_5tuple` in VPP's ACL plugin): both
/// prefixes contain the addresses, and, for a rule that names a protocol, the protocol and
/// both port ranges match; protocol 0 is any, with no look at the ports.
fn acl_rule_matches(r: &api::AclRule, p: &Packet4) -> bool {
    let within = |prefix: &api::Prefix, a: Ipv4Addr| prefix.to_ipv4_net().is_some_and(|n| n.contains(&a));
    if !within(&r.src_prefix, p.src) || !within(&r.dst_prefix, p.dst) {
        return false;
    }
    if r.proto.0 == 0 {
        return true;
    }
    r.proto.0 == p.proto
        && (r.srcport_or_icmptype_first..=r.srcport_or_icmptype_last).contains(&p.src_port)
        && (r.dstport_or_icmpcode_first..=r.dstport_or_icmpcode_last).contains(&p.dst_port)
        && r.tcp_flags_mask == 0
}

/// The graph nodes the fake knows, with the next nodes of those that have any, as a
/// freshly started VPP has them (`foreach_vxlan_input_next` in plugins/vxlan/vxlan.h gives
/// vxlan4-input / vxlan6-input their `error-drop` (0) and `l2-input` (1)).
fn boot_nodes() -> BTreeMap<String, Vec<String>> {
    let vxlan_next = || vec!["error-drop".to_owned(), "l2-input".to_owned()];
    let mut nodes: BTreeMap<String, Vec<String>> = [
        "error-drop",
        "ethernet-input",
        "l2-input",
        "ip4-input",
        "ip4-input-no-checksum",
        "ip4-lookup",
        "ip6-input",
        "ip6-lookup",
    ]
    .into_iter()
    .map(|n| (n.to_owned(), Vec::new()))
    .collect();
    nodes.insert("vxlan4-input".into(), vxlan_next());
    nodes.insert("vxlan6-input".into(), vxlan_next());
    nodes
}

/// An ACL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    /// Tag.
    pub tag: String,
    /// Rules.
    pub rules: Vec<api::AclRule>,
}

/// The whole state of the fake VPP.
#[derive(Clone, Debug, PartialEq)]
pub struct FakeState {
    /// Interfaces by sw_if_index.
    pub interfaces: BTreeMap<u32, Interface>,
    /// FIB tables: (is_ip6, table_id) -> name.
    pub tables: BTreeMap<(bool, u32), String>,
    /// Routes added through the API (`ip_route_add_del`, VPP's FIB_SOURCE_API):
    /// (table_id, prefix) -> paths. The FIB also holds what VPP adds by itself (connected
    /// and local routes of addresses, a /32 per neighbour, the special drops), which
    /// [`FakeState::fib`] merges in as VPP's route dumps show it.
    pub routes: BTreeMap<(u32, IpNet), Vec<api::FibPath>>,
    /// Neighbours: (sw_if_index, address) -> entry.
    pub neighbors: BTreeMap<(u32, IpAddr), Neighbor>,
    /// NAT44-ED.
    pub nat: NatState,
    /// ACLs by index.
    pub acls: BTreeMap<u32, Acl>,
    /// ACLs applied to interfaces: sw_if_index -> (input, output).
    pub acl_bindings: BTreeMap<u32, (Vec<u32>, Vec<u32>)>,
    /// Graph nodes by name, with their next nodes (`add_node_next` appends; a next node's
    /// index is its position).
    pub nodes: BTreeMap<String, Vec<String>>,
    /// Requests handled, by message name.
    pub requests: BTreeMap<&'static str, u64>,
    /// Connections subscribed to interface events: connection id -> (client_index, pid).
    pub(crate) subscribers: BTreeMap<u64, (u32, u32)>,
    pub(crate) next_sw_if_index: u32,
    /// Indices of deleted interfaces, handed out again last-freed-first (VPP's pools).
    pub(crate) free_sw_if_indexes: Vec<u32>,
    pub(crate) next_stats_index: u32,
}

impl FakeState {
    /// A freshly booted VPP: `local0`, the DPDK NICs of startup.conf, FIB table 0.
    pub fn boot(nics: &[(String, [u8; 6])]) -> Self {
        let mut s = Self {
            interfaces: BTreeMap::new(),
            tables: BTreeMap::from([((false, 0), "ipv4-VRF:0".to_owned()), ((true, 0), "ipv6-VRF:0".to_owned())]),
            routes: BTreeMap::new(),
            neighbors: BTreeMap::new(),
            nat: NatState::default(),
            acls: BTreeMap::new(),
            acl_bindings: BTreeMap::new(),
            nodes: boot_nodes(),
            requests: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            next_sw_if_index: 0,
            free_sw_if_indexes: Vec::new(),
            next_stats_index: 1,
        };
        s.add_interface("local0".into(), InterfaceKind::Local, [0; 6]);
        for (name, mac) in nics {
            s.add_interface(name.clone(), InterfaceKind::Dpdk, *mac);
        }
        s
    }

    pub(crate) fn add_interface(&mut self, name: String, kind: InterfaceKind, mac: [u8; 6]) -> u32 {
        let sw_if_index = self.free_sw_if_indexes.pop().unwrap_or_else(|| {
            self.next_sw_if_index += 1;
            self.next_sw_if_index - 1
        });
        let mac = if mac == [0; 6] && kind != InterfaceKind::Local {
            // VPP makes up a locally administered address.
            let b = sw_if_index.to_be_bytes();
            [0x02, 0xfe, b[0], b[1], b[2], b[3]]
        } else {
            mac
        };
        self.interfaces.insert(
            sw_if_index,
            Interface {
                sw_if_index,
                name,
                kind,
                mac,
                admin_up: false,
                link_mtu: 9000,
                mtu: [9000, 0, 0, 0],
                ip4_table: 0,
                ip6_table: 0,
                unnumbered_to: None,
                addresses: Vec::new(),
                tag: String::new(),
            },
        );
        sw_if_index
    }

    /// Removes an interface and everything that refers to it, but NAT44-ED's record (as VPP);
    /// its index is the next one handed out.
    pub(crate) fn remove_interface(&mut self, sw_if_index: u32) -> Option<Interface> {
        let iface = self.interfaces.remove(&sw_if_index)?;
        for i in self.interfaces.values_mut() {
            if i.unnumbered_to == Some(sw_if_index) {
                i.unnumbered_to = None;
            }
        }
        self.routes.retain(|_, paths| {
            paths.retain(|p| p.sw_if_index != sw_if_index);
            !paths.is_empty()
        });
        self.neighbors.retain(|(i, _), _| *i != sw_if_index);
        // NAT44-ED has no hook for a deleted interface: its record stays (listed, and taken
        // for the index's next interface), the feature itself goes with the interface.
        self.nat.active.remove(&sw_if_index);
        self.nat.output_interfaces.remove(&sw_if_index);
        self.acl_bindings.remove(&sw_if_index);
        self.free_sw_if_indexes.push(sw_if_index);
        Some(iface)
    }

    /// The interface called `name`.
    pub fn interface_by_name(&self, name: &str) -> Option<&Interface> {
        self.interfaces.values().find(|i| i.name == name)
    }

    /// Routes of IPv4 table 0 added through the API as `(prefix, [(next hop, sw_if_index)])`,
    /// for quick assertions ([`FakeState::fib`] has the whole table).
    pub fn ip4_routes(&self) -> BTreeMap<IpNet, Hops> {
        self.routes
            .iter()
            .filter(|((t, p), _)| *t == 0 && matches!(p, IpNet::V4(_)))
            .map(|((_, p), paths)| {
                let hops = paths
                    .iter()
                    .map(|path| {
                        let nh = Ipv4Addr::from(path.nh.address.ip4());
                        ((!nh.is_unspecified()).then_some(IpAddr::V4(nh)), path.sw_if_index)
                    })
                    .collect();
                (*p, hops)
            })
            .collect()
    }
}

fn path(sw_if_index: u32, r#type: api::FibPathType, nh: Option<IpAddr>) -> api::FibPath {
    let (proto, address) = match nh {
        Some(IpAddr::V6(a)) => {
            (api::FibPathNhProto::FIB_API_PATH_NH_PROTO_IP6, api::AddressUnion::from_ip6(&a.octets()))
        }
        Some(IpAddr::V4(a)) => (api::FibPathNhProto::FIB_API_PATH_NH_PROTO_IP4, api::AddressUnion::from_ipv4(a)),
        None => (api::FibPathNhProto::FIB_API_PATH_NH_PROTO_IP4, api::AddressUnion::from_ipv4(Ipv4Addr::UNSPECIFIED)),
    };
    api::FibPath {
        sw_if_index,
        weight: 1,
        r#type,
        proto,
        nh: api::FibPathNh { address, ..Default::default() },
        ..Default::default()
    }
}

fn drop_path() -> api::FibPath {
    path(u32::MAX, api::FibPathType::FIB_API_PATH_TYPE_DROP, None)
}

impl FakeState {
    /// IPv4 table `table_id` as VPP's route dumps show it: for each prefix, the paths of its
    /// best source among the special drops of every table, the routes VPP adds for the
    /// addresses of admin-up interfaces (`ip4_add_interface_routes`: the local /32, the
    /// attached prefix, drops for its network and broadcast /32s), a /32 for each neighbour
    /// (`ip_neighbor_adj_fib_add`, unless added with NO_FIB_ENTRY) and the routes added
    /// through the API. IPv6 tables only hold their API routes here.
    pub fn fib(&self, table_id: u32, is_ip6: bool) -> Vec<FibEntry> {
        let mut candidates: BTreeMap<IpNet, Vec<(u8, Vec<api::FibPath>)>> = BTreeMap::new();
        let mut add = |prefix: IpNet, src: u8, paths: Vec<api::FibPath>| {
            candidates.entry(prefix).or_default().push((src, paths));
        };
        if !self.tables.contains_key(&(is_ip6, table_id)) {
            return Vec::new();
        }
        if !is_ip6 {
            let v4 = |s: &str| -> IpNet { s.parse().expect("a prefix") };
            for (p, src) in [
                ("0.0.0.0/0", fib_source::DEFAULT_ROUTE),
                ("0.0.0.0/32", fib_source::DEFAULT_ROUTE),
                ("240.0.0.0/4", fib_source::SPECIAL),
                ("224.0.0.0/4", fib_source::SPECIAL),
                ("255.255.255.255/32", fib_source::DEFAULT_ROUTE),
            ] {
                add(v4(p), src, vec![drop_path()]);
            }
            for i in self.interfaces.values().filter(|i| i.ip4_table == table_id && i.admin_up) {
                for a in i.addresses.iter().filter_map(|a| match a {
                    IpNet::V4(a) => Some(*a),
                    IpNet::V6(_) => None,
                }) {
                    let sw = i.sw_if_index;
                    let host = |ip: Ipv4Addr| IpNet::V4(Ipv4Net::new(ip, 32).expect("/32"));
                    add(
                        host(a.addr()),
                        fib_source::INTERFACE,
                        vec![path(sw, api::FibPathType::FIB_API_PATH_TYPE_LOCAL, Some(IpAddr::V4(a.addr())))],
                    );
                    if a.prefix_len() < 32 {
                        add(
                            IpNet::V4(a.trunc()),
                            fib_source::INTERFACE,
                            vec![path(sw, api::FibPathType::FIB_API_PATH_TYPE_NORMAL, None)],
                        );
                    }
                    if a.prefix_len() <= 30 {
                        for special in [a.network(), a.broadcast()] {
                            if special != a.addr() {
                                add(host(special), fib_source::INTERFACE, vec![drop_path()]);
                            }
                        }
                    } else if a.prefix_len() == 31 {
                        let other = Ipv4Addr::from(u32::from(a.addr()) ^ 1);
                        add(
                            host(other),
                            fib_source::INTERFACE,
                            vec![path(sw, api::FibPathType::FIB_API_PATH_TYPE_NORMAL, Some(IpAddr::V4(other)))],
                        );
                    }
                }
            }
            for ((sw, ip), n) in &self.neighbors {
                let IpAddr::V4(ip) = ip else { continue };
                let in_table = self.interfaces.get(sw).is_some_and(|i| i.ip4_table == table_id);
                if in_table && !n.flags.contains(api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_NO_FIB_ENTRY) {
                    add(
                        IpNet::V4(Ipv4Net::new(*ip, 32).expect("/32")),
                        fib_source::ADJ,
                        vec![path(*sw, api::FibPathType::FIB_API_PATH_TYPE_NORMAL, Some(IpAddr::V4(*ip)))],
                    );
                }
            }
        }
        for ((t, prefix), paths) in &self.routes {
            if *t == table_id && matches!(prefix, IpNet::V6(_)) == is_ip6 {
                add(*prefix, fib_source::API, paths.clone());
            }
        }
        candidates
            .into_iter()
            .filter_map(|(prefix, mut sources)| {
                sources.sort_by_key(|(src, _)| fib_source::priority(*src));
                let (src, paths) = sources.into_iter().next()?;
                Some(FibEntry { prefix, src, paths })
            })
            .collect()
    }

    /// IPv4 table 0 as `prefix -> (source, [(next hop, sw_if_index)])`, for quick assertions.
    pub fn ip4_fib(&self) -> BTreeMap<IpNet, (u8, Hops)> {
        self.fib(0, false)
            .into_iter()
            .map(|e| {
                let hops = e
                    .paths
                    .iter()
                    .map(|p| {
                        let nh = Ipv4Addr::from(p.nh.address.ip4());
                        ((!nh.is_unspecified()).then_some(IpAddr::V4(nh)), p.sw_if_index)
                    })
                    .collect();
                (e.prefix, (e.src, hops))
            })
            .collect()
    }

    /// Where VPP would send a packet to `dst` looked up in IPv4 table `table_id`: the
    /// longest matching prefix's first path, followed through recursive next hops, down to
    /// its adjacency. An attached path (no next hop) needs the destination itself resolved
    /// (VPP's glean adjacency); a path with a next hop needs the neighbour, except through
    /// a VXLAN L3 tunnel ([`InterfaceKind::is_l3_tunnel`]).
    pub fn ip4_lookup(&self, table_id: u32, dst: Ipv4Addr) -> Forwarding {
        let fib = self.fib(table_id, false);
        let mut target = dst;
        for _ in 0..8 {
            let Some(entry) = fib
                .iter()
                .filter(|e| matches!(e.prefix, IpNet::V4(p) if p.contains(&target)))
                .max_by_key(|e| e.prefix.prefix_len())
            else {
                return Forwarding::NoRoute;
            };
            let Some(p) = entry.paths.first() else { return Forwarding::Drop };
            let nh = Ipv4Addr::from(p.nh.address.ip4());
            match p.r#type {
                api::FibPathType::FIB_API_PATH_TYPE_LOCAL => return Forwarding::Local { sw_if_index: p.sw_if_index },
                api::FibPathType::FIB_API_PATH_TYPE_NORMAL => {}
                _ => return Forwarding::Drop,
            }
            let Some(iface) = self.interfaces.get(&p.sw_if_index) else {
                if nh.is_unspecified() {
                    return Forwarding::Drop;
                }
                target = nh; // recursive: resolve the next hop
                continue;
            };
            let next_hop = IpAddr::V4(if nh.is_unspecified() { target } else { nh });
            if !iface.admin_up {
                return Forwarding::Drop;
            }
            let sw_if_index = p.sw_if_index;
            let known = self.neighbors.contains_key(&(sw_if_index, next_hop));
            return match (iface.kind.is_l3_tunnel(), nh.is_unspecified(), known) {
                (true, _, true) => Forwarding::EthernetRewriteOnTunnel { sw_if_index, next_hop },
                (true, true, false) => Forwarding::Arp { sw_if_index, next_hop, possible: false },
                (true, false, false) | (false, _, true) => Forwarding::Complete { sw_if_index, next_hop },
                (false, _, false) => Forwarding::Arp { sw_if_index, next_hop, possible: true },
            };
        }
        Forwarding::Drop
    }

    /// What VPP would do with a VXLAN packet from `outer_src` to its address `outer_dst`
    /// with `vni`, carrying `inner`: the tunnel with these ends and VNI decapsulates it,
    /// and the inner packet is received on the tunnel ([`FakeState::ip4_rx`]: its input
    /// ACLs, then [`FakeState::ip4_lookup`] in its table). The outer packet's input ACLs on
    /// the interface it arrived on, the decapsulating node, the tunnel's IP enablement
    /// (unnumbered or an address) and admin state are not looked at here.
    pub fn vxlan4_rx(&self, outer_src: Ipv4Addr, outer_dst: Ipv4Addr, vni: u32, inner: Packet4) -> VxlanRx {
        let tunnel = self.interfaces.values().find(|i| {
            matches!(&i.kind, InterfaceKind::Vxlan(t) if t.src_address.to_ipv4() == Some(outer_dst)
                && t.dst_address.to_ipv4() == Some(outer_src)
                && t.vni == vni)
        });
        let Some(tunnel) = tunnel else { return VxlanRx::NoTunnel };
        let sw_if_index = tunnel.sw_if_index;
        match self.ip4_rx(sw_if_index, inner) {
            Ip4Rx::Denied { acl_index } => VxlanRx::Denied { sw_if_index, acl_index },
            Ip4Rx::Forward(forwarding) => VxlanRx::Forward { sw_if_index, forwarding },
        }
    }

    /// What VPP would do with IPv4 packet `p` received on interface `sw_if_index` (a plain
    /// packet from the wire on the uplink, a decapsulated one on a tunnel): the ACL plugin
    /// checks it against the interface's input ACLs in order (the first matching rule
    /// decides; none matching is the implicit deny, on an interface with at least one input
    /// ACL), and what passes is looked up in the interface's table (the default table for
    /// an interface the fake does not have). NAT44-ED, which runs after the ACL plugin on
    /// the same feature arc, and the interface's IP enablement and admin state are not
    /// looked at here.
    pub fn ip4_rx(&self, sw_if_index: u32, p: Packet4) -> Ip4Rx {
        let input = self.acl_bindings.get(&sw_if_index).map(|(input, _)| input.as_slice()).unwrap_or_default();
        if !input.is_empty() {
            let verdict = input.iter().find_map(|index| {
                let rule = self.acls.get(index)?.rules.iter().find(|r| acl_rule_matches(r, &p))?;
                Some((*index, rule.is_permit != api::AclAction::ACL_ACTION_API_DENY))
            });
            match verdict {
                Some((_, true)) => {}
                Some((index, false)) => return Ip4Rx::Denied { acl_index: Some(index) },
                None => return Ip4Rx::Denied { acl_index: None },
            }
        }
        let table = self.interfaces.get(&sw_if_index).map_or(0, |i| i.ip4_table);
        Ip4Rx::Forward(self.ip4_lookup(table, p.dst))
    }

    /// The graph node a VXLAN tunnel hands decapsulated packets to (its `decap_next_index`
    /// among vxlan4-input's / vxlan6-input's next nodes); `l2-input` on an L3 tunnel drops
    /// them (VPP puts an L3 tunnel in no bridge domain and drops there).
    pub fn vxlan_decap_next(&self, sw_if_index: u32) -> Option<&str> {
        let InterfaceKind::Vxlan(t) = &self.interfaces.get(&sw_if_index)?.kind else { return None };
        let input = if t.src_address.to_ip()?.is_ipv6() { "vxlan6-input" } else { "vxlan4-input" };
        self.nodes.get(input)?.get(t.decap_next_index as usize).map(String::as_str)
    }
}
