//! Fragmented IPv4 datagrams on the fast path.
//!
//! Only a datagram's first fragment carries its transport header. Each hook that sees a
//! first fragment records its ports in `FRAGS`, keyed by the datagram as the hook sees it
//! (source, destination, identification, protocol). A later fragment borrows them: its
//! conntrack lookup, policy check and NAT work as for the first fragment, and its rewrite
//! touches the addresses only (the first fragment's checksum covers the whole datagram; a
//! later fragment's transport bytes are payload). A later fragment of a flow conntrack
//! does not know (its first fragment was dropped, or has not passed yet) is dropped, as
//! Cilium drops it: the datapath never reassembles. Protocols without ports need nothing:
//! every one of their packets is checked as it is.

use contiv_common::{FragHead, FragKey, trace_step};

use crate::{
    maps::FRAGS,
    nat::{self, IPPROTO_TCP, IPPROTO_UDP, L4},
    packet::IPV4_MIN_HLEN,
    policy::{self, IPPROTO_ICMP, IPPROTO_SCTP, Transport},
    trace::Trace,
};

/// Values of [`Fragment::kind`].
pub const WHOLE: u8 = 0;
/// The first fragment of a datagram: its transport header is in the packet.
pub const FIRST: u8 = 1;
/// A later fragment of a datagram with ports: they come from its first fragment.
pub const LATER: u8 = 2;

/// What a packet is, and for a later fragment, what its first fragment carried.
#[derive(Clone, Copy)]
pub struct Fragment {
    pub kind: u8,
    pub head: FragHead,
}

impl Fragment {
    /// Reads the IPv4 header (`ip`, no options: the caller checked) and the frame: a first
    /// fragment's ports are recorded (not in a trace); a later fragment's are looked up.
    /// `None`: a later fragment whose first fragment was not seen here (drop it).
    #[inline(always)]
    pub fn of(ip: &[u8; IPV4_MIN_HLEN], data: usize, data_end: usize, trace: Trace) -> Option<Self> {
        let whole = Self { kind: WHOLE, head: FragHead { sport: 0, dport: 0 } };
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        if frag & 0x3fff == 0 {
            return Some(whole);
        }
        let proto = ip[9];
        if !matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_ICMP) {
            // No flow key to borrow: checked as a packet of its own, like the first.
            return Some(whole);
        }
        let key = FragKey {
            src: [ip[12], ip[13], ip[14], ip[15]],
            dst: [ip[16], ip[17], ip[18], ip[19]],
            id: u16::from_be_bytes([ip[4], ip[5]]),
            proto,
            _pad: 0,
        };
        if frag & 0x1fff == 0 {
            // The first fragment (more fragments follow, offset 0).
            let head = match policy::transport(data, data_end, proto) {
                Transport::Ports { sport, dport, .. } => FragHead { sport, dport },
                Transport::Echo { id } => FragHead { sport: id, dport: id },
                _ => return Some(whole),
            };
            if !trace.on() {
                // Best effort: a later fragment that finds nothing is dropped.
                let _ = FRAGS.insert(key, head, 0);
            }
            return Some(Self { kind: FIRST, head });
        }
        // SAFETY: read-only lookup, copied out.
        let Some(head) = (unsafe { FRAGS.get(key) }).copied() else {
            trace.note(trace_step::FRAGMENT, 0);
            return None;
        };
        trace.step(trace_step::FRAGMENT, 1, key.dst, head.sport, head.dport, 0);
        Some(Self { kind: LATER, head })
    }

    /// The ports a TCP/UDP packet's flow has (its own header's, or its first fragment's).
    #[inline(always)]
    pub fn l4(&self, data: usize, data_end: usize, proto: u8) -> Option<L4> {
        if self.kind != LATER {
            return nat::l4(data, data_end, proto);
        }
        match proto {
            IPPROTO_TCP | IPPROTO_UDP => {
                Some(L4 { proto, sport: self.head.sport, dport: self.head.dport, tcp_flags: 0, later: 1 })
            }
            _ => None,
        }
    }

    /// What the policy stage needs of the packet's transport (its own header's, or its
    /// first fragment's).
    #[inline(always)]
    pub fn transport(&self, data: usize, data_end: usize, proto: u8) -> Transport {
        if self.kind != LATER {
            return policy::transport(data, data_end, proto);
        }
        match proto {
            IPPROTO_ICMP => Transport::Echo { id: self.head.sport },
            _ => Transport::Ports { proto, sport: self.head.sport, dport: self.head.dport },
        }
    }
}
