//! The overlay: one flow-based VXLAN device per node (`collect_md`), no per-peer devices and
//! no FDB entries. A packet for another node gets its tunnel key here (remote node, VNI,
//! TTL) and is redirected to the device's egress; the kernel's VXLAN driver builds the outer
//! Ethernet/IPv4/UDP/VXLAN headers. Decapsulated packets arrive at the device's ingress with
//! the key still attached, so the receiver knows which node sent them.

use aya_ebpf::{
    bindings::{BPF_F_ZERO_CSUM_TX, bpf_tunnel_key},
    helpers::generated::{bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};

/// TTL of the outer header.
const TUNNEL_TTL: u8 = 64;

/// Attaches the tunnel key for `node_ip` (network byte order) to the skb. False if the
/// kernel refused (the packet must then be dropped: a collect_md device cannot send it).
#[inline(always)]
pub fn set_tunnel(ctx: &TcContext, node_ip: [u8; 4], vni: u32) -> bool {
    // SAFETY: an all-zero bpf_tunnel_key is valid (plain integers and unions of integers).
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    // The helper takes the remote address in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(node_ip);
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

/// The sending node's underlay address (network byte order) of a decapsulated packet, or
/// `None` if the skb carries no tunnel key.
#[inline(always)]
pub fn tunnel_remote(ctx: &TcContext) -> Option<[u8; 4]> {
    // SAFETY: as above.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: helper call writing into a stack value of the size passed.
    let rc = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0) };
    if rc != 0 {
        return None;
    }
    // SAFETY: IPv4 tunnels fill remote_ipv4 (host byte order).
    Some(unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes())
}
