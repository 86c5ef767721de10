//! Request handlers of the fake VPP. Each takes the decoded request, changes the state the
//! way VPP would (with VPP's error numbers for what VPP refuses) and answers.
//!
//! Requests without a handler are answered with their reply carrying retval -9
//! (VNET_API_ERROR_UNIMPLEMENTED); dumps without a handler produce no details.

use std::net::Ipv4Addr;

use contiv_vpp_binapi::{
    Message, MessageInfo, api, errno,
    message::{self, MessageKind},
    wire::DecodeError,
};
use ipnet::IpNet;

use crate::{
    state::{Acl, FakeState, InterfaceKind, NAT_DEFAULT_SESSIONS, Neighbor},
    table::ServerTable,
};

const NONE_IF: u32 = u32::MAX;

/// VPP error numbers (vnet/error.h) the binapi crate does not name.
mod vnet_error {
    /// VNET_API_ERROR_NO_SUCH_NODE.
    pub const NO_SUCH_NODE: i32 = -63;
    /// VNET_API_ERROR_NO_SUCH_NODE2.
    pub const NO_SUCH_NODE2: i32 = -64;
    /// VNET_API_ERROR_INVALID_DECAP_NEXT.
    pub const INVALID_DECAP_NEXT: i32 = -76;
    /// VNET_API_ERROR_UNSUPPORTED: what NAT44-ED answers to configuration while disabled.
    pub const UNSUPPORTED: i32 = -126;
    /// VNET_API_ERROR_FEATURE_ALREADY_DISABLED.
    pub const FEATURE_ALREADY_DISABLED: i32 = -169;
    /// VNET_API_ERROR_FEATURE_ALREADY_ENABLED.
    pub const FEATURE_ALREADY_ENABLED: i32 = -170;
}
use vnet_error::*;

/// Where a handler writes its answers.
pub(crate) struct Ctx<'a> {
    pub table: &'a ServerTable,
    pub client_index: u32,
    pub context: u32,
    /// Frames for the requesting connection.
    pub out: &'a mut Vec<u8>,
    /// Frames for other connections (events): (connection id, frame).
    pub events: &'a mut Vec<(u64, Vec<u8>)>,
    pub conn_id: u64,
    pub vpe_pid: u32,
    pub details_page: usize,
    /// Close the connection after the answers are written (sockclnt_delete).
    pub close: bool,
    /// Real AF_XDP sockets for af_xdp interfaces, when enabled.
    pub xdp: Option<&'a crate::xdp::XdpPorts>,
}

impl Ctx<'_> {
    /// Writes an answer frame for the requesting connection.
    pub fn send<M: Message>(&mut self, m: &M) {
        let Some(id) = self.table.id(M::NAME) else {
            log::error!("fake VPP: {} is not in its own table", M::NAME);
            return;
        };
        if let Err(e) = message::encode_frame_into(self.out, m, id, self.client_index, self.context) {
            log::error!("fake VPP: encoding {}: {e}", M::NAME);
        }
    }

    fn event<M: Message>(&mut self, conn_id: u64, client_index: u32, m: &M) {
        let Some(id) = self.table.id(M::NAME) else { return };
        let mut frame = Vec::new();
        if message::encode_frame_into(&mut frame, m, id, client_index, 0).is_ok() {
            self.events.push((conn_id, frame));
        }
    }

    /// Answers `info`'s reply with all fields zero but `retval`.
    pub fn reply_retval(&mut self, info: &MessageInfo, retval: i32) {
        let Some(reply) = info.reply.and_then(message::find_by_name) else { return };
        let Some(id) = self.table.id(reply.name) else { return };
        let mut payload = vec![0u8; reply.fixed_size];
        payload[..2].copy_from_slice(&id.to_be_bytes());
        if reply.has_client_index {
            payload[2..6].copy_from_slice(&self.client_index.to_be_bytes());
        }
        if let Some(o) = reply.context_offset() {
            payload[o..o + 4].copy_from_slice(&self.context.to_be_bytes());
        }
        if let Some(o) = reply.retval_offset {
            payload[o..o + 4].copy_from_slice(&retval.to_be_bytes());
        }
        self.out.extend_from_slice(&contiv_vpp_binapi::wire::frame_header(payload.len()));
        self.out.extend_from_slice(&payload);
    }
}

/// A handler's outcome other than success.
pub(crate) enum Failure {
    /// No handler: answer -9.
    Unhandled,
    /// The request could not be decoded.
    Decode(DecodeError),
}

impl From<DecodeError> for Failure {
    fn from(e: DecodeError) -> Self {
        Failure::Decode(e)
    }
}

fn req<M: Message>(payload: &[u8]) -> Result<M, Failure> {
    Ok(message::decode::<M>(payload)?.1)
}

/// Handles one request of an established connection.
pub(crate) fn handle(state: &mut FakeState, ctx: &mut Ctx<'_>, info: &'static MessageInfo, payload: &[u8]) {
    *state.requests.entry(info.name).or_default() += 1;
    match dispatch(state, ctx, info, payload) {
        Ok(()) => {}
        Err(Failure::Unhandled) => match info.kind {
            MessageKind::Request | MessageKind::Getter => ctx.reply_retval(info, errno::UNIMPLEMENTED),
            _ => log::debug!("fake VPP: no handler for {}", info.name),
        },
        Err(Failure::Decode(e)) => {
            log::warn!("fake VPP: cannot decode {}: {e}", info.name);
            ctx.reply_retval(info, errno::INVALID_VALUE);
        }
    }
}

fn dispatch(s: &mut FakeState, ctx: &mut Ctx<'_>, info: &MessageInfo, p: &[u8]) -> Result<(), Failure> {
    match info.name {
        // === memclnt / vpe ===
        "control_ping" => {
            ctx.send(&api::ControlPingReply { retval: 0, client_index: 0, vpe_pid: ctx.vpe_pid });
        }
        "sockclnt_delete" => {
            let m: api::SockclntDelete = req(p)?;
            let response = if m.index == ctx.client_index { 1 } else { -1 };
            ctx.send(&api::SockclntDeleteReply { response });
            ctx.close = response == 1;
        }
        "get_first_msg_id" => {
            let m: api::GetFirstMsgId = req(p)?;
            match ctx.table.first_msg_id(&m.name) {
                Some(first) => ctx.send(&api::GetFirstMsgIdReply { retval: 0, first_msg_id: first }),
                None => ctx.send(&api::GetFirstMsgIdReply { retval: errno::NO_SUCH_ENTRY, first_msg_id: !0 }),
            }
        }
        "get_api_json" => ctx.send(&api::GetApiJsonReply { retval: 0, json: crate::api_json::api_json().to_owned() }),
        "show_version" => ctx.send(&api::ShowVersionReply {
            retval: 0,
            program: "vpe".into(),
            version: "26.10-contiv-fake-vpp".into(),
            build_date: "fake".into(),
            build_directory: "/nonexistent (contiv-fake-vpp: a fake, not VPP)".into(),
        }),
        "want_interface_events" => {
            let m: api::WantInterfaceEvents = req(p)?;
            if m.enable_disable != 0 {
                s.subscribers.insert(ctx.conn_id, (ctx.client_index, m.pid));
            } else {
                s.subscribers.remove(&ctx.conn_id);
            }
            ctx.send(&api::WantInterfaceEventsReply { retval: 0 });
        }
        "add_node_next" => {
            // vlib_api.c: both nodes must exist; an existing arc keeps its index.
            let m: api::AddNodeNext = req(p)?;
            let (retval, next_index) = if !s.nodes.contains_key(&m.node_name) {
                (NO_SUCH_NODE, NONE_IF)
            } else if !s.nodes.contains_key(&m.next_name) {
                (NO_SUCH_NODE2, NONE_IF)
            } else {
                let nexts = s.nodes.get_mut(&m.node_name).expect("checked");
                let index = match nexts.iter().position(|n| *n == m.next_name) {
                    Some(i) => i,
                    None => {
                        nexts.push(m.next_name.clone());
                        nexts.len() - 1
                    }
                };
                (0, index as u32)
            };
            ctx.send(&api::AddNodeNextReply { retval, next_index });
        }

        // === interfaces ===
        "sw_interface_dump" => {
            let m: api::SwInterfaceDump = req(p)?;
            let details: Vec<api::SwInterfaceDetails> = s
                .interfaces
                .values()
                .filter(|i| m.sw_if_index == NONE_IF || i.sw_if_index == m.sw_if_index)
                .filter(|i| !m.name_filter_valid || i.name.contains(&m.name_filter))
                .map(|i| api::SwInterfaceDetails {
                    sw_if_index: i.sw_if_index,
                    sup_sw_if_index: i.sw_if_index,
                    l2_address: i.mac,
                    flags: i.flags(),
                    r#type: api::IfType::IF_API_TYPE_HARDWARE,
                    link_duplex: api::LinkDuplex::LINK_DUPLEX_API_FULL,
                    link_speed: 10_000_000,
                    link_mtu: i.link_mtu,
                    mtu: i.mtu,
                    interface_name: i.name.clone(),
                    interface_dev_type: i.kind.dev_type().into(),
                    tag: i.tag.clone(),
                    ..Default::default()
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }
        "sw_interface_set_flags" => {
            let m: api::SwInterfaceSetFlags = req(p)?;
            let retval = match s.interfaces.get_mut(&m.sw_if_index) {
                Some(i) => {
                    let up = m.flags.contains(api::IfStatusFlags::IF_STATUS_API_FLAG_ADMIN_UP);
                    let changed = i.admin_up != up;
                    i.admin_up = up;
                    let flags = i.flags();
                    if changed {
                        interface_event(s, ctx, m.sw_if_index, flags, false);
                    }
                    0
                }
                None => errno::INVALID_SW_IF_INDEX,
            };
            ctx.send(&api::SwInterfaceSetFlagsReply { retval });
        }
        "sw_interface_add_del_address" => {
            let m: api::SwInterfaceAddDelAddress = req(p)?;
            let retval = add_del_address(s, &m);
            ctx.send(&api::SwInterfaceAddDelAddressReply { retval });
        }
        "sw_interface_set_mtu" => {
            let m: api::SwInterfaceSetMtu = req(p)?;
            let retval = match s.interfaces.get_mut(&m.sw_if_index) {
                Some(i) => {
                    for (cur, new) in i.mtu.iter_mut().zip(m.mtu) {
                        if new != 0 {
                            *cur = new;
                        }
                    }
                    0
                }
                None => errno::INVALID_SW_IF_INDEX,
            };
            ctx.send(&api::SwInterfaceSetMtuReply { retval });
        }
        "hw_interface_set_mtu" => {
            let m: api::HwInterfaceSetMtu = req(p)?;
            let retval = match s.interfaces.get_mut(&m.sw_if_index) {
                Some(i) => {
                    i.link_mtu = m.mtu;
                    i.mtu[0] = u32::from(m.mtu);
                    0
                }
                None => errno::INVALID_SW_IF_INDEX,
            };
            ctx.send(&api::HwInterfaceSetMtuReply { retval });
        }
        "sw_interface_set_mac_address" => {
            let m: api::SwInterfaceSetMacAddress = req(p)?;
            let retval = match s.interfaces.get_mut(&m.sw_if_index) {
                Some(i) if m.mac_address[0] & 1 == 0 => {
                    i.mac = m.mac_address;
                    0
                }
                Some(_) => errno::INVALID_VALUE,
                None => errno::INVALID_SW_IF_INDEX,
            };
            ctx.send(&api::SwInterfaceSetMacAddressReply { retval });
        }
        "sw_interface_set_table" => {
            let m: api::SwInterfaceSetTable = req(p)?;
            let retval = if !s.tables.contains_key(&(m.is_ipv6, m.vrf_id)) {
                errno::NO_SUCH_FIB
            } else {
                match s.interfaces.get_mut(&m.sw_if_index) {
                    // VPP refuses to move an interface that has addresses of that family.
                    Some(i) if i.addresses.iter().any(|a| matches!(a, IpNet::V6(_)) == m.is_ipv6) => -114,
                    Some(i) => {
                        if m.is_ipv6 {
                            i.ip6_table = m.vrf_id;
                        } else {
                            i.ip4_table = m.vrf_id;
                        }
                        0
                    }
                    None => errno::INVALID_SW_IF_INDEX,
                }
            };
            ctx.send(&api::SwInterfaceSetTableReply { retval });
        }
        "sw_interface_get_table" => {
            let m: api::SwInterfaceGetTable = req(p)?;
            match s.interfaces.get(&m.sw_if_index) {
                Some(i) => ctx.send(&api::SwInterfaceGetTableReply {
                    retval: 0,
                    vrf_id: if m.is_ipv6 { i.ip6_table } else { i.ip4_table },
                }),
                None => ctx.send(&api::SwInterfaceGetTableReply { retval: errno::INVALID_SW_IF_INDEX, vrf_id: 0 }),
            }
        }
        "sw_interface_set_unnumbered" => {
            let m: api::SwInterfaceSetUnnumbered = req(p)?;
            let retval = if !s.interfaces.contains_key(&m.sw_if_index) {
                errno::INVALID_SW_IF_INDEX
            } else {
                match s.interfaces.get_mut(&m.unnumbered_sw_if_index) {
                    Some(i) if m.unnumbered_sw_if_index != m.sw_if_index => {
                        if m.is_add {
                            i.unnumbered_to = Some(m.sw_if_index);
                        } else if i.unnumbered_to == Some(m.sw_if_index) {
                            i.unnumbered_to = None;
                        }
                        0
                    }
                    Some(_) => errno::INVALID_VALUE,
                    None => -10, // VNET_API_ERROR_INVALID_SW_IF_INDEX_2
                }
            };
            ctx.send(&api::SwInterfaceSetUnnumberedReply { retval });
        }
        "ip_unnumbered_dump" => {
            let m: api::IpUnnumberedDump = req(p)?;
            let details: Vec<_> = s
                .interfaces
                .values()
                .filter(|i| m.sw_if_index == NONE_IF || i.sw_if_index == m.sw_if_index)
                .filter_map(|i| {
                    i.unnumbered_to
                        .map(|lender| api::IpUnnumberedDetails { sw_if_index: i.sw_if_index, ip_sw_if_index: lender })
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }
        "ip_address_dump" => {
            let m: api::IpAddressDump = req(p)?;
            if let Some(i) = s.interfaces.get(&m.sw_if_index) {
                let details: Vec<_> = i
                    .addresses
                    .iter()
                    .filter(|a| matches!(a, IpNet::V6(_)) == m.is_ipv6)
                    .map(|a| api::IpAddressDetails { sw_if_index: i.sw_if_index, prefix: (*a).into() })
                    .collect();
                for d in &details {
                    ctx.send(d);
                }
            }
        }
        "create_loopback_instance" => {
            let m: api::CreateLoopbackInstance = req(p)?;
            let used: Vec<u32> = s
                .interfaces
                .values()
                .filter_map(|i| match i.kind {
                    InterfaceKind::Loopback { instance } => Some(instance),
                    _ => None,
                })
                .collect();
            let instance =
                if m.is_specified { m.user_instance } else { (0..).find(|n| !used.contains(n)).unwrap_or(0) };
            if used.contains(&instance) {
                ctx.send(&api::CreateLoopbackInstanceReply { retval: errno::INVALID_ARGUMENT, sw_if_index: NONE_IF });
            } else {
                let sw =
                    s.add_interface(format!("loop{instance}"), InterfaceKind::Loopback { instance }, m.mac_address);
                ctx.send(&api::CreateLoopbackInstanceReply { retval: 0, sw_if_index: sw });
            }
        }
        "create_loopback" => {
            let m: api::CreateLoopback = req(p)?;
            let used: Vec<u32> = s
                .interfaces
                .values()
                .filter_map(|i| match i.kind {
                    InterfaceKind::Loopback { instance } => Some(instance),
                    _ => None,
                })
                .collect();
            let instance = (0..).find(|n| !used.contains(n)).unwrap_or(0);
            let sw = s.add_interface(format!("loop{instance}"), InterfaceKind::Loopback { instance }, m.mac_address);
            ctx.send(&api::CreateLoopbackReply { retval: 0, sw_if_index: sw });
        }
        "delete_loopback" => {
            let m: api::DeleteLoopback = req(p)?;
            let retval = delete_kind(s, ctx, m.sw_if_index, |k| matches!(k, InterfaceKind::Loopback { .. }));
            ctx.send(&api::DeleteLoopbackReply { retval });
        }

        // === AF_XDP, tap, VXLAN ===
        "af_xdp_create_v3" => {
            let m: api::AfXdpCreateV3 = req(p)?;
            let name = if m.name.is_empty() { m.host_if.clone() } else { m.name.clone() };
            let (retval, sw_if_index) = if m.host_if.is_empty() || m.rxq_num == 0 {
                (errno::INVALID_ARGUMENT, NONE_IF)
            } else if s.interface_by_name(&name).is_some()
                || s.interfaces
                    .values()
                    .any(|i| matches!(&i.kind, InterfaceKind::AfXdp(c) if c.host_if == m.host_if && c.netns == m.netns))
            {
                (errno::IF_ALREADY_EXISTS, NONE_IF)
            } else {
                match ctx.xdp.map(|x| x.open(&m.host_if, m.rxq_num)).transpose() {
                    Ok(opened) => {
                        let sw = s.add_interface(name, InterfaceKind::AfXdp(m), [0; 6]);
                        if let (Some(x), Some(o)) = (ctx.xdp, opened) {
                            x.adopt(sw, o);
                        }
                        (0, sw)
                    }
                    Err(e) => {
                        log::warn!("fake VPP: af_xdp_create_v3 on {}: {e}", m.host_if);
                        (crate::xdp::SYSCALL_ERROR_2, NONE_IF)
                    }
                }
            };
            ctx.send(&api::AfXdpCreateV3Reply { retval, sw_if_index });
        }
        "af_xdp_delete" => {
            let m: api::AfXdpDelete = req(p)?;
            let retval = delete_kind(s, ctx, m.sw_if_index, |k| matches!(k, InterfaceKind::AfXdp(_)));
            ctx.send(&api::AfXdpDeleteReply { retval });
        }
        "tap_create_v3" => {
            let m: api::TapCreateV3 = req(p)?;
            let used: Vec<u32> = s
                .interfaces
                .values()
                .filter_map(|i| match &i.kind {
                    InterfaceKind::Tap { id, .. } => Some(*id),
                    _ => None,
                })
                .collect();
            let id = if m.id == NONE_IF { (0..).find(|n| !used.contains(n)).unwrap_or(0) } else { m.id };
            let (retval, sw_if_index) = if used.contains(&id) {
                (errno::IF_ALREADY_EXISTS, NONE_IF)
            } else if m.host_ip4_prefix_set && m.host_ip4_prefix.len > 32 {
                (errno::INVALID_ARGUMENT, NONE_IF)
            } else {
                let mac = if m.use_random_mac { [0; 6] } else { m.mac_address };
                let mut create = m.clone();
                if !create.host_if_name_set {
                    create.host_if_name = format!("tap{id}");
                }
                (0, s.add_interface(format!("tap{id}"), InterfaceKind::Tap { id, create }, mac))
            };
            ctx.send(&api::TapCreateV3Reply { retval, sw_if_index });
        }
        "tap_delete_v2" => {
            let m: api::TapDeleteV2 = req(p)?;
            let retval = delete_kind(s, ctx, m.sw_if_index, |k| matches!(k, InterfaceKind::Tap { .. }));
            ctx.send(&api::TapDeleteV2Reply { retval });
        }
        "sw_interface_tap_v2_dump" => {
            let m: api::SwInterfaceTapV2Dump = req(p)?;
            let details: Vec<_> = s
                .interfaces
                .values()
                .filter(|i| m.sw_if_index == NONE_IF || i.sw_if_index == m.sw_if_index)
                .filter_map(|i| match &i.kind {
                    InterfaceKind::Tap { id, create } => Some(api::SwInterfaceTapV2Details {
                        sw_if_index: i.sw_if_index,
                        id: *id,
                        tx_ring_sz: create.tx_ring_sz,
                        rx_ring_sz: create.rx_ring_sz,
                        host_mtu_size: if create.host_mtu_set { create.host_mtu_size } else { 1500 },
                        host_mac_addr: create.host_mac_addr,
                        host_ip4_prefix: if create.host_ip4_prefix_set {
                            create.host_ip4_prefix.clone()
                        } else {
                            Default::default()
                        },
                        host_ip6_prefix: Default::default(),
                        tap_flags: create.tap_flags,
                        dev_name: i.name.clone(),
                        host_if_name: create.host_if_name.clone(),
                        host_namespace: create.host_namespace.clone(),
                        host_bridge: create.host_bridge.clone(),
                    }),
                    _ => None,
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }
        "vxlan_add_del_tunnel_v3" => {
            let m: api::VxlanAddDelTunnelV3 = req(p)?;
            let (retval, sw_if_index) = vxlan_add_del(s, ctx, m);
            ctx.send(&api::VxlanAddDelTunnelV3Reply { retval, sw_if_index });
        }
        "vxlan_tunnel_v2_dump" => {
            let m: api::VxlanTunnelV2Dump = req(p)?;
            let details: Vec<_> = s
                .interfaces
                .values()
                .filter(|i| m.sw_if_index == NONE_IF || i.sw_if_index == m.sw_if_index)
                .filter_map(|i| match &i.kind {
                    InterfaceKind::Vxlan(t) => Some(api::VxlanTunnelV2Details {
                        sw_if_index: i.sw_if_index,
                        instance: t.instance,
                        src_address: t.src_address.clone(),
                        dst_address: t.dst_address.clone(),
                        src_port: t.src_port,
                        dst_port: t.dst_port,
                        mcast_sw_if_index: t.mcast_sw_if_index,
                        encap_vrf_id: t.encap_vrf_id,
                        decap_next_index: t.decap_next_index,
                        vni: t.vni,
                    }),
                    _ => None,
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }

        // === FIB ===
        "ip_table_add_del" => {
            let m: api::IpTableAddDel = req(p)?;
            let key = (m.table.is_ip6, m.table.table_id);
            if m.is_add {
                let name = if m.table.name.is_empty() {
                    format!("{}-VRF:{}", if m.table.is_ip6 { "ipv6" } else { "ipv4" }, m.table.table_id)
                } else {
                    m.table.name.clone()
                };
                s.tables.entry(key).or_insert(name);
            } else if m.table.table_id != 0 {
                s.tables.remove(&key);
                s.routes.retain(|(t, p), _| !(*t == m.table.table_id && matches!(p, IpNet::V6(_)) == m.table.is_ip6));
            }
            ctx.send(&api::IpTableAddDelReply { retval: 0 });
        }
        "ip_table_dump" => {
            let details: Vec<_> = s
                .tables
                .iter()
                .map(|((is_ip6, id), name)| api::IpTableDetails {
                    table: api::IpTable { table_id: *id, is_ip6: *is_ip6, name: name.clone() },
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }
        "ip_route_add_del" => {
            let m: api::IpRouteAddDel = req(p)?;
            let (retval, stats_index) =
                route_add_del(s, m.is_add, m.is_multipath, m.route.table_id, &m.route.prefix, &m.route.paths);
            ctx.send(&api::IpRouteAddDelReply { retval, stats_index });
        }
        "ip_route_add_del_v2" => {
            let m: api::IpRouteAddDelV2 = req(p)?;
            let (retval, stats_index) =
                route_add_del(s, m.is_add, m.is_multipath, m.route.table_id, &m.route.prefix, &m.route.paths);
            ctx.send(&api::IpRouteAddDelV2Reply { retval, stats_index });
        }
        "ip_route_dump" => {
            // Every entry of the table with its best source's paths (VPP's own routes too).
            let m: api::IpRouteDump = req(p)?;
            for e in s.fib(m.table.table_id, m.table.is_ip6) {
                ctx.send(&api::IpRouteDetails {
                    route: api::IpRoute {
                        table_id: m.table.table_id,
                        stats_index: 0,
                        prefix: e.prefix.into(),
                        n_paths: e.paths.len() as u8,
                        paths: e.paths,
                    },
                });
            }
        }
        "ip_route_v2_dump" => {
            // As ip_route_dump, with each entry's best source; `src` != 0 keeps only the
            // entries whose best source it is (fib_table_walk_w_src).
            let m: api::IpRouteV2Dump = req(p)?;
            for e in s.fib(m.table.table_id, m.table.is_ip6) {
                if m.src != 0 && e.src != m.src {
                    continue;
                }
                ctx.send(&api::IpRouteV2Details {
                    route: api::IpRouteV2 {
                        table_id: m.table.table_id,
                        stats_index: 0,
                        prefix: e.prefix.into(),
                        n_paths: e.paths.len() as u8,
                        src: e.src,
                        paths: e.paths,
                    },
                });
            }
        }

        // === neighbours ===
        "ip_neighbor_add_del" => {
            let m: api::IpNeighborAddDel = req(p)?;
            let n = &m.neighbor;
            let retval = match n.ip_address.to_ip() {
                _ if !s.interfaces.contains_key(&n.sw_if_index) => errno::INVALID_SW_IF_INDEX,
                None => errno::INVALID_ARGUMENT,
                Some(ip) if m.is_add => {
                    s.neighbors.insert((n.sw_if_index, ip), Neighbor { mac: n.mac_address, flags: n.flags });
                    0
                }
                Some(ip) => match s.neighbors.remove(&(n.sw_if_index, ip)) {
                    Some(_) => 0,
                    None => errno::NO_SUCH_ENTRY,
                },
            };
            let stats_index = s.next_stats_index;
            s.next_stats_index += 1;
            ctx.send(&api::IpNeighborAddDelReply { retval, stats_index });
        }
        "ip_neighbor_dump" => {
            let m: api::IpNeighborDump = req(p)?;
            let want_v6 = m.af == api::AddressFamily::ADDRESS_IP6;
            let details: Vec<_> = s
                .neighbors
                .iter()
                .filter(|((i, ip), _)| (m.sw_if_index == NONE_IF || *i == m.sw_if_index) && ip.is_ipv6() == want_v6)
                .map(|((i, ip), n)| api::IpNeighborDetails {
                    age: 0.0,
                    neighbor: api::IpNeighbor {
                        sw_if_index: *i,
                        flags: n.flags,
                        mac_address: n.mac,
                        ip_address: (*ip).into(),
                    },
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }

        // === NAT44-ED ===
        "nat44_ed_plugin_enable_disable" => {
            // nat44_ed_api.c / nat44_ed.c: a second enable is refused (whatever its
            // parameters: they change only through a disable), so is a disable while off;
            // a disable drops the whole configuration.
            let m: api::Nat44EdPluginEnableDisable = req(p)?;
            let unsupported = api::Nat44ConfigFlags::NAT44_IS_STATIC_MAPPING_ONLY.0
                | api::Nat44ConfigFlags::NAT44_IS_CONNECTION_TRACKING.0;
            let retval = match (m.enable, s.nat.enabled.is_some()) {
                (true, _) if m.flags.0 & unsupported != 0 => UNSUPPORTED,
                (true, true) => FEATURE_ALREADY_ENABLED,
                (true, false) => {
                    let sessions = if m.sessions == 0 { NAT_DEFAULT_SESSIONS } else { m.sessions };
                    s.nat.last_timeouts =
                        api::NatTimeouts { udp: 300, tcp_established: 7440, tcp_transitory: 240, icmp: 60 };
                    s.nat.last_translation_buckets = nat_buckets(sessions);
                    s.nat.enabled = Some(api::Nat44EdPluginEnableDisable { sessions, ..m });
                    0
                }
                (false, true) => {
                    s.nat = crate::state::NatState {
                        last_timeouts: s.nat.last_timeouts.clone(),
                        last_translation_buckets: s.nat.last_translation_buckets,
                        ..Default::default()
                    };
                    0
                }
                (false, false) => FEATURE_ALREADY_DISABLED,
            };
            ctx.send(&api::Nat44EdPluginEnableDisableReply { retval });
        }
        "nat44_show_running_config" => {
            // retval 0 whether the plugin is enabled or not: the running configuration
            // (zeroed by a disable, so sessions = 0 while disabled) and always the
            // endpoint-dependent flag.
            let cfg = s.nat.enabled.clone().unwrap_or_default();
            ctx.send(&api::Nat44ShowRunningConfigReply {
                retval: 0,
                inside_vrf: cfg.inside_vrf,
                outside_vrf: cfg.outside_vrf,
                sessions: cfg.sessions,
                translation_buckets: s.nat.last_translation_buckets,
                timeouts: s.nat.last_timeouts.clone(),
                flags: api::Nat44ConfigFlags::NAT44_IS_ENDPOINT_DEPENDENT,
                ..Default::default()
            });
        }
        "nat44_interface_add_del_feature" => {
            let m: api::Nat44InterfaceAddDelFeature = req(p)?;
            let bits = m.flags.0 & (api::NatConfigFlags::NAT_IS_INSIDE.0 | api::NatConfigFlags::NAT_IS_OUTSIDE.0);
            let retval = if s.nat.enabled.is_none() {
                UNSUPPORTED
            } else if !s.interfaces.contains_key(&m.sw_if_index) {
                errno::INVALID_SW_IF_INDEX
            } else if s.nat.output_interfaces.contains(&m.sw_if_index) {
                errno::VALUE_EXIST
            } else if bits == 0 {
                errno::INVALID_VALUE
            } else if m.is_add {
                let cur = s.nat.interfaces.entry(m.sw_if_index).or_default();
                if *cur & bits == bits {
                    // VPP (nat44_ed_add_interface) answers 0 and changes nothing when its
                    // record has the role already, also a record left by a deleted
                    // interface whose index was reused: the feature stays off then.
                    0
                } else {
                    *cur |= bits;
                    *s.nat.active.entry(m.sw_if_index).or_default() |= bits;
                    0
                }
            } else {
                match s.nat.interfaces.get_mut(&m.sw_if_index) {
                    Some(cur) if *cur & bits == bits => {
                        *cur &= !bits;
                        if *cur == 0 {
                            s.nat.interfaces.remove(&m.sw_if_index);
                        }
                        if let Some(on) = s.nat.active.get_mut(&m.sw_if_index) {
                            *on &= !bits;
                            if *on == 0 {
                                s.nat.active.remove(&m.sw_if_index);
                            }
                        }
                        0
                    }
                    _ => errno::NO_SUCH_ENTRY,
                }
            };
            ctx.send(&api::Nat44InterfaceAddDelFeatureReply { retval });
        }
        "nat44_interface_dump" => {
            let details: Vec<_> = s
                .nat
                .interfaces
                .iter()
                .map(|(sw, flags)| api::Nat44InterfaceDetails { flags: api::NatConfigFlags(*flags), sw_if_index: *sw })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }
        "nat44_ed_add_del_output_interface" => {
            let m: api::Nat44EdAddDelOutputInterface = req(p)?;
            let retval = if s.nat.enabled.is_none() {
                UNSUPPORTED
            } else if !s.interfaces.contains_key(&m.sw_if_index) {
                errno::INVALID_SW_IF_INDEX
            } else if s.nat.interfaces.contains_key(&m.sw_if_index) {
                errno::VALUE_EXIST
            } else if m.is_add {
                if s.nat.output_interfaces.insert(m.sw_if_index) { 0 } else { errno::VALUE_EXIST }
            } else if s.nat.output_interfaces.remove(&m.sw_if_index) {
                0
            } else {
                errno::NO_SUCH_ENTRY
            };
            ctx.send(&api::Nat44EdAddDelOutputInterfaceReply { retval });
        }
        "nat44_ed_output_interface_get" => {
            // Paged like VPP's REPLY_AND_DETAILS macros: a page of details, then the reply;
            // EAGAIN (-165) with the cursor where the next call continues.
            let m: api::Nat44EdOutputInterfaceGet = req(p)?;
            let all: Vec<u32> = s.nat.output_interfaces.iter().copied().collect();
            let start = m.cursor as usize;
            let end = (start + ctx.details_page.max(1)).min(all.len());
            for sw in all.get(start..end).unwrap_or(&[]) {
                ctx.send(&api::Nat44EdOutputInterfaceDetails { sw_if_index: *sw });
            }
            if end < all.len() {
                ctx.send(&api::Nat44EdOutputInterfaceGetReply { retval: errno::EAGAIN, cursor: end as u32 });
            } else {
                ctx.send(&api::Nat44EdOutputInterfaceGetReply { retval: 0, cursor: NONE_IF });
            }
        }
        "nat44_add_del_address_range" => {
            let m: api::Nat44AddDelAddressRange = req(p)?;
            let (first, last) = (u32::from_be_bytes(m.first_ip_address), u32::from_be_bytes(m.last_ip_address));
            // Adding while disabled is unsupported; deleting finds no address.
            let retval = if s.nat.enabled.is_none() {
                if m.is_add { UNSUPPORTED } else { errno::NO_SUCH_ENTRY }
            } else if last < first || last - first >= 1024 {
                errno::INVALID_VALUE
            } else {
                let range: Vec<Ipv4Addr> = (first..=last).map(Ipv4Addr::from).collect();
                if m.is_add {
                    if range.iter().any(|a| s.nat.addresses.contains_key(a)) {
                        errno::VALUE_EXIST
                    } else {
                        for a in range {
                            s.nat.addresses.insert(a, (m.vrf_id, m.flags));
                        }
                        0
                    }
                } else if range.iter().all(|a| s.nat.addresses.contains_key(a)) {
                    for a in range {
                        s.nat.addresses.remove(&a);
                    }
                    0
                } else {
                    errno::NO_SUCH_ENTRY
                }
            };
            ctx.send(&api::Nat44AddDelAddressRangeReply { retval });
        }
        "nat44_address_dump" => {
            let details: Vec<_> = s
                .nat
                .addresses
                .iter()
                .map(|(a, (vrf, flags))| api::Nat44AddressDetails {
                    ip_address: a.octets(),
                    flags: *flags,
                    vrf_id: *vrf,
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }
        "nat44_add_del_static_mapping_v2" => {
            let m: api::Nat44AddDelStaticMappingV2 = req(p)?;
            let same = |x: &api::Nat44AddDelStaticMappingV2| {
                x.external_ip_address == m.external_ip_address
                    && x.external_port == m.external_port
                    && x.protocol == m.protocol
                    && x.external_sw_if_index == m.external_sw_if_index
                    && x.vrf_id == m.vrf_id
            };
            let retval = if s.nat.enabled.is_none() {
                UNSUPPORTED
            } else {
                add_del(&mut s.nat.static_mappings, m.is_add, same, || api::Nat44AddDelStaticMappingV2 {
                    is_add: false,
                    ..m.clone()
                })
            };
            ctx.send(&api::Nat44AddDelStaticMappingV2Reply { retval });
        }
        "nat44_static_mapping_dump" => {
            let details: Vec<_> = s
                .nat
                .static_mappings
                .iter()
                .map(|x| api::Nat44StaticMappingDetails {
                    flags: x.flags,
                    local_ip_address: x.local_ip_address,
                    external_ip_address: x.external_ip_address,
                    protocol: x.protocol,
                    local_port: x.local_port,
                    external_port: x.external_port,
                    external_sw_if_index: x.external_sw_if_index,
                    vrf_id: x.vrf_id,
                    tag: x.tag.clone(),
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }
        "nat44_add_del_identity_mapping" => {
            let m: api::Nat44AddDelIdentityMapping = req(p)?;
            let same = |x: &api::Nat44AddDelIdentityMapping| {
                x.ip_address == m.ip_address
                    && x.protocol == m.protocol
                    && x.port == m.port
                    && x.sw_if_index == m.sw_if_index
                    && x.vrf_id == m.vrf_id
            };
            let retval = if s.nat.enabled.is_none() {
                UNSUPPORTED
            } else {
                add_del(&mut s.nat.identity_mappings, m.is_add, same, || api::Nat44AddDelIdentityMapping {
                    is_add: false,
                    ..m.clone()
                })
            };
            ctx.send(&api::Nat44AddDelIdentityMappingReply { retval });
        }
        "nat44_identity_mapping_dump" => {
            let details: Vec<_> = s
                .nat
                .identity_mappings
                .iter()
                .map(|x| api::Nat44IdentityMappingDetails {
                    flags: x.flags,
                    ip_address: x.ip_address,
                    protocol: x.protocol,
                    port: x.port,
                    sw_if_index: x.sw_if_index,
                    vrf_id: x.vrf_id,
                    tag: x.tag.clone(),
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }

        // === ACL ===
        "acl_add_replace" => {
            let m: api::AclAddReplace = req(p)?;
            let acl = Acl { tag: m.tag.clone(), rules: m.r.clone() };
            // acl_add_list checks every rule's prefixes first (ip_prefix_decode2): a length
            // past the family's, or an address with bits set past the length, is refused,
            // and the reply echoes the index asked for.
            let invalid = |p: &api::Prefix| p.to_net().is_none_or(|n| n.trunc().addr() != n.addr());
            let refused = m.r.iter().find_map(|r| {
                if invalid(&r.src_prefix) {
                    Some(-57) // VNET_API_ERROR_INVALID_SRC_ADDRESS
                } else if invalid(&r.dst_prefix) {
                    Some(-58) // VNET_API_ERROR_INVALID_DST_ADDRESS
                } else {
                    None
                }
            });
            let (retval, acl_index) = if let Some(retval) = refused {
                (retval, m.acl_index)
            } else if m.acl_index == NONE_IF {
                let idx = (0..).find(|i| !s.acls.contains_key(i)).unwrap_or(0);
                s.acls.insert(idx, acl);
                (0, idx)
            } else if let Some(existing) = s.acls.get_mut(&m.acl_index) {
                *existing = acl;
                (0, m.acl_index)
            } else {
                (errno::NO_SUCH_ENTRY, NONE_IF)
            };
            ctx.send(&api::AclAddReplaceReply { acl_index, retval });
        }
        "acl_del" => {
            let m: api::AclDel = req(p)?;
            let in_use =
                |input: bool| s.acl_bindings.values().any(|(i, o)| if input { i } else { o }.contains(&m.acl_index));
            let retval = if !s.acls.contains_key(&m.acl_index) {
                errno::NO_SUCH_ENTRY
            } else if in_use(true) {
                -142 // VNET_API_ERROR_ACL_IN_USE_INBOUND
            } else if in_use(false) {
                -143 // VNET_API_ERROR_ACL_IN_USE_OUTBOUND
            } else {
                s.acls.remove(&m.acl_index);
                0
            };
            ctx.send(&api::AclDelReply { retval });
        }
        "acl_dump" => {
            let m: api::AclDump = req(p)?;
            let details: Vec<_> = s
                .acls
                .iter()
                .filter(|(i, _)| m.acl_index == NONE_IF || **i == m.acl_index)
                .map(|(i, a)| api::AclDetails {
                    acl_index: *i,
                    tag: a.tag.clone(),
                    count: a.rules.len() as u32,
                    r: a.rules.clone(),
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }
        "acl_interface_set_acl_list" => {
            let m: api::AclInterfaceSetAclList = req(p)?;
            let retval = if !s.interfaces.contains_key(&m.sw_if_index) {
                errno::INVALID_SW_IF_INDEX
            } else if m.n_input > m.count || m.acls.iter().any(|a| !s.acls.contains_key(a)) {
                errno::NO_SUCH_ENTRY
            } else {
                let (input, output) = m.acls.split_at(m.n_input as usize);
                if m.acls.is_empty() {
                    s.acl_bindings.remove(&m.sw_if_index);
                } else {
                    s.acl_bindings.insert(m.sw_if_index, (input.to_vec(), output.to_vec()));
                }
                0
            };
            ctx.send(&api::AclInterfaceSetAclListReply { retval });
        }
        "acl_interface_list_dump" => {
            // As VPP: one entry per interface (all of them for ~0), empty lists included.
            let m: api::AclInterfaceListDump = req(p)?;
            let none = (Vec::new(), Vec::new());
            let details: Vec<_> = s
                .interfaces
                .keys()
                .filter(|i| m.sw_if_index == NONE_IF || **i == m.sw_if_index)
                .map(|i| {
                    let (input, output) = s.acl_bindings.get(i).unwrap_or(&none);
                    let acls: Vec<u32> = input.iter().chain(output).copied().collect();
                    api::AclInterfaceListDetails {
                        sw_if_index: *i,
                        count: acls.len() as u8,
                        n_input: input.len() as u8,
                        acls,
                    }
                })
                .collect();
            for d in &details {
                ctx.send(d);
            }
        }
        _ => return Err(Failure::Unhandled),
    }
    Ok(())
}

/// Sends `sw_interface_event` to every subscriber.
/// Adds an entry to `list` (`stored()`, as a dump shows it) or removes those `same`
/// matches, answering as VPP does: VALUE_EXIST for a second add, NO_SUCH_ENTRY for a delete
/// that finds none.
fn add_del<T>(list: &mut Vec<T>, is_add: bool, same: impl Fn(&T) -> bool, stored: impl FnOnce() -> T) -> i32 {
    if is_add {
        if list.iter().any(&same) {
            return errno::VALUE_EXIST;
        }
        list.push(stored());
        0
    } else {
        let before = list.len();
        list.retain(|x| !same(x));
        if list.len() < before { 0 } else { errno::NO_SUCH_ENTRY }
    }
}

fn interface_event(s: &FakeState, ctx: &mut Ctx<'_>, sw_if_index: u32, flags: api::IfStatusFlags, deleted: bool) {
    let subs: Vec<(u64, u32, u32)> = s.subscribers.iter().map(|(c, (ci, pid))| (*c, *ci, *pid)).collect();
    for (conn, client_index, pid) in subs {
        ctx.event(conn, client_index, &api::SwInterfaceEvent { pid, sw_if_index, flags, deleted });
    }
}

fn delete_kind(s: &mut FakeState, ctx: &mut Ctx<'_>, sw_if_index: u32, kind: impl Fn(&InterfaceKind) -> bool) -> i32 {
    match s.interfaces.get(&sw_if_index) {
        Some(i) if kind(&i.kind) => {
            s.remove_interface(sw_if_index);
            interface_event(s, ctx, sw_if_index, api::IfStatusFlags(0), true);
            0
        }
        Some(_) => errno::INVALID_INTERFACE,
        None => errno::INVALID_SW_IF_INDEX,
    }
}

fn add_del_address(s: &mut FakeState, m: &api::SwInterfaceAddDelAddress) -> i32 {
    if !s.interfaces.contains_key(&m.sw_if_index) {
        return errno::INVALID_SW_IF_INDEX;
    }
    if m.del_all {
        if let Some(i) = s.interfaces.get_mut(&m.sw_if_index) {
            i.addresses.clear();
        }
        return 0;
    }
    let Some(net) = m.prefix.to_net() else { return errno::INVALID_ARGUMENT };
    if m.is_add {
        // The same prefix (any host address in it) on another interface of the table conflicts.
        let table = s.interfaces[&m.sw_if_index].ip4_table;
        let conflict = s.interfaces.values().any(|i| {
            i.sw_if_index != m.sw_if_index
                && i.ip4_table == table
                && i.addresses.iter().any(|a| a.trunc() == net.trunc())
        });
        let iface = s.interfaces.get_mut(&m.sw_if_index).expect("checked");
        if conflict || iface.addresses.contains(&net) {
            return errno::DUPLICATE_IF_ADDRESS;
        }
        iface.addresses.push(net);
        0
    } else {
        let iface = s.interfaces.get_mut(&m.sw_if_index).expect("checked");
        let before = iface.addresses.len();
        iface.addresses.retain(|a| a.addr() != net.addr());
        if iface.addresses.len() < before { 0 } else { errno::ADDRESS_NOT_FOUND_FOR_INTERFACE }
    }
}

fn same_path(a: &api::FibPath, b: &api::FibPath) -> bool {
    a.sw_if_index == b.sw_if_index && a.nh.address == b.nh.address && a.r#type == b.r#type && a.table_id == b.table_id
}

fn route_add_del(
    s: &mut FakeState,
    is_add: bool,
    is_multipath: bool,
    table_id: u32,
    prefix: &api::Prefix,
    paths: &[api::FibPath],
) -> (i32, u32) {
    let Some(net) = prefix.to_net() else { return (errno::INVALID_ARGUMENT, 0) };
    let net = net.trunc();
    if !s.tables.contains_key(&(matches!(net, IpNet::V6(_)), table_id)) {
        return (errno::NO_SUCH_FIB, 0);
    }
    if let Some(bad) = paths.iter().find(|p| p.sw_if_index != NONE_IF && !s.interfaces.contains_key(&p.sw_if_index)) {
        log::debug!("fake VPP: route {net} via unknown sw_if_index {}", bad.sw_if_index);
        return (errno::INVALID_SW_IF_INDEX, 0);
    }
    if is_add && paths.is_empty() {
        return (errno::INVALID_VALUE, 0);
    }
    let key = (table_id, net);
    if is_add {
        let entry = s.routes.entry(key).or_default();
        if is_multipath {
            for p in paths {
                if !entry.iter().any(|e| same_path(e, p)) {
                    entry.push(p.clone());
                }
            }
        } else {
            *entry = paths.to_vec();
        }
    } else if is_multipath {
        if let Some(entry) = s.routes.get_mut(&key) {
            entry.retain(|e| !paths.iter().any(|p| same_path(e, p)));
            if entry.is_empty() {
                s.routes.remove(&key);
            }
        }
    } else {
        // VPP answers 0 when deleting a route that is not there.
        s.routes.remove(&key);
    }
    let stats = s.next_stats_index;
    s.next_stats_index += 1;
    (0, stats)
}

fn vxlan_add_del(s: &mut FakeState, ctx: &mut Ctx<'_>, mut m: api::VxlanAddDelTunnelV3) -> (i32, u32) {
    // VPP fills in the VXLAN port for 0.
    if m.src_port == 0 {
        m.src_port = 4789;
    }
    if m.dst_port == 0 {
        m.dst_port = 4789;
    }
    let (Some(src), Some(dst)) = (m.src_address.to_ip(), m.dst_address.to_ip()) else {
        return (errno::INVALID_ARGUMENT, NONE_IF);
    };
    let key = |t: &api::VxlanAddDelTunnelV3| {
        (t.src_address.to_ip(), t.dst_address.to_ip(), t.vni, t.encap_vrf_id, t.dst_port)
    };
    let existing = s.interfaces.values().find_map(|i| match &i.kind {
        InterfaceKind::Vxlan(t) if key(t) == key(&m) => Some(i.sw_if_index),
        _ => None,
    });
    if !m.is_add {
        return match existing {
            Some(sw) => {
                s.remove_interface(sw);
                interface_event(s, ctx, sw, api::IfStatusFlags(0), true);
                (0, sw)
            }
            None => (errno::NO_SUCH_ENTRY, NONE_IF),
        };
    }
    if existing.is_some() {
        return (errno::TUNNEL_EXIST, NONE_IF);
    }
    if src == dst || src.is_ipv4() != dst.is_ipv4() || m.vni >= 1 << 24 {
        return (errno::INVALID_ARGUMENT, NONE_IF);
    }
    if m.encap_vrf_id != 0 && !s.tables.contains_key(&(src.is_ipv6(), m.encap_vrf_id)) {
        return (errno::NO_SUCH_FIB, NONE_IF);
    }
    // vxlan.c: ~0 means l2-input (also for an L3 tunnel: only the CLI picks ip4-input for
    // those); the index must be one of vxlan4-input's (vxlan6-input's) next nodes.
    let input = if src.is_ipv6() { "vxlan6-input" } else { "vxlan4-input" };
    if m.decap_next_index == NONE_IF {
        m.decap_next_index = 1;
    }
    if s.nodes.get(input).is_none_or(|n| m.decap_next_index as usize >= n.len()) {
        return (INVALID_DECAP_NEXT, NONE_IF);
    }
    let used: Vec<u32> = s
        .interfaces
        .values()
        .filter_map(|i| match &i.kind {
            InterfaceKind::Vxlan(t) => Some(t.instance),
            _ => None,
        })
        .collect();
    if m.instance == NONE_IF {
        m.instance = (0..).find(|n| !used.contains(n)).unwrap_or(0);
    } else if used.contains(&m.instance) {
        return (-147, NONE_IF); // VNET_API_ERROR_INSTANCE_IN_USE
    }
    let name = format!("vxlan_tunnel{}", m.instance);
    m.is_add = false;
    (0, s.add_interface(name, InterfaceKind::Vxlan(m), [0; 6]))
}

/// `nat_calc_bihash_buckets` (plugins/nat/lib/lib.h): the power of two nearest to
/// `sessions / 2.5`.
fn nat_buckets(sessions: u32) -> u32 {
    let n = (f64::from(sessions) / 2.5) as u64;
    let mut lower = 1u64;
    while lower * 2 < n {
        lower *= 2;
    }
    let upper = lower * 2;
    if upper.wrapping_sub(n) < n.wrapping_sub(lower) && upper <= u64::from(u32::MAX) {
        upper as u32
    } else {
        lower as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_entry_is_added_once_and_removed_once() {
        let mut list = vec![(1, "a")];
        let same = |x: &(i32, &str)| x.0 == 2;
        assert_eq!(add_del(&mut list, true, same, || (2, "b")), 0);
        assert_eq!(add_del(&mut list, true, same, || (2, "c")), errno::VALUE_EXIST);
        assert_eq!(list, [(1, "a"), (2, "b")]);
        assert_eq!(add_del(&mut list, false, same, || unreachable!()), 0);
        assert_eq!(add_del(&mut list, false, same, || unreachable!()), errno::NO_SUCH_ENTRY);
        assert_eq!(list, [(1, "a")]);
    }

    #[test]
    fn translation_buckets_are_the_power_of_two_nearest_to_sessions_over_two_and_a_half() {
        assert_eq!(nat_buckets(4096), 2048);
        assert_eq!(nat_buckets(crate::state::NAT_DEFAULT_SESSIONS), 32768);
        assert_eq!(nat_buckets(1000), 512);
    }
}
