//! `netctl monitor` and `netctl trace`: a node's datapath, live, through its agent.
//!
//! Which agent: `--node N` (its address from its registration, as `get policies --node`
//! finds it), else the node the pod named by `--pod` / `--from` runs on (its Pod object's
//! `spec.nodeName` in the store), else `--agent` (this node's, by default).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use contiv_cluster_model::{ClusterObject, keys};
use contiv_store::Store;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::node::{NodeQueryError, agent_addr};

/// Why a stream or a trace failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Node(#[from] NodeQueryError),
    #[error(transparent)]
    Store(#[from] contiv_store::StoreError),
    #[error("pod {0}: expected NAMESPACE/NAME")]
    PodName(String),
    #[error("no pod {0} in the store (pass --node to ask a node's agent anyway)")]
    NoSuchPod(String),
    #[error("pod {0} is not scheduled to a node yet")]
    Unscheduled(String),
    #[error("agent at {addr}: {reason}")]
    Agent { addr: String, reason: String },
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
}

/// Which agent to ask.
#[derive(Debug, Clone)]
pub enum Target {
    /// Node N's agent (registration address, status port).
    Node(String),
    /// The agent of the node the pod runs on.
    PodsNode(String),
    /// This address.
    Address(String),
}

/// The agent's status address for a target.
pub async fn resolve(store: Option<&Arc<dyn Store>>, target: &Target, port: u16) -> Result<String, InspectError> {
    let (store, node) = match (store, target) {
        (_, Target::Address(a)) => return Ok(a.clone()),
        (Some(store), Target::Node(n)) => (store, n.clone()),
        (Some(store), Target::PodsNode(pod)) => {
            let (ns, name) = pod.split_once('/').ok_or_else(|| InspectError::PodName(pod.clone()))?;
            let key = keys::ObjectRef::namespaced(keys::Kind::Pod, ns, name).key();
            let kv = store.get(&key).await?.ok_or_else(|| InspectError::NoSuchPod(pod.clone()))?;
            let node = match ClusterObject::decode(&kv.key, &kv.value) {
                Ok(ClusterObject::Pod(p)) => p.node_name,
                _ => None,
            };
            (store, node.ok_or_else(|| InspectError::Unscheduled(pod.clone()))?)
        }
        (None, _) => unreachable!("a store is opened for node and pod targets"),
    };
    Ok(agent_addr(store, &node, port).await?.to_string())
}

/// Percent-encodes a query value.
pub(crate) fn q(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An HTTP/1.1 GET whose body is read as it arrives: the status and a line reader.
struct Response {
    status: u16,
    body: Body,
}

/// The body: chunked (what the agent streams), of a given length, or up to the close.
struct Body {
    reader: BufReader<tokio::net::TcpStream>,
    chunked: bool,
    /// Bytes left in the current chunk, or of a body with a content-length.
    left: usize,
    /// `content-length` was given.
    sized: bool,
    done: bool,
}

impl Body {
    /// The next body bytes (empty at the end).
    async fn next(&mut self) -> std::io::Result<Vec<u8>> {
        if self.done {
            return Ok(vec![]);
        }
        if !self.chunked {
            let want = if self.sized { self.left.min(16 * 1024) } else { 16 * 1024 };
            if want == 0 {
                self.done = true;
                return Ok(vec![]);
            }
            let mut buf = vec![0u8; want];
            let n = self.reader.read(&mut buf).await?;
            buf.truncate(n);
            self.left = self.left.saturating_sub(n);
            self.done = n == 0;
            return Ok(buf);
        }
        if self.left == 0 {
            let mut size = String::new();
            if self.reader.read_line(&mut size).await? == 0 {
                self.done = true;
                return Ok(vec![]);
            }
            let hex = size.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(hex, 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad chunk size {size:?}"))
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(vec![]);
            }
        }
        let mut buf = vec![0u8; self.left.min(16 * 1024)];
        let n = self.reader.read(&mut buf).await?;
        if n == 0 {
            self.done = true;
            return Ok(vec![]);
        }
        buf.truncate(n);
        self.left -= n;
        if self.left == 0 {
            let mut crlf = String::new();
            self.reader.read_line(&mut crlf).await?;
        }
        Ok(buf)
    }

    async fn read_to_end(&mut self) -> std::io::Result<Vec<u8>> {
        let mut all = vec![];
        loop {
            let b = self.next().await?;
            if b.is_empty() {
                return Ok(all);
            }
            all.extend(b);
        }
    }
}

async fn request(addr: &str, method: &str, path: &str) -> Result<Response, InspectError> {
    let err = |reason: String| InspectError::Agent { addr: addr.to_owned(), reason };
    let sa: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))?;
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(sa))
        .await
        .map_err(|_| err("no connection within 5 s".into()))?
        .map_err(|e| err(format!("connecting: {e}")))?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| err(e.to_string()))?;
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    reader.read_line(&mut head).await.map_err(|e| err(e.to_string()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| err(format!("not an HTTP response: {:?}", head.trim())))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).await.map_err(|e| err(e.to_string()))? == 0 || h.trim().is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
        if let Some(n) = lower.strip_prefix("content-length:") {
            length = n.trim().parse::<usize>().ok();
        }
    }
    let body = Body { reader, chunked, left: length.unwrap_or(0), sized: length.is_some(), done: false };
    Ok(Response { status, body })
}

/// A non-200 answer as an error (the agent says why in the body).
async fn refused(addr: &str, mut r: Response) -> InspectError {
    let body = r.body.read_to_end().await.unwrap_or_default();
    InspectError::Agent {
        addr: addr.to_owned(),
        reason: format!("{}: {}", r.status, String::from_utf8_lossy(&body).trim()),
    }
}

// === monitor ===

/// What `netctl monitor` asks for.
#[derive(Debug, Clone, Default)]
pub struct MonitorArgs {
    pub pod: Option<String>,
    pub drops: bool,
    /// Stop after this many events.
    pub count: Option<u64>,
    pub json: bool,
}

/// Streams the agent's events to `out` until it ends the stream (or `count` events).
pub async fn monitor(addr: &str, args: &MonitorArgs, out: &mut impl std::io::Write) -> Result<(), InspectError> {
    let mut path = "/monitor?".to_owned();
    if let Some(p) = &args.pod {
        path.push_str(&format!("pod={}&", q(p)));
    }
    if args.drops {
        path.push_str("drops=1");
    }
    let mut r = request(addr, "GET", path.trim_end_matches(['?', '&'])).await?;
    if r.status != 200 {
        return Err(refused(addr, r).await);
    }
    let mut pending: Vec<u8> = vec![];
    let mut events = 0u64;
    loop {
        let bytes = r
            .body
            .next()
            .await
            .map_err(|e| InspectError::Agent { addr: addr.to_owned(), reason: format!("reading the stream: {e}") })?;
        if bytes.is_empty() {
            return Err(InspectError::Agent { addr: addr.to_owned(), reason: "the agent ended the stream".into() });
        }
        pending.extend(bytes);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            let is_event = v["type"] == "event";
            let rendered = if args.json { text.to_owned() } else { render_notice(&v, text) };
            writeln!(out, "{rendered}").map_err(InspectError::Output)?;
            out.flush().map_err(InspectError::Output)?;
            if is_event {
                events += 1;
                if args.count.is_some_and(|c| events >= c) {
                    return Ok(());
                }
            }
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// One notice as a human line.
pub fn render_notice(v: &Value, raw: &str) -> String {
    match v["type"].as_str() {
        Some("hello") => {
            let filter = s(&v["filter"]);
            format!(
                "monitoring node {}: {} drop and flow events per second per CPU at most ({} CPUs, burst {}), flows {}{}",
                s(&v["node"]),
                s(&v["ratePerCpu"]),
                s(&v["cpus"]),
                s(&v["burst"]),
                if v["flows"] == true { "on" } else { "off" },
                if filter.is_empty() { String::new() } else { format!("; only {filter}") }
            )
        }
        Some("event") => render_event(v),
        Some("suppressed") => format!(
            "-- {} {} events suppressed by the rate limit (node-wide; {} in all); the packets were handled as usual --",
            s(&v["count"]),
            s(&v["kind"]),
            s(&v["total"])
        ),
        Some("lost") => format!(
            "-- {} {} events lost: the ring buffer was full ({} in all) --",
            s(&v["count"]),
            s(&v["kind"]),
            s(&v["total"])
        ),
        Some("lagged") => format!("-- lagged, {} events lost: this client read too slowly --", s(&v["count"])),
        _ => raw.to_owned(),
    }
}

fn endpoint(v: &Value, ip: &str, port: &str, pod: &str) -> String {
    let proto = s(&v["proto"]);
    let addr = match proto.as_str() {
        "TCP" | "UDP" | "SCTP" => format!("{}:{}", s(&v[ip]), s(&v[port])),
        _ => s(&v[ip]),
    };
    match v[pod].as_str() {
        Some(p) => format!("{addr} ({p})"),
        None => addr,
    }
}

/// `10:11:12.001500  x/a  TCP 10.1.1.2:40000 (x/a) -> 10.1.2.3:80 (y/b) SYN  dropped policy_egress  tc_from_pod`
pub fn render_event(v: &Value) -> String {
    let time = s(&v["time"]);
    let clock = time.split_once('T').map(|(_, t)| t.trim_end_matches('Z')).unwrap_or(&time).to_owned();
    let pod = v["pod"].as_str().unwrap_or("-");
    let proto = s(&v["proto"]);
    let mut what =
        format!("{proto} {} -> {}", endpoint(v, "src", "sport", "srcPod"), endpoint(v, "dst", "dport", "dstPod"));
    if proto == "ICMP" {
        what.push_str(&format!(" type {} code {}", s(&v["sport"]), s(&v["dport"])));
    }
    if let Some(f) = v["tcpFlags"].as_str() {
        what.push(' ');
        what.push_str(f);
    }
    let verdict = if v["kind"] == "drop" {
        format!("DROPPED {}", s(&v["reason"]))
    } else {
        match v["nextHop"].as_str() {
            Some(hop) => format!("FORWARDED {} to {hop}", s(&v["verdict"])),
            None => format!("FORWARDED {}", s(&v["verdict"])),
        }
    };
    format!("{clock}  {pod:<24} {what:<64} {verdict}  {}", s(&v["hook"]))
}

// === trace ===

/// What `netctl trace` asks for.
#[derive(Debug, Clone)]
pub struct TraceArgs {
    pub from: String,
    pub to: String,
    pub from_ip: Option<String>,
}

/// The agent's trace report (JSON).
pub async fn trace(addr: &str, args: &TraceArgs) -> Result<Value, InspectError> {
    let mut path = format!("/trace?from={}&to={}", q(&args.from), q(&args.to));
    if let Some(ip) = &args.from_ip {
        path.push_str(&format!("&fromIp={}", q(ip)));
    }
    let mut r = request(addr, "GET", &path).await?;
    if r.status != 200 {
        return Err(refused(addr, r).await);
    }
    let body =
        r.body.read_to_end().await.map_err(|e| InspectError::Agent { addr: addr.to_owned(), reason: e.to_string() })?;
    serde_json::from_slice(&body)
        .map_err(|e| InspectError::Agent { addr: addr.to_owned(), reason: format!("not a trace report: {e}") })
}

/// The second hop of a forwarded trace: the next node's agent runs its overlay program on
/// the frame the first hop sent. `None` when the first hop did not forward it.
pub async fn trace_arrival(store: &Arc<dyn Store>, first: &Value, port: u16) -> Option<Result<Value, InspectError>> {
    let (Some(node), Some(packet), Some(sender)) =
        (first["nextNode"].as_str(), first["packetOutHex"].as_str(), first["nodeIp"].as_str())
    else {
        return None;
    };
    let fetch = async {
        let addr = agent_addr(store, node, port).await?.to_string();
        let path = format!("/trace/arrival?packet={}&sender={}", q(packet), q(sender));
        let mut r = request(&addr, "GET", &path).await?;
        if r.status != 200 {
            return Err(refused(&addr, r).await);
        }
        let body = r
            .body
            .read_to_end()
            .await
            .map_err(|e| InspectError::Agent { addr: addr.clone(), reason: e.to_string() })?;
        serde_json::from_slice(&body)
            .map_err(|e| InspectError::Agent { addr: addr.clone(), reason: format!("not a trace report: {e}") })
    };
    Some(fetch.await)
}

/// A trace report as text: the packet, each step, the verdict; then the next node's.
pub fn render_trace(v: &Value) -> String {
    let mut out = render_hop(v);
    match &v["arrival"] {
        Value::Null => {}
        Value::String(error) => out.push_str(&format!("then on node {}: not traced: {error}\n", s(&v["nextNode"]))),
        arrival => {
            out.push_str(&format!("then on node {}:\n", s(&arrival["node"])));
            out.push_str(&render_hop(arrival));
        }
    }
    out
}

fn render_hop(v: &Value) -> String {
    // An arrival's header is the caller's ("then on node N:").
    let mut out = if v["program"]["name"] == "tc_from_overlay" {
        String::new()
    } else {
        format!("trace {} ({}) -> {} on node {}\n", s(&v["from"]), s(&v["podIp"]), s(&v["to"]), s(&v["node"]))
    };
    let packet = |p: &Value| {
        if p.is_null() {
            return "-".to_owned();
        }
        let ports = matches!(p["proto"].as_str(), Some("TCP" | "UDP" | "SCTP"));
        let (src, dst) = if ports {
            (format!("{}:{}", s(&p["src"]), s(&p["sport"])), format!("{}:{}", s(&p["dst"]), s(&p["dport"])))
        } else {
            (s(&p["src"]), s(&p["dst"]))
        };
        format!("{src} -> {dst} {} ttl {} ({} -> {})", s(&p["proto"]), s(&p["ttl"]), s(&p["srcMac"]), s(&p["dstMac"]))
    };
    out.push_str(&format!("  packet in:  {}\n", packet(&v["packet"])));
    let prog = &v["program"];
    out.push_str(&format!(
        "  program:    {} (id {}), {} {}, run by the kernel with BPF_PROG_TEST_RUN\n",
        s(&prog["name"]),
        s(&prog["id"]),
        if prog["attached"] == true { "attached to" } else { "NOT attached to" },
        s(&v["interface"])
    ));
    let steps = v["steps"].as_array().cloned().unwrap_or_default();
    let w = steps.iter().map(|st| s(&st["result"]).len()).max().unwrap_or(0);
    for (i, st) in steps.iter().enumerate() {
        out.push_str(&format!(
            "  {:>2}. {:<15} {:<w$}  {}\n",
            i + 1,
            s(&st["stage"]),
            s(&st["result"]),
            s(&st["detail"])
        ));
    }
    out.push_str(&format!("verdict: {} [{}]\n", s(&v["verdict"]), s(&v["action"])));
    if !v["packetOut"].is_null() && v["outcome"] != "dropped" {
        out.push_str(&format!("  packet out: {}\n", packet(&v["packetOut"])));
    }
    for n in v["notes"].as_array().into_iter().flatten() {
        out.push_str(&format!("note: {}\n", s(n)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_as_one_line() {
        let v: Value = serde_json::from_str(
            r#"{"type":"event","time":"2025-12-01T10:11:12.001500Z","kind":"drop","verdict":"dropped",
                "reason":"policy_egress","hook":"tc_from_pod","pod":"x/a","podIp":"10.1.1.2","proto":"TCP",
                "src":"10.1.1.2","sport":40000,"dst":"10.1.2.3","dport":80,"srcPod":"x/a","dstPod":"y/b",
                "tcpFlags":"SYN","len":74,"nextHop":null}"#,
        )
        .unwrap();
        let line = render_event(&v);
        assert!(line.starts_with("10:11:12.001500  x/a "), "{line}");
        assert!(line.contains("TCP 10.1.1.2:40000 (x/a) -> 10.1.2.3:80 (y/b) SYN"), "{line}");
        assert!(line.contains("DROPPED policy_egress  tc_from_pod"), "{line}");
        let v: Value = serde_json::from_str(r#"{"type":"suppressed","kind":"drop","count":12,"total":40}"#).unwrap();
        assert!(render_notice(&v, "").starts_with("-- 12 drop events suppressed by the rate limit"));
    }

    /// A fake agent answering one request with `response`, split into small writes.
    async fn fake_agent(response: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            for piece in response.as_bytes().chunks(7) {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
            }
            // Keep the stream open, as the agent does.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_chunked_stream_is_read_line_by_line_until_count_events() {
        let hello = r#"{"type":"hello","node":"n1","ratePerCpu":10,"burst":20,"flows":false,"cpus":2,"filter":""}"#;
        let ev = r#"{"type":"event","time":"2025-12-01T10:11:12.000001Z","kind":"drop","reason":"spoofed_ip","pod":"x/a","proto":"UDP","src":"10.1.1.9","sport":1,"dst":"10.1.1.3","dport":53,"hook":"tc_from_pod"}"#;
        let body =
            format!("{hello}\n{ev}\n{{\"type\":\"suppressed\",\"kind\":\"drop\",\"count\":5,\"total\":5}}\n{ev}\n");
        let mut chunked = String::new();
        // Chunk boundaries inside lines, as a stream may cut them.
        for part in body.as_bytes().chunks(50) {
            chunked.push_str(&format!("{:x}\r\n{}\r\n", part.len(), String::from_utf8_lossy(part)));
        }
        let response = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n{chunked}"
            )
            .into_boxed_str(),
        );
        let addr = fake_agent(response).await;
        let mut out = vec![];
        let args = MonitorArgs { count: Some(2), ..Default::default() };
        monitor(&addr, &args, &mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("monitoring node n1: 10 drop and flow events"), "{text}");
        assert!(
            lines[1].contains("UDP 10.1.1.9:1 -> 10.1.1.3:53") && lines[1].contains("DROPPED spoofed_ip"),
            "{text}"
        );
        assert!(lines[2].starts_with("-- 5 drop events suppressed"), "{text}");
    }

    #[tokio::test]
    async fn a_refusal_carries_the_agents_reason() {
        let body = "no pod x/b is attached on node node-1\n";
        let response = format!("HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        let addr = fake_agent(Box::leak(response.into_boxed_str())).await;
        let args = MonitorArgs { pod: Some("x/b".into()), ..Default::default() };
        let e = monitor(&addr, &args, &mut vec![]).await.unwrap_err().to_string();
        assert!(e.contains("404: no pod x/b is attached on node node-1"), "{e}");
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(q("x/a"), "x/a");
        assert_eq!(q("10.1.2.3:80/TCP"), "10.1.2.3:80/TCP");
        assert_eq!(q("a b&c"), "a%20b%26c");
    }
}
