//! Connection tracking for services (and, next, policy): one LRU map, one entry per
//! direction. A NAT'ed flow has its original-direction entry (what to rewrite the
//! destination to) and its reply entry (what to rewrite the source back to), so a reply is
//! recognised and un-NAT'ed with one lookup and no service lookup. The agent expires
//! entries by protocol and state (`last_seen_ns`, `tcp_flags`).

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use contiv_common::{CT_TOUCH_TICKS, CtEntry, CtKey, ct_tcp};

use crate::{maps::CT, trace::Trace};

/// CLOCK_MONOTONIC at the last tick (a few milliseconds behind at most), for conntrack and
/// affinity times, which the agent compares in seconds. The precise clock reads the clock
/// source on every call: about 50 ns a packet on a virtual machine, a tenth of the pod path.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The tick counter's low bits: the verifier inlines this helper into one load, so a
/// packet reads it instead of calling for the clock.
#[inline(always)]
pub fn ticks() -> u32 {
    // SAFETY: plain helper call.
    unsafe { bpf_jiffies64() as u32 }
}

#[inline(always)]
pub fn key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey { src, dst, sport, dport, proto, _pad: [0; 3] }
}

/// The entry of this direction of a flow, refreshed (not in a trace); copied out. None
/// also for a connection's first SYN on a flow that was closing ([`reopens`]): the caller
/// takes it as the new flow it is.
#[inline(always)]
pub fn lookup(k: &CtKey, tcp_flags: u8, trace: Trace) -> Option<CtEntry> {
    let e = CT.get_ptr_mut(k)?;
    // SAFETY: a map value pointer; races only lose a refresh.
    let entry = unsafe { &mut *e };
    if reopens(entry.tcp_flags, tcp_flags) {
        return None;
    }
    if trace.on() {
        return Some(*entry);
    }
    // Refreshed every CT_TOUCH_TICKS and on new TCP flags only: a write per packet would
    // bounce the line between CPUs, and a clock read per packet costs a helper call.
    let j = ticks();
    let new_flags = next_tcp_flags(entry.tcp_flags, tcp_flags);
    if j.wrapping_sub(entry.touched) >= CT_TOUCH_TICKS || new_flags != entry.tcp_flags {
        entry.last_seen_ns = now();
        entry.touched = j;
        entry.tcp_flags = new_flags;
    }
    Some(*entry)
}

/// Whether a packet with `packet`'s TCP flags opens a new connection on a flow whose
/// direction has seen `seen`: a SYN alone (no ACK) after this side's FIN or RST, its
/// 4-tuple reused within the closing timeout (a client bound to its port, a NAT in front of
/// clients). As netfilter reopens a closed connection, it is a new flow: a service chooses
/// its backend again (the old one may have left the service since) and policy sees it. The
/// entries it leaves are replaced when the new flow is recorded (a reply entry of another
/// backend expires on its own).
#[inline(always)]
fn reopens(seen: u8, packet: u8) -> bool {
    packet & (ct_tcp::SYN | ct_tcp::ACK) == ct_tcp::SYN && seen & (ct_tcp::FIN | ct_tcp::RST) != 0
}

/// The TCP flags a direction of a flow has seen, after one more packet: accumulated, except
/// that a SYN-ACK on a flow that was closing (the answer to a connection reopened on its
/// 4-tuple) starts it afresh, so the new connection is not swept on the closing timeout
/// (the agent reads the state from these flags).
#[inline(always)]
fn next_tcp_flags(seen: u8, packet: u8) -> u8 {
    if packet & ct_tcp::SYN != 0 && seen & (ct_tcp::FIN | ct_tcp::RST) != 0 { packet } else { seen | packet }
}

/// Records both directions of a new flow (a trace only notes that it would).
#[inline(always)]
pub fn create(fwd: &CtKey, fwd_entry: &CtEntry, rev: &CtKey, rev_entry: &CtEntry, trace: Trace) -> bool {
    if trace.on() {
        trace.note(contiv_common::trace_step::CT_RECORD, fwd_entry.flags);
        return true;
    }
    CT.insert(rev, rev_entry, 0).is_ok() && CT.insert(fwd, fwd_entry, 0).is_ok()
}

/// Records one direction of a flow alone (a trace only notes that it would).
#[inline(always)]
pub fn create_one(k: &CtKey, entry: &CtEntry, trace: Trace) -> bool {
    if trace.on() {
        trace.note(contiv_common::trace_step::CT_RECORD, entry.flags);
        return true;
    }
    CT.insert(k, entry, 0).is_ok()
}
