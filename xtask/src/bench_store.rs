//! `cargo xtask bench store`: how fast the agent's cluster watch gets a full model, compared
//! with just reading the same data (`etcdctl get --prefix`), and how much memory it needs.
//!
//! Starts its own etcd on free loopback ports with a temp data dir, loads 10,000 services and
//! 10,000 EndpointSlices with 4 endpoints each (contiv's model format, written by the probe
//! binary `contiv-store-bench-probe` of contiv-cluster-watch), then times:
//! - baseline: `ETCDCTL_API=3 etcdctl get --prefix /contiv/k8s/` (output discarded),
//! - ours: the probe process from spawn until its ClusterWatch model holds every object,
//!   against etcd and against the embedded store (loaded with the same data),
//!
//! and reads the probe's peak resident memory (VmHWM) while it holds the model.
//! Each timing is the median of RUNS. Writes target/bench/store.json and prints a table:
//! - `agent_{etcd,embedded}_time_to_full_model`: baseline = etcdctl get --prefix (ms), bar ratio <= 3;
//! - `agent_{etcd,embedded}_peak_rss`: baseline = the 150 MiB bar, ours = VmHWM, bar ratio < 1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 4;
const RUNS: usize = 5;
/// The bar: agent time / etcdctl time.
const MAX_TIME_RATIO: f64 = 3.0;
/// The bar: agent peak resident memory.
const MAX_RSS_MIB: f64 = 150.0;

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

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

/// Runs `etcdctl get --prefix` and returns its wall time; checks it read every key.
fn etcdctl_get(endpoint: &str, expect: usize) -> anyhow::Result<Duration> {
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
    let status = child.wait()?;
    let elapsed = start.elapsed();
    ensure!(status.success(), "etcdctl failed: {status}");
    ensure!(newlines == 2 * expect, "etcdctl printed {newlines} lines, expected {}", 2 * expect);
    Ok(elapsed)
}

struct ProbeRun {
    wall: Duration,
    internal_ms: f64,
    vmhwm_kib: u64,
}

fn vmhwm_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM line")?;
    Ok(line.split_whitespace().nth(1).context("VmHWM value")?.parse()?)
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
    let vmhwm = vmhwm_kib(child.id());
    drop(child.stdin.take()); // lets the probe exit
    let status = child.wait()?;
    ensure!(status.success(), "probe failed: {status}");
    let report: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("probe said {line:?}"))?;
    let objects = report["objects"].as_u64().unwrap_or(0) as usize;
    ensure!(objects >= expect, "probe model holds {objects} objects, expected {expect}");
    Ok(ProbeRun { wall, internal_ms: report["ready_ms"].as_f64().unwrap_or(0.0), vmhwm_kib: vmhwm? })
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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

    write_report("store", &metrics)?;
    let failures: Vec<String> = metrics
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["ratio"].as_f64().unwrap_or(f64::MAX) > bar(m["unit"].as_str().unwrap_or("")))
        .map(|m| m["metric"].as_str().unwrap_or("").to_string())
        .collect();
    if !failures.is_empty() {
        bail!("over the bar: {failures:?} (time ratio <= {MAX_TIME_RATIO}, RSS < {MAX_RSS_MIB} MiB)");
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

/// The ratio each metric must stay under: times against etcdctl, memory against the MiB bar
/// (the RSS metrics' baseline is the bar itself).
fn bar(unit: &str) -> f64 {
    if unit == "MiB" { 1.0 } else { MAX_TIME_RATIO }
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
    etcdctl_get(&etcd.endpoint, objects)?;
    probe_watch(probe, &["--etcd", &etcd.endpoint], objects)?;
    let (mut base, mut agent, mut emb) = (Vec::new(), Vec::new(), Vec::new());
    let (mut agent_rss, mut emb_rss) = (0u64, 0u64);
    for run in 0..RUNS {
        base.push(ms(etcdctl_get(&etcd.endpoint, objects)?));
        let a = probe_watch(probe, &["--etcd", &etcd.endpoint], objects)?;
        let b = probe_watch(probe, &["--embedded", &embedded_arg], objects)?;
        println!(
            "run {run}: etcdctl {:.1} ms, agent/etcd {:.1} ms ({:.1} ms in-process, {} KiB peak), agent/embedded {:.1} ms ({} KiB peak)",
            base[run],
            ms(a.wall),
            a.internal_ms,
            a.vmhwm_kib,
            ms(b.wall),
            b.vmhwm_kib
        );
        agent.push(ms(a.wall));
        emb.push(ms(b.wall));
        agent_rss = agent_rss.max(a.vmhwm_kib);
        emb_rss = emb_rss.max(b.vmhwm_kib);
    }
    runs.finish();
    drop(etcd);
    let base = median(base);
    Ok(serde_json::json!([
        metric("agent_etcd_time_to_full_model", "ms", base, median(agent)),
        metric("agent_embedded_time_to_full_model", "ms", base, median(emb)),
        metric("agent_etcd_peak_rss", "MiB", MAX_RSS_MIB, agent_rss as f64 / 1024.0),
        metric("agent_embedded_peak_rss", "MiB", MAX_RSS_MIB, emb_rss as f64 / 1024.0),
    ]))
}
