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
    /// `--pod` matches none of the pods the node's agent reports.
    #[error("node {node} has no pod {pod} (its agent reports {known})")]
    NoSuchPod { node: String, pod: String, known: String },
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
/// pod), its isolation and every POLICY entry: the peers and what they may use. `pod` is
/// `NAMESPACE/NAME` (as for `monitor`, `trace` and `conntrack`) or a bare name (in
/// `namespace`, else in any); one that matches no pod of the node is an error.
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
    let (pod_namespace, pod_name) = match pod.map(|p| p.split_once('/').unwrap_or(("", p))) {
        Some(("", name)) => (namespace, Some(name)),
        Some((ns, name)) => (Some(ns), Some(name)),
        None => (namespace, None),
    };
    if let Some(pods) = report.get_mut("pods").and_then(Value::as_array_mut) {
        let reported: Vec<String> = pods
            .iter()
            .map(|p| format!("{}/{}", p["podNamespace"].as_str().unwrap_or(""), p["podName"].as_str().unwrap_or("")))
            .collect();
        pods.retain(|p| {
            namespace.is_none_or(|n| p["podNamespace"] == n)
                && pod_namespace.is_none_or(|n| p["podNamespace"] == n)
                && pod_name.is_none_or(|n| p["podName"] == n)
        });
        if let (Some(wanted), true) = (pod, pods.is_empty()) {
            let pod = match (wanted.contains('/'), namespace) {
                (false, Some(ns)) => format!("{ns}/{wanted}"),
                _ => wanted.to_owned(),
            };
            let known = match reported.len() {
                0 => "none".to_owned(),
                1..=5 => reported.join(", "),
                n => format!("{}, ... ({n} in all)", reported[..5].join(", ")),
            };
            return Err(NodeQueryError::NoSuchPod { node: node.into(), pod, known });
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use contiv_cluster_model::keys;
    use contiv_node_registry::NodeRegistration;
    use contiv_store::{Store, StoreConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{NodeQueryError, policies};
    use crate::get::Format;

    /// A store registering node-1 on 127.0.0.1, and the port of a fake agent answering every
    /// `/policies` request for pods x/a and x/b and y/b.
    async fn node_with_agent(dir: &std::path::Path) -> (Arc<dyn Store>, u16) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let pod = |ns: &str, name: &str, ip: &str| {
                serde_json::json!({"podNamespace": ns, "podName": name, "ip": ip, "ingressIsolated": true,
                    "ingress": [{"peer": "10.1.1.4/32", "allowed": ["TCP:80"]}], "egressIsolated": false, "egress": []})
            };
            let body = serde_json::json!({"node": "node-1", "modelLoaded": true,
                "pods": [pod("x", "a", "10.1.2.2"), pod("x", "b", "10.1.2.3"), pod("y", "b", "10.1.2.4")]})
            .to_string();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let store = contiv_store::open(&StoreConfig::embedded(dir)).await.unwrap();
        let reg = NodeRegistration {
            name: "node-1".into(),
            id: 1,
            addresses: vec![],
            pod_cidr: "10.1.2.0/24".parse().unwrap(),
            uplink_ip: Some("127.0.0.1".parse().unwrap()),
        };
        store.put(&keys::node("node-1"), contiv_cluster_model::encode(&reg), None).await.unwrap();
        (store, port)
    }

    /// The POD column of each row.
    fn pods(table: &str) -> Vec<&str> {
        table.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect()
    }

    #[tokio::test]
    async fn pod_is_namespace_slash_name_as_elsewhere_and_one_that_matches_nothing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (store, port) = node_with_agent(dir.path()).await;
        let get = |ns: Option<&'static str>, pod: Option<&'static str>| {
            let store = store.clone();
            async move { policies(&store, "node-1", port, ns, pod, Format::Table).await }
        };
        // NS/NAME, as `monitor --pod`, `trace --from` and `get conntrack --pod` take it.
        let t = get(None, Some("x/b")).await.unwrap();
        assert_eq!(pods(&t), ["x/b", "x/b"], "{t}");
        assert!(t.contains("10.1.1.4/32") && t.contains("TCP:80"), "{t}");
        // A bare name with -n, or alone (every namespace's).
        assert_eq!(pods(&get(Some("y"), Some("b")).await.unwrap()), ["y/b", "y/b"]);
        assert_eq!(pods(&get(None, Some("b")).await.unwrap()), ["x/b", "x/b", "y/b", "y/b"]);
        assert_eq!(pods(&get(Some("x"), None).await.unwrap()), ["x/a", "x/a", "x/b", "x/b"]);
        // No such pod: said, rather than an empty table.
        for (ns, pod, named) in [(None, "x/c", "x/c"), (Some("z"), "b", "z/b"), (Some("y"), "x/a", "x/a")] {
            let e = get(ns, Some(pod)).await.unwrap_err();
            assert!(matches!(&e, NodeQueryError::NoSuchPod { pod, .. } if pod == named), "{e}");
            assert_eq!(e.to_string(), format!("node node-1 has no pod {named} (its agent reports x/a, x/b, y/b)"));
        }
        let json = policies(&store, "node-1", port, None, Some("x/a"), Format::Json).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["pods"].as_array().unwrap().len(), 1, "{json}");
        assert_eq!(v["pods"][0]["podName"], "a");
    }
}
