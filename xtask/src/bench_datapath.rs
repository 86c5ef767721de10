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

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use contiv_tests::{Netns, Node, NodeOptions};
use serde_json::{Value, json};

const ROUNDS: usize = 5;
const IPERF_SECONDS: &str = "5";
/// Round trips before each timed block (connection warm-up).
const RR_WARMUP: usize = 500;
/// Round trips per block; blocks alternate baseline / ours.
const RR_BLOCK: usize = 2_000;
const RR_BLOCKS: usize = 20;

/// A pod endpoint to measure between.
struct Endpoint<'a> {
    ns: &'a Netns,
    ip: Ipv4Addr,
}

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
            let pod = Netns::new("bkp");
            let ip = Ipv4Addr::new(10, 2, 0, 2 + i);
            let host = format!("bk{i}");
            // Static L2 on both sides, like this datapath's static gateway neighbour.
            let pod_mac = format!("02:b0:00:00:00:{:02x}", i + 1);
            let host_mac = format!("02:b1:00:00:00:{:02x}", i + 1);
            node.ip(&[
                "link", "add", &host, "address", &host_mac, "type", "veth", "peer", "name", "bkpeer", "address",
                &pod_mac,
            ]);
            node.ip(&["link", "set", "bkpeer", "netns", pod.name()]);
            pod.ip(&["link", "set", "bkpeer", "name", "eth0"]);
            pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
            pod.ip(&["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
            pod.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
            pod.ip(&["neigh", "replace", "169.254.1.1", "lladdr", &host_mac, "dev", "eth0", "nud", "permanent"]);
            node.ip(&["link", "set", &host, "up"]);
            contiv_tests::run(node.cmd("sysctl").args(["-qw", &format!("net.ipv4.conf.{host}.proxy_arp=1")]));
            node.ip(&["route", "add", &format!("{ip}/32"), "dev", &host]);
            node.ip(&["neigh", "replace", &ip.to_string(), "lladdr", &pod_mac, "dev", &host, "nud", "permanent"]);
            pods.push((pod, ip));
        }
        Self { node, pods }
    }
}

fn iperf_json(client: &Endpoint, server: &Endpoint, extra: &[&str]) -> Result<Value> {
    let port = "5299";
    // Server and client on separate CPUs, the same for both topologies.
    let status = server.ns.cmd("iperf3").args(["-s", "-1", "-D", "-A", "1", "-p", port]).status()?;
    if !status.success() {
        bail!("iperf3 server failed to start");
    }
    std::thread::sleep(Duration::from_millis(300));
    let out = client
        .ns
        .cmd("iperf3")
        .args(["-c", &server.ip.to_string(), "-p", port, "-t", IPERF_SECONDS, "-A", "0", "-J"])
        .args(extra)
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    // Let the one-off server exit before the next run reuses the port.
    std::thread::sleep(Duration::from_millis(300));
    Ok(v)
}

/// (Gbit/s received, sender retransmits)
fn tcp_gbps(client: &Endpoint, server: &Endpoint) -> Result<(f64, f64)> {
    let v = iperf_json(client, server, &[])?;
    let gbps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no sum_received in iperf3 output")?;
    let retr = v["end"]["sum_sent"]["retransmits"].as_f64().unwrap_or(0.0);
    Ok((gbps, retr))
}

fn udp_kpps(client: &Endpoint, server: &Endpoint) -> Result<f64> {
    let v = iperf_json(client, server, &["-u", "-l", "64", "-b", "0"])?;
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().context("packets")?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let secs = sum["seconds"].as_f64().context("seconds")?;
    Ok((packets - lost) / secs / 1e3)
}

/// Pins the calling thread to one CPU.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Reads exactly `buf.len()` bytes, spinning on a non-blocking socket when `spin`.
fn read_full(s: &mut TcpStream, buf: &mut [u8], spin: bool) -> std::io::Result<()> {
    if !spin {
        return s.read_exact(buf);
    }
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// 64-byte TCP ping-pong; returns (p50, p99) round-trip time in microseconds.
///
/// `spin`: client and server busy-poll their sockets on separate CPUs, so the time is the
/// path's own and not the VM's wake-up latency (a halted vCPU takes ~100 us to wake here,
/// which swamps any datapath difference). Without it, both block as a normal app would.
fn rr_samples(client: &Endpoint, server: &Endpoint, spin: bool, warmup: usize, count: usize) -> Result<Vec<f64>> {
    let ip = server.ip;
    let listener = server.ns.enter(move || TcpListener::bind((ip, 0)))?;
    let addr = SocketAddr::from((ip, listener.local_addr()?.port()));
    let srv = std::thread::spawn(move || -> std::io::Result<()> {
        if spin {
            pin_to_cpu(1);
        }
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_nonblocking(spin)?;
        let mut buf = [0u8; 64];
        loop {
            match read_full(&mut s, &mut buf, spin) {
                Ok(()) => s.write_all(&buf)?,
                Err(_) => return Ok(()),
            }
        }
    });
    let client_ns = client.ns.path();
    let samples = std::thread::spawn(move || -> std::io::Result<Vec<f64>> {
        let f = std::fs::File::open(client_ns)?;
        // SAFETY: setns on this thread only.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if spin {
            pin_to_cpu(0);
        }
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_nonblocking(spin)?;
        let mut buf = [7u8; 64];
        let mut samples = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let t = Instant::now();
            s.write_all(&buf)?;
            read_full(&mut s, &mut buf, spin)?;
            if i >= warmup {
                samples.push(t.elapsed().as_nanos() as f64 / 1e3);
            }
        }
        Ok(samples)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("rr client panicked"))??;
    let _ = srv.join();
    Ok(samples)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Request/response latency of both topologies, measured in alternating blocks so that
/// drift on a shared machine hits both alike. Returns (baseline, ours) as (p50, p99) in us.
fn rr_interleaved(
    base: (&Endpoint, &Endpoint),
    ours: (&Endpoint, &Endpoint),
    spin: bool,
) -> Result<((f64, f64), (f64, f64))> {
    let (mut b, mut o) = (Vec::new(), Vec::new());
    for _ in 0..RR_BLOCKS {
        b.extend(rr_samples(base.0, base.1, spin, RR_WARMUP, RR_BLOCK)?);
        o.extend(rr_samples(ours.0, ours.1, spin, RR_WARMUP, RR_BLOCK)?);
    }
    for v in [&mut b, &mut o] {
        v.sort_by(|x, y| x.total_cmp(y));
    }
    Ok(((percentile(&b, 0.5), percentile(&b, 0.99)), (percentile(&o, 0.5), percentile(&o, 0.99))))
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

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(bins: &Path) -> Result<()> {
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("CONTIV_BIN_DIR", bins) };
    println!("datapath benchmark: {ROUNDS} rounds, baseline = kernel routing through the node");
    let baseline = KernelRoutedNode::new(2);
    let node = Node::start(NodeOptions::default());
    let (pa, pb) = (node.add_pod(), node.add_pod());
    let base_client = Endpoint { ns: &baseline.pods[0].0, ip: baseline.pods[0].1 };
    let base_server = Endpoint { ns: &baseline.pods[1].0, ip: baseline.pods[1].1 };
    let ours_client = Endpoint { ns: &pa.ns, ip: pa.ip };
    let ours_server = Endpoint { ns: &pb.ns, ip: pb.ip };
    // Both topologies must really forward before anything is timed.
    for (c, s) in [(&base_client, &base_server), (&ours_client, &ours_server)] {
        if !contiv_tests::ping(c.ns, s.ip, 1) {
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

    let row = |metric: &str, unit: &str, b: f64, o: f64, better: &str| {
        // A ratio over a zero baseline is undefined: null rather than inf.
        let ratio = if b > 0.0 { json!(round3(o / b)) } else { Value::Null };
        json!({"metric": metric, "unit": unit, "baseline": round3(b), "ours": round3(o),
               "ratio": ratio, "better": better})
    };
    let results = vec![
        row("tcp_throughput_1_stream", "Gbit/s", median(&base.tcp), median(&ours.tcp), "higher"),
        row("tcp_rr_latency_p50", "us", b_p50, o_p50, "lower"),
        row("tcp_rr_latency_p99", "us", b_p99, o_p99, "lower"),
        row("tcp_rr_latency_p50_blocking", "us", bb_p50, ob_p50, "lower"),
        row("udp_64b_packet_rate", "kpps", median(&base.udp), median(&ours.udp), "higher"),
        row("tcp_retransmits_per_run", "segments", median(&base.retransmits), median(&ours.retransmits), "lower"),
    ];
    let (tput_row, p50_row) = (&results[0], &results[1]);
    let dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("datapath.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;

    println!("\n{:<26} {:>8} {:>10} {:>10} {:>7}  better", "metric", "unit", "baseline", "ours", "ratio");
    for r in &results {
        println!(
            "{:<26} {:>8} {:>10} {:>10} {:>7}  {}",
            r["metric"].as_str().unwrap(),
            r["unit"].as_str().unwrap(),
            r["baseline"],
            r["ours"],
            r["ratio"],
            r["better"].as_str().unwrap()
        );
    }
    let tput = tput_row["ratio"].as_f64().unwrap_or(0.0);
    let p50 = p50_row["ratio"].as_f64().unwrap_or(f64::MAX);
    println!(
        "\nbar: throughput ratio {tput:.3} >= 1.0: {}; latency p50 ratio {p50:.3} <= 0.9: {}",
        if tput >= 1.0 { "met" } else { "NOT met" },
        if p50 <= 0.9 { "met" } else { "NOT met" }
    );
    println!("wrote {}", path.display());
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
