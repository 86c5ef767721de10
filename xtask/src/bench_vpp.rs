//! `cargo xtask bench vpp`: the VPP side's two costs, each against its baseline in the same run.
//!
//! **Binary API** (against the same fake VPP process, `contiv-fake-vpp --full-table`, with a
//! 2,200-entry message table; rounds alternate ours / baseline):
//! - connect + handshake time: our client (`contiv-vpp-bench-probe`, release) vs vpp_papi
//!   2.4.2's `connect()` (PyPI, the virtualenv set-up made);
//! - 10,000 `ip_route_add_del` requests: ours pipelined (all in flight on one connection)
//!   vs vpp_papi's blocking calls, and vs vpp_papi_async (asyncio futures, pipelined too).
//!
//! **The XDP -> AF_XDP seam** (root): a veth pair in a throwaway namespace; 64-byte and
//! 1,500-byte frames blasted into one end by an AF_PACKET sender (sendmmsg, qdisc bypass,
//! CPU 0) and counted where they land on the other end: through the datapath's
//! `xdp_to_vswitch` into an AF_XDP socket served by the built-in vswitch (CPU 1), vs an
//! XDP_DROP program on the same veth (`contiv-seam-bench-probe`).
//!
//! Writes target/bench/vpp.json as `{"metric","unit","baseline","ours","ratio","better"}`.
//! Bars: route_add_rate ratio >= 5; afxdp_64b_pps ratio >= 0.3.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use contiv_tests::Netns;
use serde_json::{Value, json};

use crate::bench_net::{median, row, write_results};

const ROUNDS: usize = 3;
const CONNECTS: usize = 20;
const ROUTES: u32 = 10_000;
const SEAM_SECONDS: &str = "3";

fn run_json(cmd: &mut Command, stdin: Option<&Value>) -> Result<Value> {
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    if let Some(v) = stdin {
        use std::io::Write;
        child.stdin.take().context("stdin")?.write_all(v.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{cmd:?} printed no JSON"))
}

/// The fake VPP as a child process, stopped (by pid) on drop.
struct FakeVpp {
    child: Child,
}

impl FakeVpp {
    fn start(bin: &Path, socket: &Path) -> Result<Self> {
        let child = Command::new(bin)
            .arg("--socket")
            .arg(socket)
            .arg("--full-table")
            .arg("--nic")
            .arg("uplink0=52:54:00:00:00:01")
            .stdout(Stdio::null())
            .spawn()
            .context("starting contiv-fake-vpp")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("contiv-fake-vpp did not listen on {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child })
    }
}

impl Drop for FakeVpp {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

struct ApiResults {
    ours_connect_ms: Vec<f64>,
    papi_connect_ms: Vec<f64>,
    ours_rate: Vec<f64>,
    papi_rate: Vec<f64>,
    papi_async_rate: Vec<f64>,
    table_size: u64,
}

fn api_bench(bins: &Path) -> Result<ApiResults> {
    let root = crate::workspace_root();
    let python = root.join(crate::setup::PAPI_VENV).join("bin/python");
    let dir = std::env::temp_dir().join(contiv_tests::unique("contiv-bench-vpp-"));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("api.sock");
    let fake = FakeVpp::start(&bins.join("contiv-fake-vpp"), &socket)?;
    let mut r = ApiResults {
        ours_connect_ms: vec![],
        papi_connect_ms: vec![],
        ours_rate: vec![],
        papi_rate: vec![],
        papi_async_rate: vec![],
        table_size: 0,
    };
    for round in 0..ROUNDS {
        let ours = run_json(
            Command::new(bins.join("contiv-vpp-bench-probe"))
                .arg("--socket")
                .arg(&socket)
                .args(["--connects", &CONNECTS.to_string(), "--routes", &ROUTES.to_string()])
                .args(["--first-octet", &(10 + round).to_string()]),
            None,
        )?;
        let papi = run_json(
            Command::new(&python).arg(root.join("userspace/vpp-fake/papi/papi_bench.py")),
            Some(&json!({
                "socket": socket, "apidir": root.join("userspace/vpp-binapi/api"),
                "connects": CONNECTS, "routes": ROUTES, "first_octet": 100 + round,
            })),
        )?;
        let nums = |v: &Value| -> Vec<f64> { v.as_array().into_iter().flatten().filter_map(Value::as_f64).collect() };
        r.table_size = ours["table_size"].as_u64().unwrap_or(0);
        r.ours_connect_ms.extend(nums(&ours["connect_ms"]));
        r.papi_connect_ms.extend(nums(&papi["connect_ms"]));
        r.ours_rate.push(ours["route_add_rate"].as_f64().context("route_add_rate")?);
        r.papi_rate.push(papi["route_add_rate"].as_f64().context("papi route_add_rate")?);
        if let Some(a) = papi["route_add_rate_async"].as_f64() {
            r.papi_async_rate.push(a);
        } else {
            println!("  vpp_papi_async did not run: {}", papi["async_error"]);
        }
        println!(
            "  round {}: connect ours {:.2} ms / papi {:.2} ms; route adds ours {:.0}/s, papi {:.0}/s, papi async {}/s",
            round + 1,
            median(&nums(&ours["connect_ms"])),
            median(&nums(&papi["connect_ms"])),
            r.ours_rate[round],
            r.papi_rate[round],
            papi["route_add_rate_async"].as_f64().map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into()),
        );
    }
    drop(fake);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(r)
}

#[derive(Default)]
struct SeamResults {
    afxdp: [Vec<Value>; 2],
    drop: [Vec<Value>; 2],
}

const SIZES: [usize; 2] = [64, 1500];

fn seam_bench(bins: &Path, object: &Path) -> Result<SeamResults> {
    let ns = Netns::new("cbv");
    ns.ip(&["link", "add", "gen0", "type", "veth", "peer", "name", "cslow1"]);
    contiv_tests::run(ns.cmd("sysctl").args(["-qw", "net.ipv6.conf.all.disable_ipv6=1"]));
    ns.ip(&["link", "set", "gen0", "up"]);
    ns.ip(&["link", "set", "cslow1", "up"]);
    let probe = bins.join("contiv-seam-bench-probe");
    let mut r = SeamResults::default();
    for round in 1..=ROUNDS {
        for (i, size) in SIZES.iter().enumerate() {
            for mode in ["afxdp", "xdp-drop"] {
                let v = run_json(
                    ns.cmd(probe.to_str().context("probe path")?)
                        .args(["--object", object.to_str().context("object path")?])
                        .args(["--mode", mode, "--frame-size", &size.to_string(), "--seconds", SEAM_SECONDS]),
                    None,
                )?;
                println!(
                    "  round {round} {size:>4} B {mode:<8} delivered {:>8.1} kpps {:>6.2} Gbit/s (sender {:.1} kpps){}",
                    v["pps"].as_f64().unwrap_or(0.0) / 1e3,
                    v["gbps"].as_f64().unwrap_or(0.0),
                    v["sent"].as_f64().unwrap_or(0.0) / v["seconds"].as_f64().unwrap_or(1.0) / 1e3,
                    if mode == "afxdp" {
                        format!(
                            "; fill ring empty {}, rx ring full {}",
                            v["port"]["kernel_rx_fill_ring_empty"], v["port"]["kernel_rx_ring_full"]
                        )
                    } else {
                        String::new()
                    }
                );
                if mode == "afxdp" { r.afxdp[i].push(v) } else { r.drop[i].push(v) }
            }
        }
    }
    Ok(r)
}

fn field(v: &[Value], name: &str) -> Vec<f64> {
    v.iter().filter_map(|x| x[name].as_f64()).collect()
}

pub fn run() -> Result<()> {
    let root = crate::workspace_root();
    crate::check(crate::cargo().args([
        "build",
        "--release",
        "-p",
        "contiv-vpp-fake",
        "--bins",
        "-p",
        "contiv-vswitch",
        "--bin",
        "contiv-seam-bench-probe",
    ]))?;
    let bins = root.join("target/release");
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;

    println!("VPP binary API: {ROUNDS} rounds against contiv-fake-vpp (full message table)");
    let api = api_bench(&bins)?;
    let seam = if is_root {
        let object = crate::build_ebpf()?;
        println!("XDP -> AF_XDP seam: {ROUNDS} rounds x {SEAM_SECONDS} s per size and mode (veth, copy mode)");
        Some(seam_bench(&bins, &object)?)
    } else {
        println!("XDP -> AF_XDP seam: skipped (needs root: network namespaces and XDP)");
        None
    };

    let mut results = vec![
        row(
            &format!("vpp_api_connect_handshake_{}_entries", api.table_size),
            "ms",
            median(&api.papi_connect_ms),
            median(&api.ours_connect_ms),
            "lower",
        ),
        row(
            "ip_route_add_rate_10k_pipelined_vs_papi",
            "req/s",
            median(&api.papi_rate),
            median(&api.ours_rate),
            "higher",
        ),
    ];
    if !api.papi_async_rate.is_empty() {
        results.push(row(
            "ip_route_add_rate_10k_pipelined_vs_papi_async",
            "req/s",
            median(&api.papi_async_rate),
            median(&api.ours_rate),
            "higher",
        ));
    }
    if let Some(s) = &seam {
        results.push(row(
            "afxdp_64b_pps",
            "kpps",
            median(&field(&s.drop[0], "pps")) / 1e3,
            median(&field(&s.afxdp[0], "pps")) / 1e3,
            "higher",
        ));
        results.push(row(
            "afxdp_1500b_throughput",
            "Gbit/s",
            median(&field(&s.drop[1], "gbps")),
            median(&field(&s.afxdp[1], "gbps")),
            "higher",
        ));
        results.push(row(
            "afxdp_1500b_pps",
            "kpps",
            median(&field(&s.drop[1], "pps")) / 1e3,
            median(&field(&s.afxdp[1], "pps")) / 1e3,
            "higher",
        ));
    }
    write_results("vpp", &results)?;
    let ratio = |m: &str| results.iter().find(|r| r["metric"] == m).and_then(|r| r["ratio"].as_f64());
    if let Some(x) = ratio("ip_route_add_rate_10k_pipelined_vs_papi") {
        println!("\nbar: route_add_rate ratio {x:.2} >= 5: {}", if x >= 5.0 { "met" } else { "NOT met" });
    }
    if let Some(x) = ratio("afxdp_64b_pps") {
        println!("bar: afxdp_64b_pps ratio {x:.2} >= 0.3: {}", if x >= 0.3 { "met" } else { "NOT met" });
    }
    Ok(())
}
