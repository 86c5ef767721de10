//! The node's kernel datapath.
//!
//! - `tc_from_pod` (tcx ingress on every pod's host-side veth): checks that the frame
//!   really comes from the pod (source MAC, IPv4, ARP sender), then:
//!   a local pod -> straight into it with `bpf_redirect_peer` (no host routing stack);
//!   a pod or node address another node owns -> encapsulated into the overlay;
//!   anything else outside the local pod subnet (the host, node addresses, the outside
//!   world) -> the node's own stack, which routes it (and masquerades what leaves);
//!   the gateway, unknown local addresses, IP options, fragments, packets too big for the
//!   overlay -> the slow path.
//! - `tc_from_overlay` / `tc_to_overlay` (tcx on the node's VXLAN device): decapsulated
//!   packets from other nodes go into local pods or to this node; host-originated packets to
//!   other nodes' pods get their tunnel key (see `overlay.rs`).
//! - `xdp_to_vswitch` (XDP on the vswitch end of the slow-path port): hands every frame
//!   to the AF_XDP socket of the vswitch; `xdp_to_vpp` does the same into the socket VPP's
//!   af_xdp interface registered (`uplink = "vpp"`).
//! - `tc_from_vswitch` (tcx ingress on the host end of the slow-path port): delivers the
//!   vswitch's frames to the pod they are addressed to; in kernel mode, frames for anything
//!   else go to the node's stack (which routes them out, or into the overlay).
//!
//! `uplink = "vpp"` (CONFIG flag `VPP_UPLINK`): VPP owns the wire, so `tc_from_pod` hands
//! everything that is not for a local pod to the slow-path port, i.e. to VPP (which routes,
//! tunnels to other nodes, NATs and reaches the host over its tap). Local pod to pod stays
//! on the fast path.
//!
//! NetworkPolicy (`policy.rs`): every new flow from or to a local pod is recorded in
//! conntrack once policy allowed it; a pod isolated for egress has its new flows checked in
//! `tc_from_pod` against the post-DNAT destination, a pod isolated for ingress has them
//! checked where they are delivered (`tc_from_pod` for local senders, `tc_from_overlay`
//! for other nodes', `tc_from_uplink` for the outside). Established packets and replies
//! pass on their conntrack entry.
//!
//! The bulk path stays on TC so veths keep GSO/GRO and checksum offload
//! (see ../../shared DATAPATH-FACTS); only slow-path frames cross XDP.
//!
//! Bandwidth limits: a pod with an ingress limit has a `tbf` qdisc on its host veth, so the
//! fast path hands packets for it to that veth's egress (`bpf_redirect`) instead of straight
//! into the pod (`bpf_redirect_peer`, which skips every qdisc). Egress limits need nothing
//! here: the pod's own interface shapes what it sends. Pods without limits never detour.
#![no_std]
#![no_main]

mod ct;
mod lb;
mod maps;
mod nat;
mod overlay;
mod packet;
mod policy;
mod sock;
mod svc;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::generated::{bpf_check_mtu, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_change_type},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use contiv_common::{DatapathConfig, PodCounters, PodEndpoint, config_flags, pod_flags, policy_dir};
use maps::{
    SLOWPATH_XSKS, VPP_XSKS, config, count_overlay, count_slowport, pod, pod_by_ifindex, pod_counters, remote_route,
};
use packet::*;
use policy::Transport;
use svc::{NewFlow, Origin, Outcome};

/// `skb->pkt_type` for a packet addressed to this host.
const PACKET_HOST: u32 = 0;

/// What the pod's frame turned out to be.
enum Verdict {
    /// Into this local pod.
    Local(PodEndpoint),
    /// Tunnel key set: out of the overlay device with this ifindex.
    Tunnel(u32),
    /// To the node's own stack (the host, node addresses, outside the cluster).
    Host,
    /// A reply to a client outside the cluster: out of the uplink to this ifindex.
    Uplink(u32),
    /// Not for the fast path: hand to the vswitch.
    SlowPath,
    /// Drop, for this reason.
    Drop(DropReason),
}

enum DropReason {
    Malformed,
    SpoofedMac,
    SpoofedIp,
    TtlExceeded,
    Service,
    /// The sender's egress rules do not allow the new flow.
    PolicyEgress,
    /// The local receiver's (this address) ingress rules do not allow the new flow.
    PolicyIngress([u8; 4]),
}

/// Into a local pod: straight into its namespace, or through its host veth's qdisc when its
/// ingress is shaped.
#[inline(always)]
fn deliver(dst: &PodEndpoint) -> i32 {
    if (dst.flags & pod_flags::INGRESS_LIMITED) != 0 {
        // SAFETY: plain helper call.
        return unsafe { bpf_redirect(dst.host_ifindex, 0) as i32 };
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect_peer(dst.host_ifindex, 0) as i32 }
}

#[inline(always)]
fn count(c: &mut Option<&'static mut PodCounters>, f: impl FnOnce(&mut PodCounters)) {
    if let Some(c) = c.as_deref_mut() {
        f(c);
    }
}

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(pod) = pod_by_ifindex(ifindex) else {
        // Not a pod interface we know (yet or any more): never let it through.
        return TC_ACT_SHOT;
    };
    let len = u64::from(ctx.skb.len());
    let verdict = classify_from_pod(&ctx, &pod);
    let mut counters = pod_counters(pod.ip);
    match verdict {
        Verdict::Local(dst) => {
            count(&mut counters, |c| {
                c.fwd_packets += 1;
                c.fwd_bytes += len;
            });
            deliver(&dst)
        }
        Verdict::Tunnel(overlay_ifindex) => {
            count(&mut counters, |c| {
                c.tunnel_packets += 1;
                c.tunnel_bytes += len;
            });
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(overlay_ifindex, 0) as i32 }
        }
        Verdict::Host => {
            count(&mut counters, |c| {
                c.host_packets += 1;
                c.host_bytes += len;
            });
            // The frame is addressed to the gateway MAC, not the host veth's: without this
            // the stack would see it as for another host and drop it.
            // SAFETY: plain helper call on our own skb.
            unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
            TC_ACT_OK
        }
        Verdict::Uplink(ifindex) => {
            count(&mut counters, |c| {
                c.host_packets += 1;
                c.host_bytes += len;
            });
            to_uplink(ifindex)
        }
        Verdict::SlowPath => to_slow_path(counters, len),
        Verdict::Drop(reason) => {
            count(&mut counters, |c| match reason {
                DropReason::Malformed => c.drop_malformed += 1,
                DropReason::SpoofedMac => c.drop_spoofed_mac += 1,
                DropReason::SpoofedIp => c.drop_spoofed_ip += 1,
                DropReason::TtlExceeded => c.drop_ttl_exceeded += 1,
                DropReason::Service => c.drop_service += 1,
                DropReason::PolicyEgress => c.drop_policy_egress += 1,
                // Counted on the receiver below.
                DropReason::PolicyIngress(_) => {}
            });
            if let DropReason::PolicyIngress(receiver) = reason {
                count(&mut pod_counters(receiver), |c| c.drop_policy_ingress += 1);
            }
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn to_slow_path(mut counters: Option<&'static mut PodCounters>, len: u64) -> i32 {
    let slowport = config().map(|c| c.slowport_ifindex).unwrap_or(0);
    if slowport == 0 {
        count(&mut counters, |c| c.drop_no_slowpath += 1);
        return TC_ACT_SHOT;
    }
    count(&mut counters, |c| {
        c.slow_packets += 1;
        c.slow_bytes += len;
    });
    // Out of the host end of the slow-path port; its peer's XDP program feeds the AF_XDP socket.
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(slowport, 0) as i32 }
}

/// Out of the uplink, towards a client outside the cluster: the kernel's FIB picks the next
/// hop and fills in the MACs (the node's stack would refuse a packet with its own address as
/// the source arriving from a pod).
#[inline(always)]
fn to_uplink(ifindex: u32) -> i32 {
    // SAFETY: plain helper call; no next-hop parameters: the FIB decides.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Whether the packet fits the overlay device's MTU (GSO packets: each segment).
#[inline(always)]
fn fits_mtu(ctx: &TcContext, ifindex: u32) -> bool {
    let mut mtu_len: u32 = 0;
    // SAFETY: helper call with a pointer to a stack value.
    unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &mut mtu_len, 0, 0) == 0 }
}

#[inline(always)]
fn classify_from_pod(ctx: &TcContext, me: &PodEndpoint) -> Verdict {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(eth) = eth(data, data_end) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if eth[6..12] != me.mac {
        return Verdict::Drop(DropReason::SpoofedMac);
    }
    let ethertype = ethertype(eth);
    if ethertype == ETH_P_ARP {
        let Some(arp) = arp(data, data_end) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        // The sender hardware address must be the pod's own, like the frame's source.
        if arp[ARP_SHA_OFF..ARP_SHA_OFF + 6] != me.mac {
            return Verdict::Drop(DropReason::SpoofedMac);
        }
        let spa = [arp[ARP_SPA_OFF], arp[ARP_SPA_OFF + 1], arp[ARP_SPA_OFF + 2], arp[ARP_SPA_OFF + 3]];
        // An ARP claiming another pod's address is spoofing, except the
        // all-zero sender of an address probe.
        if spa != me.ip && spa != [0, 0, 0, 0] {
            return Verdict::Drop(DropReason::SpoofedIp);
        }
        return Verdict::SlowPath;
    }
    if ethertype != ETH_P_IP {
        return Verdict::SlowPath;
    }
    let Some(ip) = ipv4(data, data_end) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if src_ip(ip) != me.ip {
        return Verdict::Drop(DropReason::SpoofedIp);
    }
    if has_options_or_is_fragment(ip) {
        return Verdict::SlowPath;
    }
    let Some(cfg) = config() else {
        return Verdict::SlowPath;
    };
    let (src, mut dst, proto) = (src_ip(ip), dst_ip(ip), ip[9]);
    // Services and conntrack: may rewrite the packet (its pointers are stale afterwards).
    let mut first = FirstPacket::Plain;
    let mut tcp_flags = 0;
    if let Some(l4) = nat::l4(data, data_end, proto) {
        tcp_flags = l4.tcp_flags;
        match svc::process(ctx, cfg, src, dst, &l4, Origin::Pod) {
            Outcome::Untouched => {}
            Outcome::Tracked { to_uplink: true, .. } => return Verdict::Uplink(cfg.uplink_ifindex),
            Outcome::Tracked { dst: to, .. } => {
                dst = to;
                first = FirstPacket::Tracked;
            }
            Outcome::New { dst: to, flow } => {
                dst = to;
                first = FirstPacket::Service(flow);
            }
            Outcome::Reject => return Verdict::SlowPath,
            Outcome::Drop => return Verdict::Drop(DropReason::Service),
        }
    } else if policy::tracked(&policy::transport(data, data_end, proto), src, dst) {
        first = FirstPacket::Tracked;
    }
    let verdict = route_from_pod(ctx, cfg, dst);
    if matches!(first, FirstPacket::Tracked) || matches!(verdict, Verdict::Drop(_)) {
        return verdict;
    }
    // A new flow: checked as it leaves here (after DNAT, and SNAT for a hairpin): the
    // sender's egress rules, then a local receiver's ingress rules.
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(ip) = packet::ipv4(data, data_end) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    let (peer_src, t) = (src_ip(ip), policy::transport(data, data_end, proto));
    if me.flags & pod_flags::EGRESS_ISOLATED != 0 && !policy::allows(me.ip, policy_dir::EGRESS, dst, &t) {
        return Verdict::Drop(DropReason::PolicyEgress);
    }
    if let Verdict::Local(peer) = &verdict
        && peer.flags & pod_flags::INGRESS_ISOLATED != 0
        && !policy::allows(peer.ip, policy_dir::INGRESS, peer_src, &t)
    {
        return Verdict::Drop(DropReason::PolicyIngress(peer.ip));
    }
    if !first.commit(src, dst, &t, tcp_flags) {
        return Verdict::Drop(DropReason::Service);
    }
    verdict
}

/// What conntrack said about a packet before routing.
enum FirstPacket {
    /// Its flow is tracked: established or a reply; no policy check.
    Tracked,
    /// The first packet of a flow no service translated.
    Plain,
    /// The first packet of a service flow, translated; recorded once allowed.
    Service(NewFlow),
}

impl FirstPacket {
    /// Records an allowed new flow (`dst`: after DNAT). False only if a service flow could
    /// not be recorded (its reply could not be translated back: drop it); a plain flow that
    /// could not be recorded goes on and its next packet is checked again.
    #[inline(always)]
    fn commit(&self, src: [u8; 4], dst: [u8; 4], t: &Transport, tcp_flags: u8) -> bool {
        match self {
            FirstPacket::Tracked => true,
            FirstPacket::Plain => {
                policy::track(src, dst, t, tcp_flags);
                true
            }
            FirstPacket::Service(flow) => svc::commit(flow),
        }
    }
}

/// Where a pod's packet for `dst` goes (after any service rewrite).
#[inline(always)]
fn route_from_pod(ctx: &TcContext, cfg: &DatapathConfig, dst: [u8; 4]) -> Verdict {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if dst == cfg.gateway_ip {
        return Verdict::SlowPath;
    }
    if let Some(peer) = pod(dst) {
        if !decrement_ttl(ip) {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        // L2 rewrite: from the gateway to the destination pod.
        eth[0..6].copy_from_slice(&peer.mac);
        eth[6..12].copy_from_slice(&cfg.gateway_mac);
        return Verdict::Local(peer);
    }
    if (cfg.flags & config_flags::VPP_UPLINK) != 0 {
        // VPP owns the wire: it routes (and decrements the TTL) for everything leaving here.
        return Verdict::SlowPath;
    }
    let overlay = cfg.overlay_ifindex;
    if overlay != 0
        && let Some(route) = remote_route(dst)
    {
        // Too big for the tunnel: the slow path answers "fragmentation needed" (the
        // datapath never fragments).
        if !fits_mtu(ctx, overlay) {
            return Verdict::SlowPath;
        }
        if !decrement_ttl(ip) {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        eth[6..12].copy_from_slice(&cfg.gateway_mac);
        if !overlay::set_tunnel(ctx, route.node_ip, cfg.vni) {
            return Verdict::Drop(DropReason::Malformed);
        }
        return Verdict::Tunnel(overlay);
    }
    if in_subnet(dst, cfg.pod_subnet, cfg.pod_mask) {
        // An address of this node's pod subnet that no pod holds.
        return Verdict::SlowPath;
    }
    Verdict::Host
}

#[classifier]
pub fn tc_from_overlay(ctx: TcContext) -> i32 {
    let len = u64::from(ctx.skb.len());
    let Some(sender) = overlay::tunnel_remote(&ctx) else {
        count_overlay(|c| c.rx_malformed += 1);
        return TC_ACT_SHOT;
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        count_overlay(|c| c.rx_malformed += 1);
        return TC_ACT_SHOT;
    };
    if ethertype(eth) != ETH_P_IP {
        count_overlay(|c| c.rx_malformed += 1);
        return TC_ACT_SHOT;
    }
    // Anti-spoofing across nodes: the inner source must be the sending node itself or one
    // of its pods (REMOTE_ROUTES maps both to that node's address).
    if remote_route(src_ip(ip)).map(|r| r.node_ip) != Some(sender) {
        count_overlay(|c| c.rx_spoofed += 1);
        return TC_ACT_SHOT;
    }
    let Some(cfg) = config() else {
        count_overlay(|c| c.rx_no_destination += 1);
        return TC_ACT_SHOT;
    };
    let (src, mut dst, proto) = (src_ip(ip), dst_ip(ip), ip[9]);
    let t = policy::transport(data, data_end, proto);
    // Replies of flows this node NAT'ed (a client here, or outside through this node), and
    // every flow conntrack knows.
    let mut first = FirstPacket::Plain;
    let mut tcp_flags = 0;
    if let Some(l4) = nat::l4(data, data_end, proto) {
        tcp_flags = l4.tcp_flags;
        match svc::process(&ctx, cfg, src, dst, &l4, Origin::Overlay) {
            Outcome::Tracked { to_uplink: true, .. } => return to_uplink(cfg.uplink_ifindex),
            Outcome::Tracked { dst: to, .. } => {
                dst = to;
                first = FirstPacket::Tracked;
            }
            Outcome::Untouched => {}
            // The sending node balanced the flow; nothing is translated here.
            Outcome::New { .. } | Outcome::Reject | Outcome::Drop => {
                count_overlay(|c| c.rx_malformed += 1);
                return TC_ACT_SHOT;
            }
        }
    } else if policy::tracked(&t, src, dst) {
        first = FirstPacket::Tracked;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        count_overlay(|c| c.rx_malformed += 1);
        return TC_ACT_SHOT;
    };
    if let Some(pod) = pod(dst) {
        // A new flow from another node: the receiver's ingress rules, on its own node.
        if !matches!(first, FirstPacket::Tracked) {
            if pod.flags & pod_flags::INGRESS_ISOLATED != 0 && !policy::allows(pod.ip, policy_dir::INGRESS, src, &t) {
                if let Some(c) = pod_counters(dst) {
                    c.drop_policy_ingress += 1;
                }
                return TC_ACT_SHOT;
            }
            first.commit(src, dst, &t, tcp_flags);
        }
        if !decrement_ttl(ip) {
            count_overlay(|c| c.rx_malformed += 1);
            return TC_ACT_SHOT;
        }
        eth[0..6].copy_from_slice(&pod.mac);
        eth[6..12].copy_from_slice(&cfg.gateway_mac);
        if let Some(c) = pod_counters(dst) {
            c.from_tunnel_packets += 1;
            c.from_tunnel_bytes += len;
        }
        count_overlay(|c| c.rx_delivered += 1);
        return deliver(&pod);
    }
    if dst == cfg.node_ip {
        count_overlay(|c| c.rx_to_host += 1);
        // SAFETY: plain helper call on our own skb.
        unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
        return TC_ACT_OK;
    }
    count_overlay(|c| c.rx_no_destination += 1);
    TC_ACT_SHOT
}

#[classifier]
pub fn tc_to_overlay(ctx: TcContext) -> i32 {
    // Pod traffic arrives with its key already set by tc_from_pod.
    if overlay::tunnel_remote(&ctx).is_some() {
        return TC_ACT_OK;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        count_overlay(|c| c.tx_no_route += 1);
        return TC_ACT_SHOT;
    };
    let (Some(route), Some(cfg)) = (remote_route(dst_ip(ip)), config()) else {
        count_overlay(|c| c.tx_no_route += 1);
        return TC_ACT_SHOT;
    };
    if ethertype(eth) != ETH_P_IP || !overlay::set_tunnel(&ctx, route.node_ip, cfg.vni) {
        count_overlay(|c| c.tx_no_route += 1);
        return TC_ACT_SHOT;
    }
    count_overlay(|c| c.tx_host_encapsulated += 1);
    TC_ACT_OK
}

#[classifier]
pub fn tc_from_vswitch(ctx: TcContext) -> i32 {
    let len = u64::from(ctx.skb.len());
    let Some(dst) = vswitch_frame_destination(ctx.data(), ctx.data_end()) else {
        count_slowport(|c| c.from_vswitch_no_pod += 1);
        return TC_ACT_SHOT;
    };
    let Some(pod) = pod(dst) else {
        return from_vswitch_elsewhere(&ctx, dst);
    };
    // VPP mode: VPP brings other nodes' and the outside's traffic here, so a new flow must
    // pass the pod's ingress rules (the built-in vswitch only answers for the gateway: the
    // pod's own node, always allowed).
    if pod.flags & pod_flags::INGRESS_ISOLATED != 0
        && config().is_some_and(|c| c.flags & config_flags::VPP_UPLINK != 0)
        && !vpp_ingress_allowed(&ctx, &pod)
    {
        if let Some(c) = pod_counters(dst) {
            c.drop_policy_ingress += 1;
        }
        return TC_ACT_SHOT;
    }
    if let Some(c) = pod_counters(dst) {
        c.from_slow_packets += 1;
        c.from_slow_bytes += len;
    }
    count_slowport(|c| c.from_vswitch_delivered += 1);
    deliver(&pod)
}

/// A frame from VPP for an ingress-isolated pod: a tracked flow, or a new one its rules
/// allow (then tracked). ARP is always allowed.
#[inline(always)]
fn vpp_ingress_allowed(ctx: &TcContext, pod: &PodEndpoint) -> bool {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return true;
    };
    if ethertype(eth) != ETH_P_IP {
        return true;
    }
    if has_options_or_is_fragment(ip) {
        return false;
    }
    let (src, dst, proto) = (src_ip(ip), dst_ip(ip), ip[9]);
    let t = policy::transport(data, data_end, proto);
    if policy::tracked(&t, src, dst) {
        return true;
    }
    if !policy::allows(pod.ip, policy_dir::INGRESS, src, &t) {
        return false;
    }
    let tcp_flags = nat::l4(data, data_end, proto).map_or(0, |l4| l4.tcp_flags);
    policy::track(src, dst, &t, tcp_flags);
    true
}

/// Traffic from outside the cluster to NodePorts, externalIPs and load-balancer IPs (tcx
/// ingress on the uplink): balanced, DNAT'ed (SNAT'ed too when the backend is on another
/// node), and sent to the backend; everything else goes on to the node's stack untouched.
#[classifier]
pub fn tc_from_uplink(ctx: TcContext) -> i32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return TC_ACT_OK;
    };
    if ethertype(eth) != ETH_P_IP || has_options_or_is_fragment(ip) {
        return TC_ACT_OK;
    }
    let (src, proto) = (src_ip(ip), ip[9]);
    let Some(l4) = nat::l4(data, data_end, proto) else {
        return from_outside_to_pod(&ctx, src, dst_ip(ip), proto, 0, false);
    };
    // The overlay's own packets: the commonest thing on the wire, nothing to do.
    if l4.proto == nat::IPPROTO_UDP && l4.dport == 4789 {
        return TC_ACT_OK;
    }
    let Some(cfg) = config() else {
        return TC_ACT_OK;
    };
    // A new flow is admitted (policy, then conntrack) inside its arm: carrying an
    // `Option<NewFlow>` past the match let LLVM merge paths on which parts of it are
    // undefined, and the verifier refused the program for reading them.
    let dst = match svc::process(&ctx, cfg, src, dst_ip(ip), &l4, Origin::Uplink) {
        Outcome::Untouched => return from_outside_to_pod(&ctx, src, dst_ip(ip), proto, l4.tcp_flags, true),
        // Tracked but not translated: a flow the node's stack routes (to a pod, or the node).
        Outcome::Tracked { rewritten: false, .. } => return TC_ACT_OK,
        Outcome::Tracked { dst, .. } => dst,
        Outcome::New { dst, flow } => {
            if !admit_from_outside(src, dst, proto, l4.sport, &flow) {
                return TC_ACT_SHOT;
            }
            dst
        }
        Outcome::Reject => {
            // The vswitch answers (RST / port unreachable); its reply leaves by the uplink.
            if cfg.slowport_ifindex == 0 {
                return TC_ACT_SHOT;
            }
            // SAFETY: plain helper call.
            return unsafe { bpf_redirect(cfg.slowport_ifindex, 0) as i32 };
        }
        Outcome::Drop => return TC_ACT_SHOT,
    };
    let local = pod(dst);
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return TC_ACT_SHOT;
    };
    if !decrement_ttl(ip) {
        return TC_ACT_SHOT;
    }
    eth[6..12].copy_from_slice(&cfg.gateway_mac);
    if let Some(pod) = local {
        eth[0..6].copy_from_slice(&pod.mac);
        if let Some(c) = pod_counters(dst) {
            c.from_tunnel_packets += 1;
            c.from_tunnel_bytes += u64::from(ctx.skb.len());
        }
        return deliver(&pod);
    }
    if cfg.overlay_ifindex != 0
        && let Some(route) = remote_route(dst)
        && overlay::set_tunnel(&ctx, route.node_ip, cfg.vni)
    {
        // SAFETY: plain helper call.
        return unsafe { bpf_redirect(cfg.overlay_ifindex, 0) as i32 };
    }
    TC_ACT_SHOT
}

/// A new flow from outside to a service backend at `dst`: a local backend's ingress rules
/// (a backend on another node is checked there, against this node's address when the flow
/// was SNAT'ed), then the flow is recorded. False: drop.
#[inline(always)]
fn admit_from_outside(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, flow: &NewFlow) -> bool {
    if let Some(backend) = pod(dst)
        && backend.flags & pod_flags::INGRESS_ISOLATED != 0
    {
        let t = Transport::Ports { proto, sport, dport: flow.fwd.nat_port };
        if !policy::allows(backend.ip, policy_dir::INGRESS, src, &t) {
            if let Some(c) = pod_counters(dst) {
                c.drop_policy_ingress += 1;
            }
            return false;
        }
    }
    svc::commit(flow)
}

/// A packet from outside straight to a local pod's address (routed to the node), not a
/// service: the node's stack delivers it; a new flow must pass the pod's ingress rules
/// first, and is tracked so the pod's replies pass its egress rules. `untracked`: the
/// service stage already found no conntrack entry.
#[inline(always)]
fn from_outside_to_pod(ctx: &TcContext, src: [u8; 4], dst: [u8; 4], proto: u8, tcp_flags: u8, untracked: bool) -> i32 {
    let Some(cfg) = config() else {
        return TC_ACT_OK;
    };
    if !in_subnet(dst, cfg.pod_subnet, cfg.pod_mask) {
        return TC_ACT_OK;
    }
    let Some(pod) = pod(dst) else {
        return TC_ACT_OK;
    };
    let t = policy::transport(ctx.data(), ctx.data_end(), proto);
    if !untracked && policy::tracked(&t, src, dst) {
        return TC_ACT_OK;
    }
    if pod.flags & pod_flags::INGRESS_ISOLATED != 0 && !policy::allows(pod.ip, policy_dir::INGRESS, src, &t) {
        if let Some(c) = pod_counters(dst) {
            c.drop_policy_ingress += 1;
        }
        return TC_ACT_SHOT;
    }
    policy::track(src, dst, &t, tcp_flags);
    TC_ACT_OK
}

/// A frame from the slow path for no local pod (a reply, e.g. a refusal, to a client on
/// another node or outside). Kernel mode: another node's pod or node -> the overlay; this
/// node's own address -> its stack; the outside -> out of the uplink (the stack would take a
/// service frontend as source for a martian). VPP mode: VPP sends such frames out of its
/// own interfaces, never back through the port.
#[inline(always)]
fn from_vswitch_elsewhere(ctx: &TcContext, dst: [u8; 4]) -> i32 {
    let Some(cfg) = config() else {
        count_slowport(|c| c.from_vswitch_no_pod += 1);
        return TC_ACT_SHOT;
    };
    if (cfg.flags & config_flags::VPP_UPLINK) != 0 || in_subnet(dst, cfg.pod_subnet, cfg.pod_mask) {
        count_slowport(|c| c.from_vswitch_no_pod += 1);
        return TC_ACT_SHOT;
    }
    count_slowport(|c| c.from_vswitch_delivered += 1);
    if cfg.overlay_ifindex != 0
        && let Some(route) = remote_route(dst)
        && overlay::set_tunnel(ctx, route.node_ip, cfg.vni)
    {
        // SAFETY: plain helper call.
        return unsafe { bpf_redirect(cfg.overlay_ifindex, 0) as i32 };
    }
    if cfg.uplink_ifindex != 0 && !lb::is_local_node_addr(dst) {
        return to_uplink(cfg.uplink_ifindex);
    }
    // SAFETY: plain helper call on our own skb.
    unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
    TC_ACT_OK
}

/// The pod IPv4 address a frame from the vswitch is for: IPv4 destination, or the
/// ARP target protocol address.
#[inline(always)]
fn vswitch_frame_destination(data: usize, data_end: usize) -> Option<[u8; 4]> {
    let eth = eth(data, data_end)?;
    match ethertype(eth) {
        ETH_P_IP => Some(dst_ip(ipv4(data, data_end)?)),
        ETH_P_ARP => {
            let arp = arp(data, data_end)?;
            Some([arp[ARP_TPA_OFF], arp[ARP_TPA_OFF + 1], arp[ARP_TPA_OFF + 2], arp[ARP_TPA_OFF + 3]])
        }
        _ => None,
    }
}

#[xdp]
pub fn xdp_to_vswitch(ctx: XdpContext) -> u32 {
    to_socket(&SLOWPATH_XSKS, ctx.rx_queue_index())
}

#[xdp]
pub fn xdp_to_vpp(ctx: XdpContext) -> u32 {
    to_socket(&VPP_XSKS, ctx.rx_queue_index())
}

/// Redirects the frame to the AF_XDP socket of `queue` in `sockets`.
#[inline(always)]
fn to_socket<const N: usize>(sockets: &aya_ebpf::btf_maps::XskMap<N>, queue: u32) -> u32 {
    match sockets.redirect(queue, u64::from(xdp_action::XDP_DROP)) {
        Ok(action) => {
            count_slowport(|c| c.to_vswitch_packets += 1);
            action
        }
        Err(_) => {
            count_slowport(|c| c.to_vswitch_no_socket += 1);
            xdp_action::XDP_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
