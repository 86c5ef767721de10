//! The service proxy's own health server, as kube-proxy serves it on port 10256: cloud
//! load balancers of `externalTrafficPolicy: Cluster` services probe `GET /healthz` on every
//! node and send traffic only to nodes that answer 200, so a cluster without kube-proxy
//! must answer it.
//!
//! - `/healthz`: 200 while the proxy is healthy and the node is eligible, else 503. The
//!   node is not eligible when it has a deletion timestamp or the cluster autoscaler's
//!   `ToBeDeletedByClusterAutoscaler` taint: load balancers drain it before it goes.
//! - `/livez`: the same without the node's eligibility (for a liveness probe).
//! - Healthy: no change of services or endpoints has waited longer than the timeout
//!   (default 60 s) to reach the maps. A change counts as waiting from the moment it
//!   arrives until an apply that includes it succeeds, so an agent that keeps failing to
//!   program its maps is drained. Healthy while starting, as kube-proxy is.
//!
//! The bodies are kube-proxy's JSON (`lastUpdated`, `currentTime`, `nodeEligible`), with
//! RFC 3339 times. healthCheckNodePort servers report the same health as
//! `serviceProxyHealthy` and answer 503 while it is false (crate::healthcheck).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, http::StatusCode, response::IntoResponse, routing::get};
use serde::Serialize;

/// Health of the service proxy on this node (see the module docs).
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<State>,
    /// Answers by path and status: [healthz 200, healthz 503, livez 200, livez 503].
    answers: [AtomicU64; 4],
    /// Where the health server listens, or waits to.
    server: Mutex<Server>,
}

/// The health server's socket, as `/services` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Server {
    /// Not started: services off, or no `healthzAddress`.
    #[default]
    Off,
    /// Cannot bind its address yet (kube-proxy still holds it?): why.
    Waiting { addr: SocketAddr, error: String },
    /// Bound, answering on this address.
    Listening(SocketAddr),
}

#[derive(Debug, Clone, Copy)]
struct State {
    /// The oldest change noted and not yet taken by a sync.
    queued: Option<Instant>,
    /// The oldest change a sync took whose apply has not succeeded yet.
    in_flight: Option<Instant>,
    /// When the last apply succeeded.
    last_updated: Option<SystemTime>,
    node_eligible: bool,
}

/// What `/services` and the metrics show of it.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProxyHealthReport {
    pub healthy: bool,
    pub node_eligible: bool,
    /// RFC 3339; none before the first apply.
    pub last_updated: Option<String>,
    /// How long the oldest change not yet in the maps has waited.
    pub pending_seconds: Option<f64>,
    pub healthz_200: u64,
    pub healthz_503: u64,
    pub livez_200: u64,
    pub livez_503: u64,
}

/// One answer of the health server.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

fn rfc3339(t: Option<SystemTime>) -> String {
    // Go's zero time, as kube-proxy prints a proxy that never synced.
    const NEVER: &str = "0001-01-01T00:00:00Z";
    t.and_then(|t| jiff::Timestamp::try_from(t).ok()).map_or_else(|| NEVER.to_owned(), |t| t.to_string())
}

impl ProxyHealth {
    /// A proxy that is healthy until a change waits longer than `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            state: Mutex::new(State { queued: None, in_flight: None, last_updated: None, node_eligible: true }),
            answers: Default::default(),
            server: Mutex::default(),
        }
    }

    /// Where the health server listens, or why it does not.
    pub fn server(&self) -> Server {
        self.server.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_server(&self, server: Server) {
        *self.server.lock().unwrap_or_else(|p| p.into_inner()) = server;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change of services, endpoints or nodes arrived (kube-proxy's QueuedUpdate).
    pub fn queued(&self, now: Instant) {
        self.state().queued.get_or_insert(now);
    }

    /// A sync took the queued changes: they wait until an apply succeeds. Call it while
    /// holding whatever guards the queue, so a change is never taken before it is noted.
    pub fn taken(&self) {
        let mut s = self.state();
        if let Some(q) = s.queued.take() {
            s.in_flight = Some(s.in_flight.map_or(q, |f| f.min(q)));
        }
    }

    /// The sync holds the services as installed on purpose (the store lost its data): the
    /// changes noted meanwhile do not count as waiting, as no change reaches a kube-proxy
    /// cut off from its API server. (A failed apply taken before still counts.)
    pub fn held(&self) {
        self.state().queued = None;
    }

    /// An apply succeeded: everything taken so far is in the maps (kube-proxy's Updated).
    pub fn updated(&self, wall: SystemTime) {
        let mut s = self.state();
        s.in_flight = None;
        s.last_updated = Some(wall);
    }

    /// This node's Node object changed (or appeared).
    pub fn set_node_eligible(&self, eligible: bool) {
        let mut s = self.state();
        if s.node_eligible != eligible {
            if eligible {
                log::info!("proxy /healthz: this node is eligible again");
            } else {
                log::warn!("proxy /healthz: this node is being deleted; answering 503 so load balancers drain it");
            }
        }
        s.node_eligible = eligible;
    }

    /// How long the oldest change not yet in the maps has waited.
    fn pending(s: &State, now: Instant) -> Option<Duration> {
        let since = match (s.queued, s.in_flight) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        since.map(|p| now.saturating_duration_since(p))
    }

    fn healthy_at(&self, s: &State, now: Instant) -> bool {
        Self::pending(s, now).is_none_or(|p| p < self.timeout)
    }

    /// True unless a change has waited `timeout` or longer.
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.healthy_at(&self.state(), now)
    }

    /// `GET /healthz`: the proxy's health and the node's eligibility.
    pub fn healthz(&self, now: Instant, wall: SystemTime) -> Answer {
        self.answer(now, wall, true)
    }

    /// `GET /livez`: the proxy's health alone.
    pub fn livez(&self, now: Instant, wall: SystemTime) -> Answer {
        self.answer(now, wall, false)
    }

    fn answer(&self, now: Instant, wall: SystemTime, with_node: bool) -> Answer {
        let s = *self.state();
        let ok = self.healthy_at(&s, now) && (s.node_eligible || !with_node);
        self.answers[usize::from(!with_node) * 2 + usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        // While healthy, kube-proxy reports the current time as lastUpdated (older clients
        // read it as "the sync loop ran just now").
        let last = if ok { Some(wall) } else { s.last_updated };
        let mut body = serde_json::json!({ "lastUpdated": rfc3339(last), "currentTime": rfc3339(Some(wall)) });
        if with_node {
            body["nodeEligible"] = s.node_eligible.into();
        }
        Answer { status: if ok { 200 } else { 503 }, body: body.to_string() }
    }

    /// For `/services` and the metrics.
    pub fn report(&self, now: Instant) -> ProxyHealthReport {
        let s = *self.state();
        let pending = Self::pending(&s, now);
        let [h200, h503, l200, l503] = std::array::from_fn(|i| self.answers[i].load(Ordering::Relaxed));
        ProxyHealthReport {
            healthy: self.healthy_at(&s, now),
            node_eligible: s.node_eligible,
            last_updated: s.last_updated.map(|t| rfc3339(Some(t))),
            pending_seconds: pending.map(|p| p.as_secs_f64()),
            healthz_200: h200,
            healthz_503: h503,
            livez_200: l200,
            livez_503: l503,
        }
    }
}

fn respond(a: Answer) -> axum::response::Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [("content-type", "application/json"), ("x-content-type-options", "nosniff")], a.body).into_response()
}

fn router(health: Arc<ProxyHealth>) -> Router {
    let h = health.clone();
    Router::new()
        .route("/healthz", get(move || async move { respond(h.healthz(Instant::now(), SystemTime::now())) }))
        .route("/livez", get(move || async move { respond(health.livez(Instant::now(), SystemTime::now())) }))
}

/// Serves `/healthz` and `/livez` on `addr` until `stop` resolves. While the address is
/// taken (kube-proxy still runs beside the agent during a migration, and owns 10256) it
/// says so once and tries again every 10 s, so the agent takes over when kube-proxy goes.
pub async fn serve(
    health: Arc<ProxyHealth>,
    addr: SocketAddr,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    serve_retrying(health, addr, Duration::from_secs(10), stop).await;
}

async fn serve_retrying(
    health: Arc<ProxyHealth>,
    addr: SocketAddr,
    retry: Duration,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let mut stop = Box::pin(stop);
    let mut warned = false;
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                health.set_server(Server::Waiting { addr, error: e.to_string() });
                if !warned {
                    log::warn!(
                        "proxy health server: cannot listen on {addr}: {e} (kube-proxy still running?); trying again \
                         every {retry:?}"
                    );
                    warned = true;
                }
            }
        }
        tokio::select! {
            () = &mut stop => {
                health.set_server(Server::Off);
                return;
            }
            () = tokio::time::sleep(retry) => {}
        }
    };
    // The address bound (port 0 in tests is a port chosen by the kernel).
    health.set_server(Server::Listening(listener.local_addr().unwrap_or(addr)));
    log::info!("proxy health server on http://{addr} (/healthz, /livez)");
    crate::http::serve(listener, router(health.clone()), stop).await;
    health.set_server(Server::Off);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(a: &Answer) -> serde_json::Value {
        serde_json::from_str(&a.body).unwrap()
    }

    #[test]
    fn healthy_while_starting_and_while_changes_reach_the_maps_in_time() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_748_800);
        // Nothing synced yet: healthy, as kube-proxy is while it starts.
        let a = h.healthz(t0, wall);
        assert_eq!(a.status, 200);
        assert_eq!(body(&a)["nodeEligible"], true);
        assert_eq!(body(&a)["currentTime"], "2025-12-03T08:00:00Z");
        assert_eq!(body(&a)["lastUpdated"], body(&a)["currentTime"], "healthy: lastUpdated is now");
        // A change waits 59 s: still healthy; at 60 s not.
        h.queued(t0);
        assert!(h.is_healthy(t0 + Duration::from_secs(59)));
        assert!(!h.is_healthy(t0 + Duration::from_secs(60)));
        let late = h.healthz(t0 + Duration::from_secs(60), wall);
        assert_eq!(late.status, 503);
        assert_eq!(body(&late)["lastUpdated"], "0001-01-01T00:00:00Z", "never updated");
        assert_eq!(h.livez(t0 + Duration::from_secs(60), wall).status, 503);
        // A later change does not reset the clock of the oldest one.
        h.queued(t0 + Duration::from_secs(50));
        assert!(!h.is_healthy(t0 + Duration::from_secs(61)));
        // Taken by a sync and applied: healthy again, with the time of that apply.
        h.taken();
        assert!(!h.is_healthy(t0 + Duration::from_secs(61)), "taken is not applied");
        h.updated(wall);
        assert!(h.is_healthy(t0 + Duration::from_secs(61)));
        assert_eq!(h.report(t0).last_updated.as_deref(), Some("2025-12-03T08:00:00Z"));
        let r = h.report(t0 + Duration::from_secs(61));
        assert_eq!((r.healthz_200, r.healthz_503, r.livez_503), (1, 1, 1));
    }

    #[test]
    fn a_failed_apply_keeps_its_changes_waiting() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let t0 = Instant::now();
        h.queued(t0);
        h.taken();
        // The apply failed (no `updated`); a new change arrives and is taken by the retry,
        // which fails too: the first change is still the one that counts.
        h.queued(t0 + Duration::from_secs(30));
        h.taken();
        assert!(!h.is_healthy(t0 + Duration::from_secs(60)));
        assert!(h.report(t0 + Duration::from_secs(60)).pending_seconds.is_some_and(|p| p >= 60.0));
        // A change noted after a take waits on its own clock once the take is applied.
        h.queued(t0 + Duration::from_secs(40));
        h.updated(SystemTime::now());
        assert!(h.is_healthy(t0 + Duration::from_secs(99)));
        assert!(!h.is_healthy(t0 + Duration::from_secs(100)));
    }

    #[test]
    fn a_node_on_its_way_out_fails_healthz_but_not_livez() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let now = Instant::now();
        h.set_node_eligible(false);
        let a = h.healthz(now, SystemTime::now());
        assert_eq!(a.status, 503);
        assert_eq!(body(&a)["nodeEligible"], false);
        let live = h.livez(now, SystemTime::now());
        assert_eq!(live.status, 200);
        assert!(body(&live).get("nodeEligible").is_none(), "{}", live.body);
        assert!(h.is_healthy(now), "the proxy itself is fine: healthCheckNodePorts still answer from their counts");
        h.set_node_eligible(true);
        assert_eq!(h.healthz(now, SystemTime::now()).status, 200);
    }

    #[tokio::test]
    async fn the_server_answers_over_http_and_waits_for_a_taken_port() {
        // Someone (kube-proxy) holds the port: the server waits, and serves once it is free.
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let h = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_retrying(h.clone(), addr, Duration::from_millis(200), async move {
            let _ = rx.await;
        }));
        assert_eq!(h.server(), Server::Off, "not started yet");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!server.is_finished(), "still trying");
        assert!(
            matches!(h.server(), Server::Waiting { addr: a, .. } if a == addr),
            "not listening while the port is taken: {:?}",
            h.server()
        );
        drop(held);
        let mut answer = None;
        for _ in 0..50 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                answer = Some(out);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let answer = answer.expect("the server took the port once it was free");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("content-type: application/json"), "{answer}");
        assert!(answer.contains("\"nodeEligible\":true"), "{answer}");
        assert_eq!(h.server(), Server::Listening(addr));
        let _ = tx.send(());
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("stops").unwrap();
        assert_eq!(h.server(), Server::Off, "stopped");
    }
}
