//! NetworkPolicy probing for the cluster in a box, the way the upstream conformance suites
//! (e2e netpol, cyclonus) do it: every pod serves TCP and UDP on a few ports, probes connect
//! from pod to pod (a fresh source port each time, so each probe is a new flow), and a whole
//! truth table is compared with what the policies say, retried until it matches or a
//! deadline passes (policy changes propagate asynchronously).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::cluster::{ClusterBox, enter};

/// Transport of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// How long a probe waits for its answer (the box answers in well under a millisecond;
/// a dropped SYN or datagram simply never answers).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1200);

/// Echo servers (TCP and UDP) in some namespaces; stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    fds: Vec<i32>,
    threads: Vec<std::thread::JoinHandle<()>>,
    // Keep the sockets open as long as the servers run.
    _tcp: Vec<Arc<TcpListener>>,
    _udp: Vec<Arc<UdpSocket>>,
}

impl Servers {
    pub fn new() -> Self {
        Self { stop: Arc::new(AtomicBool::new(false)), fds: vec![], threads: vec![], _tcp: vec![], _udp: vec![] }
    }

    /// TCP and UDP echo on `ports` of every address of namespace `ns`.
    pub fn serve(&mut self, ns: &str, ports: &[u16]) {
        for &port in ports {
            let (tcp, udp) = enter(ns, move || {
                (
                    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap_or_else(|e| panic!("bind TCP {port}: {e}")),
                    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap_or_else(|e| panic!("bind UDP {port}: {e}")),
                )
            });
            let (tcp, udp) = (Arc::new(tcp), Arc::new(udp));
            self.fds.push(tcp.as_raw_fd());
            self.fds.push(udp.as_raw_fd());
            let (t, stop) = (tcp.clone(), self.stop.clone());
            self.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = t.accept() else { return };
                    std::thread::spawn(move || {
                        // Long enough for the tests that keep a connection open across policy changes.
                        let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
                        let mut buf = [0u8; 256];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }));
            let (u, stop) = (udp.clone(), self.stop.clone());
            self.threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = u.recv_from(&mut buf) else { return };
                    let _ = u.send_to(&buf[..n], peer);
                }
            }));
            self._tcp.push(tcp);
            self._udp.push(udp);
        }
    }
}

impl Default for Servers {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for fd in &self.fds {
            // SAFETY: shutdown(2) on sockets we own; it wakes the blocked accept/recv.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One probe: from namespace `ns` to `dst:port`; true if the echo came back.
pub fn probe(ns: &str, dst: Ipv4Addr, port: u16, proto: Proto) -> bool {
    let addr = SocketAddr::from((dst, port));
    enter(ns, move || match proto {
        Proto::Tcp => {
            let Ok(mut s) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else { return false };
            let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
            let mut buf = [0u8; 5];
            s.write_all(b"probe").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"probe"
        }
        Proto::Udp => {
            let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else { return false };
            let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
            let mut buf = [0u8; 16];
            s.send_to(b"probe", addr).is_ok() && matches!(s.recv_from(&mut buf), Ok((5, _)))
        }
    })
}

/// A probe of a truth table: `from` (a pod id, node name, `external`...) to `to`'s address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Case {
    pub from: String,
    pub to: String,
    pub dst: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {} ({}) {}/{}", self.from, self.to, self.dst, self.proto, self.port)
    }
}

/// Runs every probe at once (one thread each); results in order.
pub fn probe_all(b: &ClusterBox, cases: &[Case]) -> Vec<bool> {
    let handles: Vec<_> = cases
        .iter()
        .map(|c| {
            let ns = b.netns_of(&c.from).unwrap_or_else(|| panic!("no {} in the box", c.from));
            let (dst, port, proto) = (c.dst, c.port, c.proto);
            std::thread::spawn(move || probe(&ns, dst, port, proto))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap_or(false)).collect()
}

/// Every (from, to) pair of `pods` (ids) on each (proto, port), to `to`'s pod address.
pub fn matrix(b: &ClusterBox, pods: &[&str], ports: &[(Proto, u16)]) -> Vec<Case> {
    let mut out = vec![];
    for from in pods {
        for to in pods {
            if from == to {
                continue;
            }
            for &(proto, port) in ports {
                out.push(Case { from: from.to_string(), to: to.to_string(), dst: b.pod(to).ip, port, proto });
            }
        }
    }
    out
}

/// Probes `cases` until every outcome is what `expect` says, or `timeout` passes; then
/// panics with the table of mismatches (`what` names the scenario).
pub fn expect_eventually(
    b: &ClusterBox,
    what: &str,
    cases: &[Case],
    timeout: Duration,
    expect: impl Fn(&Case) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = probe_all(b, cases);
        let wrong: Vec<String> = cases
            .iter()
            .zip(&got)
            .filter(|(c, g)| expect(c) != **g)
            .map(|(c, g)| format!("  {c}: {} (expected {})", verdict(*g), verdict(!*g)))
            .collect();
        if wrong.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("{what}: {} of {} probes wrong:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "allowed" } else { "denied" }
}

/// A pod's per-pod counter from a node's `/pods` (0 if the pod has none yet).
pub fn pod_counter(b: &ClusterBox, node: &str, ip: Ipv4Addr, name: &str) -> u64 {
    let pods = b.status_json(node, "/pods").expect("/pods");
    pods.as_array()
        .into_iter()
        .flatten()
        .find(|p| p["ip"] == ip.to_string())
        .and_then(|p| p["counters"][name].as_u64())
        .unwrap_or(0)
}
