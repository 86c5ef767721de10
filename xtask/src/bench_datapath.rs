//! `cargo xtask bench datapath`: two pods on one node, wired twice in the same run —
//! once by plain kernel routing through the node (veth, /32 routes, proxy ARP, no
//! programs) and once by this datapath (agent + contiv-cni) — and measured alike:
//!
//! - TCP throughput, one stream (iperf3, 5 s),
//! - request/response latency p50/p99 (64-byte TCP ping-pong, a small Rust client),
//! - UDP 64-byte packet rate delivered (iperf3 -u -l 64 -b 0).
//!
//! Latency: 20 alternating blocks per topology, percentiles over all samples. Throughput and
//! packet rate: rounds alternate baseline/ours, each metric is the median over rounds. Results go to
//! target/bench/datapath.json as `{"metric","unit","baseline","ours","ratio","better"}`.
//! Bar: throughput ratio >= 1.0, latency p50 ratio <= 0.9.
//!
//! `--pod-rps` runs the agent with `podRps = true` (RPS on the pods' host ends, which removes
//! the same-node reordering at a cost in latency) and writes datapath-pod-rps.json instead.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Result, bail};
use contiv_tests::{Netns, Node, NodeOptions};

use crate::bench_net::{Endpoint, RR_BLOCK, RR_BLOCKS, median, row, rr_interleaved, tcp_gbps, udp_kpps, write_results};

const ROUNDS: usize = 5;

/// The baseline: pods routed by the node's kernel (what a plain routed CNI does).
struct KernelRoutedNode {
    node: Netns,
    pods: Vec<(Netns, Ipv4Addr)>,
}

impl KernelRoutedNode {
    fn new(count: u8) -> Self {
        let node = Netns::new("bkn");
        contiv_tests::run(node.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        let mut pods = vec![];
        for i in 0..count {
            let ip = Ipv4Addr::new(10, 2, 0, 2 + i);
            // Static L2 on both sides, like this datapath's static gateway neighbour.
            let pod = crate::bench_net::routed_pod(&node, "bkp", &format!("bk{i}"), 0xb0, i, ip);
            pods.push((pod, ip));
        }
        Self { node, pods }
    }
}

#[derive(Default)]
struct Samples {
    tcp: Vec<f64>,
    retransmits: Vec<f64>,
    udp: Vec<f64>,
}

fn measure(label: &str, client: &Endpoint, server: &Endpoint, into: &mut Samples) -> Result<()> {
    let (tcp, retr) = tcp_gbps(client, server)?;
    let udp = udp_kpps(client, server)?;
    println!("  {label:<9} tcp {tcp:6.2} Gbit/s ({retr:5} retransmits)   udp64 {udp:7.1} kpps");
    into.tcp.push(tcp);
    into.retransmits.push(retr);
    into.udp.push(udp);
    Ok(())
}

pub fn run(bins: &Path, pod_rps: bool) -> Result<()> {
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("CONTIV_BIN_DIR", bins) };
    let variant = if pod_rps { " (ours with podRps = true)" } else { "" };
    println!("datapath benchmark{variant}: {ROUNDS} rounds, baseline = kernel routing through the node");
    let baseline = KernelRoutedNode::new(2);
    let extra_config = if pod_rps { "podRps = true\n".to_owned() } else { String::new() };
    let node = Node::start(NodeOptions { extra_config, ..NodeOptions::default() });
    let (pa, pb) = (node.add_pod(), node.add_pod());
    let base_client = Endpoint::new(baseline.pods[0].0.name(), baseline.pods[0].1);
    let base_server = Endpoint::new(baseline.pods[1].0.name(), baseline.pods[1].1);
    let ours_client = Endpoint::new(pa.ns.name(), pa.ip);
    let ours_server = Endpoint::new(pb.ns.name(), pb.ip);
    // Both topologies must really forward before anything is timed.
    for (c, s) in [(&base_client, &base_server), (&ours_client, &ours_server)] {
        if !contiv_tests::cluster::cmd_in(&c.ns, "ping")
            .args(["-c", "1", "-W", "2", &s.ip.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|st| st.success())
        {
            bail!("{} cannot reach {}", c.ip, s.ip);
        }
    }
    println!("request/response: {RR_BLOCKS} alternating blocks of {RR_BLOCK} round trips per topology");
    let ((b_p50, b_p99), (o_p50, o_p99)) =
        rr_interleaved((&base_client, &base_server), (&ours_client, &ours_server), true)?;
    println!(
        "  busy-poll  baseline p50 {b_p50:6.1} us p99 {b_p99:6.1} us   ours p50 {o_p50:6.1} us p99 {o_p99:6.1} us"
    );
    let ((bb_p50, _), (ob_p50, _)) = rr_interleaved((&base_client, &base_server), (&ours_client, &ours_server), false)?;
    println!("  blocking   baseline p50 {bb_p50:6.1} us              ours p50 {ob_p50:6.1} us");
    let (mut base, mut ours) = (Samples::default(), Samples::default());
    for round in 1..=ROUNDS {
        println!("round {round}");
        measure("baseline", &base_client, &base_server, &mut base)?;
        measure("ours", &ours_client, &ours_server, &mut ours)?;
    }
    let fwd = node.pod_counters(pa.ip).map(|c| contiv_tests::counter(&c, "fwd_packets")).unwrap_or(0);
    if fwd == 0 {
        bail!("our pods' traffic did not go through the fast path (fwd_packets = 0)");
    }
    drop(baseline.node);

    let results = vec![
        row("tcp_throughput_1_stream", "Gbit/s", median(&base.tcp), median(&ours.tcp), "higher"),
        row("tcp_rr_latency_p50", "us", b_p50, o_p50, "lower"),
        row("tcp_rr_latency_p99", "us", b_p99, o_p99, "lower"),
        row("tcp_rr_latency_p50_blocking", "us", bb_p50, ob_p50, "lower"),
        row("udp_64b_packet_rate", "kpps", median(&base.udp), median(&ours.udp), "higher"),
        row("tcp_retransmits_per_run", "segments", median(&base.retransmits), median(&ours.retransmits), "lower"),
    ];
    let (tput_row, p50_row) = (&results[0], &results[1]);
    let path = write_results(if pod_rps { "datapath-pod-rps" } else { "datapath" }, &results)?;
    let tput = tput_row["ratio"].as_f64().unwrap_or(0.0);
    let p50 = p50_row["ratio"].as_f64().unwrap_or(f64::MAX);
    println!(
        "\nbar: throughput ratio {tput:.3} >= 1.0: {}; latency p50 ratio {p50:.3} <= 0.9: {}",
        if tput >= 1.0 { "met" } else { "NOT met" },
        if p50 <= 0.9 { "met" } else { "NOT met" }
    );
    let _ = path;
    Ok(())
}
