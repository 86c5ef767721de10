//! `cargo xtask bench cni`: pod start-up cost. One node (namespace) with the agent (release
//! build); pods are created by `contiv-cni` and, in the same run and the same node namespace,
//! by Debian's reference plugins `ptp` + `host-local` (containernetworking-plugins,
//! /usr/lib/cni; host-local keeps its allocations in its own temporary `dataDir`).
//!
//! - sequential: `PODS` pods each, ADDs alternating contiv / reference (the order swapped every
//!   pod so machine drift hits both alike), then DELs alternating the same way; p50/p95 of the
//!   wall time of each plugin process, spawn to exit, as a runtime sees it;
//! - concurrent: `CONCURRENT` ADDs started at once (one thread each), wall time until the
//!   last one exits, then the same number of DELs; median over `CONCURRENT_ROUNDS` rounds,
//!   alternating which plugin goes first.
//!
//! The reference plugin runs in the node namespace the way a runtime on that node would run
//! it: the child enters the namespace (setns) just before exec, so neither side pays for an
//! extra `ip netns exec` process. Each side gets a few unmeasured warm-up pods first.
//!
//! Writes target/bench/cni.json as `{"metric","unit","baseline","ours","ratio","better"}` and
//! prints a table; with the agent's phase timing (`contiv_agent::timing=debug`, see the agent
//! README) it also prints where the agent's ADD time goes, phase by phase.
//! Bar: `cni_add_p50` ratio <= 1.5.

use std::{
    collections::BTreeMap,
    io::Write,
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use contiv_tests::{Netns, Node, NodeOptions};
use serde_json::json;

use crate::bench_net::{median, ms, percentile, row, write_results};

/// Pods per side in the sequential part (the set-up).
const PODS: usize = 50;
/// Unmeasured ADD/DEL pairs per side before the measured ones.
const WARMUP: usize = 3;
/// ADDs started at once in the concurrent part.
const CONCURRENT: usize = 100;
const CONCURRENT_ROUNDS: usize = 3;
/// The bar: contiv ADD p50 / reference ADD p50.
const MAX_ADD_RATIO: f64 = 1.5;

/// One of the two plugins under test.
#[derive(Clone)]
enum Plugin {
    /// `contiv-cni` talking to the node's agent.
    Contiv { bin: PathBuf, conf: String },
    /// Debian's `ptp` with `host-local` IPAM, run inside the node namespace.
    Reference { node_ns: PathBuf, conf: String },
}

impl Plugin {
    fn label(&self) -> &'static str {
        match self {
            Self::Contiv { .. } => "contiv-cni",
            Self::Reference { .. } => "ptp+host-local",
        }
    }

    /// Runs one CNI command for `(id, eth0)` in `netns`; returns the wall time, spawn to exit.
    fn invoke(&self, command: &str, id: &str, netns: &Path) -> Result<Duration> {
        let (mut cmd, conf, ns_file) = match self {
            Self::Contiv { bin, conf } => (Command::new(bin), conf, None),
            Self::Reference { node_ns, conf } => {
                let file = std::fs::File::open(node_ns).with_context(|| format!("opening {}", node_ns.display()))?;
                (Command::new("/usr/lib/cni/ptp"), conf, Some(file))
            }
        };
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(file) = &ns_file {
            let fd = file.as_raw_fd();
            // SAFETY: only async-signal-safe setns(2) between fork and exec; the fd stays
            // open in the parent until the child has been spawned.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let start = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("spawning {}", self.label()))?;
        let _ = child.stdin.take().context("stdin")?.write_all(conf.as_bytes());
        let out = child.wait_with_output()?;
        let elapsed = start.elapsed();
        drop(ns_file);
        if !out.status.success() {
            bail!(
                "{} {command} {id} failed ({}): {} {}",
                self.label(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(elapsed)
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// ADD/DEL wall times of one side in the sequential part.
#[derive(Default)]
struct Sequential {
    add: Vec<f64>,
    del: Vec<f64>,
}

/// The sequential part: `PODS` pods per side, alternating, then their DELs alternating.
fn sequential(plugins: [&Plugin; 2], out: [&mut Sequential; 2]) -> Result<()> {
    let [ours, base] = out;
    for (i, p) in plugins.iter().enumerate() {
        for w in 0..WARMUP {
            let ns = Netns::new("cbw");
            let id = format!("warm{i}x{w}");
            p.invoke("ADD", &id, &ns.path())?;
            p.invoke("DEL", &id, &ns.path())?;
        }
    }
    let mut pods: Vec<[(Netns, String); 2]> = Vec::with_capacity(PODS);
    for n in 0..PODS {
        let slots = [(Netns::new("cbp"), contiv_tests::unique("cb")), (Netns::new("cbp"), contiv_tests::unique("cb"))];
        // Even pods: contiv first; odd pods: reference first.
        let order: [usize; 2] = if n % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let t = plugins[k].invoke("ADD", &slots[k].1, &slots[k].0.path())?;
            if k == 0 { &mut ours.add } else { &mut base.add }.push(ms(t));
        }
        pods.push(slots);
    }
    for (n, slots) in pods.iter().enumerate() {
        let order: [usize; 2] = if n % 2 == 0 { [1, 0] } else { [0, 1] };
        for k in order {
            let t = plugins[k].invoke("DEL", &slots[k].1, &slots[k].0.path())?;
            if k == 0 { &mut ours.del } else { &mut base.del }.push(ms(t));
        }
    }
    Ok(())
}

/// Runs `command` for every pod at once (one thread each); returns the wall time until the
/// last plugin process exited.
fn all_at_once(plugin: &Plugin, command: &'static str, pods: &[(Netns, String)]) -> Result<Duration> {
    let barrier = Arc::new(Barrier::new(pods.len() + 1));
    let handles: Vec<_> = pods
        .iter()
        .map(|(ns, id)| {
            let (plugin, barrier, path, id) = (plugin.clone(), barrier.clone(), ns.path(), id.clone());
            std::thread::spawn(move || {
                barrier.wait();
                plugin.invoke(command, &id, &path)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut failures = vec![];
    for h in handles {
        if let Err(e) = h.join().map_err(|_| anyhow::anyhow!("thread panicked"))? {
            failures.push(e.to_string());
        }
    }
    let elapsed = start.elapsed();
    ensure!(failures.is_empty(), "{} of {} concurrent {command}s failed: {}", failures.len(), pods.len(), failures[0]);
    Ok(elapsed)
}

/// One concurrent round for one side: (ADD total, DEL total) in ms.
fn concurrent_round(plugin: &Plugin) -> Result<(f64, f64)> {
    let pods: Vec<(Netns, String)> = (0..CONCURRENT).map(|_| (Netns::new("cbc"), contiv_tests::unique("cc"))).collect();
    let add = all_at_once(plugin, "ADD", &pods)?;
    let del = all_at_once(plugin, "DEL", &pods)?;
    Ok((ms(add), ms(del)))
}

/// The agent's phase lines (`contiv_agent::timing`) of one operation (`ADD`, `DEL`): phase ->
/// durations in ms. A line reads `... ADD <id>/<if> total=8.123ms lock=0.010ms ...`.
fn agent_phases(log: &str, op: &str) -> BTreeMap<String, Vec<f64>> {
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let marker = format!("contiv_agent::timing: {op} ");
    for line in log.lines().filter(|l| l.contains(&marker)) {
        for field in line.split_whitespace() {
            if let Some((name, value)) = field.split_once('=')
                && let Some(v) = value.strip_suffix("ms").and_then(|v| v.parse::<f64>().ok())
            {
                phases.entry(name.to_owned()).or_default().push(v);
            }
        }
    }
    phases
}

pub fn run(bins: &Path) -> Result<()> {
    // SAFETY: set before any thread starts. The agent inherits the log setting and logs one
    // timing line per ADD.
    unsafe {
        std::env::set_var("CONTIV_BIN_DIR", bins);
        std::env::set_var("RUST_LOG", "info,contiv_agent::timing=debug");
    }
    for p in ["/usr/lib/cni/ptp", "/usr/lib/cni/host-local"] {
        ensure!(Path::new(p).exists(), "{p} missing: `cargo xtask setup` installs containernetworking-plugins");
    }
    println!(
        "cni benchmark: {PODS} pods per plugin alternating, then {CONCURRENT} concurrent ADDs x {CONCURRENT_ROUNDS} rounds"
    );
    let node = Node::start(NodeOptions { pod_subnet: Some("10.1.0.0/23".into()), ..NodeOptions::default() });
    let host_local_dir = tempdir("contiv-bench-host-local-")?;
    let ours = Plugin::Contiv { bin: contiv_tests::bin("contiv-cni"), conf: node.net_conf("1.0.0") };
    let base = Plugin::Reference {
        node_ns: node.ns.path(),
        conf: json!({"cniVersion": "1.0.0", "name": "cni-bench-ref", "type": "ptp",
            "ipam": {"type": "host-local", "subnet": "10.77.0.0/23", "dataDir": host_local_dir.0}})
        .to_string(),
    };
    let (mut o, mut b) = (Sequential::default(), Sequential::default());
    sequential([&ours, &base], [&mut o, &mut b])?;
    let log = node.agent_log();
    let phases_sequential = [("ADD", agent_phases(&log, "ADD")), ("DEL", agent_phases(&log, "DEL"))];

    let (mut o_cadd, mut o_cdel, mut b_cadd, mut b_cdel) = (vec![], vec![], vec![], vec![]);
    for round in 0..CONCURRENT_ROUNDS {
        let order: [&Plugin; 2] = if round % 2 == 0 { [&ours, &base] } else { [&base, &ours] };
        for p in order {
            let (add, del) = concurrent_round(p)?;
            println!(
                "  concurrent round {}: {:<15} {CONCURRENT} ADDs {add:8.1} ms, DELs {del:8.1} ms",
                round + 1,
                p.label()
            );
            let (a, d) = if matches!(p, Plugin::Contiv { .. }) {
                (&mut o_cadd, &mut o_cdel)
            } else {
                (&mut b_cadd, &mut b_cdel)
            };
            a.push(add);
            d.push(del);
        }
    }
    ensure!(node.pod_links().is_empty(), "pod interfaces left behind: {:?}", node.pod_links());

    let (oa, od, ba, bd) = (sorted(o.add), sorted(o.del), sorted(b.add), sorted(b.del));
    let ms_row = |metric: &str, base: f64, ours: f64| row(metric, "ms", base, ours, "lower");
    let results = vec![
        ms_row("cni_add_p50", percentile(&ba, 0.5), percentile(&oa, 0.5)),
        ms_row("cni_add_p95", percentile(&ba, 0.95), percentile(&oa, 0.95)),
        ms_row("cni_del_p50", percentile(&bd, 0.5), percentile(&od, 0.5)),
        ms_row("cni_del_p95", percentile(&bd, 0.95), percentile(&od, 0.95)),
        ms_row(&format!("cni_add_concurrent_{CONCURRENT}_total"), median(&b_cadd), median(&o_cadd)),
        ms_row(&format!("cni_del_concurrent_{CONCURRENT}_total"), median(&b_cdel), median(&o_cdel)),
    ];
    for (op, phases) in phases_sequential.into_iter().filter(|(_, p)| !p.is_empty()) {
        println!("\nagent {op} phases over the {PODS} sequential contiv {op}s (+{WARMUP} warm-up), ms:");
        println!("  {:<44} {:>8} {:>8}", "phase", "p50", "p95");
        let mut rows: Vec<(String, Vec<f64>)> = phases.into_iter().map(|(k, v)| (k, sorted(v))).collect();
        rows.sort_by(|a, b| percentile(&b.1, 0.5).total_cmp(&percentile(&a.1, 0.5)));
        for (name, v) in rows {
            println!("  {name:<44} {:>8.3} {:>8.3}", percentile(&v, 0.5), percentile(&v, 0.95));
        }
    }
    println!("\nbaseline = ptp + host-local (Debian containernetworking-plugins), same node, same run");
    write_results("cni", &results)?;
    let ratio = results[0]["ratio"].as_f64().unwrap_or(f64::MAX);
    println!(
        "\nbar: cni_add_p50 ratio {ratio:.3} <= {MAX_ADD_RATIO}: {}",
        if ratio <= MAX_ADD_RATIO { "met" } else { "NOT met" }
    );
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

fn tempdir(prefix: &str) -> Result<TempDir> {
    let dir = std::env::temp_dir().join(contiv_tests::unique(prefix));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(TempDir(dir))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
