//! healthCheckNodePort servers: for every Service with `externalTrafficPolicy: Local` and a
//! `healthCheckNodePort`, the agent answers HTTP on that port of the node, as kube-proxy
//! does: 200 while the node has local endpoints for the service, 503 when it has none or
//! the proxy is unhealthy (crate::proxyhealth), with a JSON body naming the service, the
//! count and `serviceProxyHealthy`. Load balancers use it to send traffic only to nodes
//! that can serve it.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, RwLock},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

use crate::{proxyhealth::ProxyHealth, services::HealthCheck};

/// The running servers and what they report.
pub struct HealthServers {
    state: Arc<RwLock<BTreeMap<u16, HealthCheck>>>,
    /// A listener task per port and address listened on.
    servers: BTreeMap<(u16, Ipv4Addr), JoinHandle<()>>,
    /// Listener tasks started so far.
    started: usize,
    proxy: Arc<ProxyHealth>,
}

/// The response to a health check, given whether the proxy is healthy.
pub fn response(check: Option<&HealthCheck>, proxy_healthy: bool) -> String {
    let (status, body) = match check {
        Some(c) => {
            let body = serde_json::json!({
                "service": { "namespace": c.namespace, "name": c.name },
                "localEndpoints": c.local_endpoints,
                "serviceProxyHealthy": proxy_healthy,
            });
            let ok = c.local_endpoints > 0 && proxy_healthy;
            (if ok { "200 OK" } else { "503 Service Unavailable" }, body.to_string())
        }
        None => ("404 Not Found", "{}".to_owned()),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

impl HealthServers {
    /// No servers yet; they report `proxy`'s health beside their counts.
    pub fn new(proxy: Arc<ProxyHealth>) -> Self {
        Self { state: Default::default(), servers: BTreeMap::new(), started: 0, proxy }
    }

    /// Brings the servers in line with `checks` (port -> service and local endpoint count),
    /// listening on `addrs` (`None`: every address), as kube-proxy listens on the addresses
    /// `nodePortAddresses` takes: new ports get listeners, departed ones lose theirs, counts
    /// change in place; when the addresses change, only the listeners of addresses that
    /// came or went are started or stopped (a load balancer probing a kept address never
    /// finds it closed). A listener that cannot bind yet (an address the node does not hold
    /// yet) keeps trying.
    pub fn update(&mut self, checks: &BTreeMap<u16, HealthCheck>, addrs: Option<&[Ipv4Addr]>) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = checks.clone();
        let listen_on = addrs.map_or_else(|| vec![Ipv4Addr::UNSPECIFIED], <[Ipv4Addr]>::to_vec);
        self.servers.retain(|(port, addr), task| {
            let keep = checks.contains_key(port) && listen_on.contains(addr) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for port in checks.keys() {
            for addr in &listen_on {
                if !self.servers.contains_key(&(*port, *addr)) {
                    let task = self.serve(*addr, *port);
                    self.servers.insert((*port, *addr), task);
                }
            }
        }
    }

    /// One listener: `port` on `addr`.
    fn serve(&mut self, addr: Ipv4Addr, port: u16) -> JoinHandle<()> {
        self.started += 1;
        let state = self.state.clone();
        let proxy = self.proxy.clone();
        tokio::spawn(async move {
            // Until it can: the listener it replaces may not have closed yet (an abort takes
            // effect at that task's next poll), or the node may not hold the address yet.
            let mut tries = 0u32;
            let listener = loop {
                match TcpListener::bind((addr, port)).await {
                    Ok(l) => break l,
                    Err(e) => {
                        if tries == 0 {
                            log::error!("healthCheckNodePort {addr}:{port}: cannot listen (trying on): {e}");
                        }
                        tries += 1;
                        let wait = if tries < 20 { 50 } else { 1000 };
                        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                    }
                }
            };
            log::info!("healthCheckNodePort {addr}:{port}: serving");
            let mut failing = false;
            loop {
                let mut conn = match listener.accept().await {
                    Ok((conn, _)) => {
                        failing = false;
                        conn
                    }
                    // Out of descriptors, say: the connection stays queued, so retrying at
                    // once would spin. Logged once per run of failures.
                    Err(e) => {
                        if !failing {
                            log::warn!("healthCheckNodePort {addr}:{port}: accept: {e}");
                        }
                        failing = true;
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let state = state.clone();
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    // The request itself does not matter (any path answers), but read it
                    // so the client is not reset before it sees the answer.
                    let mut buf = [0u8; 1024];
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut buf)).await;
                    let text = {
                        let s = state.read().unwrap_or_else(|p| p.into_inner());
                        response(s.get(&port), proxy.is_healthy(std::time::Instant::now()))
                    };
                    let _ = conn.write_all(text.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        })
    }

    /// The ports served.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.servers.keys().map(|(port, _)| *port).collect();
        ports.dedup();
        ports
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for t in self.servers.values() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_200_with_local_endpoints_and_503_without() {
        let c = HealthCheck { namespace: "shop".into(), name: "web".into(), local_endpoints: 2 };
        let ok = response(Some(&c), true);
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let body: serde_json::Value = serde_json::from_str(ok.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["localEndpoints"], 2);
        assert_eq!(body["service"]["name"], "web");
        let none = HealthCheck { local_endpoints: 0, ..c };
        assert!(response(Some(&none.clone()), true).starts_with("HTTP/1.1 503 "));
        // Endpoints, but the proxy has not programmed its changes in time: 503 as well.
        let stale = response(Some(&HealthCheck { local_endpoints: 2, ..none }), false);
        assert!(stale.starts_with("HTTP/1.1 503 ") && stale.contains("\"serviceProxyHealthy\":false"), "{stale}");
    }

    #[tokio::test]
    async fn a_server_follows_its_count_and_stops_with_its_service() {
        // A free port, then released for the server.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut hs = HealthServers::new(Arc::new(ProxyHealth::new(std::time::Duration::from_secs(60))));
        let mut checks = BTreeMap::new();
        checks.insert(port, HealthCheck { namespace: "a".into(), name: "b".into(), local_endpoints: 1 });
        hs.update(&checks, None);
        let get = || async move {
            for _ in 0..50 {
                if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.unwrap();
                    return Some(out);
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            None
        };
        assert!(get().await.unwrap().starts_with("HTTP/1.1 200"));
        checks.get_mut(&port).unwrap().local_endpoints = 0;
        hs.update(&checks, None);
        assert!(get().await.unwrap().starts_with("HTTP/1.1 503"));
        hs.update(&BTreeMap::new(), None);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn servers_listen_on_the_addresses_given_and_move_with_them() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut hs = HealthServers::new(Arc::new(ProxyHealth::new(std::time::Duration::from_secs(60))));
        let checks =
            BTreeMap::from([(port, HealthCheck { namespace: "a".into(), name: "b".into(), local_endpoints: 1 })]);
        let answers = |addr: [u8; 4]| async move {
            for _ in 0..25 {
                if tokio::net::TcpStream::connect((Ipv4Addr::from(addr), port)).await.is_ok() {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            false
        };
        let (one, two, three) = ([127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]);
        // Each time after a moment: a listener given up closes at its task's next poll.
        let settle = || tokio::time::sleep(std::time::Duration::from_millis(100));
        hs.update(&checks, Some(&[two.into(), three.into()]));
        settle().await;
        assert!(answers(two).await && answers(three).await);
        assert!(!answers(one).await, "not on an address it was not given");
        // One of the two kept: its listener stays as it is (a probe never finds it closed).
        let started = hs.started;
        hs.update(&checks, Some(&[two.into()]));
        settle().await;
        assert_eq!(hs.started, started, "no listener started again");
        assert!(answers(two).await && !answers(three).await);
        hs.update(&checks, Some(&[one.into()]));
        settle().await;
        assert!(answers(one).await);
        assert!(!answers(two).await, "moved off the addresses no longer given");
        hs.update(&checks, None);
        settle().await;
        assert!(answers(two).await, "every address");
    }
}
