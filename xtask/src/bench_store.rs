//! `cargo xtask bench store`: how fast the agent's cluster-watch code gets a full model out of
//! the store, compared with plainly reading the same data from the same kind of store, and how
//! much memory it needs.
//!
//! What is timed is `contiv-store-bench-probe watch`: a process running the agent's
//! `ClusterWatch` (the code the agent uses) alone, because the full agent needs root and BPF.
//! The metric names say so (`cluster_watch_probe_*`).
//!
//! Starts its own etcd on free loopback ports with a temp data dir, loads 10,000 services and
//! 10,000 EndpointSlices with 4 endpoints each (contiv's model format) into etcd and into an
//! embedded store, then measures, alternating, the median of RUNS:
//! - etcd: baseline `ETCDCTL_API=3 etcdctl get --prefix /contiv/k8s/` (output read and
//!   discarded) against the probe's watch on the same etcd, from spawn to a full model;
//! - embedded: baseline `contiv-store-bench-probe list` (one `Store::list` of the same prefix
//!   on the same embedded store, nothing decoded) against the probe's watch on it;
//! - peak RSS (the kernel's `ru_maxrss` of each process): baseline = the plain reader above,
//!   ours = the watch probe holding the whole model. Each RSS row also carries `budget_mib`
//!   (150 MiB), the target for the agent's model; the ratio compares two measurements.
//!
//! Writes target/bench/store.json (list of `{metric, unit, baseline, ours, ratio, better}`,
//! RSS rows with `budget_mib` besides) and prints a table. Bars: time ratio <= 3, RSS under the
//! budget.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::bench_net::{median, ms};
use crate::{target_dir, workspace_root};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 4;
const RUNS: usize = 5;
/// The bar: watch-probe time / plain read time.
const MAX_TIME_RATIO: f64 = 3.0;
/// The budget for the peak resident memory of a process holding the whole model.
const RSS_BUDGET_MIB: f64 = 150.0;

/// An etcd we started; killed (by its pid) on drop.
pub(crate) struct Etcd {
    child: Child,
    pub(crate) endpoint: String,
    dir: PathBuf,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn healthy(endpoint_port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", endpoint_port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

pub(crate) fn start_etcd(scratch: &Path) -> anyhow::Result<Etcd> {
    let client_port = free_port()?;
    let peer_port = free_port()?;
    let dir = scratch.join("etcd");
    std::fs::create_dir_all(&dir)?;
    let endpoint = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let log = std::fs::File::create(dir.join("etcd.log"))?;
    let child = Command::new(std::env::var_os("CONTIV_ETCD_BIN").unwrap_or_else(|| "/usr/bin/etcd".into()))
        .args([
            "--name=bench".to_string(),
            format!("--data-dir={}", dir.join("data").display()),
            format!("--listen-client-urls={endpoint}"),
            format!("--advertise-client-urls={endpoint}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=bench={peer}"),
            "--log-outputs=stderr".to_string(),
            "--logger=zap".to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting etcd (Debian package etcd-server)")?;
    let etcd = Etcd { child, endpoint, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !healthy(client_port) {
        ensure!(Instant::now() < deadline, "etcd did not become healthy; see {}", etcd.dir.join("etcd.log").display());
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(etcd)
}

pub(crate) fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// Waits for a child and returns its exit status and peak resident memory (KiB, `ru_maxrss`).
fn wait_with_maxrss(child: &mut Child) -> anyhow::Result<(std::process::ExitStatus, u64)> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child by pid; both pointers are valid for the call.
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    ensure!(rc == child.id() as i32, "wait4: {}", std::io::Error::last_os_error());
    Ok((std::process::ExitStatus::from_raw(status), usage.ru_maxrss as u64))
}

/// A plain read of the data: wall time and peak RSS.
struct ReadRun {
    wall: Duration,
    maxrss_kib: u64,
}

/// Runs `etcdctl get --prefix`; checks it read every key.
fn etcdctl_get(endpoint: &str, expect: usize) -> anyhow::Result<ReadRun> {
    let start = Instant::now();
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "get", "--prefix", "/contiv/k8s/"])
        .stdout(Stdio::piped())
        .spawn()
        .context("running etcdctl (Debian package etcd-client)")?;
    let mut stdout = child.stdout.take().context("etcdctl stdout")?;
    // Count lines as they stream (key and value alternate), like a reader that discards them.
    let mut buf = vec![0u8; 1 << 16];
    let mut newlines = 0usize;
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        newlines += buf[..n].iter().filter(|b| **b == b'\n').count();
    }
    let (status, maxrss_kib) = wait_with_maxrss(&mut child)?;
    let wall = start.elapsed();
    ensure!(status.success(), "etcdctl failed: {status}");
    ensure!(newlines == 2 * expect, "etcdctl printed {newlines} lines, expected {}", 2 * expect);
    Ok(ReadRun { wall, maxrss_kib })
}

/// Runs `contiv-store-bench-probe list`: one plain list of the prefix on the store.
fn probe_list(probe: &Path, store_args: &[&str], expect: usize) -> anyhow::Result<ReadRun> {
    let start = Instant::now();
    let mut child = Command::new(probe)
        .arg("list")
        .args(store_args)
        .args(["--expect", &expect.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", probe.display()))?;
    let (status, maxrss_kib) = wait_with_maxrss(&mut child)?;
    let wall = start.elapsed();
    ensure!(status.success(), "probe list failed: {status}");
    Ok(ReadRun { wall, maxrss_kib })
}

struct ProbeRun {
    wall: Duration,
    internal_ms: f64,
    maxrss_kib: u64,
}

fn probe_watch(probe: &Path, store_args: &[&str], expect: usize) -> anyhow::Result<ProbeRun> {
    let start = Instant::now();
    let mut child = Command::new(probe)
        .arg("watch")
        .args(store_args)
        .args(["--expect", &expect.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", probe.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().context("probe stdout")?).read_line(&mut line)?;
    let wall = start.elapsed();
    drop(child.stdin.take()); // lets the probe exit; its peak RSS includes the whole model
    let (status, maxrss_kib) = wait_with_maxrss(&mut child)?;
    ensure!(status.success(), "probe failed: {status}");
    let report: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("probe said {line:?}"))?;
    let objects = report["objects"].as_u64().unwrap_or(0) as usize;
    ensure!(objects >= expect, "probe model holds {objects} objects, expected {expect}");
    Ok(ProbeRun { wall, internal_ms: report["ready_ms"].as_f64().unwrap_or(0.0), maxrss_kib })
}

fn rss_metric(name: &str, baseline_kib: u64, ours_kib: u64) -> serde_json::Value {
    let mut m = metric(name, "MiB", baseline_kib as f64 / 1024.0, ours_kib as f64 / 1024.0);
    m["budget_mib"] = serde_json::json!(RSS_BUDGET_MIB);
    m
}

pub(crate) fn metric(name: &str, unit: &str, baseline: f64, ours: f64) -> serde_json::Value {
    serde_json::json!({
        "metric": name,
        "unit": unit,
        "baseline": (baseline * 100.0).round() / 100.0,
        "ours": (ours * 100.0).round() / 100.0,
        "ratio": (ours / baseline * 1000.0).round() / 1000.0,
        "better": "lower",
    })
}

pub fn run() -> anyhow::Result<()> {
    let root = workspace_root();
    let build = crate::progress::step("building contiv-store-bench-probe (release)");
    run_ok(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).current_dir(&root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "contiv-cluster-watch",
        "--bin",
        "contiv-store-bench-probe",
    ]))?;
    build.finish();
    let probe = target_dir().join("release/contiv-store-bench-probe");
    ensure!(probe.exists(), "{} missing after build", probe.display());

    let scratch = std::env::temp_dir().join(format!("contiv-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let result = measure(&probe, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let metrics = result?;

    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("store.json");
    std::fs::write(&out, serde_json::to_string_pretty(&metrics)?)?;

    println!("\n{:<50} {:>6} {:>10} {:>10} {:>7} {:>7}", "metric", "unit", "baseline", "ours", "ratio", "budget");
    for m in metrics.as_array().into_iter().flatten() {
        println!(
            "{:<50} {:>6} {:>10.2} {:>10.2} {:>7.3} {:>7}",
            m["metric"].as_str().unwrap_or(""),
            m["unit"].as_str().unwrap_or(""),
            m["baseline"].as_f64().unwrap_or(0.0),
            m["ours"].as_f64().unwrap_or(0.0),
            m["ratio"].as_f64().unwrap_or(0.0),
            m.get("budget_mib").and_then(|b| b.as_f64()).map(|b| b.to_string()).unwrap_or_default()
        );
    }
    println!(
        "baselines: etcd rows = etcdctl get --prefix on the same etcd; embedded rows = one Store::list of the\n\
         same prefix on the same embedded store (probe list). ours = the cluster-watch probe building the model."
    );
    println!("\nwrote {}", out.display());
    let failures: Vec<String> = metrics
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| match m.get("budget_mib").and_then(|b| b.as_f64()) {
            Some(budget) => m["ours"].as_f64().unwrap_or(f64::MAX) >= budget,
            None => m["ratio"].as_f64().unwrap_or(f64::MAX) > MAX_TIME_RATIO,
        })
        .map(|m| m["metric"].as_str().unwrap_or("").to_string())
        .collect();
    if !failures.is_empty() {
        bail!("over the bar: {failures:?} (time ratio <= {MAX_TIME_RATIO}, RSS < {RSS_BUDGET_MIB} MiB)");
    }
    Ok(())
}

/// Writes target/bench/<name>.json and prints the table.
pub(crate) fn write_report(name: &str, metrics: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join(format!("{name}.json"));
    std::fs::write(&out, serde_json::to_string_pretty(metrics)?)?;
    println!("\n{:<36} {:>6} {:>10} {:>10} {:>7}", "metric", "unit", "baseline", "ours", "ratio");
    for m in metrics.as_array().into_iter().flatten() {
        println!(
            "{:<36} {:>6} {:>10.2} {:>10.2} {:>7.3}",
            m["metric"].as_str().unwrap_or(""),
            m["unit"].as_str().unwrap_or(""),
            m["baseline"].as_f64().unwrap_or(0.0),
            m["ours"].as_f64().unwrap_or(0.0),
            m["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    println!("\nwrote {}", out.display());
    Ok(out)
}

fn measure(probe: &Path, scratch: &Path) -> anyhow::Result<serde_json::Value> {
    let objects = 2 * SERVICES;
    let etcd = start_etcd(scratch)?;
    let load = crate::progress::step(format!(
        "loading {SERVICES} services + {SERVICES} EndpointSlices ({ENDPOINTS} endpoints each) into etcd and the embedded store"
    ));
    let n = SERVICES.to_string();
    let e = ENDPOINTS.to_string();
    run_ok(Command::new(probe).args(["load", "--etcd", &etcd.endpoint, "--services", &n, "--endpoints", &e]))?;
    let embedded = scratch.join("embedded");
    let embedded_arg = embedded.display().to_string();
    run_ok(Command::new(probe).args(["load", "--embedded", &embedded_arg, "--services", &n, "--endpoints", &e]))?;

    load.finish();
    let runs = crate::progress::step(format!("{RUNS} runs: etcdctl get vs the agent's cluster watch"));
    // Warm up both (page cache, etcd's read path), then alternate the measured runs.
    let etcd_args = ["--etcd", etcd.endpoint.as_str()];
    let emb_args = ["--embedded", embedded_arg.as_str()];
    etcdctl_get(&etcd.endpoint, objects)?;
    probe_watch(probe, &etcd_args, objects)?;
    probe_list(probe, &emb_args, objects)?;
    let (mut etcd_read, mut etcd_watch, mut emb_read, mut emb_watch) = (vec![], vec![], vec![], vec![]);
    let mut rss = [0u64; 4]; // etcd read, etcd watch, embedded read, embedded watch
    for run in 0..RUNS {
        let a = etcdctl_get(&etcd.endpoint, objects)?;
        let b = probe_watch(probe, &etcd_args, objects)?;
        let c = probe_list(probe, &emb_args, objects)?;
        let d = probe_watch(probe, &emb_args, objects)?;
        println!(
            "run {run}: etcd: etcdctl get {:.1} ms, watch probe {:.1} ms ({:.1} ms in-process); \
             embedded: list {:.1} ms, watch probe {:.1} ms",
            ms(a.wall),
            ms(b.wall),
            b.internal_ms,
            ms(c.wall),
            ms(d.wall)
        );
        for (slot, kib) in rss.iter_mut().zip([a.maxrss_kib, b.maxrss_kib, c.maxrss_kib, d.maxrss_kib]) {
            *slot = (*slot).max(kib);
        }
        etcd_read.push(ms(a.wall));
        etcd_watch.push(ms(b.wall));
        emb_read.push(ms(c.wall));
        emb_watch.push(ms(d.wall));
    }
    runs.finish();
    drop(etcd);
    Ok(serde_json::json!([
        metric("cluster_watch_probe_etcd_time_to_full_model", "ms", median(&etcd_read), median(&etcd_watch)),
        metric("cluster_watch_probe_embedded_time_to_full_model", "ms", median(&emb_read), median(&emb_watch)),
        rss_metric("cluster_watch_probe_etcd_peak_rss", rss[0], rss[1]),
        rss_metric("cluster_watch_probe_embedded_peak_rss", rss[2], rss[3]),
    ]))
}
