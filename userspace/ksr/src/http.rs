//! Health and metrics over HTTP: `/healthz` (alive), `/readyz`, `/metrics` (Prometheus,
//! OpenMetrics text through prometheus-client).
//!
//! `/readyz` is 200 when this replica does its job: the leader (or a replica without
//! leader election) once every kind is synced, the marker written and the store reachable;
//! a standby replica while it can read the Lease (it is ready to take over). Nothing here
//! waits on a store call, so both endpoints answer during a large relist.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use contiv_store::metrics::StoreMetrics;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::mirror::{Counters, Mirror};

/// This replica's part in leader election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// No leader election: always reflecting.
    Standalone,
    /// Trying to reach or read the Lease.
    Candidate,
    /// Standing by; another replica (named) leads.
    Follower(String),
    /// Leading: reflecting.
    Leader,
}

#[derive(Debug)]
struct Current {
    role: Role,
    mirror: Option<Arc<Mirror>>,
}

/// What the endpoints report; shared with the reflector and the election loop.
#[derive(Debug)]
pub struct Health {
    current: Mutex<Current>,
    counters: Arc<Counters>,
    store_metrics: StoreMetrics,
}

impl Health {
    /// A replica without leader election, reflecting through `mirror`; `store_metrics`
    /// are the histograms of the store `mirror` writes to.
    pub fn standalone(mirror: Arc<Mirror>, store_metrics: StoreMetrics) -> Arc<Self> {
        let counters = mirror.counters.clone();
        Arc::new(Health {
            current: Mutex::new(Current { role: Role::Standalone, mirror: Some(mirror) }),
            counters,
            store_metrics,
        })
    }

    /// A replica taking part in leader election (a candidate until the first round).
    pub fn elected(store_metrics: StoreMetrics) -> Arc<Self> {
        Arc::new(Health {
            current: Mutex::new(Current { role: Role::Candidate, mirror: None }),
            counters: Arc::default(),
            store_metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counters kept across leadership terms.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The store latency histograms.
    pub fn store_metrics(&self) -> &StoreMetrics {
        &self.store_metrics
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.lock().role.clone()
    }

    /// The mirror of the current term, if reflecting.
    pub fn mirror(&self) -> Option<Arc<Mirror>> {
        self.lock().mirror.clone()
    }

    /// Not leading (any more): no mirror.
    pub fn set_role(&self, role: Role) {
        let mut c = self.lock();
        c.role = role;
        c.mirror = None;
    }

    /// Leading through `mirror`.
    pub fn set_leader(&self, mirror: Arc<Mirror>) {
        let mut c = self.lock();
        c.role = Role::Leader;
        c.mirror = Some(mirror);
    }

    /// Whether /readyz says 200, and why.
    pub fn readiness(&self) -> (bool, String) {
        let c = self.lock();
        match (&c.role, &c.mirror) {
            (Role::Follower(holder), _) => (true, format!("standby (leader: {holder})")),
            (Role::Candidate, _) => (false, "not ready: cannot read the leader lease".into()),
            (_, Some(m)) => match m.not_ready_because() {
                None => (true, "ready".into()),
                Some(why) => (false, format!("not ready: {why}")),
            },
            _ => (false, "not ready".into()),
        }
    }

    /// The /metrics text.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        self.store_metrics.register(&mut registry);
        registry.register_collector(Box::new(KsrCollector(self.clone())));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            log::error!("encoding metrics: {e}");
        }
        out
    }
}

/// Reads the reflector's state at scrape time.
#[derive(Debug)]
struct KsrCollector(Arc<Health>);

impl Collector for KsrCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let health = &self.0;
        let (role, mirror) = {
            let c = health.lock();
            (c.role.clone(), c.mirror.clone())
        };
        let status = mirror.as_ref().map(|m| m.status_now()).unwrap_or_default();
        let gauge_family =
            |encoder: &mut DescriptorEncoder, name: &str, help: &str, f: &dyn Fn(&crate::mirror::KindStatus) -> i64| {
                let g = ConstGauge::new(0i64);
                let mut family = encoder.encode_descriptor(name, help, None, g.metric_type())?;
                for s in &status {
                    let labels = [("kind", s.kind.as_str())];
                    ConstGauge::new(f(s)).encode(family.encode_family(&labels)?)?;
                }
                Ok::<(), std::fmt::Error>(())
            };
        gauge_family(&mut encoder, "contiv_ksr_objects", "Objects reflected into the store, per kind", &|s| {
            s.objects as i64
        })?;
        gauge_family(&mut encoder, "contiv_ksr_synced", "1 when the kind is listed and in sync", &|s| {
            i64::from(s.synced && !s.dirty)
        })?;
        let c = &health.counters;
        for (name, help, v) in [
            ("contiv_ksr_store_puts", "Keys written", &c.puts),
            ("contiv_ksr_store_unchanged", "Writes skipped because the store held the value", &c.unchanged),
            ("contiv_ksr_store_deletes", "Keys deleted", &c.deletes),
            ("contiv_ksr_store_errors", "Store operations that failed", &c.store_errors),
            ("contiv_ksr_convert_errors", "Objects that could not be converted (skipped)", &c.convert_errors),
            ("contiv_ksr_watch_errors", "Kubernetes watch errors (retried)", &c.watch_errors),
            ("contiv_ksr_marker_resyncs", "Full resyncs after the marker key went missing", &c.marker_resyncs),
            ("contiv_ksr_converges", "Converges of a kind's key prefix", &c.converges),
            (
                "contiv_ksr_departed_nodes_released",
                "Node IDs and pod CIDRs freed because their node left the cluster",
                &c.departed_nodes_released,
            ),
        ] {
            let counter = ConstCounter::new(v.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let ready = ConstGauge::new(i64::from(mirror.as_ref().is_some_and(|m| m.ready_now())));
        ready.encode(encoder.encode_descriptor(
            "contiv_ksr_ready",
            "1 when reflecting and in sync",
            None,
            ready.metric_type(),
        )?)?;
        let leading = ConstGauge::new(i64::from(matches!(role, Role::Leader | Role::Standalone)));
        leading.encode(encoder.encode_descriptor(
            "contiv_ksr_leader",
            "1 when this replica reflects (leader, or no leader election)",
            None,
            leading.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The router serving the three endpoints.
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    let (ok, why) = h.readiness();
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, format!("{why}\n"))
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], h.render())
}

/// Serves the router on `addr` from a thread of its own (a single-threaded runtime), so the
/// endpoints answer even while the reflector's tasks keep every worker of the main runtime
/// busy (decoding a large list). Runs for the life of the process; returns the bound address.
pub fn serve_dedicated(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("ksr-http".into()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    if let Err(e) = axum::serve(listener, router(health)).await {
                        log::error!("http server: {e}");
                    }
                }
                Err(e) => log::error!("http server: {e}"),
            }
        });
    })?;
    Ok(bound)
}

/// Serves the router on `addr` until the task is dropped; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(health);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("http server: {e}");
        }
    });
    Ok((bound, task))
}
