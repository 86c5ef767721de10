//! `cargo xtask bench ksr`: KSR's initial sync of 10,000 Services and 10,000 EndpointSlices
//! from the fake API server into a real etcd, against writing the same keys and values with
//! `etcdctl txn` in transactions of the same size, in the same run.
//!
//! - baseline: the key/value pairs KSR stores for those objects (dumped by the probe, so the
//!   bytes are identical) written by `etcdctl txn`, [`BATCH`] puts per transaction, with as
//!   many transactions in flight as KSR keeps ([`IN_FLIGHT`] etcdctl processes at once);
//! - ours: `contiv-ksr-bench-probe sync`: from the reflector's start (list from the fake API
//!   server, convert, diff against etcd, batched writes, marker) until it is ready. During
//!   the sync a client polls `/readyz` and `/metrics` every 20 ms; every answer must come
//!   within 1 s (a lock held across store calls would stall them).
//!
//! etcd's keys are wiped between runs; runs alternate baseline and ours; medians of RUNS.
//! Writes target/bench/ksr.json: `ksr_initial_sync_time` (ms), bar: ratio <= 2.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::bench_net::{median, ms};
use crate::bench_store::{metric, run_ok, start_etcd, write_report};
use crate::progress;
use crate::{target_dir, workspace_root};

const SERVICES: usize = 10_000;
/// Operations per transaction: the same as KSR's (contiv_ksr::mirror::BATCH).
const BATCH: usize = 100;
/// Transactions in flight: the same as KSR's (contiv_ksr::mirror::IN_FLIGHT).
const IN_FLIGHT: usize = 4;
const RUNS: usize = 3;
const MAX_RATIO: f64 = 2.0;

fn etcdctl(endpoint: &str) -> Command {
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3").args(["--endpoints", endpoint]);
    c
}

fn wipe(endpoint: &str) -> anyhow::Result<()> {
    let out = etcdctl(endpoint).args(["del", "--prefix", "/contiv/"]).stdout(Stdio::null()).status()?;
    ensure!(out.success(), "etcdctl del failed");
    Ok(())
}

fn count(endpoint: &str) -> anyhow::Result<usize> {
    // etcdctl 3.4 has no --count-only: list the keys and count them.
    let out = etcdctl(endpoint).args(["get", "--prefix", "/contiv/k8s/", "--keys-only"]).output()?;
    ensure!(out.status.success(), "etcdctl get --keys-only failed");
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).count())
}

/// etcdctl's `txn` input: no compares, the puts, no failure ops. Values are quoted the way
/// etcdctl unquotes them (Go syntax; JSON string escapes are a subset).
fn txn_scripts(pairs: &[(String, String)]) -> anyhow::Result<Vec<String>> {
    pairs
        .chunks(BATCH)
        .map(|chunk| {
            let mut s = String::from("\n");
            for (k, v) in chunk {
                s.push_str(&format!("put {k} {}\n", serde_json::to_string(v)?));
            }
            s.push_str("\n\n");
            Ok(s)
        })
        .collect()
}

/// Runs every script through `etcdctl txn`, IN_FLIGHT at a time; returns the wall time.
fn baseline(endpoint: &str, scripts: &[String]) -> anyhow::Result<Duration> {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(script) = scripts.get(i) else { return Ok(()) };
                        let mut child =
                            etcdctl(endpoint).arg("txn").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
                        child.stdin.take().context("etcdctl stdin")?.write_all(script.as_bytes())?;
                        let out = child.wait_with_output()?;
                        let text = String::from_utf8_lossy(&out.stdout);
                        ensure!(out.status.success() && text.starts_with("SUCCESS"), "etcdctl txn failed: {text}");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("etcdctl worker panicked"))??;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(start.elapsed())
}

struct Sync {
    ms: f64,
    http_polls: u64,
    http_max_ms: f64,
}

fn ours(probe: &Path, endpoint: &str, expect: usize) -> anyhow::Result<Sync> {
    let out = Command::new(probe)
        .args(["sync", "--etcd", endpoint, "--services", &SERVICES.to_string()])
        .stderr(Stdio::inherit())
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("running {}", probe.display()))?;
    ensure!(out.status.success(), "probe sync failed: {}", out.status);
    let line = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(line.trim()).with_context(|| format!("probe said {line:?}"))?;
    let keys = r["keys"].as_u64().unwrap_or(0) as usize;
    ensure!(keys == expect, "KSR wrote {keys} keys, expected {expect}");
    let failures = r["http_failures"].as_u64().unwrap_or(u64::MAX);
    let polls = r["http_polls"].as_u64().unwrap_or(0);
    ensure!(failures == 0, "/readyz or /metrics did not answer within 1 s during the sync ({failures} times)");
    ensure!(polls > 0, "no /readyz or /metrics answer during the sync");
    Ok(Sync {
        ms: r["sync_ms"].as_f64().unwrap_or(0.0),
        http_polls: polls,
        http_max_ms: r["http_max_ms"].as_f64().unwrap_or(0.0),
    })
}

pub fn run() -> anyhow::Result<()> {
    let build = progress::step("building contiv-ksr-bench-probe (release)");
    run_ok(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).current_dir(workspace_root()).args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "contiv-ksr",
            "--features",
            "test-support",
            "--bin",
            "contiv-ksr-bench-probe",
        ]),
    )?;
    build.finish();
    let probe = target_dir().join("release/contiv-ksr-bench-probe");
    ensure!(probe.exists(), "{} missing after build", probe.display());
    let scratch = std::env::temp_dir().join(format!("contiv-bench-ksr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let result = measure(&probe, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let metrics = result?;
    write_report("ksr", &metrics)?;
    let ratio = metrics[0]["ratio"].as_f64().unwrap_or(f64::MAX);
    if ratio > MAX_RATIO {
        bail!("ksr_initial_sync_time ratio {ratio} is over the bar ({MAX_RATIO})");
    }
    Ok(())
}

fn measure(probe: &Path, scratch: &Path) -> anyhow::Result<serde_json::Value> {
    let etcd = start_etcd(scratch)?;
    let dump = scratch.join("kv.tsv");
    run_ok(Command::new(probe).args(["dump", "--services", &SERVICES.to_string(), "--out"]).arg(&dump))?;
    let pairs: Vec<(String, String)> = std::fs::read_to_string(&dump)?
        .lines()
        .filter_map(|l| l.split_once('\t').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let expect = pairs.len();
    ensure!(expect == 2 * SERVICES, "dump has {expect} pairs");
    let scripts = txn_scripts(&pairs)?;
    println!(
        "{SERVICES} Services + {SERVICES} EndpointSlices = {expect} keys; {} transactions of {BATCH}, {IN_FLIGHT} in flight",
        scripts.len()
    );
    let step = progress::step(format!("{RUNS} runs of etcdctl txn vs KSR initial sync"));
    let (mut base, mut mine) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        // Alternate which goes first so drift of the machine hits both alike.
        for which in if run % 2 == 0 { ["baseline", "ours"] } else { ["ours", "baseline"] } {
            wipe(&etcd.endpoint)?;
            if which == "baseline" {
                let t = baseline(&etcd.endpoint, &scripts)?;
                let n = count(&etcd.endpoint)?;
                ensure!(n == expect, "etcdctl wrote {n} keys, expected {expect}");
                base.push(ms(t));
                step.note(format!("run {run}: etcdctl txn {:.0} ms", ms(t)));
            } else {
                let s = ours(probe, &etcd.endpoint, expect)?;
                step.note(format!(
                    "run {run}: KSR sync {:.0} ms ({} /readyz+/metrics answers during it, slowest {:.1} ms)",
                    s.ms, s.http_polls, s.http_max_ms
                ));
                mine.push(s.ms);
            }
        }
    }
    step.finish();
    drop(etcd);
    Ok(serde_json::json!([metric("ksr_initial_sync_time", "ms", median(&base), median(&mine))]))
}
