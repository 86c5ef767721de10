//! Service load balancing shared by the socket and packet paths: frontend lookup (exact,
//! then the NodePort wildcard on node addresses) and backend selection (random among the
//! usable ordinals, or the client's affinity while it lasts and its backend is still in the
//! set, wherever the set's changes moved it).

use aya_ebpf::helpers::generated::bpf_get_prandom_u32;
use contiv_common::{
    Ipv4Key, NodeAddr, SVC_LOCAL_BASE, SvcAffinity, SvcAffinityKey, SvcBackend, SvcBackendKey, SvcFrontend, SvcKey,
    SvcSlotKey, SvcSourceRange, svc_flags, trace_step,
};

use crate::{
    maps::{
        NODE_ADDRS, SVC_AFFINITY, SVC_BACKEND_SLOTS, SVC_BACKENDS, SVC_CLUSTER_IPS, SVC_FRONTENDS, SVC_SOURCE_RANGES,
    },
    trace::Trace,
};

/// Whether NodePorts are served on `ip`: an address of a node of the cluster that
/// `nodePortAddresses` takes.
#[inline(always)]
pub fn is_node_port_addr(ip: [u8; 4]) -> bool {
    node_addr(ip).is_some_and(|a| a.no_node_ports == 0)
}

/// Whether NodePorts are served on `ip` as this node's own address.
#[inline(always)]
pub fn is_local_node_port_addr(ip: [u8; 4]) -> bool {
    node_addr(ip).is_some_and(|a| a.local != 0 && a.no_node_ports == 0)
}

/// Whether `ip` is an address of a node of the cluster (any node's, this one's too).
#[inline(always)]
pub fn is_node_addr(ip: [u8; 4]) -> bool {
    node_addr(ip).is_some()
}

/// Whether `ip` is this node's own address.
#[inline(always)]
pub fn is_local_node_addr(ip: [u8; 4]) -> bool {
    node_addr(ip).is_some_and(|a| a.local != 0)
}

/// What the agent recorded of `ip` if it is a node's address (NODE_ADDRS).
#[inline(always)]
fn node_addr(ip: [u8; 4]) -> Option<NodeAddr> {
    // SAFETY: read-only lookup, copied.
    unsafe { NODE_ADDRS.get(Ipv4Key::new(ip)) }.copied()
}

/// Whether `ip` is the cluster IP of a programmed service (asked when no frontend serves
/// the port: the connection is then refused).
#[inline(always)]
pub fn is_cluster_ip(ip: [u8; 4]) -> bool {
    // SAFETY: read-only lookup.
    unsafe { SVC_CLUSTER_IPS.get(Ipv4Key::new(ip)) }.is_some()
}

/// The frontend for a destination: exact, else (when `wildcard`) the NodePort on 0.0.0.0.
#[inline(always)]
pub fn frontend(ip: [u8; 4], port: u16, proto: u8, wildcard: bool) -> Option<SvcFrontend> {
    let k = SvcKey { ip, port, proto, _pad: 0 };
    // SAFETY: read-only lookup, copied.
    if let Some(fe) = unsafe { SVC_FRONTENDS.get(k) } {
        return Some(*fe);
    }
    if !wildcard {
        return None;
    }
    let k = SvcKey { ip: [0; 4], port, proto, _pad: 0 };
    // SAFETY: as above.
    unsafe { SVC_FRONTENDS.get(k) }.copied().filter(|fe| fe.flags & svc_flags::NODE_PORT != 0)
}

/// Whether `src` may reach a frontend with loadBalancerSourceRanges.
#[inline(always)]
pub fn source_allowed(fe: &SvcFrontend, src: [u8; 4]) -> bool {
    if fe.flags & svc_flags::SOURCE_RANGES == 0 {
        return true;
    }
    let data = SvcSourceRange { svc_id_be: fe.svc_id.to_be_bytes(), ip: src };
    SVC_SOURCE_RANGES.get(&aya_ebpf::btf_maps::lpm_trie::Key::new(64, data)).is_some()
}

#[inline(always)]
fn backend(svc_id: u32, ordinal: u32) -> Option<SvcBackend> {
    // SAFETY: read-only lookup, copied.
    unsafe { SVC_BACKENDS.get(SvcBackendKey { svc_id, ordinal }) }.copied()
}

/// Backend `ip`:`port`, with its ordinal, while it is still in the set `base..base + count`:
/// at `ordinal` (where it was last seen, if known), else (endpoints came or went before it
/// in the list, and moved it) where SVC_BACKEND_SLOTS says it is now.
#[inline(always)]
fn affine(svc_id: u32, base: u32, count: u16, ordinal: u32, ip: [u8; 4], port: u16) -> Option<(u32, SvcBackend)> {
    let in_set = |ordinal: u32| ordinal >= base && ordinal - base < u32::from(count);
    if in_set(ordinal)
        && let Some(b) = backend(svc_id, ordinal)
        && b.ip == ip
        && b.port == port
    {
        return Some((ordinal, b));
    }
    let k = SvcSlotKey { svc_id, ip, port, local_set: u8::from(base != 0), _pad: 0 };
    // SAFETY: read-only lookup, copied.
    let ordinal = unsafe { SVC_BACKEND_SLOTS.get(k) }.copied()?;
    if !in_set(ordinal) {
        return None;
    }
    // The slot is written after the backend and removed before it goes, but an apply may be
    // under way: the backend found must be the one named.
    let b = backend(svc_id, ordinal)?;
    (b.ip == ip && b.port == port).then_some((ordinal, b))
}

/// `ip`:`port` if it is still a backend of `fe`'s Cluster set (or Local set when `local`),
/// wherever the set's changes moved it.
#[inline(always)]
pub fn still_backend(fe: &SvcFrontend, local: bool, ip: [u8; 4], port: u16) -> Option<SvcBackend> {
    let (count, base) = if local { (fe.local_count, SVC_LOCAL_BASE) } else { (fe.count, 0) };
    // No ordinal known: found through SVC_BACKEND_SLOTS.
    affine(fe.svc_id, base, count, u32::MAX, ip, port).map(|(_, b)| b)
}

/// A backend of the Cluster set, or of the Local set when `local`, for `client` (netns
/// cookie or IPv4 address). A trace records the choice and leaves affinity alone.
#[inline(always)]
pub fn select(fe: &SvcFrontend, local: bool, client: u64, now: u64, trace: Trace) -> Option<SvcBackend> {
    let (count, base) = if local { (fe.local_count, SVC_LOCAL_BASE) } else { (fe.count, 0) };
    if count == 0 {
        return None;
    }
    let affinity = fe.flags & svc_flags::AFFINITY != 0;
    let akey = SvcAffinityKey { svc_id: fe.svc_id, _pad: 0, client };
    if affinity
        // SAFETY: read-only lookup, copied.
        && let Some(a) = unsafe { SVC_AFFINITY.get(akey) }.copied()
        && now.wrapping_sub(a.last_used_ns) < u64::from(fe.affinity_timeout_s) * 1_000_000_000
        && let Some((ordinal, b)) = affine(fe.svc_id, base, count, a.ordinal, a.ip, a.port)
    {
        trace.step(trace_step::SVC_BACKEND, u16::from(local) | 2, b.ip, b.port, (ordinal - base) as u16, fe.svc_id);
        if !trace.on() {
            let fresh = SvcAffinity { last_used_ns: now, ordinal, ..a };
            let _ = SVC_AFFINITY.insert(akey, fresh, 0);
        }
        return Some(b);
    }
    // SAFETY: plain helper call.
    let ordinal = base + unsafe { bpf_get_prandom_u32() } % u32::from(count);
    let b = backend(fe.svc_id, ordinal)?;
    trace.step(trace_step::SVC_BACKEND, u16::from(local), b.ip, b.port, (ordinal - base) as u16, fe.svc_id);
    if affinity && !trace.on() {
        let a = SvcAffinity { last_used_ns: now, ordinal, ip: b.ip, port: b.port, _pad: [0; 6] };
        let _ = SVC_AFFINITY.insert(akey, a, 0);
    }
    Some(b)
}

/// Whether traffic from inside the cluster uses the Local set: ClusterIPs under
/// internalTrafficPolicy Local. (Pods reaching a NodePort or a load-balancer IP use every
/// endpoint, whatever the external policy, as kube-proxy does.)
#[inline(always)]
pub fn internal_local(fe: &SvcFrontend) -> bool {
    fe.flags & svc_flags::CLUSTER_IP != 0 && fe.flags & svc_flags::ITP_LOCAL != 0
}
