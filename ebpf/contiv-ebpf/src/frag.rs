//! Fragmented IPv4 datagrams on the fast path.
//!
//! Only a datagram's first fragment carries its transport header. Each hook that sees a
//! first fragment records its ports in `FRAGS`, keyed by the datagram as the hook sees it
//! (source, destination, identification, protocol); the first fragment then goes on as a
//! whole packet would (services, policy, conntrack). A later fragment borrows the ports
//! and takes a short way of its own (`svc::established`): its first fragment's conntrack
//! entry, and the rewrite that entry asks for, at the addresses only (the first fragment's
//! checksum covers the whole datagram; a later fragment's transport bytes are payload).
//! Without that entry (its first fragment was refused, or has not passed yet) it is
//! dropped, as Cilium drops it: the datapath never reassembles. Protocols without ports
//! need nothing: every one of their packets is checked as it is. ICMP has an echo's
//! identifier in its first fragment only: a later fragment of ICMP always takes its first
//! fragment's record (without one it is dropped), since its bytes are payload, and an
//! ICMP message other than an echo (whose first fragment records nothing) does not pass
//! fragmented.

use contiv_common::{FragHead, FragKey, trace_step};

use crate::{
    maps::FRAGS,
    nat::{IPPROTO_TCP, IPPROTO_UDP},
    packet::{IPV4_MIN_HLEN, dst_ip, l4_off, ptr_at, src_ip},
    policy::{self, IPPROTO_ICMP, IPPROTO_SCTP, Transport},
    trace::Trace,
};

/// Values of [`Fragment::kind`]: a packet with its transport header (a whole datagram, or
/// a first fragment, which is handled as one once its ports are recorded).
///
/// A first fragment is not told apart after [`Fragment::of`] on purpose: the verifier
/// keeps the states of every value a branch was decided on apart, so a third kind that
/// lived through the service stage doubled the paths it walked in `tc_from_pod`.
pub const WHOLE: u8 = 0;
/// A later fragment of a datagram with ports: they come from its first fragment.
pub const LATER: u8 = 2;

/// What a packet is, and for a later fragment, what its first fragment carried.
#[derive(Clone, Copy)]
pub struct Fragment {
    pub kind: u8,
    pub head: FragHead,
}

impl Fragment {
    /// Reads the IPv4 header (`ip`, well formed: the caller checked) and the frame: a first
    /// fragment's ports are recorded (not in a trace); a later fragment's are looked up.
    /// `None` (drop it): a later fragment whose first fragment was not seen here, or a
    /// fragment that hides its transport header (see [`hides_header`]).
    #[inline(always)]
    pub fn of(ip: &[u8; IPV4_MIN_HLEN], data: usize, data_end: usize, trace: Trace) -> Option<Self> {
        let whole = Self { kind: WHOLE, head: FragHead { sport: 0, dport: 0 } };
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        if frag & 0x3fff == 0 {
            return Some(whole);
        }
        if hides_header(ip) {
            trace.note(trace_step::FRAGMENT, 0);
            return None;
        }
        // The first 8 bytes after the header: a first fragment's transport header.
        let l4 = match ptr_at::<[u8; 8]>(data, data_end, l4_off(data, data_end)) {
            // SAFETY: bounds checked by ptr_at.
            Some(p) => u64::from_le_bytes(unsafe { *p }),
            None => 0,
        };
        let mut meta = u32::from(u16::from_be_bytes([ip[4], ip[5]])) << 16 | u32::from(ip[9]) << 8;
        meta |= if frag & 0x1fff == 0 { META_FIRST } else { 0 };
        meta |= if trace.on() { META_TRACE } else { 0 };
        let v = contiv_fragment(u32::from_ne_bytes(src_ip(ip)), u32::from_ne_bytes(dst_ip(ip)), meta, l4);
        if v == UNKNOWN {
            trace.note(trace_step::FRAGMENT, 0);
            return None;
        }
        if v as u8 != LATER {
            return Some(whole);
        }
        let head = FragHead { sport: (v >> 16) as u16, dport: (v >> 32) as u16 };
        trace.step(trace_step::FRAGMENT, 1, dst_ip(ip), head.sport, head.dport, 0);
        Some(Self { kind: LATER, head })
    }

    /// What the policy stage needs of the packet's transport (its own header's, or its
    /// first fragment's).
    #[inline(always)]
    pub fn transport(&self, data: usize, data_end: usize, proto: u8) -> Transport {
        if self.kind != LATER {
            return policy::transport(data, data_end, proto);
        }
        match proto {
            // Its first fragment's ports are a request's or a reply's (`policy::echo_ports`);
            // a later fragment only looks its flow up, it never starts one.
            IPPROTO_ICMP => Transport::echo(self.head.sport, self.head.dport),
            _ => Transport::ports(proto, self.head.sport, self.head.dport),
        }
    }
}

/// Whether a fragment (at `offset`, in units of 8 bytes) is how a transport header is hidden
/// from a filter (RFC 1858, RFC 3128): a first TCP fragment too short to hold the header's
/// flags (a SYN then reads as no SYN, ports from nowhere), a TCP fragment at offset 8 that
/// would overwrite them at reassembly, a first UDP fragment without its whole header. No
/// stack sends these: they are dropped, as netfilter and BSD's filters drop them.
#[inline(always)]
pub fn hides_header(ip: &[u8; IPV4_MIN_HLEN]) -> bool {
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff == 0 {
        return false;
    }
    let offset = frag & 0x1fff;
    let header = u16::from(ip[0] & 0x0f) * 4;
    let payload = u16::from_be_bytes([ip[2], ip[3]]).saturating_sub(header);
    match ip[9] {
        IPPROTO_TCP => offset == 1 || (offset == 0 && payload < 20),
        IPPROTO_UDP => offset == 0 && payload < 8,
        _ => false,
    }
}

/// [`contiv_fragment`]'s answer for a later fragment whose first fragment was not seen.
const UNKNOWN: u64 = u64::MAX;
/// Bits of [`contiv_fragment`]'s `meta`, beside the IP id (bits 16-31) and protocol (8-15).
const META_FIRST: u32 = 1;
const META_TRACE: u32 = 2;

/// A fragment of a datagram `src` -> `dst` (`meta`: its IP id, protocol, whether it is the
/// first, whether this is a trace, which records nothing; `l4`: a first fragment's first 8
/// transport bytes, as read). A first fragment's ports are recorded; a later fragment's
/// are looked up. Answers [`LATER`] with the ports (source in bits 16-31, destination in
/// 32-47), [`UNKNOWN`], or [`WHOLE`] (a first fragment, or a protocol without ports).
///
/// A global function, answering in one register: the verifier checks it once and walks the
/// rest of a program once for whatever it answers. Inlined, each way through it (a first
/// fragment of each protocol, with and without a record) left the program in a state of its
/// own, which the verifier walked the rest of `tc_from_pod` from again: half as much again.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn contiv_fragment(src: u32, dst: u32, meta: u32, l4: u64) -> u64 {
    let proto = (meta >> 8) as u8;
    let first = meta & META_FIRST != 0;
    let key = FragKey { src: src.to_ne_bytes(), dst: dst.to_ne_bytes(), id: (meta >> 16) as u16, proto, _pad: 0 };
    let b = l4.to_le_bytes();
    let head = match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            FragHead { sport: u16::from_be_bytes([b[0], b[1]]), dport: u16::from_be_bytes([b[2], b[3]]) }
        }
        // A first fragment of an echo request or reply: its identifier's ports (a flow of
        // its own, as `policy.rs` keys it). Another ICMP message's first fragment is
        // checked as a packet of its own, and recorded nothing for its later ones.
        IPPROTO_ICMP if first => {
            if b[0] != 0 && b[0] != 8 {
                return u64::from(WHOLE);
            }
            let (sport, dport) = policy::echo_ports(b[0] == 8, u16::from_be_bytes([b[4], b[5]]));
            FragHead { sport, dport }
        }
        // A later fragment of ICMP: its bytes are payload, never read as a header; only
        // its first fragment's record tells its flow (without one it is dropped, as a
        // later fragment of TCP or UDP is).
        IPPROTO_ICMP => FragHead { sport: 0, dport: 0 },
        // No flow key to borrow: checked as a packet of its own, like the first.
        _ => return u64::from(WHOLE),
    };
    if first {
        if meta & META_TRACE == 0 {
            // Best effort: a later fragment that finds nothing is dropped.
            let _ = FRAGS.insert(key, head, 0);
        }
        return u64::from(WHOLE);
    }
    // SAFETY: read-only lookup, copied out.
    match unsafe { FRAGS.get(key) } {
        Some(h) => u64::from(LATER) | u64::from(h.sport) << 16 | u64::from(h.dport) << 32,
        None => UNKNOWN,
    }
}
