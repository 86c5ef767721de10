//! What a node's agent enforces, from its status endpoint (`statusAddr`, loopback by
//! default: run netctl on that node, e.g. in the agent's pod). The agent reads these from
//! its eBPF maps, so they show what the datapath really does, not only what the store says.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

use crate::get::table;

/// Default status endpoint of the agent on this node.
pub const DEFAULT_AGENT: &str = "127.0.0.1:9192";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent at {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("agent at {addr}: {detail}")]
    Answer { addr: String, detail: String },
    #[error(
        "the agent at {addr} serves node {found:?}, not {wanted:?}: run netctl on node {wanted} (e.g. in its agent's pod) or pass --agent with its status address"
    )]
    WrongNode { addr: String, found: String, wanted: String },
}

/// How long the agent may take to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the agent may stay silent once connected.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// `10 s`, `250 ms`.
fn span(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{} s", d.as_secs()) } else { format!("{} ms", d.as_millis()) }
}

/// GET `path` of the agent's status endpoint as JSON.
pub fn get_json(addr: &str, path: &str) -> Result<Value, AgentError> {
    get_json_within(addr, path, ANSWER_TIMEOUT)
}

/// [`get_json`], the agent given `answer` of silence before netctl gives up.
fn get_json_within(addr: &str, path: &str, answer: Duration) -> Result<Value, AgentError> {
    let io = |source| AgentError::Io { addr: addr.to_owned(), source };
    // A socket timeout reads as "Resource temporarily unavailable" (EAGAIN): say what it is.
    let timed_out = |what: String| {
        move |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                AgentError::Answer { addr: addr.to_owned(), detail: what }
            }
            _ => AgentError::Io { addr: addr.to_owned(), source },
        }
    };
    let sa: SocketAddr = addr
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| AgentError::Answer { addr: addr.to_owned(), detail: "no address".into() })?;
    let mut s = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT)
        .map_err(timed_out(format!("no connection within {}", span(CONNECT_TIMEOUT))))?;
    s.set_read_timeout(Some(answer)).map_err(io)?;
    s.set_write_timeout(Some(answer)).map_err(io)?;
    let silent = || timed_out(format!("{path}: no answer within {}", span(answer)));
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(silent())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(silent())?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| AgentError::Answer { addr: addr.to_owned(), detail: "not an HTTP answer".into() })?;
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or("").to_owned();
        // The agent says why in the body's first line (an unknown pod, say).
        let why = body.lines().next().map(str::trim).filter(|l| !l.is_empty());
        let detail = match why {
            Some(why) => format!("{path}: {status}: {why}"),
            None => format!("{path}: {status}"),
        };
        return Err(AgentError::Answer { addr: addr.to_owned(), detail });
    }
    serde_json::from_str(body).map_err(|e| AgentError::Answer { addr: addr.to_owned(), detail: format!("{path}: {e}") })
}

/// The agent's report at `path`, checked to be node `node`'s (when given).
pub fn node_report(addr: &str, path: &str, node: Option<&str>) -> Result<Value, AgentError> {
    let v = get_json(addr, path)?;
    if let Some(wanted) = node {
        let found = v["node"].as_str().unwrap_or_default();
        if found != wanted {
            return Err(AgentError::WrongNode { addr: addr.into(), found: found.into(), wanted: wanted.into() });
        }
    }
    Ok(v)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `GET /services` as a table: one row per frontend with the backends programmed.
pub fn services_table(report: &Value, namespace: Option<&str>) -> String {
    if report["enabled"] == false {
        return format!(
            "services disabled on {} ([services] enabled = false): another proxy serves them\n",
            s(&report["node"])
        );
    }
    let mut rows = vec![];
    for f in report["frontends"].as_array().into_iter().flatten() {
        if namespace.is_some_and(|ns| f["namespace"] != ns) {
            continue;
        }
        let list = |k: &str| {
            let v: Vec<String> = f[k]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| format!("{}{}", s(&b["address"]), if b["local"] == true { "*" } else { "" }))
                .collect();
            if v.is_empty() { "<none>".to_owned() } else { v.join(",") }
        };
        let name =
            if f["portName"] == "" { s(&f["service"]) } else { format!("{}:{}", s(&f["service"]), s(&f["portName"])) };
        let flags: Vec<String> = f["flags"].as_array().into_iter().flatten().map(s).collect();
        rows.push(vec![
            s(&f["namespace"]),
            name,
            s(&f["kind"]),
            format!("{}/{}", s(&f["frontend"]), s(&f["protocol"])),
            list("backends"),
            if f["localBackends"].as_array().is_some_and(|a| !a.is_empty()) {
                list("localBackends")
            } else {
                "-".into()
            },
            s(&f["connections"]),
            s(&f["noEndpointRejects"]),
            flags.join(","),
        ]);
    }
    let mut out = table(
        &[
            "NAMESPACE",
            "SERVICE",
            "KIND",
            "FRONTEND",
            "BACKENDS (*: this node)",
            "LOCAL SET",
            "CONNS",
            "REJECTS",
            "FLAGS",
        ],
        &rows,
    );
    for sk in report["skipped"].as_array().into_iter().flatten() {
        out.push_str(&format!("not programmed: {}: {}\n", s(&sk["service"]), s(&sk["reason"])));
    }
    if let Some(line) = node_ports_line(report) {
        out.push_str(&line);
    }
    if let Some(line) = udp_sockets_line(report) {
        out.push_str(&line);
    }
    if let Some(line) = proxy_healthz_line(report) {
        out.push_str(&line);
    }
    out
}

/// The maps a node's report could not read (`readErrors`), each with why.
pub fn read_errors(report: &Value) -> Vec<String> {
    report["readErrors"].as_array().into_iter().flatten().map(s).collect()
}

/// The `/conntrack` request for these filters (each `NAMESPACE/NAME` but the namespace).
pub fn conntrack_path(
    pod: Option<&str>,
    service: Option<&str>,
    namespace: Option<&str>,
    limit: Option<usize>,
) -> String {
    let mut params: Vec<String> = [("pod", pod), ("service", service), ("namespace", namespace)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", crate::inspect::q(v))))
        .collect();
    if let Some(n) = limit {
        params.push(format!("limit={n}"));
    }
    if params.is_empty() { "/conntrack".into() } else { format!("/conntrack?{}", params.join("&")) }
}

/// `GET /conntrack` as a table: one row per flow, from the side that opened it, most
/// recently seen first.
pub fn conntrack_table(report: &Value) -> String {
    let named = |addr: &Value, pod: &Value| match pod.as_str() {
        Some(p) => format!("{} ({p})", s(addr)),
        None => s(addr),
    };
    let mut rows = vec![];
    for f in report["flows"].as_array().into_iter().flatten() {
        let mut notes: Vec<String> = vec![];
        if f["directed"] == false {
            notes.push("opener unknown".into());
        }
        if let Some(nat) = f["sourceNat"].as_str() {
            notes.push(format!("source NAT {nat}"));
        }
        if f["entries"] == 1 {
            notes.push("one direction".into());
        }
        notes.extend(f["flags"].as_array().into_iter().flatten().map(s));
        rows.push(vec![
            s(&f["protocol"]),
            named(&f["client"], &f["clientPod"]),
            named(&f["server"], &f["serverPod"]),
            if f["backend"].is_null() { "-".into() } else { named(&f["backend"], &f["backendPod"]) },
            f["service"].as_str().unwrap_or("-").to_owned(),
            f["state"].as_str().unwrap_or("-").to_owned(),
            duration(f["idleSeconds"].as_u64().unwrap_or_default()),
            duration(f["expiresInSeconds"].as_u64().unwrap_or_default()),
            notes.join(", "),
        ]);
    }
    let filter = report["filter"].as_str().filter(|f| !f.is_empty());
    let matched = report["matched"].as_u64().unwrap_or_default();
    let shown = rows.len() as u64;
    let mut out = format!(
        "node {}: {} of {} conntrack entries, {} flows{}{}\n",
        s(&report["node"]),
        s(&report["entries"]),
        s(&report["max"]),
        s(&report["flowsTotal"]),
        filter.map(|f| format!(", {matched} matching {f}")).unwrap_or_default(),
        if shown < matched { format!("; the {shown} most recently seen shown (--limit)") } else { String::new() },
    );
    out.push_str(&table(
        &["PROTO", "CLIENT", "SERVER", "BACKEND", "SERVICE", "STATE", "IDLE", "EXPIRES IN", "NOTES"],
        &rows,
    ));
    out
}

/// `3h2m`, `5m10s`, `42s`.
fn duration(secs: u64) -> String {
    let (h, m, sec) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{sec}s")
    } else {
        format!("{sec}s")
    }
}

/// Said only when the node's table of connected UDP sockets to services was ever full: those
/// balanced then keep their backend even if it leaves the service.
fn udp_sockets_line(report: &Value) -> Option<String> {
    let untracked = report["udpSocketsUntrackedTotal"].as_u64().filter(|n| *n > 0)?;
    Some(format!(
        "connected UDP sockets to services: {} of {} tracked; {untracked} balanced while the table was full are not \
         (raise [services] connectedUdpSockets)\n",
        s(&report["udpSocketsTracked"]),
        s(&report["udpSocketsMax"]),
    ))
}

/// Where this node's NodePorts answer, when `nodePortAddresses` narrows it (by default every
/// node address and localhost do, and nothing is said).
fn node_ports_line(report: &Value) -> Option<String> {
    let setting: Vec<String> = report["nodePortAddresses"].as_array()?.iter().map(s).collect();
    if setting.is_empty() {
        return None;
    }
    let (mut on, mut off) = (vec![], vec![]);
    for a in report["nodeAddresses"].as_array().into_iter().flatten().filter(|a| a["thisNode"] == true) {
        let Some(ip) = a["address"].as_str() else { continue };
        if a["nodePorts"] == true { on.push(ip) } else { off.push(ip) }
    }
    if on.is_empty() && off.is_empty() {
        // An agent lists its own addresses; one from before they were listed as objects
        // (mid-upgrade) lists strings, about which nothing is said rather than "none".
        return None;
    }
    let list = |v: &[&str]| if v.is_empty() { "none".to_owned() } else { v.join(", ") };
    Some(format!(
        "nodePortAddresses [{}]: NodePorts answer on {}; not on {}\n",
        setting.join(", "),
        list(&on),
        list(&off)
    ))
}

/// What the node's proxy `/healthz` (kube-proxy's port 10256) answers load balancers, and why.
fn proxy_healthz_line(report: &Value) -> Option<String> {
    if let Some(waiting) = report["proxyHealthzWaiting"].as_str() {
        return Some(format!("proxy healthz not listening: cannot bind {waiting}\n"));
    }
    let addr = report["proxyHealthzAddress"].as_str()?;
    let h = &report["proxyHealth"];
    let mut why = vec![];
    if h["nodeEligible"] == false {
        why.push("the node is being deleted".to_owned());
    }
    if h["healthy"] == false {
        let waited = h["pendingSeconds"].as_f64().unwrap_or_default();
        why.push(format!("a change has waited {waited:.0} s to reach the maps"));
    }
    Some(if why.is_empty() {
        format!("proxy healthz on {addr}: 200\n")
    } else {
        format!("proxy healthz on {addr}: 503 ({})\n", why.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn maps_the_agent_could_not_read_are_named() {
        assert!(super::read_errors(&json!({"frontends": [], "readErrors": []})).is_empty());
        assert!(super::read_errors(&json!({"frontends": []})).is_empty(), "an older agent");
        let r = json!({"frontends": [], "readErrors": ["map SVC_FRONTENDS: Operation not permitted"]});
        assert_eq!(super::read_errors(&r), ["map SVC_FRONTENDS: Operation not permitted"]);
    }

    #[test]
    fn the_services_table_ends_with_what_the_proxy_healthz_answers() {
        let ok = json!({"frontends": [], "proxyHealthzAddress": "0.0.0.0:10256",
                        "proxyHealth": {"healthy": true, "nodeEligible": true}});
        assert!(super::services_table(&ok, None).ends_with("proxy healthz on 0.0.0.0:10256: 200\n"));
        let draining = json!({"frontends": [], "proxyHealthzAddress": "0.0.0.0:10256",
                              "proxyHealth": {"healthy": false, "nodeEligible": false, "pendingSeconds": 75.2}});
        let t = super::services_table(&draining, None);
        assert!(t.ends_with("503 (the node is being deleted; a change has waited 75 s to reach the maps)\n"), "{t}");
        let off = json!({"frontends": [], "proxyHealthzAddress": null});
        assert!(!super::services_table(&off, None).contains("healthz"));
        let waiting = json!({"frontends": [], "proxyHealthzWaiting": "0.0.0.0:10256: address in use"});
        let t = super::services_table(&waiting, None);
        assert!(t.ends_with("proxy healthz not listening: cannot bind 0.0.0.0:10256: address in use\n"), "{t}");
    }

    #[test]
    fn a_node_with_services_disabled_says_so() {
        let r = json!({"node": "node-1", "enabled": false, "conntrackEntries": 4});
        assert_eq!(
            super::services_table(&r, None),
            "services disabled on node-1 ([services] enabled = false): another proxy serves them\n"
        );
        // Reports of agents from before the field: a table as ever.
        assert!(!super::services_table(&json!({"frontends": []}), None).contains("disabled"));
    }

    #[test]
    fn the_services_table_says_when_connected_udp_sockets_went_untracked() {
        let full =
            json!({"frontends": [], "udpSocketsTracked": 16, "udpSocketsMax": 16, "udpSocketsUntrackedTotal": 3});
        assert_eq!(
            super::services_table(&full, None).lines().last(),
            Some(
                "connected UDP sockets to services: 16 of 16 tracked; 3 balanced while the table was full are not \
                 (raise [services] connectedUdpSockets)"
            )
        );
        for quiet in [
            json!({"frontends": [], "udpSocketsTracked": 2, "udpSocketsMax": 16, "udpSocketsUntrackedTotal": 0}),
            json!({"frontends": []}),
        ] {
            assert!(!super::services_table(&quiet, None).contains("UDP sockets"), "{quiet}");
        }
    }

    #[test]
    fn the_services_table_says_where_node_ports_answer_when_node_port_addresses_narrows_it() {
        let narrowed = json!({"frontends": [], "nodePortAddresses": ["192.168.100.0/28"], "nodeAddresses": [
            {"address": "192.168.100.11", "thisNode": true, "nodePorts": true},
            {"address": "192.168.100.12", "thisNode": false, "nodePorts": true},
            {"address": "192.168.100.111", "thisNode": true, "nodePorts": false},
            {"address": "203.0.113.5", "thisNode": false, "nodePorts": false}]});
        assert_eq!(
            super::services_table(&narrowed, None).lines().last(),
            Some("nodePortAddresses [192.168.100.0/28]: NodePorts answer on 192.168.100.11; not on 192.168.100.111")
        );
        let unset = json!({"frontends": [], "nodePortAddresses": [], "nodeAddresses": [
            {"address": "192.168.100.11", "thisNode": true, "nodePorts": true}]});
        assert!(!super::services_table(&unset, None).contains("nodePortAddresses"));
        let older_agent = json!({"frontends": [], "nodePortAddresses": ["192.168.100.0/28"],
                                 "nodeAddresses": ["192.168.100.11 (this node)"]});
        assert!(!super::services_table(&older_agent, None).contains("nodePortAddresses"));
    }

    #[test]
    fn conntrack_flows_read_from_the_client_side_with_what_is_unusual_noted() {
        let report = json!({
            "node": "node-1", "entries": 5, "max": 262144, "flowsTotal": 3, "matched": 2, "filter": "namespace=x",
            "flows": [
                {"protocol": "TCP", "client": "10.1.1.2:40000", "clientPod": "x/a", "server": "10.96.0.10:80",
                 "serverPod": null, "backend": "10.1.1.3:8080", "backendPod": "x/b", "sourceNat": null,
                 "service": "x/web:http", "directed": true, "state": "established", "idleSeconds": 2,
                 "expiresInSeconds": 21598, "entries": 2, "flags": []},
                {"protocol": "UDP", "client": "10.1.2.4:35000", "clientPod": null, "server": "10.1.1.2:53",
                 "serverPod": "x/a", "backend": null, "backendPod": null, "sourceNat": null, "service": null,
                 "directed": false, "state": null, "idleSeconds": 70, "expiresInSeconds": 0, "entries": 2, "flags": []}
            ]
        });
        let t = super::conntrack_table(&report);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "node node-1: 5 of 262144 conntrack entries, 3 flows, 2 matching namespace=x");
        assert!(lines[1].starts_with("PROTO"), "{t}");
        let row: Vec<&str> = lines[2].split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(
            row,
            [
                "TCP",
                "10.1.1.2:40000 (x/a)",
                "10.96.0.10:80",
                "10.1.1.3:8080 (x/b)",
                "x/web:http",
                "established",
                "2s",
                "5h59m"
            ]
        );
        let row: Vec<&str> = lines[3].split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(row, ["UDP", "10.1.2.4:35000", "10.1.1.2:53 (x/a)", "-", "-", "-", "1m10s", "0s", "opener unknown"]);

        // A limit that cut the list says so; no filter, no "matching".
        let mut cut = report.clone();
        cut["filter"] = json!("");
        cut["matched"] = json!(3);
        cut["flows"].as_array_mut().unwrap().truncate(1);
        let t = super::conntrack_table(&cut);
        assert_eq!(
            t.lines().next().unwrap(),
            "node node-1: 5 of 262144 conntrack entries, 3 flows; the 1 most recently seen shown (--limit)"
        );
    }

    #[test]
    fn an_agent_that_does_not_answer_is_said_to_not_answer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // Accepts, reads the request, and says nothing.
        let silent = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut s, &mut buf);
            std::thread::sleep(std::time::Duration::from_millis(600));
        });
        let e = super::get_json_within(&addr, "/services", std::time::Duration::from_millis(250)).unwrap_err();
        assert_eq!(e.to_string(), format!("agent at {addr}: /services: no answer within 250 ms"));
        assert_eq!(super::span(super::ANSWER_TIMEOUT), "10 s");
        silent.join().unwrap();
    }

    #[test]
    fn conntrack_requests_carry_only_the_filters_given() {
        assert_eq!(super::conntrack_path(None, None, None, None), "/conntrack");
        assert_eq!(
            super::conntrack_path(Some("x/a"), Some("x/web"), Some("x"), Some(0)),
            "/conntrack?pod=x/a&service=x/web&namespace=x&limit=0"
        );
        assert_eq!(super::conntrack_path(Some("x/a b"), None, None, None), "/conntrack?pod=x/a%20b");
    }
}
