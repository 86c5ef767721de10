//! Serving the agent's HTTP endpoints (the status port, the proxy health server) with the
//! limits a port on the node's address needs, since any pod can connect to it: a
//! connection that does not send a whole request head within [`HEADER_TIMEOUT`] (an idle
//! keep-alive one included) is closed, at most [`MAX_CONNECTIONS`] are served at once
//! (more wait in the listen backlog), and one peer address holds at most
//! [`MAX_PER_PEER`] of them (more are closed at once), so one pod cannot hold every slot
//! and starve kubelet's probes. Without these, clients that connect and send nothing hold
//! a task and a socket each, for ever, in the process that also serves the CNI.
//! The healthCheckNodePort servers have their own (crate::healthcheck).

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo};
use hyper_util::rt::{TokioIo, TokioTimer};
use tower::ServiceExt;

/// How long a client may take to send a request's head, or stay idle between requests.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections one peer address may hold at once.
pub const MAX_PER_PEER: usize = 16;

/// Serves `router` on `listener` until `shutdown` resolves; requests carry the peer's
/// address as axum's [`ConnectInfo`]. Open connections are asked to close at shutdown
/// (a response in progress, such as a monitor stream, ends with the process).
pub async fn serve(listener: tokio::net::TcpListener, router: Router, shutdown: impl Future<Output = ()>) {
    serve_with(listener, router, shutdown, HEADER_TIMEOUT, Limits { total: MAX_CONNECTIONS, per_peer: MAX_PER_PEER })
        .await;
}

/// How many connections are served at once, in all and from one peer address.
#[derive(Debug, Clone, Copy)]
struct Limits {
    total: usize,
    per_peer: usize,
}

/// Connections open per peer address; an entry goes with its last connection.
#[derive(Default)]
struct PerPeer(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection counted for its peer, until dropped.
struct PeerSlot {
    peers: Arc<PerPeer>,
    ip: std::net::IpAddr,
}

impl PerPeer {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot { peers: self.clone(), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
    header_timeout: Duration,
    limits: Limits,
) {
    let max_connections = limits.total;
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let peers = Arc::new(PerPeer::default());
    let mut refused_peer: Option<std::net::IpAddr> = None;
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut warned_full = false;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !warned_full {
                    log::warn!(
                        "HTTP on {:?}: {max_connections} connections open; more wait until one closes",
                        listener.local_addr().ok()
                    );
                    warned_full = true;
                }
                tokio::select! {
                    p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: not a reason to stop serving.
                    log::warn!("HTTP: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if permits.available_permits() > max_connections / 2 {
            warned_full = false;
        }
        let Some(slot) = peers.take(peer.ip(), limits.per_peer) else {
            if refused_peer != Some(peer.ip()) {
                log::warn!("HTTP: {} holds {} connections already; closing its next ones", peer.ip(), limits.per_peer);
                refused_peer = Some(peer.ip());
            }
            continue; // the stream and the permit go here
        };
        let router = router.clone();
        let mut closed = closed.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _slot = slot;
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = closed.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
    let _ = closing.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(total: usize, per_peer: usize) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let router = Router::new().route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("{}\n", peer.ip()) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_with(
            listener,
            router,
            async move {
                let _ = stopped.await;
            },
            Duration::from_millis(500),
            Limits { total, per_peer },
        ));
        (addr, stop)
    }

    async fn get_peer(addr: SocketAddr) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut answer)).await.unwrap().unwrap();
        answer
    }

    /// A client that sends part of a request head, or nothing, is closed after the header
    /// timeout; requests carry the peer's address.
    #[tokio::test]
    async fn a_silent_or_slow_client_is_closed_and_requests_see_their_peer() {
        let (addr, _stop) = server(8, 8).await;
        let answer = get_peer(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("127.0.0.1\n"), "{answer}");
        for sent in [&b""[..], b"GET /peer HTTP/1.1\r\nHost: x\r\n"] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(sent).await.unwrap();
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
            assert!(read.is_ok(), "a client that sent {sent:?} is still held after 5 s");
        }
    }

    /// Past the limit, a connection waits until one closes; it is served then.
    #[tokio::test]
    async fn connections_past_the_limit_wait_for_a_free_one() {
        let (addr, _stop) = server(2, 2).await;
        let idle: Vec<_> = futures::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(addr))).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Both slots are held by silent clients: the third is answered once the header
        // timeout closed one of them (0.5 s here), not before.
        let t = std::time::Instant::now();
        let answer = get_peer(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(t.elapsed() >= Duration::from_millis(300), "served past the limit after {:?}", t.elapsed());
        drop(idle);
    }

    /// A peer past its own limit is closed at once; another peer is served meanwhile.
    #[tokio::test]
    async fn one_peer_cannot_hold_every_connection() {
        let (addr, _stop) = server(8, 2).await;
        let idle: Vec<_> = futures::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(addr))).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut rest = Vec::new();
        let t = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut rest)).await.unwrap().ok();
        assert!(t.elapsed() < Duration::from_millis(400), "closed at once, not by the header timeout");
        // 127.0.0.2 is another peer (loopback answers its whole /8).
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut c = other.connect(addr).await.unwrap();
        c.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut answer)).await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("127.0.0.2\n"), "{answer}");
        drop(idle);
    }
}
