//! What a node actually enforces, as its agent reads it back from the datapath maps (not
//! what the store says it should): `netctl get policies --node N`. The node is found by its
//! registration in the store; its agent answers on its status endpoint (`statusAddr`, port
//! 9192 unless told otherwise).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use contiv_cluster_model::keys;
use contiv_node_registry::NodeRegistration;
use contiv_store::{Store, StoreError};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::get::{Format, table};

/// Why a node could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum NodeQueryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node's registration does not decode.
    #[error("registration of node {node}: {reason}")]
    BadRegistration { node: String, reason: String },
    /// No live registration under that name.
    #[error("no node {0} is registered (is its agent running?)")]
    NoSuchNode(String),
    /// The registration names no address.
    #[error("node {0} registered no address")]
    NoAddress(String),
    /// The agent's status endpoint did not answer as expected.
    #[error("agent of node {node} at {addr}: {reason}")]
    Agent { node: String, addr: SocketAddr, reason: String },
}

/// The address a node's agent answers on: its underlay address, else its first address.
pub async fn agent_addr(store: &Arc<dyn Store>, node: &str, port: u16) -> Result<SocketAddr, NodeQueryError> {
    let kv = store.get(&keys::node(node)).await?.ok_or_else(|| NodeQueryError::NoSuchNode(node.into()))?;
    let reg: NodeRegistration = contiv_cluster_model::decode(&kv.value)
        .map_err(|e| NodeQueryError::BadRegistration { node: node.into(), reason: e.to_string() })?;
    let ip = reg
        .uplink_ip
        .map(IpAddr::V4)
        .or_else(|| reg.addresses.iter().find_map(|a| a.address.parse::<IpAddr>().ok()))
        .ok_or_else(|| NodeQueryError::NoAddress(node.into()))?;
    Ok(SocketAddr::new(ip, port))
}

/// GET `path` from a node's agent; the JSON body.
pub async fn agent_get(node: &str, addr: SocketAddr, path: &str) -> Result<Value, NodeQueryError> {
    let err = |reason: String| NodeQueryError::Agent { node: node.into(), addr, reason };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| err(format!("connecting: {e}")))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| err(e.to_string()))?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.map_err(|e| err(e.to_string()))?;
        Ok::<_, NodeQueryError>(resp)
    };
    let resp = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| err("no answer within 10 s".into()))??;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| err("not an HTTP response".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(err(format!("{}: {}", head.lines().next().unwrap_or(""), body.trim())));
    }
    serde_json::from_str(body).map_err(|e| err(format!("not JSON: {e}")))
}

/// `netctl get policies --node N`: per pod of the node (optionally one namespace / one
/// pod), its isolation and every POLICY entry: the peers and what they may use.
pub async fn policies(
    store: &Arc<dyn Store>,
    node: &str,
    port: u16,
    namespace: Option<&str>,
    pod: Option<&str>,
    format: Format,
) -> Result<String, NodeQueryError> {
    let addr = agent_addr(store, node, port).await?;
    let mut report = agent_get(node, addr, "/policies").await?;
    if let Some(pods) = report.get_mut("pods").and_then(Value::as_array_mut) {
        pods.retain(|p| namespace.is_none_or(|n| p["podNamespace"] == n) && pod.is_none_or(|n| p["podName"] == n));
    }
    if format == Format::Json {
        let mut s = serde_json::to_string_pretty(&report).unwrap_or_default();
        s.push('\n');
        return Ok(s);
    }
    let mut rows = vec![];
    for p in report["pods"].as_array().into_iter().flatten() {
        let name = format!("{}/{}", p["podNamespace"].as_str().unwrap_or(""), p["podName"].as_str().unwrap_or(""));
        let ip = p["ip"].as_str().unwrap_or("").to_owned();
        for (dir, isolated, list) in
            [("ingress", &p["ingressIsolated"], &p["ingress"]), ("egress", &p["egressIsolated"], &p["egress"])]
        {
            if *isolated != Value::Bool(true) {
                rows.push(vec![name.clone(), ip.clone(), dir.into(), "(not isolated)".into(), "any".into()]);
                continue;
            }
            let entries = list.as_array().cloned().unwrap_or_default();
            if entries.is_empty() {
                rows.push(vec![name.clone(), ip.clone(), dir.into(), "(no entry)".into(), "none".into()]);
            }
            for e in entries {
                let allowed: Vec<&str> =
                    e["allowed"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                rows.push(vec![
                    name.clone(),
                    ip.clone(),
                    dir.into(),
                    e["peer"].as_str().unwrap_or("").into(),
                    allowed.join(","),
                ]);
            }
        }
    }
    let mut out = table(&["POD", "IP", "DIRECTION", "PEER", "ALLOWED"], &rows);
    if report["modelLoaded"] == Value::Bool(false) {
        out.push_str("note: the agent has not loaded the cluster model yet; this is what it found installed\n");
    }
    for problem in report["problems"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        out.push_str(&format!("problem: {problem}\n"));
    }
    Ok(out)
}
