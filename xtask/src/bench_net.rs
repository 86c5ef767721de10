//! Measurements the network benchmarks share: iperf3 throughput and packet rate, a 64-byte
//! TCP request/response client and server, alternating blocks so that drift on a shared
//! machine hits baseline and ours alike, and the results file (a list of
//! `{"metric","unit","baseline","ours","ratio","better"}` in target/bench/<name>.json), and a
//! store writer that applies manifests the way `netctl apply` does, timing the write.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

pub const IPERF_SECONDS: &str = "5";
/// Round trips before each timed block (connection warm-up).
pub const RR_WARMUP: usize = 500;
/// Round trips per block; blocks alternate baseline / ours.
pub const RR_BLOCK: usize = 2_000;
pub const RR_BLOCKS: usize = 20;

/// A pod (or host) to measure between: its network namespace's name and address.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl Endpoint {
    pub fn new(ns: impl Into<String>, ip: Ipv4Addr) -> Self {
        Self { ns: ns.into(), ip }
    }
}

/// A command run inside a namespace.
pub fn ns_cmd(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Runs `f` on a thread inside the namespace.
pub fn enter<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    contiv_tests::cluster::enter(ns, f)
}

pub fn iperf_json(client: &Endpoint, server: &Endpoint, extra: &[&str]) -> Result<Value> {
    let port = "5299";
    // Server and client on separate CPUs, the same for both topologies.
    let status = ns_cmd(&server.ns, "iperf3").args(["-s", "-1", "-D", "-A", "1", "-p", port]).status()?;
    if !status.success() {
        bail!("iperf3 server failed to start");
    }
    std::thread::sleep(Duration::from_millis(300));
    let out = ns_cmd(&client.ns, "iperf3")
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
pub fn tcp_gbps(client: &Endpoint, server: &Endpoint) -> Result<(f64, f64)> {
    let v = iperf_json(client, server, &[])?;
    let gbps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no sum_received in iperf3 output")?;
    let retr = v["end"]["sum_sent"]["retransmits"].as_f64().unwrap_or(0.0);
    Ok((gbps, retr))
}

pub fn udp_kpps(client: &Endpoint, server: &Endpoint) -> Result<f64> {
    let v = iperf_json(client, server, &["-u", "-l", "64", "-b", "0"])?;
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().context("packets")?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let secs = sum["seconds"].as_f64().context("seconds")?;
    Ok((packets - lost) / secs / 1e3)
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) {
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

/// 64-byte TCP ping-pong; returns the round-trip times in microseconds.
///
/// `spin`: client and server busy-poll their sockets on separate CPUs, so the time is the
/// path's own and not the VM's wake-up latency (a halted vCPU takes ~100 us to wake here,
/// which swamps any datapath difference). Without it, both block as a normal app would.
pub fn rr_samples(client: &Endpoint, server: &Endpoint, spin: bool, warmup: usize, count: usize) -> Result<Vec<f64>> {
    rr_samples_via(client, server, 0, None, spin, warmup, count)
}

/// Like [`rr_samples`], with the server on `port` (0: any) and the client connecting to
/// `via` instead of the server's own address (e.g. a service frontend leading to it).
pub fn rr_samples_via(
    client: &Endpoint,
    server: &Endpoint,
    port: u16,
    via: Option<SocketAddr>,
    spin: bool,
    warmup: usize,
    count: usize,
) -> Result<Vec<f64>> {
    let ip = server.ip;
    let listener = enter(&server.ns, move || TcpListener::bind((ip, port)))?;
    let addr = via.unwrap_or(SocketAddr::from((ip, listener.local_addr()?.port())));
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
    let client_ns = std::path::Path::new("/run/netns").join(&client.ns);
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

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Request/response latency of both topologies, measured in alternating blocks so that
/// drift on a shared machine hits both alike; who goes first alternates block by block (as
/// in `bench services`), so whatever the first block of a pair leaves behind (or meets)
/// falls on both alike too. Returns (baseline, ours) as (p50, p99) in us.
pub fn rr_interleaved(
    base: (&Endpoint, &Endpoint),
    ours: (&Endpoint, &Endpoint),
    spin: bool,
) -> Result<((f64, f64), (f64, f64))> {
    let (mut b, mut o) = (Vec::new(), Vec::new());
    for block in 0..RR_BLOCKS {
        if block % 2 == 1 {
            o.extend(rr_samples(ours.0, ours.1, spin, RR_WARMUP, RR_BLOCK)?);
        }
        b.extend(rr_samples(base.0, base.1, spin, RR_WARMUP, RR_BLOCK)?);
        if block % 2 == 0 {
            o.extend(rr_samples(ours.0, ours.1, spin, RR_WARMUP, RR_BLOCK)?);
        }
    }
    for v in [&mut b, &mut o] {
        v.sort_by(|x, y| x.total_cmp(y));
    }
    Ok(((percentile(&b, 0.5), percentile(&b, 0.99)), (percentile(&o, 0.5), percentile(&o, 0.99))))
}

/// The middle sample (the upper one of an even count); 0 for no samples.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The arithmetic mean; 0 for no samples.
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// A small deterministic generator (xorshift64*): shuffles and resamples the benchmarks
/// repeat run for run from a fixed seed, without a random-number crate.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // Any seed but zero (a fixed point of xorshift).
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0; the modulo bias is nothing at the sizes used here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// A 95% confidence interval (2.5th and 97.5th percentiles of `resamples` bootstrap
/// resamples) of mean(ours) / mean(baseline) over paired rounds: whole rounds are drawn with
/// replacement, so a pair measured under the same load of the machine stays together.
/// (0, 0) for no rounds.
pub fn bootstrap_ratio_ci(base: &[f64], ours: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    let n = base.len().min(ours.len());
    if n == 0 || resamples == 0 {
        return (0.0, 0.0);
    }
    let mut rng = XorShift::new(seed);
    let mut ratios: Vec<f64> = (0..resamples)
        .map(|_| {
            let (mut b, mut o) = (0.0, 0.0);
            for _ in 0..n {
                let i = rng.below(n);
                b += base[i];
                o += ours[i];
            }
            if b > 0.0 { o / b } else { f64::NAN }
        })
        .filter(|r| r.is_finite())
        .collect();
    if ratios.is_empty() {
        return (0.0, 0.0);
    }
    ratios.sort_by(f64::total_cmp);
    (percentile(&ratios, 0.025), percentile(&ratios, 0.975))
}

/// A duration in milliseconds.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One result row; a ratio over a zero baseline is undefined: null rather than inf.
pub fn row(metric: &str, unit: &str, b: f64, o: f64, better: &str) -> Value {
    let ratio = if b > 0.0 { json!(round3(o / b)) } else { Value::Null };
    json!({"metric": metric, "unit": unit, "baseline": round3(b), "ours": round3(o), "ratio": ratio, "better": better})
}

/// Writes target/bench/<name>.json and prints the table.
pub fn write_results(name: &str, results: &[Value]) -> Result<std::path::PathBuf> {
    let dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(results)?)?;
    print!("\n{}", table(results));
    println!("wrote {}", path.display());
    Ok(path)
}

/// The results as a text table, its first column as wide as the longest metric name so
/// that every row's figures line up; an undefined figure (null) shows as "-".
fn table(results: &[Value]) -> String {
    let num = |v: &Value| if v.is_null() { "-".to_owned() } else { v.to_string() };
    let width = results.iter().filter_map(|r| r["metric"].as_str()).map(str::len).max().unwrap_or(0).max(6);
    let mut out =
        format!("{:<width$} {:>8} {:>10} {:>10} {:>7}  better\n", "metric", "unit", "baseline", "ours", "ratio");
    for r in results {
        out.push_str(&format!(
            "{:<width$} {:>8} {:>10} {:>10} {:>7}  {}\n",
            r["metric"].as_str().unwrap_or(""),
            r["unit"].as_str().unwrap_or(""),
            num(&r["baseline"]),
            num(&r["ours"]),
            num(&r["ratio"]),
            r["better"].as_str().unwrap_or("")
        ));
    }
    out
}

/// A store client inside the box's control namespace (where etcd listens), on its own
/// thread: writes manifests the way `netctl apply` does, returning when the write is done.
pub struct StoreWriter {
    tx: std::sync::mpsc::Sender<(String, std::sync::mpsc::Sender<Result<Instant>>)>,
}

impl StoreWriter {
    pub fn start(control_ns: &str) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<(String, std::sync::mpsc::Sender<Result<Instant>>)>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = control_ns.to_owned();
        std::thread::spawn(move || {
            let f = std::fs::File::open(Path::new("/run/netns").join(&ns)).expect("control netns");
            // SAFETY: setns on this thread only; the fd is valid.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let store = rt.block_on(contiv_store::open(&contiv_store::StoreConfig::etcd(["http://127.0.0.1:2379"])));
            let store: Arc<dyn contiv_store::Store> = match (rc, store) {
                (0, Ok(s)) => s,
                (_, e) => {
                    let _ = ready_tx.send(Err(format!("store in the control namespace: {:?}", e.err())));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            for (yaml, reply) in rx {
                let r = (|| {
                    let m = contiv_netctl::manifest::parse_manifest(Path::new("bench.yaml"), &yaml)?;
                    // The write itself: a get, then the put (as netctl apply does).
                    let t0 = Instant::now();
                    rt.block_on(contiv_netctl::apply(&store, &m.objects))?;
                    Ok(t0)
                })();
                let _ = reply.send(r);
            }
        });
        ready_rx.recv()?.map_err(anyhow::Error::msg)?;
        Ok(Self { tx })
    }

    /// Applies `yaml`; the instant the store write began.
    pub fn apply(&self, yaml: &str) -> Result<Instant> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx.send((yaml.to_owned(), tx))?;
        rx.recv()?
    }
}

/// A pod namespace wired to `node` the way a plain routed CNI does it, the baselines'
/// topology: a veth (`host_if` on the node, `eth0` in the pod) with static MACs (`mac_base`
/// with 0 for the pod's end and 1 for the node's, e.g. 0xb0 -> 02:b0:.. / 02:b1:..),
/// `ip`/32 in the pod with its default route via 169.254.1.1, and a /32 route, proxy ARP
/// and a static neighbour on the node.
pub fn routed_pod(
    node: &contiv_tests::Netns,
    name_prefix: &str,
    host_if: &str,
    mac_base: u8,
    index: u8,
    ip: std::net::Ipv4Addr,
) -> contiv_tests::Netns {
    let pod = contiv_tests::Netns::new(name_prefix);
    let pod_mac = format!("02:{:02x}:00:00:00:{:02x}", mac_base, index + 1);
    let host_mac = format!("02:{:02x}:00:00:00:{:02x}", mac_base + 1, index + 1);
    let peer = format!("{host_if}peer");
    node.ip(&[
        "link", "add", host_if, "address", &host_mac, "type", "veth", "peer", "name", &peer, "address", &pod_mac,
    ]);
    node.ip(&["link", "set", &peer, "netns", pod.name()]);
    pod.ip(&["link", "set", &peer, "name", "eth0"]);
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
    pod.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
    pod.ip(&["neigh", "replace", "169.254.1.1", "lladdr", &host_mac, "dev", "eth0", "nud", "permanent"]);
    node.ip(&["link", "set", host_if, "up"]);
    contiv_tests::run(node.cmd("sysctl").args(["-qw", &format!("net.ipv4.conf.{host_if}.proxy_arp=1")]));
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_if]);
    node.ip(&["neigh", "replace", &ip.to_string(), "lladdr", &pod_mac, "dev", host_if, "nud", "permanent"]);
    pod
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shuffle_is_a_permutation_and_repeats_from_its_seed() {
        let shuffled = |seed| {
            let mut v: Vec<usize> = (0..8).collect();
            XorShift::new(seed).shuffle(&mut v);
            v
        };
        let mut sorted = shuffled(7);
        sorted.sort();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
        assert_eq!(shuffled(7), shuffled(7));
        assert!((1..20).any(|s| shuffled(s) != shuffled(7)), "every seed gave one order");
    }

    #[test]
    fn the_bootstrap_interval_holds_the_ratio_of_means_and_narrows_with_agreement() {
        let base = [10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 10.2, 9.8];
        let ours: Vec<f64> = base.iter().map(|b| b * 1.1).collect();
        // Every round at exactly 1.1: no spread at all.
        let (lo, hi) = bootstrap_ratio_ci(&base, &ours, 1_000, 1);
        assert!((lo - 1.1).abs() < 1e-9 && (hi - 1.1).abs() < 1e-9, "{lo} {hi}");
        // Scattered rounds: the interval holds the ratio of the means, and repeats.
        let ours = [11.0, 12.5, 9.0, 12.0, 10.0, 11.5, 10.0, 11.8];
        let ratio = mean(&ours) / mean(&base);
        let (lo, hi) = bootstrap_ratio_ci(&base, &ours, 2_000, 1);
        assert!(lo < ratio && ratio < hi && hi - lo < 0.2, "{lo} {ratio} {hi}");
        assert_eq!(bootstrap_ratio_ci(&base, &ours, 2_000, 1), (lo, hi));
        assert_eq!(bootstrap_ratio_ci(&[], &[], 100, 1), (0.0, 0.0));
    }

    #[test]
    fn table_shows_an_undefined_ratio_as_a_dash() {
        let text = table(&[row("cold_start", "s", 0.0, 1.5, "lower")]);
        let cells: Vec<&str> = text.lines().nth(1).expect("a row").split_whitespace().collect();
        assert_eq!(cells, ["cold_start", "s", "0.0", "1.5", "-", "lower"], "{text}");
    }

    #[test]
    fn table_lines_up_rows_whose_names_outgrow_the_usual_width() {
        let rows = [
            row("tcp_rr_latency_p50", "us", 10.0, 9.0, "lower"),
            row("connect_p50_10k_vs_redirect_only_edge_pod_ip", "us", 15.908, 17.582, "lower"),
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        // The unit column ends at the same place in the header and in every row.
        let unit_end = |l: &str, unit: &str| l.find(unit).map(|i| i + unit.len());
        let header = unit_end(lines[0], "unit").expect("unit header");
        for l in &lines[1..] {
            assert_eq!(unit_end(l, " us"), Some(header), "{text}");
        }
        assert!(lines[2].starts_with("connect_p50_10k_vs_redirect_only_edge_pod_ip "), "{text}");
    }
}
