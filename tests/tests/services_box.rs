//! Services in the cluster in a box (root), from real Service and EndpointSlice YAML applied
//! with `netctl apply`: ClusterIP (TCP and UDP, named target ports whose numbers differ per
//! pod, several ports), NodePort from outside, from pods and from hosts, externalIPs and
//! load-balancer IPs (VIP mode programmed, Proxy mode left to the balancer), session affinity, traffic policies Local (health check node port,
//! client source preserved), refusals without endpoints, hairpin, source ranges, services
//! left to other proxies, terminating endpoints, endpoint changes, agent restarts, and that
//! one node's socket programs never translate another node's connections, topology hints
//! (zones), the proxy's health server on port 10256 (a node the autoscaler is about to
//! delete says 503), ICMP errors about translated flows reaching the sockets they quote,
//! `netctl get conntrack` showing a node's flows, `nodePortAddresses` limiting the addresses NodePorts answer on, fragmented datagrams
//! through pods, services and NodePorts (with and without NetworkPolicy), and source ranges
//! admitting the node's own connections when they hold its address, endpoints outside
//! the cluster (a Service without a selector) serving pods, nodes and NodePorts, flows whose
//! replies would meet (one socket, two services with one backend) taking another source port,
//! and a node's unconnected UDP socket keeping its backend, and services (with a healthy
//! `/healthz`) kept while the store has lost its data.
//!
//! Every box has its own agents, etcd and namespaces, so the tests run in parallel.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use contiv_tests::{
    cluster::{
        BEYOND_IP, BoxOptions, BoxPod, ClusterBox, ContainerPort, EXTERNAL_IP, ROUTER_IP, enter, ip_in, send_frame,
    },
    dump_pinned_map, set_ip_options,
};
use serde_json::Value;

fn ports(spec: &[&str]) -> Vec<ContainerPort> {
    spec.iter().map(|s| s.parse().unwrap()).collect()
}

/// A server in a pod answering every TCP connection and UDP datagram on `port` with
/// "NAME CLIENT-IP:PORT". TCP connections stay open and echo further lines ("NAME LINE").
fn serve(pod: &BoxPod, port: u16) {
    serve_in(&pod.netns, &pod.name, port);
}

/// `serve` in any namespace, answering as `name`.
fn serve_in(netns: &str, name: &str, port: u16) {
    serve_at(netns, name, Ipv4Addr::UNSPECIFIED, port);
}

/// `serve_in` on one address (whose UDP answers then come from that address).
fn serve_at(netns: &str, name: &str, ip: Ipv4Addr, port: u16) {
    let name = name.to_owned();
    let listener = enter(netns, move || TcpListener::bind((ip, port)).expect("bind tcp"));
    let udp = enter(netns, move || UdpSocket::bind((ip, port)).expect("bind udp"));
    let n = name.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let name = n.clone();
            std::thread::spawn(move || {
                let peer = c.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                let mut buf = [0u8; 256];
                let mut first = true;
                loop {
                    let Ok(k) = c.read(&mut buf) else { return };
                    if k == 0 {
                        return;
                    }
                    let reply = if first {
                        format!("{name} {peer}\n")
                    } else {
                        format!("{name} {}", String::from_utf8_lossy(&buf[..k]))
                    };
                    first = false;
                    if c.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        loop {
            let Ok((_, peer)) = udp.recv_from(&mut buf) else { return };
            let _ = udp.send_to(format!("{name} {peer}\n").as_bytes(), peer);
        }
    });
}

/// What a TCP exchange with a service gave: the server's name, the client address the
/// server saw, and the peer address the client's socket reports.
#[derive(Debug)]
struct Answer {
    server: String,
    seen: SocketAddr,
    peer: SocketAddr,
}

fn parse(reply: &str) -> (String, SocketAddr) {
    let mut it = reply.split_whitespace();
    let server = it.next().unwrap_or_default().to_owned();
    let seen = it.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad reply {reply:?}"));
    (server, seen)
}

/// One TCP connection from namespace `ns` (optionally from `src`): connect, ask, answer.
fn tcp_ask_from(ns: &str, src: Option<Ipv4Addr>, addr: SocketAddr, timeout: Duration) -> std::io::Result<Answer> {
    tcp_ask_with(ns, addr, timeout, move |s| match src {
        Some(src) => s.bind(&SocketAddr::from((src, 0)).into()),
        None => Ok(()),
    })
}

/// One TCP exchange from a fresh socket in `ns`, which `setup` prepares before it connects.
fn tcp_ask_with(
    ns: &str,
    addr: SocketAddr,
    timeout: Duration,
    setup: impl FnOnce(&socket2::Socket) -> std::io::Result<()> + Send + 'static,
) -> std::io::Result<Answer> {
    enter(ns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        setup(&s)?;
        s.connect_timeout(&addr.into(), timeout)?;
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"hello")?;
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed"));
        }
        let (server, seen) = parse(&String::from_utf8_lossy(&buf[..n]));
        Ok(Answer { server, seen, peer: s.peer_addr()? })
    })
}

fn tcp_ask(ns: &str, addr: SocketAddr) -> std::io::Result<Answer> {
    tcp_ask_from(ns, None, addr, Duration::from_secs(3))
}

/// One UDP exchange from a fresh socket: the server's name, the client address it saw and
/// the address the answer came from.
fn udp_ask(ns: &str, addr: SocketAddr) -> std::io::Result<Answer> {
    enter(ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(b"question", addr)?;
        let mut buf = [0u8; 256];
        let (n, from) = s.recv_from(&mut buf)?;
        let (server, seen) = parse(&String::from_utf8_lossy(&buf[..n]));
        Ok(Answer { server, seen, peer: from })
    })
}

/// One UDP exchange from a fresh socket connect()ed to `addr` (balanced at connect, where
/// the node's own sockets are): the answer's source as recv_from() reports it, and the
/// socket's peer as getpeername() reports it.
fn udp_connected_ask(ns: &str, addr: SocketAddr) -> std::io::Result<(Answer, UdpSocket)> {
    enter(ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.connect(addr)?;
        s.send(b"question")?;
        let mut buf = [0u8; 256];
        let (n, from) = s.recv_from(&mut buf)?;
        let (server, seen) = parse(&String::from_utf8_lossy(&buf[..n]));
        assert_eq!(s.peer_addr()?, addr, "getpeername of a connected UDP socket shows the service");
        Ok((Answer { server, seen, peer: from }, s))
    })
}

/// Which servers answered `n` TCP connections from `ns` to `addr` (panics on a failure).
fn tcp_servers(ns: &str, addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let a = tcp_ask(ns, addr).unwrap_or_else(|e| panic!("TCP from {ns} to {addr}: {e}"));
        assert_eq!(a.peer, addr, "getpeername shows the service frontend, not the backend");
        *seen.entry(a.server).or_default() += 1;
    }
    seen
}

fn udp_servers(ns: &str, addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let a = udp_ask(ns, addr).unwrap_or_else(|e| panic!("UDP from {ns} to {addr}: {e}"));
        assert_eq!(a.peer, addr, "the answer comes from the service frontend");
        *seen.entry(a.server).or_default() += 1;
    }
    seen
}

fn names(m: &BTreeMap<String, usize>) -> BTreeSet<&str> {
    m.keys().map(String::as_str).collect()
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::from((ip.parse::<Ipv4Addr>().unwrap(), port))
}

/// Waits until node `node` programs `frontend` ("ip:port") with `backends` Cluster-set entries.
fn wait_programmed(b: &ClusterBox, node: &str, frontend: &str, backends: usize) {
    b.wait_for(Duration::from_secs(15), &format!("{node} programs {frontend} with {backends} backends"), || {
        b.status_json(node, "/services").is_some_and(|r| {
            r["frontends"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| f["frontend"] == frontend && f["backends"].as_array().map_or(0, |a| a.len()) == backends)
        })
    });
}

fn slice_yaml(svc: &str, name: &str, ports: &[(&str, &str, u16)], endpoints: &[(&BoxPod, &str)]) -> String {
    let ports: Vec<String> =
        ports.iter().map(|(n, p, port)| format!("- {{name: \"{n}\", protocol: {p}, port: {port}}}")).collect();
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(p, cond)| format!("- addresses: [{}]\n  conditions: {cond}\n  nodeName: {}", p.ip, p.node))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n{}\nendpoints:{}\n",
        ports.join("\n"),
        if eps.is_empty() { " []".to_owned() } else { format!("\n{}", eps.join("\n")) }
    )
}

const READY: &str = "{ready: true, serving: true, terminating: false}";

/// Two nodes: web-1 on node-1 (its "http" port is 8080), web-2 on node-2 ("http" is 9090),
/// a client pod on each node.
fn web_box(agent_config: &str) -> (ClusterBox, [BoxPod; 4]) {
    let mut opts = BoxOptions::for_test(2);
    opts.agent_config = agent_config.to_owned();
    let mut b = ClusterBox::up(opts);
    let w1 = b.add_pod("node-1", "default/web-1", &[("app", "web")], &ports(&["http=8080", "dns=8080/UDP"]));
    let w2 = b.add_pod("node-2", "default/web-2", &[("app", "web")], &ports(&["http=9090", "dns=9090/UDP"]));
    let c1 = b.add_pod("node-1", "default/c1", &[("app", "client")], &[]);
    let c2 = b.add_pod("node-2", "default/c2", &[("app", "client")], &[]);
    serve(&w1, 8080);
    serve(&w2, 9090);
    (b, [w1, w2, c1, c2])
}

fn web_slices(svc: &str, w1: &BoxPod, w2: &BoxPod) -> String {
    format!(
        "{}---\n{}",
        slice_yaml(svc, &format!("{svc}-a"), &[("http", "TCP", 8080), ("dns", "UDP", 8080)], &[(w1, READY)]),
        slice_yaml(svc, &format!("{svc}-b"), &[("http", "TCP", 9090), ("dns", "UDP", 9090)], &[(w2, READY)])
    )
}

#[test]
fn services_box_clusterip_nodeport_and_external_ips_from_pods_hosts_and_outside() {
    // A VXLAN port other than IANA's (flannel's), so everything below crossing nodes also
    // shows the overlay follows `vxlanPort`: the device, the programs' own encapsulation,
    // and the uplink programs' fast exit for the overlay's packets.
    let (mut b, [w1, w2, c1, c2]) = web_box("vxlanPort = 8472\n");
    for node in ["node-1", "node-2"] {
        let link = ip_in(&b.node(node).netns, &["-d", "link", "show", "cvx0"]);
        assert!(link.contains("dstport 8472"), "{node}'s overlay on vxlanPort: {link}");
    }
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  externalIPs: [198.51.100.7]
  selector: {{app: web}}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: dns, nodePort: 30053}}
---
apiVersion: v1
kind: Service
metadata: {{name: itp, namespace: default}}
spec:
  clusterIP: 10.96.0.11
  clusterIPs: [10.96.0.11]
  internalTrafficPolicy: Local
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http}}
---
{}---
{}"#,
        web_slices("web", &w1, &w2),
        web_slices("itp", &w1, &w2)
    ));
    for node in ["node-1", "node-2"] {
        wait_programmed(&b, node, "10.96.0.10:80", 2);
        wait_programmed(&b, node, "10.96.0.11:80", 2);
    }
    let both: BTreeSet<&str> = ["web-1", "web-2"].into();

    // ClusterIP, TCP: balanced over both pods, each on its own number for the named port,
    // the client's own address seen by the server (no SNAT inside the cluster).
    for c in [&c1, &c2] {
        let seen = tcp_servers(&c.netns, sa("10.96.0.10", 80), 24);
        assert_eq!(names(&seen), both, "from {}: {seen:?}", c.name);
        let a = tcp_ask(&c.netns, sa("10.96.0.10", 80)).unwrap();
        assert_eq!(a.seen.ip(), std::net::IpAddr::V4(c.ip), "the backend sees the client pod");
        // UDP (DNS-like): balanced per flow, answered from the service address.
        let seen = udp_servers(&c.netns, sa("10.96.0.10", 53), 24);
        assert_eq!(names(&seen), both, "UDP from {}: {seen:?}", c.name);
    }
    // From the host (kubelet, host-network pods): TCP and UDP.
    let n1 = b.node("node-1").clone();
    assert_eq!(names(&tcp_servers(&n1.netns, sa("10.96.0.10", 80), 24)), both);
    assert_eq!(names(&udp_servers(&n1.netns, sa("10.96.0.10", 53), 24)), both);
    // A connected UDP socket: its answers come from the service; connected again, straight
    // to the very backend that answered, it shows that pod (a connect() that is not to a
    // service forgets what the earlier one recorded).
    let (a, s) = udp_connected_ask(&n1.netns, sa("10.96.0.10", 53)).unwrap();
    assert_eq!(a.peer, sa("10.96.0.10", 53), "a connected UDP socket's answer comes from the service");
    let direct = if a.server == w1.name { SocketAddr::from((w1.ip, 8080)) } else { SocketAddr::from((w2.ip, 9090)) };
    let seen = enter(&n1.netns, move || -> std::io::Result<(SocketAddr, SocketAddr)> {
        s.connect(direct)?;
        s.send(b"question")?;
        let mut buf = [0u8; 256];
        let (_, from) = s.recv_from(&mut buf)?;
        Ok((from, s.peer_addr()?))
    })
    .unwrap();
    assert_eq!(seen, (direct, direct), "connected again to the pod itself, the socket shows the pod");

    // NodePort: from outside to either node (a remote backend answers through the node the
    // client chose), from a pod to the other node's address, from a host to its own.
    let ext = b.netns_of("external").unwrap();
    for node_ip in [n1.ip, b.node("node-2").ip] {
        let addr = SocketAddr::from((node_ip, 30080));
        let mut seen = BTreeSet::new();
        for _ in 0..24 {
            let a = tcp_ask(&ext, addr).unwrap_or_else(|e| panic!("outside -> {addr}: {e}"));
            seen.insert(a.server);
        }
        assert_eq!(seen.len(), 2, "outside -> {addr} reaches both backends: {seen:?}");
        assert!(udp_ask(&ext, SocketAddr::from((node_ip, 30053))).is_ok(), "UDP NodePort from outside");
    }
    let a = tcp_ask(&c1.netns, SocketAddr::from((b.node("node-2").ip, 30080))).unwrap();
    assert!(both.contains(a.server.as_str()));
    assert!(tcp_ask(&n1.netns, SocketAddr::from((n1.ip, 30080))).is_ok(), "host -> own NodePort");
    assert!(tcp_ask(&n1.netns, sa("127.0.0.1", 30080)).is_ok(), "host -> localhost:NodePort");

    // externalIPs: from outside (routed to node-1, as a router would) and from a pod.
    assert!(
        b.cmd("external", "ip")
            .args(["route", "add", "198.51.100.0/24", "via"])
            .arg(n1.ip.to_string())
            .status()
            .unwrap()
            .success()
    );
    let a = tcp_ask(&ext, sa("198.51.100.7", 80)).expect("outside -> externalIP");
    assert!(both.contains(a.server.as_str()));
    assert!(tcp_ask(&c2.netns, sa("198.51.100.7", 80)).is_ok(), "pod -> externalIP");

    // internalTrafficPolicy Local: each node's clients reach only that node's endpoint. Both
    // agents' socket programs sit at the same cgroup root and see every connect(): were
    // node-1's to act on node-2's pods, c2 would land on web-1.
    let before = service_counter(&b, "node-1", "itp");
    assert_eq!(tcp_servers(&c1.netns, sa("10.96.0.11", 80), 20), BTreeMap::from([("web-1".to_owned(), 20)]));
    assert_eq!(tcp_servers(&c2.netns, sa("10.96.0.11", 80), 20), BTreeMap::from([("web-2".to_owned(), 20)]));
    assert_eq!(
        service_counter(&b, "node-1", "itp") - before,
        20,
        "node-1 translated exactly its own pod's 20 connections, none of node-2's"
    );

    // What a node programs, read from its maps: netctl on the node, and the metrics.
    let out = netctl_get_services(&b, "node-1", "node-1");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let row = text.lines().find(|l| l.contains("10.96.0.10:80/TCP")).unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains(&format!("{}:8080*", w1.ip)) && row.contains(&format!("{}:9090", w2.ip)), "{row}");
    assert!(text.contains("*:30080/TCP") && text.contains("198.51.100.7:80/TCP"), "{text}");
    let wrong = netctl_get_services(&b, "node-1", "node-2");
    assert!(
        !wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("node-2"),
        "asks the right node"
    );
    let metrics = b.status("node-1", "/metrics").unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("contiv_service_connections_total{")
            && l.contains("service=\"web\"")
            && l.contains("protocol=\"TCP\"")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    let _ = EXTERNAL_IP;

    // The conntrack table as netctl shows it, from node-1's map: a connection from outside
    // to node-1's NodePort that lands on node-2's backend (translated on the packet path,
    // SNAT'ed to node-1), and a pod's connection to the ClusterIP (balanced at connect(),
    // so the packet path sees it go to its backend).
    let from_outside = (0..20)
        .map(|_| Conn::open(&ext, SocketAddr::from((n1.ip, 30080))))
        .find(|(_, server)| server == "web-2")
        .map(|(c, _)| c)
        .expect("a connection from outside to node-1's NodePort lands on web-2");
    let client = from_outside.0.local_addr().unwrap().to_string();
    let (from_pod, _) = Conn::open(&c1.netns, sa("10.96.0.10", 80));
    let pod_client = from_pod.0.local_addr().unwrap().to_string();
    let conntrack = |args: &[&str]| {
        let out = b
            .cmd("node-1", contiv_tests::bin_dir().join("netctl"))
            .args(["get", "conntrack", "--node", "node-1"])
            .args(args)
            .output()
            .unwrap();
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let flows_of = |args: &[&str]| -> Vec<Value> {
        let (ok, json, err) = conntrack(&[args, &["-o", "json"]].concat());
        assert!(ok, "netctl get conntrack {args:?}: {err}");
        let report: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        report["flows"].as_array().cloned().unwrap_or_default()
    };
    let flows = flows_of(&["--service", "default/web"]);
    assert!(flows.iter().all(|f| f["service"].as_str().is_some_and(|s| s.starts_with("default/web:"))), "{flows:?}");
    let f = flows.iter().find(|f| f["client"] == client.as_str()).unwrap_or_else(|| panic!("{client} in {flows:?}"));
    assert_eq!(f["server"], format!("{}:30080", n1.ip), "{f}");
    assert_eq!(
        (f["backend"].clone(), f["backendPod"].clone()),
        (format!("{}:9090", w2.ip).into(), "default/web-2".into())
    );
    assert!(f["sourceNat"].as_str().is_some_and(|n| n.starts_with(&format!("{}:", n1.ip))), "SNAT'ed to node-1: {f}");
    assert_eq!(
        (f["service"].as_str(), f["state"].as_str(), f["directed"].as_bool()),
        (Some("default/web:http"), Some("established"), Some(true))
    );
    assert!(f["flags"].as_array().is_some_and(|a| a.contains(&"fromUplink".into())), "{f}");
    assert!(f["expiresInSeconds"].as_u64().is_some_and(|s| s > 3600), "an established flow lives for hours: {f}");

    let c1_id = format!("default/{}", c1.name);
    let flows = flows_of(&["--pod", &c1_id]);
    let c1_ip = c1.ip.to_string();
    let has_c1 = |f: &Value| {
        ["client", "server", "backend", "sourceNat"]
            .iter()
            .any(|k| f[*k].as_str().is_some_and(|a| a.split(':').next() == Some(c1_ip.as_str())))
    };
    assert!(!flows.is_empty() && flows.iter().all(has_c1), "only c1's flows: {flows:?}");
    let f = flows
        .iter()
        .find(|f| f["client"] == pod_client.as_str())
        .unwrap_or_else(|| panic!("{pod_client} in {flows:?}"));
    assert_eq!(f["clientPod"], c1_id.as_str());
    assert!(
        f["serverPod"].as_str().is_some_and(|p| p.starts_with("default/web-")),
        "its backend, balanced at connect(): {f}"
    );
    assert!(f["service"].is_null() && f["backend"].is_null() && f["directed"] == false, "{f}");

    let (ok, table, err) = conntrack(&["--service", "default/web"]);
    assert!(ok, "{err}");
    assert!(
        table.starts_with("node node-1: ") && table.lines().next().unwrap().contains("matching service=default/web"),
        "{table}"
    );
    let row = table.lines().find(|l| l.contains(&client)).unwrap_or_else(|| panic!("{client} in {table}"));
    assert!(row.contains("(default/web-2)") && row.contains("established") && row.contains("fromUplink"), "{row}");
    let (ok, _, err) = conntrack(&["--pod", "default/nobody"]);
    assert!(!ok && err.contains("no pod default/nobody"), "an unknown pod is named: {err}");
    drop((from_outside, from_pod));

    // The TCP state of a flow on the packet path (from outside to a NodePort, to node-2's
    // backend), as the sweep reads it:
    // - half-closed (the client has sent all it has; the answer is still to come):
    //   established, so that a slow answer still finds its translation;
    // - finished both ways: closing;
    // - the client's port reused for a new connection after a reset: established again,
    //   not swept on the closing timeout.
    let hold = enter(&w2.netns, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7200)).unwrap());
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: hold, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.90
  clusterIPs: [10.96.0.90]
  ports:
  - {{name: hold, protocol: TCP, port: 80, targetPort: 7200, nodePort: 30090}}
---
{}"#,
        slice_yaml("hold", "hold-a", &[("hold", "TCP", 7200)], &[(&w2, READY)])
    ));
    wait_programmed(&b, "node-1", "10.96.0.90:80", 1);
    let (eof_tx, eof_rx) = std::sync::mpsc::channel::<()>();
    let (answer_tx, answer_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        for round in 0..3 {
            let (mut c, _) = hold.accept().unwrap();
            if round == 0 {
                // Reads to the client's FIN, answers when told, then closes.
                let _ = c.read_to_end(&mut vec![]);
                eof_tx.send(()).unwrap();
                answer_rx.recv().unwrap();
                c.write_all(b"late answer").unwrap();
            } else {
                // Answers, and holds the connection until its client leaves.
                c.write_all(b"hello").unwrap();
                let _ = c.read_to_end(&mut vec![]);
            }
        }
    });
    let state_of = |client: &str| -> Value {
        let flows = flows_of(&["--service", "default/hold"]);
        flows.into_iter().find(|f| f["client"] == client).unwrap_or_else(|| panic!("{client}: no flow"))
    };
    let hold_addr = SocketAddr::from((n1.ip, 30090));
    let mut half = enter(&ext, move || TcpStream::connect_timeout(&hold_addr, Duration::from_secs(3))).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let half_client = half.local_addr().unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    eof_rx.recv_timeout(Duration::from_secs(5)).expect("the backend reads the client's FIN");
    let f = state_of(&half_client.to_string());
    assert_eq!(f["state"], "established", "half-closed: {f}");
    assert!(f["expiresInSeconds"].as_u64().is_some_and(|s| s > 3600), "half-closed lives on: {f}");
    answer_tx.send(()).unwrap();
    let mut late = String::new();
    half.read_to_string(&mut late).unwrap();
    assert_eq!(late, "late answer");
    drop(half);
    b.wait_for(Duration::from_secs(5), "the finished flow to read closing", || {
        state_of(&half_client.to_string())["state"] == "closing"
    });

    // From one client port, a connection reset, then a new one.
    fn connect_from(port: u16, to: SocketAddr) -> std::io::Result<TcpStream> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
        s.connect_timeout(&to.into(), Duration::from_secs(3))?;
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello)?;
        Ok(s)
    }
    let reset = enter(&ext, move || connect_from(0, hold_addr)).unwrap();
    let client = reset.local_addr().unwrap();
    socket2::SockRef::from(&reset).set_linger(Some(Duration::ZERO)).unwrap();
    drop(reset);
    let client = client.to_string();
    b.wait_for(Duration::from_secs(5), "the reset flow to read closing", || state_of(&client)["state"] == "closing");
    let port = client.rsplit(':').next().unwrap().parse().unwrap();
    let again = enter(&ext, move || connect_from(port, hold_addr)).unwrap();
    assert_eq!(again.local_addr().unwrap().to_string(), client, "the same client port");
    let f = state_of(&client);
    assert_eq!(f["state"], "established", "a new connection on a reused port: {f}");
    drop(again);
    server.join().unwrap();

    // The node's own connection from a port in the NodePort range (web's, 30080) to a
    // server outside: its answers are not taken for new connections to the NodePort.
    serve_at(&ext, "outside", EXTERNAL_IP, 7300);
    let a = tcp_ask_with(&n1.netns, SocketAddr::from((EXTERNAL_IP, 7300)), Duration::from_secs(3), |s| {
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 30080)).into())
    })
    .expect("node-1 connects out from its NodePort's port");
    assert_eq!((a.server.as_str(), a.seen), ("outside", SocketAddr::from((n1.ip, 30080))));
    // A pod's UDP from the port of a UDP NodePort (web's dns, 30053) to a server outside:
    // masqueraded from another port, so the answer is not taken for a flow to the NodePort.
    let to = SocketAddr::from((EXTERNAL_IP, 7300));
    let (server, seen) = enter(&c1.netns, move || -> std::io::Result<(String, SocketAddr)> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 30053))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(b"question", to)?;
        let mut buf = [0u8; 256];
        let (n, _) = s.recv_from(&mut buf)?;
        Ok(parse(&String::from_utf8_lossy(&buf[..n])))
    })
    .expect("the pod's UDP from port 30053 is answered");
    assert_eq!(server, "outside");
    assert!(seen.ip() == std::net::IpAddr::V4(n1.ip) && !(30000..=32767).contains(&seen.port()), "{seen}");

    // A hostNetwork backend (an ingress controller on the host's network): its endpoint is
    // node-1's own address. From outside through node-1 it is this node's own stack, whose
    // answers leave by the uplink and must show the NodePort; through node-2 it is a remote
    // backend; from a pod, the socket balancer connects to it directly.
    serve_in(&n1.netns, "host-1", 8181);
    // Pods' UDP is balanced per packet: to reach a local pod, the host backend's answers
    // need `tc_to_pod` on the pod's egress, which a node attaches only while a UDP service
    // has a backend at its own address (each attach costs every ADD a grace period).
    let pods_1 = egress_links(&b, "node-1").1;
    assert!(pods_1 >= 2, "node-1's pods: {pods_1}");
    assert_eq!(egress_links(&b, "node-1"), (0, pods_1), "no tc_to_pod before a service needs it");
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: on-host, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  clusterIPs: [10.96.0.12]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8181, nodePort: 30181}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 8181, nodePort: 30182}}
  - {{name: quiet, protocol: UDP, port: 54, targetPort: 8182, nodePort: 30183}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: on-host-a
  namespace: default
  labels: {{kubernetes.io/service-name: on-host}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8181}}
- {{name: dns, protocol: UDP, port: 8181}}
- {{name: quiet, protocol: UDP, port: 8182}}
endpoints:
- addresses: [{}]
  conditions: {READY}
  nodeName: node-1
"#,
        n1.ip
    ));
    for node in ["node-1", "node-2"] {
        wait_programmed(&b, node, "10.96.0.12:80", 1);
    }
    b.wait_for(Duration::from_secs(10), "every pod of node-1 gets tc_to_pod", || {
        egress_links(&b, "node-1") == (pods_1, pods_1)
    });
    assert_eq!(egress_links(&b, "node-2").0, 0, "node-2's pods: the backend is not node-2's own address");
    // node-1 filters reverse paths strictly, as hardened hosts do: what node-2 SNAT'ed to
    // its own address must reach node-1 by the wire, where node-1 routes node-2's address
    // (by the overlay device, it would be dropped).
    let strict = b.cmd("node-1", "sysctl").args(["-qw", "net.ipv4.conf.all.rp_filter=1"]).status().unwrap();
    assert!(strict.success());
    let n2_ip = b.node("node-2").ip;
    for via in [n1.ip, n2_ip] {
        let tcp = SocketAddr::from((via, 30181));
        let a = tcp_ask(&ext, tcp).unwrap_or_else(|e| panic!("outside -> {tcp} -> hostNetwork backend on node-1: {e}"));
        assert_eq!((a.server.as_str(), a.peer), ("host-1", tcp), "outside -> {tcp}");
        let client = if via == n1.ip { ROUTER_IP } else { n2_ip };
        assert_eq!(a.seen.ip(), std::net::IpAddr::V4(client), "the client as the backend sees it, via {via}");
        let udp = SocketAddr::from((via, 30182));
        let a = udp_ask(&ext, udp).unwrap_or_else(|e| panic!("UDP outside -> {udp} -> hostNetwork backend: {e}"));
        assert_eq!((a.server.as_str(), a.peer), ("host-1", udp), "UDP outside -> {udp}");
        // Nothing listens on the backend's port 8182: node-1's stack answers with a port
        // unreachable about what it was given, which reaches the client as an error about
        // what it sent (the NodePort), so its socket reads "connection refused".
        assert_udp_refused(&ext, SocketAddr::from((via, 30183)));
    }
    for pod in [&c1, &c2] {
        let a = tcp_ask(&pod.netns, sa("10.96.0.12", 80)).expect("pod -> ClusterIP -> hostNetwork backend");
        assert_eq!((a.server.as_str(), a.peer), ("host-1", sa("10.96.0.12", 80)), "TCP from {}", pod.name);
        let a = udp_ask(&pod.netns, sa("10.96.0.12", 53))
            .unwrap_or_else(|e| panic!("UDP {} -> ClusterIP -> hostNetwork backend: {e}", pod.name));
        assert_eq!((a.server.as_str(), a.peer), ("host-1", sa("10.96.0.12", 53)), "UDP from {}", pod.name);
    }
    // node-1's agent restarts: its pods keep tc_to_pod (replaced by the new agent's), and
    // c1's UDP to the service still gets its answer from the frontend.
    // It is an upgrade from an agent that noted connected UDP sockets in SOCK_REVNAT, by
    // cookie and backend (before SOCK_UDP_BACKEND existed): while the agent is down, a live
    // socket's note is moved there (with bpftool) and SOCK_UDP_BACKEND removed. The agent
    // creates the map and adopts the note, so the socket is still aborted when its backend
    // leaves.
    let udp_map = n1.pin_dir.join("SOCK_UDP_BACKEND");
    let live = enter(&n1.netns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap());
    live.connect(sa("10.96.0.10", 53)).unwrap();
    let note_of = |cookie: u64| dump_pinned_map(&udp_map).into_iter().find(|e| e["key"].as_u64() == Some(cookie));
    let note = note_of(cookie(&live)).expect("the live socket's note");
    // The backend it was balanced to (getpeername() shows the service) and the service port.
    let backend_ip: Vec<u8> = note["value"]["backend_ip"]
        .as_array()
        .expect("backend_ip")
        .iter()
        .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
        .collect();
    let backend_port = u16::try_from(note["value"]["backend_port"].as_u64().expect("backend_port")).unwrap();
    let svc_id = u32::try_from(note["value"]["svc_id"].as_u64().expect("svc_id")).unwrap();
    b.stop_agent("node-1", false);
    std::fs::remove_file(&udp_map).unwrap();
    let key = [&cookie(&live).to_ne_bytes()[..], &backend_ip, &backend_port.to_ne_bytes(), &[0, 0]].concat();
    let value = [&[10, 96, 0, 10][..], &53u16.to_ne_bytes(), &[0, 0], &svc_id.to_ne_bytes()].concat();
    bpftool_update(&n1.pin_dir.join("SOCK_REVNAT"), &key, &value);
    b.start_agent("node-1");
    b.wait_for(Duration::from_secs(15), "node-1's first service apply after the restart", || {
        b.status_json("node-1", "/services").is_some_and(|r| !r["lastApply"].is_null())
    });
    assert_eq!(note_of(cookie(&live)).map(|e| e["value"].clone()), Some(note["value"].clone()), "the note adopted");
    let log = b.agent_log("node-1");
    assert!(
        log.contains("SOCK_UDP_BACKEND: 1 connected UDP sockets an older agent noted in SOCK_REVNAT adopted"),
        "{log}"
    );
    drop(live);
    assert_eq!(egress_links(&b, "node-1"), (pods_1, pods_1), "after node-1's agent restart");
    let a = udp_ask(&c1.netns, sa("10.96.0.12", 53)).expect("UDP c1 -> hostNetwork backend after the restart");
    assert_eq!((a.server.as_str(), a.peer), ("host-1", sa("10.96.0.12", 53)));
    // A slice written by hand may not name the node: an endpoint at node-1's own address is
    // still this node's own stack from node-1's uplink (were it SNAT'ed to node-1's address
    // like a remote backend, the stack would drop it as a martian). A service of its own,
    // so that what is tested is its first plan.
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: on-host-unnamed, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  clusterIPs: [10.96.0.13]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8181, nodePort: 30184}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: on-host-unnamed-a
  namespace: default
  labels: {{kubernetes.io/service-name: on-host-unnamed}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8181}}
endpoints:
- addresses: [{}]
  conditions: {READY}
"#,
        n1.ip
    ));
    wait_programmed(&b, "node-1", "10.96.0.13:80", 1);
    let tcp = SocketAddr::from((n1.ip, 30184));
    let a = tcp_ask(&ext, tcp).unwrap_or_else(|e| panic!("outside -> {tcp} -> node-1's own address, unnamed: {e}"));
    assert_eq!((a.server.as_str(), a.seen.ip()), ("host-1", std::net::IpAddr::V4(ROUTER_IP)), "{a:?}");
    b.delete_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: on-host-unnamed, namespace: default}\n");
    // The service goes: so does tc_to_pod.
    b.delete_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: on-host, namespace: default}\n");
    b.wait_for(Duration::from_secs(10), "node-1's pods lose tc_to_pod with the service", || {
        egress_links(&b, "node-1") == (0, pods_1)
    });

    // All of it after node-2's agent restarts: pod -> service -> pod across nodes, NodePort
    // from outside and from the host.
    b.stop_agent("node-2", false);
    b.start_agent("node-2");
    b.wait_for(Duration::from_secs(15), "node-2's first service apply after the restart", || {
        b.status_json("node-2", "/services").is_some_and(|r| !r["lastApply"].is_null())
    });
    assert_eq!(names(&tcp_servers(&c2.netns, sa("10.96.0.10", 80), 24)), both);
    assert_eq!(names(&udp_servers(&c2.netns, sa("10.96.0.10", 53), 24)), both);
    let n2 = b.node("node-2").clone();
    assert!(tcp_ask(&ext, SocketAddr::from((n2.ip, 30080))).is_ok());
    assert!(tcp_ask(&n2.netns, SocketAddr::from((n2.ip, 30080))).is_ok());
    assert_eq!(tcp_servers(&c2.netns, sa("10.96.0.11", 80), 10), BTreeMap::from([("web-2".to_owned(), 10)]));
}

/// Topology aware routing: the zone hints the EndpointSlice controller writes (for
/// `trafficDistribution: PreferClose`, or the `service.kubernetes.io/topology-mode`
/// annotation) keep each zone's clients, and the NodePort traffic each zone's node takes in,
/// on that zone's endpoints. A node relabelled into another zone follows the new zone's
/// hints; hints that do not cover every endpoint are ignored, as kube-proxy ignores them.
#[test]
fn services_box_topology_hints_and_the_proxy_healthz_follow_the_nodes() {
    let (b, [w1, w2, c1, c2]) = web_box("");
    let node = |name: &str, zone: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{topology.kubernetes.io/zone: {zone}}}\n"
        )
    };
    let slice = |name: &str, pod: &BoxPod, port: u16, zone: &str, hint: bool| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  \
             labels: {{kubernetes.io/service-name: zonal}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: {port}}}]\n\
             endpoints:\n- addresses: [{}]\n  conditions: {{ready: true}}\n  nodeName: {}\n  zone: {zone}\n{}",
            pod.ip,
            pod.node,
            if hint { format!("  hints: {{forZones: [{{name: {zone}}}]}}\n") } else { String::new() }
        )
    };
    b.apply_yaml(&format!(
        "{}---\n{}---\n{}---\n{}---\n{}",
        node("node-1", "zone-a"),
        node("node-2", "zone-b"),
        r#"apiVersion: v1
kind: Service
metadata: {name: zonal, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  clusterIPs: [10.96.0.12]
  trafficDistribution: PreferClose
  selector: {app: web}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30090}
"#,
        slice("zonal-a", &w1, 8080, "zone-a", true),
        slice("zonal-b", &w2, 9090, "zone-b", true),
    ));
    // Each node programs its zone's endpoint only, and says why.
    let follows = |node: &str, pod: &BoxPod, port: u16, mode: Option<&str>| {
        let want = format!("{}:{port}", pod.ip);
        b.wait_for(Duration::from_secs(15), &format!("{node} programs 10.96.0.12:80 -> {want} ({mode:?})"), || {
            b.status_json(node, "/services").is_some_and(|r| {
                r["frontends"].as_array().into_iter().flatten().any(|f| {
                    let flags: Vec<&str> =
                        f["flags"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                    let backends: Vec<&str> =
                        f["backends"].as_array().into_iter().flatten().filter_map(|x| x["address"].as_str()).collect();
                    f["frontend"] == "10.96.0.12:80"
                        && match mode {
                            Some(m) => backends == [want.as_str()] && flags.contains(&m),
                            None => backends.len() == 2 && !flags.iter().any(|f| f.starts_with("topology=")),
                        }
                })
            })
        });
    };
    follows("node-1", &w1, 8080, Some("topology=PreferSameZone"));
    follows("node-2", &w2, 9090, Some("topology=PreferSameZone"));
    let only = |name: &str, n: usize| BTreeMap::from([(name.to_owned(), n)]);
    assert_eq!(tcp_servers(&c1.netns, sa("10.96.0.12", 80), 16), only("web-1", 16), "zone-a's client");
    assert_eq!(tcp_servers(&c2.netns, sa("10.96.0.12", 80), 16), only("web-2", 16), "zone-b's client");
    // External traffic (externalTrafficPolicy Cluster) follows the hints of the node it enters.
    let ext = b.netns_of("external").unwrap();
    for (n, pod) in [("node-1", "web-1"), ("node-2", "web-2")] {
        let addr = SocketAddr::from((b.node(n).ip, 30090));
        assert_eq!(tcp_servers(&ext, addr, 12), only(pod, 12), "outside -> {n}'s NodePort");
    }

    // node-1 moves to zone-b: its clients now reach zone-b's endpoint.
    b.apply_yaml(&node("node-1", "zone-b"));
    follows("node-1", &w2, 9090, Some("topology=PreferSameZone"));
    assert_eq!(tcp_servers(&c1.netns, sa("10.96.0.12", 80), 16), only("web-2", 16), "relabelled node's client");

    // One endpoint loses its hint: hints no longer cover every endpoint, so every node
    // balances over both again.
    b.apply_yaml(&slice("zonal-b", &w2, 9090, "zone-b", false));
    follows("node-1", &w1, 8080, None);
    follows("node-2", &w2, 9090, None);
    let both: BTreeSet<&str> = ["web-1", "web-2"].into();
    assert_eq!(names(&tcp_servers(&c1.netns, sa("10.96.0.12", 80), 24)), both);
    assert_eq!(names(&tcp_servers(&c2.netns, sa("10.96.0.12", 80), 24)), both);

    // The proxy's own health server, on kube-proxy's port 10256 of every node: load
    // balancers of externalTrafficPolicy Cluster services probe /healthz there.
    let probe = |n: &str, path: &str| http_get_from_outside(&b, &format!("http://{}:10256{path}", b.node(n).ip));
    for n in ["node-1", "node-2"] {
        let h = probe(n, "/healthz");
        assert!(h.ends_with(" 200") && h.contains("\"nodeEligible\":true"), "{n}: {h}");
        let (json, _) = h.rsplit_once(' ').unwrap();
        let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{n}: {e}: {json}"));
        assert!(v["lastUpdated"].is_string() && v["currentTime"].is_string(), "{v}");
    }
    // The cluster autoscaler taints node-1 before deleting it: node-1's /healthz says 503 so
    // balancers drain it, its /livez and node-2's /healthz stay 200; untainted, 200 again.
    b.apply_yaml(&format!(
        "{}spec:\n  taints: [{{key: ToBeDeletedByClusterAutoscaler, value: \"1764748800\", effect: NoSchedule}}]\n",
        node("node-1", "zone-b")
    ));
    let mut h1 = String::new();
    b.wait_for(Duration::from_secs(15), "node-1's /healthz says 503", || {
        h1 = probe("node-1", "/healthz");
        h1.ends_with(" 503")
    });
    assert!(h1.contains("\"nodeEligible\":false"), "{h1}");
    assert!(probe("node-1", "/livez").ends_with(" 200"));
    assert!(probe("node-2", "/healthz").ends_with(" 200"), "only the tainted node drains");
    let report = b.status_json("node-1", "/services").unwrap();
    assert_eq!(report["proxyHealth"]["nodeEligible"], false, "{}", report["proxyHealth"]);
    let out = netctl_get_services(&b, "node-1", "node-1");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("proxy healthz on 0.0.0.0:10256: 503 (the node is being deleted)"), "{text}");
    let metrics = b.status("node-1", "/metrics").unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("contiv_proxy_healthz_total{code=\"503\"}") && !l.ends_with(" 0")),
        "{metrics}"
    );
    b.apply_yaml(&node("node-1", "zone-b"));
    b.wait_for(Duration::from_secs(15), "node-1's /healthz says 200 again", || {
        probe("node-1", "/healthz").ends_with(" 200")
    });
}

/// `netctl get services --node <node>`, run on node `on`.
fn netctl_get_services(b: &ClusterBox, on: &str, node: &str) -> std::process::Output {
    b.cmd(on, contiv_tests::bin_dir().join("netctl")).args(["get", "services", "--node", node]).output().unwrap()
}

/// GET `url` from the external namespace: the body, a space and the HTTP status (" 000"
/// when nothing answered).
fn http_get_from_outside(b: &ClusterBox, url: &str) -> String {
    let out = b.cmd("external", "curl").args(["-s", "-m", "3", "-w", " %{http_code}"]).arg(url).output().unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    // curl itself missing or failing leaves stdout empty (an unanswered request prints
    // " 000"): say so instead of failing an assertion on "".
    assert!(!answer.is_empty(), "curl printed nothing: {}", String::from_utf8_lossy(&out.stderr));
    answer
}

/// TCP to `tcp` from each of `from` is refused at once (ECONNREFUSED, not a timeout), and a
/// connected UDP socket in `udp.0` sending to `udp.1` reads ECONNREFUSED (ICMP port
/// unreachable came back).
fn assert_refused_at_once(from: &[&str], tcp: SocketAddr, udp: (&str, SocketAddr)) {
    for ns in from {
        let t = Instant::now();
        let e = tcp_ask(ns, tcp).expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "TCP to {tcp} from {ns}: {e}");
        assert!(t.elapsed() < Duration::from_secs(1), "refused at once, not after a timeout");
    }
    assert_udp_refused(udp.0, udp.1);
}

/// A connected UDP socket in `ns` sending to `addr` reads ECONNREFUSED (an ICMP port
/// unreachable reached it), in less than its 3 s read timeout.
fn assert_udp_refused(ns: &str, addr: SocketAddr) {
    assert_udp_refused_with(ns, addr, false);
}

/// [`assert_udp_refused`], the datagram sent with IP options if `options` (the port
/// unreachable then quotes its header with them).
fn assert_udp_refused_with(ns: &str, addr: SocketAddr, options: bool) {
    let e = enter(ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        if options {
            set_ip_options(&s);
        }
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.connect(addr).unwrap();
        s.send(b"anyone?").unwrap();
        s.recv(&mut [0u8; 64]).expect_err("refused")
    });
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "UDP to {addr} from {ns}: {e}");
}

/// How many of a node's pods have `tc_to_pod` on their egress (its link pinned), of all.
fn egress_links(b: &ClusterBox, node: &str) -> (usize, usize) {
    let pods = b.status_json(node, "/pods").expect("/pods");
    let names: Vec<String> =
        pods.as_array().unwrap().iter().map(|p| p["hostIfname"].as_str().unwrap().to_owned()).collect();
    let links = b.node(node).pin_dir.join("links");
    (names.iter().filter(|n| links.join(format!("{n}_egress")).exists()).count(), names.len())
}

/// A service port's connection counter on a node (from /services).
fn service_counter(b: &ClusterBox, node: &str, service: &str) -> u64 {
    let r = b.status_json(node, "/services").unwrap();
    r["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["service"] == service)
        .and_then(|f| f["connections"].as_u64())
        .unwrap_or_else(|| panic!("no {service} in {r}"))
}

/// A value of a node's /metrics without labels (0 when absent).
fn metric(b: &ClusterBox, node: &str, name: &str) -> f64 {
    let text = b.status(node, "/metrics").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.parse().unwrap_or_else(|e| panic!("{name} {v}: {e}")))
}

/// An EndpointSlice as the EndpointSlice controller writes it: annotated with the time of
/// the change it reflects, `ago` before now (RFC 3339 with milliseconds, as Go prints it).
fn with_trigger_time(slice: &str, ago: Duration) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap() - ago;
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{}.{:03}", t.as_secs(), t.subsec_millis()), "+%Y-%m-%dT%H:%M:%S.%3NZ"])
        .output()
        .unwrap();
    assert!(out.status.success(), "date: {}", String::from_utf8_lossy(&out.stderr));
    let time = String::from_utf8(out.stdout).unwrap();
    let annotated = slice.replacen(
        "metadata:\n",
        &format!(
            "metadata:\n  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{}\"\n",
            time.trim()
        ),
        1,
    );
    assert_ne!(annotated, slice, "{slice}");
    annotated
}

fn skipped(report: &Value) -> Vec<String> {
    report["skipped"].as_array().into_iter().flatten().map(|s| format!("{}: {}", s["service"], s["reason"])).collect()
}

#[test]
fn services_box_refusals_affinity_local_policies_source_ranges_hairpin_and_left_out_services() {
    let (b, [w1, w2, c1, c2]) = web_box("");
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.99
  clusterIPs: [10.96.0.99]
  ports:
  - {{name: a, protocol: TCP, port: 80, targetPort: 80, nodePort: 30099}}
  - {{name: b, protocol: UDP, port: 81, targetPort: 81, nodePort: 30098}}
---
apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: default}}
spec:
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: dns}}
---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30090}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: dns, nodePort: 30091}}
status:
  loadBalancer:
    ingress: [{{ip: 198.51.100.50}}, {{ip: 198.51.100.51, ipMode: Proxy}}]
---
apiVersion: v1
kind: Service
metadata:
  name: theirs
  namespace: default
  labels: {{service.kubernetes.io/service-proxy-name: someone-else}}
spec:
  clusterIP: 10.96.0.40
  clusterIPs: [10.96.0.40]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http}}
---
apiVersion: v1
kind: Service
metadata: {{name: hl, namespace: default}}
spec:
  clusterIP: None
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http}}
---
apiVersion: v1
kind: Service
metadata: {{name: sig, namespace: default}}
spec:
  clusterIP: 10.96.0.42
  clusterIPs: [10.96.0.42]
  ports:
  - {{name: diameter, protocol: SCTP, port: 3868, targetPort: 3868}}
---
{}---
{}---
{}---
{}"#,
        web_slices("sticky", &w1, &w2),
        // lb: only web-1 (node-1) serves.
        slice_yaml("lb", "lb-a", &[("http", "TCP", 8080), ("dns", "UDP", 8080)], &[(&w1, READY)]),
        web_slices("theirs", &w1, &w2),
        web_slices("hl", &w1, &w2),
    ));
    for node in ["node-1", "node-2"] {
        wait_programmed(&b, node, "10.96.0.30:80", 2);
        wait_programmed(&b, node, "10.96.0.99:80", 0);
        wait_programmed(&b, node, "10.96.0.20:80", 1);
    }
    let (n1, n2) = (b.node("node-1").clone(), b.node("node-2").clone());
    let ext = b.netns_of("external").unwrap();

    // No endpoints: TCP is refused at once (from pods, the host and outside), UDP gets ICMP
    // port unreachable (a connected socket reads ECONNREFUSED).
    assert_refused_at_once(&[&c1.netns, &c2.netns, &n1.netns], sa("10.96.0.99", 80), (&c1.netns, sa("10.96.0.99", 81)));
    let e = tcp_ask(&ext, SocketAddr::from((n2.ip, 30099))).expect_err("no endpoints");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "outside -> NodePort without endpoints: {e}");

    // A port no service defines on a cluster IP (sticky serves 80 and 53 on 10.96.0.30):
    // refused at once, as kube-proxy refuses it, from pods on both nodes and from a host;
    // UDP from a pod gets ICMP port unreachable.
    assert_refused_at_once(&[&c1.netns, &c2.netns, &n1.netns], sa("10.96.0.30", 81), (&c2.netns, sa("10.96.0.30", 54)));

    // sessionAffinity ClientIP: one client, one backend, for TCP and UDP.
    for c in [&c1, &c2] {
        assert_eq!(tcp_servers(&c.netns, sa("10.96.0.30", 80), 12).len(), 1, "TCP from {} sticks", c.name);
        assert_eq!(udp_servers(&c.netns, sa("10.96.0.30", 53), 12).len(), 1, "UDP from {} sticks", c.name);
    }
    // ...and keeps its backend while other endpoints come and go, as kube-proxy keeps
    // affinity per endpoint: an endpoint whose address sorts first moves every other
    // backend's place in the list, in and out again.
    let stuck: Vec<(String, String)> = [&c1, &c2]
        .iter()
        .map(|c| {
            (
                tcp_ask(&c.netns, sa("10.96.0.30", 80)).unwrap().server,
                udp_ask(&c.netns, sa("10.96.0.30", 53)).unwrap().server,
            )
        })
        .collect();
    let ghost = BoxPod { ip: "10.1.0.7".parse().unwrap(), ..w2.clone() };
    for (ghosts, backends) in [(vec![(&ghost, READY)], 3), (vec![], 2)] {
        b.apply_yaml(&slice_yaml("sticky", "sticky-c", &[("http", "TCP", 9090), ("dns", "UDP", 9090)], &ghosts));
        for node in ["node-1", "node-2"] {
            wait_programmed(&b, node, "10.96.0.30:80", backends);
        }
        for (c, (tcp, udp)) in [&c1, &c2].iter().zip(&stuck) {
            for _ in 0..4 {
                let got = tcp_ask(&c.netns, sa("10.96.0.30", 80)).map(|a| a.server);
                assert_eq!(got.as_ref().ok(), Some(tcp), "TCP from {} with {backends} backends: {got:?}", c.name);
                let got = udp_ask(&c.netns, sa("10.96.0.30", 53)).map(|a| a.server);
                assert_eq!(got.as_ref().ok(), Some(udp), "UDP from {} with {backends} backends: {got:?}", c.name);
            }
        }
    }

    // externalTrafficPolicy Local: the node with the endpoint serves with the client's own
    // address; the one without drops (its health check says 503, the other's 200).
    assert!(
        b.cmd("external", "ip")
            .args(["route", "add", "198.51.100.0/24", "via"])
            .arg(n1.ip.to_string())
            .status()
            .unwrap()
            .success()
    );
    let a = tcp_ask(&ext, SocketAddr::from((n1.ip, 30090))).expect("node with a local endpoint");
    assert_eq!((a.server.as_str(), a.seen.ip()), ("web-1", std::net::IpAddr::V4("192.168.100.1".parse().unwrap())));
    assert!(tcp_ask_from(&ext, None, SocketAddr::from((n2.ip, 30090)), Duration::from_secs(1)).is_err());
    let health = |ip: Ipv4Addr| http_get_from_outside(&b, &format!("http://{ip}:32000/healthz"));
    let h1 = health(n1.ip);
    assert!(h1.ends_with(" 200") && h1.contains("\"localEndpoints\":1"), "{h1}");
    assert!(h1.contains("\"serviceProxyHealthy\":true"), "{h1}");
    // node-2 has no local endpoint: 503, once its agent has applied the service (the
    // refused NodePort above passes before that too, so wait for the health server).
    let mut h2 = String::new();
    b.wait_for(Duration::from_secs(15), "node-2's health check answers", || {
        h2 = health(n2.ip);
        !h2.ends_with(" 000")
    });
    assert!(h2.ends_with(" 503"), "{h2}");
    // loadBalancerSourceRanges on the load-balancer IP: 203.0.113.0/24 only.
    assert!(
        tcp_ask_from(&ext, None, sa("198.51.100.50", 80), Duration::from_secs(1)).is_err(),
        "192.168.100.1 is outside the ranges"
    );
    let a = tcp_ask_from(&ext, Some("203.0.113.10".parse().unwrap()), sa("198.51.100.50", 80), Duration::from_secs(3))
        .expect("203.0.113.10 is inside");
    assert_eq!(a.seen.ip().to_string(), "203.0.113.10");
    // An `ipMode: Proxy` ingress address belongs to a load balancer that proxies to node
    // ports itself: no node programs it, and a pod reaching it goes out to that balancer
    // (masqueraded, like any connection leaving the cluster) instead of being short-circuited.
    let lb_ips: Vec<String> = b.status_json("node-1", "/services").unwrap()["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["service"] == "lb")
        .filter_map(|f| f["frontend"].as_str().map(str::to_owned))
        .collect();
    assert!(lb_ips.iter().any(|f| f.starts_with("198.51.100.50:")), "{lb_ips:?}");
    assert!(!lb_ips.iter().any(|f| f.starts_with("198.51.100.51:")), "{lb_ips:?}");
    assert!(b.cmd("external", "ip").args(["addr", "add", "198.51.100.51/32", "dev", "lo"]).status().unwrap().success());
    serve_in(&ext, "proxy-lb", 80);
    let a = tcp_ask(&c1.netns, sa("198.51.100.51", 80)).expect("the proxying balancer answers");
    assert_eq!((a.server.as_str(), a.seen.ip()), ("proxy-lb", std::net::IpAddr::V4(n1.ip)));
    // From inside the cluster every endpoint serves a load-balancer service, wherever.
    assert_eq!(tcp_ask(&c2.netns, SocketAddr::from((n2.ip, 30090))).unwrap().server, "web-1");

    // Hairpin: web-1 reaching a service it alone backs lands on itself (TCP and UDP).
    assert_eq!(tcp_ask(&w1.netns, sa("10.96.0.20", 80)).unwrap().server, "web-1");
    assert_eq!(udp_ask(&w1.netns, sa("10.96.0.20", 53)).unwrap().server, "web-1");

    // Left out: another proxy's service, a headless one (their backends exist), SCTP.
    let r = b.status_json("node-1", "/services").unwrap();
    let listed: Vec<&str> = r["frontends"].as_array().unwrap().iter().filter_map(|f| f["service"].as_str()).collect();
    assert!(!listed.contains(&"theirs") && !listed.contains(&"hl") && !listed.contains(&"sig"), "{listed:?}");
    let why = skipped(&r).join("\n");
    assert!(why.contains("someone-else") && why.contains("headless") && why.contains("Sctp"), "{why}");
    assert!(b.agent_log("node-1").contains("not programmed: protocol Sctp"), "SCTP is refused with a logged reason");
    assert!(tcp_ask_from(&c1.netns, None, sa("10.96.0.40", 80), Duration::from_secs(1)).is_err(), "not ours to serve");

    // Terminating endpoints: ready ones first; with none ready, serving-and-terminating.
    b.apply_yaml(&slice_yaml(
        "sticky",
        "sticky-a",
        &[("http", "TCP", 8080), ("dns", "UDP", 8080)],
        &[(&w1, "{ready: false, serving: true, terminating: true}")],
    ));
    wait_programmed(&b, "node-2", "10.96.0.30:80", 1);
    assert_eq!(names(&tcp_servers(&c2.netns, sa("10.96.0.30", 80), 6)), BTreeSet::from(["web-2"]));
    b.apply_yaml(&slice_yaml("sticky", "sticky-b", &[("http", "TCP", 9090), ("dns", "UDP", 9090)], &[]));
    wait_programmed(&b, "node-2", "10.96.0.30:80", 1);
    b.wait_for(Duration::from_secs(10), "the terminating endpoint serves", || {
        tcp_ask(&c2.netns, sa("10.96.0.30", 80)).is_ok_and(|a| a.server == "web-1")
    });
    // externalTrafficPolicy Local with only a terminating local endpoint: it still serves
    // what reaches the node, but the health check counts ready endpoints only (as
    // kube-proxy's does) and says 503, so that load balancers drain the node.
    b.apply_yaml(&slice_yaml(
        "lb",
        "lb-a",
        &[("http", "TCP", 8080), ("dns", "UDP", 8080)],
        &[(&w1, "{ready: false, serving: true, terminating: true}")],
    ));
    let mut h1 = String::new();
    b.wait_for(Duration::from_secs(10), "node-1's health check drains", || {
        h1 = health(n1.ip);
        h1.ends_with(" 503")
    });
    assert!(h1.contains("\"localEndpoints\":0"), "{h1}");
    let a = tcp_ask(&ext, SocketAddr::from((n1.ip, 30090))).expect("the terminating local endpoint serves");
    assert_eq!(a.server, "web-1");
}

/// A TCP connection kept open: one line out, one line back.
struct Conn(TcpStream);

impl Conn {
    fn open(ns: &str, addr: SocketAddr) -> (Conn, String) {
        let mut s = enter(ns, move || TcpStream::connect_timeout(&addr, Duration::from_secs(3))).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        let (server, _) = parse(&String::from_utf8_lossy(&buf[..n]));
        (Conn(s), server)
    }

    fn ping(&mut self) -> std::io::Result<String> {
        self.0.write_all(b"ping")?;
        let mut buf = [0u8; 256];
        let n = self.0.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

#[test]
fn services_box_endpoint_changes_and_an_agent_restart_keep_live_connections() {
    // Idle UDP flows expire after 3 s here (the sweep runs every 10 s); closed TCP flows
    // stay 120 s (a reused port's step below needs its closed flow still there).
    let (mut b, [w1, w2, c1, c2]) = web_box("[services.timeouts]\nudp = 3\ntcpClosing = 120\n");
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: dns, nodePort: 30053}}
---
{}"#,
        web_slices("web", &w1, &w2)
    ));
    for node in ["node-1", "node-2"] {
        wait_programmed(&b, node, "10.96.0.10:80", 2);
    }
    let ext = b.netns_of("external").unwrap();
    let n1 = b.node("node-1").clone();

    // Live connections: pod -> ClusterIP on each node, outside -> NodePort (packet path).
    let mut conns = vec![];
    for ns in [&c1.netns, &c2.netns] {
        conns.push(Conn::open(ns, sa("10.96.0.10", 80)));
    }
    conns.push(Conn::open(&ext, SocketAddr::from((n1.ip, 30080))));
    // Balancing is random: the later steps need a live connection to each backend (either
    // one may turn out to be the survivor), so open more until both have one.
    for i in 0..30 {
        if ["web-1", "web-2"].iter().all(|w| conns.iter().any(|(_, s)| s == w)) {
            break;
        }
        conns.push(Conn::open(if i % 2 == 0 { &c1.netns } else { &c2.netns }, sa("10.96.0.10", 80)));
    }
    assert!(["web-1", "web-2"].iter().all(|w| conns.iter().any(|(_, s)| s == w)), "no connection to each backend");

    // Agent restart on node-1, with a larger conntrack table and fragment map and a smaller
    // table of connected UDP sockets configured: what it programmed stays (read back,
    // nothing rewritten), the table is resized with its flows (the NodePort connection's NAT
    // lives there), and every connection keeps flowing, also while the agent is down.
    b.stop_agent("node-1", false);
    for (c, server) in &mut conns {
        assert!(c.ping().unwrap().starts_with(server.as_str()), "while node-1's agent is down");
    }
    // A note of a connected UDP socket that is gone, as one that closes while the restarted
    // agent copies the notes into the resized map is left behind: its sweep removes it.
    let udp_map = b.node("node-1").pin_dir.join("SOCK_UDP_BACKEND");
    const GONE_COOKIE: u64 = u64::MAX - 7;
    bpftool_update(&udp_map, &GONE_COOKIE.to_ne_bytes(), &[10, 1, 0, 9, 0, 53, 0, 0, 1, 0, 0, 0]);
    let size = |b: &ClusterBox, map: &str| {
        let pin = b.node("node-1").pin_dir.join(map);
        let out =
            std::process::Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(&pin).output().unwrap();
        assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["max_entries"].as_u64().unwrap()
    };
    let sizes = |b: &ClusterBox| (size(b, "CT"), size(b, "FRAGS"), size(b, "SOCK_UDP_BACKEND"));
    assert_eq!(sizes(&b), (262_144, 8192, 65_536), "the default sizes");
    let config = b.node("node-1").config.clone();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[services]\nconntrackEntries = 131072\nfragmentEntries = 16384\nconnectedUdpSockets = 16\n");
    std::fs::write(&config, text).unwrap();
    b.start_agent("node-1");
    b.wait_for(Duration::from_secs(15), "node-1's conntrack table, fragment map and UDP socket map resized", || {
        sizes(&b) == (131_072, 16384, 16)
    });
    let log = b.agent_log("node-1");
    for map in ["CT", "FRAGS", "SOCK_UDP_BACKEND"] {
        let copied =
            |l: &&str| l.contains(&format!("map {map}: ")) && l.contains("entries copied into the resized map");
        assert!(log.lines().any(|l| copied(&l)), "{map} resized with its entries: {log}");
    }
    b.wait_for(Duration::from_secs(15), "node-1's first service apply after the restart", || {
        b.status_json("node-1", "/services").is_some_and(|r| !r["lastApply"].is_null())
    });
    let r = b.status_json("node-1", "/services").unwrap();
    assert_eq!(r["lastApply"]["frontendsWritten"], 0, "a restart rewrites nothing: {}", r["lastApply"]);
    assert_eq!(r["lastApply"]["backendsWritten"], 0, "{}", r["lastApply"]);
    for (c, server) in &mut conns {
        assert!(c.ping().unwrap().starts_with(server.as_str()), "after node-1's agent restart");
    }

    // Conntrack: a UDP flow's entries expire once idle past the configured timeout (3 s
    // here); the live TCP flow from outside (packet path) keeps its entries.
    // The table as it is now (`/conntrack`; `/services` reports the fill of the last sweep):
    // UDP entries (two a flow), all entries, what the last sweep removed.
    let conntrack = |b: &ClusterBox| {
        let r = b.status_json("node-1", "/conntrack").unwrap();
        let udp = r["flows"].as_array().unwrap().iter().filter(|f| f["protocol"] == "UDP").count() as u64 * 2;
        let s = b.status_json("node-1", "/services").unwrap();
        (udp, r["entries"].as_u64().unwrap(), s["lastGc"]["expired"].as_u64())
    };
    let (_, tcp_only, _) = conntrack(&b);
    assert!(udp_ask(&c1.netns, sa("10.96.0.10", 53)).is_ok());
    let (udp_now, _, _) = conntrack(&b);
    assert_eq!(udp_now, 2, "both directions of the UDP flow are tracked");
    b.wait_for(Duration::from_secs(30), "the idle UDP flow's conntrack entries expire", || conntrack(&b).0 == 0);
    let (_, total, expired) = conntrack(&b);
    assert_eq!(total, tcp_only, "the live TCP flow's entries stay");
    assert!(expired.is_some(), "the sweep ran");
    for (c, server) in &mut conns {
        assert!(c.ping().unwrap().starts_with(server.as_str()), "after the sweep");
    }

    // An active flow is refreshed by its packets (the datapath stamps it every few ticks):
    // a UDP client asking twice a second for longer than its timeout plus a sweep keeps its
    // entries; no sweep removes them.
    let swept =
        |b: &ClusterBox| b.status_json("node-1", "/services").unwrap()["conntrackExpiredTotal"].as_u64().unwrap();
    let swept_before = swept(&b);
    let active = enter(&c1.netns, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.connect(sa("10.96.0.10", 53)).unwrap();
        s
    });
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        active.send(b"q").unwrap();
        let mut buf = [0u8; 128];
        active.recv(&mut buf).expect("an answer on the active UDP flow");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(conntrack(&b).0, 2, "the active UDP flow is tracked");
    assert_eq!(swept(&b), swept_before, "a sweep removed entries of the active flow");
    drop(active);

    // Node-1's connected UDP sockets to services are noted in its SOCK_UDP_BACKEND (read
    // here with bpftool), by cookie.
    let udp_notes = || -> Vec<u64> {
        let notes = dump_pinned_map(&b.node("node-1").pin_dir.join("SOCK_UDP_BACKEND"));
        notes.iter().map(|e| e["key"].as_u64().expect("a cookie")).collect()
    };
    let host_ns = b.node("node-1").netns.clone();
    let live = enter(&host_ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap());
    live.connect(sa("10.96.0.10", 53)).unwrap();
    // The note planted while the agent was down has no socket: two sweeps (10 s apart)
    // that find none remove it.
    b.wait_for(Duration::from_secs(40), "the note of a socket that is gone swept", || {
        !udp_notes().contains(&GONE_COOKIE)
    });
    assert!(b.agent_log("node-1").contains("SOCK_UDP_BACKEND: removed 1 notes of sockets that are gone"));
    assert!(udp_notes().contains(&cookie(&live)), "a live socket's note stays");
    // The map holds 16 notes (`connectedUdpSockets`): a socket connected when it is full is
    // balanced all the same but not noted, and counted; closed, the others' notes go.
    let noted = udp_notes().len();
    let fillers: Vec<UdpSocket> = (0..=16 - noted)
        .map(|_| {
            enter(&host_ns, || {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                s.connect(sa("10.96.0.10", 53)).unwrap();
                s
            })
        })
        .collect();
    let r = b.status_json("node-1", "/services").unwrap();
    assert_eq!((r["udpSocketsTracked"].as_u64(), r["udpSocketsMax"].as_u64()), (Some(16), Some(16)), "{r}");
    assert_eq!(r["udpSocketsUntrackedTotal"], 1, "{r}");
    assert_eq!(metric(&b, "node-1", "contiv_service_udp_sockets_untracked_total"), 1.0);
    let last = fillers.last().unwrap();
    assert!(!udp_notes().contains(&cookie(last)), "the socket over the limit is not noted");
    assert!(last.peer_addr().is_ok(), "but connected");
    let shown = String::from_utf8(netctl_get_services(&b, "node-1", "node-1").stdout).unwrap();
    assert!(shown.contains("connected UDP sockets to services: 16 of 16 tracked; 1 balanced while"), "{shown}");
    b.wait_for(Duration::from_secs(15), "node-1 warns that the map is full", || {
        b.agent_log("node-1").contains("SOCK_UDP_BACKEND is full ([services] connectedUdpSockets = 16)")
    });
    drop(fillers);
    assert_eq!(udp_notes().len(), noted, "the fillers' notes went with them");
    drop(live);

    // A UDP client that keeps its source port follows the change of backend within seconds.
    let udp = enter(&c1.netns, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.connect(sa("10.96.0.10", 53)).unwrap();
        s
    });
    let ask = |s: &UdpSocket| -> Option<String> {
        s.send(b"q").ok()?;
        let mut buf = [0u8; 128];
        let n = s.recv(&mut buf).ok()?;
        Some(parse(&String::from_utf8_lossy(&buf[..n])).0)
    };
    let first = ask(&udp).expect("UDP answer");
    let (keep, drop_pod) = if first == "web-1" { (&w2, &w1) } else { (&w1, &w2) };

    // A client outside that binds its source port and closes with a reset (no TIME_WAIT),
    // as a client behind a NAT can reuse a port: a NodePort connection from a port that
    // lands on the backend about to leave web.
    let reuse_from = |port: u16| {
        tcp_ask_with(&ext, SocketAddr::from((n1.ip, 30080)), Duration::from_secs(3), move |s| {
            s.set_reuse_address(true)?;
            s.set_linger(Some(Duration::ZERO))?;
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
        })
    };
    let reused_port = (40_000..40_060)
        .find(|&p| reuse_from(p).expect("a NodePort answer").server == drop_pod.name)
        .expect("a client port that lands on the backend about to leave web");

    // A second UDP service with the same two backends, and a flow of it to the backend that
    // is about to leave the first one: that flow is the other service's and must stay.
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: dns2, namespace: default}}
spec:
  clusterIP: 10.96.0.11
  clusterIPs: [10.96.0.11]
  ports:
  - {{name: dns, protocol: UDP, port: 53, targetPort: dns}}
---
{}"#,
        web_slices("dns2", &w1, &w2)
    ));
    wait_programmed(&b, "node-1", "10.96.0.11:53", 2);
    let other = (0..40)
        .map(|_| {
            let s = enter(&c1.netns, || {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                s.connect(sa("10.96.0.11", 53)).unwrap();
                s
            });
            let server = ask(&s);
            (s, server)
        })
        .find(|(_, server)| server.as_deref() == Some(drop_pod.name.as_str()))
        .map(|(s, _)| s)
        .expect("a flow of dns2 to the backend about to leave web");
    // The node-1 conntrack entry of a flow from c1's `sock` to `frontend`: its backend.
    let ct_backend = |sock: &UdpSocket, frontend: [u8; 4]| -> Option<(Vec<u8>, u64)> {
        let port = sock.local_addr().unwrap().port();
        let ip = |v: &Value| v.as_array().map(|a| a.iter().map(|b| b.as_u64().unwrap() as u8).collect::<Vec<_>>());
        dump_pinned_map(&b.node("node-1").pin_dir.join("CT")).into_iter().find_map(|e| {
            let (k, v) = (&e["key"], &e["value"]);
            let ours = ip(&k["src"]) == Some(c1.ip.octets().to_vec())
                && ip(&k["dst"]) == Some(frontend.to_vec())
                && k["sport"] == port
                && k["dport"] == 53
                && k["proto"] == 17;
            ours.then(|| (ip(&v["nat_ip"]).unwrap(), v["nat_port"].as_u64().unwrap()))
        })
    };
    let drop_port = if drop_pod.name == "web-1" { 8080 } else { 9090 };
    let drop_backend = Some((drop_pod.ip.octets().to_vec(), drop_port));
    assert_eq!(ct_backend(&udp, [10, 96, 0, 10]), drop_backend, "web's UDP flow is tracked, to {}", drop_pod.name);
    assert_eq!(ct_backend(&other, [10, 96, 0, 11]), drop_backend, "dns2's UDP flow is tracked");
    // Node-1 processes' connected UDP sockets, balanced once, at connect(): one to web and
    // one to dns2, both on the backend about to leave web.
    let host_socket_to = |frontend: SocketAddr| -> UdpSocket {
        (0..40)
            .map(|_| {
                let s = enter(&host_ns, move || {
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                    s.connect(frontend).unwrap();
                    s
                });
                let server = ask(&s);
                (s, server)
            })
            .find(|(_, server)| server.as_deref() == Some(drop_pod.name.as_str()))
            .map(|(s, _)| s)
            .unwrap_or_else(|| panic!("a node-1 socket to {frontend} on the backend about to leave web"))
    };
    let (host_web, host_dns2) = (host_socket_to(sa("10.96.0.10", 53)), host_socket_to(sa("10.96.0.11", 53)));
    // Each is noted by cookie in node-1's SOCK_UDP_BACKEND for as long as it is connected
    // there: a socket connected elsewhere, or closed, is forgotten at once (so the map holds
    // live sockets only, and no note of one is lost to eviction).
    let notes = udp_notes();
    assert!(notes.contains(&cookie(&host_web)) && notes.contains(&cookie(&host_dns2)), "{notes:?}");
    let passing = enter(&host_ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap());
    let passing_cookie = cookie(&passing);
    passing.connect(sa("10.96.0.10", 53)).unwrap();
    assert!(udp_notes().contains(&passing_cookie), "noted at connect()");
    passing.connect(SocketAddr::from((keep.ip, 53))).unwrap();
    assert!(!udp_notes().contains(&passing_cookie), "forgotten when connected elsewhere");
    passing.connect(sa("10.96.0.10", 53)).unwrap();
    assert!(udp_notes().contains(&passing_cookie), "noted again");
    drop(passing);
    assert!(!udp_notes().contains(&passing_cookie), "forgotten at close");
    // A host client as a resolver is written: an aborted socket is connected anew.
    let host_ask = |s: &UdpSocket, frontend: SocketAddr| -> Option<String> {
        let asked = s.send(b"q").and_then(|_| {
            let mut buf = [0u8; 128];
            let n = s.recv(&mut buf)?;
            Ok(parse(&String::from_utf8_lossy(&buf[..n])).0)
        });
        match asked {
            Ok(server) => Some(server),
            Err(e) if e.kind() == ErrorKind::ConnectionAborted || e.raw_os_error() == Some(libc::EDESTADDRREQ) => {
                s.connect(frontend).ok()?;
                Some("aborted".into())
            }
            Err(_) => None,
        }
    };
    // Every flow stays active from here (one datagram each every 200 ms), so nothing below
    // can come from an idle flow's expiry (3 s here): the asker reports each answer.
    type Answers = (Option<String>, Option<String>, Option<String>, Option<String>);
    let (tx, answers) = std::sync::mpsc::channel::<Answers>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asker = {
        let (udp, other, stop) = (udp.try_clone().unwrap(), other.try_clone().unwrap(), stop.clone());
        let (host_web, host_dns2) = (host_web.try_clone().unwrap(), host_dns2.try_clone().unwrap());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let web = (ask(&udp), ask(&other));
                let host = (host_ask(&host_web, sa("10.96.0.10", 53)), host_ask(&host_dns2, sa("10.96.0.11", 53)));
                let _ = tx.send((web.0, web.1, host.0, host.1));
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    // The backend the UDP flow uses leaves the service (its pod stays): TCP connections to
    // the surviving backend keep flowing; the UDP flow moves to the survivor.
    // The slice is annotated as the EndpointSlice controller does it, with a change made 2 s
    // ago: each node samples its network programming latency once, from then to its apply.
    const LATENCY: &str = "contiv_network_programming_duration_seconds";
    for node in ["node-1", "node-2"] {
        assert_eq!(metric(&b, node, &format!("{LATENCY}_count")), 0.0, "no annotated slice yet on {node}");
        assert!(metric(&b, node, "contiv_service_sync_duration_seconds_count") >= 1.0, "{node} synced");
    }
    let gone_slice = if drop_pod.name == "web-1" { "web-a" } else { "web-b" };
    let gone_port = if drop_pod.name == "web-1" { 8080 } else { 9090 };
    b.apply_yaml(&with_trigger_time(
        &slice_yaml("web", gone_slice, &[("http", "TCP", gone_port), ("dns", "UDP", gone_port)], &[]),
        Duration::from_secs(2),
    ));
    wait_programmed(&b, "node-1", "10.96.0.10:80", 1);
    for node in ["node-1", "node-2"] {
        b.wait_for(Duration::from_secs(10), &format!("{node} samples the programming latency"), || {
            metric(&b, node, &format!("{LATENCY}_count")) == 1.0
        });
        let sum = metric(&b, node, &format!("{LATENCY}_sum"));
        assert!((2.0..12.0).contains(&sum), "{node}: {sum} s from the change to the maps");
    }
    // web's flow moves to the survivor within seconds; dns2's flow to the same backend is
    // not web's to forget: it keeps its backend and its conntrack entry. The node's socket
    // to web is aborted and, connected anew, lands on the survivor; its socket to dns2 stays.
    let t = Instant::now();
    let mut seen = vec![];
    let keep_name = Some(keep.name.as_str());
    let moved = |(w, _, h, _): &Answers| w.as_deref() == keep_name && h.as_deref() == keep_name;
    while !seen.last().is_some_and(moved) {
        let left = Duration::from_secs(5).saturating_sub(t.elapsed());
        seen.push(
            answers.recv_timeout(left).unwrap_or_else(|_| panic!("web's UDP flow or socket still not moved: {seen:?}")),
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    asker.join().unwrap();
    seen.extend(answers.try_iter());
    let dropped = Some(drop_pod.name.as_str());
    assert!(seen.iter().all(|(_, o, _, _)| o.as_deref() == dropped), "dns2's flow: {seen:?}");
    assert!(seen.iter().all(|(_, _, _, h)| h.as_deref() == dropped), "node-1's socket to dns2: {seen:?}");
    assert!(seen.iter().any(|(_, _, h, _)| h.as_deref() == Some("aborted")), "{seen:?}");
    let log = b.agent_log("node-1");
    assert!(log.contains("aborted UDP socket") && log.contains("-> default/web:dns"), "{log}");
    // Counted: exactly node-1's one socket to web, nothing on node-2.
    assert_eq!(metric(&b, "node-1", "contiv_service_udp_sockets_aborted_total"), 1.0);
    assert_eq!(b.status_json("node-1", "/services").unwrap()["udpSocketsAbortedTotal"], 1);
    let node2 = b.status("node-2", "/metrics").unwrap();
    assert!(node2.lines().any(|l| l == "contiv_service_udp_sockets_aborted_total 0"), "{node2}");
    assert!(node2.lines().any(|l| l == "contiv_service_udp_sockets_untracked_total 0"), "{node2}");
    let keep_port: u16 = if keep.name == "web-1" { 8080 } else { 9090 };
    assert_eq!(ct_backend(&udp, [10, 96, 0, 10]), Some((keep.ip.octets().to_vec(), keep_port.into())), "web's flow");
    assert_eq!(ct_backend(&other, [10, 96, 0, 11]), drop_backend, "dns2's flow keeps its conntrack entry");
    for (c, server) in &mut conns {
        if *server == keep.name {
            assert!(c.ping().unwrap().starts_with(server.as_str()), "a connection to the surviving backend");
        }
    }

    // The client outside connects again from its port: its old flow there was closed (its
    // reset is in the entry, which the closing timeout keeps), so the SYN opens a new flow,
    // balanced again onto the survivor, not sent where the old one went (the backend that
    // left web, whose pod still serves), as netfilter reopens a closed connection.
    let closing = dump_pinned_map(&b.node("node-1").pin_dir.join("CT")).into_iter().any(|e| {
        e["key"]["sport"] == reused_port
            && e["key"]["dport"] == 30080
            && e["value"]["tcp_flags"].as_u64().is_some_and(|f| f & 4 != 0)
    });
    assert!(closing, "the reset flow from port {reused_port} is still tracked on node-1");
    let again = reuse_from(reused_port).expect("a new connection from the reused port is answered");
    assert_eq!(again.server, keep.name, "a new connection on a closed flow's 4-tuple is balanced again");

    // The remaining backend is removed and its pod deleted: a connection to it fails fast
    // (reset) instead of hanging.
    let idx = conns.iter().position(|(_, s)| *s == keep.name).expect("a connection to the survivor");
    let (mut doomed, _) = conns.swap_remove(idx);
    let keep_slice = if keep.name == "web-1" { "web-a" } else { "web-b" };
    b.apply_yaml(&slice_yaml("web", keep_slice, &[("http", "TCP", keep_port), ("dns", "UDP", keep_port)], &[]));
    let keep_id = keep.id();
    b.del_pod(&keep_id);
    wait_programmed(&b, "node-1", "10.96.0.10:80", 0);
    wait_programmed(&b, "node-2", "10.96.0.10:80", 0);
    let t = Instant::now();
    let failed = (0..10).any(|_| {
        let r = doomed.ping();
        std::thread::sleep(Duration::from_millis(100));
        r.is_err()
    });
    assert!(failed, "the connection to the deleted backend failed");
    // Hanging would mean minutes of retransmissions; a reset comes on the next packet
    // after the agent saw the pod go (its sweep runs within seconds, slower on a busy CI).
    assert!(t.elapsed() < Duration::from_secs(10), "fast: {:?}", t.elapsed());
    // And a new connection is refused at once (no endpoints).
    let e = tcp_ask(&c1.netns, sa("10.96.0.10", 80)).expect_err("no endpoints left");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    let _ = c2;
}

/// A UDP server on `port` in `netns` that takes one datagram, connects its socket to the
/// sender, answers after a moment (with IP options if `options`) and reads once more: what
/// that read gave (an ICMP error about its answer reaches it as an error of this connected
/// socket).
fn connected_late_answerer(netns: &str, port: u16, options: bool) -> std::thread::JoinHandle<std::io::Result<usize>> {
    let s = enter(netns, move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind udp"));
    if options {
        set_ip_options(&s);
    }
    std::thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 64];
        let (_, peer) = s.recv_from(&mut buf)?;
        s.connect(peer)?;
        // The client's socket is gone by now.
        std::thread::sleep(Duration::from_millis(300));
        s.send(b"too late")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.recv(&mut buf)
    })
}

/// A datagram to `addr` from a socket closed at once: its answer finds no socket.
fn udp_send_and_leave(ns: &str, addr: SocketAddr) {
    enter(ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.send_to(b"bye", addr).unwrap();
    });
}

/// ICMP errors about translated flows are translated back, as netfilter translates a
/// RELATED error for kube-proxy: the socket that sent what the error quotes gets it.
/// - A backend's port unreachable (a pod behind the service with no socket on the port): a
///   UDP client of the ClusterIP, or of a NodePort from outside, reads "connection refused"
///   instead of waiting for an answer. Backend on the client's node and on the other one
///   (the error crosses the overlay; from outside, the flow was SNAT'ed to the node).
/// - The client's own port unreachable (it left before the answer came): the backend's
///   connected socket reads "connection refused", the error having been translated from
///   the service address to the backend, in the pod path and from the uplink.
///
/// Then all of it again with IP options on the datagrams the errors quote. Last, a
/// router's "fragmentation needed" about a NodePort's answer (path MTU discovery), for a
/// backend on either node.
#[test]
fn services_box_icmp_errors_of_translated_flows_reach_the_sockets_they_quote() {
    let (b, [w1, w2, c1, _c2]) = web_box("");
    let svc = |name: &str, ip: &str, mute: u16, late: u16| {
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: NodePort
  clusterIP: {ip}
  clusterIPs: [{ip}]
  ports:
  - {{name: mute, protocol: UDP, port: 53, targetPort: 7777, nodePort: {mute}}}
  - {{name: late, protocol: UDP, port: 54, targetPort: 7001, nodePort: {late}}}
"#
        )
    };
    let ports = [("mute", "UDP", 7777), ("late", "UDP", 7001)];
    b.apply_yaml(&format!(
        "{}---\n{}---\n{}---\n{}",
        svc("near", "10.96.0.50", 30071, 30073),
        svc("far", "10.96.0.51", 30072, 30074),
        slice_yaml("near", "near-a", &ports, &[(&w1, READY)]),
        slice_yaml("far", "far-a", &ports, &[(&w2, READY)]),
    ));
    wait_programmed(&b, "node-1", "10.96.0.50:53", 1);
    wait_programmed(&b, "node-1", "10.96.0.51:53", 1);
    let ext = b.netns_of("external").unwrap();
    let n1 = b.node("node-1").ip;

    // Each twice: the second time the datagrams that errors quote carry IP options, so the
    // ports of the quote are read, and rewritten, past them.
    for options in [false, true] {
        // The backend has no socket on 7777: its port unreachable comes back as the service's.
        assert_udp_refused_with(&c1.netns, sa("10.96.0.50", 53), options);
        assert_udp_refused_with(&c1.netns, sa("10.96.0.51", 53), options);
        assert_udp_refused_with(&ext, SocketAddr::from((n1, 30071)), options);
        assert_udp_refused_with(&ext, SocketAddr::from((n1, 30072)), options);

        // The client is gone when the answer comes: its port unreachable reaches the backend.
        for (from, to, backend) in [
            (&c1.netns, sa("10.96.0.50", 54), &w1),
            (&c1.netns, sa("10.96.0.51", 54), &w2),
            (&ext, SocketAddr::from((n1, 30073)), &w1),
            (&ext, SocketAddr::from((n1, 30074)), &w2),
        ] {
            let answerer = connected_late_answerer(&backend.netns, 7001, options);
            udp_send_and_leave(from, to);
            let read = answerer.join().unwrap();
            assert_eq!(
                read.as_ref().map_err(std::io::Error::kind).err(),
                Some(ErrorKind::ConnectionRefused),
                "{} answering {from} via {to} (IP options: {options}): {read:?}",
                backend.name
            );
        }
    }

    // Path MTU discovery through a NodePort: a router on the way to the client, whose next
    // link is narrower, answers the node's full-size segments with "fragmentation needed"
    // from its own address. Translated back like the flow's packets, the error reaches the
    // backend, which learns the smaller MTU and sends smaller segments: the whole answer
    // arrives. To node-2's backend the error crosses the overlay, which takes from node-1
    // only node-1's own addresses: node-1 sends it from its address (the flow's SNAT), as
    // netfilter rewrites it.
    let beyond = b.add_beyond(1280);
    let bulk = |name: &str, ip: &str, node_port: u16, backend: &BoxPod| {
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: NodePort
  clusterIP: {ip}
  clusterIPs: [{ip}]
  ports:
  - {{name: bulk, protocol: TCP, port: 80, targetPort: 7100, nodePort: {node_port}}}
---
{}"#,
            slice_yaml(name, &format!("{name}-a"), &[("bulk", "TCP", 7100)], &[(backend, READY)])
        )
    };
    b.apply_yaml(&format!(
        "{}---\n{}",
        bulk("bulk-near", "10.96.0.52", 30075, &w1),
        bulk("bulk-far", "10.96.0.53", 30076, &w2)
    ));
    wait_programmed(&b, "node-1", "10.96.0.52:80", 1);
    wait_programmed(&b, "node-1", "10.96.0.53:80", 1);
    const BULK: usize = 256 * 1024;
    for w in [&w1, &w2] {
        let listener = enter(&w.netns, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7100)).expect("bind"));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { continue };
                std::thread::spawn(move || c.write_all(&[7u8; BULK]));
            }
        });
    }
    for (node_port, backend, path_to) in [(30075, &w1, BEYOND_IP), (30076, &w2, n1)] {
        let to = SocketAddr::from((n1, node_port));
        let got = enter(&beyond, move || -> std::io::Result<usize> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut all = vec![];
            s.read_to_end(&mut all)?;
            Ok(all.len())
        });
        assert_eq!(
            got.as_ref().map_err(std::io::Error::kind),
            Ok(&BULK),
            "{BULK} bytes from {} via {to} past a 1280-byte link: {got:?}",
            backend.name
        );
        // What the backend learned: the path to its peer (node-1, SNAT'ed, for web-2).
        let route = ip_in(&backend.netns, &["route", "get", &path_to.to_string()]);
        assert!(route.contains("mtu 1280"), "{} learned the path MTU to {path_to}: {route}", backend.name);
    }
}

/// A node address as a node's `/services` lists it (read from its maps).
fn node_address(ip: Ipv4Addr, this_node: bool, node_ports: bool) -> serde_json::Value {
    serde_json::json!({"address": ip.to_string(), "thisNode": this_node, "nodePorts": node_ports})
}

/// Waits until a node's `/services` lists `listed` among its node addresses.
fn wait_node_address_listed(b: &ClusterBox, node: &str, listed: serde_json::Value) {
    b.wait_for(Duration::from_secs(15), &format!("{node} to list {listed}"), || {
        b.status_json(node, "/services")
            .is_some_and(|r| r["nodeAddresses"].as_array().is_some_and(|a| a.contains(&listed)))
    });
}

/// `[services] nodePortAddresses`, as kube-proxy's: NodePorts answer only on the node
/// addresses it takes, from outside, from pods and from the node itself, and on the node's
/// `127.0.0.1` only when it takes the loopback address. Here it takes the underlay's first
/// sixteen addresses: each node's own, not the second address node-1's Node object lists.
/// Then node-1's agent restarts unset (everything answers) and with `["primary"]`.
#[test]
fn services_box_node_port_addresses_limit_the_addresses_node_ports_answer_on() {
    let (mut b, [w1, w2, c1, c2]) = web_box("[services]\nnodePortAddresses = [\"192.168.100.0/28\"]\n");
    let n1 = b.node("node-1").clone();
    let n2 = b.node("node-2").clone();
    let second: Ipv4Addr = "192.168.100.111".parse().unwrap();
    ip_in(&n1.netns, &["addr", "add", &format!("{second}/24"), "dev", "eth0"]);
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node-1}}
status:
  addresses:
  - {{type: InternalIP, address: "{}"}}
  - {{type: ExternalIP, address: "{second}"}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  clusterIPs: [10.96.0.60]
  selector: {{app: web}}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: dns, nodePort: 30053}}
---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.61
  clusterIPs: [10.96.0.61]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32101
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}}
---
{}---
{}"#,
        n1.ip,
        web_slices("web", &w1, &w2),
        slice_yaml("lb", "lb-a", &[("http", "TCP", 8080)], &[(&w1, READY)])
    ));
    for (node, this_node) in [("node-1", true), ("node-2", false)] {
        wait_programmed(&b, node, "10.96.0.60:80", 2);
        wait_node_address_listed(&b, node, node_address(second, this_node, false));
    }
    // The healthCheckNodePort listens where NodePorts answer, as kube-proxy's does.
    let health_check = |b: &ClusterBox, addr: Ipv4Addr| http_get_from_outside(b, &format!("http://{addr}:32101/"));
    b.wait_for(Duration::from_secs(10), "node-1's health check on its own address", || {
        health_check(&b, n1.ip).ends_with(" 200")
    });
    assert!(health_check(&b, second).ends_with(" 000"), "not on the address nodePortAddresses leaves out");
    let report = b.status_json("node-1", "/services").unwrap();
    assert_eq!(report["nodePortAddresses"], serde_json::json!(["192.168.100.0/28"]));
    assert!(report["nodeAddresses"].as_array().unwrap().contains(&node_address(n1.ip, true, true)), "{report}");
    let out = netctl_get_services(&b, "node-1", "node-1");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = format!("nodePortAddresses [192.168.100.0/28]: NodePorts answer on {}; not on {second}", n1.ip);
    assert!(text.contains(&line), "netctl get services says where NodePorts answer: {text}");
    let ext = b.netns_of("external").unwrap();

    // The addresses it takes: served from outside, from pods of either node and from the node.
    for node_ip in [n1.ip, n2.ip] {
        for from in [ext.as_str(), &c1.netns, &c2.netns, &n1.netns] {
            let a = tcp_ask(from, SocketAddr::from((node_ip, 30080)))
                .unwrap_or_else(|e| panic!("{from} -> {node_ip}:30080: {e}"));
            assert!(a.server == w1.name || a.server == w2.name, "{a:?}");
        }
        assert!(udp_ask(&ext, SocketAddr::from((node_ip, 30053))).is_ok(), "UDP from outside to {node_ip}");
    }
    // The address it leaves out: no node balances it, so it reaches node-1's own stack,
    // where nothing listens: refused at once, TCP and UDP, from outside, from a pod of
    // either node and from node-1 itself. So is node-1's localhost.
    for from in [ext.as_str(), &c1.netns, &c2.netns, &n1.netns] {
        assert_refused_at_once(&[from], SocketAddr::from((second, 30080)), (from, SocketAddr::from((second, 30053))));
    }
    assert_refused_at_once(&[n1.netns.as_str()], sa("127.0.0.1", 30080), (&n1.netns, sa("127.0.0.1", 30053)));
    // The cluster IP is not a node address: nodePortAddresses leaves it alone.
    assert!(tcp_ask(&c1.netns, sa("10.96.0.60", 80)).is_ok());

    // A changed setting takes effect at the agent's restart, over the entries the last one
    // left. Unset: every address and localhost answer. Then ["primary"]: node-1's Node
    // lists its InternalIP first, so that one answers, not the second address or localhost.
    let outside = |addr: SocketAddr| tcp_ask(&ext, addr).map(|a| a.server);
    // node-1 also has an address on an interface of its own besides the uplink, listed in
    // its Node: NodePorts answer there to pods and the node only, which the agent says.
    let third: Ipv4Addr = "10.99.0.9".parse().unwrap();
    ip_in(&n1.netns, &["link", "add", "nport0", "type", "veth", "peer", "name", "nport1"]);
    ip_in(&n1.netns, &["addr", "add", &format!("{third}/32"), "dev", "nport0"]);
    ip_in(&n1.netns, &["link", "set", "nport0", "up"]);
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node-1}}
status:
  addresses:
  - {{type: InternalIP, address: "{}"}}
  - {{type: ExternalIP, address: "{second}"}}
  - {{type: InternalIP, address: "{third}"}}
"#,
        n1.ip
    ));
    let off_uplink = |ip: Ipv4Addr| format!("NodePorts at {ip} (");
    for (setting, second_served) in [("[]", true), ("[\"primary\"]", false)] {
        let config = std::fs::read_to_string(&n1.config).unwrap();
        let line = config.lines().find(|l| l.starts_with("nodePortAddresses")).unwrap().to_owned();
        std::fs::write(&n1.config, config.replace(&line, &format!("nodePortAddresses = {setting}"))).unwrap();
        b.stop_agent("node-1", false);
        b.start_agent("node-1");
        wait_node_address_listed(&b, "node-1", node_address(second, true, second_served));
        assert!(outside(SocketAddr::from((n1.ip, 30080))).is_ok(), "{setting}: outside -> node-1's own address");
        if second_served {
            outside(SocketAddr::from((second, 30080)))
                .unwrap_or_else(|e| panic!("{setting}: outside -> {second}: {e}"));
            b.wait_for(Duration::from_secs(10), "the health check on every address", || {
                health_check(&b, second).ends_with(" 200")
            });
            assert!(udp_ask(&ext, SocketAddr::from((second, 30053))).is_ok(), "{setting}: UDP to {second}");
            tcp_ask(&n1.netns, sa("127.0.0.1", 30080)).unwrap_or_else(|e| panic!("{setting}: localhost: {e}"));
            let said = format!(
                "NodePorts at {third} (nport0) answer pods and this node only: clients outside the cluster reach \
                 NodePorts through the uplink eth0"
            );
            b.wait_for(Duration::from_secs(10), "the warning about the address off the uplink", || {
                b.agent_log("node-1").contains(&said)
            });
            let log = b.agent_log("node-1");
            assert!(!log.contains(&off_uplink(second)) && !log.contains(&off_uplink(n1.ip)), "the uplink's: {log}");
        } else {
            b.wait_for(Duration::from_secs(10), "the health check on the primary address", || {
                health_check(&b, n1.ip).ends_with(" 200")
            });
            assert!(health_check(&b, second).ends_with(" 000"), "{setting}: no health check on {second}");
            assert_refused_at_once(
                &[ext.as_str()],
                SocketAddr::from((second, 30080)),
                (&ext, SocketAddr::from((second, 30053))),
            );
            assert_refused_at_once(&[n1.netns.as_str()], sa("127.0.0.1", 30080), (&n1.netns, sa("127.0.0.1", 30053)));
        }
    }
}

/// A UDP server in a pod answering each datagram with one of the same size: "NAME
/// CLIENT-IP:PORT " padded with dots.
fn serve_same_size(pod: &BoxPod, port: u16) {
    let name = pod.name.clone();
    let udp = enter(&pod.netns, move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind udp"));
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf) else { return };
            let mut reply = format!("{name} {peer} ").into_bytes();
            reply.resize(n.max(reply.len()), b'.');
            let _ = udp.send_to(&reply, peer);
        }
    });
}

/// One exchange of a `size`-byte datagram from a fresh socket in `ns` (sent and answered
/// as fragments when larger than the MTU; sent with IPv4 options if `options`): the server,
/// the client it saw, where the answer came from.
fn udp_ask_big(ns: &str, addr: SocketAddr, size: usize, options: bool) -> std::io::Result<Answer> {
    enter(ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        if options {
            set_ip_options(&s);
        }
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(&vec![b'q'; size], addr)?;
        let mut buf = vec![0u8; 65536];
        let (n, from) = s.recv_from(&mut buf)?;
        assert_eq!(n, size, "the answer from {from} to {addr} arrived whole");
        assert!(buf[..n].ends_with(b"..."), "answer padded to the end");
        let (server, seen) = parse(&String::from_utf8_lossy(&buf[..n]));
        Ok(Answer { server, seen, peer: from })
    })
}

/// `web_box` with each web pod also answering datagrams on 7500/UDP with as many bytes.
fn same_size_web_box() -> (ClusterBox, [BoxPod; 4]) {
    let (b, pods) = web_box("");
    for w in &pods[..2] {
        serve_same_size(w, 7500);
    }
    (b, pods)
}

/// Each client pod sends a `size`-byte datagram (with IPv4 options if `options`) straight
/// to its web pod's 7500/UDP: that pod answers it in full, and saw the client's address.
fn pods_answer_same_size(pairs: &[(&BoxPod, &BoxPod)], size: usize, options: bool, when: &str) {
    for (from, to) in pairs {
        let a = udp_ask_big(&from.netns, SocketAddr::from((to.ip, 7500)), size, options)
            .unwrap_or_else(|e| panic!("{when}: {} -> {} ({size} bytes, options {options}): {e}", from.name, to.name));
        assert_eq!((a.server.as_str(), a.seen.ip()), (to.name.as_str(), std::net::IpAddr::V4(from.ip)), "{when}");
    }
}

/// The servers that answered `size`-byte datagrams from `client` to the service `svc`
/// (the answers from `svc`, the client's own address seen), asking until `want` did (at
/// most 40 times).
fn big_servers(client: &BoxPod, svc: SocketAddr, size: usize, options: bool, want: usize) -> BTreeSet<String> {
    let mut servers = BTreeSet::new();
    for _ in 0..40 {
        let a =
            udp_ask_big(&client.netns, svc, size, options).unwrap_or_else(|e| panic!("{} -> {svc}: {e}", client.name));
        assert_eq!((a.peer, a.seen.ip()), (svc, std::net::IpAddr::V4(client.ip)), "{a:?}");
        servers.insert(a.server);
        if servers.len() == want {
            break;
        }
    }
    servers
}

/// Asks `node_port` on node-1 (at `n1`) from outside with `ask` until web-1 and web-2 both
/// answered: the answers come from the NodePort, the local backend (web-1) sees the client,
/// the remote one (web-2) sees node-1 (SNAT).
fn both_behind_node_port(
    w1: &BoxPod,
    w2: &BoxPod,
    n1: Ipv4Addr,
    node_port: SocketAddr,
    ask: impl Fn(SocketAddr) -> std::io::Result<Answer>,
) {
    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        let a = ask(node_port).unwrap_or_else(|e| panic!("outside -> {node_port}: {e}"));
        assert_eq!(a.peer, node_port, "the answer comes from the NodePort");
        seen.insert(a.server, a.seen.ip());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both backends behind {node_port}: {seen:?}");
    assert_eq!(seen[&w2.name], std::net::IpAddr::V4(n1), "a remote backend sees the node (SNAT)");
    assert_ne!(seen[&w1.name], std::net::IpAddr::V4(n1), "a local backend sees the client");
}

/// Datagrams larger than the pods' MTU leave as fragments and arrive whole: pod to pod on
/// a node and across nodes, from a node's stack to another node's pod, pod to ClusterIP
/// (local and remote backend), and from outside to a NodePort (local backend, and remote,
/// SNAT'ed to the node). Each answer is as large, so the reply direction's fragments are
/// translated back too. Then the same with both ends isolated by NetworkPolicy. (In kernel
/// mode the pod edge used to send every fragment to the slow path, which drops them.)
#[test]
fn services_box_fragmented_datagrams_reach_pods_services_and_node_ports() {
    let (b, [w1, w2, c1, c2]) = same_size_web_box();
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: big, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.80
  clusterIPs: [10.96.0.80]
  ports:
  - {{name: big, protocol: UDP, port: 53, targetPort: 7500, nodePort: 30075}}
---
{}"#,
        slice_yaml("big", "big-a", &[("big", "UDP", 7500)], &[(&w1, READY), (&w2, READY)])
    ));
    wait_programmed(&b, "node-1", "10.96.0.80:53", 2);
    let size = 4000;
    let n1 = b.node("node-1").clone();

    // Pod to pod, on the node and across the overlay; and a node's stack to a remote pod.
    pods_answer_same_size(&[(&c1, &w1), (&c1, &w2), (&c2, &w1)], size, false, "open");
    let a = udp_ask_big(&n1.netns, SocketAddr::from((w2.ip, 7500)), size, false).expect("node-1's stack -> web-2");
    assert_eq!(a.server, w2.name);

    // Pod to ClusterIP: both backends answer, the answer from the service address.
    let svc = sa("10.96.0.80", 53);
    let both = BTreeSet::from([w1.name.clone(), w2.name.clone()]);
    assert_eq!(big_servers(&c1, svc, size, false, 2), both, "both backends of {svc}");

    // Outside to a NodePort: a local backend sees the client; a remote one sees node-1.
    let ext = b.netns_of("external").unwrap();
    let node_port = SocketAddr::from((n1.ip, 30075));
    both_behind_node_port(&w1, &w2, n1.ip, node_port, |to| udp_ask_big(&ext, to, size, false));

    // NetworkPolicy: the web pods admit clients on 7500/UDP only, and the clients may send
    // only there. A datagram's first fragment is checked; its later ones pass on its flow.
    b.apply_yaml(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 7500, protocol: UDP}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: clients, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 7500, protocol: UDP}]}]
"#,
    );
    let rx_fragment = || {
        let node = b.status_json("node-2", "/node").expect("node-2's /node");
        node["overlayCounters"]["rxFragment"].as_u64().unwrap_or_else(|| panic!("no rxFragment in {node}"))
    };
    let refused_before = rx_fragment();
    b.wait_for(Duration::from_secs(30), "the web pods no longer admit the outside", || {
        enter(&ext, move || {
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                s.send_to(&vec![b'q'; 4000], node_port)?;
                s.recv(&mut [0u8; 8192])
            })
        })
        .is_err()
    });
    // Refused datagrams to web-2 (node-1 balances each flow at random: 20 flows are all but
    // sure to send some there): their first fragments are refused by node-2's ingress, so
    // the later ones, which node-1 forwarded on the flow it balanced, are counted there as
    // fragment drops.
    enter(&ext, move || {
        for _ in 0..20 {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            s.send_to(&[b'q'; 4000], node_port).unwrap();
        }
    });
    b.wait_for(Duration::from_secs(5), "node-2 counts the refused datagrams' later fragments", || {
        rx_fragment() > refused_before
    });
    pods_answer_same_size(&[(&c1, &w2), (&c2, &w1)], size, false, "isolated");
    assert_eq!(big_servers(&c1, svc, size, false, 2), both, "isolated: both backends of {svc} admit c1's fragments");
}

/// Packets with IPv4 options take the fast path like any other, their transport header
/// read past the options: pod to pod across the overlay (whole and fragmented), a node's
/// stack to another node's pod, pod to ClusterIP, and from outside to a NodePort over UDP and TCP (translated at node-1's
/// uplink; the remote backend reached over the overlay). NetworkPolicy reads their ports
/// where they are: an allowed port still passes, another is refused. (In kernel mode they
/// used to go to the slow path, whose built-in vswitch drops them.)
#[test]
fn services_box_ip_options_take_the_fast_path_through_services_and_policy() {
    let (b, [w1, w2, c1, c2]) = same_size_web_box();
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: opts, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.81
  clusterIPs: [10.96.0.81]
  ports:
  - {{name: u, protocol: UDP, port: 53, targetPort: 7500, nodePort: 30077}}
  - {{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30078}}
---
{}---
{}"#,
        slice_yaml("opts", "opts-a", &[("u", "UDP", 7500), ("http", "TCP", 8080)], &[(&w1, READY)]),
        slice_yaml("opts", "opts-b", &[("u", "UDP", 7500), ("http", "TCP", 9090)], &[(&w2, READY)]),
    ));
    wait_programmed(&b, "node-1", "10.96.0.81:53", 2);
    let n1 = b.node("node-1").ip;

    for size in [100, 4000] {
        pods_answer_same_size(&[(&c1, &w2), (&c2, &w1)], size, true, "open");
    }
    // A node's own stack to another node's pod (`tc_to_overlay`, then `tc_from_overlay`).
    let n1_netns = b.node("node-1").netns.clone();
    let a = udp_ask_big(&n1_netns, SocketAddr::from((w2.ip, 7500)), 4000, true).expect("node-1's stack -> web-2");
    assert_eq!(a.server, w2.name);
    let svc = sa("10.96.0.81", 53);
    let both = BTreeSet::from([w1.name.clone(), w2.name.clone()]);
    assert_eq!(big_servers(&c1, svc, 100, true, 2), both, "both backends of {svc}, with options");

    let ext = b.netns_of("external").unwrap();
    let with_options = |s: &socket2::Socket| {
        set_ip_options(s);
        Ok(())
    };
    both_behind_node_port(&w1, &w2, n1, SocketAddr::from((n1, 30077)), |to| udp_ask_big(&ext, to, 4000, true));
    both_behind_node_port(&w1, &w2, n1, SocketAddr::from((n1, 30078)), |to| {
        tcp_ask_with(&ext, to, Duration::from_secs(3), with_options)
    });

    // The web pods admit clients on 7500/UDP only. Read at the fixed 20 bytes, the options'
    // NOPs would be the ports (257), which no rule allows.
    b.apply_yaml(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 7500, protocol: UDP}]}]
"#,
    );
    let web2_http = SocketAddr::from((w2.ip, 9090));
    b.wait_for(Duration::from_secs(30), "web-2 no longer admits c1 on 9090", || udp_ask(&c1.netns, web2_http).is_err());
    pods_answer_same_size(&[(&c1, &w2), (&c2, &w1)], 100, true, "isolated");
    assert!(udp_ask_big(&c1.netns, web2_http, 100, true).is_err(), "isolated: c1 -> web-2:9090 with options");
    assert!(
        tcp_ask_with(&c1.netns, web2_http, Duration::from_secs(1), with_options).is_err(),
        "isolated: c1 -> web-2:9090/TCP with options"
    );
}

/// loadBalancerSourceRanges and the node's own connections, as kube-proxy treats them: the
/// node is admitted when the ranges hold its address (its connections are balanced like a
/// pod's), and not otherwise (they go on untranslated, to the balancer). Pods are checked
/// against their own addresses either way.
#[test]
fn services_box_source_ranges_admit_the_node_when_they_hold_its_address() {
    let (b, [w1, w2, c1, _c2]) = web_box("");
    let lb = |ranges: &str| {
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: ranged, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.90
  clusterIPs: [10.96.0.90]
  loadBalancerSourceRanges: [{ranges}]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30095}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: dns, nodePort: 30096}}
status:
  loadBalancer:
    ingress: [{{ip: 198.51.100.60}}]
"#
        )
    };
    b.apply_yaml(&format!("{}---\n{}", lb("203.0.113.0/24"), web_slices("ranged", &w1, &w2)));
    wait_programmed(&b, "node-1", "198.51.100.60:80", 2);
    let n1 = b.node("node-1").clone();
    let (vip_tcp, vip_udp) = (sa("198.51.100.60", 80), sa("198.51.100.60", 53));
    let short = Duration::from_secs(1);
    // The ranges do not hold node-1's address: its connection is not balanced, nor is a pod's.
    for from in [&n1.netns, &c1.netns] {
        assert!(tcp_ask_from(from, None, vip_tcp, short).is_err(), "{from} is outside the ranges");
    }
    // They do now (the node subnet): node-1 reaches both backends, TCP and UDP, with the
    // load-balancer address as the peer; a pod is still outside.
    b.apply_yaml(&lb("203.0.113.0/24, 192.168.100.0/24"));
    b.wait_for(Duration::from_secs(15), "node-1 admitted", || tcp_ask_from(&n1.netns, None, vip_tcp, short).is_ok());
    let servers = tcp_servers(&n1.netns, vip_tcp, 12);
    assert_eq!(names(&servers), BTreeSet::from([w1.name.as_str(), w2.name.as_str()]), "{servers:?}");
    let (a, _) = udp_connected_ask(&n1.netns, vip_udp).expect("UDP from node-1");
    assert_eq!(a.peer, vip_udp, "the answer shows the load-balancer address");
    assert!(tcp_ask_from(&c1.netns, None, vip_tcp, short).is_err(), "a pod's own address is outside the ranges");
}

/// `bpftool map update pinned PIN key hex .. value hex ..`: an entry written as another
/// agent would have written it.
fn bpftool_update(pin: &std::path::Path, key: &[u8], value: &[u8]) {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>();
    let out = std::process::Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(pin)
        .args(["key", "hex"])
        .args(hex(key))
        .args(["value", "hex"])
        .args(hex(value))
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool map update: {}", String::from_utf8_lossy(&out.stderr));
}

/// A socket's cookie (what BPF's `bpf_get_socket_cookie` gives).
fn cookie(s: &impl std::os::fd::AsRawFd) -> u64 {
    let (mut cookie, mut len) = (0u64, 8u32);
    // SAFETY: SO_COOKIE writes a u64 into `cookie`.
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut cookie).cast(), &raw mut len)
    };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    cookie
}

/// A Service without a selector whose EndpointSlice (written by hand, as for a database
/// outside the cluster) lists an address outside every cluster range, with no node: pods
/// and nodes reach it through the cluster IP, TCP and UDP, and its answers come from the
/// service (a resolver's connected socket takes no other). Pods' UDP is translated per
/// packet and leaves through the node's stack, which masquerades it; the answer the stack
/// delivers is translated back on the pod's egress (`tc_to_pod`, which a node attaches for
/// such a backend).
#[test]
fn services_box_endpoints_outside_the_cluster_serve_pods_nodes_and_node_ports() {
    let (b, [_w1, _w2, c1, c2]) = web_box("");
    let ext = b.netns_of("external").unwrap();
    serve_at(&ext, "outside", EXTERNAL_IP, 5300);
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: db, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.70
  clusterIPs: [10.96.0.70]
  ports:
  - {{name: tcp, protocol: TCP, port: 5300, targetPort: 5300, nodePort: 30070}}
  - {{name: udp, protocol: UDP, port: 5300, targetPort: 5300, nodePort: 30070}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-manual
  namespace: default
  labels:
    kubernetes.io/service-name: db
addressType: IPv4
ports:
- {{name: tcp, protocol: TCP, port: 5300}}
- {{name: udp, protocol: UDP, port: 5300}}
endpoints:
- addresses: ["{EXTERNAL_IP}"]
  conditions: {READY}
"#
    ));
    for node in ["node-1", "node-2"] {
        wait_programmed(&b, node, "10.96.0.70:5300", 1);
        let pods = egress_links(&b, node).1;
        b.wait_for(Duration::from_secs(10), &format!("{node}'s pods get tc_to_pod"), || {
            egress_links(&b, node) == (pods, pods)
        });
    }
    let vip = sa("10.96.0.70", 5300);
    for ns in [&c1.netns, &c2.netns, &b.node("node-1").netns] {
        let a = tcp_ask(ns, vip).unwrap_or_else(|e| panic!("TCP from {ns}: {e}"));
        assert_eq!((a.server.as_str(), a.peer), ("outside", vip), "TCP from {ns}");
        let a = udp_ask(ns, vip).unwrap_or_else(|e| panic!("UDP from {ns}: {e}"));
        assert_eq!((a.server.as_str(), a.peer), ("outside", vip), "UDP from {ns}");
        let (a, _) = udp_connected_ask(ns, vip).unwrap_or_else(|e| panic!("connected UDP from {ns}: {e}"));
        assert_eq!((a.server.as_str(), a.peer), ("outside", vip), "connected UDP from {ns}");
    }
    // A pod's own flow out from a port where the datapath SNATs NodePort flows leaves from
    // a port below them: the masquerade keeps those for the datapath.
    let s = enter(&c1.netns, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 61234)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        s
    });
    let to = SocketAddr::from((EXTERNAL_IP, 5300));
    let a = udp_exchange(&s, to).unwrap_or_else(|e| panic!("c1 from port 61234 -> {to}: {e}"));
    assert_eq!((a.server.as_str(), a.peer, a.seen.ip()), ("outside", to, IpAddr::V4(b.node("node-1").ip)));
    assert!(a.seen.port() < 61000, "masqueraded below the datapath's SNAT ports: {}", a.seen);
    // From outside, through either node's NodePort: the node sends the flow on, from its
    // own address, out of its uplink, and its answers back to the client.
    let beyond = b.add_beyond(1500);
    // An endpoint in the cluster's pod range at no node is not sent out, even where
    // something outside would answer for the address (here, the external namespace).
    ip_in(&ext, &["addr", "add", "10.1.99.5/32", "dev", "lo"]);
    serve_at(&ext, "leaked", "10.1.99.5".parse().unwrap(), 5300);
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: lost, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.71
  clusterIPs: [10.96.0.71]
  ports:
  - {{name: tcp, protocol: TCP, port: 5300, targetPort: 5300, nodePort: 30072}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lost-a
  namespace: default
  labels:
    kubernetes.io/service-name: lost
addressType: IPv4
ports:
- {{name: tcp, protocol: TCP, port: 5300}}
endpoints:
- addresses: ["10.1.99.5"]
  conditions: {READY}
"#
    ));
    wait_programmed(&b, "node-1", "10.96.0.71:5300", 1);
    let lost = SocketAddr::from((b.node("node-1").ip, 30072));
    let got = tcp_ask_from(&beyond, None, lost, Duration::from_secs(1));
    assert!(got.is_err(), "a pod address no node routes stays in: {got:?}");
    for node in ["node-1", "node-2"] {
        let n = b.node(node).ip;
        let np = SocketAddr::from((n, 30070));
        let a = tcp_ask(&beyond, np).unwrap_or_else(|e| panic!("TCP from outside to {node}'s NodePort: {e}"));
        assert_eq!((a.server.as_str(), a.seen.ip(), a.peer), ("outside", IpAddr::V4(n), np), "TCP to {node}");
        let a = udp_ask(&beyond, np).unwrap_or_else(|e| panic!("UDP from outside to {node}'s NodePort: {e}"));
        assert_eq!((a.server.as_str(), a.seen.ip(), a.peer), ("outside", IpAddr::V4(n), np), "UDP to {node}");
    }
}

/// One datagram from `s` to `to`: who answered, the client address it saw, and where the
/// answer came from.
fn udp_exchange(s: &UdpSocket, to: SocketAddr) -> std::io::Result<Answer> {
    s.send_to(b"question", to)?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf)?;
    let (server, seen) = parse(&String::from_utf8_lossy(&buf[..n]));
    Ok(Answer { server, seen, peer: from })
}

/// A UDP socket in `ns` on `ip`, any port, that gives up on an answer after 3 s.
fn udp_socket_in(ns: &str, ip: Ipv4Addr) -> UdpSocket {
    enter(ns, move || {
        let s = UdpSocket::bind((ip, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        s
    })
}

/// Flows whose replies would have the same addresses: one socket of a pod reaching two
/// services that share a backend, and that backend directly; one client outside reaching
/// a NodePort and an externalIP with the same backend, from one port. Each flow's answers
/// come from where it was sent, as with netfilter, which gives the later flow another
/// source port. Before, the later flow's reply entry replaced the earlier one's, whose
/// answers then came from the wrong address (and a connected socket drops those).
#[test]
fn services_box_flows_whose_replies_would_meet_take_another_source_port() {
    let (b, [w1, _w2, c1, c2]) = web_box("");
    b.apply_yaml(
        r#"apiVersion: v1
kind: Service
metadata: {name: dns-a, namespace: default}
spec:
  clusterIP: 10.96.0.81
  clusterIPs: [10.96.0.81]
  type: NodePort
  externalIPs: [192.0.2.81]
  ports:
  - {name: dns, protocol: UDP, port: 53, targetPort: 8080, nodePort: 30081}
---
apiVersion: v1
kind: Service
metadata: {name: dns-b, namespace: default}
spec:
  clusterIP: 10.96.0.82
  clusterIPs: [10.96.0.82]
  ports:
  - {name: dns, protocol: UDP, port: 53, targetPort: 8080}
"#,
    );
    let only_w1 = |svc: &str| slice_yaml(svc, &format!("{svc}-a"), &[("dns", "UDP", 8080)], &[(&w1, READY)]);
    b.apply_yaml(&format!("{}---\n{}", only_w1("dns-a"), only_w1("dns-b")));
    for node in ["node-1", "node-2"] {
        wait_programmed(&b, node, "10.96.0.81:53", 1);
        wait_programmed(&b, node, "10.96.0.82:53", 1);
    }
    let (a, bb, direct) = (sa("10.96.0.81", 53), sa("10.96.0.82", 53), SocketAddr::from((w1.ip, 8080)));
    // From a pod on the backend's node and from one on the other node; services first, and
    // the backend directly first.
    let mut ports = vec![];
    for (client, order) in
        [(&c1, [a, bb, direct]), (&c2, [a, bb, direct]), (&c1, [direct, a, bb]), (&c2, [direct, bb, a])]
    {
        let s = udp_socket_in(&client.netns, Ipv4Addr::UNSPECIFIED);
        let port = s.local_addr().unwrap().port();
        ports.push(port);
        let mut seen = vec![];
        for round in 0..2 {
            for to in order {
                let got =
                    udp_exchange(&s, to).unwrap_or_else(|e| panic!("{} -> {to}, round {round}: {e}", client.name));
                assert_eq!((got.server.as_str(), got.peer), ("web-1", to), "{} -> {to}, round {round}", client.name);
                assert_eq!(got.seen.ip(), client.ip, "{} -> {to}: the pod's own address", client.name);
                seen.push(got.seen.port());
            }
        }
        // The first flow keeps its port; the later ones take others, and keep them.
        assert_eq!(seen[0], port, "{}: {order:?} {seen:?}", client.name);
        assert!(seen[1..3].iter().all(|p| *p != port) && seen[..3] == seen[3..], "{}: {order:?} {seen:?}", client.name);
    }
    // A hostNetwork backend (node-1's own address): its answers reach the pod through the
    // node's stack, where `tc_to_pod` gives the later flow its own port back.
    let n1 = b.node("node-1");
    serve_at(&n1.netns, "host-1", n1.ip, 5354);
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: dns-h, namespace: default}}
spec:
  clusterIP: 10.96.0.83
  clusterIPs: [10.96.0.83]
  ports:
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5354}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-h-a
  namespace: default
  labels:
    kubernetes.io/service-name: dns-h
addressType: IPv4
ports:
- {{name: dns, protocol: UDP, port: 5354}}
endpoints:
- addresses: ["{}"]
  conditions: {READY}
  nodeName: node-1
"#,
        n1.ip
    ));
    wait_programmed(&b, "node-1", "10.96.0.83:53", 1);
    let pods = egress_links(&b, "node-1").1;
    b.wait_for(Duration::from_secs(10), "node-1's pods get tc_to_pod", || egress_links(&b, "node-1") == (pods, pods));
    let (h, h_direct) = (sa("10.96.0.83", 53), SocketAddr::from((n1.ip, 5354)));
    for order in [[h, h_direct], [h_direct, h]] {
        let s = udp_socket_in(&c1.netns, Ipv4Addr::UNSPECIFIED);
        for round in 0..2 {
            for to in order {
                let got = udp_exchange(&s, to).unwrap_or_else(|e| panic!("c1 -> {to}, round {round}: {e}"));
                assert_eq!((got.server.as_str(), got.peer), ("host-1", to), "c1 -> {to}, round {round}");
            }
        }
    }
    // From outside, to node-1 (the backend's node: its NodePort and externalIP send on
    // without rewriting the source): one socket, both frontends.
    let n1 = b.node("node-1").ip;
    assert!(
        b.cmd("external", "ip")
            .args(["route", "add", "192.0.2.81/32", "via"])
            .arg(n1.to_string())
            .status()
            .unwrap()
            .success()
    );
    let ext = b.netns_of("external").unwrap();
    let s = udp_socket_in(&ext, EXTERNAL_IP);
    let port = s.local_addr().unwrap().port();
    let mut seen = vec![];
    for round in 0..2 {
        for to in [SocketAddr::from((n1, 30081)), sa("192.0.2.81", 53)] {
            let got = udp_exchange(&s, to).unwrap_or_else(|e| panic!("outside -> {to}, round {round}: {e}"));
            assert_eq!((got.server.as_str(), got.peer), ("web-1", to), "outside -> {to}, round {round}");
            assert_eq!(got.seen.ip(), EXTERNAL_IP, "the client's address is kept");
            seen.push(got.seen.port());
        }
    }
    assert!(seen[0] == port && seen[1] != port && seen[..2] == seen[2..], "outside: {seen:?}");
    // The listing shows the pod's direct flow that took another port, as a flow with a
    // source NAT and no service.
    let out = b
        .cmd("node-1", contiv_tests::bin_dir().join("netctl"))
        .args(["get", "conntrack", "--node", "node-1", "--pod", "default/c1", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let client = SocketAddr::from((c1.ip, ports[0])).to_string();
    let flows = report["flows"].as_array().cloned().unwrap_or_default();
    let f = flows
        .iter()
        .find(|f| f["client"] == client.as_str() && f["server"] == direct.to_string().as_str())
        .unwrap_or_else(|| panic!("{client} -> {direct} in {flows:?}"));
    assert!(f["service"].is_null() && f["backend"].is_null(), "{f}");
    let nat = f["sourceNat"].as_str().unwrap_or_else(|| panic!("a source NAT: {f}"));
    assert!(nat.starts_with(&format!("{}:", c1.ip)) && nat != client, "{f}");
}

/// An unconnected UDP socket of the node keeps one backend per service address while that
/// backend stays in the service, as netfilter's conntrack keeps a UDP flow on one backend
/// (a protocol with several datagrams per exchange would break otherwise); when it leaves,
/// the socket's next datagram goes to one that is left. Other sockets are balanced as ever.
#[test]
fn services_box_a_nodes_unconnected_udp_socket_keeps_its_backend() {
    // The conntrack UDP timeout, 1 s: how long the socket keeps its backend while idle.
    let (b, [w1, w2, _c1, _c2]) = web_box("[services.timeouts]\nudp = 1\n");
    b.apply_yaml(
        r#"apiVersion: v1
kind: Service
metadata: {name: quic, namespace: default}
spec:
  clusterIP: 10.96.0.84
  clusterIPs: [10.96.0.84]
  ports:
  - {name: dns, protocol: UDP, port: 53, targetPort: dns}
"#,
    );
    let both = web_slices("quic", &w1, &w2);
    b.apply_yaml(&both);
    wait_programmed(&b, "node-1", "10.96.0.84:53", 2);
    let vip = sa("10.96.0.84", 53);
    let n1 = b.node("node-1").netns.clone();
    let fresh = udp_servers(&n1, vip, 20);
    assert_eq!(names(&fresh), BTreeSet::from(["web-1", "web-2"]), "each new socket is balanced: {fresh:?}");
    let s = udp_socket_in(&n1, Ipv4Addr::UNSPECIFIED);
    let mut seen = BTreeMap::<String, usize>::new();
    for i in 0..20 {
        let got = udp_exchange(&s, vip).unwrap_or_else(|e| panic!("datagram {i}: {e}"));
        assert_eq!(got.peer, vip, "the answer comes from the service");
        *seen.entry(got.server).or_default() += 1;
    }
    assert_eq!(seen.len(), 1, "one socket, one backend: {seen:?}");
    // Idle past the UDP timeout, it lets go, as netfilter forgets an idle flow: its next
    // datagram is balanced anew (each time, the other backend with even odds).
    let kept = seen.keys().next().unwrap().clone();
    let moved = (0..12).any(|_| {
        std::thread::sleep(Duration::from_millis(2300));
        udp_exchange(&s, vip).expect("after an idle spell").server != kept
    });
    assert!(moved, "after idle spells past the UDP timeout the socket is balanced anew");
    // Busy again: it keeps the backend it has now.
    let mut seen = BTreeMap::<String, usize>::new();
    for i in 0..20 {
        *seen.entry(udp_exchange(&s, vip).unwrap_or_else(|e| panic!("datagram {i}: {e}")).server).or_default() += 1;
    }
    assert_eq!(seen.len(), 1, "one socket, one backend again: {seen:?}");
    let first = seen.into_keys().next().unwrap();
    // Its backend leaves the service: the next datagram goes to the other one, and stays.
    let (gone_slice, other) = if first == "web-1" { ("quic-a", "web-2") } else { ("quic-b", "web-1") };
    b.delete_yaml(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {gone_slice}\n  namespace: default\n"
    ));
    wait_programmed(&b, "node-1", "10.96.0.84:53", 1);
    for i in 0..5 {
        let got = udp_exchange(&s, vip).unwrap_or_else(|e| panic!("datagram {i} after {first} left: {e}"));
        assert_eq!((got.server.as_str(), got.peer), (other, vip), "datagram {i} after {first} left");
    }
}

/// One TCP exchange from `ns` to `addr`, on a socket of `addr`'s family (an IPv6 socket
/// for an IPv4-mapped address, as Java and .NET open by default).
fn tcp_ask_any(ns: &str, addr: SocketAddr) -> std::io::Result<Answer> {
    enter(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"hello")?;
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf)?;
        let (server, seen) = parse(&String::from_utf8_lossy(&buf[..n]));
        Ok(Answer { server, seen, peer: s.peer_addr()? })
    })
}

/// The node's own sockets, as runtimes open them:
/// - an IPv6 socket reaching a service by its IPv4-mapped address (`::ffff:10.96.0.10`,
///   Java's and .NET's default) is balanced at connect() like an IPv4 one, sees the service
///   as its peer and as the source of UDP answers (the kernel runs connect6, recvmsg6 and
///   getpeername6 for it, not the IPv4 hooks);
/// - a UDP socket connected to a service that names it again in sendto() stays on the
///   backend it is connected to (the only peer it hears);
/// - 0.0.0.0 is the caller's own host: the node's like its loopback, a pod's its own, never
///   the key NodePorts are kept under;
/// - an agent's replacement hands the socket programs over without a moment where the old
///   and the new one both run.
#[test]
fn services_box_node_sockets_of_every_kind_reach_services() {
    let (mut b, [w1, w2, c1, _c2]) = web_box("");
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {{app: web}}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: http, nodePort: 30080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: dns, nodePort: 30053}}
---
{}"#,
        web_slices("web", &w1, &w2)
    ));
    wait_programmed(&b, "node-1", "10.96.0.10:80", 2);
    wait_programmed(&b, "node-1", "10.96.0.10:53", 2);
    let node = b.node("node-1").netns.clone();
    let mapped = |port: u16| SocketAddr::new(IpAddr::V6(Ipv4Addr::new(10, 96, 0, 10).to_ipv6_mapped()), port);
    let both: BTreeSet<&str> = ["web-1", "web-2"].into();

    // TCP from an IPv6 socket: balanced over both backends, the service as its peer.
    let mut seen = BTreeMap::new();
    for _ in 0..16 {
        let a = tcp_ask_any(&node, mapped(80)).unwrap_or_else(|e| panic!("TCP to {}: {e}", mapped(80)));
        assert_eq!(a.peer, mapped(80), "getpeername shows the service");
        *seen.entry(a.server).or_insert(0usize) += 1;
    }
    assert_eq!(names(&seen), both, "{seen:?}");

    // UDP from IPv6 sockets: a connected one hears its backend as the service, and so does
    // an unconnected one (its datagram takes the IPv4 path, its answer the IPv6 one).
    let (from, peer) = enter(&node, move || {
        let s = UdpSocket::bind("[::]:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.connect(mapped(53)).expect("connect");
        s.send(b"question").expect("send");
        let mut buf = [0u8; 256];
        let (_, from) = s.recv_from(&mut buf).expect("an answer to the connected IPv6 socket");
        (from, s.peer_addr().unwrap())
    });
    assert_eq!((from, peer), (mapped(53), mapped(53)));
    let from = enter(&node, move || {
        let s = UdpSocket::bind("[::]:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"question", mapped(53)).expect("send_to");
        let mut buf = [0u8; 256];
        s.recv_from(&mut buf).expect("an answer to the unconnected IPv6 socket").1
    });
    assert_eq!(from, mapped(53), "the answer comes from the service");

    // Connected UDP sockets that name their service again: every datagram is answered,
    // all by the backend the socket is connected to. (Balanced apart from the connect(),
    // half of these sockets would wait for answers that never reach them.)
    let vip = sa("10.96.0.10", 53);
    for n in 0..8 {
        let servers = enter(&node, move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.connect(vip).expect("connect");
            let mut servers = BTreeMap::new();
            for i in 0..5 {
                let a = udp_exchange(&s, vip).unwrap_or_else(|e| panic!("socket {n}, sendto #{i}: {e}"));
                *servers.entry(a.server).or_insert(0usize) += 1;
            }
            servers
        });
        assert_eq!(servers.len(), 1, "one backend, the connected one: {servers:?}");
    }

    // 0.0.0.0:<nodePort>: the node's own host, served as on 127.0.0.1; a pod's own host,
    // where nothing listens.
    let a = tcp_ask(&node, sa("0.0.0.0", 30080)).expect("the node reaches its NodePort on 0.0.0.0");
    assert!(both.contains(a.server.as_str()), "{a:?}");
    let err = tcp_ask(&c1.netns, sa("0.0.0.0", 30080)).expect_err("a pod's 0.0.0.0 is its own host");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    // An agent replacement hands each socket program's link over to the new program: no
    // connect() meets both (the new sock_connect4, after the old one translated the call,
    // would forget the service the old one recorded). The old connect4 link is held open
    // here, as the moment between attaching the new program and releasing the old would.
    let link = b.node("node-1").pin_dir.join("links/cgroup_sock_connect4");
    let held = contiv_tests::open_pinned(&link);
    b.stop_agent("node-1", false);
    b.start_agent("node-1");
    b.wait_for(Duration::from_secs(15), "node-1's first service apply after the restart", || {
        b.status_json("node-1", "/services").is_some_and(|r| !r["lastApply"].is_null())
    });
    for _ in 0..4 {
        let a = tcp_ask(&node, sa("10.96.0.10", 80)).expect("TCP to the service after the agent's replacement");
        assert_eq!(a.peer, sa("10.96.0.10", 80), "getpeername shows the service after the replacement");
    }
    drop(held);
}

/// A UDP NodePort whose only backend is on another node, asked from outside from thousands
/// of client ports within seconds (a resolver's queries take a new port each): every flow
/// needs a port of its own on node-1's address for its answers (61000-65535, per backend),
/// and every datagram is answered. Before, a flow tried 4 ports from a random point and was
/// dropped unseen when all 4 were taken: with 60 s UDP entries a few dozen new client ports
/// a second filled the range enough to lose a growing share of them (about one in eight
/// over 4,000 flows, over half of the last ones). A client port inside that range is kept,
/// as netfilter's masquerade keeps a port in its range; one outside it is not (the node's
/// own sockets and its masquerade use those).
#[test]
fn services_box_thousands_of_client_ports_to_a_remote_backend_are_all_answered() {
    const FLOWS: u16 = 4000;
    // Small enough that the backend's socket buffer holds a window's datagrams.
    const WINDOW: u16 = 50;
    const FIRST_PORT: u16 = 20000;
    let (b, [_w1, w2, _c1, _c2]) = web_box("");
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: resolver, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.90
  clusterIPs: [10.96.0.90]
  ports:
  - {{name: dns, protocol: UDP, port: 53, targetPort: dns, nodePort: 30090}}
---
{}"#,
        slice_yaml("resolver", "resolver-b", &[("dns", "UDP", 9090)], &[(&w2, READY)])
    ));
    wait_programmed(&b, "node-1", "*:30090", 1);
    let n1 = b.node("node-1").ip;
    let to = SocketAddr::from((n1, 30090));
    let ext = b.netns_of("external").unwrap();
    // A client port inside the range is kept when it is free (here, before the flows below
    // take most of the range); one in the kernel's ephemeral range is not (a socket of the
    // node could take it to the same backend later).
    for (port, kept) in [(62000, true), (40000, false)] {
        let a = enter(&ext, move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            udp_exchange(&s, to)
        })
        .unwrap_or_else(|e| panic!("outside from port {port} -> {to}: {e}"));
        assert_eq!(a.seen.ip(), IpAddr::V4(n1), "web-2 sees node-1");
        assert_eq!(a.seen.port() == port, kept, "client port {port} kept: {kept} (web-2 saw {})", a.seen);
        assert!(a.seen.port() >= 61000, "web-2 saw {}", a.seen);
    }
    // Windows of sockets, each on a port of its own: all sent, then all answers read (a
    // lost datagram costs the window's wait once, not each).
    let (answered, seen) = enter(&ext, move || {
        let (mut answered, mut seen) = (0u32, BTreeSet::new());
        for first in (FIRST_PORT..FIRST_PORT + FLOWS).step_by(usize::from(WINDOW)) {
            let socks: Vec<UdpSocket> = (first..first + WINDOW)
                .map(|port| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind"))
                .collect();
            for s in &socks {
                s.send_to(b"question", to).expect("send");
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut buf = [0u8; 256];
            for s in &socks {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                s.set_read_timeout(Some(left)).unwrap();
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let (server, at) = parse(&String::from_utf8_lossy(&buf[..n]));
                    assert_eq!((server.as_str(), from), ("web-2", to), "the answer comes from the NodePort");
                    answered += 1;
                    seen.insert(at);
                }
            }
        }
        (answered, seen)
    });
    let r = b.status_json("node-1", "/services").unwrap();
    let f = r["frontends"].as_array().unwrap().iter().find(|f| f["frontend"] == "*:30090").unwrap().clone();
    // What reached web-2's UDP layer (a datagram its socket had no room for counts too):
    // what the datapath delivered, whatever the test's server made of it.
    let snmp = enter(&w2.netns, || std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap());
    let udp: Vec<Vec<&str>> =
        snmp.lines().filter(|l| l.starts_with("Udp: ")).map(|l| l.split_whitespace().collect()).collect();
    let field = |name: &str| -> u64 {
        let i = udp[0].iter().position(|n| *n == name).unwrap();
        udp[1][i].parse().unwrap()
    };
    let arrived = field("InDatagrams") + field("RcvbufErrors");
    assert!(
        arrived >= u64::from(FLOWS) + 2 - 4 && answered >= u32::from(FLOWS) - 4,
        "{arrived} of {FLOWS} datagrams from distinct client ports reached web-2 (and the 2 above), {answered} \
         answered (node-1 dropped the rest): {f}"
    );
    // Each flow had a port of its own on node-1's address, in the SNAT range: the client's
    // ports (20000-23999) lie outside it, so none was kept.
    assert_eq!(seen.len(), answered as usize, "one source port on node-1 per flow");
    assert!(seen.iter().all(|a| a.ip() == IpAddr::V4(n1) && a.port() >= 61000), "{seen:?}");
    assert_eq!(f["snatExhausted"], 0, "no flow found every port taken: {f}");
    assert!(f["connections"].as_u64().unwrap() >= u64::from(FLOWS), "{f}");

    // Every port of the range taken towards web-2 (reply entries written into node-1's
    // conntrack table with bpftool, stamped now so that no sweep takes them): a new flow
    // finds none, is dropped unanswered and counted on the service as `snat_exhausted`.
    let (backend, backend_port) = (w2.ip.octets(), 9090u16);
    // SAFETY: clock_gettime writes the timespec it is given.
    let now_ns = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
    let pin = b.node("node-1").pin_dir.join("CT");
    let mut value = now_ns.to_ne_bytes().to_vec();
    value.resize(32, 0);
    let batch: String = (61000..=u16::MAX)
        .map(|port| {
            let mut key = [backend, n1.octets()].concat();
            key.extend_from_slice(&backend_port.to_ne_bytes());
            key.extend_from_slice(&port.to_ne_bytes());
            key.extend_from_slice(&[17, 0, 0, 0]);
            format!("map update pinned {} key hex {} value hex {}\n", pin.display(), hex(&key), hex(&value))
        })
        .collect();
    let file = std::env::temp_dir().join(format!("contiv-snat-fill-{}", std::process::id()));
    std::fs::write(&file, batch).unwrap();
    let out = std::process::Command::new("bpftool").args(["batch", "file"]).arg(&file).output().unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "bpftool batch: {}", String::from_utf8_lossy(&out.stderr));
    let lost = enter(&ext, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 25000)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        udp_exchange(&s, to)
    });
    assert!(lost.is_err(), "a flow with no free source port is dropped: {lost:?}");
    let r = b.status_json("node-1", "/services").unwrap();
    let f = r["frontends"].as_array().unwrap().iter().find(|f| f["frontend"] == "*:30090").unwrap().clone();
    assert_eq!(f["snatExhausted"], 1, "the dropped flow is counted: {f}");
    let metrics = b.status("node-1", "/metrics").unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("contiv_service_snat_exhausted_total{") && l.ends_with(" 1")),
        "{metrics}"
    );
}

/// A UDP frame `from` -> `to` with ports, as it would leave `from_mac` for `to_mac`.
fn udp_frame(to_mac: [u8; 6], from_mac: [u8; 6], from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (from.ip(), to.ip()) else { panic!("IPv4") };
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = to_mac.to_vec();
    frame.extend_from_slice(&from_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&from.port().to_be_bytes());
    frame.extend_from_slice(&to.port().to_be_bytes());
    frame.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// The MAC address of `ifname` in `ns`.
fn mac_of(ns: &str, ifname: &str) -> [u8; 6] {
    let out = ip_in(ns, &["-br", "link", "show", ifname]);
    let mac = out.split_whitespace().nth(2).unwrap_or_else(|| panic!("no MAC in {out:?}"));
    let b: Vec<u8> = mac.split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
    b.try_into().unwrap_or_else(|_| panic!("a MAC: {mac}"))
}

/// A frame on node-1's uplink addressed to another host's MAC (a promiscuous uplink, or a
/// bridge flooding a frame for a MAC it has not learnt) is not translated: the node's stack
/// drops it, as it drops it before kube-proxy's rules. Before, the uplink's program DNAT'ed
/// a frame for an externalIP meant for another host to the backend, which answered.
#[test]
fn services_box_frames_for_another_host_on_the_uplink_are_not_translated() {
    let (b, [w1, _w2, _c1, _c2]) = web_box("");
    b.apply_yaml(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: elsewhere, namespace: default}}
spec:
  clusterIP: 10.96.0.91
  clusterIPs: [10.96.0.91]
  externalIPs: [198.51.100.91]
  ports:
  - {{name: dns, protocol: UDP, port: 53, targetPort: dns}}
---
{}"#,
        slice_yaml("elsewhere", "elsewhere-a", &[("dns", "UDP", 8080)], &[(&w1, READY)])
    ));
    wait_programmed(&b, "node-1", "198.51.100.91:53", 1);
    let n1 = b.node("node-1").netns.clone();
    ip_in(&n1, &["link", "set", "eth0", "promisc", "on"]);
    let ext = b.netns_of("external").unwrap();
    let (node_mac, ext_mac) = (mac_of(&n1, "eth0"), mac_of(&ext, "eth0"));
    let vip = sa("198.51.100.91", 53);
    // Two client sockets outside: one asks with a frame for a MAC no host here has (the
    // bridge floods it to every node), the other with a frame for node-1.
    let (stray, asked) = (udp_socket_in(&ext, ROUTER_IP), udp_socket_in(&ext, ROUTER_IP));
    let (stray_from, asked_from) = (stray.local_addr().unwrap(), asked.local_addr().unwrap());
    send_frame(&ext, "eth0", udp_frame([0x02, 0, 0, 0, 0x5e, 0x91], ext_mac, stray_from, vip, b"stray"));
    send_frame(&ext, "eth0", udp_frame(node_mac, ext_mac, asked_from, vip, b"question"));
    // The frame for node-1 is answered (so the stray one, sent first, had every chance).
    let mut buf = [0u8; 256];
    let (n, from) = asked.recv_from(&mut buf).expect("the frame for node-1 is answered");
    let (server, seen) = parse(&String::from_utf8_lossy(&buf[..n]));
    assert_eq!((server.as_str(), from, seen), ("web-1", vip, asked_from), "the frame for node-1");
    stray.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let got = stray.recv_from(&mut buf);
    assert!(
        got.is_err(),
        "a frame for another host reached the backend: {:?}",
        got.map(|(n, f)| (f, String::from_utf8_lossy(&buf[..n]).into_owned()))
    );
}

/// The store loses its data (wiped, or restored from a backup older than the objects) after
/// contiv-ksr synced it: the agents keep their services as installed, where the empty model
/// would drop every one. That hold is on purpose, so the proxy's `/healthz` stays 200 past
/// `healthzTimeout`: 503 would have load balancers drain every node at once while every
/// node still forwards. Once KSR fills the store again, the services follow it.
#[test]
fn services_box_services_and_the_proxy_healthz_stay_while_the_store_has_lost_its_data() {
    let (b, [w1, w2, c1, _]) = web_box("[services]\nhealthzTimeout = 2\n");
    b.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: kept, namespace: default}}\nspec:\n  \
         clusterIP: 10.96.0.40\n  clusterIPs: [10.96.0.40]\n  selector: {{app: web}}\n  ports:\n  \
         - {{name: http, protocol: TCP, port: 80, targetPort: http}}\n  \
         - {{name: dns, protocol: UDP, port: 53, targetPort: dns}}\n---\n{}",
        web_slices("kept", &w1, &w2)
    ));
    // contiv-ksr synced the store (the box writes its objects with netctl; the marker is KSR's).
    b.etcdctl(&["put", "/contiv/ksr/marker", "{}"]);
    let both: BTreeSet<&str> = ["web-1", "web-2"].into();
    let programmed = |node: &str| {
        b.status_json(node, "/services")
            .is_some_and(|r| r["frontends"].as_array().into_iter().flatten().any(|f| f["frontend"] == "10.96.0.40:80"))
    };
    b.wait_for(Duration::from_secs(15), "node-1 programs 10.96.0.40", || programmed("node-1"));
    assert_eq!(names(&tcp_servers(&c1.netns, sa("10.96.0.40", 80), 16)), both);
    let healthz = |n: &str| http_get_from_outside(&b, &format!("http://{}:10256/healthz", b.node(n).ip));
    // Every reflected object and the marker go, in one revision.
    b.etcdctl(&["del", "--prefix", "/contiv/k"]);
    for second in 1..=5 {
        std::thread::sleep(Duration::from_secs(1));
        // 20 connections: all on one of two backends by chance once in half a million.
        assert_eq!(
            names(&tcp_servers(&c1.netns, sa("10.96.0.40", 80), 20)),
            both,
            "{second} s after the store lost its data, the service still balances over both"
        );
        for n in ["node-1", "node-2"] {
            let h = healthz(n);
            assert!(h.ends_with(" 200"), "{n}'s /healthz {second} s into the hold (healthzTimeout 2 s): {h}");
        }
    }
    // KSR filled the store again (here: with nothing but its marker): the service goes.
    b.etcdctl(&["put", "/contiv/ksr/marker", "{}"]);
    for n in ["node-1", "node-2"] {
        b.wait_for(Duration::from_secs(15), &format!("{n} removes 10.96.0.40"), || !programmed(n));
        assert!(healthz(n).ends_with(" 200"), "{n}: applied, healthy");
    }
}
