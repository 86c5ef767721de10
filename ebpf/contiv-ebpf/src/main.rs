//! The node's kernel datapath.
//!
//! - `tc_from_pod` (tcx ingress on every pod's host-side veth): checks that the frame
//!   really comes from the pod (source MAC, IPv4, ARP sender), then:
//!   a local pod -> straight into it with `bpf_redirect_peer` (no host routing stack);
//!   a pod or node address another node owns -> encapsulated into the overlay;
//!   anything else outside the local pod subnet (the host, node addresses, the outside
//!   world) -> the node's own stack, which routes it (and masquerades what leaves);
//!   the gateway, unknown local addresses, packets too big for the overlay -> the slow
//!   path. Fragments take the fast path like whole datagrams (see `frag.rs`), and so do
//!   packets with IP options (their transport header is found past them).
//! - `tc_from_overlay` / `tc_to_overlay` (tcx on the node's VXLAN device): decapsulated
//!   packets from other nodes go into local pods or to this node; what the node's stack
//!   sends to other nodes' pods and addresses gets its tunnel key (see `overlay.rs`) and is
//!   tracked so that its replies come back through the stack (see `ct_flags::VIA_HOST`).
//! - `xdp_to_vswitch` (XDP on the vswitch end of the slow-path port): hands every frame
//!   to the AF_XDP socket of the vswitch; `xdp_to_vpp` does the same into the socket VPP's
//!   af_xdp interface registered (`uplink = "vpp"`).
//! - `tc_from_vswitch` (tcx ingress on the host end of the slow-path port): delivers the
//!   vswitch's frames to the pod they are addressed to, translated back first when they
//!   belong to a flow this node translated (VPP brings a remote backend's answers); in
//!   kernel mode, frames for anything else go to the node's stack (which routes them out,
//!   or into the overlay).
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
mod frag;
mod lb;
mod maps;
mod monitor;
mod nat;
mod overlay;
mod packet;
mod policy;
mod sock;
mod svc;
mod trace;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, xdp_action},
    helpers::generated::{
        bpf_check_mtu, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_change_tail, bpf_skb_change_type,
    },
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use contiv_common::{
    DatapathConfig, PodCounters, PodEndpoint, SLOW_PORT_MTU, config_flags, drop_reason, hook, monitor_bucket,
    monitor_kind, pod_flags, policy_dir, route_flags, trace_route, trace_step, verdict as out,
};
use core::mem::MaybeUninit;
use frag::Fragment;
use maps::{
    SLOWPATH_XSKS, VPP_XSKS, config, count_overlay, count_slowport, pod, pod_by_ifindex, pod_counters, remote_route,
};
use packet::*;
use policy::Transport;

use svc::{NewFlow, Origin, outcome};
use trace::Trace;

/// `skb->pkt_type` for a packet addressed to this host.
const PACKET_HOST: u32 = 0;

/// TCP flags SYN and ACK: a connection's answer.
const SYN_ACK: u8 = 0x12;

/// What the pod's frame turned out to be. A plain struct whose every byte is written (not
/// an enum with payloads): copying an enum moves bytes its variant never wrote, and LLVM
/// may store them from any register, which the verifier refuses.
#[derive(Clone, Copy)]
struct Verdict {
    /// [`out`]: LOCAL / LOCAL_SHAPED (into `peer`), TUNNEL (`ifindex` to `node_ip`), HOST,
    /// UPLINK (`ifindex`), SLOW_PATH, DROP (`reason`; the receiver in `peer.ip` for
    /// policy_ingress).
    kind: u8,
    reason: u8,
    _pad: [u8; 2],
    ifindex: u32,
    node_ip: [u8; 4],
    peer: PodEndpoint,
}

impl Verdict {
    const NONE: PodEndpoint = PodEndpoint { ip: [0; 4], host_ifindex: 0, mac: [0; 6], flags: 0, _pad: 0 };

    #[inline(always)]
    const fn new(kind: u8, reason: u8, ifindex: u32, node_ip: [u8; 4], peer: PodEndpoint) -> Self {
        Self { kind, reason, _pad: [0; 2], ifindex, node_ip, peer }
    }

    /// Into this local pod (through its veth's qdisc when its ingress is shaped).
    #[inline(always)]
    fn local(peer: PodEndpoint) -> Self {
        let kind = if peer.flags & pod_flags::INGRESS_LIMITED != 0 { out::LOCAL_SHAPED } else { out::LOCAL };
        Self::new(kind, 0, peer.host_ifindex, [0; 4], peer)
    }

    /// Tunnel key set: out of the overlay device `ifindex`, to that node.
    #[inline(always)]
    fn tunnel(ifindex: u32, node_ip: [u8; 4]) -> Self {
        Self::new(out::TUNNEL, 0, ifindex, node_ip, Self::NONE)
    }

    /// Encapsulated here, for that node: out of the uplink `ifindex` (the kernel's FIB and
    /// neighbour table fill in the outer MACs).
    #[inline(always)]
    fn encapsulated(ifindex: u32, node_ip: [u8; 4]) -> Self {
        Self::new(out::TUNNEL, Self::ENCAPSULATED, ifindex, node_ip, Self::NONE)
    }

    /// `reason` of a TUNNEL verdict whose packet carries its outer headers already.
    const ENCAPSULATED: u8 = 1;

    /// To the node's own stack (the host, node addresses, outside the cluster).
    const HOST: Self = Self::new(out::HOST, 0, 0, [0; 4], Self::NONE);

    /// A reply to a client outside the cluster: out of the uplink `ifindex`.
    #[inline(always)]
    fn uplink(ifindex: u32) -> Self {
        Self::new(out::UPLINK, 0, ifindex, [0; 4], Self::NONE)
    }

    /// Not for the fast path: hand to the vswitch.
    const SLOW_PATH: Self = Self::new(out::SLOW_PATH, 0, 0, [0; 4], Self::NONE);

    /// Dropped for this [`drop_reason`].
    #[inline(always)]
    fn drop(reason: u8) -> Self {
        Self::new(out::DROP, reason, 0, [0; 4], Self::NONE)
    }

    /// Dropped by the ingress rules of the local receiver `ip`.
    #[inline(always)]
    fn drop_ingress(ip: [u8; 4]) -> Self {
        Self::new(out::DROP, drop_reason::POLICY_INGRESS, 0, [0; 4], PodEndpoint { ip, ..Self::NONE })
    }
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

/// A monitor event `from_pod` asks for; emitted once it returned (see `tc_from_pod`).
#[derive(Clone, Copy, Default)]
struct PendingEvent {
    bucket: u32,
    /// `monitor::info`; 0: no event.
    info: u32,
    pod: u32,
    next_hop: u32,
    /// The packet carries the overlay's outer headers now: the event describes the inner one.
    encapsulated: u32,
}

impl PendingEvent {
    #[inline(always)]
    fn drop(reason: u8, pod: [u8; 4]) -> Self {
        Self {
            bucket: monitor_bucket::DROPS,
            info: monitor::info(monitor_kind::DROP, reason, hook::FROM_POD),
            pod: u32::from_ne_bytes(pod),
            next_hop: 0,
            encapsulated: 0,
        }
    }

    #[inline(always)]
    fn flow(verdict: u8, pod: [u8; 4], next_hop: [u8; 4]) -> Self {
        Self {
            bucket: monitor_bucket::FLOWS,
            info: monitor::info(monitor_kind::FLOW, verdict, hook::FROM_POD),
            pod: u32::from_ne_bytes(pod),
            next_hop: u32::from_ne_bytes(next_hop),
            encapsulated: 0,
        }
    }
}

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    // The pod path has its own frame; the monitor's runs after it (on the packet as it
    // leaves): the two together would not fit the 512 bytes of BPF stack.
    let mut event = PendingEvent::default();
    let rc = from_pod(ctx.skb.skb, &mut event);
    if event.info != 0 {
        let info = if event.encapsulated != 0 { event.info | monitor::ENCAPSULATED } else { event.info };
        monitor::emit(ctx.skb.skb, event.bucket, info, event.pod, event.next_hop);
    }
    rc
}

#[inline(never)]
fn from_pod(skb: *mut aya_ebpf::bindings::__sk_buff, event: &mut PendingEvent) -> i32 {
    let ctx = TcContext::new(skb);
    let trace = Trace::of(&ctx);
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(pod) = pod_by_ifindex(ifindex) else {
        // Not a pod interface we know (yet or any more): never let it through.
        trace.step(trace_step::UNKNOWN_INTERFACE, 0, [0; 4], 0, 0, ifindex);
        return TC_ACT_SHOT;
    };
    let len = u64::from(ctx.skb.len());
    let verdict = classify_from_pod(&ctx, &pod, trace, event);
    // A trace counts nothing.
    let mut counters = if trace.on() { None } else { pod_counters(pod.ip) };
    let (code, next_hop) = (verdict.kind, verdict.node_ip);
    match code {
        out::LOCAL | out::LOCAL_SHAPED => {
            count(&mut counters, |c| {
                c.fwd_packets += 1;
                c.fwd_bytes += len;
            });
            let dst = verdict.peer;
            trace.step(trace_step::VERDICT, u16::from(code), dst.ip, 0, 0, dst.host_ifindex);
            deliver(&dst)
        }
        out::TUNNEL => {
            count(&mut counters, |c| {
                c.tunnel_packets += 1;
                c.tunnel_bytes += len;
            });
            trace.step(trace_step::VERDICT, u16::from(code), next_hop, 0, 0, verdict.ifindex);
            if verdict.reason == Verdict::ENCAPSULATED {
                event.encapsulated = 1;
                return to_uplink(verdict.ifindex);
            }
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(verdict.ifindex, 0) as i32 }
        }
        out::HOST => {
            count(&mut counters, |c| {
                c.host_packets += 1;
                c.host_bytes += len;
            });
            trace.note(trace_step::VERDICT, u16::from(code));
            // The frame is addressed to the gateway MAC, not the host veth's: without this
            // the stack would see it as for another host and drop it.
            // SAFETY: plain helper call on our own skb.
            unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
            TC_ACT_OK
        }
        out::UPLINK => {
            count(&mut counters, |c| {
                c.host_packets += 1;
                c.host_bytes += len;
            });
            trace.step(trace_step::VERDICT, u16::from(code), [0; 4], 0, 0, verdict.ifindex);
            to_uplink(verdict.ifindex)
        }
        out::SLOW_PATH => {
            let cfg = config();
            let slowport = cfg.map(|c| c.slowport_ifindex).unwrap_or(0);
            if slowport == 0 {
                let reason = drop_reason::NO_SLOWPATH;
                trace.step(trace_step::VERDICT, u16::from(out::DROP), [0; 4], u16::from(reason), 0, 0);
                if !trace.on() {
                    count(&mut counters, |c| c.drop_no_slowpath += 1);
                    *event = PendingEvent::drop(reason, pod.ip);
                }
                return TC_ACT_SHOT;
            }
            count(&mut counters, |c| {
                c.slow_packets += 1;
                c.slow_bytes += len;
            });
            trace.step(trace_step::VERDICT, u16::from(code), [0; 4], 0, 0, slowport);
            // Out of the host end of the slow-path port; its peer's XDP program feeds the
            // AF_XDP socket.
            to_slow_port(&ctx, slowport, cfg.is_some_and(|c| c.flags & config_flags::VPP_UPLINK != 0))
        }
        _ => {
            let reason = verdict.reason;
            trace.step(trace_step::VERDICT, u16::from(out::DROP), [0; 4], u16::from(reason), 0, 0);
            if trace.on() {
                return TC_ACT_SHOT;
            }
            let mut about = pod.ip;
            match reason {
                drop_reason::MALFORMED => count(&mut counters, |c| c.drop_malformed += 1),
                drop_reason::SPOOFED_MAC => count(&mut counters, |c| c.drop_spoofed_mac += 1),
                drop_reason::SPOOFED_IP => count(&mut counters, |c| c.drop_spoofed_ip += 1),
                drop_reason::TTL_EXCEEDED => count(&mut counters, |c| c.drop_ttl_exceeded += 1),
                drop_reason::SERVICE => count(&mut counters, |c| c.drop_service += 1),
                drop_reason::POLICY_EGRESS => count(&mut counters, |c| c.drop_policy_egress += 1),
                drop_reason::FRAGMENT => count(&mut counters, |c| c.drop_fragment += 1),
                drop_reason::NO_ROUTE => count(&mut counters, |c| c.drop_no_route += 1),
                drop_reason::OVERLAY_PORT => count(&mut counters, |c| c.drop_overlay_port += 1),
                drop_reason::POLICY_INGRESS => {
                    // Counted on the receiver.
                    about = verdict.peer.ip;
                    count(&mut pod_counters(about), |c| c.drop_policy_ingress += 1);
                }
                _ => {}
            }
            *event = PendingEvent::drop(reason, about);
            TC_ACT_SHOT
        }
    }
}

/// Out of the uplink, towards a client outside the cluster: the kernel's FIB picks the next
/// hop and fills in the MACs (the node's stack would refuse a packet with its own address as
/// the source arriving from a pod).
#[inline(always)]
fn to_uplink(ifindex: u32) -> i32 {
    // SAFETY: plain helper call; no next-hop parameters: the FIB decides.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Whether the packet fits the overlay device's MTU (GSO packets: each segment, which the
/// helper checks only when asked to; without the flag it passes every GSO packet).
#[inline(always)]
fn fits_mtu(ctx: &TcContext, ifindex: u32) -> bool {
    let mut mtu_len: u32 = 0;
    // SAFETY: helper call with a pointer to a stack value.
    unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &mut mtu_len, 0, u64::from(BPF_MTU_CHK_SEGS)) == 0 }
}

#[inline(always)]
fn classify_from_pod(ctx: &TcContext, me: &PodEndpoint, trace: Trace, event: &mut PendingEvent) -> Verdict {
    let verdict = decide_from_pod(ctx, me, trace, event);
    if verdict.kind != out::TUNNEL {
        return verdict;
    }
    into_tunnel(ctx, verdict, trace)
}

/// A packet for another node, its every check passed: the program builds the VXLAN packet
/// and hands it to the uplink; the overlay device is the fallback for what the kernel will
/// not grow (and for an older agent's config, which names no port).
#[inline(always)]
fn into_tunnel(ctx: &TcContext, verdict: Verdict, trace: Trace) -> Verdict {
    // A second look at CONFIG costs a few instructions (the verifier inlines array lookups)
    // and keeps the tunnel step out of every return path of `decide_from_pod`.
    let Some(cfg) = config() else {
        return Verdict::drop(drop_reason::MALFORMED);
    };
    if cfg.uplink_ifindex != 0 && cfg.overlay_port != 0 && cfg.flags & config_flags::DEVICE_ENCAP == 0 {
        match overlay::encapsulate(ctx, cfg.node_ip, verdict.node_ip, cfg.vni, cfg.overlay_port) {
            overlay::Encap::Done => return Verdict::encapsulated(cfg.uplink_ifindex, verdict.node_ip),
            overlay::Encap::Broken => {
                trace.note(trace_step::MALFORMED, 0);
                return Verdict::drop(drop_reason::MALFORMED);
            }
            overlay::Encap::Unchanged => {}
        }
    }
    if !overlay::set_tunnel(ctx, cfg, verdict.node_ip) {
        trace.note(trace_step::MALFORMED, 0);
        return Verdict::drop(drop_reason::MALFORMED);
    }
    verdict
}

#[inline(always)]
fn decide_from_pod(ctx: &TcContext, me: &PodEndpoint, trace: Trace, event: &mut PendingEvent) -> Verdict {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(eth) = eth(data, data_end) else {
        trace.note(trace_step::MALFORMED, 0);
        return Verdict::drop(drop_reason::MALFORMED);
    };
    let spoofed = |reason: u8, ip: [u8; 4]| trace.step(trace_step::SOURCE_SPOOFED, u16::from(reason), ip, 0, 0, 0);
    if eth[6..12] != me.mac {
        spoofed(drop_reason::SPOOFED_MAC, [0; 4]);
        return Verdict::drop(drop_reason::SPOOFED_MAC);
    }
    let ethertype = ethertype(eth);
    if ethertype == ETH_P_ARP {
        let Some(arp) = arp(data, data_end) else {
            trace.note(trace_step::MALFORMED, 0);
            return Verdict::drop(drop_reason::MALFORMED);
        };
        // The sender hardware address must be the pod's own, like the frame's source.
        if arp[ARP_SHA_OFF..ARP_SHA_OFF + 6] != me.mac {
            spoofed(drop_reason::SPOOFED_MAC, [0; 4]);
            return Verdict::drop(drop_reason::SPOOFED_MAC);
        }
        let spa = [arp[ARP_SPA_OFF], arp[ARP_SPA_OFF + 1], arp[ARP_SPA_OFF + 2], arp[ARP_SPA_OFF + 3]];
        // An ARP claiming another pod's address is spoofing, except the
        // all-zero sender of an address probe.
        if spa != me.ip && spa != [0, 0, 0, 0] {
            spoofed(drop_reason::SPOOFED_IP, spa);
            return Verdict::drop(drop_reason::SPOOFED_IP);
        }
        trace.step(trace_step::SOURCE_OK, 0, me.ip, 0, 0, 0);
        trace.note(trace_step::NOT_IPV4, ethertype);
        return Verdict::SLOW_PATH;
    }
    if ethertype != ETH_P_IP {
        trace.step(trace_step::SOURCE_OK, 0, me.ip, 0, 0, 0);
        trace.note(trace_step::NOT_IPV4, ethertype);
        return Verdict::SLOW_PATH;
    }
    let Some(ip) = ipv4(data, data_end) else {
        trace.note(trace_step::MALFORMED, 0);
        return Verdict::drop(drop_reason::MALFORMED);
    };
    if src_ip(ip) != me.ip {
        spoofed(drop_reason::SPOOFED_IP, src_ip(ip));
        return Verdict::drop(drop_reason::SPOOFED_IP);
    }
    trace.step(trace_step::SOURCE_OK, 0, me.ip, 0, 0, 0);
    // IP options are read past (`packet::l4_off`) and forwarded as they are.
    if !well_formed(ip) {
        trace.note(trace_step::MALFORMED, 0);
        return Verdict::drop(drop_reason::MALFORMED);
    }
    let Some(cfg) = config() else {
        trace.note(trace_step::ROUTE, trace_route::NO_CONFIG);
        return Verdict::SLOW_PATH;
    };
    let Some(frag) = Fragment::of(ip, data, data_end, trace) else {
        return Verdict::drop(drop_reason::FRAGMENT);
    };
    let (src, mut dst, proto) = (src_ip(ip), dst_ip(ip), ip[9]);
    // Services and conntrack: may rewrite the packet (its pointers are stale afterwards).
    let mut first = FirstPacket::PLAIN;
    let mut flow = MaybeUninit::<NewFlow>::uninit();
    let mut tcp_flags = 0;
    if frag.kind == frag::LATER {
        // A later fragment: its first fragment's flow, or nothing (that one was refused,
        // or has not passed yet).
        let o = svc::established(ctx, src, dst, proto, &frag.head, trace);
        match o.kind {
            outcome::TRACKED if o.to_uplink != 0 => {
                trace.step(trace_step::ROUTE, trace_route::UPLINK, dst, 0, 0, cfg.uplink_ifindex);
                return Verdict::uplink(cfg.uplink_ifindex);
            }
            outcome::TRACKED if o.to_host != 0 => {
                trace.step(trace_step::ROUTE, trace_route::HOST, dst, 0, 0, 0);
                return Verdict::HOST;
            }
            outcome::TRACKED => {
                dst = o.dst;
                first = FirstPacket::TRACKED;
            }
            _ => return Verdict::drop(drop_reason::FRAGMENT),
        }
    } else if let Some(l4) = nat::l4(data, data_end, proto) {
        tcp_flags = l4.tcp_flags;
        let o = svc::process(ctx, cfg, src, dst, &l4, Origin::Pod, trace, &mut flow);
        match o.kind {
            outcome::UNTOUCHED if l4.proto == nat::IPPROTO_TCP && l4.tcp_flags & SYN_ACK == SYN_ACK => {
                // The pod answers a connection conntrack never saw: the node's stack brought
                // it here, perhaps after translating it (a hostPort, which the `portmap`
                // plugin DNATs; a DNAT rule). The answer goes back through the stack, which
                // translates it back and routes it; forwarded past it, to another node's
                // pod or address, it would reach the client untranslated. The stack routes
                // every destination, so this is right whatever the flow was.
                //
                // No hook sees the SYN the stack hands the pod (`tc_to_pod` is attached only
                // while a UDP service has a hostNetwork backend), and a SYN-ACK can be forged
                // (CAP_NET_RAW): recorded, it would carry the forger's later segments past its
                // egress rules, through the stack and out. So a pod isolated for egress
                // answers only what its rules allow, as a new flow would be checked (to
                // netfilter a SYN-ACK with no conntrack is INVALID), or the node's own
                // addresses (kubelet probes, hostNetwork pods, what the stack masqueraded).
                if me.flags & pod_flags::EGRESS_ISOLATED != 0
                    && !lb::is_local_node_addr(dst)
                    && !policy::check(
                        true,
                        me.ip,
                        policy_dir::EGRESS,
                        dst,
                        &Transport::ports(l4.proto, l4.sport, l4.dport),
                        trace,
                    )
                {
                    return Verdict::drop(drop_reason::POLICY_EGRESS);
                }
                let t = Transport::ports(l4.proto, l4.dport, l4.sport);
                if !trace.on() {
                    policy::track_via_host(dst, src, &t, 0);
                }
                trace.step(trace_step::ROUTE, trace_route::HOST, dst, 0, 0, 0);
                return Verdict::HOST;
            }
            outcome::UNTOUCHED => {}
            outcome::TRACKED if o.to_uplink != 0 => {
                trace.step(trace_step::ROUTE, trace_route::UPLINK, dst, 0, 0, cfg.uplink_ifindex);
                return Verdict::uplink(cfg.uplink_ifindex);
            }
            outcome::TRACKED if o.to_host != 0 => {
                trace.step(trace_step::ROUTE, trace_route::HOST, dst, 0, 0, 0);
                return Verdict::HOST;
            }
            outcome::TRACKED => {
                dst = o.dst;
                first = FirstPacket::TRACKED;
            }
            outcome::NEW => {
                dst = o.dst;
                first = FirstPacket::SERVICE;
            }
            outcome::REJECT => return Verdict::SLOW_PATH,
            _ => return Verdict::drop(drop_reason::SERVICE),
        }
    } else {
        // An ICMP error to someone else than the sender of what it quotes (see `policy.rs`).
        if policy::misaddressed(data, data_end, proto) {
            trace.note(trace_step::MALFORMED, 0);
            return Verdict::drop(drop_reason::MALFORMED);
        }
        let t = policy::transport(data, data_end, proto);
        match svc::related(ctx, &t, src, dst, trace) {
            // An ICMP error about a translated flow, translated back.
            Some(o) if o.kind != outcome::TRACKED => return Verdict::drop(drop_reason::SERVICE),
            Some(o) if o.to_uplink != 0 => {
                trace.step(trace_step::ROUTE, trace_route::UPLINK, o.dst, 0, 0, cfg.uplink_ifindex);
                return Verdict::uplink(cfg.uplink_ifindex);
            }
            Some(o) => {
                dst = o.dst;
                first = FirstPacket::TRACKED;
            }
            None if policy::tracked(&t, src, dst, trace) => first = FirstPacket::TRACKED,
            None => {}
        }
    }
    let verdict = route_from_pod(ctx, cfg, dst, trace);
    if first == FirstPacket::TRACKED || verdict.kind == out::DROP {
        return verdict;
    }
    // A new flow: checked as it leaves here (after DNAT, and SNAT for a hairpin): the
    // sender's egress rules, then a local receiver's ingress rules.
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(ip) = packet::ipv4(data, data_end) else {
        trace.note(trace_step::MALFORMED, 0);
        return Verdict::drop(drop_reason::MALFORMED);
    };
    let (peer_src, t) = (src_ip(ip), policy::transport(data, data_end, proto));
    if !policy::check(me.flags & pod_flags::EGRESS_ISOLATED != 0, me.ip, policy_dir::EGRESS, dst, &t, trace) {
        return Verdict::drop(drop_reason::POLICY_EGRESS);
    }
    let peer = &verdict.peer;
    if (verdict.kind == out::LOCAL || verdict.kind == out::LOCAL_SHAPED)
        && !policy::check(
            peer.flags & pod_flags::INGRESS_ISOLATED != 0,
            peer.ip,
            policy_dir::INGRESS,
            peer_src,
            &t,
            trace,
        )
    {
        return Verdict::drop_ingress(peer.ip);
    }
    if !first.commit(ctx, src, dst, &t, tcp_flags, &flow, trace) {
        return Verdict::drop(drop_reason::SERVICE);
    }
    if !trace.on() && cfg.flags & config_flags::MONITOR_FLOWS != 0 {
        *event = PendingEvent::flow(verdict.kind, me.ip, verdict.node_ip);
    }
    verdict
}

/// What conntrack said about a packet before routing.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FirstPacket(u8);

impl FirstPacket {
    /// Its flow is tracked: established or a reply; no policy check.
    const TRACKED: Self = Self(0);
    /// The first packet of a flow no service translated.
    const PLAIN: Self = Self(1);
    /// The first packet of a service flow, translated (its entries in the run's
    /// `NewFlow`); recorded once allowed.
    const SERVICE: Self = Self(2);

    /// Records an allowed new flow (`dst`: after DNAT). False only if a service flow could
    /// not be recorded (its reply could not be translated back: drop it); a plain flow that
    /// could not be recorded goes on and its next packet is checked again.
    #[inline(always)]
    #[expect(
        clippy::too_many_arguments,
        reason = "inlined into each program; a struct of them would be one more copy on a full BPF stack"
    )]
    fn commit(
        self,
        ctx: &TcContext,
        src: [u8; 4],
        dst: [u8; 4],
        t: &Transport,
        tcp_flags: u8,
        flow: &MaybeUninit<NewFlow>,
        trace: Trace,
    ) -> bool {
        match self {
            FirstPacket::TRACKED => true,
            FirstPacket::PLAIN => {
                policy::track(ctx.data(), ctx.data_end(), src, dst, t, tcp_flags, trace);
                true
            }
            // SAFETY: SERVICE is set only where the service stage wrote the flow.
            _ => svc::commit(unsafe { flow.assume_init_ref() }, trace),
        }
    }
}

/// Out of the host end of the slow-path port (`slowport`, not 0). For the built-in vswitch
/// a frame bigger than the port's MTU is cut to it first ([`SLOW_PORT_MTU`]): the veth
/// would drop it whole, silently, and the vswitch answers from its headers. VPP (`vpp`)
/// forwards what it gets: nothing is cut (the agent holds the pod MTU to the port's).
#[inline(always)]
fn to_slow_port(ctx: &TcContext, slowport: u32, vpp: bool) -> i32 {
    const MAX_FRAME: u32 = SLOW_PORT_MTU + ETH_HLEN as u32;
    if !vpp && ctx.skb.len() > MAX_FRAME {
        // SAFETY: plain helper call on our own skb; nothing reads its data afterwards. A
        // failure leaves the frame whole (and the veth drops it, as before).
        unsafe { bpf_skb_change_tail(ctx.skb.skb, MAX_FRAME, 0) };
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(slowport, 0) as i32 }
}

/// Where a pod's packet for `dst` goes (after any service rewrite).
#[inline(always)]
fn route_from_pod(ctx: &TcContext, cfg: &DatapathConfig, dst: [u8; 4], trace: Trace) -> Verdict {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        trace.note(trace_step::MALFORMED, 0);
        return Verdict::drop(drop_reason::MALFORMED);
    };
    let route = |kind: u16, ip: [u8; 4], ifindex: u32| trace.step(trace_step::ROUTE, kind, ip, 0, 0, ifindex);
    if dst == cfg.gateway_ip {
        route(trace_route::GATEWAY, dst, cfg.slowport_ifindex);
        return Verdict::SLOW_PATH;
    }
    if let Some(peer) = pod(dst) {
        route(trace_route::LOCAL_POD, dst, peer.host_ifindex);
        if !decrement_ttl(ip) {
            trace.note(trace_step::TTL_EXCEEDED, 0);
            return Verdict::drop(drop_reason::TTL_EXCEEDED);
        }
        // L2 rewrite: from the gateway to the destination pod.
        eth[0..6].copy_from_slice(&peer.mac);
        eth[6..12].copy_from_slice(&cfg.gateway_mac);
        return Verdict::local(peer);
    }
    let in_cluster = cfg.cluster_pod_mask != [0; 4] && in_subnet(dst, cfg.cluster_pod_net, cfg.cluster_pod_mask);
    // A pod's own tunnel packet for the nodes: VXLAN to the overlay's port (the device's,
    // or VPP's tunnels'), to any outside address, would reach a node's overlay masqueraded
    // to this node's address, its inner packet then passing as one of this node's pods';
    // IPIP, SIT or GRE to a node's address would be decapsulated by a node that has such a
    // tunnel (even a fallback device), its inner packet reaching a pod by the node's stack.
    // Checked before VPP's branch: VPP decapsulates as the device does.
    if !in_cluster && pod_tunnel_packet(ip, data, data_end, cfg, dst) {
        route(trace_route::HOST, dst, 0);
        return Verdict::drop(drop_reason::OVERLAY_PORT);
    }
    if (cfg.flags & config_flags::VPP_UPLINK) != 0 {
        // VPP owns the wire: it routes (and decrements the TTL) for everything leaving here.
        route(trace_route::VPP, dst, cfg.slowport_ifindex);
        return Verdict::SLOW_PATH;
    }
    let overlay = cfg.overlay_ifindex;
    if overlay != 0
        && let Some(r) = remote_route(dst)
    {
        // Too big for the tunnel: the slow path answers "fragmentation needed" (the
        // datapath never fragments).
        if !fits_mtu(ctx, overlay) {
            route(trace_route::TOO_BIG, r.node_ip, overlay);
            return Verdict::SLOW_PATH;
        }
        route(trace_route::REMOTE_NODE, r.node_ip, overlay);
        if !decrement_ttl(ip) {
            trace.note(trace_step::TTL_EXCEEDED, 0);
            return Verdict::drop(drop_reason::TTL_EXCEEDED);
        }
        eth[6..12].copy_from_slice(&cfg.gateway_mac);
        // Encapsulated once the policy checks have read the packet (`into_tunnel`).
        return Verdict::tunnel(overlay, r.node_ip);
    }
    if in_subnet(dst, cfg.pod_subnet, cfg.pod_mask) {
        // An address of this node's pod subnet that no pod holds.
        route(trace_route::UNKNOWN_LOCAL, dst, cfg.slowport_ifindex);
        return Verdict::SLOW_PATH;
    }
    // An address of the cluster's pod range that no route names (a node that left, one not
    // known here yet): the node's stack would send it out of the uplink by its default
    // route, with the pod's address as source (masquerading leaves the cluster range alone).
    if in_cluster {
        route(trace_route::NO_ROUTE, dst, 0);
        return Verdict::drop(drop_reason::NO_ROUTE);
    }
    route(trace_route::HOST, dst, 0);
    Verdict::HOST
}

/// Whether a pod's packet for `dst` (outside the cluster's pod range) is a tunnel packet a
/// node could take as its own: UDP to the overlay's port (a first fragment: a later one
/// is useless without it), or IPIP, SIT or GRE to any node's address (NODE_ADDRS, which
/// the agent fills with services on).
#[inline(always)]
fn pod_tunnel_packet(
    ip: &[u8; IPV4_MIN_HLEN],
    data: usize,
    data_end: usize,
    cfg: &DatapathConfig,
    dst: [u8; 4],
) -> bool {
    match ip[9] {
        nat::IPPROTO_UDP => {
            cfg.overlay_port != 0
                && u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0
                && policy::transport(data, data_end, nat::IPPROTO_UDP).dport == cfg.overlay_port
        }
        IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_GRE => lb::is_node_addr(dst),
        _ => false,
    }
}

/// IPv4 in IPv4, IPv6 in IPv4 (SIT), GRE.
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_GRE: u8 = 47;

/// A drop by the overlay's ingress: counted on the device, and a monitor event (a trace
/// only records it).
#[inline(always)]
fn overlay_drop(ctx: &TcContext, trace: Trace, reason: u8, f: impl FnOnce(&mut contiv_common::OverlayCounters)) -> i32 {
    trace.step(trace_step::VERDICT, u16::from(out::DROP), [0; 4], u16::from(reason), 0, 0);
    if !trace.on() {
        count_overlay(f);
        monitor::drop(ctx, reason, hook::FROM_OVERLAY, [0; 4]);
    }
    TC_ACT_SHOT
}

/// Traffic from other nodes, decapsulated by the overlay device: into a local pod (a new
/// flow past the pod's ingress rules), or to this node. A trace (the second hop of
/// `netctl trace`) gives the sending node in `cb[1]`: a test run carries no tunnel key.
#[classifier]
pub fn tc_from_overlay(ctx: TcContext) -> i32 {
    let trace = Trace::of(&ctx);
    let len = u64::from(ctx.skb.len());
    // What the tunnel key says (none for a trace): the address it was sent to, its VNI.
    // (Plain values, not Options: the verifier refuses the spill of a None's undefined
    // payload.)
    let (mut keyed, mut local, mut vni) = (false, [0u8; 4], 0u32);
    let sender = match trace.sender() {
        Some(node) => Some(node),
        None => overlay::tunnel_ends(&ctx).map(|ends| {
            (keyed, local, vni) = (true, ends.local, ends.vni);
            ends.remote
        }),
    };
    let Some(sender) = sender else {
        return overlay_drop(&ctx, trace, drop_reason::MALFORMED, |c| c.rx_malformed += 1);
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return overlay_drop(&ctx, trace, drop_reason::MALFORMED, |c| c.rx_malformed += 1);
    };
    if ethertype(eth) != ETH_P_IP || !well_formed(ip) {
        return overlay_drop(&ctx, trace, drop_reason::MALFORMED, |c| c.rx_malformed += 1);
    }
    // Anti-spoofing across nodes: the inner source must be the sending node itself or one
    // of its pods (REMOTE_ROUTES maps both to that node's address).
    let owner = remote_route(src_ip(ip)).map(|r| r.node_ip);
    let genuine = owner == Some(sender);
    trace.step(
        trace_step::OVERLAY_SOURCE,
        u16::from(genuine),
        sender,
        0,
        0,
        u32::from_ne_bytes(owner.unwrap_or([0; 4])),
    );
    if !genuine {
        return overlay_drop(&ctx, trace, drop_reason::OVERLAY_SPOOFED, |c| c.rx_spoofed += 1);
    }
    let Some(cfg) = config() else {
        return overlay_drop(&ctx, trace, drop_reason::NO_DESTINATION, |c| c.rx_no_destination += 1);
    };
    // Nodes send the overlay to each other's registered address only. One sent to another
    // address of this node came some other way: e.g. a pod's own VXLAN packet, masqueraded
    // to its node's address on the way (the inner source then passes the check above).
    if keyed && local != cfg.node_ip {
        return overlay_drop(&ctx, trace, drop_reason::OVERLAY_SPOOFED, |c| c.rx_spoofed += 1);
    }
    // The device takes any VNI (flow-based): one that is not the overlay's is someone
    // else's VXLAN on the same port.
    if keyed && vni != cfg.vni {
        return overlay_drop(&ctx, trace, drop_reason::OVERLAY_VNI, |c| c.rx_spoofed += 1);
    }
    let Some(frag) = Fragment::of(ip, data, data_end, trace) else {
        return overlay_drop(&ctx, trace, drop_reason::FRAGMENT, |c| c.rx_fragment += 1);
    };
    let (src, mut dst, proto) = (src_ip(ip), dst_ip(ip), ip[9]);
    // Replies of flows this node NAT'ed (a client here, or outside through this node), and
    // every flow conntrack knows.
    let mut first = FirstPacket::PLAIN;
    let mut tcp_flags = 0;
    // The sending node balanced the flow: nothing new is translated here, except for this
    // node's own frontends (hostPorts) on its address.
    let mut flow = MaybeUninit::<NewFlow>::uninit();
    if frag.kind == frag::LATER {
        // A later fragment: its first fragment's flow (for a local pod: dropped without).
        let o = svc::established(&ctx, src, dst, proto, &frag.head, trace);
        match o.kind {
            outcome::TRACKED if o.to_uplink != 0 => {
                trace.step(trace_step::ROUTE, trace_route::UPLINK, dst, 0, 0, cfg.uplink_ifindex);
                trace.step(trace_step::VERDICT, u16::from(out::UPLINK), [0; 4], 0, 0, cfg.uplink_ifindex);
                return to_uplink(cfg.uplink_ifindex);
            }
            outcome::TRACKED if o.to_host != 0 => return overlay_to_host(&ctx, trace, dst),
            outcome::TRACKED => {
                dst = o.dst;
                first = FirstPacket::TRACKED;
            }
            outcome::UNTOUCHED => {}
            _ => return overlay_drop(&ctx, trace, drop_reason::FRAGMENT, |c| c.rx_fragment += 1),
        }
    } else if let Some(l4) = nat::l4(data, data_end, proto) {
        tcp_flags = l4.tcp_flags;
        let o = svc::process(&ctx, cfg, src, dst, &l4, Origin::Overlay, trace, &mut flow);
        match o.kind {
            outcome::TRACKED if o.to_uplink != 0 => {
                trace.step(trace_step::ROUTE, trace_route::UPLINK, dst, 0, 0, cfg.uplink_ifindex);
                trace.step(trace_step::VERDICT, u16::from(out::UPLINK), [0; 4], 0, 0, cfg.uplink_ifindex);
                return to_uplink(cfg.uplink_ifindex);
            }
            // A reply in a flow this node's stack sent (`tc_to_overlay`): back to the stack,
            // which translates it back and routes it.
            outcome::TRACKED if o.to_host != 0 => return overlay_to_host(&ctx, trace, dst),
            outcome::TRACKED => {
                dst = o.dst;
                first = FirstPacket::TRACKED;
            }
            outcome::NEW => {
                dst = o.dst;
                first = FirstPacket::SERVICE;
            }
            outcome::UNTOUCHED => {}
            _ => return overlay_drop(&ctx, trace, drop_reason::SERVICE, |c| c.rx_no_destination += 1),
        }
    } else {
        // An ICMP error to someone else than the sender of what it quotes (see `policy.rs`).
        if policy::misaddressed(data, data_end, proto) {
            trace.note(trace_step::MALFORMED, 0);
            return overlay_drop(&ctx, trace, drop_reason::MALFORMED, |c| c.rx_malformed += 1);
        }
        let t = policy::transport(data, data_end, proto);
        match svc::related(&ctx, &t, src, dst, trace) {
            // An ICMP error about a flow this node translated (a backend here answered a
            // client elsewhere, or this node balanced the flow), translated back.
            Some(o) if o.kind != outcome::TRACKED => {
                return overlay_drop(&ctx, trace, drop_reason::SERVICE, |c| c.rx_no_destination += 1);
            }
            Some(o) if o.to_uplink != 0 => {
                trace.step(trace_step::ROUTE, trace_route::UPLINK, o.dst, 0, 0, cfg.uplink_ifindex);
                trace.step(trace_step::VERDICT, u16::from(out::UPLINK), [0; 4], 0, 0, cfg.uplink_ifindex);
                return to_uplink(cfg.uplink_ifindex);
            }
            Some(o) => {
                dst = o.dst;
                first = FirstPacket::TRACKED;
            }
            None if policy::tracked(&t, src, dst, trace) => first = FirstPacket::TRACKED,
            None => {}
        }
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return overlay_drop(&ctx, trace, drop_reason::MALFORMED, |c| c.rx_malformed += 1);
    };
    if let Some(pod) = pod(dst) {
        trace.step(trace_step::ROUTE, trace_route::LOCAL_POD, dst, 0, 0, pod.host_ifindex);
        // A later fragment needs its first fragment's flow: refused, or not seen.
        if first != FirstPacket::TRACKED && frag.kind == frag::LATER {
            return overlay_drop(&ctx, trace, drop_reason::FRAGMENT, |c| c.rx_fragment += 1);
        }
        // Routed here, as the kernel forwards: the TTL before any rule, so an expiring
        // packet opens no flow and shows no flow event.
        if !decrement_ttl(ip) {
            trace.note(trace_step::TTL_EXCEEDED, 0);
            return overlay_drop(&ctx, trace, drop_reason::TTL_EXCEEDED, |c| c.rx_malformed += 1);
        }
        // A new flow from another node: the receiver's ingress rules, on its own node.
        if first != FirstPacket::TRACKED {
            // As the packet is now: after a hostPort's DNAT, the port the backend serves.
            let t = policy::transport(data, data_end, proto);
            let isolated = pod.flags & pod_flags::INGRESS_ISOLATED != 0;
            if !policy::check(isolated, pod.ip, policy_dir::INGRESS, src, &t, trace) {
                let reason = drop_reason::POLICY_INGRESS;
                trace.step(trace_step::VERDICT, u16::from(out::DROP), [0; 4], u16::from(reason), 0, 0);
                if !trace.on() {
                    if let Some(c) = pod_counters(dst) {
                        c.drop_policy_ingress += 1;
                    }
                    monitor::drop(&ctx, reason, hook::FROM_OVERLAY, dst);
                }
                return TC_ACT_SHOT;
            }
            if !first.commit(&ctx, src, dst, &t, tcp_flags, &flow, trace) {
                return overlay_drop(&ctx, trace, drop_reason::SERVICE, |c| c.rx_no_destination += 1);
            }
            if !trace.on() && cfg.flags & config_flags::MONITOR_FLOWS != 0 {
                let code = if pod.flags & pod_flags::INGRESS_LIMITED != 0 { out::LOCAL_SHAPED } else { out::LOCAL };
                monitor::flow(&ctx, code, hook::FROM_OVERLAY, dst, [0; 4]);
            }
        }
        eth[0..6].copy_from_slice(&pod.mac);
        eth[6..12].copy_from_slice(&cfg.gateway_mac);
        if !trace.on() {
            if let Some(c) = pod_counters(dst) {
                c.from_tunnel_packets += 1;
                c.from_tunnel_bytes += len;
            }
            count_overlay(|c| c.rx_delivered += 1);
        }
        let code = if pod.flags & pod_flags::INGRESS_LIMITED != 0 { out::LOCAL_SHAPED } else { out::LOCAL };
        trace.step(trace_step::VERDICT, u16::from(code), dst, 0, 0, pod.host_ifindex);
        return deliver(&pod);
    }
    if dst == cfg.node_ip {
        return overlay_to_host(&ctx, trace, dst);
    }
    trace.step(trace_step::ROUTE, trace_route::NO_DESTINATION, dst, 0, 0, 0);
    overlay_drop(&ctx, trace, drop_reason::NO_DESTINATION, |c| c.rx_no_destination += 1)
}

/// A packet from the overlay handed to the node's stack.
#[inline(always)]
fn overlay_to_host(ctx: &TcContext, trace: Trace, dst: [u8; 4]) -> i32 {
    trace.step(trace_step::ROUTE, trace_route::HOST, dst, 0, 0, 0);
    trace.note(trace_step::VERDICT, u16::from(out::HOST));
    if !trace.on() {
        count_overlay(|c| c.rx_to_host += 1);
    }
    // SAFETY: plain helper call on our own skb.
    unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
    TC_ACT_OK
}

#[classifier]
pub fn tc_to_overlay(ctx: TcContext) -> i32 {
    // Pod traffic arrives with its key already set by tc_from_pod.
    if overlay::tunnel_ends(&ctx).is_some() {
        return TC_ACT_OK;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        count_overlay(|c| c.tx_no_route += 1);
        return TC_ACT_SHOT;
    };
    // Whole datagrams and first fragments carry their ports.
    let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    let (src, dst, proto, plain) = (src_ip(ip), dst_ip(ip), ip[9], well_formed(ip) && frag_offset == 0);
    let (Some(route), Some(cfg)) = (remote_route(dst), config()) else {
        count_overlay(|c| c.tx_no_route += 1);
        return TC_ACT_SHOT;
    };
    if ethertype(eth) != ETH_P_IP || !overlay::set_tunnel(&ctx, cfg, route.node_ip) {
        count_overlay(|c| c.tx_no_route += 1);
        return TC_ACT_SHOT;
    }
    count_overlay(|c| c.tx_host_encapsulated += 1);
    // The node's stack sends this (its own, or a pod's packet it forwarded, perhaps after a
    // DNAT): the replies must come back through it, to be translated back.
    if plain
        && let Some(l4) = nat::l4(data, data_end, proto)
        && ct::lookup(&ct::key(src, dst, l4.sport, l4.dport, proto), l4.tcp_flags, Trace::OFF).is_none()
    {
        policy::track_via_host(src, dst, &Transport::ports(proto, l4.sport, l4.dport), l4.tcp_flags);
    }
    TC_ACT_OK
}

#[classifier]
pub fn tc_from_vswitch(ctx: TcContext) -> i32 {
    let len = u64::from(ctx.skb.len());
    // Answers in flows this node translated go back to what the client sent to first: a
    // remote backend's answer to a pod's service flow, which VPP brings; an ICMP error the
    // slow path sends about a packet it got after DNAT.
    let back = slow_path_reply(&ctx);
    if back.kind == outcome::DROP {
        monitor::drop(&ctx, drop_reason::SERVICE, hook::FROM_VSWITCH, back.dst);
        return TC_ACT_SHOT;
    }
    let Some(dst) = vswitch_frame_destination(ctx.data(), ctx.data_end()) else {
        count_slowport(|c| c.from_vswitch_no_pod += 1);
        return TC_ACT_SHOT;
    };
    let Some(pod) = pod(dst) else {
        return from_vswitch_elsewhere(&ctx, dst);
    };
    // VPP mode: VPP brings other nodes' and the outside's traffic here, so a new flow must
    // pass the pod's ingress rules, and is recorded whatever they are: the pod's answers are
    // replies, which its egress rules do not judge (the built-in vswitch only answers for
    // the gateway: the pod's own node, always allowed).
    if back.rewritten == 0
        && config().is_some_and(|c| c.flags & config_flags::VPP_UPLINK != 0)
        && !vpp_ingress_allowed(&ctx, &pod, pod.flags & pod_flags::INGRESS_ISOLATED != 0)
    {
        if let Some(c) = pod_counters(dst) {
            c.drop_policy_ingress += 1;
        }
        monitor::drop(&ctx, drop_reason::POLICY_INGRESS, hook::FROM_VSWITCH, dst);
        return TC_ACT_SHOT;
    }
    if let Some(c) = pod_counters(dst) {
        c.from_slow_packets += 1;
        c.from_slow_bytes += len;
    }
    count_slowport(|c| c.from_vswitch_delivered += 1);
    deliver(&pod)
}

/// A frame from the slow path in a flow conntrack knows with a rewrite for its direction
/// (a reply of a service flow, or of a flow that took another source port; an ICMP error
/// about one; a later fragment of such a reply): rewritten as the entry asks, TRACKED with
/// `rewritten` set. UNTOUCHED for every other frame, DROP when the rewrite failed. What
/// the built-in vswitch builds itself (ARP, echo replies, refusals from the frontend)
/// matches no such entry.
#[inline(always)]
fn slow_path_reply(ctx: &TcContext) -> svc::Outcome {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return svc::Outcome::UNTOUCHED;
    };
    if ethertype(eth) != ETH_P_IP || !well_formed(ip) {
        return svc::Outcome::UNTOUCHED;
    }
    let Some(frag) = Fragment::of(ip, data, data_end, Trace::OFF) else {
        return svc::Outcome::UNTOUCHED;
    };
    let (src, dst, proto) = (src_ip(ip), dst_ip(ip), ip[9]);
    if frag.kind == frag::LATER {
        return svc::established(ctx, src, dst, proto, &frag.head, Trace::OFF);
    }
    if let Some(l4) = nat::l4(data, data_end, proto) {
        return svc::host_reply(ctx, src, dst, &l4);
    }
    svc::related(ctx, &policy::transport(data, data_end, proto), src, dst, Trace::OFF)
        .unwrap_or(svc::Outcome::UNTOUCHED)
}

/// A frame from VPP for a pod: a tracked flow, or a new one its ingress rules allow (then
/// tracked). ARP is always allowed. A pod not `isolated` for ingress lets every frame in;
/// its new flows are recorded all the same.
#[inline(always)]
fn vpp_ingress_allowed(ctx: &TcContext, pod: &PodEndpoint, isolated: bool) -> bool {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return true;
    };
    if ethertype(eth) != ETH_P_IP {
        return true;
    }
    if !well_formed(ip) {
        return !isolated;
    }
    let Some(frag) = Fragment::of(ip, data, data_end, Trace::OFF) else {
        return !isolated;
    };
    let (src, dst, proto) = (src_ip(ip), dst_ip(ip), ip[9]);
    // An ICMP error to someone else than the sender of what it quotes (see `policy.rs`).
    if frag.kind != frag::LATER && policy::misaddressed(data, data_end, proto) {
        return !isolated;
    }
    let t = frag.transport(data, data_end, proto);
    if policy::tracked(&t, src, dst, Trace::OFF) {
        return true;
    }
    // A later fragment passes only with its first fragment's flow (isolated), and is no
    // flow to record.
    if frag.kind == frag::LATER {
        return !isolated;
    }
    if isolated && !policy::allows(pod.ip, policy_dir::INGRESS, src, &t) {
        return false;
    }
    let tcp_flags = nat::l4(data, data_end, proto).map_or(0, |l4| l4.tcp_flags);
    policy::track(data, data_end, src, dst, &t, tcp_flags, Trace::OFF);
    true
}

/// Traffic from outside the cluster to NodePorts, externalIPs and load-balancer IPs (tcx
/// ingress on the uplink): balanced, DNAT'ed (SNAT'ed too when the backend is on another
/// node), and sent to the backend; everything else goes on to the node's stack untouched.
#[classifier]
pub fn tc_from_uplink(ctx: TcContext) -> i32 {
    // A frame for another host (a promiscuous or bridged uplink sees those): not ours to
    // translate. The node's stack drops it (`ip_rcv`) before netfilter, and kube-proxy
    // with it, would see it; DNAT'ed here, a frame meant for another host would reach a
    // backend.
    // SAFETY: a read of the program's own context.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return TC_ACT_OK;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return TC_ACT_OK;
    };
    if ethertype(eth) != ETH_P_IP || !well_formed(ip) {
        return TC_ACT_OK;
    }
    // A later fragment whose first fragment was not seen here: the node's stack's, which
    // reassembles what is for the node itself. Not a fragment that hides a transport
    // header (see `frag.rs`): through the stack it would reach a pod unchecked.
    let Some(frag) = Fragment::of(ip, data, data_end, Trace::OFF) else {
        if frag::hides_header(ip) {
            monitor::drop(&ctx, drop_reason::FRAGMENT, hook::FROM_UPLINK, dst_ip(ip));
            return TC_ACT_SHOT;
        }
        return TC_ACT_OK;
    };
    let (src, dst, proto) = (src_ip(ip), dst_ip(ip), ip[9]);
    let node_config = config();
    // The cluster's pod addresses cross the wire only inside the overlay: one as a plain
    // packet's source is forged (a pod's gateway, which every isolated pod admits, or
    // another node's pod, to be judged as that pod).
    if let Some(cfg) = node_config
        && cfg.cluster_pod_mask != [0; 4]
        && in_subnet(src, cfg.cluster_pod_net, cfg.cluster_pod_mask)
    {
        monitor::drop(&ctx, drop_reason::SPOOFED_IP, hook::FROM_UPLINK, dst);
        return TC_ACT_SHOT;
    }
    if frag.kind == frag::LATER {
        return uplink_later(&ctx, &frag, src, dst, proto);
    }
    let Some(l4) = nat::l4(data, data_end, proto) else {
        // An ICMP error about a flow this node translated (the client's side of a NodePort
        // flow: "fragmentation needed" for an answer, the client's port unreachable),
        // translated back and sent on to the backend like the flow's packets.
        if proto == policy::IPPROTO_ICMP
            && let Some(cfg) = node_config
            && let Some(o) = svc::related(&ctx, &policy::transport(data, data_end, proto), src, dst, Trace::OFF)
        {
            if o.kind != outcome::TRACKED {
                return TC_ACT_SHOT;
            }
            // About an answer a remote backend sent a client outside by the wire: back out.
            if o.to_uplink != 0 {
                return to_uplink(cfg.uplink_ifindex);
            }
            return uplink_forward(&ctx, cfg, o.dst, &pod(o.dst).unwrap_or(Verdict::NONE));
        }
        return from_outside_to_pod(&ctx, src, dst, proto, 0, false);
    };
    let Some(cfg) = node_config else {
        return TC_ACT_OK;
    };
    // The overlay's own packets: the commonest thing on the wire, nothing to do.
    if is_overlay(cfg, dst, &l4) {
        return TC_ACT_OK;
    }
    let mut flow = MaybeUninit::<NewFlow>::uninit();
    let o = svc::process(&ctx, cfg, src, dst, &l4, Origin::Uplink, Trace::OFF, &mut flow);
    match o.kind {
        outcome::UNTOUCHED => return from_outside_to_pod(&ctx, src, dst, proto, l4.tcp_flags, true),
        // Tracked but not translated: a flow the node's stack routes (to a pod, or the node).
        outcome::TRACKED if o.rewritten == 0 => return TC_ACT_OK,
        // A remote backend's answer to a client outside, come by the wire rather than the
        // overlay (a backend on another node's own network): back out, as from the overlay.
        outcome::TRACKED if o.to_uplink != 0 => return to_uplink(cfg.uplink_ifindex),
        outcome::TRACKED | outcome::NEW => {}
        outcome::REJECT => {
            // The vswitch answers (RST / port unreachable); its reply leaves by the uplink.
            if cfg.slowport_ifindex == 0 {
                return TC_ACT_SHOT;
            }
            return to_slow_port(&ctx, cfg.slowport_ifindex, cfg.flags & config_flags::VPP_UPLINK != 0);
        }
        // No source port for a flow to a backend on another node (counted on the service).
        outcome::NO_PORT => {
            monitor::drop(&ctx, drop_reason::SNAT_EXHAUSTED, hook::FROM_UPLINK, [0; 4]);
            return TC_ACT_SHOT;
        }
        _ => return TC_ACT_SHOT,
    }
    let dst = o.dst;
    // No pod: a zeroed endpoint (see `uplink_forward`).
    let local = pod(dst).unwrap_or(Verdict::NONE);
    if o.kind == outcome::NEW {
        // One of this node's own addresses never comes from the wire (the kernel drops such
        // a packet as a martian): as a new flow's client it would pass the backend's
        // policy as its node, which every isolated pod admits.
        if lb::is_local_node_addr(src) {
            monitor::drop(&ctx, drop_reason::SPOOFED_IP, hook::FROM_UPLINK, dst);
            return TC_ACT_SHOT;
        }
        // SAFETY: the service stage wrote the flow (NEW).
        let flow = unsafe { flow.assume_init_ref() };
        // A new flow from outside to a backend here: its ingress rules (a backend on another
        // node is checked there, against this node's address when the flow was SNAT'ed).
        if local.host_ifindex != 0 && local.flags & pod_flags::INGRESS_ISOLATED != 0 {
            let t = Transport::ports(proto, l4.sport, flow.fwd.nat_port);
            if !policy::allows(local.ip, policy_dir::INGRESS, src, &t) {
                if let Some(c) = pod_counters(dst) {
                    c.drop_policy_ingress += 1;
                }
                monitor::drop(&ctx, drop_reason::POLICY_INGRESS, hook::FROM_UPLINK, dst);
                return TC_ACT_SHOT;
            }
        }
        if !svc::commit(flow, Trace::OFF) {
            return TC_ACT_SHOT;
        }
    }
    uplink_forward(&ctx, cfg, dst, &local)
}

/// A packet from outside, translated to `dst`: to the local pod `local`, to this node's
/// own stack (a hostNetwork backend here; `tc_to_uplink` translates its answers back),
/// across the overlay to the node of a remote one (`local.host_ifindex` 0), or back out of
/// the uplink to a backend outside the cluster (a Service's hand-written endpoint: the
/// flow was SNAT'ed to this node, so its answers come back here). (Not an
/// `Option`: LLVM moved a `None`'s undefined payload between registers, by value and by
/// reference alike, which the verifier refuses as a read of an uninitialised register.)
#[inline(always)]
fn uplink_forward(ctx: &TcContext, cfg: &DatapathConfig, dst: [u8; 4], local: &PodEndpoint) -> i32 {
    if local.host_ifindex == 0 && lb::is_local_node_addr(dst) {
        return TC_ACT_OK;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return TC_ACT_SHOT;
    };
    if !decrement_ttl(ip) {
        return TC_ACT_SHOT;
    }
    eth[6..12].copy_from_slice(&cfg.gateway_mac);
    if local.host_ifindex != 0 {
        eth[0..6].copy_from_slice(&local.mac);
        if let Some(c) = pod_counters(dst) {
            c.from_tunnel_packets += 1;
            c.from_tunnel_bytes += u64::from(ctx.skb.len());
        }
        return deliver(local);
    }
    if let Some(route) = remote_route(dst) {
        if route.flags & route_flags::NODE_ADDRESS != 0 {
            // Another node's own address (a hostNetwork backend there, the source SNAT'ed
            // to ours): over the wire, as the stack would route it. Out of its overlay
            // device, our address would arrive where that node does not route it, and a
            // reverse-path filter (rp_filter, strict or loose: the device has no address)
            // would drop it.
            return to_uplink(cfg.uplink_ifindex);
        }
        if cfg.overlay_ifindex != 0 && overlay::set_tunnel(ctx, cfg, route.node_ip) {
            // SAFETY: plain helper call.
            return unsafe { bpf_redirect(cfg.overlay_ifindex, 0) as i32 };
        }
        return TC_ACT_SHOT;
    }
    // An address of the cluster's pod range that no route names (a pod of this node
    // that is gone, a node not registered yet): nowhere to go, and never out.
    if in_subnet(dst, cfg.cluster_pod_net, cfg.cluster_pod_mask) {
        return TC_ACT_SHOT;
    }
    // At no node: outside the cluster. The FIB picks the next hop.
    to_uplink(cfg.uplink_ifindex)
}

/// A packet of this node's overlay: UDP to the port the agent configured (0: no overlay),
/// with the node's address as `ours` (the destination of what arrives, the source of what
/// leaves; the same port at a pod's address is that pod's traffic).
#[inline(always)]
fn is_overlay(cfg: &DatapathConfig, ours: [u8; 4], l4: &nat::L4) -> bool {
    cfg.overlay_port != 0 && l4.proto == nat::IPPROTO_UDP && l4.dport == cfg.overlay_port && ours == cfg.node_ip
}

/// The uplink's egress. What leaves from one of this node's addresses may answer a client
/// outside that a frontend here sent to this node's own stack (a hostNetwork backend): it
/// gets the frontend back as source, as `tc_from_uplink`'s conntrack entry says. Everything
/// else leaves as it is, after one map lookup at most.
#[classifier]
pub fn tc_to_uplink(ctx: TcContext) -> i32 {
    from_node_stack(&ctx, false)
}

/// A pod's host-side veth, egress: what the node's stack sends the pod (and, for a pod
/// whose ingress is shaped, what the fast path sends it through the qdisc). From one of
/// the node's addresses it may answer a flow `tc_from_pod` balanced to this node's own
/// stack (UDP to a service with a hostNetwork backend): it gets the frontend back as
/// source, as for a client outside. Everything else, after one map lookup at most.
#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    from_node_stack(&ctx, true)
}

/// What the node's own stack delivers, translated back if it answers (or is an ICMP error
/// about) a flow a frontend handed to that stack: from one of its addresses (a hostNetwork
/// backend), and to a pod (`to_pod`) also a UDP answer from outside the cluster the stack
/// un-masqueraded (a backend outside the cluster: only UDP is translated per packet, pods'
/// TCP at connect()).
#[inline(always)]
fn from_node_stack(ctx: &TcContext, to_pod: bool) -> i32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (packet::eth(data, data_end), packet::ipv4(data, data_end)) else {
        return TC_ACT_OK;
    };
    if ethertype(eth) != ETH_P_IP || !well_formed(ip) {
        return TC_ACT_OK;
    }
    let (src, dst, proto) = (src_ip(ip), dst_ip(ip), ip[9]);
    if !(to_pod && (proto == nat::IPPROTO_UDP || proto == policy::IPPROTO_ICMP)) && !lb::is_local_node_addr(src) {
        return TC_ACT_OK;
    }
    let Some(frag) = Fragment::of(ip, data, data_end, Trace::OFF) else {
        return TC_ACT_OK;
    };
    let o = if frag.kind == frag::LATER {
        svc::established(ctx, src, dst, proto, &frag.head, Trace::OFF)
    } else {
        let Some(l4) = nat::l4(data, data_end, proto) else {
            // An ICMP error the node's stack sends about a flow a frontend here handed to
            // it (a hostNetwork backend's port unreachable or "fragmentation needed"):
            // about what the client sent, so that it reaches the client's socket.
            if proto == policy::IPPROTO_ICMP
                && let Some(o) = svc::related(ctx, &policy::transport(data, data_end, proto), src, dst, Trace::OFF)
                && o.kind == outcome::DROP
            {
                return TC_ACT_SHOT;
            }
            return TC_ACT_OK;
        };
        // The overlay's own packets: the commonest thing the node sends, nothing to do.
        if let Some(cfg) = config()
            && is_overlay(cfg, src, &l4)
        {
            return TC_ACT_OK;
        }
        svc::host_reply(ctx, src, dst, &l4)
    };
    if o.kind == outcome::DROP { TC_ACT_SHOT } else { TC_ACT_OK }
}

/// A later fragment from outside: sent where its first fragment's flow goes. Without
/// one, the node's stack takes it (it reassembles what is for the node), unless it is for
/// a local pod, which would get it unchecked.
#[inline(always)]
fn uplink_later(ctx: &TcContext, frag: &Fragment, src: [u8; 4], dst: [u8; 4], proto: u8) -> i32 {
    let Some(cfg) = config() else {
        return TC_ACT_OK;
    };
    let o = svc::established(ctx, src, dst, proto, &frag.head, Trace::OFF);
    match o.kind {
        outcome::TRACKED if o.rewritten != 0 && o.to_uplink != 0 => to_uplink(cfg.uplink_ifindex),
        outcome::TRACKED if o.rewritten != 0 => uplink_forward(ctx, cfg, o.dst, &pod(o.dst).unwrap_or(Verdict::NONE)),
        // Tracked but not translated: a flow the node's stack routes.
        outcome::TRACKED => TC_ACT_OK,
        outcome::UNTOUCHED if pod(dst).is_none() => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
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
    // An ICMP error to someone else than the sender of what it quotes (see `policy.rs`).
    if policy::misaddressed(ctx.data(), ctx.data_end(), proto) {
        monitor::drop(ctx, drop_reason::MALFORMED, hook::FROM_UPLINK, dst);
        return TC_ACT_SHOT;
    }
    let t = policy::transport(ctx.data(), ctx.data_end(), proto);
    if !untracked && policy::tracked(&t, src, dst, Trace::OFF) {
        return TC_ACT_OK;
    }
    if pod.flags & pod_flags::INGRESS_ISOLATED != 0 && !policy::allows(pod.ip, policy_dir::INGRESS, src, &t) {
        if let Some(c) = pod_counters(dst) {
            c.drop_policy_ingress += 1;
        }
        monitor::drop(ctx, drop_reason::POLICY_INGRESS, hook::FROM_UPLINK, dst);
        return TC_ACT_SHOT;
    }
    policy::track(ctx.data(), ctx.data_end(), src, dst, &t, tcp_flags, Trace::OFF);
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
        && overlay::set_tunnel(ctx, cfg, route.node_ip)
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
