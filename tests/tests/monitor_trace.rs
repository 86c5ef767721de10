//! The operator tools in the cluster in a box (root): `netctl trace` and `netctl monitor`
//! against real agents, their eBPF datapath and real traffic.
//!
//! - trace: a pod's packet to a pod on its node (delivered), to a pod on the other node
//!   (over the overlay to that node, followed there into the pod), to a ClusterIP
//!   (translated to a backend), to a pod whose ingress rules deny it (dropped,
//!   policy_ingress; on the other node too), out of a pod isolated for egress
//!   (policy_egress, with the entry that decided), and from an address not the pod's
//!   (spoofed_ip); the traces write nothing (conntrack, affinity, counters unchanged on
//!   both nodes), and real traffic then does what the traces said.
//! - monitor: a policy drop shows with its pod, 5-tuple and reason, `--pod` and `--drops`
//!   filter what a client sees, and a flood of dropped packets stays within the kernel's
//!   rate while every drop is still counted, the rest as suppressed.
//!
//! One box per test (they run in parallel); each box's agents serve their status endpoint on
//! the node address, as deployed, so netctl finds them through their registration.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use contiv_tests::{
    cluster::{BoxOptions, BoxPod, ClusterBox, ContainerPort, enter},
    netpol::{Proto, Servers, pod_counter, probe},
    send_lone_later_fragment,
};
use serde_json::Value;

fn skip_unless_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (network namespaces, BPF); run `cargo xtask test`");
        return true;
    }
    false
}

/// `netctl trace` as JSON (no --node: netctl finds the pod's node in the store).
fn trace(b: &ClusterBox, from: &str, to: &str, extra: &[&str]) -> Value {
    let mut args = vec!["trace", "--from", from, "--to", to, "-o", "json"];
    args.extend_from_slice(extra);
    let out = b.netctl(&args);
    assert!(
        out.status.success(),
        "netctl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("trace JSON: {e}"))
}

fn stage<'a>(t: &'a Value, stage: &str) -> Vec<&'a Value> {
    t["steps"].as_array().into_iter().flatten().filter(|s| s["stage"] == stage).collect()
}

fn results(t: &Value) -> String {
    t["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| format!("{}: {} ({})", s["stage"], s["result"], s["detail"]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Number of entries in a pinned map (bpftool).
fn map_len(b: &ClusterBox, node: &str, map: &str) -> usize {
    let pin = b.node(node).pin_dir.join(map);
    let out = std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&pin).output().unwrap();
    assert!(out.status.success(), "bpftool dump {}: {}", pin.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0)
}

/// The counters a traced packet would move if it were real: every pod's forwarded, tunnelled
/// and host packets and drops, and every service's counters. (Slow-path counters are left
/// out: the pods' own IPv6 neighbour discovery goes there whenever it likes.)
fn counters(b: &ClusterBox, node: &str) -> Vec<Value> {
    let mut out = vec![];
    for p in b.status_json(node, "/pods").expect("/pods").as_array().unwrap() {
        let c = &p["counters"];
        let mut kept = serde_json::Map::new();
        for (k, v) in c.as_object().into_iter().flatten() {
            if k.starts_with("drop") || k.starts_with("fwd") || k.starts_with("tunnel") || k.starts_with("host") {
                kept.insert(k.clone(), v.clone());
            }
        }
        out.push(serde_json::json!({"pod": p["podName"], "counters": kept}));
    }
    let svc = b.status_json(node, "/services").expect("/services");
    for f in svc["frontends"].as_array().into_iter().flatten() {
        out.push(serde_json::json!([f["frontend"], f["connections"], f["noEndpointRejects"], f["sourceDenied"]]));
    }
    out
}

#[test]
fn trace_explains_local_remote_service_policy_and_spoofed_packets_without_changing_state() {
    if skip_unless_root() {
        return;
    }
    let mut opts = BoxOptions::for_test(2);
    opts.agent_config = "statusAddr = \"0.0.0.0:9192\"\n".into();
    let mut b = ClusterBox::up(opts);
    let http = |port: u16| vec![ContainerPort { name: "http".into(), port, protocol: "TCP".into() }];
    let a = b.add_pod("node-1", "x/a", &[("app", "client")], &[]);
    let local = b.add_pod("node-1", "x/b", &[("app", "web")], &http(80));
    let remote = b.add_pod("node-2", "y/c", &[("app", "web")], &http(80));
    let guarded = b.add_pod("node-1", "x/d", &[("app", "guarded")], &[]);
    let mut servers = Servers::new();
    for p in [&local, &remote, &guarded] {
        servers.serve(&p.netns, &[80, 81]);
    }
    b.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: x}}\nspec:\n  clusterIP: 10.96.0.50\n  \
         clusterIPs: [10.96.0.50]\n  selector: {{app: web}}\n  ports:\n  - {{name: http, protocol: TCP, port: 8080, \
         targetPort: http}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  \
         namespace: x\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, \
         protocol: TCP, port: 80}}\nendpoints:\n- addresses: [{}]\n  conditions: {{ready: true}}\n  nodeName: node-1\n\
         - addresses: [{}]\n  conditions: {{ready: true}}\n  nodeName: node-2\n",
        local.ip, remote.ip
    ));
    b.wait_for(Duration::from_secs(15), "node-1 programs the service", || {
        b.status_json("node-1", "/services").is_some_and(|r| {
            r["frontends"].as_array().into_iter().flatten().any(|f| f["frontend"] == "10.96.0.50:8080")
        })
    });
    // No traffic has flowed yet: conntrack is empty, and stays so through every trace.
    let ct_before = map_len(&b, "node-1", "CT");
    let ct2_before = map_len(&b, "node-2", "CT");
    let affinity_before = map_len(&b, "node-1", "SVC_AFFINITY");
    let counters_before = (counters(&b, "node-1"), counters(&b, "node-2"));
    let started = Instant::now();

    // 1. To a pod on the same node: delivered into it, TTL decremented, MACs rewritten.
    let t = trace(&b, "x/a", &format!("{}:80/TCP", local.ip), &[]);
    assert_eq!(t["outcome"], "delivered", "{}", results(&t));
    assert_eq!(t["action"], "TC_ACT_REDIRECT");
    assert_eq!(t["node"], "node-1");
    assert_eq!(t["program"]["attached"], true, "the trace ran the program attached to x/a's interface");
    assert_eq!(stage(&t, "source check")[0]["result"], "ok");
    assert_eq!(stage(&t, "conntrack")[0]["result"], "miss");
    assert_eq!(stage(&t, "policy egress")[0]["result"], "not isolated");
    assert_eq!(stage(&t, "route")[0]["result"], "local pod");
    let delivery = stage(&t, "delivery")[0]["detail"].as_str().unwrap().to_owned();
    assert!(delivery.contains("x/b") && delivery.contains("bpf_redirect_peer"), "{delivery}");
    assert_eq!(t["packetOut"]["ttl"], 63);
    assert_eq!(t["packetOut"]["srcMac"], "02:fe:00:00:00:01", "from the gateway's MAC");
    assert_eq!(t["packet"]["src"], a.ip.to_string());

    // 2. To a pod on the other node: over the overlay to node-2, then (followed there) into
    // the pod by node-2's overlay program.
    let t = trace(&b, "x/a", &format!("{}:80/TCP", remote.ip), &[]);
    assert_eq!(t["outcome"], "forwarded", "{}", results(&t));
    assert_eq!(stage(&t, "route")[0]["result"], "other node");
    assert!(t["verdict"].as_str().unwrap().contains("node node-2 (192.168.100.12)"), "{}", t["verdict"]);
    // The program built the outer headers; the report shows, and node-2 is handed, the
    // packet inside them.
    let notes = t["notes"].to_string();
    assert!(notes.contains("outer IPv4/UDP/VXLAN headers (VNI 1)"), "{notes}");
    assert_eq!(t["packetOut"]["dst"], remote.ip.to_string(), "{t}");
    let arrival = &t["arrival"];
    assert_eq!(arrival["node"], "node-2", "{t}");
    assert_eq!(arrival["program"]["name"], "tc_from_overlay");
    assert_eq!(arrival["program"]["attached"], true);
    assert_eq!(arrival["outcome"], "delivered", "{}", results(arrival));
    assert_eq!(stage(arrival, "overlay source")[0]["result"], "ok");
    assert_eq!(stage(arrival, "policy ingress")[0]["result"], "not isolated");
    assert!(arrival["verdict"].as_str().unwrap().contains("y/c"), "{}", arrival["verdict"]);
    assert_eq!(arrival["packetOut"]["ttl"], 62, "one hop on each node");

    // 3. To the ClusterIP: translated to one of its two backends, named.
    let t = trace(&b, "x/a", "10.96.0.50:8080/TCP", &[]);
    assert_ne!(t["outcome"], "dropped", "{}", results(&t));
    let svc = stage(&t, "service");
    assert_eq!(svc[0]["result"], "frontend", "{}", results(&t));
    assert!(svc[0]["detail"].as_str().unwrap().contains("service x/web:http"), "{}", svc[0]["detail"]);
    assert_eq!(svc[1]["result"], "backend");
    let backend: Ipv4Addr = t["packetOut"]["dst"].as_str().unwrap().parse().unwrap();
    assert!(backend == local.ip || backend == remote.ip, "DNAT to a backend: {backend}");
    assert_eq!(t["packetOut"]["dport"], 80, "the target port");
    assert_eq!(t["outcome"], if backend == local.ip { "delivered" } else { "forwarded" });
    assert!(stage(&t, "conntrack").iter().any(|s| s["result"] == "record"), "would record the flow");
    // The same cluster IP on a port no service defines: refused by the slow path.
    let t = trace(&b, "x/a", "10.96.0.50:9999/TCP", &[]);
    assert_eq!(t["outcome"], "slow_path", "{}", results(&t));
    let svc = stage(&t, "service");
    assert_eq!(svc[0]["result"], "refused", "{}", results(&t));
    assert!(svc[0]["detail"].as_str().unwrap().contains("no service defines 9999/TCP"), "{}", svc[0]["detail"]);

    // 4. From an address that is not the pod's: anti-spoofing drops it.
    let t = trace(&b, "x/a", &format!("{}:80/TCP", local.ip), &["--from-ip", "10.1.1.250"]);
    assert_eq!(t["outcome"], "dropped");
    assert_eq!(t["dropReason"], "spoofed_ip", "{}", results(&t));
    assert_eq!(stage(&t, "source check")[0]["result"], "spoofed");
    assert_eq!(t["action"], "TC_ACT_SHOT");

    // Nothing written by any of them.
    assert_eq!(map_len(&b, "node-1", "CT"), ct_before, "traces create no conntrack entries");
    assert_eq!(map_len(&b, "node-2", "CT"), ct2_before, "nor does the arrival on node-2");
    assert_eq!(map_len(&b, "node-1", "SVC_AFFINITY"), affinity_before);
    assert_eq!((counters(&b, "node-1"), counters(&b, "node-2")), counters_before, "traces count nothing");
    eprintln!("five traces in {:?}", started.elapsed());

    // 5. Policy: x/d admits nobody; x/a may only talk to app=web on port 80 (egress); y's
    // web pods admit only web pods (so x/a's packet passes node-1 and dies on node-2).
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: guard, namespace: x}\nspec:\n  \
         podSelector: {matchLabels: {app: guarded}}\n  policyTypes: [Ingress]\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-out, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: \
         [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 80}]\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-in, namespace: y}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {}, \
         podSelector: {matchLabels: {app: web}}}]\n",
    );
    let to_guarded = format!("{}:80/TCP", guarded.ip);
    let mut t = Value::Null;
    b.wait_for(Duration::from_secs(15), "the policies apply on node-1", || {
        t = trace(&b, "x/b", &to_guarded, &[]);
        t["outcome"] == "dropped"
    });
    assert_eq!(t["dropReason"], "policy_ingress", "{}", results(&t));
    let ingress = stage(&t, "policy ingress");
    assert_eq!(ingress[0]["result"], "denied");
    assert!(ingress[0]["detail"].as_str().unwrap().contains("x/d"), "{}", ingress[0]["detail"]);
    // x/a -> y/c:81 is not allowed by x/a's egress rules (port 80 only); the entry is named.
    let t = trace(&b, "x/a", &format!("{}:81/TCP", remote.ip), &[]);
    assert_eq!(t["dropReason"], "policy_egress", "{}", results(&t));
    let egress = stage(&t, "policy egress")[0]["detail"].as_str().unwrap().to_owned();
    assert!(egress.contains("do not allow TCP:81") && egress.contains("TCP:80"), "{egress}");
    // x/a -> y/c:80 leaves node-1 (egress allows it) and is dropped on node-2 by y/c's
    // ingress rules: the answer to "why can't x/a reach y/c" is on the other node.
    let mut t = Value::Null;
    b.wait_for(Duration::from_secs(15), "the policies apply on node-2", || {
        t = trace(&b, "x/a", &format!("{}:80/TCP", remote.ip), &[]);
        t["arrival"]["outcome"] == "dropped"
    });
    assert_eq!(t["outcome"], "forwarded", "{}", results(&t));
    assert_eq!(stage(&t, "policy egress")[0]["result"], "allowed");
    assert_eq!(t["arrival"]["dropReason"], "policy_ingress", "{}", results(&t["arrival"]));
    let ingress = stage(&t["arrival"], "policy ingress")[0]["detail"].as_str().unwrap().to_owned();
    assert!(ingress.contains("y/c") && ingress.contains("x/a"), "{ingress}");
    // x/b (app=web) passes both.
    let t = trace(&b, "x/b", &format!("{}:80/TCP", remote.ip), &[]);
    assert_eq!(t["arrival"]["outcome"], "delivered", "{}", results(&t["arrival"]));
    assert_eq!(map_len(&b, "node-1", "CT"), ct_before, "still no conntrack entry");
    assert_eq!(map_len(&b, "node-2", "CT"), ct2_before);

    // The human form: every step and the verdict.
    let out = b.netctl(&["trace", "--from", "x/b", "--to", &to_guarded]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("verdict: dropped (policy_ingress) [TC_ACT_SHOT]"), "{text}");
    assert!(text.contains("policy ingress") && text.contains("run by the kernel with BPF_PROG_TEST_RUN"), "{text}");
    // Errors are clear: a pod that does not exist, a bad destination.
    let out = b.netctl(&["trace", "--from", "x/nope", "--to", &to_guarded]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pod x/nope in the store"));
    let out = b.netctl(&["trace", "--from", "x/a", "--to", "10.1.1.9:80/GRE"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected IP:PORT/PROTO"), "{out:?}");

    // Real traffic agrees with the traces.
    let drops_before = pod_counter(&b, "node-1", guarded.ip, "dropPolicyIngress");
    assert!(!probe(&local.netns, guarded.ip, 80, Proto::Tcp), "x/b -> x/d is denied, as traced");
    assert!(pod_counter(&b, "node-1", guarded.ip, "dropPolicyIngress") > drops_before);
    assert!(probe(&local.netns, remote.ip, 80, Proto::Tcp), "x/b -> y/c:80 passes, as traced");
    assert!(!probe(&a.netns, remote.ip, 80, Proto::Tcp), "x/a -> y/c:80 is denied on node-2, as traced");
    assert!(!probe(&a.netns, remote.ip, 81, Proto::Tcp), "x/a -> y/c:81 is denied on node-1, as traced");
    assert!(map_len(&b, "node-1", "CT") > ct_before, "real flows are tracked");
    drop(servers);
}

/// A `netctl monitor` running in the background; its lines collected as they come.
struct MonitorClient {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl MonitorClient {
    fn start(b: &ClusterBox, args: &[&str]) -> Self {
        let mut cmd = b.netctl_cmd(&[&["monitor", "-o", "json"], args].concat());
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("netctl monitor");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(vec![]));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        let c = Self { child, lines };
        c.wait_until(Duration::from_secs(10), "the hello line", |l| l.iter().any(|v| v["type"] == "hello"));
        c
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    fn events(&self) -> Vec<Value> {
        self.lines().into_iter().filter(|v| v["type"] == "event").collect()
    }

    fn wait_until(&self, timeout: Duration, what: &str, cond: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond(&self.lines()) {
            assert!(Instant::now() < deadline, "monitor: timed out waiting for {what}; got {:#?}", self.lines());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MonitorClient {
    fn drop(&mut self) {
        // Our own child, by pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One TCP connect attempt from `pod`, from source port `sport`, that gives up after one SYN.
fn syn_from(pod: &BoxPod, sport: u16, to: SocketAddr) {
    let ip = pod.ip;
    enter(&pod.netns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&SocketAddr::from((ip, sport)).into()).unwrap();
        let _ = s.connect_timeout(&to.into(), Duration::from_millis(300));
    });
}

/// A node's monitor counter from its metrics (`kind` drop or flow).
fn metric(b: &ClusterBox, node: &str, name: &str, kind: &str) -> u64 {
    let text = b.status(node, "/metrics").expect("/metrics");
    let want = format!("{name}{{kind=\"{kind}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&want)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn monitor_streams_drops_with_pod_tuple_and_reason_filters_and_bounds_a_flood() {
    if skip_unless_root() {
        return;
    }
    const RATE: u64 = 50;
    const BURST: u64 = 50;
    let mut opts = BoxOptions::for_test(1);
    opts.agent_config =
        format!("statusAddr = \"0.0.0.0:9192\"\n[monitor]\nrate = {RATE}\nburst = {BURST}\nflows = true\n");
    let mut b = ClusterBox::up(opts);
    let a = b.add_pod("node-1", "x/a", &[("pod", "a")], &[]);
    let srv = b.add_pod("node-1", "x/b", &[("pod", "b")], &[]);
    let c = b.add_pod("node-1", "x/c", &[("pod", "c")], &[]);
    let mut servers = Servers::new();
    servers.serve(&srv.netns, &[80, 81]);
    // x/b admits x/c on port 80 only: x/a is denied everything, x/c port 81.
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b, namespace: x}\nspec:\n  \
         podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n    \
         ports: [{port: 80}]\n",
    );
    b.wait_for(Duration::from_secs(15), "the policy applies", || !probe(&a.netns, srv.ip, 80, Proto::Tcp));

    let only_a = MonitorClient::start(&b, &["--pod", "x/a", "--drops"]);
    let all = MonitorClient::start(&b, &["--node", "node-1"]);
    let hello = &all.lines()[0];
    assert_eq!(
        (hello["node"].as_str(), hello["ratePerCpu"].as_u64(), hello["flows"].as_bool()),
        (Some("node-1"), Some(RATE), Some(true))
    );
    assert_eq!(only_a.lines()[0]["filter"], "pod=x/a,drops");
    // The rate applies per CPU the kernel may run the datapath on: the possible CPUs.
    let possible: u64 = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .unwrap()
        .trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
            None => 1,
        })
        .sum();
    assert_eq!(hello["cpus"].as_u64(), Some(possible), "the hello counts the node's CPUs");

    // A denied SYN from x/a (known source port), a denied and an allowed connection from x/c.
    let sport = 45_123;
    syn_from(&a, sport, SocketAddr::from((srv.ip, 80)));
    syn_from(&c, 45_124, SocketAddr::from((srv.ip, 81)));
    assert!(probe(&c.netns, srv.ip, 80, Proto::Tcp), "x/c -> x/b:80 is allowed");
    let is_a_syn = |v: &Value| v["src"] == a.ip.to_string() && v["sport"] == sport;
    only_a.wait_until(Duration::from_secs(10), "x/a's denied SYN", |l| l.iter().any(is_a_syn));
    let ev = only_a.events().into_iter().find(is_a_syn).unwrap();
    assert_eq!(ev["kind"], "drop");
    assert_eq!(ev["reason"], "policy_ingress");
    assert_eq!(ev["hook"], "tc_from_pod");
    assert_eq!(
        (ev["proto"].as_str(), ev["dst"].as_str(), ev["dport"].as_u64()),
        (Some("TCP"), Some(&*srv.ip.to_string()), Some(80))
    );
    assert_eq!((ev["srcPod"].as_str(), ev["dstPod"].as_str()), (Some("x/a"), Some("x/b")));
    assert_eq!(ev["pod"], "x/b", "an ingress drop is about the receiver");
    assert_eq!(ev["tcpFlags"], "SYN");
    assert!(ev["time"].as_str().unwrap().ends_with('Z'));
    all.wait_until(Duration::from_secs(10), "x/c's denied and allowed flows", |l| {
        l.iter().any(|v| v["src"] == c.ip.to_string() && v["dport"] == 81 && v["reason"] == "policy_ingress")
            && l.iter().any(|v| {
                v["kind"] == "flow" && v["src"] == c.ip.to_string() && v["dport"] == 80 && v["verdict"] == "local"
            })
    });
    for v in only_a.events() {
        assert_eq!(v["kind"], "drop", "--drops shows drops only: {v}");
        let mine = a.ip.to_string();
        assert!(v["src"] == mine || v["dst"] == mine || v["podIp"] == mine, "--pod x/a shows x/a's events only: {v}");
    }
    // A later fragment with no first fragment before it: dropped for that, its payload
    // never read as ports.
    let (src, dst) = (a.ip, std::net::SocketAddrV4::new(srv.ip, 80));
    enter(&a.netns, move || send_lone_later_fragment(src, dst));
    let is_fragment = |v: &Value| v["reason"] == "fragment" && v["src"] == a.ip.to_string();
    only_a.wait_until(Duration::from_secs(10), "x/a's lone fragment", |l| l.iter().any(is_fragment));
    let ev = only_a.events().into_iter().find(is_fragment).unwrap();
    assert_eq!((ev["hook"].as_str(), ev["proto"].as_str()), (Some("tc_from_pod"), Some("UDP")), "{ev}");
    assert_eq!((ev["sport"].as_u64(), ev["dport"].as_u64()), (Some(0), Some(0)), "no ports: {ev}");

    // A flood of denied UDP datagrams from x/a: every one dropped and counted, events
    // bounded by the rate, the rest suppressed.
    std::thread::sleep(Duration::from_millis(1500)); // the counters are read every second
    let drops_before = pod_counter(&b, "node-1", srv.ip, "dropPolicyIngress");
    let m = |name: &str| metric(&b, "node-1", name, "drop");
    let (emitted0, suppressed0, lost0) = (
        m("contiv_monitor_events_total"),
        m("contiv_monitor_events_suppressed_total"),
        m("contiv_monitor_events_lost_total"),
    );
    let flood_port = 45_200;
    let dst = SocketAddr::from((srv.ip, 80));
    let ip = a.ip;
    let started = Instant::now();
    enter(&a.netns, move || {
        let s = UdpSocket::bind((ip, flood_port)).unwrap();
        for i in 0..4000 {
            let _ = s.send_to(b"flood", dst);
            if i % 200 == 199 {
                // Paced so the veth's backlog never overflows before the datapath sees them.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    let flood_time = started.elapsed();
    std::thread::sleep(Duration::from_millis(2500));
    let dropped = pod_counter(&b, "node-1", srv.ip, "dropPolicyIngress") - drops_before;
    let (emitted, suppressed, lost) = (
        m("contiv_monitor_events_total") - emitted0,
        m("contiv_monitor_events_suppressed_total") - suppressed0,
        m("contiv_monitor_events_lost_total") - lost0,
    );
    let cpus = hello["cpus"].as_u64().unwrap();
    let bound = cpus * (BURST + RATE * (flood_time.as_millis() as u64 + 2000) / 1000);
    eprintln!(
        "flood: {dropped} dropped in {flood_time:?}; events {emitted} emitted, {suppressed} suppressed, {lost} lost; bound {bound}"
    );
    assert!(dropped >= 3000, "the drops are counted whatever the monitor does: {dropped} of 4000");
    assert_eq!(emitted + suppressed + lost, dropped, "every drop either made an event or was counted as suppressed");
    assert!(emitted <= bound, "{emitted} events over the rate bound {bound}");
    assert!(suppressed >= dropped - bound, "the rest were suppressed: {suppressed}");
    let flood_events = all.events().into_iter().filter(|v| v["sport"] == flood_port).count() as u64;
    assert!(flood_events >= 1 && flood_events <= bound, "the stream carried {flood_events} flood events");
    let said = |l: &[Value]| -> u64 {
        l.iter()
            .filter(|v| v["type"] == "suppressed" && v["kind"] == "drop")
            .map(|v| v["count"].as_u64().unwrap())
            .sum()
    };
    all.wait_until(Duration::from_secs(5), "the stream to say how many were suppressed", |l| said(l) >= suppressed);
    assert!(
        only_a.lines().iter().any(|v| v["type"] == "suppressed"),
        "filtered clients are told about suppression too"
    );
    // The human form of the same stream.
    let mut human = b.netctl_cmd(&["monitor", "--pod", "x/a", "--drops", "--count", "1"]);
    let mut child = human.stdout(Stdio::piped()).spawn().unwrap();
    syn_from(&a, sport + 1, SocketAddr::from((srv.ip, 80)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("netctl monitor --count 1 did not end");
        }
        // The first SYN may come before the stream is open: send another.
        syn_from(&a, sport + 2, SocketAddr::from((srv.ip, 80)));
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut text).unwrap();
    assert!(text.starts_with("monitoring node node-1"), "{text}");
    assert!(text.contains(&format!("TCP {}:", a.ip)) && text.contains("(x/a) ->"), "{text}");
    assert!(text.contains("DROPPED policy_ingress"), "{text}");
    drop(servers);
}

/// A flow to a pod on another node leaves its pod already inside the overlay's outer
/// headers (the datapath builds them): its event still shows the pod's own packet (its
/// addresses, ports, pods and length), not the node-to-node VXLAN datagram.
#[test]
fn monitor_shows_the_pods_packet_of_a_flow_into_the_overlay() {
    if skip_unless_root() {
        return;
    }
    let mut opts = BoxOptions::for_test(2);
    opts.agent_config = "statusAddr = \"0.0.0.0:9192\"\n[monitor]\nflows = true\n".into();
    let mut b = ClusterBox::up(opts);
    let a = b.add_pod("node-1", "x/a", &[("pod", "a")], &[]);
    let c = b.add_pod("node-2", "y/c", &[("pod", "c")], &[]);
    let mut servers = Servers::new();
    servers.serve(&c.netns, &[80]);
    let all = MonitorClient::start(&b, &["--node", "node-1"]);
    assert!(probe(&a.netns, c.ip, 80, Proto::Tcp), "x/a -> y/c:80 across nodes");
    let to_c = |v: &Value| v["kind"] == "flow" && v["verdict"] == "overlay";
    all.wait_until(Duration::from_secs(10), "x/a's flow into the overlay", |l| l.iter().any(to_c));
    let ev = all.events().into_iter().find(to_c).unwrap();
    assert_eq!(
        (ev["src"].as_str(), ev["dst"].as_str(), ev["proto"].as_str(), ev["dport"].as_u64()),
        (Some(&*a.ip.to_string()), Some(&*c.ip.to_string()), Some("TCP"), Some(80)),
        "the pod's packet: {ev}"
    );
    assert_eq!(
        (ev["srcPod"].as_str(), ev["dstPod"].as_str(), ev["tcpFlags"].as_str()),
        (Some("x/a"), Some("y/c"), Some("SYN"))
    );
    assert_eq!(ev["nextHop"].as_str(), Some(&*b.node("node-2").ip.to_string()), "{ev}");
    let len = ev["len"].as_u64().unwrap();
    assert!((40..=80).contains(&len), "a SYN's length, without the outer headers: {ev}");

    // A datagram from y/c whose TTL runs out at node-1 (2: node-2 routes it, node-1 would
    // be the second router): dropped there before any rule, with no flow opened for it.
    let ct_before = map_len(&b, "node-1", "CT");
    let sport = 45_321;
    let to = SocketAddr::from((a.ip, 7777));
    enter(&c.netns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, sport)).unwrap();
        s.set_ttl(2).unwrap();
        s.send_to(b"expiring", to).unwrap();
    });
    let expired = |v: &Value| v["sport"] == sport && v["reason"] == "ttl_exceeded";
    all.wait_until(Duration::from_secs(10), "the expired datagram's drop", |l| l.iter().any(expired));
    let ev = all.events().into_iter().find(expired).unwrap();
    assert_eq!(ev["hook"], "tc_from_overlay", "{ev}");
    assert!(!all.events().iter().any(|v| v["sport"] == sport && v["kind"] == "flow"), "no flow event for it");
    assert!(map_len(&b, "node-1", "CT") <= ct_before, "no conntrack entry for it");

    // Every pod reaches its node's addresses, whatever NetworkPolicy says: the status port
    // answers pods (of this node or another) only /healthz, /readyz and /metrics.
    let n1 = b.node("node-1").ip;
    let code = |ns: &str, path: &str| {
        let out = contiv_tests::cluster::cmd_in(ns, "curl")
            .args(["-s", "-o", "/dev/null", "-m", "3", "-w", "%{http_code}"])
            .arg(format!("http://{n1}:9192{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for pod in [&a, &c] {
        for path in ["/pods", "/monitor", "/trace?from=x/a&to=10.1.2.2:80/tcp", "/conntrack"] {
            assert_eq!(code(&pod.netns, path), "403", "{} -> {path}", pod.name);
        }
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(code(&pod.netns, path), "200", "{} -> {path}", pod.name);
        }
    }
    assert_eq!(code(&b.node("node-2").netns, "/pods"), "200", "another node's address is answered");
}
