//! Wire-format constants and helpers for the few headers the vswitch reads:
//! Ethernet II, ARP (Ethernet/IPv4) and IPv4/ICMP.

/// Length of an Ethernet II header (no VLAN tag).
pub const ETH_HLEN: usize = 14;
/// The largest frame the slow-path port carries (its MTU plus the Ethernet header); the
/// datapath cuts bigger ones to this size before handing them over.
pub const MAX_FRAME: usize = contiv_common::SLOW_PORT_MTU as usize + ETH_HLEN;
/// Length of an ARP payload for Ethernet/IPv4.
pub const ARP_LEN: usize = 28;
/// Length of an IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
/// Length of an ICMP echo header (type, code, checksum, id, seq).
pub const ICMP_ECHO_HLEN: usize = 8;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;

pub const ARP_HTYPE_ETHERNET: u16 = 1;
pub const ARP_OP_REQUEST: u16 = 1;
pub const ARP_OP_REPLY: u16 = 2;

pub const IPPROTO_ICMP: u8 = 1;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Code of ICMP destination unreachable: fragmentation needed and DF set.
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// Code of ICMP destination unreachable: port unreachable.
pub const ICMP_PORT_UNREACH: u8 = 3;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const TCP_HLEN: usize = 20;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// TTL of the packets the vswitch originates.
pub const DEFAULT_TTL: u8 = 64;

/// IPv4 "more fragments" flag in the flags/fragment-offset field.
pub const IPV4_MF: u16 = 0x2000;
/// IPv4 fragment offset mask in the flags/fragment-offset field.
pub const IPV4_FRAG_OFFSET: u16 = 0x1fff;

/// Reads a big-endian u16 at `off`. The caller has checked the length.
pub fn be16(buf: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([buf[off], buf[off + 1]])
}

/// Writes a big-endian u16 at `off`.
pub fn put_be16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Reads a 6-byte MAC address at `off`.
pub fn mac_at(buf: &[u8], off: usize) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&buf[off..off + 6]);
    m
}

/// Reads a 4-byte IPv4 address at `off`.
pub fn ipv4_at(buf: &[u8], off: usize) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&buf[off..off + 4]);
    a
}

/// The Internet checksum (RFC 1071) of `data`: the one's complement of the
/// one's-complement sum of its 16-bit words (odd length padded with zero).
///
/// Computing it over data that already holds a correct checksum yields 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP/UDP checksum of `segment` (checksum field zeroed) between `src` and `dst`.
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    internet_checksum(&pseudo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to ddf2, checksum 220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&data), 0x220d);
    }

    #[test]
    fn checksum_of_a_known_ipv4_header() {
        // The classic example header with checksum 0xb861.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&hdr), 0xb861);
        put_be16(&mut hdr, 10, 0xb861);
        assert_eq!(internet_checksum(&hdr), 0);
    }

    #[test]
    fn checksum_pads_odd_length_with_zero() {
        assert_eq!(internet_checksum(&[0x12]), !0x1200);
        assert_eq!(internet_checksum(&[0x12, 0x34, 0x56]), !(0x1234u16 + 0x5600));
    }
}
