//! Header access for the programs: bounds-checked pointers into the frame and the few
//! header edits a routed hop makes.

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const IPV4_MIN_HLEN: usize = 20;
/// ARP payload for Ethernet/IPv4 is 28 bytes.
pub const ARP_LEN: usize = 28;
/// Offsets in the ARP payload: sender hardware address, sender and target protocol address.
pub const ARP_SHA_OFF: usize = 8;
pub const ARP_SPA_OFF: usize = 14;
pub const ARP_TPA_OFF: usize = 24;

/// A pointer to a `T` at `offset` in the frame, if the frame is long enough.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    let start = data + offset;
    if start + core::mem::size_of::<T>() > data_end {
        return None;
    }
    Some(start as *mut T)
}

/// The Ethernet header (mutable).
#[inline(always)]
pub fn eth(data: usize, data_end: usize) -> Option<&'static mut [u8; ETH_HLEN]> {
    // SAFETY: bounds checked by ptr_at; the frame outlives the program run.
    ptr_at::<[u8; ETH_HLEN]>(data, data_end, 0).map(|p| unsafe { &mut *p })
}

/// The first 20 bytes of the IPv4 header after the Ethernet header (mutable).
#[inline(always)]
pub fn ipv4(data: usize, data_end: usize) -> Option<&'static mut [u8; IPV4_MIN_HLEN]> {
    // SAFETY: bounds checked by ptr_at.
    ptr_at::<[u8; IPV4_MIN_HLEN]>(data, data_end, ETH_HLEN).map(|p| unsafe { &mut *p })
}

/// The ARP payload after the Ethernet header.
#[inline(always)]
pub fn arp(data: usize, data_end: usize) -> Option<&'static [u8; ARP_LEN]> {
    // SAFETY: bounds checked by ptr_at.
    ptr_at::<[u8; ARP_LEN]>(data, data_end, ETH_HLEN).map(|p| unsafe { &*p })
}

#[inline(always)]
pub fn ethertype(eth: &[u8; ETH_HLEN]) -> u16 {
    u16::from_be_bytes([eth[12], eth[13]])
}

#[inline(always)]
pub fn src_ip(ip: &[u8; IPV4_MIN_HLEN]) -> [u8; 4] {
    [ip[12], ip[13], ip[14], ip[15]]
}

#[inline(always)]
pub fn dst_ip(ip: &[u8; IPV4_MIN_HLEN]) -> [u8; 4] {
    [ip[16], ip[17], ip[18], ip[19]]
}

/// An IPv4 header the datapath can read: version 4, and a length (IHL) of at least the
/// 20 fixed bytes. IP options (IHL above 5) are read past: see [`l4_off`].
#[inline(always)]
pub fn well_formed(ip: &[u8; IPV4_MIN_HLEN]) -> bool {
    ip[0] >> 4 == 4 && ip[0] & 0x0f >= 5
}

/// Where the transport header starts in the frame: after the IPv4 header and its options.
/// At most 74, which is what the verifier needs to know of it.
#[inline(always)]
pub fn l4_off(data: usize, data_end: usize) -> usize {
    match ptr_at::<u8>(data, data_end, ETH_HLEN) {
        // SAFETY: bounds checked by ptr_at.
        Some(p) => ETH_HLEN + header_len(unsafe { *p }),
        None => ETH_HLEN + IPV4_MIN_HLEN,
    }
}

/// The length of an IPv4 header with its options, from its first byte: IHL 32-bit words.
/// The hooks drop a header with an IHL below 5, and an ICMP error quoting one is not
/// read; it is read here as 5. At most 60.
#[inline(always)]
pub fn header_len(first: u8) -> usize {
    usize::from((first & 0x0f).max(5)) * 4
}

/// The ICMP header before an error's quote.
pub const ICMP_HLEN: usize = 8;

/// A routed hop: decrements the TTL and patches the header checksum incrementally
/// (RFC 1624, the kernel's ip_decrease_ttl). False if the TTL would reach zero.
#[inline(always)]
pub fn decrement_ttl(ip: &mut [u8; IPV4_MIN_HLEN]) -> bool {
    let ttl = ip[8];
    if ttl <= 1 {
        return false;
    }
    ip[8] = ttl - 1;
    let check = u16::from_be_bytes([ip[10], ip[11]]) as u32 + 0x0100;
    let check = (check + (check >> 16)) as u16;
    let check = check.to_be_bytes();
    ip[10] = check[0];
    ip[11] = check[1];
    true
}

/// Whether `ip` is inside `net`/`mask` (all network byte order).
#[inline(always)]
pub fn in_subnet(ip: [u8; 4], net: [u8; 4], mask: [u8; 4]) -> bool {
    u32::from_ne_bytes(ip) & u32::from_ne_bytes(mask) == u32::from_ne_bytes(net) & u32::from_ne_bytes(mask)
}
