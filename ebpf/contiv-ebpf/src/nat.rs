//! Address and port rewrites of TCP/UDP packets, with incremental checksum updates.
//!
//! Pod-originated packets are usually CHECKSUM_PARTIAL (the L4 field holds only the
//! pseudo-header sum): address changes go through `bpf_l4_csum_replace` with
//! `BPF_F_PSEUDO_HDR`, so the kernel patches whatever the field holds correctly; a UDP
//! checksum of zero ("none") stays zero (`BPF_F_MARK_MANGLED_0`).

use aya_ebpf::programs::TcContext;

use crate::packet::{ETH_HLEN, IPV4_MIN_HLEN};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
pub const L4_OFF: usize = ETH_HLEN + IPV4_MIN_HLEN;
const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// The TCP/UDP ports and flags of a packet (ports in host byte order).
#[derive(Clone, Copy)]
pub struct L4 {
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
}

/// The ports of a TCP or UDP packet without IP options (the fast path's only kind).
#[inline(always)]
pub fn l4(data: usize, data_end: usize, proto: u8) -> Option<L4> {
    match proto {
        IPPROTO_TCP => {
            let tcp = crate::packet::ptr_at::<[u8; 14]>(data, data_end, L4_OFF)?;
            // SAFETY: bounds checked by ptr_at.
            let tcp = unsafe { &*tcp };
            Some(L4 {
                proto,
                sport: u16::from_be_bytes([tcp[0], tcp[1]]),
                dport: u16::from_be_bytes([tcp[2], tcp[3]]),
                tcp_flags: tcp[13],
            })
        }
        IPPROTO_UDP => {
            let udp = crate::packet::ptr_at::<[u8; 4]>(data, data_end, L4_OFF)?;
            // SAFETY: bounds checked by ptr_at.
            let udp = unsafe { &*udp };
            Some(L4 {
                proto,
                sport: u16::from_be_bytes([udp[0], udp[1]]),
                dport: u16::from_be_bytes([udp[2], udp[3]]),
                tcp_flags: 0,
            })
        }
        _ => None,
    }
}

/// Rewrites one end's address and port. False if the kernel refused a step (the packet
/// must then be dropped: it may be half rewritten).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    l4: &L4,
    end: End,
    old_ip: [u8; 4],
    new_ip: [u8; 4],
    old_port: u16,
    new_port: u16,
) -> bool {
    let (csum_off, mangle) = match l4.proto {
        IPPROTO_TCP => (L4_OFF + 16, 0),
        _ => (L4_OFF + 6, BPF_F_MARK_MANGLED_0),
    };
    let (ip_off, port_off) = match end {
        End::Src => (IP_SRC_OFF, L4_OFF),
        End::Dst => (IP_DST_OFF, L4_OFF + 2),
    };
    if old_ip != new_ip {
        let (from, to) = (u64::from(u32::from_ne_bytes(old_ip)), u64::from(u32::from_ne_bytes(new_ip)));
        if ctx.l4_csum_replace(csum_off, from, to, mangle | BPF_F_PSEUDO_HDR | 4).is_err()
            || ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4).is_err()
            || ctx.store(ip_off, &new_ip, 0).is_err()
        {
            return false;
        }
    }
    if old_port != new_port {
        let (from, to) = (old_port.to_be(), new_port.to_be());
        if ctx.l4_csum_replace(csum_off, u64::from(from), u64::from(to), mangle | 2).is_err()
            || ctx.store(port_off, &to, 0).is_err()
        {
            return false;
        }
    }
    true
}
