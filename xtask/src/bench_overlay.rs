//! `cargo xtask bench overlay`: cross-node pod -> pod in a two-node cluster in a box, this
//! datapath against the classic way, built in the same box and measured in the same run,
//! alternating.
//!
//! The baseline is flannel's VXLAN backend done by hand: on each node a kernel VXLAN device
//! (`flannel.1`, VNI 1, UDP 8472, no learning) with one FDB entry and one permanent neighbour
//! entry per peer node and a route per peer pod subnet; each of the two pods gets a second
//! interface (`eth1`, 10.244.<node>.x) into its node's routing table. The same two pods, the
//! same nodes, the same fabric: only the datapath between them differs.
//!
//! Metrics (target/bench/overlay.json):
//! - `overlay_throughput` (one TCP stream, iperf3, median of rounds, who goes first
//!   alternating; bar ratio >= 1.0),
//! - `overlay_rr_p50` / `overlay_rr_p99` (64-byte TCP request/response, busy-polled, alternating
//!   blocks; bar p50 ratio <= 0.9), and the blocking p50,
//! - `overlay_tcp_retransmits`,
//! - `host_to_pod_connect_p50` (TCP connect from the node to a local pod: the kubelet-probe path),
//! - `pod_to_external_throughput_snat`: a pod to the external namespace with the agent's
//!   masquerade (ours) against the same path with that flow exempt from conntrack and NAT and
//!   the external side routing back to the pod (baseline).
//!
//! `--pod-rps` runs the agents with `podRps = true` (see `bench datapath --pod-rps`) and
//! writes overlay-pod-rps.json instead.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use contiv_tests::cluster::{BoxOptions, BoxPod, ClusterBox, EXTERNAL_IP, ip_in};

use crate::bench_net::{
    Endpoint, RR_BLOCK, RR_BLOCKS, enter, median, percentile, row, rr_interleaved, tcp_gbps, write_results,
};

/// Throughput rounds (one run of each topology per round); the rounds of one topology
/// spread by +-10% on this 2-vCPU machine, so the median needs more than a few.
const ROUNDS: usize = 8;
const CONNECTS: usize = 2_000;

fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The flannel-style baseline on node `i` (1-based) with `peers` (index, underlay IP).
fn flannel_node(netns: &str, i: usize, node_ip: Ipv4Addr, peers: &[(usize, Ipv4Addr)]) -> Result<()> {
    let mac = |n: usize| format!("02:f1:00:00:00:{n:02x}");
    ip_in(
        netns,
        &[
            "link",
            "add",
            "flannel.1",
            "address",
            &mac(i),
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &node_ip.to_string(),
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ],
    );
    ip_in(netns, &["link", "set", "flannel.1", "mtu", "1450", "up"]);
    ip_in(netns, &["addr", "add", &format!("10.244.{i}.0/32"), "dev", "flannel.1"]);
    for (j, peer_ip) in peers {
        let gw = format!("10.244.{j}.0");
        ip_in(netns, &["neigh", "replace", &gw, "lladdr", &mac(*j), "dev", "flannel.1", "nud", "permanent"]);
        ip_in(netns, &["route", "add", &format!("10.244.{j}.0/24"), "via", &gw, "dev", "flannel.1", "onlink"]);
        run_ok(
            Command::new("bridge")
                .args(["-n", netns, "fdb", "append", &mac(*j), "dev", "flannel.1", "dst"])
                .arg(peer_ip.to_string()),
        )?;
    }
    Ok(())
}

/// The baseline's second interface of a pod: `eth1` with 10.244.<node>.<host>/32, routed
/// by its node like flannel's cni0-less ptp setup.
fn flannel_pod(node_netns: &str, pod: &BoxPod, node: usize, host: u8) -> Result<Ipv4Addr> {
    let ip = Ipv4Addr::new(10, 244, node as u8, host);
    let host_if = format!("fl{host}");
    let (host_mac, pod_mac) =
        (format!("02:b1:00:00:{node:02x}:{host:02x}"), format!("02:b0:00:00:{node:02x}:{host:02x}"));
    ip_in(
        node_netns,
        &[
            "link", "add", &host_if, "address", &host_mac, "mtu", "1450", "type", "veth", "peer", "name", "eth1",
            "address", &pod_mac, "mtu", "1450", "netns", &pod.netns,
        ],
    );
    ip_in(&pod.netns, &["addr", "add", &format!("{ip}/32"), "dev", "eth1"]);
    ip_in(&pod.netns, &["link", "set", "eth1", "up"]);
    ip_in(&pod.netns, &["route", "add", "169.254.1.1", "dev", "eth1", "scope", "link"]);
    ip_in(&pod.netns, &["route", "add", "10.244.0.0/16", "via", "169.254.1.1", "dev", "eth1"]);
    ip_in(&pod.netns, &["neigh", "replace", "169.254.1.1", "lladdr", &host_mac, "dev", "eth1", "nud", "permanent"]);
    ip_in(node_netns, &["link", "set", &host_if, "up"]);
    // The node's flannel address as the source toward the pod (cni0's role in flannel): with
    // no address on the veth the kernel would pick the uplink's, and the pod would answer that
    // by its default route, i.e. out of our interface, where anti-spoofing drops a source
    // that is not the pod's.
    ip_in(node_netns, &["route", "add", &format!("{ip}/32"), "dev", &host_if, "src", &format!("10.244.{node}.0")]);
    ip_in(node_netns, &["neigh", "replace", &ip.to_string(), "lladdr", &pod_mac, "dev", &host_if, "nud", "permanent"]);
    Ok(ip)
}

/// TCP connect (SYN, SYN-ACK, ACK) times from namespace `ns` to `addr`, in microseconds.
fn connect_samples(ns: &str, addr: SocketAddr, count: usize) -> Result<Vec<f64>> {
    let samples = enter(ns, move || -> std::io::Result<Vec<f64>> {
        let mut v = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            v.push(t.elapsed().as_nanos() as f64 / 1e3);
            // Close with a reset: thousands of connects leave no TIME_WAIT.
            contiv_tests::close_with_reset(&s);
        }
        Ok(v)
    })?;
    Ok(samples)
}

/// Accepts and drops connections in `ns` until the process ends.
fn accept_forever(ns: &str, ip: Ipv4Addr) -> Result<SocketAddr> {
    let l = enter(ns, move || TcpListener::bind((ip, 0)))?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    Ok(addr)
}

/// Exempts the pod's traffic to the external server from conntrack (and so from NAT) on
/// its node, and routes the external side back to the pod: the same path without SNAT.
fn nat_exempt(node_netns: &str, external_netns: &str, pod: Ipv4Addr, node_ip: Ipv4Addr, on: bool) -> Result<()> {
    let script = if on {
        format!(
            "table ip contiv_bench {{\n  chain raw {{\n    type filter hook prerouting priority raw; policy accept;\n    ip saddr {pod} ip daddr {EXTERNAL_IP} notrack\n    ip saddr {EXTERNAL_IP} ip daddr {pod} notrack\n  }}\n}}\n"
        )
    } else {
        "table ip contiv_bench\ndelete table ip contiv_bench\n".into()
    };
    let mut nft = contiv_tests::cluster::cmd_in(node_netns, "nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null());
    let mut child = nft.spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().expect("piped"), script.as_bytes())?;
    drop(child.stdin.take());
    if !child.wait()?.success() {
        bail!("nft in {node_netns} failed");
    }
    let action = if on { "replace" } else { "del" };
    let _ = Command::new("ip")
        .args(["-n", external_netns, "route", action, &format!("{pod}/32"), "via", &node_ip.to_string()])
        .status();
    Ok(())
}

pub fn run(bins: &Path, pod_rps: bool) -> Result<()> {
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("CONTIV_BIN_DIR", bins) };
    println!(
        "overlay benchmark: two nodes in a box; baseline = flannel-style kernel VXLAN with FDB + neighbour entries{}",
        if pod_rps { "; ours with podRps = true" } else { "" }
    );
    let mut opts = BoxOptions::for_test(2);
    if pod_rps {
        opts.agent_config = "podRps = true\n".into();
    }
    opts.id = format!("cbov{}", std::process::id());
    opts.progress = true;
    let mut b = ClusterBox::up(opts);
    let client = b.add_pod("node-1", "bench/client", &[], &[]);
    let server = b.add_pod("node-2", "bench/server", &[], &[]);
    let (n1, n2) = (b.node("node-1").clone(), b.node("node-2").clone());
    flannel_node(&n1.netns, 1, n1.ip, &[(2, n2.ip)])?;
    flannel_node(&n2.netns, 2, n2.ip, &[(1, n1.ip)])?;
    let base_client_ip = flannel_pod(&n1.netns, &client, 1, 2)?;
    let base_server_ip = flannel_pod(&n2.netns, &server, 2, 2)?;
    let base = (Endpoint::new(&client.netns, base_client_ip), Endpoint::new(&server.netns, base_server_ip));
    let ours = (Endpoint::new(&client.netns, client.ip), Endpoint::new(&server.netns, server.ip));
    for (c, s) in [&base, &ours] {
        let ok = b.cmd(&client.id(), "ping").args(["-c", "1", "-W", "2", &s.ip.to_string()]).status()?.success();
        if !ok {
            bail!("{} cannot reach {} ({})", c.ip, s.ip, b.agent_log("node-1"));
        }
    }

    println!("request/response: {RR_BLOCKS} alternating blocks of {RR_BLOCK} round trips per topology");
    let ((b_p50, b_p99), (o_p50, o_p99)) = rr_interleaved((&base.0, &base.1), (&ours.0, &ours.1), true)?;
    println!(
        "  busy-poll  baseline p50 {b_p50:6.1} us p99 {b_p99:6.1} us   ours p50 {o_p50:6.1} us p99 {o_p99:6.1} us"
    );
    let ((bb_p50, _), (ob_p50, _)) = rr_interleaved((&base.0, &base.1), (&ours.0, &ours.1), false)?;
    println!("  blocking   baseline p50 {bb_p50:6.1} us              ours p50 {ob_p50:6.1} us");

    let (mut bt, mut ot, mut br, mut or) = (vec![], vec![], vec![], vec![]);
    for round in 1..=ROUNDS {
        // Who goes first alternates, so a drift in the machine's load, or whatever the
        // first run of a pair leaves behind, falls on both alike.
        let ((g, r), (g2, r2)) = if round % 2 == 1 {
            let b = tcp_gbps(&base.0, &base.1)?;
            (b, tcp_gbps(&ours.0, &ours.1)?)
        } else {
            let o = tcp_gbps(&ours.0, &ours.1)?;
            (tcp_gbps(&base.0, &base.1)?, o)
        };
        println!("round {round}: baseline {g:6.2} Gbit/s ({r} retransmits)   ours {g2:6.2} Gbit/s ({r2} retransmits)");
        bt.push(g);
        br.push(r);
        ot.push(g2);
        or.push(r2);
    }

    // host -> local pod connect, the kubelet-probe path: through our programs and /32 route,
    // against the baseline pod interface routed by the same node.
    let ours_addr = accept_forever(&client.netns, client.ip)?;
    let base_addr = accept_forever(&client.netns, base_client_ip)?;
    let (mut hb, mut ho) = (vec![], vec![]);
    for _ in 0..4 {
        hb.extend(
            connect_samples(&n1.netns, base_addr, CONNECTS / 4)
                .with_context(|| format!("host -> pod connects to {base_addr} (baseline)"))?,
        );
        ho.extend(
            connect_samples(&n1.netns, ours_addr, CONNECTS / 4)
                .with_context(|| format!("host -> pod connects to {ours_addr} (ours)"))?,
        );
    }
    for v in [&mut hb, &mut ho] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    let (hb50, ho50) = (percentile(&hb, 0.5), percentile(&ho, 0.5));
    println!("host -> pod connect p50: baseline {hb50:.1} us, ours {ho50:.1} us");

    // pod -> outside with SNAT (ours) against the same path without it.
    let external = Endpoint::new(b.state.external.clone(), EXTERNAL_IP);
    let (mut snat, mut plain) = (vec![], vec![]);
    for round in 1..=3 {
        nat_exempt(&n1.netns, &b.state.external, client.ip, n1.ip, true)?;
        let (p, _) = tcp_gbps(&ours.0, &external)?;
        nat_exempt(&n1.netns, &b.state.external, client.ip, n1.ip, false)?;
        let (s, _) = tcp_gbps(&ours.0, &external)?;
        println!("pod -> external round {round}: without SNAT {p:6.2} Gbit/s, with SNAT {s:6.2} Gbit/s");
        plain.push(p);
        snat.push(s);
    }
    let tunnel = b
        .status_json("node-1", "/pods")
        .and_then(|v| v.as_array().and_then(|a| a.iter().find_map(|p| p["counters"]["tunnelPackets"].as_u64())))
        .unwrap_or(0);
    if tunnel == 0 {
        bail!("our pods' traffic did not take the eBPF overlay (tunnelPackets = 0)");
    }
    drop(b);

    let results = vec![
        row("overlay_throughput_1_stream", "Gbit/s", median(&bt), median(&ot), "higher"),
        row("overlay_rr_p50", "us", b_p50, o_p50, "lower"),
        row("overlay_rr_p99", "us", b_p99, o_p99, "lower"),
        row("overlay_rr_p50_blocking", "us", bb_p50, ob_p50, "lower"),
        row("overlay_tcp_retransmits_per_run", "segments", median(&br), median(&or), "lower"),
        row("host_to_pod_connect_p50", "us", hb50, ho50, "lower"),
        row("pod_to_external_throughput_snat", "Gbit/s", median(&plain), median(&snat), "higher"),
    ];
    write_results(if pod_rps { "overlay-pod-rps" } else { "overlay" }, &results)?;
    let tput = results[0]["ratio"].as_f64().unwrap_or(0.0);
    let p50 = results[1]["ratio"].as_f64().unwrap_or(f64::MAX);
    println!(
        "bar: throughput ratio {tput:.3} >= 1.0: {}; RR p50 ratio {p50:.3} <= 0.9: {}",
        if tput >= 1.0 { "met" } else { "NOT met" },
        if p50 <= 0.9 { "met" } else { "NOT met" }
    );
    Ok(())
}
