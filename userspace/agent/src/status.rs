//! The agent's status endpoint (HTTP on `statusAddr`, loopback by default):
//!
//! - `GET /healthz`  200 while the process runs;
//! - `GET /readyz`   200 when CNI STATUS would succeed (datapath loaded, vswitch serving);
//! - `GET /pods`     every pod attachment with its per-pod datapath counters (JSON);
//! - `GET /node`     the node's wire: uplink, overlay, routes to other nodes, overlay counters;
//! - `GET /services` every service frontend with the backends the maps hold, per-service
//!   counters, services left out and why, healthCheckNodePorts, conntrack fill;
//! - `GET /vswitch`  slow-path counters: vswitch verdicts by reason, AF_XDP port, slow-path port programs;
//! - `GET /policies` what NetworkPolicy the node enforces for each pod, read from the maps;
//! - `GET /metrics`  the same counters and request latencies for Prometheus (see `metrics`).

use std::{net::SocketAddr, sync::Arc};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::{agent::Agent, metrics::AgentMetrics};

/// What the endpoints read: the agent and its metrics.
type Shared = (Arc<Agent>, Arc<AgentMetrics>);

pub fn router(agent: Arc<Agent>, metrics: Arc<AgentMetrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/pods", get(pods))
        .route("/vswitch", get(vswitch))
        .route("/node", get(node))
        .route("/policies", get(policies))
        .route("/services", get(services))
        .route("/metrics", get(metrics_text))
        .with_state((agent, metrics))
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

async fn vswitch(State((agent, _)): State<Shared>) -> impl IntoResponse {
    Json(agent.slowpath_report().await)
}

async fn metrics_text(State((agent, metrics)): State<Shared>) -> impl IntoResponse {
    let services = agent.config().services.enabled.then_some(agent.services_report().await);
    let text = metrics.render(agent.pods().await, agent.slowpath_report().await, services);
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
    axum::serve(listener, router(agent, metrics)).with_graceful_shutdown(shutdown).await.context("status endpoint")
}
