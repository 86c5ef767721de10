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
//! - `overlay_throughput_1_stream` (one TCP stream, iperf3; bar ratio >= 1.0): `ROUNDS`
//!   paired rounds, who goes first alternating, and the ratio of the two means over the whole
//!   run (the throughput of all the time each ran), as `bench services` does for
//!   `clusterip_throughput`. Rounds of one topology spread by +-10-15% on this 2-vCPU machine,
//!   so the median of 8 rounds could put a run on either side of the bar. The row's
//!   `ratio_ci95` is a bootstrap 95% confidence interval of that ratio (whole rounds
//!   resampled, so each pair stays together): a bar inside it is not decided by the run.
//! - `overlay_rr_p50` / `overlay_rr_p99` (64-byte TCP request/response, busy-polled, alternating
//!   blocks, who goes first alternating block by block; bar p50 ratio <= 0.9), and the
//!   blocking p50,
//! - `overlay_tcp_retransmits_per_run` (median over the throughput runs),
//! - `host_to_pod_connect_p50` (TCP connect from the node to a local pod: the kubelet-probe
//!   path): alternating blocks, who goes first alternating, the client pinned to CPU 0 and the
//!   accepting thread to CPU 1, a few connects before each block's timed ones,
//! - `pod_to_external_throughput_snat`: a pod to the external namespace with the agent's
//!   masquerade (ours) against the same path with that flow exempt from conntrack and NAT and
//!   the external side routing back to the pod (baseline); `SNAT_ROUNDS` paired rounds, who
//!   goes first alternating, ratio of the means, with its `ratio_ci95` as above.
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
    Endpoint, RR_BLOCK, RR_BLOCKS, bootstrap_ratio_ci, enter, mean, median, percentile, pin_to_cpu, round3, row,
    rr_interleaved, tcp_gbps, write_results,
};

/// Throughput rounds (one run of each topology per round, who goes first alternating). Even,
/// so each goes first equally often; 16 as in `bench services`: the rounds of one topology
/// spread by +-10-15% on this 2-vCPU machine, and the median of 8 moved a run's ratio by
/// several percent, as much as the margin over the bar.
const ROUNDS: usize = 16;
/// pod -> external rounds (with and without SNAT, who goes first alternating). Even.
const SNAT_ROUNDS: usize = 8;
/// Host -> pod connects per topology, in `CONNECT_BLOCKS` alternating blocks, each after
/// `CONNECT_WARMUP` untimed connects.
const CONNECTS: usize = 2_000;
const CONNECT_BLOCKS: usize = 8;
const CONNECT_WARMUP: usize = 20;
/// Bootstrap resamples for a ratio's confidence interval, and their fixed seed (a run's
/// interval is a function of its rounds alone).
const BOOTSTRAP_RESAMPLES: usize = 10_000;
const BOOTSTRAP_SEED: u64 = 0x0c0f_fee5;

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

/// TCP connect (SYN, SYN-ACK, ACK) times from namespace `ns` to `addr`, in microseconds,
/// after `warmup` untimed connects; the client runs on CPU 0 (the accepting side on CPU 1,
/// see [`accept_forever`]), as in `bench services`.
fn connect_samples(ns: &str, addr: SocketAddr, warmup: usize, count: usize) -> Result<Vec<f64>> {
    let samples = enter(ns, move || -> std::io::Result<Vec<f64>> {
        pin_to_cpu(0);
        let mut v = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            let took = t.elapsed();
            // Close with a reset: thousands of connects leave no TIME_WAIT.
            contiv_tests::close_with_reset(&s);
            if i >= warmup {
                v.push(took.as_nanos() as f64 / 1e3);
            }
        }
        Ok(v)
    })?;
    Ok(samples)
}

/// Accepts and drops connections in `ns` until the process ends, on CPU 1.
fn accept_forever(ns: &str, ip: Ipv4Addr) -> Result<SocketAddr> {
    let l = enter(ns, move || TcpListener::bind((ip, 0)))?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        pin_to_cpu(1);
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
    let per_block = CONNECTS / CONNECT_BLOCKS;
    for block in 0..CONNECT_BLOCKS {
        // Who goes first alternates block by block.
        let ours_first = block % 2 == 1;
        for ours_turn in [ours_first, !ours_first] {
            let (addr, into, what) =
                if ours_turn { (ours_addr, &mut ho, "ours") } else { (base_addr, &mut hb, "baseline") };
            into.extend(
                connect_samples(&n1.netns, addr, CONNECT_WARMUP, per_block)
                    .with_context(|| format!("host -> pod connects to {addr} ({what})"))?,
            );
        }
    }
    for v in [&mut hb, &mut ho] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    let (hb50, ho50) = (percentile(&hb, 0.5), percentile(&ho, 0.5));
    println!("host -> pod connect p50: baseline {hb50:.1} us, ours {ho50:.1} us");

    // pod -> outside with SNAT (ours) against the same path without it.
    let external = Endpoint::new(b.state.external.clone(), EXTERNAL_IP);
    let (mut snat, mut plain) = (vec![], vec![]);
    let without_snat = || -> Result<f64> {
        nat_exempt(&n1.netns, &b.state.external, client.ip, n1.ip, true)?;
        let (p, _) = tcp_gbps(&ours.0, &external)?;
        nat_exempt(&n1.netns, &b.state.external, client.ip, n1.ip, false)?;
        Ok(p)
    };
    for round in 1..=SNAT_ROUNDS {
        // Who goes first alternates, as for the overlay throughput.
        let (p, s) = if round % 2 == 1 {
            let p = without_snat()?;
            (p, tcp_gbps(&ours.0, &external)?.0)
        } else {
            let s = tcp_gbps(&ours.0, &external)?.0;
            (without_snat()?, s)
        };
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

    // The throughput rows with the bootstrap interval of their ratio beside it.
    let with_ci = |metric: &str, base: &[f64], ours: &[f64]| {
        let (lo, hi) = bootstrap_ratio_ci(base, ours, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED);
        let mut r = row(metric, "Gbit/s", mean(base), mean(ours), "higher");
        r["ratio_ci95"] = serde_json::json!([round3(lo), round3(hi)]);
        r
    };
    let results = vec![
        with_ci("overlay_throughput_1_stream", &bt, &ot),
        row("overlay_rr_p50", "us", b_p50, o_p50, "lower"),
        row("overlay_rr_p99", "us", b_p99, o_p99, "lower"),
        row("overlay_rr_p50_blocking", "us", bb_p50, ob_p50, "lower"),
        row("overlay_tcp_retransmits_per_run", "segments", median(&br), median(&or), "lower"),
        row("host_to_pod_connect_p50", "us", hb50, ho50, "lower"),
        with_ci("pod_to_external_throughput_snat", &plain, &snat),
    ];
    write_results(if pod_rps { "overlay-pod-rps" } else { "overlay" }, &results)?;
    let tput = results[0]["ratio"].as_f64().unwrap_or(0.0);
    let ci = |i: usize, k: usize| results[i]["ratio_ci95"][k].as_f64().unwrap_or(f64::NAN);
    let p50 = results[1]["ratio"].as_f64().unwrap_or(f64::MAX);
    println!(
        "throughput ratio 95% CI (bootstrap over {ROUNDS} rounds): [{:.3}, {:.3}]; pod -> external with SNAT: [{:.3}, \
         {:.3}] over {SNAT_ROUNDS} rounds",
        ci(0, 0),
        ci(0, 1),
        ci(6, 0),
        ci(6, 1)
    );
    println!(
        "bar: throughput ratio {tput:.3} >= 1.0: {}; RR p50 ratio {p50:.3} <= 0.9: {}",
        if tput >= 1.0 { "met" } else { "NOT met" },
        if p50 <= 0.9 { "met" } else { "NOT met" }
    );
    Ok(())
}
