//! The agent's status endpoint (HTTP on `statusAddr`, loopback by default):
//!
//! - `GET /healthz`  200 while the process runs;
//! - `GET /readyz`   200 when CNI STATUS would succeed (datapath loaded, vswitch serving);
//! - `GET /pods`     every pod attachment with its per-pod datapath counters (JSON);
//! - `GET /node`     the node's wire: uplink, overlay, routes to other nodes, overlay counters;
//! - `GET /vswitch`  slow-path counters: vswitch verdicts by reason, AF_XDP port, slow-path port programs;
//! - `GET /metrics`  the same counters in Prometheus text format.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::agent::Agent;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/pods", get(pods))
        .route("/vswitch", get(vswitch))
        .route("/node", get(node))
        .route("/metrics", get(metrics))
        .with_state(agent)
}

async fn readyz(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    match agent.status() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", e.msg)),
    }
}

async fn pods(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    Json(agent.pods().await)
}

async fn node(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    Json(agent.node_report().await)
}

async fn vswitch(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    Json(agent.slowpath_report().await)
}

async fn metrics(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let mut out = String::new();
    let pods = agent.pods().await;
    type Counter = (&'static str, &'static str, fn(&crate::agent::CountersReport) -> u64);
    let counters: [Counter; 10] = [
        ("contiv_pod_forwarded_packets_total", "Frames forwarded pod to pod by the fast path", |c| c.fwd_packets),
        ("contiv_pod_forwarded_bytes_total", "Bytes forwarded pod to pod by the fast path", |c| c.fwd_bytes),
        ("contiv_pod_slowpath_packets_total", "Frames steered to the slow path", |c| c.slow_packets),
        ("contiv_pod_slowpath_bytes_total", "Bytes steered to the slow path", |c| c.slow_bytes),
        ("contiv_pod_from_slowpath_packets_total", "Frames the vswitch delivered to the pod", |c| c.from_slow_packets),
        ("contiv_pod_dropped_spoofed_ip_total", "Frames dropped: source IP not the pod's", |c| c.drop_spoofed_ip),
        ("contiv_pod_dropped_spoofed_mac_total", "Frames dropped: source MAC not the pod's", |c| c.drop_spoofed_mac),
        ("contiv_pod_dropped_malformed_total", "Frames dropped: malformed", |c| c.drop_malformed),
        ("contiv_pod_dropped_ttl_exceeded_total", "Frames dropped: TTL exceeded", |c| c.drop_ttl_exceeded),
        ("contiv_pod_dropped_no_slowpath_total", "Frames dropped: no slow-path port", |c| c.drop_no_slowpath),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for p in &pods {
            if let Some(c) = &p.counters {
                let _ = writeln!(
                    out,
                    "{name}{{pod_ip=\"{}\",container_id=\"{}\",ifname=\"{}\"}} {}",
                    p.ip,
                    p.container_id,
                    p.ifname,
                    get(c)
                );
            }
        }
    }
    let slow = agent.slowpath_report().await;
    if let Some(v) = &slow.vswitch {
        let _ = writeln!(
            out,
            "# HELP contiv_vswitch_replies_total Frames the vswitch answered\n# TYPE contiv_vswitch_replies_total counter"
        );
        let _ = writeln!(out, "contiv_vswitch_replies_total{{kind=\"arp\"}} {}", v.arp_replies);
        let _ = writeln!(out, "contiv_vswitch_replies_total{{kind=\"icmp_echo\"}} {}", v.icmp_echo_replies);
        let _ = writeln!(
            out,
            "# HELP contiv_vswitch_drops_total Frames the vswitch dropped, by reason\n# TYPE contiv_vswitch_drops_total counter"
        );
        for reason in contiv_vswitch::DropReason::ALL {
            let _ =
                writeln!(out, "contiv_vswitch_drops_total{{reason=\"{}\"}} {}", reason.as_str(), v.drops.get(reason));
        }
    }
    let _ = writeln!(
        out,
        "# HELP contiv_pods Pod attachments on this node\n# TYPE contiv_pods gauge\ncontiv_pods {}",
        pods.len()
    );
    ([("content-type", "text/plain; version=0.0.4")], out)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the status endpoint on {addr}"))?;
    log::info!("status endpoint on http://{addr}");
    axum::serve(listener, router(agent)).with_graceful_shutdown(shutdown).await.context("status endpoint")
}
