//! What the fake VPP holds: the objects a client programs, kept close to VPP's own model
//! (sw_if_index numbering, FIB tables with paths, neighbour table, NAT44-ED and ACL plugin
//! state). Lost on a simulated restart, like VPP's.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use contiv_vpp_binapi::api;
use ipnet::IpNet;

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
    /// VPP's `interface_dev_type` string.
    pub fn dev_type(&self) -> &'static str {
        match self {
            InterfaceKind::Local => "local",
            InterfaceKind::Dpdk => "dpdk",
            InterfaceKind::AfXdp(_) => "af_xdp",
            InterfaceKind::Tap { .. } => "virtio",
            InterfaceKind::Vxlan(_) => "VXLAN",
            InterfaceKind::Loopback { .. } => "Loopback",
        }
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
    /// The plugin's enable request, while enabled.
    pub enabled: Option<api::Nat44EdPluginEnableDisable>,
    /// Interfaces with the in2out/out2in feature: sw_if_index -> NAT_IS_INSIDE / NAT_IS_OUTSIDE bits.
    pub interfaces: BTreeMap<u32, u8>,
    /// Interfaces with the output feature.
    pub output_interfaces: BTreeSet<u32>,
    /// Address pool: address -> (vrf, flags).
    pub addresses: BTreeMap<Ipv4Addr, (u32, api::NatConfigFlags)>,
    /// Static mappings.
    pub static_mappings: Vec<api::Nat44AddDelStaticMappingV2>,
    /// Identity mappings.
    pub identity_mappings: Vec<api::Nat44AddDelIdentityMapping>,
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
    /// Routes: (table_id, prefix) -> paths.
    pub routes: BTreeMap<(u32, IpNet), Vec<api::FibPath>>,
    /// Neighbours: (sw_if_index, address) -> entry.
    pub neighbors: BTreeMap<(u32, IpAddr), Neighbor>,
    /// NAT44-ED.
    pub nat: NatState,
    /// ACLs by index.
    pub acls: BTreeMap<u32, Acl>,
    /// ACLs applied to interfaces: sw_if_index -> (input, output).
    pub acl_bindings: BTreeMap<u32, (Vec<u32>, Vec<u32>)>,
    /// Requests handled, by message name.
    pub requests: BTreeMap<&'static str, u64>,
    /// Connections subscribed to interface events: connection id -> (client_index, pid).
    pub(crate) subscribers: BTreeMap<u64, (u32, u32)>,
    pub(crate) next_sw_if_index: u32,
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
            requests: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            next_sw_if_index: 0,
            next_stats_index: 1,
        };
        s.add_interface("local0".into(), InterfaceKind::Local, [0; 6]);
        for (name, mac) in nics {
            s.add_interface(name.clone(), InterfaceKind::Dpdk, *mac);
        }
        s
    }

    pub(crate) fn add_interface(&mut self, name: String, kind: InterfaceKind, mac: [u8; 6]) -> u32 {
        let sw_if_index = self.next_sw_if_index;
        self.next_sw_if_index += 1;
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

    /// Removes an interface and everything that refers to it.
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
        self.nat.interfaces.remove(&sw_if_index);
        self.nat.output_interfaces.remove(&sw_if_index);
        self.acl_bindings.remove(&sw_if_index);
        Some(iface)
    }

    /// The interface called `name`.
    pub fn interface_by_name(&self, name: &str) -> Option<&Interface> {
        self.interfaces.values().find(|i| i.name == name)
    }

    /// Routes of IPv4 table 0 as `(prefix, [(next hop, sw_if_index)])`, for quick assertions.
    pub fn ip4_routes(&self) -> BTreeMap<IpNet, Vec<(Option<IpAddr>, u32)>> {
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
