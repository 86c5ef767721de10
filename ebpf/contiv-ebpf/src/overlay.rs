//! The overlay: one flow-based VXLAN device per node (`collect_md`), no per-peer devices and
//! no FDB entries. A pod's packet for another node gets its outer IPv4/UDP/VXLAN headers
//! from the program itself ([`encapsulate`]) and leaves by the uplink; other packets (the
//! node's own, a NodePort client's, or one the kernel will not grow) get a tunnel key here
//! (remote node, VNI, TTL) and are redirected to the device's egress, where the kernel's
//! VXLAN driver builds the headers. Every node receives through the device: decapsulated
//! packets arrive at its ingress with the key still attached, so the receiver knows which
//! node sent them.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_ZERO_CSUM_TX, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_tunnel_key,
    },
    helpers::generated::{
        bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_skb_adjust_room, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
    },
    programs::TcContext,
};

use contiv_common::DatapathConfig;

use crate::packet::{ETH_HLEN, ptr_at};

/// TTL of the outer header.
const TUNNEL_TTL: u8 = 64;

/// Attaches the tunnel key for `node_ip` (network byte order) to the skb: this node's VNI,
/// and its own address as the outer source (left to the device, the route to the remote
/// node would pick it, perhaps another address of the uplink, which the receiver refuses
/// as not the sender's registered one). False if the kernel refused (the packet must then
/// be dropped: a collect_md device cannot send it).
#[inline(always)]
pub fn set_tunnel(ctx: &TcContext, cfg: &DatapathConfig, node_ip: [u8; 4]) -> bool {
    // SAFETY: an all-zero bpf_tunnel_key is valid (plain integers and unions of integers).
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = cfg.vni;
    // The helper takes the addresses in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(node_ip);
    key.__bindgen_anon_3.local_ipv4 = u32::from_be_bytes(cfg.node_ip);
    key.tunnel_ttl = TUNNEL_TTL;
    // SAFETY: helper call with a pointer to a stack value of the size passed.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            u64::from(BPF_F_ZERO_CSUM_TX),
        )
    };
    rc == 0
}

/// The outer addresses of a decapsulated packet.
#[derive(Clone, Copy)]
pub struct TunnelEnds {
    /// The sending node's underlay address (network byte order).
    pub remote: [u8; 4],
    /// The address it was sent to (network byte order).
    pub local: [u8; 4],
    /// The VXLAN network identifier it carried.
    pub vni: u32,
}

/// The outer addresses of a decapsulated packet, or `None` if the skb carries no tunnel key.
#[inline(always)]
pub fn tunnel_ends(ctx: &TcContext) -> Option<TunnelEnds> {
    // SAFETY: as above.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: helper call writing into a stack value of the size passed.
    let rc = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0) };
    if rc != 0 {
        return None;
    }
    // SAFETY: IPv4 tunnels fill both (host byte order).
    let (remote, local) = unsafe { (key.__bindgen_anon_1.remote_ipv4, key.__bindgen_anon_3.local_ipv4) };
    Some(TunnelEnds { remote: remote.to_be_bytes(), local: local.to_be_bytes(), vni: key.tunnel_id })
}

/// Bytes the sender puts in front of a pod's IPv4 packet: outer IPv4 (20), UDP (8),
/// VXLAN (8) and the inner Ethernet header (14).
pub const ENCAP_LEN: usize = 50;

/// Where the inner Ethernet frame starts in a packet [`encapsulate`] built: after the
/// outer Ethernet, IPv4, UDP and VXLAN headers.
pub const OUTER_LEN: usize = ETH_HLEN + 20 + 8 + 8;

/// What [`encapsulate`] did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    /// The packet is a VXLAN packet to the remote node now; only its outer MACs are left.
    Done,
    /// The kernel would not grow this packet (e.g. it is already encapsulated): it is
    /// unchanged, and the VXLAN device can still send it.
    Unchanged,
    /// Grown but not written: it must be dropped.
    Broken,
}

/// Builds the outer headers in the program itself: the packet leaves by the uplink without
/// going through the VXLAN device, whose collect_md transmit path looks up the route to
/// the remote node for every packet (a per-packet tunnel key disables its route cache) and
/// passes the outer packet through the node's netfilter hooks. The kernel marks the skb as
/// UDP-tunnelled (inner headers, GSO type), so a GSO packet is segmented as the device's
/// own would be; the MSS stays (pods' MTU already leaves room for the headers).
/// `local` and `remote` are node addresses (network byte order); `port` is the overlay's
/// UDP port.
#[inline(always)]
pub fn encapsulate(ctx: &TcContext, local: [u8; 4], remote: [u8; 4], vni: u32, port: u16) -> Encap {
    // The inner packet's ECN field goes to the outer header as the kernel's tunnels copy it
    // (RFC 6040's normal mode, with CE sent as ECT(0)), so that the underlay can mark
    // congestion instead of dropping; the receiving device carries a CE mark back inside.
    let ecn = match ptr_at::<[u8; 2]>(ctx.data(), ctx.data_end(), ETH_HLEN) {
        // SAFETY: bounds checked by ptr_at.
        Some(p) => match unsafe { (*p)[1] } & 0x03 {
            0x03 => 0x02,
            e => e,
        },
        None => 0,
    };
    // SAFETY: plain helper call on our own skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let flags = u64::from(
        BPF_F_ADJ_ROOM_FIXED_GSO
            | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
    ) | ((ETH_HLEN as u64) << 56);
    // SAFETY: plain helper call on our own skb.
    if unsafe { bpf_skb_adjust_room(ctx.skb.skb, ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags) } != 0 {
        return Encap::Unchanged;
    }
    let len = ctx.skb.len() as usize;
    let Some(h) = ptr_at::<[u8; ETH_HLEN + ENCAP_LEN]>(ctx.data(), ctx.data_end(), 0) else {
        return Encap::Broken;
    };
    // SAFETY: bounds checked by ptr_at; the frame outlives the program run.
    let h = unsafe { &mut *h };
    // The original Ethernet header stayed in front: it becomes the inner one too.
    let (outer_eth, rest) = h.split_at_mut(ETH_HLEN);
    rest[ENCAP_LEN - ETH_HLEN..].copy_from_slice(outer_eth);
    let ip_len = (len - ETH_HLEN).min(0xffff) as u16;
    let udp_len = (len - ETH_HLEN - 20).min(0xffff) as u16;
    // The outer source port spreads flows over the underlay's ECMP paths and the remote
    // node's receive queues, in the ephemeral range as the kernel's own tunnels do.
    let sport = (((u64::from(hash ^ (hash << 16)) * 28232) >> 32) as u16).wrapping_add(32768);
    let ip = &mut rest[..20];
    ip[0] = 0x45;
    ip[1] = ecn;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    // DF clear, as the kernel's VXLAN device sends: the pods' MTU leaves room for these
    // headers on the uplink, but a narrower hop between nodes fragments the outer packet
    // (the receiving node reassembles it) rather than drop it, and its "fragmentation
    // needed" would reach no pod. Fragments are reassembled by ID: a random one, so that
    // two packets fragmented at once do not mix.
    // SAFETY: plain helper call.
    let id = unsafe { bpf_get_prandom_u32() } as u16;
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6] = 0;
    ip[7] = 0;
    ip[8] = TUNNEL_TTL;
    ip[9] = 17;
    ip[10] = 0;
    ip[11] = 0;
    ip[12..16].copy_from_slice(&local);
    ip[16..20].copy_from_slice(&remote);
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([ip[i], ip[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = &mut rest[20..28];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    // No UDP checksum over IPv4 (RFC 7348), as the device sends.
    udp[6] = 0;
    udp[7] = 0;
    let vxlan = &mut rest[28..36];
    // Flags: a valid VNI; then the 24-bit VNI and a reserved byte.
    vxlan[0..4].copy_from_slice(&[0x08, 0, 0, 0]);
    vxlan[4..8].copy_from_slice(&(vni << 8).to_be_bytes());
    Encap::Done
}
