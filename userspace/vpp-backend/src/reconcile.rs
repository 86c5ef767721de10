//! Converges VPP to a [`VppDesired`]: dumps what VPP holds, computes the difference and
//! applies it in dependency order, like a KV scheduler resync:
//!
//! 1. stale NAT config, stale routes, stale static neighbours, stale interfaces are removed
//!    (dependents before what they depend on);
//! 2. missing interfaces are created; input ACLs are created (or their rules replaced in
//!    place) and bound, stale ones unbound and deleted; then the interfaces' MAC, MTU,
//!    unnumbered source, addresses and admin state are set (an interface whose input ACL
//!    is fail-closed and could not be bound gets no address and stays down);
//! 3. neighbours, routes, then NAT (plugin, features, pool, mappings) are added.
//!
//! Requests of one step go out together (pipelined); steps run one after the other. A
//! request VPP refuses is reported and the rest continues; a lost connection stops the pass
//! ([`ReconcileError::Connection`]) so the caller reconnects and runs it again.
//!
//! # What the reconciler owns in VPP
//! Every af_xdp, tap and VXLAN interface; the static neighbours and the default table's
//! IPv4 routes added through the API that go through an interface it owns or configures;
//! the addresses, MAC, MTU, unnumbered source and admin state of the interfaces it
//! configures; when [`VppDesired::nat`] is set, the whole NAT44-ED configuration; the ACLs
//! whose tag starts with [`crate::desired::ACL_TAG_PREFIX`], and the ACL lists of the
//! interfaces that have one in [`VppDesired::input_acls`].
//! Anything else in VPP is left alone, in particular the routes VPP adds by itself: the
//! connected and local routes of interface addresses, and the /32 it adds for every
//! neighbour, static or learned by ARP (FIB source "adjacency"). `ip_route_v2_dump` tells a
//! route's source; against a VPP without it, routes matching an address or a neighbour are
//! taken for VPP's own.
//!
//! # Real VPP's answers it relies on
//! - `nat44_show_running_config` answers retval 0 whether NAT44-ED is enabled or not; a
//!   disabled plugin's running configuration is zeroed, so `sessions` (never 0 once enabled:
//!   VPP replaces 0 by its default) tells whether it runs. A second enable is refused with
//!   FEATURE_ALREADY_ENABLED (-170), whatever its parameters, and NAT configuration sent
//!   while disabled with UNSUPPORTED (-126).
//! - A VXLAN tunnel created through the API with `decap_next_index = ~0` hands decapsulated
//!   packets to `l2-input`, L3 tunnel or not, where an L3 tunnel drops them; the arc from
//!   `vxlan4-input` to `ip4-input` is asked for with `add_node_next` (its index depends on
//!   the VPP build and run, so it is asked once per connection).
//! - A VXLAN L3 tunnel is not point-to-point for VPP's FIB: a route through it without a
//!   next hop gets a glean (ARP) adjacency, and ARP cannot work over an L3 tunnel. Routes
//!   through tunnels carry a next hop, which VPP completes without ARP or neighbour entry
//!   ([`crate::desired::tunnel_next_hop`]).
//! - The ACL plugin numbers ACLs itself, so the reconciler finds its own by tag.
//!   `acl_add_replace` with an existing index replaces the rules and keeps the bindings;
//!   `acl_interface_set_acl_list` sets an interface's whole lists (setting them again is a
//!   no-op); `acl_del` of a listed ACL is refused (ACL_IN_USE_INBOUND, -142), and deleting
//!   an interface empties its lists. An input ACL of an L3 tunnel checks the decapsulated
//!   packets: they enter ip4-input with the tunnel as receive interface, and the plugin's
//!   `acl-plugin-in-ip4-fa` runs on that interface's ip4-unicast feature arc. On the
//!   uplink that arc also holds NAT44-ED's `nat44-ed-out2in`, registered to run after the
//!   ACL plugin (nat44_ed.c): the uplink's ACL sees packets as they came from the wire, and
//!   a packet it drops opens no NAT session. It judges sources only, which out2in does not
//!   rewrite anyway.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use contiv_vpp_binapi::{Client, Error as ApiError, Request, api};
use futures::future::{BoxFuture, join_all};
use ipnet::Ipv4Net;
use serde::Serialize;

use crate::config::AfXdpMode;
use crate::desired::{
    ACL_TAG_PREFIX, AF_XDP_DEV_TYPE, IdentityMapping, InputAcl, InterfaceKind, InterfaceSpec, NatSpec, NeighborSpec,
    RouteSpec, StaticMapping, VppDesired,
};

const ALL: u32 = u32::MAX;

/// `fib_source_t` FIB_SOURCE_API (vnet/fib/fib_source.h): routes added with `ip_route_add_del`.
const FIB_SOURCE_API: u8 = 8;

/// VNET_API_ERROR_FEATURE_ALREADY_ENABLED (vnet/error.h).
const FEATURE_ALREADY_ENABLED: i32 = -170;
/// VNET_API_ERROR_FEATURE_ALREADY_DISABLED (vnet/error.h).
const FEATURE_ALREADY_DISABLED: i32 = -169;

/// The graph node that decapsulates IPv4 VXLAN, and where an L3 tunnel's packets go next.
const VXLAN4_INPUT: &str = "vxlan4-input";
const IP4_INPUT: &str = "ip4-input";

/// A pass could not complete.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The connection to VPP is gone (or never came up): reconnect and run again.
    #[error("VPP connection: {0}")]
    Connection(#[source] ApiError),
    /// VPP's state could not be read (e.g. VPP refuses a dump's CRC); nothing was changed.
    #[error("reading VPP's state: {0}")]
    Read(#[source] ApiError),
}

impl ReconcileError {
    /// Whether reconnecting may help.
    pub fn is_connection(&self) -> bool {
        matches!(self, ReconcileError::Connection(_))
    }
}

fn is_connection_error(e: &ApiError) -> bool {
    matches!(e, ApiError::NotConnected | ApiError::Disconnected | ApiError::Timeout { .. } | ApiError::Connect { .. })
}

fn classify(e: ApiError) -> ReconcileError {
    if is_connection_error(&e) { ReconcileError::Connection(e) } else { ReconcileError::Read(e) }
}

/// A change VPP refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// What was tried.
    pub what: String,
    /// VPP's answer.
    pub error: String,
}

/// The outcome of one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// The client connection the pass ran on (see `ConnectionState::generation`).
    pub generation: u64,
    /// Changes applied, in order.
    pub applied: Vec<String>,
    /// Changes VPP refused.
    pub failed: Vec<Failure>,
}

impl ReconcileReport {
    /// Nothing was refused: VPP holds what was desired.
    pub fn converged(&self) -> bool {
        self.failed.is_empty()
    }
}

// === what VPP holds ===

#[derive(Clone, Debug)]
struct ObsInterface {
    sw_if_index: u32,
    dev_type: String,
    admin_up: bool,
    mac: [u8; 6],
    mtu: u32,
    addresses: BTreeSet<Ipv4Net>,
    unnumbered_to: Option<u32>,
    vxlan: Option<api::VxlanTunnelV2Details>,
    tap: Option<api::SwInterfaceTapV2Details>,
}

impl ObsInterface {
    fn fresh(sw_if_index: u32) -> Self {
        Self {
            sw_if_index,
            dev_type: String::new(),
            admin_up: false,
            mac: [0; 6],
            mtu: 0,
            addresses: BTreeSet::new(),
            unnumbered_to: None,
            vxlan: None,
            tap: None,
        }
    }

    /// Whether VPP takes IP packets in on it: up, with an address of its own or one it
    /// borrows.
    fn is_open(&self) -> bool {
        self.admin_up && (self.unnumbered_to.is_some() || !self.addresses.is_empty())
    }

    /// An interface of a kind the reconciler owns (and may delete).
    fn owned(&self, name: &str) -> bool {
        self.vxlan.is_some() || self.tap.is_some() || self.dev_type == AF_XDP_DEV_TYPE || name.starts_with("xdp-")
    }
}

/// NAT44-ED as it runs (the plugin is enabled).
#[derive(Clone, Debug, Default)]
struct ObsNat {
    /// Sessions per thread, inside and outside VRF it was enabled with.
    sessions: u32,
    inside_vrf: u32,
    outside_vrf: u32,
    interfaces: Vec<(u32, u8)>,
    pool: BTreeSet<Ipv4Addr>,
    identity: Vec<api::Nat44IdentityMappingDetails>,
    statics: Vec<api::Nat44StaticMappingDetails>,
}

/// A route of the default table as VPP dumps it: its best source's paths.
#[derive(Clone, Debug)]
struct ObsRoute {
    dst: Ipv4Net,
    paths: Vec<api::FibPath>,
    /// The best source (`fib_source_t`), when VPP has `ip_route_v2_dump`.
    src: Option<u8>,
}

/// The ACL plugin's ACLs and interface lists.
#[derive(Clone, Debug, Default)]
struct ObsAcls {
    /// ACLs by index.
    acls: BTreeMap<u32, api::AclDetails>,
    /// ACL lists by sw_if_index: (input, output).
    lists: BTreeMap<u32, (Vec<u32>, Vec<u32>)>,
}

#[derive(Clone, Debug, Default)]
struct Observed {
    interfaces: BTreeMap<String, ObsInterface>,
    routes: Vec<ObsRoute>,
    neighbors: Vec<api::IpNeighbor>,
    /// NAT44-ED, if enabled.
    nat: Option<ObsNat>,
    /// The ACL plugin's state; None if VPP has no ACL plugin (its dumps are not in the
    /// message table).
    acls: Option<ObsAcls>,
}

impl Observed {
    fn name_of(&self, sw_if_index: u32) -> Option<&str> {
        self.interfaces.iter().find(|(_, i)| i.sw_if_index == sw_if_index).map(|(n, _)| n.as_str())
    }

    /// Whether `r` was added through the API (so `ip_route_add_del` can delete it), rather
    /// than by VPP itself: a connected or local route of an address, or the /32 VPP adds
    /// for a neighbour (which VPP would answer 0 to deleting, and keep).
    fn added_through_api(&self, r: &ObsRoute) -> bool {
        if let Some(src) = r.src {
            return src == FIB_SOURCE_API;
        }
        // No source in the dump (no ip_route_v2_dump): recognise VPP's own routes.
        let of_address = self.interfaces.values().flat_map(|i| &i.addresses).any(|a| {
            r.dst == a.trunc()
                || (r.dst.prefix_len() == 32 && [a.addr(), a.network(), a.broadcast()].contains(&r.dst.addr()))
        });
        let of_neighbor = r.dst.prefix_len() == 32
            && matches!(r.paths.as_slice(), [p] if Ipv4Addr::from(p.nh.address.ip4()) == r.dst.addr()
                && self.neighbors.iter().any(|n| n.sw_if_index == p.sw_if_index
                    && n.ip_address.to_ipv4() == Some(r.dst.addr())));
        !of_address && !of_neighbor
    }
}

async fn dump_routes(c: &Client) -> Result<Vec<ObsRoute>, ApiError> {
    let table = api::IpTable { table_id: 0, is_ip6: false, name: String::new() };
    let routes = if c.supports::<api::IpRouteV2Dump>().is_ok() {
        c.dump(&api::IpRouteV2Dump { src: 0, table })
            .await?
            .into_iter()
            .filter_map(|r| {
                let dst = r.route.prefix.to_ipv4_net()?.trunc();
                Some(ObsRoute { dst, paths: r.route.paths, src: Some(r.route.src) })
            })
            .collect()
    } else {
        c.dump(&api::IpRouteDump { table })
            .await?
            .into_iter()
            .filter_map(|r| {
                Some(ObsRoute { dst: r.route.prefix.to_ipv4_net()?.trunc(), paths: r.route.paths, src: None })
            })
            .collect()
    };
    Ok(routes)
}

async fn dump_acls(c: &Client) -> Result<Option<ObsAcls>, ApiError> {
    if c.supports::<api::AclDump>().is_err() || c.supports::<api::AclInterfaceListDump>().is_err() {
        return Ok(None);
    }
    let (acls, lists) = tokio::try_join!(
        c.dump(&api::AclDump { acl_index: ALL }),
        c.dump(&api::AclInterfaceListDump { sw_if_index: ALL })
    )?;
    Ok(Some(ObsAcls {
        acls: acls.into_iter().map(|a| (a.acl_index, a)).collect(),
        // VPP lists every interface, those without ACLs with empty lists.
        lists: lists
            .into_iter()
            .map(|l| {
                let n_input = (l.n_input as usize).min(l.acls.len());
                (l.sw_if_index, (l.acls[..n_input].to_vec(), l.acls[n_input..].to_vec()))
            })
            .collect(),
    }))
}

async fn observe(c: &Client) -> Result<Observed, ReconcileError> {
    let (ifaces, unnumbered, vxlans, taps, routes, neighbors, nat_cfg, acls) = tokio::try_join!(
        c.dump(&api::SwInterfaceDump::default()),
        c.dump(&api::IpUnnumberedDump { sw_if_index: ALL }),
        c.dump(&api::VxlanTunnelV2Dump { sw_if_index: ALL }),
        c.dump(&api::SwInterfaceTapV2Dump { sw_if_index: ALL }),
        dump_routes(c),
        c.dump(&api::IpNeighborDump { sw_if_index: ALL, af: api::AddressFamily::ADDRESS_IP4 }),
        c.request_unchecked(&api::Nat44ShowRunningConfig::default()),
        dump_acls(c),
    )
    .map_err(classify)?;
    let addresses =
        join_all(ifaces.iter().map(|i| c.dump(&api::IpAddressDump { sw_if_index: i.sw_if_index, is_ipv6: false })))
            .await;
    let mut obs = Observed::default();
    for (d, addrs) in ifaces.into_iter().zip(addresses) {
        let addrs = addrs.map_err(classify)?;
        obs.interfaces.insert(
            d.interface_name.clone(),
            ObsInterface {
                sw_if_index: d.sw_if_index,
                dev_type: d.interface_dev_type.clone(),
                admin_up: d.flags.contains(api::IfStatusFlags::IF_STATUS_API_FLAG_ADMIN_UP),
                mac: d.l2_address,
                mtu: d.mtu[0],
                addresses: addrs.iter().filter_map(|a| a.prefix.to_ipv4_net()).collect(),
                unnumbered_to: unnumbered.iter().find(|u| u.sw_if_index == d.sw_if_index).map(|u| u.ip_sw_if_index),
                vxlan: vxlans.iter().find(|v| v.sw_if_index == d.sw_if_index).cloned(),
                tap: taps.iter().find(|t| t.sw_if_index == d.sw_if_index).cloned(),
            },
        );
    }
    obs.routes = routes;
    obs.neighbors = neighbors.into_iter().map(|n| n.neighbor).collect();
    obs.acls = acls;
    // retval 0 either way; a disabled plugin's running config is zeroed (sessions = 0).
    if nat_cfg.retval == 0 && nat_cfg.sessions != 0 {
        let (ifs, pool, identity, statics) = tokio::try_join!(
            c.dump(&api::Nat44InterfaceDump::default()),
            c.dump(&api::Nat44AddressDump::default()),
            c.dump(&api::Nat44IdentityMappingDump::default()),
            c.dump(&api::Nat44StaticMappingDump::default()),
        )
        .map_err(classify)?;
        obs.nat = Some(ObsNat {
            sessions: nat_cfg.sessions,
            inside_vrf: nat_cfg.inside_vrf,
            outside_vrf: nat_cfg.outside_vrf,
            interfaces: ifs.iter().map(|i| (i.sw_if_index, i.flags.0)).collect(),
            pool: pool.iter().map(|a| Ipv4Addr::from(a.ip_address)).collect(),
            identity,
            statics,
        });
    }
    Ok(obs)
}

// === applying ===

type Op = (String, BoxFuture<'static, Result<Option<u32>, ApiError>>);

fn op<M: Request>(c: &Client, what: String, msg: M) -> Op {
    let c = c.clone();
    (what, Box::pin(async move { c.request(&msg).await.map(|_| None) }))
}

/// As [`op`], with VPP's answer `done` (e.g. "already enabled") taken for success.
fn op_or<M: Request>(c: &Client, what: String, msg: M, done: i32) -> Op {
    let c = c.clone();
    (
        what,
        Box::pin(async move {
            match c.request(&msg).await {
                Err(ApiError::Retval { retval, .. }) if retval == done => Ok(None),
                r => r.map(|_| None),
            }
        }),
    )
}

/// Runs one step's requests together; returns the ones that succeeded with their result.
async fn run_step(ops: Vec<Op>, report: &mut ReconcileReport) -> Result<Vec<(String, Option<u32>)>, ReconcileError> {
    let (names, futures): (Vec<String>, Vec<_>) = ops.into_iter().unzip();
    let results = join_all(futures).await;
    let mut done = Vec::new();
    let mut lost = None;
    for (what, r) in names.into_iter().zip(results) {
        match r {
            Ok(v) => {
                report.applied.push(what.clone());
                done.push((what, v));
            }
            Err(e) if is_connection_error(&e) => lost = Some(e),
            Err(e) => {
                log::warn!("VPP refused {what}: {e}");
                report.failed.push(Failure { what, error: e.to_string() });
            }
        }
    }
    match lost {
        Some(e) => Err(ReconcileError::Connection(e)),
        None => Ok(done),
    }
}

fn fib_path(sw_if_index: u32, next_hop: Option<Ipv4Addr>) -> api::FibPath {
    api::FibPath {
        sw_if_index,
        table_id: 0,
        rpf_id: 0,
        weight: 1,
        preference: 0,
        r#type: api::FibPathType::FIB_API_PATH_TYPE_NORMAL,
        flags: api::FibPathFlags::FIB_API_PATH_FLAG_NONE,
        proto: api::FibPathNhProto::FIB_API_PATH_NH_PROTO_IP4,
        nh: api::FibPathNh {
            address: api::AddressUnion::from_ipv4(next_hop.unwrap_or(Ipv4Addr::UNSPECIFIED)),
            via_label: 0,
            obj_id: 0,
            classify_table_index: ALL,
        },
        n_labels: 0,
        label_stack: Default::default(),
    }
}

fn route_msg(is_add: bool, dst: Ipv4Net, paths: Vec<api::FibPath>) -> api::IpRouteAddDel {
    api::IpRouteAddDel {
        is_add,
        is_multipath: false,
        route: api::IpRoute { table_id: 0, stats_index: 0, prefix: dst.into(), n_paths: paths.len() as u8, paths },
    }
}

fn route_matches(paths: &[api::FibPath], sw_if_index: u32, next_hop: Option<Ipv4Addr>) -> bool {
    matches!(paths, [p] if p.sw_if_index == sw_if_index
        && Ipv4Addr::from(p.nh.address.ip4()) == next_hop.unwrap_or(Ipv4Addr::UNSPECIFIED)
        && p.r#type == api::FibPathType::FIB_API_PATH_TYPE_NORMAL)
}

/// Whether an observed interface was created with the parameters `spec` asks for;
/// `decap_next` is the tunnels' arc to ip4-input (None: unknown, any will do).
fn same_kind(obs: &ObsInterface, spec: &InterfaceSpec, decap_next: Option<u32>) -> bool {
    match &spec.kind {
        InterfaceKind::Existing | InterfaceKind::AfXdp { .. } => true,
        InterfaceKind::Vxlan { src, dst, vni, instance } => obs.vxlan.as_ref().is_some_and(|v| {
            v.src_address.to_ipv4() == Some(*src)
                && v.dst_address.to_ipv4() == Some(*dst)
                && v.vni == *vni
                && v.instance == *instance
                && decap_next.is_none_or(|n| v.decap_next_index == n)
        }),
        InterfaceKind::Tap { id, host_if_name, host_ip4, .. } => obs.tap.as_ref().is_some_and(|t| {
            t.id == *id && t.host_if_name == *host_if_name && t.host_ip4_prefix.to_net() == Some(*host_ip4)
        }),
    }
}

/// The request creating `kind`; None for an interface VPP has from boot. `decap_next` is
/// the arc from vxlan4-input to ip4-input, which a tunnel needs.
fn create_msg_op(c: &Client, name: &str, kind: &InterfaceKind, decap_next: u32) -> Option<Op> {
    let c = c.clone();
    let what = format!("create interface {name}");
    let fut: BoxFuture<'static, Result<Option<u32>, ApiError>> = match kind.clone() {
        InterfaceKind::Existing => return None,
        InterfaceKind::AfXdp { host_if, rxq_num, mode } => {
            let msg = api::AfXdpCreateV3 {
                host_if,
                name: name.to_owned(),
                rxq_num,
                mode: match mode {
                    AfXdpMode::Auto => api::AfXdpMode::AF_XDP_API_MODE_AUTO,
                    AfXdpMode::Copy => api::AfXdpMode::AF_XDP_API_MODE_COPY,
                    AfXdpMode::ZeroCopy => api::AfXdpMode::AF_XDP_API_MODE_ZERO_COPY,
                },
                ..Default::default()
            };
            Box::pin(async move { c.request(&msg).await.map(|r| Some(r.sw_if_index)) })
        }
        InterfaceKind::Tap { id, host_if_name, host_ip4, host_mac, host_gateway } => {
            let msg = api::TapCreateV3 {
                id,
                use_random_mac: true,
                host_if_name_set: true,
                host_if_name,
                host_ip4_prefix_set: true,
                host_ip4_prefix: host_ip4.into(),
                host_mac_addr_set: true,
                host_mac_addr: host_mac,
                host_ip4_gw_set: host_gateway.is_some(),
                host_ip4_gw: host_gateway.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
                ..Default::default()
            };
            Box::pin(async move { c.request(&msg).await.map(|r| Some(r.sw_if_index)) })
        }
        InterfaceKind::Vxlan { src, dst, vni, instance } => {
            let msg = api::VxlanAddDelTunnelV3 {
                is_add: true,
                instance,
                src_address: src.into(),
                dst_address: dst.into(),
                src_port: crate::desired::VXLAN_PORT,
                dst_port: crate::desired::VXLAN_PORT,
                mcast_sw_if_index: ALL,
                encap_vrf_id: 0,
                // Not ~0: through the API that means l2-input, where an L3 tunnel drops.
                decap_next_index: decap_next,
                vni,
                is_l3: true,
            };
            Box::pin(async move { c.request(&msg).await.map(|r| Some(r.sw_if_index)) })
        }
    };
    Some((what, fut))
}

fn delete_op(c: &Client, name: &str, obs: &ObsInterface) -> Option<Op> {
    let what = format!("delete interface {name}");
    let sw = obs.sw_if_index;
    if let Some(v) = &obs.vxlan {
        let msg = api::VxlanAddDelTunnelV3 {
            is_add: false,
            instance: v.instance,
            src_address: v.src_address.clone(),
            dst_address: v.dst_address.clone(),
            src_port: v.src_port,
            dst_port: v.dst_port,
            mcast_sw_if_index: v.mcast_sw_if_index,
            encap_vrf_id: v.encap_vrf_id,
            decap_next_index: v.decap_next_index,
            vni: v.vni,
            is_l3: true,
        };
        return Some(op(c, what, msg));
    }
    if obs.tap.is_some() {
        return Some(op(c, what, api::TapDeleteV2 { sw_if_index: sw }));
    }
    if obs.owned(name) {
        return Some(op(c, what, api::AfXdpDelete { sw_if_index: sw }));
    }
    None
}

fn nat_flag(inside: bool) -> api::NatConfigFlags {
    if inside { api::NatConfigFlags::NAT_IS_INSIDE } else { api::NatConfigFlags::NAT_IS_OUTSIDE }
}

fn identity_of(d: &api::Nat44IdentityMappingDetails) -> IdentityMapping {
    IdentityMapping { ip: Ipv4Addr::from(d.ip_address), proto: d.protocol, port: d.port }
}

fn static_of(d: &api::Nat44StaticMappingDetails) -> StaticMapping {
    StaticMapping {
        proto: d.protocol,
        external: Ipv4Addr::from(d.external_ip_address),
        external_port: d.external_port,
        local: Ipv4Addr::from(d.local_ip_address),
        local_port: d.local_port,
    }
}

fn identity_msg(is_add: bool, m: &IdentityMapping) -> api::Nat44AddDelIdentityMapping {
    api::Nat44AddDelIdentityMapping {
        is_add,
        flags: api::NatConfigFlags::NAT_IS_NONE,
        ip_address: m.ip.octets(),
        protocol: m.proto,
        port: m.port,
        sw_if_index: ALL,
        vrf_id: 0,
        tag: "contiv".into(),
    }
}

fn static_msg(is_add: bool, m: &StaticMapping) -> api::Nat44AddDelStaticMappingV2 {
    api::Nat44AddDelStaticMappingV2 {
        is_add,
        match_pool: false,
        flags: api::NatConfigFlags::NAT_IS_NONE,
        pool_ip_address: [0; 4],
        local_ip_address: m.local.octets(),
        external_ip_address: m.external.octets(),
        protocol: m.proto,
        local_port: m.local_port,
        external_port: m.external_port,
        external_sw_if_index: ALL,
        vrf_id: 0,
        tag: "contiv".into(),
    }
}

fn pool_msg(is_add: bool, a: Ipv4Addr) -> api::Nat44AddDelAddressRange {
    api::Nat44AddDelAddressRange {
        first_ip_address: a.octets(),
        last_ip_address: a.octets(),
        vrf_id: 0,
        is_add,
        flags: api::NatConfigFlags::NAT_IS_NONE,
    }
}

/// The rules of `acl`: a stateless permit or deny of each source to anywhere. Protocol 0
/// is any protocol, for which the plugin looks at no ports; the full port ranges are what
/// VPP's own CLI puts there.
fn acl_rules(acl: &InputAcl) -> Vec<api::AclRule> {
    acl.rules
        .iter()
        .map(|rule| api::AclRule {
            is_permit: if rule.permit {
                api::AclAction::ACL_ACTION_API_PERMIT
            } else {
                api::AclAction::ACL_ACTION_API_DENY
            },
            // VPP refuses a prefix with host bits set.
            src_prefix: rule.src.trunc().into(),
            dst_prefix: Ipv4Net::default().into(),
            proto: api::IpProto(0),
            srcport_or_icmptype_first: 0,
            srcport_or_icmptype_last: u16::MAX,
            dstport_or_icmpcode_first: 0,
            dstport_or_icmpcode_last: u16::MAX,
            tcp_flags_mask: 0,
            tcp_flags_value: 0,
        })
        .collect()
}

/// Whether the rules VPP dumps are `want`, prefixes compared as prefixes (not as the bytes
/// of the address union).
fn same_rules(have: &[api::AclRule], want: &[api::AclRule]) -> bool {
    let key = |r: &api::AclRule| {
        (
            r.is_permit,
            r.src_prefix.to_net(),
            r.dst_prefix.to_net(),
            r.proto,
            [r.srcport_or_icmptype_first, r.srcport_or_icmptype_last],
            [r.dstport_or_icmpcode_first, r.dstport_or_icmpcode_last],
            [r.tcp_flags_mask, r.tcp_flags_value],
        )
    };
    have.len() == want.len() && have.iter().zip(want).all(|(h, w)| key(h) == key(w))
}

/// `acl_add_replace`: creates an ACL (`acl_index` ~0) or replaces the rules of one in
/// place (its bindings stay); the result is its index.
fn acl_op(c: &Client, what: String, acl_index: u32, acl: &InputAcl) -> Op {
    let c = c.clone();
    let r = acl_rules(acl);
    let msg = api::AclAddReplace { acl_index, tag: acl.tag.clone(), count: r.len() as u32, r };
    (what, Box::pin(async move { c.request(&msg).await.map(|r| Some(r.acl_index)) }))
}

/// `acl_interface_set_acl_list`: the interface's whole input and output lists at once.
fn acl_list_msg(sw_if_index: u32, input: &[u32], output: &[u32]) -> api::AclInterfaceSetAclList {
    let acls: Vec<u32> = input.iter().chain(output).copied().collect();
    api::AclInterfaceSetAclList { sw_if_index, count: acls.len() as u8, n_input: input.len() as u8, acls }
}

// === impl Reconciler ===

/// Converges VPP to a desired state over a [`Client`].
#[derive(Clone, Debug)]
pub struct Reconciler {
    client: Client,
    /// The arc from vxlan4-input to ip4-input, with the connection generation it was got on
    /// (a VPP restart, hence a new connection, may number it differently).
    decap_next: Arc<Mutex<Option<(u64, u32)>>>,
}

impl Reconciler {
    /// A reconciler working through `client` (connected or not).
    pub fn new(client: Client) -> Self {
        Self { client, decap_next: Arc::default() }
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The index of ip4-input among vxlan4-input's next nodes (`add_node_next` adds the arc
    /// or returns the one there), once per connection.
    async fn vxlan_decap_next(&self) -> Result<u32, ApiError> {
        let generation = self.client.state().generation;
        let cached = *self.decap_next.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, next)) = cached
            && g == generation
        {
            return Ok(next);
        }
        let arc = api::AddNodeNext { node_name: VXLAN4_INPUT.into(), next_name: IP4_INPUT.into() };
        let next = self.client.request(&arc).await?.next_index;
        *self.decap_next.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, next));
        Ok(next)
    }

    /// One pass: dump, diff, apply. Returns what was applied and what VPP refused.
    pub async fn reconcile(&self, desired: &VppDesired) -> Result<ReconcileReport, ReconcileError> {
        let c = &self.client;
        let mut report = ReconcileReport { generation: c.state().generation, ..Default::default() };
        let obs = observe(c).await?;
        // L3 tunnels decapsulate to ip4-input through an arc only VPP can number.
        let wants_tunnels = desired.interfaces.values().any(|s| matches!(s.kind, InterfaceKind::Vxlan { .. }));
        let decap_next = match wants_tunnels {
            false => None,
            true => match self.vxlan_decap_next().await {
                Ok(next) => Some(next),
                Err(e) if is_connection_error(&e) => return Err(ReconcileError::Connection(e)),
                Err(e) => {
                    log::warn!("VPP refused the arc {VXLAN4_INPUT} -> {IP4_INPUT}: {e}");
                    report.failed.push(Failure {
                        what: format!("add the graph arc {VXLAN4_INPUT} -> {IP4_INPUT} (VXLAN L3 decapsulation)"),
                        error: e.to_string(),
                    });
                    None
                }
            },
        };

        // Interfaces the reconciler configures or owns, by sw_if_index.
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        for (name, o) in &obs.interfaces {
            if desired.interfaces.contains_key(name) || o.owned(name) {
                touched.insert(o.sw_if_index);
            }
        }
        // Interfaces to re-create (created with other parameters) or delete.
        let mut doomed: BTreeMap<String, ObsInterface> = BTreeMap::new();
        for (name, o) in &obs.interfaces {
            match desired.interfaces.get(name) {
                Some(spec) if same_kind(o, spec, decap_next) => {}
                _ if o.owned(name) => {
                    doomed.insert(name.clone(), o.clone());
                }
                _ => {}
            }
        }

        // --- 1. removals, dependents first ---
        let mut ops = Vec::new();
        if let (Some(want), Some(have)) = (&desired.nat, &obs.nat) {
            for s in have.statics.iter().filter(|s| !want.static_mappings.contains(&static_of(s))) {
                let m = static_of(s);
                ops.push(op(
                    c,
                    format!(
                        "delete NAT static mapping {}:{} -> {}:{}",
                        m.external, m.external_port, m.local, m.local_port
                    ),
                    static_msg(false, &m),
                ));
            }
            for i in have.identity.iter().filter(|i| !want.identity.contains(&identity_of(i))) {
                let m = identity_of(i);
                ops.push(op(c, format!("delete NAT identity mapping {}:{}", m.ip, m.port), identity_msg(false, &m)));
            }
            for a in have.pool.iter().filter(|a| !want.pool.contains(a)) {
                ops.push(op(c, format!("delete NAT pool address {a}"), pool_msg(false, *a)));
            }
            for (sw, flags) in &have.interfaces {
                // A record NAT44-ED kept for a deleted interface cannot be removed (VPP
                // refuses an index it does not have); an interface that reuses the index
                // gets it replaced below.
                let Some(name) = obs.name_of(*sw) else { continue };
                let doomed_iface = doomed.contains_key(name);
                for inside in [true, false] {
                    let bit = nat_flag(inside).0;
                    let wanted =
                        !doomed_iface && if inside { want.inside.contains(name) } else { want.outside.contains(name) };
                    if flags & bit != 0 && !wanted {
                        ops.push(op(
                            c,
                            format!("remove NAT {} feature from {name}", if inside { "inside" } else { "outside" }),
                            api::Nat44InterfaceAddDelFeature {
                                is_add: false,
                                flags: nat_flag(inside),
                                sw_if_index: *sw,
                            },
                        ));
                    }
                }
            }
        }
        run_step(ops, &mut report).await?;

        let mut ops = Vec::new();
        let wanted_routes: BTreeMap<Ipv4Net, &RouteSpec> = desired.routes.iter().map(|r| (r.dst, r)).collect();
        for r in &obs.routes {
            let (dst, paths) = (&r.dst, &r.paths);
            let ours = paths
                .iter()
                .any(|p| touched.contains(&p.sw_if_index) && p.r#type == api::FibPathType::FIB_API_PATH_TYPE_NORMAL);
            let goes_away = paths.iter().any(|p| doomed.values().any(|d| d.sw_if_index == p.sw_if_index));
            // VPP's own routes (connected, local, neighbours') are never touched.
            if ours && obs.added_through_api(r) && (!wanted_routes.contains_key(dst) || goes_away) {
                ops.push(op(c, format!("delete route {dst}"), route_msg(false, *dst, Vec::new())));
            }
        }
        for n in &obs.neighbors {
            let static_flag = n.flags.contains(api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_STATIC);
            let Some(ip) = n.ip_address.to_ipv4() else { continue };
            let name = obs.name_of(n.sw_if_index).unwrap_or_default().to_owned();
            let wanted = !doomed.contains_key(&name)
                && desired.neighbors.contains(&NeighborSpec { interface: name.clone(), ip, mac: n.mac_address });
            if static_flag && touched.contains(&n.sw_if_index) && !wanted {
                ops.push(op(
                    c,
                    format!("delete neighbour {ip} on {name}"),
                    api::IpNeighborAddDel { is_add: false, neighbor: n.clone() },
                ));
            }
        }
        run_step(ops, &mut report).await?;

        let ops: Vec<Op> = doomed.iter().filter_map(|(name, o)| delete_op(c, name, o)).collect();
        run_step(ops, &mut report).await?;

        // --- 2. interfaces ---
        let mut current: BTreeMap<String, ObsInterface> = obs
            .interfaces
            .iter()
            .filter(|(n, _)| !doomed.contains_key(*n))
            .map(|(n, o)| (n.clone(), o.clone()))
            .collect();
        let mut ops = Vec::new();
        for (name, spec) in &desired.interfaces {
            if current.contains_key(name) {
                continue;
            }
            if matches!(spec.kind, InterfaceKind::Vxlan { .. }) && decap_next.is_none() {
                report.failed.push(Failure {
                    what: format!("create interface {name}"),
                    error: format!("no arc {VXLAN4_INPUT} -> {IP4_INPUT} to decapsulate to (see above)"),
                });
                continue;
            }
            match create_msg_op(c, name, &spec.kind, decap_next.unwrap_or(ALL)) {
                Some(o) => ops.push(o),
                None => report.failed.push(Failure {
                    what: format!("configure interface {name}"),
                    error: format!("VPP has no interface {name} (is it in startup.conf's dpdk section?)"),
                }),
            }
        }
        // Indices created in this pass. VPP hands a deleted interface's index to the next
        // interface at once: what the dump showed at one of them (a route, a neighbour, a
        // NAT record) belonged to the interface deleted above, or to one deleted before it.
        let mut created: BTreeSet<u32> = BTreeSet::new();
        for (what, sw) in run_step(ops, &mut report).await? {
            let name = what.trim_start_matches("create interface ").to_owned();
            if let Some(sw) = sw {
                current.insert(name, ObsInterface::fresh(sw));
                created.insert(sw);
            }
        }
        let stale = |sw: u32| created.contains(&sw) || doomed.values().any(|d| d.sw_if_index == sw);
        let sw_of = |name: &str| current.get(name).map(|o| o.sw_if_index);

        // Input ACLs, before the interfaces they guard get an address (or borrow one) and
        // come up: until then VPP takes no IP packet in on them.
        let guarded = self.apply_input_acls(desired, &obs, &sw_of, &stale, &mut report).await?;
        // An interface whose fail-closed ACL could not be bound is not opened: better no
        // traffic through a tunnel than traffic from any source. Other interfaces open (or
        // stay open) without theirs: the uplink carries the node's own traffic, and closing
        // it, after a VPP restart on a VPP without the ACL plugin say, would cut the node off.
        // One already open when its ACL went missing (an agent without ACLs before, a
        // binding VPP refused) is not closed either: that would cut the traffic it carries
        // now. It keeps what opens it, gets nothing that would open it further, and is
        // reported as open without its ACL.
        let unguarded =
            |name: &str| desired.input_acls.get(name).is_some_and(|a| a.fail_closed) && !guarded.contains(name);
        let mut held_back: BTreeSet<&str> = BTreeSet::new();
        let mut open_unguarded: BTreeSet<&str> = BTreeSet::new();

        // MAC, MTU and unnumbered first: VPP wants them before addresses and admin up.
        let mut ops = Vec::new();
        for (name, spec) in &desired.interfaces {
            let Some(o) = current.get(name) else { continue };
            let sw = o.sw_if_index;
            if let Some(mac) = spec.mac
                && mac != o.mac
            {
                ops.push(op(
                    c,
                    format!("set MAC of {name}"),
                    api::SwInterfaceSetMacAddress { sw_if_index: sw, mac_address: mac },
                ));
            }
            if let Some(mtu) = spec.mtu
                && mtu != o.mtu
            {
                ops.push(op(
                    c,
                    format!("set MTU {mtu} on {name}"),
                    api::SwInterfaceSetMtu { sw_if_index: sw, mtu: [mtu, 0, 0, 0] },
                ));
            }
            let want_lender = spec.unnumbered_to.as_deref().and_then(sw_of);
            if spec.unnumbered_to.is_some() && want_lender.is_none() {
                report.failed.push(Failure {
                    what: format!("make {name} unnumbered"),
                    error: format!("no interface {}", spec.unnumbered_to.as_deref().unwrap_or_default()),
                });
            }
            // Open without its fail-closed ACL: it stays open while it stays up with an
            // address or a borrowed one, and keeps the lender it has.
            let open_without_acl = o.is_open() && unguarded(name);
            let keeps_lender = open_without_acl && o.unnumbered_to.is_some() && want_lender.is_some();
            if open_without_acl
                && spec.admin_up
                && (keeps_lender || o.addresses.intersection(&spec.addresses).next().is_some())
            {
                open_unguarded.insert(name);
            }
            if o.unnumbered_to != want_lender && keeps_lender {
                // The new lender would be held back like any opening, so dropping the old
                // one now would close a live tunnel: the move waits for the ACL.
                report.failed.push(Failure {
                    what: format!("make {name} unnumbered to {}", spec.unnumbered_to.as_deref().unwrap_or_default()),
                    error: "its input ACL is not bound (see above): it keeps its current unnumbered source".into(),
                });
            } else if o.unnumbered_to != want_lender {
                if let Some(old) = o.unnumbered_to {
                    ops.push(op(
                        c,
                        format!("drop unnumbered source of {name}"),
                        api::SwInterfaceSetUnnumbered { sw_if_index: old, unnumbered_sw_if_index: sw, is_add: false },
                    ));
                }
                if want_lender.is_some() && unguarded(name) {
                    held_back.insert(name);
                } else if let Some(lender) = want_lender {
                    ops.push(op(
                        c,
                        format!("make {name} unnumbered to {}", spec.unnumbered_to.as_deref().unwrap_or_default()),
                        api::SwInterfaceSetUnnumbered { sw_if_index: lender, unnumbered_sw_if_index: sw, is_add: true },
                    ));
                }
            }
            for a in o.addresses.difference(&spec.addresses) {
                ops.push(op(
                    c,
                    format!("remove address {a} from {name}"),
                    api::SwInterfaceAddDelAddress {
                        sw_if_index: sw,
                        is_add: false,
                        del_all: false,
                        prefix: (*a).into(),
                    },
                ));
            }
        }
        run_step(ops, &mut report).await?;

        let mut ops = Vec::new();
        for (name, spec) in &desired.interfaces {
            let Some(o) = current.get(name) else { continue };
            let opening = !spec.addresses.is_subset(&o.addresses) || (spec.admin_up && !o.admin_up);
            if opening && unguarded(name) {
                held_back.insert(name);
                continue;
            }
            for a in spec.addresses.difference(&o.addresses) {
                ops.push(op(
                    c,
                    format!("add address {a} to {name}"),
                    api::SwInterfaceAddDelAddress {
                        sw_if_index: o.sw_if_index,
                        is_add: true,
                        del_all: false,
                        prefix: (*a).into(),
                    },
                ));
            }
            if spec.admin_up != o.admin_up {
                let flags =
                    if spec.admin_up { api::IfStatusFlags::IF_STATUS_API_FLAG_ADMIN_UP } else { api::IfStatusFlags(0) };
                ops.push(op(
                    c,
                    format!("set {name} {}", if spec.admin_up { "up" } else { "down" }),
                    api::SwInterfaceSetFlags { sw_if_index: o.sw_if_index, flags },
                ));
            }
        }
        run_step(ops, &mut report).await?;
        for name in held_back {
            report.failed.push(Failure {
                what: format!("open {name} (address, unnumbered source, admin up)"),
                error: "its input ACL is not bound (see above)".into(),
            });
        }
        for name in open_unguarded {
            report.failed.push(Failure {
                what: format!("{name} open without its input ACL"),
                error: "its input ACL is not bound (see above): it was open already and stays open, letting in \
                        packets from any source"
                    .into(),
            });
        }

        // --- 3. neighbours, routes, NAT ---
        let mut ops = Vec::new();
        for n in &desired.neighbors {
            let Some(sw) = sw_of(&n.interface) else {
                report.failed.push(Failure {
                    what: format!("add neighbour {}", n.ip),
                    error: format!("no interface {}", n.interface),
                });
                continue;
            };
            let present = obs.neighbors.iter().any(|o| {
                o.sw_if_index == sw
                    && !stale(o.sw_if_index)
                    && o.ip_address.to_ipv4() == Some(n.ip)
                    && o.mac_address == n.mac
                    && o.flags.contains(api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_STATIC)
            });
            if !present || doomed.contains_key(&n.interface) {
                ops.push(op(
                    c,
                    format!("add neighbour {} on {}", n.ip, n.interface),
                    api::IpNeighborAddDel {
                        is_add: true,
                        neighbor: api::IpNeighbor {
                            sw_if_index: sw,
                            flags: api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_STATIC,
                            mac_address: n.mac,
                            ip_address: n.ip.into(),
                        },
                    },
                ));
            }
        }
        let have_routes: HashMap<Ipv4Net, &Vec<api::FibPath>> = obs
            .routes
            .iter()
            .filter(|r| !r.paths.iter().any(|p| stale(p.sw_if_index)))
            .map(|r| (r.dst, &r.paths))
            .collect();
        for r in &desired.routes {
            let Some(sw) = sw_of(&r.interface) else {
                report.failed.push(Failure {
                    what: format!("add route {}", r.dst),
                    error: format!("no interface {}", r.interface),
                });
                continue;
            };
            let ok = have_routes.get(&r.dst).is_some_and(|p| route_matches(p, sw, r.next_hop));
            if !ok {
                let via = r.next_hop.map(|h| format!(" via {h}")).unwrap_or_default();
                ops.push(op(
                    c,
                    format!("add route {}{via} dev {}", r.dst, r.interface),
                    route_msg(true, r.dst, vec![fib_path(sw, r.next_hop)]),
                ));
            }
        }
        run_step(ops, &mut report).await?;

        if let Some(want) = &desired.nat {
            self.apply_nat(want, obs.nat.as_ref(), &doomed, &created, &sw_of, &mut report).await?;
        }
        Ok(report)
    }

    /// Creates the input ACLs `desired` asks for (or replaces their rules in place, which
    /// keeps them bound) and binds each to its interface, then takes the reconciler's ACLs
    /// nothing wants off the interfaces that still list them and deletes them (VPP refuses
    /// to delete a bound ACL). Returns the interfaces whose input ACL is bound.
    async fn apply_input_acls(
        &self,
        desired: &VppDesired,
        obs: &Observed,
        sw_of: &(dyn Fn(&str) -> Option<u32> + Sync),
        stale: &(dyn Fn(u32) -> bool + Sync),
        report: &mut ReconcileReport,
    ) -> Result<BTreeSet<String>, ReconcileError> {
        let c = &self.client;
        let mut guarded = BTreeSet::new();
        let Some(have) = &obs.acls else {
            if !desired.input_acls.is_empty() {
                report
                    .failed
                    .push(Failure { what: "input ACLs".into(), error: "VPP has no ACL plugin (acl_plugin.so)".into() });
            }
            return Ok(guarded);
        };
        // The lists VPP holds now: a list the dump showed at an index deleted in this pass,
        // or handed to an interface created in it, went with the deleted interface.
        let no_lists = (Vec::new(), Vec::new());
        let lists_of = |sw: u32| if stale(sw) { &no_lists } else { have.lists.get(&sw).unwrap_or(&no_lists) };

        // One ACL per wanted tag: the one its interface lists, else the lowest index. Every
        // other ACL with the reconciler's tag prefix is stale: its interface is gone (an
        // agent or VPP restart may have hidden that), or it is a duplicate.
        let mut kept: BTreeMap<&str, u32> = BTreeMap::new();
        let mut pending: BTreeMap<String, &str> = BTreeMap::new();
        let mut ops = Vec::new();
        for (name, want) in &desired.input_acls {
            let input = sw_of(name).map(|sw| lists_of(sw).0.as_slice()).unwrap_or_default();
            let tagged: Vec<&api::AclDetails> = have.acls.values().filter(|a| a.tag == want.tag).collect();
            let found = tagged.iter().find(|a| input.contains(&a.acl_index)).or(tagged.first());
            let (what, index) = match found {
                Some(a) if same_rules(&a.r, &acl_rules(want)) => {
                    kept.insert(name, a.acl_index);
                    continue;
                }
                Some(a) => {
                    kept.insert(name, a.acl_index);
                    (format!("replace the rules of ACL {} for {name}", want.tag), a.acl_index)
                }
                None => (format!("create ACL {} for {name}", want.tag), ALL),
            };
            pending.insert(what.clone(), name);
            ops.push(acl_op(c, what, index, want));
        }
        let unwanted: BTreeSet<u32> = have
            .acls
            .values()
            .filter(|a| a.tag.starts_with(ACL_TAG_PREFIX) && !kept.values().any(|k| *k == a.acl_index))
            .map(|a| a.acl_index)
            .collect();
        for (what, index) in run_step(ops, report).await? {
            if let (Some(name), Some(index)) = (pending.get(&what), index) {
                kept.insert(name, index);
            }
        }

        // The interface's input list is its ACL alone; its output list keeps what it has
        // but unwanted ACLs of the reconciler's. The list is set as a whole, so setting it
        // again changes nothing.
        let without_unwanted = |l: &[u32]| l.iter().copied().filter(|a| !unwanted.contains(a)).collect::<Vec<_>>();
        let mut handled: BTreeSet<u32> = BTreeSet::new();
        let mut binding: BTreeMap<String, &str> = BTreeMap::new();
        let mut ops = Vec::new();
        for (name, index) in &kept {
            let Some(sw) = sw_of(name) else { continue };
            handled.insert(sw);
            let (input, output) = lists_of(sw);
            let keep_output = without_unwanted(output);
            if *input == [*index] && *output == keep_output {
                guarded.insert(name.to_string());
                continue;
            }
            let what = format!("bind ACL {} to {name}", desired.input_acls[*name].tag);
            binding.insert(what.clone(), name);
            ops.push(op(c, what, acl_list_msg(sw, &[*index], &keep_output)));
        }
        for (what, _) in run_step(ops, report).await? {
            guarded.extend(binding.get(&what).map(|n| n.to_string()));
        }

        // Unwanted ACLs: off the other interfaces' lists, then deleted.
        let mut ops = Vec::new();
        for (sw, (input, output)) in &have.lists {
            if stale(*sw) || handled.contains(sw) || !input.iter().chain(output).any(|a| unwanted.contains(a)) {
                continue;
            }
            let name = obs.name_of(*sw).unwrap_or_default();
            let msg = acl_list_msg(*sw, &without_unwanted(input), &without_unwanted(output));
            ops.push(op(c, format!("take stale ACLs off {name}"), msg));
        }
        run_step(ops, report).await?;
        let ops = unwanted
            .iter()
            .map(|i| op(c, format!("delete ACL {}", have.acls[i].tag), api::AclDel { acl_index: *i }))
            .collect();
        run_step(ops, report).await?;
        Ok(guarded)
    }

    async fn apply_nat(
        &self,
        want: &NatSpec,
        have: Option<&ObsNat>,
        doomed: &BTreeMap<String, ObsInterface>,
        created: &BTreeSet<u32>,
        sw_of: &(dyn Fn(&str) -> Option<u32> + Sync),
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let c = &self.client;
        let empty = ObsNat::default();
        let enable = api::Nat44EdPluginEnableDisable { enable: true, sessions: want.sessions, ..Default::default() };
        let have = match have {
            // Enabled with what is wanted (sessions 0: whatever VPP's default is).
            Some(h)
                if (want.sessions == 0 || h.sessions == want.sessions) && h.inside_vrf == 0 && h.outside_vrf == 0 =>
            {
                h
            }
            // Enabled with other parameters: VPP changes them only through a disable,
            // which drops the NAT configuration; it is added again below.
            Some(h) => {
                let disable = api::Nat44EdPluginEnableDisable { enable: false, ..Default::default() };
                let what = format!(
                    "disable NAT44-ED (it runs with {} sessions, VRFs {}/{}; {} sessions, VRFs 0/0 wanted)",
                    h.sessions, h.inside_vrf, h.outside_vrf, want.sessions
                );
                let done = run_step(vec![op_or(c, what, disable, FEATURE_ALREADY_DISABLED)], report).await?;
                if done.is_empty() {
                    return Ok(());
                }
                let done = run_step(vec![op(c, "enable NAT44-ED".into(), enable)], report).await?;
                if done.is_empty() {
                    return Ok(());
                }
                &empty
            }
            None => {
                // Enabled meanwhile by someone else: enabled is what was wanted; what is
                // missing is added below (what is there already is refused, and seen next pass).
                let done =
                    run_step(vec![op_or(c, "enable NAT44-ED".into(), enable, FEATURE_ALREADY_ENABLED)], report).await?;
                if done.is_empty() {
                    return Ok(());
                }
                &empty
            }
        };
        // A record at an index created in this pass is a deleted interface's: VPP answers
        // an add of the role it records with success and changes nothing, so the record
        // goes first (the new interface has the index now, so the delete is taken).
        let role = |inside: bool| if inside { "inside" } else { "outside" };
        let mut ops = Vec::new();
        for (sw, flags) in have.interfaces.iter().filter(|(sw, _)| created.contains(sw)) {
            for inside in [true, false].into_iter().filter(|i| flags & nat_flag(*i).0 != 0) {
                ops.push(op(
                    c,
                    format!("remove the NAT {} record a deleted interface left at index {sw}", role(inside)),
                    api::Nat44InterfaceAddDelFeature { is_add: false, flags: nat_flag(inside), sw_if_index: *sw },
                ));
            }
        }
        run_step(ops, report).await?;
        let mut ops = Vec::new();
        for (inside, names) in [(true, &want.inside), (false, &want.outside)] {
            for name in names {
                let Some(sw) = sw_of(name) else {
                    report.failed.push(Failure {
                        what: format!("NAT feature on {name}"),
                        error: format!("no interface {name}"),
                    });
                    continue;
                };
                let bit = nat_flag(inside).0;
                let present = !doomed.contains_key(name)
                    && !created.contains(&sw)
                    && have.interfaces.iter().any(|(s, f)| *s == sw && f & bit != 0);
                if !present {
                    ops.push(op(
                        c,
                        format!("add NAT {} feature to {name}", if inside { "inside" } else { "outside" }),
                        api::Nat44InterfaceAddDelFeature { is_add: true, flags: nat_flag(inside), sw_if_index: sw },
                    ));
                }
            }
        }
        for a in want.pool.iter().filter(|a| !have.pool.contains(a)) {
            ops.push(op(c, format!("add NAT pool address {a}"), pool_msg(true, *a)));
        }
        let have_identity: BTreeSet<IdentityMapping> = have.identity.iter().map(identity_of).collect();
        for m in want.identity.iter().filter(|m| !have_identity.contains(m)) {
            ops.push(op(c, format!("add NAT identity mapping {}:{}", m.ip, m.port), identity_msg(true, m)));
        }
        let have_static: BTreeSet<StaticMapping> = have.statics.iter().map(static_of).collect();
        for m in want.static_mappings.iter().filter(|m| !have_static.contains(m)) {
            ops.push(op(
                c,
                format!("add NAT static mapping {}:{} -> {}:{}", m.external, m.external_port, m.local, m.local_port),
                static_msg(true, m),
            ));
        }
        run_step(ops, report).await?;
        Ok(())
    }
}
