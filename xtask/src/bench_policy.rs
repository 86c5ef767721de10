//! `cargo xtask bench policy`: what NetworkPolicy costs, in a two-node cluster in a box,
//! baseline and ours measured in the same run, alternating.
//!
//! - `policy_established_throughput` / `policy_established_rr_p50` (and p99): one TCP stream
//!   (iperf3) and 64-byte request/response between two pods on node-1 that policies isolate
//!   and allow (ours), against the same two pods with those policies deleted (baseline);
//!   the policies are applied and deleted between blocks. Bars: >= 0.97 and <= 1.05.
//! - `policy_conn_rate_1000_pods_200_policies`: new TCP connections per second (connect,
//!   one byte each way, close) between two isolated pods on node-1, which also holds 1,000
//!   other pods selected by 200 policies (ours), against two pods on node-2, where no policy
//!   selects anything (baseline). Bar: >= 0.9.
//! - `policy_propagation_p99` (and p50): from the store write of a pod label change (the
//!   client gains the label the server's policy allows) to the first connection the
//!   datapath lets through, probed every few milliseconds; ours on node-1 (1,000 pods, 200
//!   policies), baseline the same change on node-2's pair. Target: < 500 ms.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use contiv_tests::cluster::{BoxOptions, BoxPod, ClusterBox, pod_yaml};

use crate::bench_net::{
    Endpoint, RR_BLOCK, RR_BLOCKS, RR_WARMUP, StoreWriter, enter, median, percentile, row, rr_samples, tcp_gbps,
    write_results,
};

const FILLER_PODS: usize = 1000;
const FILLER_NAMESPACES: usize = 20;
const POLICIES: usize = 200;
const ROUNDS: usize = 5;
const CRR_BLOCKS: usize = 10;
const CRR_BLOCK: Duration = Duration::from_secs(2);
const PROPAGATION_SAMPLES: usize = 40;
const SERVER_PORT: u16 = 7000;

/// The pair's policies: the server admits only the client (or a `role: friend` pod), the
/// client may reach only the server.
fn pair_policies(ns: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: {ns}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n\
         \x20 - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n\
         \x20 - from: [{{podSelector: {{matchLabels: {{role: friend}}}}}}]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: client, namespace: {ns}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n\
         \x20 egress: [{{to: [{{podSelector: {{matchLabels: {{app: server}}}}}}]}}]\n"
    )
}

/// Only the server's rule admitting friends (the propagation phase's policy).
fn friends_policy(ns: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: {ns}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n\
         \x20 - from: [{{podSelector: {{matchLabels: {{role: friend}}}}}}]\n"
    )
}

/// 200 policies over the filler namespaces: each selects one app of its namespace, admits
/// two client roles of the namespace and another namespace's team on a few ports, and lets
/// it reach the namespace's db pods and DNS anywhere.
fn filler_policies() -> String {
    let mut out = String::new();
    for i in 0..POLICIES {
        let ns = i % FILLER_NAMESPACES;
        let app = i / FILLER_NAMESPACES;
        out.push_str(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: fill{ns}}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: svc{app}}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n\
             \x20 - from:\n    - podSelector: {{matchExpressions: [{{key: role, operator: In, values: [c{a}, c{b}]}}]}}\n\
             \x20   - namespaceSelector: {{matchLabels: {{team: t{t}}}}}\n      podSelector: {{matchLabels: {{role: c{a}}}}}\n\
             \x20   ports: [{{port: 80}}, {{port: 443}}, {{port: 8000, endPort: 8100}}]\n\
             \x20 - from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.1.3.0/24]}}}}]\n    ports: [{{port: 9100}}]\n\
             \x20 egress:\n  - to: [{{podSelector: {{matchLabels: {{app: db}}}}}}]\n    ports: [{{port: 5432}}]\n\
             \x20 - ports: [{{port: 53, protocol: UDP}}, {{port: 53}}]\n---\n",
            a = app % 10,
            b = (app + 3) % 10,
            t = (ns + 1) % 4,
        ));
    }
    out
}

/// Fills node-1 with pods the way a runtime does (Pod objects first, CNI ADD each, then
/// their IPs), a few ADDs at a time; their namespaces carry the box id, so the box's
/// teardown removes them.
fn fill(b: &ClusterBox, node: &str) -> Result<()> {
    let labels = |k: usize| -> std::collections::BTreeMap<String, String> {
        let app = if k % 10 == 9 { "db".to_string() } else { format!("svc{}", k % 10) };
        [("app".to_string(), app), ("role".to_string(), format!("c{}", (k / 10) % 10))].into()
    };
    let ns_of = |k: usize| format!("fill{}", k % FILLER_NAMESPACES);
    let mut objects = String::new();
    for n in 0..FILLER_NAMESPACES {
        objects.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: fill{n}, labels: {{team: t{}}}}}\n---\n",
            n % 4
        ));
    }
    for k in 0..FILLER_PODS {
        let doc = pod_yaml(&ns_of(k), &format!("f{k}"), node, &labels(k), &[], None);
        objects.push_str(doc.split("---\n").nth(1).expect("the Pod document"));
        objects.push_str("---\n");
    }
    b.apply_yaml(&objects);
    let id = b.state.id.clone();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let ips = std::sync::Mutex::new(vec![None; FILLER_PODS]);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= FILLER_PODS {
                        return;
                    }
                    let (ns, name) = (ns_of(k), format!("f{k}"));
                    let netns = format!("{id}-pod-{ns}-{name}");
                    let ok = std::process::Command::new("ip").args(["netns", "add", &netns]).status();
                    if !ok.is_ok_and(|s| s.success()) {
                        return;
                    }
                    let cid = format!("{id}-{ns}-{name}");
                    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}");
                    let out = b.cni(node, "ADD", &cid, &format!("/run/netns/{netns}"), &args, "");
                    if out.exit_code == 0 {
                        ips.lock().unwrap()[k] = Some(contiv_tests::pod_ip(&out.json()));
                    }
                }
            });
        }
    });
    let ips = ips.into_inner().unwrap();
    let missing = ips.iter().filter(|i| i.is_none()).count();
    if missing > 0 {
        bail!("{missing} filler pods failed to start:\n{}", b.agent_log(node));
    }
    let mut status = String::new();
    for (k, ip) in ips.iter().enumerate() {
        let doc = pod_yaml(&ns_of(k), &format!("f{k}"), node, &labels(k), &[], *ip);
        status.push_str(doc.split("---\n").nth(1).expect("the Pod document"));
        status.push_str("---\n");
    }
    b.apply_yaml(&status);
    Ok(())
}

/// Answers connections on `ip:port` in `ns`: one byte back per connection (CRR) or an
/// open connection (propagation probes), until the process ends.
fn crr_server(ns: &str, ip: Ipv4Addr, port: u16) -> Result<SocketAddr> {
    let l = enter(ns, move || TcpListener::bind((ip, port)))?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut b = [0u8; 1];
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        }
    });
    Ok(addr)
}

/// Connections per second from `ns` to `addr` over `period`: connect, one byte each way,
/// close with a reset (no TIME_WAIT pile-up).
fn crr_rate(ns: &str, addr: SocketAddr, period: Duration) -> Result<f64> {
    let n = enter(ns, move || -> std::io::Result<u64> {
        let (start, mut n) = (Instant::now(), 0u64);
        while start.elapsed() < period {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_nodelay(true)?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            contiv_tests::close_with_reset(&s);
            n += 1;
        }
        Ok(n)
    })?;
    Ok(n as f64 / period.as_secs_f64())
}

/// Tries to connect from `ns` every few milliseconds until one gets through; the instant
/// it did.
fn first_success(ns: &str, addr: SocketAddr, deadline: Duration) -> std::thread::JoinHandle<Option<Instant>> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns, move || {
            let start = Instant::now();
            while start.elapsed() < deadline {
                if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(3)) {
                    let t = Instant::now();
                    contiv_tests::close_with_reset(&s);
                    return Some(t);
                }
            }
            None
        })
    })
}

/// Whether a node's agent shows `pod` with the given isolation (ingress, egress).
fn isolation(b: &ClusterBox, node: &str, pod: &BoxPod) -> Option<(bool, bool)> {
    let v = b.status_json(node, "/policies")?;
    let p = v["pods"].as_array()?.iter().find(|p| p["podName"] == pod.name.as_str())?.clone();
    Some((p["ingressIsolated"] == true, p["egressIsolated"] == true))
}

fn wait_isolation(b: &ClusterBox, node: &str, pods: &[(&BoxPod, (bool, bool))]) {
    b.wait_for(Duration::from_secs(30), "the pair's isolation is installed", || {
        pods.iter().all(|(p, want)| isolation(b, node, p) == Some(*want))
    });
}

/// Whether `server`'s ingress entries on `node` list `peer`'s /32.
fn admits(b: &ClusterBox, node: &str, server: &BoxPod, peer: Ipv4Addr) -> bool {
    let peer = format!("{peer}/32");
    b.status_json(node, "/policies").is_some_and(|v| {
        v["pods"].as_array().into_iter().flatten().any(|p| {
            p["podName"] == server.name.as_str()
                && p["ingress"].as_array().into_iter().flatten().any(|e| e["peer"] == peer.as_str())
        })
    })
}

fn relabel(pod: &BoxPod, labels: &[(&str, &str)]) -> String {
    let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let doc = pod_yaml(&pod.namespace, &pod.name, &pod.node, &labels, &[], Some(pod.ip));
    doc.split("---\n").nth(1).expect("the Pod document").to_owned()
}

pub fn run(bins: &Path) -> Result<()> {
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("CONTIV_BIN_DIR", bins) };
    println!("policy benchmark: two nodes in a box; node-1 gets {FILLER_PODS} pods and {POLICIES} policies");
    let mut opts = BoxOptions::for_test(2);
    opts.id = format!("cbpo{}", std::process::id());
    opts.progress = true;
    // A /24 per node holds 253 pods; node-1 needs room for the filler pods.
    opts.agent_config = "podPrefixLen = 21\n".into();
    let mut b = ClusterBox::up(opts);
    let server = b.add_pod("node-1", "bench/server", &[("app", "server")], &[]);
    let client = b.add_pod("node-1", "bench/client", &[("app", "client")], &[]);
    let base_server = b.add_pod("node-2", "base/server", &[("app", "server")], &[]);
    let base_client = b.add_pod("node-2", "base/client", &[("app", "client")], &[]);
    let started = Instant::now();
    fill(&b, "node-1")?;
    println!("{FILLER_PODS} pods on node-1 in {:.1} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    b.apply_yaml(&filler_policies());
    b.wait_for(Duration::from_secs(120), "node-1 isolates the filler pods", || {
        b.status_json("node-1", "/policies").is_some_and(|v| {
            v["pods"].as_array().into_iter().flatten().filter(|p| p["egressIsolated"] == true).count() >= 900
        })
    });
    let report = b.status_json("node-1", "/policies").context("/policies")?;
    let entries: usize = report["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["ingress"].as_array().map_or(0, Vec::len) + p["egress"].as_array().map_or(0, Vec::len))
        .sum();
    println!(
        "{POLICIES} policies applied and installed in {:.2} s: {entries} POLICY entries on node-1",
        started.elapsed().as_secs_f64()
    );

    // 1. Established flows: the same two pods with and without their policies.
    let (srv, cli) = (Endpoint::new(&server.netns, server.ip), Endpoint::new(&client.netns, client.ip));
    let policies = pair_policies("bench");
    let set_policy = |on: bool| {
        if on {
            b.apply_yaml(&policies);
        } else {
            b.delete_yaml(&policies);
        }
        wait_isolation(&b, "node-1", &[(&server, (on, false)), (&client, (false, on))]);
    };
    let (mut bt, mut ot) = (vec![], vec![]);
    for round in 1..=ROUNDS {
        set_policy(false);
        let (g, _) = tcp_gbps(&cli, &srv)?;
        set_policy(true);
        let (g2, _) = tcp_gbps(&cli, &srv)?;
        println!("throughput round {round}: no policy {g:6.2} Gbit/s   isolated and allowed {g2:6.2} Gbit/s");
        bt.push(g);
        ot.push(g2);
    }
    println!("request/response: {RR_BLOCKS} alternating blocks of {RR_BLOCK} round trips");
    let (mut br, mut or) = (vec![], vec![]);
    for _ in 0..RR_BLOCKS {
        set_policy(false);
        br.extend(rr_samples(&cli, &srv, true, RR_WARMUP, RR_BLOCK)?);
        set_policy(true);
        or.extend(rr_samples(&cli, &srv, true, RR_WARMUP, RR_BLOCK)?);
    }
    for v in [&mut br, &mut or] {
        v.sort_by(|x, y| x.total_cmp(y));
    }
    let (b_p50, b_p99, o_p50, o_p99) =
        (percentile(&br, 0.5), percentile(&br, 0.99), percentile(&or, 0.5), percentile(&or, 0.99));
    println!("  no policy p50 {b_p50:6.1} us p99 {b_p99:6.1} us   isolated p50 {o_p50:6.1} us p99 {o_p99:6.1} us");

    // 2. New connections: the isolated pair on the full node against node-2's open pair.
    let ours_addr = crr_server(&server.netns, server.ip, SERVER_PORT)?;
    let base_addr = crr_server(&base_server.netns, base_server.ip, SERVER_PORT)?;
    let (mut bc, mut oc) = (vec![], vec![]);
    for block in 1..=CRR_BLOCKS {
        let base = crr_rate(&base_client.netns, base_addr, CRR_BLOCK)?;
        let ours = crr_rate(&client.netns, ours_addr, CRR_BLOCK)?;
        println!(
            "connections block {block}: no policy {base:7.0}/s   {FILLER_PODS} pods, {POLICIES} policies {ours:7.0}/s"
        );
        bc.push(base);
        oc.push(ours);
    }

    // 3. Propagation: the client gains the label the server's policy admits.
    b.delete_yaml(&policies);
    b.apply_yaml(&friends_policy("bench"));
    b.apply_yaml(&friends_policy("base"));
    wait_isolation(&b, "node-1", &[(&server, (true, false)), (&client, (false, false))]);
    wait_isolation(&b, "node-2", &[(&base_server, (true, false))]);
    let writer = StoreWriter::start(&b.state.control)?;
    let (mut bp, mut op) = (vec![], vec![]);
    for i in 0..PROPAGATION_SAMPLES {
        for (node, srv, cli, addr, out) in [
            ("node-2", &base_server, &base_client, base_addr, &mut bp),
            ("node-1", &server, &client, ours_addr, &mut op),
        ] {
            let prober = first_success(&cli.netns, addr, Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(20));
            let t0 = writer.apply(&relabel(cli, &[("app", "client"), ("role", "friend")]))?;
            let through = prober.join().map_err(|_| anyhow::anyhow!("prober panicked"))?;
            let Some(t1) = through else {
                bail!("sample {i}: {node} did not let the new friend through in 10 s");
            };
            out.push(t1.saturating_duration_since(t0).as_secs_f64() * 1e3);
            writer.apply(&relabel(cli, &[("app", "client")]))?;
            b.wait_for(Duration::from_secs(30), "the label removal is installed", || !admits(&b, node, srv, cli.ip));
        }
    }
    for v in [&mut bp, &mut op] {
        v.sort_by(|x, y| x.total_cmp(y));
    }
    println!(
        "propagation: node-2 (small) p50 {:.1} ms p99 {:.1} ms   node-1 ({FILLER_PODS} pods, {POLICIES} policies) p50 {:.1} ms p99 {:.1} ms",
        percentile(&bp, 0.5),
        percentile(&bp, 0.99),
        percentile(&op, 0.5),
        percentile(&op, 0.99)
    );
    drop(b);

    let results = vec![
        row("policy_established_throughput", "Gbit/s", median(&bt), median(&ot), "higher"),
        row("policy_established_rr_p50", "us", b_p50, o_p50, "lower"),
        row("policy_established_rr_p99", "us", b_p99, o_p99, "lower"),
        row("policy_conn_rate_1000_pods_200_policies", "conn/s", median(&bc), median(&oc), "higher"),
        row("policy_propagation_p50", "ms", percentile(&bp, 0.5), percentile(&op, 0.5), "lower"),
        row("policy_propagation_p99", "ms", percentile(&bp, 0.99), percentile(&op, 0.99), "lower"),
    ];
    write_results("policy", &results)?;
    let ratio = |i: usize| results[i]["ratio"].as_f64().unwrap_or(f64::NAN);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "bars: throughput {:.3} >= 0.97: {}; RR p50 {:.3} <= 1.05: {}; conn rate {:.3} >= 0.9: {}; \
         propagation p99 {:.1} ms < 500 ms: {}",
        ratio(0),
        met(ratio(0) >= 0.97),
        ratio(1),
        met(ratio(1) <= 1.05),
        ratio(3),
        met(ratio(3) >= 0.9),
        percentile(&op, 0.99),
        met(percentile(&op, 0.99) < 500.0)
    );
    Ok(())
}
