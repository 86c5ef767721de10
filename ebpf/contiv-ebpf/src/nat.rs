//! Address and port rewrites of TCP/UDP packets, with incremental checksum updates.
//!
//! Pod-originated packets are usually CHECKSUM_PARTIAL (the L4 field holds only the
//! pseudo-header sum): address changes go through `bpf_l4_csum_replace` with
//! `BPF_F_PSEUDO_HDR`, so the kernel patches whatever the field holds correctly; a UDP
//! checksum of zero ("none") stays zero (`BPF_F_MARK_MANGLED_0`).

use aya_ebpf::programs::TcContext;

use crate::packet::{ETH_HLEN, ICMP_HLEN, IPV4_MIN_HLEN, header_len, l4_off, ptr_at};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
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

/// The ports of a TCP or UDP packet (after the IPv4 header's options, if any).
#[inline(always)]
pub fn l4(data: usize, data_end: usize, proto: u8) -> Option<L4> {
    let off = l4_off(data, data_end);
    match proto {
        IPPROTO_TCP => {
            let tcp = ptr_at::<[u8; 14]>(data, data_end, off)?;
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
            let udp = ptr_at::<[u8; 4]>(data, data_end, off)?;
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
    let off = l4_off(ctx.data(), ctx.data_end());
    let (csum_off, mangle) = match l4.proto {
        IPPROTO_TCP => (off + 16, 0),
        _ => (off + 6, BPF_F_MARK_MANGLED_0),
    };
    let (ip_off, port_off) = match end {
        End::Src => (IP_SRC_OFF, off),
        End::Dst => (IP_DST_OFF, off + 2),
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

/// Where an ICMP error's parts are, from its own header (after the outer IPv4 header and
/// its options): its checksum, and the header of the packet it quotes, whose ports follow
/// that header's own options, if any.
const ICMP_CSUM: usize = 2;
const INNER: usize = ICMP_HLEN;
const INNER_CSUM: usize = INNER + 10;
const INNER_SRC: usize = INNER + 12;
const INNER_DST: usize = INNER + 16;

/// One end of a flow: address and port (host byte order).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub ip: [u8; 4],
    pub port: u16,
}

/// Translates an ICMP error about a NAT'ed flow the way the flow's own packets are
/// translated, as netfilter does for RELATED errors. The error travels like the flow's
/// packets from `from` to `to` (the conntrack key it was found under), which become
/// `new_from` -> `new_to`; the packet it quotes went the other way.
/// - Outer destination: it is `to` (the quoted packet's sender: `policy::transport` finds
///   no flow for an error addressed elsewhere); it becomes `new_to`.
/// - Outer source: where the flow's source is translated, it becomes `new_from`, whoever
///   sent the error (the flow's end itself, a backend's port unreachable, or a router on the
///   way, a "fragmentation needed"), as netfilter rewrites it. A router's address must not
///   go on: the error may cross the overlay to another node's backend, which takes from a
///   node only its own addresses (and an error from the flow's own end has it anyway).
///   Where the source is not translated, it is left alone.
/// - Quoted header: its source `to` becomes `new_to`, its destination `from` becomes
///   `new_from`, so the receiver's stack finds the socket that sent it.
///
/// Checksums: the outer IPv4 header's and the quoted one's are patched per address (ICMP's
/// own has no pseudo-header, and a quoted address change with its header checksum patched
/// leaves the sum over the quoted header unchanged); port changes patch ICMP's checksum.
/// The quoted TCP/UDP checksum is left as it was: a quote is truncated, and no receiver
/// checks it. False if the kernel refused a step (drop the packet).
#[inline(always)]
pub fn rewrite_icmp_error(
    ctx: &TcContext,
    outer_src: [u8; 4],
    outer_dst: [u8; 4],
    from: Addr,
    to: Addr,
    new_from: Addr,
    new_to: Addr,
) -> bool {
    if !replace_addr(ctx, IP_CSUM_OFF, IP_DST_OFF, outer_dst, new_to.ip) {
        return false;
    }
    if new_from.ip != from.ip && !replace_addr(ctx, IP_CSUM_OFF, IP_SRC_OFF, outer_src, new_from.ip) {
        return false;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let icmp = l4_off(data, data_end);
    // The quote was read as well-formed to find the flow (`policy::transport`). (Its whole
    // fixed header is checked: a one-byte check compiles to a comparison the verifier does
    // not take as a bound.)
    let Some(quote) = ptr_at::<[u8; IPV4_MIN_HLEN]>(data, data_end, icmp + INNER) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let sport = icmp + INNER + header_len(unsafe { (*quote)[0] });
    replace_addr(ctx, icmp + INNER_CSUM, icmp + INNER_SRC, to.ip, new_to.ip)
        && replace_addr(ctx, icmp + INNER_CSUM, icmp + INNER_DST, from.ip, new_from.ip)
        && replace_quoted_port(ctx, icmp, sport, to.port, new_to.port)
        && replace_quoted_port(ctx, icmp, sport + 2, from.port, new_from.port)
}

/// Rewrites the addresses of a later fragment (see `frag.rs`): the IPv4 header only. Its
/// first fragment's rewrite patched the transport checksum, which covers the whole datagram.
/// False if the kernel refused a step (drop the packet).
#[inline(always)]
pub fn rewrite_addresses(ctx: &TcContext, src: [u8; 4], new_src: [u8; 4], dst: [u8; 4], new_dst: [u8; 4]) -> bool {
    replace_addr(ctx, IP_CSUM_OFF, IP_DST_OFF, dst, new_dst) && replace_addr(ctx, IP_CSUM_OFF, IP_SRC_OFF, src, new_src)
}

/// An IPv4 address at `ip_off` and the header checksum at `csum_off` that covers it.
#[inline(always)]
fn replace_addr(ctx: &TcContext, csum_off: usize, ip_off: usize, old: [u8; 4], new: [u8; 4]) -> bool {
    if old == new {
        return true;
    }
    let (from, to) = (u64::from(u32::from_ne_bytes(old)), u64::from(u32::from_ne_bytes(new)));
    ctx.l3_csum_replace(csum_off, from, to, 4).is_ok() && ctx.store(ip_off, &new, 0).is_ok()
}

/// A port in an ICMP error's quote (at `at` in the frame), and ICMP's checksum (in the
/// ICMP header at `icmp`) over it.
#[inline(always)]
fn replace_quoted_port(ctx: &TcContext, icmp: usize, at: usize, old: u16, new: u16) -> bool {
    if old == new {
        return true;
    }
    let (from, to) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(icmp + ICMP_CSUM, u64::from(from), u64::from(to), 2).is_ok() && ctx.store(at, &to, 0).is_ok()
}
