//! The drop monitor: an event per dropped packet (and, when CONFIG asks, per allowed new
//! flow) into the `MONITOR_EVENTS` ring buffer, which the agent streams to `netctl monitor`.
//!
//! The rate is bounded here, in the kernel, so a flood cannot make the datapath spend its
//! time on events: every CPU has a token bucket per kind (drops, flows) in `MONITOR_RATE`,
//! refilled at `monitor_rate` events per second up to `monitor_burst`. An event beyond the
//! rate is not written, only counted (`suppressed`); one the ring buffer has no room for is
//! counted as `lost`. The packet itself is handled and counted exactly as without the
//! monitor: the drop counters never depend on it.
//!
//! Events are written only from drop paths and (flag `MONITOR_FLOWS`) from a flow's first
//! packet, never from established traffic; with the flag off the forwarding path does not
//! reach this module at all.

use aya_ebpf::{bindings::__sk_buff, helpers::generated::bpf_ktime_get_ns, programs::TcContext};
use contiv_common::MonitorEvent;

use crate::{
    maps::{MONITOR_EVENTS, MONITOR_RATE, config},
    nat::{IPPROTO_TCP, IPPROTO_UDP},
    overlay,
    packet::{self, ETH_P_ARP, ETH_P_IP},
    policy::{IPPROTO_ICMP, IPPROTO_SCTP},
};

const NS_PER_SEC: u64 = 1_000_000_000;
/// Refill at most this much idle time at once (keeps `elapsed * rate` far from overflow).
const MAX_IDLE_NS: u64 = 64 * NS_PER_SEC;

/// Emits one event about the packet in `ctx` as it is now, if the CPU's bucket for `bucket`
/// has a token. `info`: kind | reason << 8 | hook << 16; `pod`: the local pod concerned
/// (network byte order, as four bytes); `next_hop`: a tunnel's remote node or 0.
///
/// Not inlined: one copy serves every drop site of a program.
#[inline(never)]
/// `info` with [`ENCAPSULATED`]: the packet carries the overlay's outer headers (the
/// datapath built them): the event describes the pod's packet inside, and its length. (A
/// BPF function takes at most 5 arguments.)
pub fn emit(skb: *mut __sk_buff, bucket: u32, info: u32, pod: u32, next_hop: u32) {
    let Some(cfg) = config() else { return };
    let (rate, burst) = (u64::from(cfg.monitor_rate), u64::from(cfg.monitor_burst));
    if rate == 0 {
        return;
    }
    let Some(b) = MONITOR_RATE.get_ptr_mut(bucket) else { return };
    // SAFETY: this CPU's slot of a per-CPU map.
    let b = unsafe { &mut *b };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let idle = now.wrapping_sub(b.last_ns).min(MAX_IDLE_NS);
    let cap = burst.max(1) * NS_PER_SEC;
    let tokens = (b.tokens + idle * rate).min(cap);
    b.last_ns = now;
    if tokens < NS_PER_SEC {
        b.tokens = tokens;
        b.suppressed += 1;
        return;
    }
    b.tokens = tokens - NS_PER_SEC;
    // Written in place in the ring buffer (the program's stack is nearly full already).
    let Some(mut entry) = MONITOR_EVENTS.reserve(0) else {
        b.lost += 1;
        return;
    };
    let ev = entry.as_mut_ptr();
    let ctx = TcContext::new(skb);
    // SAFETY: `ev` is the reserved record, sized for a MonitorEvent; every field is
    // written before it is submitted. A context field read.
    unsafe {
        (*ev).ts_ns = now;
        (*ev).pod = pod.to_ne_bytes();
        (*ev).ifindex = (*skb).ifindex;
        (*ev).kind = info as u8;
        (*ev).reason = (info >> 8) as u8;
        (*ev).hook = (info >> 16) as u8;
        (*ev).len = ctx.skb.len();
        (*ev).next_hop = next_hop.to_ne_bytes();
        (*ev)._pad = 0;
        describe(&ctx, &mut *ev, info & ENCAPSULATED != 0);
    }
    entry.submit(0);
    b.emitted += 1;
}

/// Fills in the addresses, protocol and ports of the frame (zero where it has none).
#[inline(always)]
fn describe(ctx: &TcContext, ev: &mut MonitorEvent, encapsulated: bool) {
    ev.ethertype = 0;
    ev.src = [0; 4];
    ev.dst = [0; 4];
    ev.proto = 0;
    ev.sport = 0;
    ev.dport = 0;
    ev.tcp_flags = 0;
    let (mut data, data_end) = (ctx.data(), ctx.data_end());
    if encapsulated {
        // Past the outer Ethernet, IP, UDP and VXLAN headers: the inner frame.
        data += overlay::OUTER_LEN;
        ev.len = ev.len.saturating_sub(overlay::ENCAP_LEN as u32);
    }
    let Some(eth) = packet::eth(data, data_end) else { return };
    ev.ethertype = packet::ethertype(eth);
    if ev.ethertype == ETH_P_ARP {
        if let Some(arp) = packet::arp(data, data_end) {
            let o = packet::ARP_SPA_OFF;
            ev.src = [arp[o], arp[o + 1], arp[o + 2], arp[o + 3]];
            let o = packet::ARP_TPA_OFF;
            ev.dst = [arp[o], arp[o + 1], arp[o + 2], arp[o + 3]];
        }
        return;
    }
    if ev.ethertype != ETH_P_IP {
        return;
    }
    let Some(ip) = packet::ipv4(data, data_end) else { return };
    ev.src = packet::src_ip(ip);
    ev.dst = packet::dst_ip(ip);
    ev.proto = ip[9];
    if !packet::well_formed(ip) || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        // A later fragment has no transport header: the addresses say enough.
        return;
    }
    let off = packet::l4_off(data, data_end);
    match ev.proto {
        IPPROTO_TCP => {
            if let Some(h) = packet::ptr_at::<[u8; 14]>(data, data_end, off) {
                // SAFETY: bounds checked by ptr_at.
                let h = unsafe { &*h };
                ev.sport = u16::from_be_bytes([h[0], h[1]]);
                ev.dport = u16::from_be_bytes([h[2], h[3]]);
                ev.tcp_flags = h[13];
            }
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            if let Some(h) = packet::ptr_at::<[u8; 4]>(data, data_end, off) {
                // SAFETY: bounds checked by ptr_at.
                let h = unsafe { &*h };
                ev.sport = u16::from_be_bytes([h[0], h[1]]);
                ev.dport = u16::from_be_bytes([h[2], h[3]]);
            }
        }
        IPPROTO_ICMP => {
            if let Some(h) = packet::ptr_at::<[u8; 2]>(data, data_end, off) {
                // SAFETY: bounds checked by ptr_at.
                let h = unsafe { &*h };
                ev.sport = u16::from(h[0]);
                ev.dport = u16::from(h[1]);
            }
        }
        _ => {}
    }
}

/// An [`info`] bit: see [`emit`].
pub const ENCAPSULATED: u32 = 1 << 24;

/// The `info` argument of [`emit`].
#[inline(always)]
pub const fn info(kind: u8, reason: u8, hook: u8) -> u32 {
    kind as u32 | (reason as u32) << 8 | (hook as u32) << 16
}

/// A drop event (drops bucket).
#[inline(always)]
pub fn drop(ctx: &TcContext, reason: u8, hook: u8, pod: [u8; 4]) {
    emit(
        ctx.skb.skb,
        contiv_common::monitor_bucket::DROPS,
        info(contiv_common::monitor_kind::DROP, reason, hook),
        u32::from_ne_bytes(pod),
        0,
    );
}

/// An allowed new flow's event (flows bucket); the caller checked [`flows_on`].
#[inline(always)]
pub fn flow(ctx: &TcContext, verdict: u8, hook: u8, pod: [u8; 4], next_hop: [u8; 4]) {
    emit(
        ctx.skb.skb,
        contiv_common::monitor_bucket::FLOWS,
        info(contiv_common::monitor_kind::FLOW, verdict, hook),
        u32::from_ne_bytes(pod),
        u32::from_ne_bytes(next_hop),
    );
}
