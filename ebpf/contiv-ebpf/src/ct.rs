//! Connection tracking for services (and, next, policy): one LRU map, one entry per
//! direction. A NAT'ed flow has its original-direction entry (what to rewrite the
//! destination to) and its reply entry (what to rewrite the source back to), so a reply is
//! recognised and un-NAT'ed with one lookup and no service lookup. The agent expires
//! entries by protocol and state (`last_seen_ns`, `tcp_flags`).

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use contiv_common::{CtEntry, CtKey};

use crate::{maps::CT, trace::Trace};

/// Refresh `last_seen_ns` at most this often (a write per packet would bounce the line
/// between CPUs).
const TOUCH_NS: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC at the last tick (a few milliseconds behind at most), for conntrack and
/// affinity times, which the agent compares in seconds. The precise clock reads the clock
/// source on every call: about 50 ns a packet on a virtual machine, a tenth of the pod path.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey { src, dst, sport, dport, proto, _pad: [0; 3] }
}

/// The entry of this direction of a flow, refreshed (not in a trace); copied out.
#[inline(always)]
pub fn lookup(k: &CtKey, tcp_flags: u8, trace: Trace) -> Option<CtEntry> {
    let e = CT.get_ptr_mut(k)?;
    // SAFETY: a map value pointer; races only lose a refresh.
    let entry = unsafe { &mut *e };
    if trace.on() {
        return Some(*entry);
    }
    let t = now();
    let new_flags = entry.tcp_flags | tcp_flags;
    if t.wrapping_sub(entry.last_seen_ns) > TOUCH_NS || new_flags != entry.tcp_flags {
        entry.last_seen_ns = t;
        entry.tcp_flags = new_flags;
    }
    Some(*entry)
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
