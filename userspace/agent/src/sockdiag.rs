//! The node's connected UDP sockets, through netlink `sock_diag`: listed with their cookies,
//! and aborted (`SOCK_DESTROY`).
//!
//! A node process's connected UDP socket to a service was balanced once, at connect(): it
//! keeps that backend for as long as it lives. When the backend leaves the service while its
//! pod lives on, nothing on the packet path would move the socket. The agent aborts it
//! instead (the kernel's `udp_abort`: the socket is disconnected and its next call fails
//! with ECONNABORTED), and the client's next connect() is balanced anew; this is what
//! Cilium does. The agent finds those sockets by cookie in SOCK_UDP_BACKEND, where
//! `sock_connect4` notes which service port and backend each was balanced to (and
//! `sock_release` forgets it). (Not from the socket's own SOCK_ORIGIN storage:
//! `sock_diag` reports BPF socket storage (`INET_DIAG_REQ_SK_BPF_STORAGES`) only for
//! connection-oriented sockets; the kernel's `inet_sk_diag_fill` finishes a UDP socket's
//! answer before it. Tried on 6.18.)
//!
//! Lists and aborts only sockets of the namespace the agent runs in: the node's (pods' UDP
//! is balanced per packet and needs none of this). Needs `CONFIG_INET_DIAG_DESTROY` to
//! abort; without it [`abort`] fails with EOPNOTSUPP.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// A connected UDP socket's state, in the TCP state numbering sock_diag uses.
const TCP_ESTABLISHED: u32 = 1;

const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` up to and including its id.
const MSG_ID_END: usize = 4 + SOCKID_LEN;

/// One connected UDP socket of this namespace: its peer and its cookie (the one BPF's
/// `bpf_get_socket_cookie` gives), with the kernel's id to abort it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSock {
    pub local: (Ipv4Addr, u16),
    pub peer: (Ipv4Addr, u16),
    pub cookie: u64,
    /// `struct inet_diag_sockid` as the kernel reported it.
    id: [u8; SOCKID_LEN],
}

fn netlink() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just created and nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A request: netlink header, then `inet_diag_req_v2` for IPv4 UDP.
fn request(kind: u16, flags: u16, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills in ours
    b.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_UDP as u8, 0, 0]);
    b.extend_from_slice(&states.to_ne_bytes());
    b.extend_from_slice(id);
    b
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0, no groups).
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `msg` and `to` are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Reads answers until `DONE` (or the ACK of a request), giving each message's type and
/// payload to `each`. An error message ends it with its errno (0 is an ACK).
fn receive(fd: &OwnedFd, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut rest = &buf[..n as usize];
        if rest.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sock_diag: netlink socket closed"));
        }
        while rest.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if len < NLMSG_HDR || len > rest.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "sock_diag: truncated netlink message"));
            }
            let payload = &rest[NLMSG_HDR..len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = payload.get(0..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                    return if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-errno)) };
                }
                _ => each(kind, payload),
            }
            // Messages are 4-byte aligned.
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

/// Every connected IPv4 UDP socket of this network namespace.
pub fn connected_udp4() -> io::Result<Vec<UdpSock>> {
    let fd = netlink()?;
    send(&fd, &request(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, 1 << TCP_ESTABLISHED, &[0; SOCKID_LEN]))?;
    let mut out = Vec::new();
    receive(&fd, |kind, p| {
        if kind != SOCK_DIAG_BY_FAMILY || p.len() < MSG_ID_END || p[0] != libc::AF_INET as u8 {
            return;
        }
        let id: [u8; SOCKID_LEN] = p[4..MSG_ID_END].try_into().unwrap();
        out.push(parse_id(id));
    })?;
    Ok(out)
}

/// The fields of an `inet_diag_sockid`: ports big-endian, addresses in network order,
/// the cookie as two host-order halves, low first.
fn parse_id(id: [u8; SOCKID_LEN]) -> UdpSock {
    let port = |o: usize| u16::from_be_bytes([id[o], id[o + 1]]);
    let ip = |o: usize| Ipv4Addr::new(id[o], id[o + 1], id[o + 2], id[o + 3]);
    let half = |o: usize| u64::from(u32::from_ne_bytes(id[o..o + 4].try_into().unwrap()));
    UdpSock { local: (ip(4), port(0)), peer: (ip(20), port(2)), cookie: half(40) | (half(44) << 32), id }
}

/// Aborts a socket [`connected_udp4`] listed (the kernel checks its cookie, so a socket
/// closed meanwhile, whose addresses another took, is left alone: ENOENT).
pub fn abort(sock: &UdpSock) -> io::Result<()> {
    let fd = netlink()?;
    send(&fd, &request(SOCK_DESTROY, NLM_F_ACK, 1 << TCP_ESTABLISHED, &sock.id))?;
    receive(&fd, |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sockid_reads_as_the_kernel_lays_it_out() {
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&5353u16.to_be_bytes());
        id[2..4].copy_from_slice(&53u16.to_be_bytes());
        id[4..8].copy_from_slice(&[192, 168, 1, 2]);
        id[20..24].copy_from_slice(&[10, 96, 0, 10]);
        id[40..44].copy_from_slice(&0x89ab_cdefu32.to_ne_bytes());
        id[44..48].copy_from_slice(&0x0123_4567u32.to_ne_bytes());
        let s = parse_id(id);
        assert_eq!(s.local, (Ipv4Addr::new(192, 168, 1, 2), 5353));
        assert_eq!(s.peer, (Ipv4Addr::new(10, 96, 0, 10), 53));
        assert_eq!(s.cookie, 0x0123_4567_89ab_cdef);
        let r = request(SOCK_DESTROY, NLM_F_ACK, 2, &id);
        assert_eq!(r.len(), NLMSG_HDR + REQ_LEN);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize, r.len());
        assert_eq!(&r[NLMSG_HDR + 8..], &id[..]);
    }

    /// In a network namespace of its own (a thread's, gone with it): a connected UDP socket
    /// is listed with the cookie SO_COOKIE gives, and aborting it disconnects it and fails
    /// its next read with ECONNABORTED; an unconnected one is not listed.
    #[test]
    fn connected_udp_sockets_are_listed_by_cookie_and_aborted() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) (needs root)");
            let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
            assert!(up.success());
            let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let loose = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            client.connect(server.local_addr().unwrap()).unwrap();
            let port = |s: &std::net::UdpSocket| s.local_addr().unwrap().port();
            let mut cookie = 0u64;
            let mut len = 8u32;
            // SAFETY: SO_COOKIE writes a u64 into `cookie`.
            let rc = unsafe {
                libc::getsockopt(
                    client.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_COOKIE,
                    (&raw mut cookie).cast(),
                    &raw mut len,
                )
            };
            assert_eq!(rc, 0);

            let listed = connected_udp4().unwrap();
            assert!(!listed.iter().any(|s| s.local.1 == port(&loose)), "{listed:?}");
            let ours = listed.iter().find(|s| s.local.1 == port(&client)).expect("the connected socket is listed");
            assert_eq!(ours.peer, (Ipv4Addr::LOCALHOST, port(&server)));
            assert_eq!(ours.cookie, cookie);

            abort(ours).expect("SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY)");
            client.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
            let e = client.recv(&mut [0u8; 8]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
            assert!(client.peer_addr().is_err(), "an aborted socket is disconnected");
            assert!(connected_udp4().unwrap().iter().all(|s| s.cookie != cookie));
            // Gone already: the kernel finds no socket with that id and cookie.
            assert_eq!(abort(ours).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        })
        .join()
        .unwrap();
    }
}
