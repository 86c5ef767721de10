//! Socket-level service balancing (cgroup `sock_addr` programs at the host's cgroup2 root):
//! `connect()` to a service frontend is rewritten to a backend before the first packet
//! exists, so a service connection costs one lookup per connection and none per packet, and
//! `getpeername()` still shows the frontend.
//!
//! Every agent on a machine attaches its programs at the same root, so each acts only on
//! sockets of the network namespaces it serves (`NODE_NETNS`: its pods and its node).
//! TCP is balanced here for pods and the node; UDP only for the node's own sockets (pods'
//! UDP is translated per packet, where a backend change can be followed and answers are
//! un-NAT'ed without a reverse lookup in every recvmsg).
//!
//! What a balanced socket asked for is kept where getpeername()/recvmsg() find it: a
//! connected socket's in its own storage (SOCK_ORIGIN), which dies with it; an unconnected
//! UDP socket's per backend, keyed by its cookie (SOCK_REVNAT, LRU), since each sendmsg()
//! may name another service. The same map keeps, per such socket and service address, the
//! backend its datagrams go to while that backend stays in the service (sticky entries).
//! So the usual socket, which nobody balanced (every accepted one, for a start), costs
//! getpeername() one test of its empty storage list.
//!
//! A connected UDP socket of the node is also noted by cookie in SOCK_UDP_BACKEND, with
//! its service port and backend: the agent finds it there and aborts it when that backend
//! leaves the service (see the agent's `sockdiag`), so the client's next connect() is
//! balanced anew. The note goes when the socket connects again or closes (`sock_release`),
//! so the map holds live sockets only and loses none to eviction.

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use contiv_common::{SockOrigin, SockRevNat, SockRevNatKey, SockUdpBackend, config_flags, revnat_kind, svc_flags};

use crate::{
    ct::now,
    lb,
    maps::{NODE_NETNS, SOCK_ORIGIN, SOCK_REVNAT, SOCK_UDP_BACKEND, config, count_sock, count_svc},
    nat::{IPPROTO_TCP, IPPROTO_UDP},
};

/// NODE_NETNS value of the node's own namespace (its pods' are 1).
const NETNS_NODE: u8 = 2;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
const LOOPBACK: [u8; 4] = [127, 0, 0, 1];
/// A connected UDP socket's state (the kernel numbers UDP states as TCP's).
const TCP_ESTABLISHED: u32 = 1;

/// Allow the call (translated or not).
const ALLOW: i32 = 1;
/// Refuse the call; `bpf_set_retval` chose the errno.
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Call::Connect, Family::V4)
}

/// An IPv6 socket's connect(): balanced when it names an IPv4-mapped address (the kernel
/// then connects over IPv4 without running connect4).
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Call::Connect, Family::V6)
}

/// The socket of a sock_addr context.
#[inline(always)]
fn socket(ctx: &SockAddrContext) -> *mut aya_ebpf::bindings::bpf_sock {
    // SAFETY: a field of the context, valid for the program's run.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
}

/// Also an IPv6 socket's datagram to an IPv4-mapped address: the kernel sends it as IPv4.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Call::SendMsg, Family::V4)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4)
}

/// An IPv6 socket's datagram from an IPv4 address (IPv4-mapped).
#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse_connected(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse_connected(&ctx, Family::V6);
    ALLOW
}

/// A UDP answer's source: a connected socket's, then an unconnected one's.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    if !reverse_connected(ctx, family) {
        reverse_unconnected(ctx, family);
    }
    ALLOW
}

/// The address family of a program's `sock_addr` (each program reads only its own
/// family's fields: the verifier refuses the other's).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// `::ffff:0:0/96` as the third 32-bit word of an IPv6 address, in network order.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4 address and port (host order) of the call; `None` for an IPv6 socket's real
/// IPv6 address.
#[inline(always)]
fn user_addr(ctx: &SockAddrContext, family: Family) -> Option<([u8; 4], u16)> {
    let sa = ctx.sock_addr;
    // SAFETY: fields of the context valid for this program's family.
    unsafe {
        let port = u16::from_be((*sa).user_port as u16);
        match family {
            Family::V4 => Some(((*sa).user_ip4.to_ne_bytes(), port)),
            Family::V6 => {
                let (w0, w1, w2) = ((*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2]);
                (w0 == 0 && w1 == 0 && w2 == V4_MAPPED).then(|| ((*sa).user_ip6[3].to_ne_bytes(), port))
            }
        }
    }
}

/// Rewrites the call's address (an IPv6 socket's stays IPv4-mapped).
#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, family: Family, ip: [u8; 4], port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: writable fields of the context, of this program's family.
    unsafe {
        match family {
            Family::V4 => (*sa).user_ip4 = u32::from_ne_bytes(ip),
            Family::V6 => (*sa).user_ip6[3] = u32::from_ne_bytes(ip),
        }
        (*sa).user_port = u32::from(port.to_be());
    }
}

/// A closing UDP socket's SOCK_UDP_BACKEND note goes with it (most have none: the delete
/// finds nothing). Every agent's program sees every socket; a cookie names one socket on
/// the machine, so a note is only ever its own node's.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: fields of the context's socket, valid for the program's run.
    if unsafe { (*ctx.sock).protocol } == u32::from(IPPROTO_UDP) {
        // SAFETY: plain helper call on our context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
        let _ = SOCK_UDP_BACKEND.remove(cookie);
    }
    ALLOW
}

/// Whether the node's own `127.0.0.1:<nodePort>` is balanced (unless `nodePortAddresses`
/// leaves the loopback address out).
#[inline(always)]
fn loopback_node_ports() -> bool {
    config().is_some_and(|c| c.flags & config_flags::NO_LOOPBACK_NODE_PORTS == 0)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Connect,
    SendMsg,
}

/// A sticky entry's stamp: CLOCK_MONOTONIC in units of 2^30 ns (about a second).
const STAMP_SHIFT: u32 = 30;

/// Whether a sticky entry last used at `then` is still in force at `now` (stamps): within
/// the configured UDP timeout (0: no limit).
#[inline(always)]
fn fresh(then: u16, now: u16) -> bool {
    let secs = config().map_or(0, |c| c.udp_sticky_s);
    if secs == 0 {
        return true;
    }
    // Rounded up: the entry holds for at least the timeout (a stamp taken just before a
    // tick reads one unit older at once).
    let units = ((u64::from(secs) * 1_000_000_000).div_ceil(1 << STAMP_SHIFT)).min(u64::from(u16::MAX));
    u64::from(now.wrapping_sub(then)) <= units
}

/// Which of this node's namespaces the socket lives in, if any.
#[inline(always)]
fn served(ctx: &SockAddrContext) -> Option<(u8, u64)> {
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: read-only lookup.
    unsafe { NODE_NETNS.get(cookie) }.map(|k| (*k, cookie))
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, call: Call, family: Family) -> i32 {
    let Some((kind, netns)) = served(ctx) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    // SAFETY: the context is valid for the program's run; a field of bpf_sock_addr.
    let proto = unsafe { (*sa).protocol as u8 };
    // A connect() of a UDP socket of the node: its cookie names its SOCK_UDP_BACKEND note.
    let mut udp_cookie = 0;
    if call == Call::Connect {
        // A socket connected again (UDP) forgets the service of its earlier connect(); the
        // translation below records the new one, if it is one. Usually there is none, and
        // the helper answers -ENOENT after the same look a lookup would take.
        // SAFETY: the socket of this program's context.
        let _ = unsafe { SOCK_ORIGIN.delete(socket(ctx)) };
        if proto == IPPROTO_UDP && kind == NETNS_NODE {
            // SAFETY: plain helper call on our context.
            udp_cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
            let _ = SOCK_UDP_BACKEND.remove(udp_cookie);
        }
    }
    if !(proto == IPPROTO_TCP || (proto == IPPROTO_UDP && kind == NETNS_NODE)) {
        return ALLOW;
    }
    let Some((ip, port)) = user_addr(ctx, family) else {
        return ALLOW;
    };
    // 0.0.0.0 is the caller's own host to connect(): the node's loopback (balanced like
    // 127.0.0.1), or a pod's own; never the every-address key NodePorts are kept under.
    let unspecified = ip == [0; 4];
    let loopback = (ip == LOOPBACK || unspecified) && kind == NETNS_NODE && loopback_node_ports();
    let wildcard = loopback || (!unspecified && lb::is_node_port_addr(ip));
    if unspecified && !wildcard {
        return ALLOW;
    }
    let Some(fe) = lb::frontend(ip, port, proto, wildcard) else {
        // A cluster IP on a port no service defines: refused at once, not routed away.
        if !wildcard && lb::is_cluster_ip(ip) {
            // SAFETY: plain helper call.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return REJECT;
        }
        return ALLOW;
    };
    // loadBalancerSourceRanges: a pod's source is checked per packet (`tc_from_pod`), where
    // it is known. The node's own sockets are balanced when the ranges hold the node's
    // address, as kube-proxy admits the node then; otherwise they go on untranslated, to
    // the balancer itself.
    if fe.flags & svc_flags::SOURCE_RANGES != 0
        && !(kind == NETNS_NODE && config().is_some_and(|c| lb::source_allowed(&fe, c.node_ip)))
    {
        return ALLOW;
    }
    // A UDP socket connected to this very address that names it again in sendto(): the
    // datagram goes where the socket is connected, the only peer whose answers it hears.
    if call == Call::SendMsg {
        // SAFETY: the socket's storage; a lookup, nothing created.
        let p = unsafe { SOCK_ORIGIN.get_ptr_mut(ctx) };
        // SAFETY: that storage, copied.
        if !p.is_null()
            && let o = unsafe { *p }
            && o.frontend_ip == ip
            && o.frontend_port == port
        {
            set_user_addr(ctx, family, o.backend_ip, o.backend_port);
            return ALLOW;
        }
    }
    // From inside the cluster every backend is usable (a pod reaching a load-balancer IP
    // must succeed even where externalTrafficPolicy Local has no local backend), except
    // ClusterIP traffic under internalTrafficPolicy Local.
    let local = lb::internal_local(&fe);
    // An unconnected UDP socket's datagrams to one service address keep going to one
    // backend while it stays in the service (netfilter's conntrack keeps a UDP flow on one
    // backend): a protocol with several datagrams per exchange (QUIC, DNS over a shared
    // socket) would break if each went elsewhere. ClientIP affinity decides for itself.
    // It lets go after the conntrack UDP timeout without a datagram there, as netfilter
    // forgets an idle flow.
    let t = now();
    let stamp = (t >> STAMP_SHIFT) as u16;
    let mut sticky = None;
    let mut cookie = 0;
    if call == Call::SendMsg {
        // SAFETY: plain helper call on our context.
        cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    }
    let sticky_key = SockRevNatKey { cookie, ip, port, kind: revnat_kind::STICKY };
    let sticks = call == Call::SendMsg && fe.flags & svc_flags::AFFINITY == 0;
    if sticks
        // SAFETY: read-only lookup, copied.
        && let Some(s) = unsafe { SOCK_REVNAT.get(sticky_key) }.copied()
        && s.svc_id == fe.svc_id
        && fresh(s.stamp, stamp)
        && let Some(b) = lb::still_backend(&fe, local, s.ip, s.port)
    {
        if s.stamp != stamp {
            let _ = SOCK_REVNAT.insert(sticky_key, SockRevNat { stamp, ..s }, 0);
        }
        sticky = Some(b);
    }
    let Some(b) = sticky.or_else(|| lb::select(&fe, local, netns, t, crate::trace::Trace::OFF)) else {
        count_svc(fe.svc_id, |c| c.no_backend += 1);
        // No endpoint at all: "connection refused" at once. Only local ones missing
        // (internalTrafficPolicy Local): the traffic is dropped by design; fail the call.
        let err = if fe.count == 0 { ECONNREFUSED } else { EHOSTUNREACH };
        // SAFETY: plain helper call.
        unsafe { bpf_set_retval(-err) };
        return REJECT;
    };
    if call == Call::Connect {
        let mut origin = SockOrigin { frontend_ip: ip, backend_ip: b.ip, frontend_port: port, backend_port: b.port };
        // SAFETY: the socket of this program's context; creates its storage with `origin`
        // (sock_connect4 removed any earlier one). If it cannot (memory), getpeername()
        // shows the backend.
        let _ = unsafe { SOCK_ORIGIN.get_or_insert_ptr_mut(ctx, Some(&mut origin)) };
    }
    if call == Call::SendMsg {
        // An unconnected UDP socket's answers are shown through this entry.
        let rk = SockRevNatKey { cookie, ip: b.ip, port: b.port, kind: revnat_kind::REVERSE };
        let _ = SOCK_REVNAT.insert(rk, SockRevNat { ip, port, stamp: 0, svc_id: fe.svc_id }, 0);
        if sticks && sticky.is_none() {
            let v = SockRevNat { ip: b.ip, port: b.port, stamp, svc_id: fe.svc_id };
            let _ = SOCK_REVNAT.insert(sticky_key, v, 0);
        }
    } else if proto == IPPROTO_UDP {
        // A connected one's are shown through its storage; this note lets the agent abort
        // it when its backend leaves this service (the socket would keep it otherwise).
        // A full map notes nothing: counted, and that socket keeps its backend.
        let note = SockUdpBackend { backend_ip: b.ip, backend_port: b.port, _pad: 0, svc_id: fe.svc_id };
        if SOCK_UDP_BACKEND.insert(udp_cookie, note, 0).is_err() {
            count_sock(|c| c.udp_untracked += 1);
        }
    }
    set_user_addr(ctx, family, b.ip, b.port);
    count_svc(fe.svc_id, |c| c.connections += 1);
    ALLOW
}

/// Shows a balanced connected socket's service as its peer; true if it did. Needs no
/// look at NODE_NETNS: only this node's sockets have storage in this node's map.
#[inline(always)]
fn reverse_connected(ctx: &SockAddrContext, family: Family) -> bool {
    // SAFETY: the socket of this program's context; a lookup, nothing created.
    let p = unsafe { SOCK_ORIGIN.get_ptr_mut(ctx) };
    if p.is_null() {
        return false;
    }
    // SAFETY: this socket's storage, copied.
    let o = unsafe { *p };
    if user_addr(ctx, family) != Some((o.backend_ip, o.backend_port)) {
        return false;
    }
    set_user_addr(ctx, family, o.frontend_ip, o.frontend_port);
    true
}

/// Shows the service an unconnected UDP socket of the node sent to as the source of its
/// answer (pods' UDP is translated per packet, never here).
#[inline(always)]
fn reverse_unconnected(ctx: &SockAddrContext, family: Family) {
    // A connected socket hears only its peer, which its storage speaks for: a note its
    // earlier unconnected sends left here must not rename a peer it connected to directly.
    // SAFETY: a field of the context's socket, valid for the program's run.
    if unsafe { (*socket(ctx)).state } == TCP_ESTABLISHED {
        return;
    }
    if !matches!(served(ctx), Some((NETNS_NODE, _))) {
        return;
    }
    let Some((ip, port)) = user_addr(ctx, family) else {
        return;
    };
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rk = SockRevNatKey { cookie, ip, port, kind: revnat_kind::REVERSE };
    // SAFETY: read-only lookup, copied.
    if let Some(orig) = unsafe { SOCK_REVNAT.get(rk) }.copied() {
        set_user_addr(ctx, family, orig.ip, orig.port);
    }
}
