//! Health and metrics over HTTP: `/healthz` (alive), `/readyz` (in sync), `/metrics`
//! (Prometheus text: objects reflected per kind and the mirror's counters).

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::mirror::Mirror;

/// The router serving the three endpoints.
pub fn router(mirror: Arc<Mirror>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(mirror)
}

async fn readyz(State(m): State<Arc<Mirror>>) -> (StatusCode, &'static str) {
    if m.ready().await { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

/// The /metrics text.
pub async fn render_metrics(m: &Mirror) -> String {
    let mut out = String::new();
    let status = m.status().await;
    out.push_str("# HELP contiv_ksr_objects Objects reflected into the store, per kind.\n");
    out.push_str("# TYPE contiv_ksr_objects gauge\n");
    for s in &status {
        let _ = writeln!(out, "contiv_ksr_objects{{kind=\"{}\"}} {}", s.kind, s.objects);
    }
    out.push_str("# TYPE contiv_ksr_synced gauge\n");
    for s in &status {
        let _ = writeln!(out, "contiv_ksr_synced{{kind=\"{}\"}} {}", s.kind, u8::from(s.synced && !s.dirty));
    }
    let c = &m.counters;
    for (name, v) in [
        ("store_puts", &c.puts),
        ("store_unchanged", &c.unchanged),
        ("store_deletes", &c.deletes),
        ("store_errors", &c.store_errors),
        ("convert_errors", &c.convert_errors),
        ("watch_errors", &c.watch_errors),
        ("marker_resyncs", &c.marker_resyncs),
        ("converges", &c.converges),
    ] {
        let _ = writeln!(out, "# TYPE contiv_ksr_{name}_total counter");
        let _ = writeln!(out, "contiv_ksr_{name}_total {}", v.load(Ordering::Relaxed));
    }
    let _ = writeln!(out, "# TYPE contiv_ksr_ready gauge\ncontiv_ksr_ready {}", u8::from(m.ready().await));
    out
}

async fn metrics(State(m): State<Arc<Mirror>>) -> String {
    render_metrics(&m).await
}

/// Serves the router on `addr` until the task is dropped; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    mirror: Arc<Mirror>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(mirror);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("http server: {e}");
        }
    });
    Ok((bound, task))
}
