//! NetworkPolicy at the pod edge, on a flow's first packet only.
//!
//! Every new flow from or to a local pod is recorded in conntrack (one entry per direction,
//! the same map services use); an established packet or a reply is allowed by that entry
//! and never reaches this module. A first packet is checked here:
//! - egress, on the source pod's node, when the source is isolated for egress: its POLICY
//!   entries for the (post-DNAT) destination;
//! - ingress, on the destination pod's node, when the destination is isolated for ingress:
//!   its POLICY entries for the source (after any SNAT).
//!
//! A check is one longest-prefix lookup of (pod, direction, peer) in the POLICY trie; the
//! value holds the union of everything every selecting policy allows with peers of that
//! prefix (the agent flattened overlapping blocks, excepts and pod addresses). Local pod to
//! local pod costs both checks: two lookups. Isolation bits live in the pod's endpoint
//! entry, which the datapath reads anyway.
//!
//! ICMP: an echo is a flow keyed by its identifier, as netfilter keys it by identifier and
//! type: a request's key has the identifier as source port and the identifier plus one as
//! destination port, a reply's the other way round ([`echo_ports`]). So the request's
//! reply entry (reversed ports) matches only replies: a request from the other side (the
//! pinged pod, or anything forging it), whatever its identifier, is a new flow of its own,
//! checked by policy. A reply that conntrack does not know (its request reached the pod
//! through the node's stack, as the node's own ping does, which no hook here tracks) is
//! checked as a new packet and recorded in its own direction only: its reversed key would
//! be a request's.
//!
//! An error (destination unreachable, "fragmentation needed", time exceeded, parameter
//! problem) is allowed when the flow its embedded header names is tracked (a TCP, UDP or
//! SCTP flow, or an echo), so path MTU discovery works for every allowed flow, and so does
//! a traceroute. It must be addressed to the sender of the packet it quotes, as netfilter
//! requires of a RELATED error (`nf_conntrack_inet_error`): whoever sends an error (the
//! flow's other end, a router on its way, the slow path, the node's stack) sends it to that
//! packet's source, and every translation on the way (this datapath's, netfilter's, VPP's)
//! changes both together. One addressed elsewhere is related to nothing (netfilter's
//! INVALID, [`misaddressed`]): the hooks drop it (reason `malformed`), whatever it quotes.
//! Else a pod could pass an error of its making to a pod isolated for ingress, past its own
//! egress rules too, by quoting any flow conntrack knows. Other ICMP, and protocols without
//! ports, need a rule without ports.

use aya_ebpf::btf_maps::lpm_trie::Key;
use contiv_common::{
    CtEntry, CtKey, MAX_POLICY_PORT_RANGES, PolicyKey, PolicyPorts, ct_flags, policy_ports, trace_policy, trace_step,
};

use crate::{
    ct,
    maps::{CT, POLICY},
    nat::{IPPROTO_TCP, IPPROTO_UDP},
    packet::{ETH_HLEN, ICMP_HLEN, IPV4_MIN_HLEN, dst_ip, header_len, l4_off, ptr_at, src_ip, well_formed},
    trace::Trace,
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_SCTP: u8 = 132;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// What the policy stage needs of a packet's transport header: its flow key's ports, or
/// for an ICMP error the whole key of the flow it is about.
///
/// A plain struct with every field set on every path, not an enum: an enum's unused payload
/// is undefined, and LLVM may leave any register there, a pointer too, which the verifier
/// refuses to shift when a merged value is taken apart (`tc_from_uplink` was refused so).
#[derive(Clone, Copy)]
pub struct Transport {
    /// [`kind`].
    pub kind: u8,
    /// The packet's protocol; for [`kind::RELATED`], the protocol of the flow it is about.
    pub proto: u8,
    /// Ports (host byte order); an echo's [`echo_ports`]. For [`kind::RELATED`], the
    /// ports of the flow's key.
    pub sport: u16,
    pub dport: u16,
    /// For [`kind::RELATED`], the addresses of the flow's key; else zero.
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

pub mod kind {
    /// TCP, UDP, SCTP: ports.
    pub const PORTS: u8 = 0;
    /// An ICMP echo request or reply: a flow keyed by its identifier
    /// ([`super::echo_ports`]).
    pub const ECHO: u8 = 1;
    /// An ICMP error about a flow: the conntrack key of that flow's reply direction.
    pub const RELATED: u8 = 2;
    /// Anything else: no flow key; every packet is checked. (An ICMP error not addressed
    /// to the sender of what it quotes is one: the hooks drop it first, [`super::misaddressed`].)
    pub const OTHER: u8 = 3;
}

/// The conntrack ports of an ICMP echo with identifier `id` (a request, or a reply): the
/// identifier on the requester's side, the identifier plus one (wrapping) on the
/// responder's. A request's key is `(n, n + 1)`, a reply's `(n + 1, n)`: no key is both
/// (that would need `n + 2 == n`), so a request's reply entry (its ports reversed) is a
/// reply's key and never a request's, whatever identifier the request carries. (The
/// complement, used before, made every pair `(n, !n)` both a request's and a reply's: a
/// request with the complemented identifier matched a reply entry.)
#[inline(always)]
pub const fn echo_ports(request: bool, id: u16) -> (u16, u16) {
    if request { (id, id.wrapping_add(1)) } else { (id.wrapping_add(1), id) }
}

impl Transport {
    #[inline(always)]
    pub const fn ports(proto: u8, sport: u16, dport: u16) -> Self {
        Self { kind: kind::PORTS, proto, sport, dport, src: [0; 4], dst: [0; 4] }
    }

    /// An echo request or reply with these [`echo_ports`].
    #[inline(always)]
    pub const fn echo(sport: u16, dport: u16) -> Self {
        Self { kind: kind::ECHO, proto: IPPROTO_ICMP, sport, dport, src: [0; 4], dst: [0; 4] }
    }

    #[inline(always)]
    pub const fn related(k: CtKey) -> Self {
        Self { kind: kind::RELATED, proto: k.proto, sport: k.sport, dport: k.dport, src: k.src, dst: k.dst }
    }

    #[inline(always)]
    pub const fn other(proto: u8) -> Self {
        Self { kind: kind::OTHER, proto, sport: 0, dport: 0, src: [0; 4], dst: [0; 4] }
    }

    /// The conntrack key of the flow an ICMP error is about ([`kind::RELATED`] only).
    #[inline(always)]
    pub fn related_key(&self) -> CtKey {
        ct::key(self.src, self.dst, self.sport, self.dport, self.proto)
    }

    /// Protocol and destination port a rule must allow (0 for protocols without ports).
    #[inline(always)]
    pub fn rule_match(&self) -> (u8, u16) {
        match self.kind {
            kind::PORTS => (self.proto, self.dport),
            kind::ECHO | kind::RELATED => (IPPROTO_ICMP, 0),
            _ => (self.proto, 0),
        }
    }
}

/// Reads the transport header (after the IPv4 header's options, if any).
#[inline(always)]
pub fn transport(data: usize, data_end: usize, proto: u8) -> Transport {
    let off = l4_off(data, data_end);
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let Some(p) = ptr_at::<[u8; 4]>(data, data_end, off) else {
                return Transport::other(proto);
            };
            // SAFETY: bounds checked by ptr_at.
            let p = unsafe { &*p };
            Transport::ports(proto, u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]))
        }
        IPPROTO_ICMP => icmp(data, data_end, off),
        _ => Transport::other(proto),
    }
}

/// ICMP header (8 bytes, at `off`), then for errors the embedded IPv4 header (20 bytes and
/// its options, if any) and the first 8 bytes after it (RFC 792): the ports of a TCP, UDP
/// or SCTP packet, or an echo's identifier.
#[inline(always)]
fn icmp(data: usize, data_end: usize, off: usize) -> Transport {
    let other = Transport::other(IPPROTO_ICMP);
    let Some(h) = ptr_at::<[u8; 8]>(data, data_end, off) else {
        return other;
    };
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*h };
    match h[0] {
        ICMP_ECHO | ICMP_ECHO_REPLY => {
            let (sport, dport) = echo_ports(h[0] == ICMP_ECHO, u16::from_be_bytes([h[4], h[5]]));
            Transport::echo(sport, dport)
        }
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {
            let (Some(outer), Some(inner)) = (
                ptr_at::<[u8; IPV4_MIN_HLEN]>(data, data_end, ETH_HLEN),
                ptr_at::<[u8; IPV4_MIN_HLEN]>(data, data_end, off + ICMP_HLEN),
            ) else {
                return other;
            };
            // SAFETY: bounds checked by ptr_at.
            let (outer, inner) = unsafe { (&*outer, &*inner) };
            if !well_formed(inner) {
                return other;
            }
            // An error goes to the sender of the packet it quotes (see the module docs).
            if dst_ip(outer) != src_ip(inner) {
                return other;
            }
            let proto = inner[9];
            // An error about an echo (a router's "time exceeded" for a traceroute by ping,
            // "host unreachable"): the echo flow its identifier keys.
            let echo = proto == IPPROTO_ICMP;
            if !(proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP || echo) {
                return other;
            }
            let Some(q) = ptr_at::<[u8; 8]>(data, data_end, off + ICMP_HLEN + header_len(inner[0])) else {
                return other;
            };
            // SAFETY: bounds checked by ptr_at.
            let q = unsafe { &*q };
            if echo && q[0] != ICMP_ECHO && q[0] != ICMP_ECHO_REPLY {
                return other;
            }
            // Ports, or an echo's.
            let (sport, dport) = if echo {
                echo_ports(q[0] == ICMP_ECHO, u16::from_be_bytes([q[4], q[5]]))
            } else {
                (u16::from_be_bytes([q[0], q[1]]), u16::from_be_bytes([q[2], q[3]]))
            };
            // The embedded packet went src -> dst; the flow's reply direction is tracked
            // under the reversed key whatever NAT the original direction had.
            Transport::related(ct::key(dst_ip(inner), src_ip(inner), dport, sport, proto))
        }
        _ => other,
    }
}

/// Whether the packet is an ICMP error (the types [`transport`] reads as one) not addressed
/// to the sender of the packet it quotes: related to no flow (netfilter's INVALID), dropped
/// by the hooks that check policy ([`transport`] reads it as [`kind::OTHER`]). A check of
/// its own, made before [`transport`] and answered at once: a kind of its own, alive
/// through the policy stage, cost `tc_from_pod` some 50,000 more verified instructions.
#[inline(always)]
pub fn misaddressed(data: usize, data_end: usize, proto: u8) -> bool {
    if proto != IPPROTO_ICMP {
        return false;
    }
    let off = l4_off(data, data_end);
    let (Some(outer), Some(h), Some(inner)) = (
        ptr_at::<[u8; IPV4_MIN_HLEN]>(data, data_end, ETH_HLEN),
        ptr_at::<[u8; ICMP_HLEN]>(data, data_end, off),
        ptr_at::<[u8; IPV4_MIN_HLEN]>(data, data_end, off + ICMP_HLEN),
    ) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let (outer, h, inner) = unsafe { (&*outer, &*h, &*inner) };
    matches!(h[0], ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM)
        && well_formed(inner)
        && dst_ip(outer) != src_ip(inner)
}

/// Whether the packet is an ICMP echo reply (read when a flow is recorded, not carried in
/// [`Transport`]: see [`misaddressed`] on what a kind of its own costs).
#[inline(always)]
fn echo_reply(data: usize, data_end: usize) -> bool {
    // (The whole header is checked: a one-byte check compiles to a comparison the verifier
    // does not take as a bound.)
    match ptr_at::<[u8; ICMP_HLEN]>(data, data_end, l4_off(data, data_end)) {
        // SAFETY: bounds checked by ptr_at.
        Some(h) => (unsafe { *h })[0] == ICMP_ECHO_REPLY,
        None => false,
    }
}

/// Whether conntrack knows the packet's flow (no policy check then), for packets the
/// service stage did not look up (it handles TCP and UDP): ICMP and SCTP.
#[inline(always)]
pub fn tracked(t: &Transport, src: [u8; 4], dst: [u8; 4], trace: Trace) -> bool {
    let hit = match t.kind {
        kind::PORTS | kind::ECHO => ct::lookup(&ct::key(src, dst, t.sport, t.dport, t.proto), 0, trace).is_some(),
        // SAFETY: read-only lookup, not refreshed (an error is not traffic of the flow).
        kind::RELATED => unsafe { CT.get(t.related_key()) }.is_some(),
        _ => false,
    };
    trace.note(if hit { trace_step::CT_HIT } else { trace_step::CT_MISS }, 0);
    hit
}

/// Whether the rules of `pod` for `direction` allow a new flow with `peer`.
#[inline(always)]
pub fn allows(pod: [u8; 4], direction: u8, peer: [u8; 4], t: &Transport) -> bool {
    let (proto, port) = t.rule_match();
    let key = Key::new(PolicyKey::FIXED_BITS + 32, PolicyKey { pod, direction, _pad: [0; 3], peer });
    let Some(p) = POLICY.get(&key) else {
        return false;
    };
    ports_allow(p, proto, port)
}

#[inline(always)]
fn ports_allow(p: &PolicyPorts, proto: u8, port: u16) -> bool {
    if p.flags & policy_ports::ANY != 0 {
        return true;
    }
    let n = p.count as usize;
    for i in 0..MAX_POLICY_PORT_RANGES {
        if i >= n {
            break;
        }
        let r = &p.ranges[i];
        if r.protocol == proto && r.first <= port && port <= r.last {
            return true;
        }
    }
    false
}

/// A policy check as the datapath makes it (`isolated`: the pod's isolation bit for
/// `direction`); a trace records the result (the agent names the entry that decided).
#[inline(always)]
pub fn check(isolated: bool, pod: [u8; 4], direction: u8, peer: [u8; 4], t: &Transport, trace: Trace) -> bool {
    let ok = !isolated || allows(pod, direction, peer, t);
    if trace.on() {
        let result = if !isolated {
            trace_policy::NOT_ISOLATED
        } else if ok {
            trace_policy::ALLOWED
        } else if POLICY
            .get(&Key::new(PolicyKey::FIXED_BITS + 32, PolicyKey { pod, direction, _pad: [0; 3], peer }))
            .is_none()
        {
            trace_policy::NO_MATCH
        } else {
            trace_policy::PORT_DENIED
        };
        let (proto, port) = t.rule_match();
        trace.step(
            trace_step::POLICY,
            u16::from(direction) | result << 4,
            peer,
            port,
            u16::from(proto),
            u32::from_ne_bytes(pod),
        );
    }
    ok
}

/// Records an allowed flow that no service stage translated: both directions, no rewrite,
/// so its later packets and its replies pass on one conntrack lookup. An echo reply (the
/// packet is at `data`) records its own direction only: the reverse would be its request's
/// key, which would let the receiver's echo requests pass as replies. False if the map
/// refused (the packet goes on; its next packet is checked again).
#[inline(always)]
pub fn track(
    data: usize,
    data_end: usize,
    src: [u8; 4],
    dst: [u8; 4],
    t: &Transport,
    tcp_flags: u8,
    trace: Trace,
) -> bool {
    track_with(src, dst, t, tcp_flags, 0, t.kind == kind::ECHO && echo_reply(data, data_end), trace)
}

/// [`track`] for a flow the node's stack delivered (`src` the client as the stack sent it):
/// its replies go back through that stack ([`ct_flags::VIA_HOST`]).
#[inline(always)]
pub fn track_via_host(src: [u8; 4], dst: [u8; 4], t: &Transport, tcp_flags: u8) -> bool {
    track_with(src, dst, t, tcp_flags, ct_flags::VIA_HOST, false, Trace::OFF)
}

#[inline(always)]
fn track_with(
    src: [u8; 4],
    dst: [u8; 4],
    t: &Transport,
    tcp_flags: u8,
    rev_flags: u16,
    one_way: bool,
    trace: Trace,
) -> bool {
    if t.kind != kind::PORTS && t.kind != kind::ECHO {
        return false;
    }
    let (proto, sport, dport) = (t.proto, t.sport, t.dport);
    let (now, touched) = (ct::now(), ct::ticks());
    let fwd = CtEntry { last_seen_ns: now, tcp_flags, touched, ..CtEntry::default() };
    let fwd_key = ct::key(src, dst, sport, dport, proto);
    if one_way {
        return ct::create_one(&fwd_key, &fwd, trace);
    }
    let rev = CtEntry { last_seen_ns: now, touched, flags: rev_flags, ..CtEntry::default() };
    ct::create(&fwd_key, &fwd, &ct::key(dst, src, dport, sport, proto), &rev, trace)
}
