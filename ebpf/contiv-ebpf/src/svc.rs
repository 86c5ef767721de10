//! The packet path of services (TC): conntrack first (an established or reply packet is
//! rewritten from its entry, with no service lookup), then refusals for removed backends,
//! then the frontend lookup, backend selection, DNAT (and SNAT where the reply would not
//! come back otherwise). A new flow's two conntrack entries are handed back to the caller,
//! which commits them ([`commit`]) only once NetworkPolicy allowed the flow to its backend
//! (see `policy.rs`): a denied flow leaves nothing behind.
//!
//! What reaches this path: pods' UDP (TCP is balanced at connect()), traffic from outside
//! to NodePorts, externalIPs and load-balancer IPs (through the uplink), replies of all
//! of these, and ICMP errors about them ([`related`]).

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::generated::bpf_get_prandom_u32, programs::TcContext};
use contiv_common::{CtEntry, CtKey, DatapathConfig, FragHead, SvcKey, ct_flags, ct_tcp, svc_flags, trace_step};

use crate::{
    ct, lb,
    maps::{CT, DEAD_BACKENDS, count_svc},
    nat::{self, Addr, End, L4},
    policy::{self, Transport},
    trace::Trace,
};

/// Where the packet entered the node's datapath.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a local pod (`tc_from_pod`).
    Pod,
    /// From another node (`tc_from_overlay`): the sending node balanced the flow; only
    /// conntrack applies, and this node's own frontends on its address (hostPorts).
    Overlay,
    /// From outside the cluster (`tc_from_uplink`).
    Uplink,
}

/// A new service flow's conntrack entries, not yet recorded. The caller provides the room
/// (one per program run: copying 96 bytes around would not fit the BPF stack).
pub struct NewFlow {
    pub fwd_key: CtKey,
    pub fwd: CtEntry,
    pub rev_key: CtKey,
    pub rev: CtEntry,
}

/// What the service stage did: [`outcome`] `kind`, and for TRACKED and NEW the destination
/// the packet now has. A plain struct with every byte written, not an enum with payloads:
/// LLVM copies the bytes a variant never wrote from whatever register, which the verifier
/// refuses (it did in `tc_from_uplink`).
#[derive(Clone, Copy)]
pub struct Outcome {
    pub kind: u8,
    /// TRACKED: the packet was rewritten as its entry asked.
    pub rewritten: u8,
    /// TRACKED: a reply to a client outside (it leaves by the uplink).
    pub to_uplink: u8,
    /// TRACKED: a reply in a flow the node's stack delivered to the pod (it goes back
    /// through that stack, which may have translated the flow).
    pub to_host: u8,
    pub dst: [u8; 4],
}

/// Values of [`Outcome::kind`].
pub mod outcome {
    /// Not a service flow, and conntrack does not know it: route by the original
    /// destination (a new flow: policy decides).
    pub const UNTOUCHED: u8 = 0;
    /// Conntrack knows the flow (an established packet or a reply): route to `dst`, after
    /// the rewrite its entry asked for. Allowed without a policy check.
    pub const TRACKED: u8 = 1;
    /// A new service flow, rewritten to its backend `dst`; its entries are in the caller's
    /// [`super::NewFlow`]. The caller checks policy against the backend, then records the
    /// flow with [`super::commit`] (or drops the packet).
    pub const NEW: u8 = 2;
    /// The slow path refuses it (no endpoint, a removed backend): "connection refused".
    pub const REJECT: u8 = 3;
    /// Dropped (no local endpoint under a Local traffic policy, a source outside
    /// loadBalancerSourceRanges, a failed rewrite).
    pub const DROP: u8 = 4;
    /// Dropped: the flow needed a source port of its own and none was free (counted on the
    /// service as `snat_exhausted`; the caller reports it to the monitor).
    pub const NO_PORT: u8 = 5;
}

impl Outcome {
    #[inline(always)]
    const fn of(kind: u8) -> Self {
        Self { kind, rewritten: 0, to_uplink: 0, to_host: 0, dst: [0; 4] }
    }

    /// TRACKED by the conntrack entry `e`, the packet rewritten as it asks, now for `dst`.
    #[inline(always)]
    fn tracked(e: &CtEntry, dst: [u8; 4]) -> Self {
        Self {
            kind: outcome::TRACKED,
            rewritten: u8::from(e.flags & ct_flags::NAT != 0),
            to_uplink: u8::from(e.flags & ct_flags::FROM_UPLINK != 0),
            to_host: u8::from(e.flags & ct_flags::VIA_HOST != 0),
            dst,
        }
    }

    pub const UNTOUCHED: Self = Self::of(outcome::UNTOUCHED);
    pub const REJECT: Self = Self::of(outcome::REJECT);
    pub const DROP: Self = Self::of(outcome::DROP);
    pub const NO_PORT: Self = Self::of(outcome::NO_PORT);
}

const TCP_SYN_ACK: u8 = ct_tcp::SYN | ct_tcp::ACK;

/// Ports SNAT'ed flows use on the node address: above the kernel's ephemeral range
/// (32768-60999) and the agent's masquerade range (1024-60999), so they never collide with
/// the node's own sockets or with the flows netfilter masquerades.
const SNAT_PORT_MIN: u16 = 61000;
const SNAT_PORTS: u32 = 4536;
/// Random ports a new flow tries (after the client's own) before it is dropped. A port is
/// taken with the odds of the range's fill `f` for that backend, so a flow is dropped with
/// odds `f^64`: none below 85% full (with 4 tries, one in 20 at 50%: a UDP NodePort lost
/// datagrams at a few dozen new client ports a second).
const SNAT_PROBES: u32 = 64;

/// A trace records each decision and writes nothing (no counter, no affinity).
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined into each program; a struct of them would be one more copy on a full BPF stack"
)]
pub fn process(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    src: [u8; 4],
    dst: [u8; 4],
    l4: &L4,
    origin: Origin,
    trace: Trace,
    flow: &mut MaybeUninit<NewFlow>,
) -> Outcome {
    // 1. Conntrack: an established or reply packet of a NAT'ed flow.
    let k = ct::key(src, dst, l4.sport, l4.dport, l4.proto);
    if let Some(e) = ct::lookup(&k, l4.tcp_flags, trace)
        // A pod's side of a flow the node's stack brought it (VIA_HOST: recorded from the
        // pod's SYN-ACK, which anything with a raw socket can forge) answers; a SYN alone
        // from that side opens a new connection, which policy must see.
        && !(origin == Origin::Pod
            && e.flags & ct_flags::VIA_HOST != 0
            && l4.proto == nat::IPPROTO_TCP
            && l4.tcp_flags & TCP_SYN_ACK == ct_tcp::SYN)
    {
        trace.step(trace_step::CT_HIT, e.flags, e.nat_ip, e.nat_port, 0, e.svc_id);
        return match apply(ctx, &e, src, dst, l4) {
            Some(to) => Outcome::tracked(&e, to),
            None => Outcome::DROP,
        };
    }
    trace.note(trace_step::CT_MISS, 0);
    // From another node, the sending node balanced every service it knows. What reaches
    // this node's own address untranslated can only be for a frontend of this node alone
    // (a pod's hostPort, crate::hostports in the agent): looked up exactly, served only by a
    // local backend.
    if origin == Origin::Overlay && dst != cfg.node_ip {
        return Outcome::UNTOUCHED;
    }
    // 2. A backend removed a moment ago: refuse rather than let the client hang.
    let dead = SvcKey { ip: dst, port: l4.dport, proto: l4.proto, _pad: 0 };
    // SAFETY: read-only lookup.
    if origin == Origin::Pod && unsafe { DEAD_BACKENDS.get(dead) }.is_some() {
        trace.step(trace_step::DEAD_BACKEND, 0, dst, l4.dport, u16::from(l4.proto), 0);
        return Outcome::REJECT;
    }
    // 3. A service frontend?
    let wildcard = match origin {
        Origin::Uplink => lb::is_local_node_port_addr(dst),
        Origin::Overlay => false,
        Origin::Pod => lb::is_node_port_addr(dst),
    };
    // From outside to a node address, only a connection's first packet opens a TCP flow:
    // anything else conntrack does not know (the answer to a connection the node or a
    // masqueraded pod opened from a port in the NodePort range, a flow whose entries are
    // gone) is the node's stack's, as netfilter translates only a new connection.
    if wildcard && origin == Origin::Uplink && l4.proto == nat::IPPROTO_TCP && l4.tcp_flags & TCP_SYN_ACK != ct_tcp::SYN
    {
        trace.note(trace_step::SVC_NONE, 0);
        return Outcome::UNTOUCHED;
    }
    let Some(fe) = lb::frontend(dst, l4.dport, l4.proto, wildcard) else {
        // A pod reaching a cluster IP on a port no service defines: refused (the slow path
        // answers TCP RST / ICMP port unreachable), as kube-proxy refuses it.
        if origin == Origin::Pod && !wildcard && lb::is_cluster_ip(dst) {
            trace.step(trace_step::SVC_PORT_UNDEFINED, 0, dst, l4.dport, u16::from(l4.proto), 0);
            return Outcome::REJECT;
        }
        trace.note(trace_step::SVC_NONE, 0);
        if origin == Origin::Pod {
            return plain_flow(ctx, src, dst, l4, trace, flow);
        }
        return Outcome::UNTOUCHED;
    };
    trace.step(trace_step::SVC_FRONTEND, fe.count, dst, l4.dport, fe.local_count, fe.svc_id);
    let external = fe.flags & (svc_flags::NODE_PORT | svc_flags::EXTERNAL_IP) != 0;
    if origin != Origin::Pod && !external {
        // Cluster IPs are not served to the outside.
        return Outcome::UNTOUCHED;
    }
    if !lb::source_allowed(&fe, src) {
        trace.step(trace_step::SVC_SOURCE_DENIED, 0, src, 0, 0, fe.svc_id);
        if !trace.on() {
            count_svc(fe.svc_id, |c| c.source_denied += 1);
        }
        return Outcome::DROP;
    }
    let local = match origin {
        Origin::Uplink | Origin::Overlay => fe.flags & svc_flags::ETP_LOCAL != 0,
        Origin::Pod => lb::internal_local(&fe),
    };
    let now = ct::now();
    let Some(b) = lb::select(&fe, local, u64::from(u32::from_ne_bytes(src)), now, trace) else {
        trace.step(trace_step::SVC_NO_BACKEND, u16::from(local), dst, l4.dport, 0, fe.svc_id);
        if !trace.on() {
            count_svc(fe.svc_id, |c| c.no_backend += 1);
        }
        // No endpoint at all: refused. No local one under a Local policy: dropped (a load
        // balancer's health check steers clients elsewhere; a refusal would look final).
        return if fe.count == 0 { Outcome::REJECT } else { Outcome::DROP };
    };
    if origin == Origin::Overlay && b.local == 0 {
        // Its reply would not come back through here: the node's stack decides, as before.
        return Outcome::UNTOUCHED;
    }
    // 4. The source too, where the reply would not pass back through this node otherwise,
    // or where another flow already has the addresses this one's reply would have.
    let mut snat = None;
    let (mut remap, mut clash) = (false, false);
    if origin == Origin::Pod && b.ip == src {
        // Hairpin: the pod reaches its own service and is the backend: it must see another
        // source, or it would answer itself directly.
        snat = Some(Addr { ip: cfg.gateway_ip, port: l4.sport });
    } else if origin == Origin::Uplink && b.local == 0 {
        // From outside to a backend on another node: the reply must return through here,
        // from a port of the node's own.
        snat = Some(Addr { ip: cfg.node_ip, port: 0 });
        remap = true;
    }
    let client = snat.unwrap_or(Addr { ip: src, port: l4.sport });
    let backend = Addr { ip: b.ip, port: b.port };
    if !remap
        && reply_taken(backend, client, Addr { ip: src, port: l4.sport }, Addr { ip: dst, port: l4.dport }, l4.proto)
    {
        // Another flow's replies come from the backend to this source already (the same
        // socket reaching another service with this backend, or the backend directly):
        // this flow takes another source port, as netfilter resolves such a clash.
        snat = Some(client);
        (remap, clash) = (true, true);
    }
    if remap {
        // The client's own port first (not for a clash: that one is taken), as netfilter's
        // masquerade keeps a port that is in its range and free.
        let keep = if clash { 0 } else { l4.sport };
        let Some(port) = free_port(backend, client.ip, l4.proto, keep) else {
            trace.step(trace_step::SVC_SNAT, u16::from(clash), client.ip, 0, 0, fe.svc_id);
            if !trace.on() {
                count_svc(fe.svc_id, |c| c.snat_exhausted += 1);
            }
            return Outcome::NO_PORT;
        };
        snat = Some(Addr { ip: client.ip, port });
    }
    if let Some(n) = snat {
        trace.step(trace_step::SVC_SNAT, u16::from(clash), n.ip, n.port, 0, fe.svc_id);
    }
    let from_uplink = origin == Origin::Uplink;
    new_flow(ctx, src, dst, l4, Some(backend), snat, fe.svc_id, from_uplink, flow)
}

/// A pod's new flow that no service translates: if another flow's replies come from its
/// destination to its source already (a service flow of the same socket, translated to
/// this destination), it takes another source port, as netfilter resolves such a clash;
/// otherwise UNTOUCHED.
#[inline(always)]
fn plain_flow(
    ctx: &TcContext,
    src: [u8; 4],
    dst: [u8; 4],
    l4: &L4,
    trace: Trace,
    flow: &mut MaybeUninit<NewFlow>,
) -> Outcome {
    if l4.proto != nat::IPPROTO_TCP && l4.proto != nat::IPPROTO_UDP {
        return Outcome::UNTOUCHED;
    }
    // SAFETY: read-only lookup, not refreshed.
    match unsafe { CT.get(ct::key(dst, src, l4.dport, l4.sport, l4.proto)) } {
        Some(e) if e.flags & ct_flags::NAT != 0 => {}
        _ => return Outcome::UNTOUCHED,
    }
    let to = Addr { ip: dst, port: l4.dport };
    let Some(port) = free_port(to, src, l4.proto, 0) else {
        return Outcome::NO_PORT;
    };
    trace.step(trace_step::SVC_SNAT, 1, src, port, 0, 0);
    new_flow(ctx, src, dst, l4, None, Some(Addr { ip: src, port }), 0, false, flow)
}

/// Whether the reply entry a new flow `from` -> `to`, sent on to `backend` from `client`,
/// would have belongs to another flow (a flow's own reply entry, left after its original
/// direction's was evicted, does not count: it is rewritten).
#[inline(always)]
fn reply_taken(backend: Addr, client: Addr, from: Addr, to: Addr, proto: u8) -> bool {
    // A look, not a lookup: finding a flow must not refresh it.
    // SAFETY: read-only lookup.
    match unsafe { CT.get(ct::key(backend.ip, client.ip, backend.port, client.port, proto)) } {
        None => false,
        Some(e) => {
            !(e.flags & ct_flags::REV_DNAT != 0
                && e.nat_ip == to.ip
                && e.nat_port == to.port
                && e.nat2_ip == from.ip
                && e.nat2_port == from.port)
        }
    }
}

/// A source port on `ip` for a new flow to `to` whose reply entry no flow has: `keep` (the
/// client's own port) if it lies in the SNAT range and is free, else one of
/// [`SNAT_PROBES`] random ports of the range. None when every one tried is taken.
#[inline(always)]
fn free_port(to: Addr, ip: [u8; 4], proto: u8, keep: u16) -> Option<u16> {
    let port = contiv_free_port(
        u32::from_ne_bytes(to.ip),
        u32::from_ne_bytes(ip),
        u32::from(to.port) | u32::from(proto) << 16,
        u32::from(keep),
    );
    if port == 0 { None } else { Some(port as u16) }
}

/// [`free_port`]'s search (`to_port_proto`: the destination port in bits 0-15, the
/// protocol in 16-23); 0 when no port was free.
///
/// The client's port is kept only inside the SNAT range, which is the datapath's alone, as
/// netfilter's masquerade with a port range keeps only a port in that range. Below it,
/// another user of the node's address could pick the same port to the same backend after
/// this flow took it, and conntrack (which does not see them) could not tell: the node's
/// own sockets (ephemeral 32768-60999, and ports bound on purpose, such as an NFS client's
/// below 1024) and the pods' flows the agent's nftables masquerades (1024-60999; to a
/// Service's endpoint outside the cluster, say). Their answers would match this flow's
/// reply entry and be sent to its client.
///
/// A global function: the verifier checks its loop once, not once per way into it in
/// each program (the pod path reaches it twice).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn contiv_free_port(to_ip: u32, ip: u32, to_port_proto: u32, keep: u32) -> u32 {
    // One key on the stack, its port changed per try: this function's frame is added to
    // the deepest caller's (the pod path's, 464 bytes of 512).
    let mut key = ct::key(to_ip.to_ne_bytes(), ip.to_ne_bytes(), to_port_proto as u16, 0, (to_port_proto >> 16) as u8);
    let mut free = |port: u16| {
        key.dport = port;
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "by value the key is copied: 16 more bytes of stack, past the pod path's 512"
        )]
        // SAFETY: read-only lookup (a look: finding a flow must not refresh it).
        let found = unsafe { CT.get(&key) };
        found.is_none()
    };
    if keep >= u32::from(SNAT_PORT_MIN) && keep <= u32::from(u16::MAX) && free(keep as u16) {
        return keep;
    }
    // Each try a port of its own at random: consecutive tries from one random point would
    // find the runs earlier flows left (linear probing's clusters) and fail far more often.
    for _ in 0..SNAT_PROBES {
        // SAFETY: plain helper call.
        let port = SNAT_PORT_MIN + (unsafe { bpf_get_prandom_u32() } % SNAT_PORTS) as u16;
        if free(port) {
            return u32::from(port);
        }
    }
    0
}

/// A new flow from `src` to `dst`, sent on to `backend` (DNAT) and from `snat` (SNAT):
/// the packet rewritten and both conntrack entries written to `flow`, for the caller to
/// record once policy allowed it. NEW, or DROP if a rewrite failed.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined into each program; a struct of them would be one more copy on a full BPF stack"
)]
fn new_flow(
    ctx: &TcContext,
    src: [u8; 4],
    dst: [u8; 4],
    l4: &L4,
    backend: Option<Addr>,
    snat: Option<Addr>,
    svc_id: u32,
    from_uplink: bool,
    flow: &mut MaybeUninit<NewFlow>,
) -> Outcome {
    let (mut flags, mut rflags) = (0, 0);
    let to = backend.unwrap_or(Addr { ip: dst, port: l4.dport });
    let from = snat.unwrap_or(Addr { ip: src, port: l4.sport });
    if backend.is_some() {
        flags |= ct_flags::DNAT;
        rflags |= ct_flags::REV_DNAT;
    }
    if snat.is_some() {
        flags |= ct_flags::SNAT;
        rflags |= ct_flags::REV_SNAT;
    }
    if from_uplink {
        rflags |= ct_flags::FROM_UPLINK;
    }
    let (now, touched) = (ct::now(), ct::ticks());
    let fwd = CtEntry {
        last_seen_ns: now,
        nat_ip: to.ip,
        nat_port: to.port,
        flags,
        nat2_ip: from.ip,
        nat2_port: from.port,
        tcp_flags: l4.tcp_flags,
        _pad: 0,
        svc_id,
        touched,
    };
    let rev = CtEntry {
        last_seen_ns: now,
        nat_ip: dst,
        nat_port: l4.dport,
        flags: rflags,
        nat2_ip: src,
        nat2_port: l4.sport,
        tcp_flags: 0,
        _pad: 0,
        svc_id,
        touched,
    };
    let fwd_key = ct::key(src, dst, l4.sport, l4.dport, l4.proto);
    let rev_key = ct::key(to.ip, from.ip, to.port, from.port, l4.proto);
    match apply(ctx, &fwd, src, dst, l4) {
        Some(to) => {
            flow.write(NewFlow { fwd_key, fwd, rev_key, rev });
            Outcome { kind: outcome::NEW, rewritten: 1, to_uplink: 0, to_host: 0, dst: to }
        }
        None => Outcome::DROP,
    }
}

/// A later fragment of a datagram whose first fragment carried `head`'s ports: that
/// flow, from conntrack alone (a fragment starts nothing). TRACKED, its addresses
/// rewritten as the entry asks; else UNTOUCHED (conntrack does not know the flow) or DROP
/// (a rewrite failed).
#[inline(always)]
pub fn established(ctx: &TcContext, src: [u8; 4], dst: [u8; 4], proto: u8, head: &FragHead, trace: Trace) -> Outcome {
    let Some(e) = ct::lookup(&ct::key(src, dst, head.sport, head.dport, proto), 0, trace) else {
        trace.note(trace_step::CT_MISS, 0);
        return Outcome::UNTOUCHED;
    };
    trace.step(trace_step::CT_HIT, e.flags, e.nat_ip, e.nat_port, 0, e.svc_id);
    let (from, to) = (Addr { ip: src, port: head.sport }, Addr { ip: dst, port: head.dport });
    let (new_from, new_to) = translated(&e, from, to);
    if !nat::rewrite_addresses(ctx, src, new_from.ip, dst, new_to.ip) {
        return Outcome::DROP;
    }
    Outcome::tracked(&e, new_to.ip)
}

/// A packet the node's stack sends from one of its own addresses: if it answers a flow a
/// frontend here translated to that address (a hostNetwork backend of this node, reached
/// from outside), its source goes back to the frontend (and its destination to the port
/// the client sent from, where the flow took another). TRACKED when rewritten, UNTOUCHED
/// for every other packet, DROP when the rewrite failed.
#[inline(always)]
pub fn host_reply(ctx: &TcContext, src: [u8; 4], dst: [u8; 4], l4: &L4) -> Outcome {
    let Some(e) = ct::lookup(&ct::key(src, dst, l4.sport, l4.dport, l4.proto), l4.tcp_flags, Trace::OFF) else {
        return Outcome::UNTOUCHED;
    };
    // A reply entry with a rewrite: of a service flow, or of a pod's flow that took
    // another source port (its reply goes back to the port the pod sent from).
    if e.flags & (ct_flags::REV_DNAT | ct_flags::REV_SNAT) == 0 {
        return Outcome::UNTOUCHED;
    }
    match apply(ctx, &e, src, dst, l4) {
        Some(to) => Outcome::tracked(&e, to),
        None => Outcome::DROP,
    }
}

/// Records a new service flow that policy allowed. False if the map refused (the packet
/// must then be dropped: its reply could not be translated back). A trace records nothing.
#[inline(always)]
pub fn commit(flow: &NewFlow, trace: Trace) -> bool {
    if !ct::create(&flow.fwd_key, &flow.fwd, &flow.rev_key, &flow.rev, trace) {
        return false;
    }
    if !trace.on() && flow.fwd.svc_id != 0 {
        count_svc(flow.fwd.svc_id, |c| c.connections += 1);
    }
    true
}

/// Rewrites a packet as its conntrack entry says: the destination it goes to now. `None`
/// if a rewrite failed (drop it).
#[inline(always)]
fn apply(ctx: &TcContext, e: &CtEntry, src: [u8; 4], dst: [u8; 4], l4: &L4) -> Option<[u8; 4]> {
    let (from, to) = (Addr { ip: src, port: l4.sport }, Addr { ip: dst, port: l4.dport });
    let (new_from, new_to) = translated(e, from, to);
    if new_to != to && !nat::rewrite(ctx, l4, End::Dst, dst, new_to.ip, l4.dport, new_to.port) {
        return None;
    }
    if new_from != from && !nat::rewrite(ctx, l4, End::Src, src, new_from.ip, l4.sport, new_from.port) {
        return None;
    }
    Some(new_to.ip)
}

/// What a conntrack entry makes of its flow's packets travelling `from` -> `to`: their new
/// source and destination. The one reading of the entry's rewrite flags.
#[inline(always)]
fn translated(e: &CtEntry, from: Addr, to: Addr) -> (Addr, Addr) {
    let (mut new_from, mut new_to) = (from, to);
    if e.flags & ct_flags::DNAT != 0 {
        new_to = Addr { ip: e.nat_ip, port: e.nat_port };
    }
    if e.flags & ct_flags::SNAT != 0 {
        new_from = Addr { ip: e.nat2_ip, port: e.nat2_port };
    }
    if e.flags & ct_flags::REV_DNAT != 0 {
        new_from = Addr { ip: e.nat_ip, port: e.nat_port };
    }
    if e.flags & ct_flags::REV_SNAT != 0 {
        new_to = Addr { ip: e.nat2_ip, port: e.nat2_port };
    }
    (new_from, new_to)
}

/// An ICMP error (port unreachable, fragmentation needed, time exceeded) about a flow this
/// node translated: translated back like the flow's own packets, so that it reaches the
/// socket that sent what it quotes. A UDP client of a ClusterIP whose backend has no
/// socket on the port reads "connection refused", and path MTU discovery works through
/// NodePorts. `None` if it is not one (the caller goes on as for any other packet: an
/// error about an untranslated flow passes on its tracked flow, unchanged), and for an
/// error not addressed to the quoted packet's sender (`policy::misaddressed`: no flow).
#[inline(always)]
pub fn related(ctx: &TcContext, t: &Transport, src: [u8; 4], dst: [u8; 4], trace: Trace) -> Option<Outcome> {
    if t.kind != policy::kind::RELATED {
        return None;
    }
    let k = t.related_key();
    // SAFETY: read-only lookup, copied; not refreshed (an error is not traffic of the flow).
    let e = *unsafe { CT.get(k) }?;
    if e.flags & ct_flags::NAT == 0 {
        return None;
    }
    trace.step(trace_step::CT_HIT, e.flags, e.nat_ip, e.nat_port, 0, e.svc_id);
    // The flow's packets in the key's direction, and what they become.
    let (from, to) = (Addr { ip: k.src, port: k.sport }, Addr { ip: k.dst, port: k.dport });
    let (new_from, new_to) = translated(&e, from, to);
    if !nat::rewrite_icmp_error(ctx, src, dst, from, to, new_from, new_to) {
        return Some(Outcome::DROP);
    }
    Some(Outcome {
        kind: outcome::TRACKED,
        rewritten: 1,
        to_uplink: u8::from(e.flags & ct_flags::FROM_UPLINK != 0),
        to_host: 0,
        // The error is addressed to the quoted packet's sender, `to` (`policy::transport`).
        dst: new_to.ip,
    })
}
