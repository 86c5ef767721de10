//! The node's kernel datapath.
//!
//! - `tc_from_pod` (TC ingress on every pod's host-side veth): checks that the frame
//!   really comes from the pod (source MAC and IPv4), forwards pod -> pod IPv4 straight
//!   into the destination pod with `bpf_redirect_peer` (no host routing stack), and
//!   steers everything else to the slow-path port.
//! - `xdp_to_vswitch` (XDP on the vswitch end of the slow-path port): hands every frame
//!   to the AF_XDP socket of the vswitch.
//! - `tc_from_vswitch` (TC ingress on the host end of the slow-path port): delivers the
//!   vswitch's frames to the pod they are addressed to.
//!
//! Bandwidth limits: a pod with an ingress limit has a `tbf` qdisc on its host veth, so the
//! fast path hands packets for it to that veth's egress (`bpf_redirect`) instead of straight
//! into the pod (`bpf_redirect_peer`, which skips every qdisc). Egress limits need nothing
//! here: the pod's own interface shapes what it sends. Pods without limits never detour.
//!
//! The bulk path stays on TC so veths keep GSO/GRO and checksum offload
//! (see ../../shared DATAPATH-FACTS); only slow-path frames cross XDP.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action},
    btf_maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, XskMap},
    helpers::generated::{bpf_redirect, bpf_redirect_peer},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use contiv_common::{
    DatapathConfig, Ipv4Key, MAX_PODS, MAX_SLOWPATH_QUEUES, PodCounters, PodEndpoint, SlowPortCounters, pod_flags,
};

const MAX_PODS_USIZE: usize = MAX_PODS as usize;

#[btf_map]
static PODS: HashMap<Ipv4Key, PodEndpoint, MAX_PODS_USIZE> = HashMap::new();

#[btf_map]
static POD_IFACES: HashMap<u32, PodEndpoint, MAX_PODS_USIZE> = HashMap::new();

#[btf_map]
static POD_COUNTERS: PerCpuHashMap<Ipv4Key, PodCounters, MAX_PODS_USIZE> = PerCpuHashMap::new();

#[btf_map]
static CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map]
static SLOWPATH_XSKS: XskMap<{ MAX_SLOWPATH_QUEUES as usize }> = XskMap::new();

#[btf_map]
static SLOWPORT_COUNTERS: PerCpuArray<SlowPortCounters, 1> = PerCpuArray::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IPV4_MIN_HLEN: usize = 20;
/// ARP payload for Ethernet/IPv4 is 28 bytes; the target protocol address is at 24.
const ARP_LEN: usize = 28;
const ARP_SPA_OFF: usize = 14;
const ARP_TPA_OFF: usize = 24;

/// What the pod's frame turned out to be.
enum Verdict {
    /// Forward into this pod by redirect_peer (or through its host veth's qdisc when shaped).
    Forward(PodEndpoint),
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
}

#[inline(always)]
fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    let start = data + offset;
    if start + core::mem::size_of::<T>() > data_end {
        return None;
    }
    Some(start as *mut T)
}

#[inline(always)]
fn counters_for(ip: [u8; 4]) -> Option<&'static mut PodCounters> {
    // SAFETY: per-CPU value: nobody else writes this CPU's slot concurrently.
    POD_COUNTERS.get_ptr_mut(Ipv4Key::new(ip)).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn config() -> Option<&'static DatapathConfig> {
    CONFIG.get(0)
}

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: hash map value read-only; the agent removes entries only after detaching.
    let Some(pod) = (unsafe { POD_IFACES.get(ifindex) }) else {
        // Not a pod interface we know (yet or any more): never let it through.
        return TC_ACT_SHOT;
    };
    let pod = *pod;
    let len = u64::from(ctx.skb.len());
    let verdict = classify_from_pod(&ctx, &pod);
    let counters = counters_for(pod.ip);
    match verdict {
        Verdict::Forward(dst) => {
            if let Some(c) = counters {
                c.fwd_packets += 1;
                c.fwd_bytes += len;
            }
            if (dst.flags & pod_flags::INGRESS_LIMITED) != 0 {
                // Through the destination's host veth, whose tbf qdisc shapes what it receives.
                // SAFETY: plain helper call.
                return unsafe { bpf_redirect(dst.host_ifindex, 0) as i32 };
            }
            // SAFETY: plain helper call.
            unsafe { bpf_redirect_peer(dst.host_ifindex, 0) as i32 }
        }
        Verdict::SlowPath => to_slow_path(counters, len),
        Verdict::Drop(reason) => {
            if let Some(c) = counters {
                match reason {
                    DropReason::Malformed => c.drop_malformed += 1,
                    DropReason::SpoofedMac => c.drop_spoofed_mac += 1,
                    DropReason::SpoofedIp => c.drop_spoofed_ip += 1,
                    DropReason::TtlExceeded => c.drop_ttl_exceeded += 1,
                }
            }
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn to_slow_path(counters: Option<&'static mut PodCounters>, len: u64) -> i32 {
    let slowport = config().map(|c| c.slowport_ifindex).unwrap_or(0);
    if slowport == 0 {
        if let Some(c) = counters {
            c.drop_no_slowpath += 1;
        }
        return TC_ACT_SHOT;
    }
    if let Some(c) = counters {
        c.slow_packets += 1;
        c.slow_bytes += len;
    }
    // Out of the host end of the slow-path port; its peer's XDP program feeds the AF_XDP socket.
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(slowport, 0) as i32 }
}

#[inline(always)]
fn classify_from_pod(ctx: &TcContext, pod: &PodEndpoint) -> Verdict {
    let data = ctx.data();
    let data_end = ctx.data_end();
    let Some(eth) = ptr_at::<[u8; ETH_HLEN]>(data, data_end, 0) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &mut *eth };
    if eth[6..12] != pod.mac {
        return Verdict::Drop(DropReason::SpoofedMac);
    }
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    if ethertype == ETH_P_ARP {
        let Some(arp) = ptr_at::<[u8; ARP_LEN]>(data, data_end, ETH_HLEN) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        // SAFETY: bounds checked by ptr_at.
        let arp = unsafe { &*arp };
        let spa = [arp[ARP_SPA_OFF], arp[ARP_SPA_OFF + 1], arp[ARP_SPA_OFF + 2], arp[ARP_SPA_OFF + 3]];
        // An ARP claiming another pod's address is spoofing, except the
        // all-zero sender of an address probe.
        if spa != pod.ip && spa != [0, 0, 0, 0] {
            return Verdict::Drop(DropReason::SpoofedIp);
        }
        return Verdict::SlowPath;
    }
    if ethertype != ETH_P_IP {
        return Verdict::SlowPath;
    }
    let Some(ip) = ptr_at::<[u8; IPV4_MIN_HLEN]>(data, data_end, ETH_HLEN) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    let src = [ip[12], ip[13], ip[14], ip[15]];
    if src != pod.ip {
        return Verdict::Drop(DropReason::SpoofedIp);
    }
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    let version_ihl = ip[0];
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    // IP options (ihl != 5) and fragments (MF set or offset != 0) go to the slow path.
    if version_ihl != 0x45 || frag & 0x3fff != 0 {
        return Verdict::SlowPath;
    }
    let Some(cfg) = config() else {
        return Verdict::SlowPath;
    };
    if dst == cfg.gateway_ip {
        return Verdict::SlowPath;
    }
    // SAFETY: read-only lookup; the value is copied out before anything else happens.
    let Some(peer) = (unsafe { PODS.get(Ipv4Key::new(dst)) }) else {
        return Verdict::SlowPath;
    };
    let peer = *peer;
    let ttl = ip[8];
    if ttl <= 1 {
        return Verdict::Drop(DropReason::TtlExceeded);
    }
    // Routed hop: decrement TTL and patch the header checksum incrementally
    // (RFC 1624; same arithmetic as the kernel's ip_decrease_ttl).
    ip[8] = ttl - 1;
    let check = u16::from_be_bytes([ip[10], ip[11]]) as u32 + 0x0100;
    let check = (check + (check >> 16)) as u16;
    let check = check.to_be_bytes();
    ip[10] = check[0];
    ip[11] = check[1];
    // L2 rewrite: from the gateway to the destination pod.
    eth[0..6].copy_from_slice(&peer.mac);
    eth[6..12].copy_from_slice(&cfg.gateway_mac);
    Verdict::Forward(peer)
}

#[classifier]
pub fn tc_from_vswitch(ctx: TcContext) -> i32 {
    let data = ctx.data();
    let data_end = ctx.data_end();
    let len = u64::from(ctx.skb.len());
    let Some(dst) = vswitch_frame_destination(data, data_end) else {
        count_slowport(|c| c.from_vswitch_no_pod += 1);
        return TC_ACT_SHOT;
    };
    // SAFETY: read-only lookup, value copied.
    let Some(pod) = (unsafe { PODS.get(Ipv4Key::new(dst)) }) else {
        count_slowport(|c| c.from_vswitch_no_pod += 1);
        return TC_ACT_SHOT;
    };
    let ifindex = pod.host_ifindex;
    if let Some(c) = counters_for(dst) {
        c.from_slow_packets += 1;
        c.from_slow_bytes += len;
    }
    count_slowport(|c| c.from_vswitch_delivered += 1);
    // SAFETY: plain helper call.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}

/// The pod IPv4 address a frame from the vswitch is for: IPv4 destination, or the
/// ARP target protocol address.
#[inline(always)]
fn vswitch_frame_destination(data: usize, data_end: usize) -> Option<[u8; 4]> {
    let eth = ptr_at::<[u8; ETH_HLEN]>(data, data_end, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &*eth };
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let ip = ptr_at::<[u8; IPV4_MIN_HLEN]>(data, data_end, ETH_HLEN)?;
            // SAFETY: bounds checked by ptr_at.
            let ip = unsafe { &*ip };
            Some([ip[16], ip[17], ip[18], ip[19]])
        }
        ETH_P_ARP => {
            let arp = ptr_at::<[u8; ARP_LEN]>(data, data_end, ETH_HLEN)?;
            // SAFETY: bounds checked by ptr_at.
            let arp = unsafe { &*arp };
            Some([arp[ARP_TPA_OFF], arp[ARP_TPA_OFF + 1], arp[ARP_TPA_OFF + 2], arp[ARP_TPA_OFF + 3]])
        }
        _ => None,
    }
}

#[inline(always)]
fn count_slowport(f: impl FnOnce(&mut SlowPortCounters)) {
    if let Some(p) = SLOWPORT_COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this CPU.
        f(unsafe { &mut *p });
    }
}

#[xdp]
pub fn xdp_to_vswitch(ctx: XdpContext) -> u32 {
    let queue = ctx.rx_queue_index();
    match SLOWPATH_XSKS.redirect(queue, u64::from(xdp_action::XDP_DROP)) {
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
