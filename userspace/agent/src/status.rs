//! The agent's status endpoint (HTTP on `statusAddr`, loopback by default):
//!
//! - `GET /healthz`  200 while the process runs;
//! - `GET /readyz`   200 when CNI STATUS would succeed (datapath loaded, vswitch serving);
//! - `GET /pods`     every pod attachment with its per-pod datapath counters (JSON);
//! - `GET /node`     the node's wire: uplink, overlay, routes to other nodes, overlay counters;
//! - `GET /services` every service frontend with the backends the maps hold, per-service
//!   counters, services left out and why, healthCheckNodePorts, conntrack fill (as of the
//!   last sweep); with services off, `enabled: false` and the conntrack fill alone;
//! - `GET /conntrack` the conntrack table's flows, each from the side that opened it, with
//!   its pods, service, translation, TCP state, idle time and expiry; `?pod=NS/NAME`,
//!   `?service=NS/NAME`, `?namespace=NS` narrow it, `?limit=N` (200; 0: all, at most 100000)
//!   keeps the most recently seen (see `conntrack`);
//! - `GET /vswitch`  slow-path counters: vswitch verdicts by reason, AF_XDP port, slow-path port programs;
//! - `GET /policies` what NetworkPolicy the node enforces for each pod, read from the maps;
//! - `GET /monitor`  a live stream of datapath events (NDJSON, one object per line: `hello`,
//!   `event`, `suppressed`, `lost`, `lagged`); `?pod=NS/NAME` only events of that pod,
//!   `?drops=1` only drops (see `monitor`);
//! - `GET /trace?from=NS/NAME&to=IP:PORT/PROTO[&fromIp=IP]` (or `POST /trace` with that as
//!   a JSON object): what `tc_from_pod` does with such a packet from that pod, and why,
//!   computed by the kernel running the program in trace mode (see `trace`);
//! - `GET /trace/arrival?packet=HEX&sender=IP`: the second hop of a trace that another
//!   node forwarded here: what `tc_from_overlay` does with that frame from that node;
//! - `GET /metrics`  the same counters and request latencies for Prometheus (see `metrics`).
//!
//! A request from the cluster's pod range is answered on `/healthz`, `/readyz` and
//! `/metrics` only (403 otherwise): every pod reaches its node's addresses.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    body::Body,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};

use ipnet::Ipv4Net;

use crate::{agent::Agent, metrics::AgentMetrics};

/// What the endpoints read: the agent and its metrics.
type Shared = (Arc<Agent>, Arc<AgentMetrics>);

pub fn router(agent: Arc<Agent>, metrics: Arc<AgentMetrics>) -> Router {
    let pod_ranges: Arc<Vec<Ipv4Net>> = Arc::new(vec![agent.config().pod_subnet_cidr, agent.config().pod_subnet]);
    // What the node's pods may not ask: every pod reaches its node's addresses whatever
    // NetworkPolicy says, and these show other pods, their flows and policy, and hold the
    // node's lock (traces) or a stream slot (monitor).
    let inspection = Router::new()
        .route("/pods", get(pods))
        .route("/vswitch", get(vswitch))
        .route("/node", get(node))
        .route("/policies", get(policies))
        .route("/services", get(services))
        .route("/conntrack", get(conntrack))
        .route("/monitor", get(monitor))
        .route("/trace", get(trace_get).post(trace_post))
        .route("/trace/arrival", get(trace_arrival))
        .route_layer(axum::middleware::from_fn_with_state(pod_ranges, not_from_pods));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(inspection)
        .with_state((agent, metrics))
}

/// Refuses (403) a request from an address of the cluster's pod range: inspection is for
/// operators and other nodes' agents (node addresses), and hostNetwork pods (the node's
/// address too). Prometheus scraping from a pod reads `/metrics`, which stays open.
async fn not_from_pods(
    State(pod_ranges): State<Arc<Vec<Ipv4Net>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // Without the peer's address (a server set up without it) nothing is answered.
    let peer = request.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>();
    let from_pod = peer.is_none_or(|axum::extract::ConnectInfo(addr)| from_pod_range(&pod_ranges, addr.ip()));
    if from_pod {
        return (
            StatusCode::FORBIDDEN,
            "the status endpoint does not answer pods (only /healthz, /readyz, /metrics)\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// Whether `ip` is in one of `ranges` (an IPv4-mapped IPv6 peer too).
fn from_pod_range(ranges: &[Ipv4Net], ip: std::net::IpAddr) -> bool {
    let v4 = match ip {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            None => return false,
        },
    };
    ranges.iter().any(|r| r.contains(&v4))
}

async fn readyz(State((agent, _)): State<Shared>) -> impl IntoResponse {
    match agent.status() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", e.msg)),
    }
}

async fn pods(State((agent, _)): State<Shared>) -> impl IntoResponse {
    Json(agent.pods().await)
}

async fn node(State((agent, _)): State<Shared>) -> impl IntoResponse {
    Json(agent.node_report().await)
}

async fn policies(State((agent, _)): State<Shared>) -> axum::response::Response {
    match agent.policy_report().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("reading the policy maps: {e}\n")).into_response(),
    }
}

async fn services(State((agent, _)): State<Shared>) -> impl IntoResponse {
    Json(agent.services_report().await)
}

async fn conntrack(State((agent, _)): State<Shared>, Query(q): Query<crate::conntrack::ConntrackQuery>) -> Response {
    use crate::conntrack::ConntrackError;
    match agent.conntrack_report(&q).await {
        Ok(r) => Json(r).into_response(),
        Err(e @ ConntrackError::Query(_)) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
        Err(e @ ConntrackError::Read(_)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn vswitch(State((agent, _)): State<Shared>) -> impl IntoResponse {
    Json(agent.slowpath_report().await)
}

/// `GET /monitor` parameters.
#[derive(Debug, Default, serde::Deserialize)]
struct MonitorQuery {
    /// `namespace/name`: only events of that pod (it must run on this node).
    pod: Option<String>,
    /// `1` or `true`: only drops.
    drops: Option<String>,
}

async fn monitor(State((agent, _)): State<Shared>, Query(q): Query<MonitorQuery>) -> Response {
    let drops = matches!(q.drops.as_deref(), Some("1" | "true" | "yes" | ""));
    let filter = match agent.monitor_filter(q.pod.as_deref(), drops).await {
        Ok(f) => f,
        Err(e) => return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    };
    let mut what = vec![];
    if let Some(p) = q.pod.as_deref().filter(|p| !p.is_empty()) {
        what.push(format!("pod={p}"));
    }
    if drops {
        what.push("drops".into());
    }
    let hello = agent.monitor_hello(&what.join(","));
    match agent.monitor().subscribe(filter, hello) {
        Ok(stream) => {
            ([("content-type", "application/x-ndjson"), ("cache-control", "no-store")], Body::from_stream(stream))
                .into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// `/trace` parameters (query string or JSON body).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TraceQuery {
    from: Option<String>,
    to: Option<String>,
    from_ip: Option<String>,
}

async fn trace_get(State((agent, _)): State<Shared>, Query(q): Query<TraceQuery>) -> Response {
    trace(&agent, q).await
}

async fn trace_post(State((agent, _)): State<Shared>, Json(q): Json<TraceQuery>) -> Response {
    trace(&agent, q).await
}

async fn trace(agent: &Agent, q: TraceQuery) -> Response {
    let (Some(from), Some(to)) = (q.from.as_deref(), q.to.as_deref()) else {
        return (StatusCode::BAD_REQUEST, "from=NAMESPACE/NAME and to=IP:PORT/PROTO are required\n").into_response();
    };
    let req = match crate::trace::TraceRequest::parse(from, to, q.from_ip.as_deref()) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    match agent.trace(&req).await {
        Ok(report) => Json(report).into_response(),
        Err(e @ crate::agent::TraceError::NotHere { .. }) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// `/trace/arrival` parameters: the frame another node's trace forwards here (hex) and that
/// node's underlay address.
#[derive(Debug, Default, serde::Deserialize)]
struct ArrivalQuery {
    packet: Option<String>,
    sender: Option<String>,
}

async fn trace_arrival(State((agent, _)): State<Shared>, Query(q): Query<ArrivalQuery>) -> Response {
    let packet = q.packet.as_deref().and_then(crate::trace::unhex).filter(|p| (34..=9216).contains(&p.len()));
    let sender = q.sender.as_deref().and_then(|s| s.parse::<std::net::Ipv4Addr>().ok());
    let (Some(packet), Some(sender)) = (packet, sender) else {
        return (
            StatusCode::BAD_REQUEST,
            "packet=HEX (an Ethernet frame, 34 to 9216 bytes) and sender=IPv4 are required\n",
        )
            .into_response();
    };
    match agent.trace_arrival(&packet, sender).await {
        Ok(report) => Json(report).into_response(),
        Err(e @ (crate::agent::TraceError::NoOverlay(_) | crate::agent::TraceError::BadPacket(_))) => {
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn metrics_text(State((agent, metrics)): State<Shared>) -> impl IntoResponse {
    let enabled = agent.config().services.enabled;
    // Only with services on: the report takes the node lock and reads the service maps.
    let services = if enabled { Some(agent.services_report().await) } else { None };
    let text = metrics.render(
        agent.pods().await,
        agent.slowpath_report().await,
        services,
        enabled.then_some(agent.programming()),
        Some(agent.monitor_totals()),
        // Policy uses the table too: its fill (as of the last sweep) either way.
        agent.conntrack_fill(),
    );
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    metrics: Arc<AgentMetrics>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the status endpoint on {addr}"))?;
    log::info!("status endpoint on http://{addr}");
    // Requests carry their peer (the inspection guard reads it).
    crate::http::serve(listener, router(agent, metrics), shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The status line's code of `GET path` from 127.0.0.1 to a server of the inspection
    /// guard alone, `ranges` being the pod ranges; `connect_info`: whether the server is set
    /// up to see the peer (as `serve` is).
    async fn status_of(ranges: Vec<Ipv4Net>, connect_info: bool, path: &str) -> u16 {
        let app = Router::new()
            .route("/pods", get(|| async { "pods\n" }))
            .route_layer(axum::middleware::from_fn_with_state(Arc::new(ranges), not_from_pods));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = if connect_info {
            tokio::spawn(async move {
                let _ = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await;
            })
        } else {
            tokio::spawn(async move {
                let _ = axum::serve(listener, app.into_make_service()).await;
            })
        };
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        server.abort();
        answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("answer: {answer}"))
    }

    /// Inspection answers a peer outside the pod ranges only: a peer in them, or one the
    /// server cannot see, gets 403.
    #[tokio::test]
    async fn inspection_refuses_pods_and_peers_it_cannot_see() {
        let loopback: Ipv4Net = "127.0.0.0/8".parse().unwrap();
        let pods: Ipv4Net = "10.1.0.0/16".parse().unwrap();
        assert_eq!(status_of(vec![pods], true, "/pods").await, 200, "a node address is answered");
        assert_eq!(status_of(vec![pods, loopback], true, "/pods").await, 403, "a pod is refused");
        assert_eq!(status_of(vec![pods], false, "/pods").await, 403, "a peer that cannot be seen is refused");
        assert!(from_pod_range(&[pods], "::ffff:10.1.2.3".parse().unwrap()), "an IPv4-mapped pod address");
        assert!(!from_pod_range(&[pods], "fd00::10.1.2.3".parse().unwrap()));
    }
}
