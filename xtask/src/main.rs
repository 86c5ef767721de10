//! Project tasks. `cargo xtask <task>`; every task that builds runs `setup` first, so a
//! fresh machine needs nothing else.

mod bench_cni;
mod bench_datapath;
mod bench_ksr;
mod bench_net;
mod bench_overlay;
mod bench_policy;
mod bench_services;
mod bench_store;
mod bench_vpp;
mod cluster;
mod demo;
mod fresh_check;
mod images;
mod packages;
mod previous;
mod progress;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "contiv project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages, the pinned eBPF toolchain, bpf-linker.
    Setup,
    /// Build the eBPF object (ebpf/contiv-ebpf) with the pinned nightly and bpf-linker.
    BuildEbpf,
    /// The main job: a node with the agent, pods created through the CNI, talking, counters shown.
    Demo,
    /// rustfmt --check and clippy -D warnings on the workspace and on the eBPF crate.
    Lint,
    /// Every test (needs root: namespaces and BPF).
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// OCI images (buildah, from scratch) for the agent, KSR, STN and etcd, tagged with the
    /// crate version; each image's entrypoint runs once.
    Images,
    /// The cluster in a box: `up --nodes N`, `pod add|del`, `exec`, `status`, `agent`, `down`.
    Cluster {
        /// The box's state directory.
        #[arg(long, global = true)]
        dir: Option<PathBuf>,
        #[command(subcommand)]
        cmd: cluster::ClusterCmd,
    },
    /// Proves set-up on a fresh minimal Debian 12 root (mmdebstrap): setup, build, a test
    /// subset (`--full`: .ci/run and the demo). Needs root; not part of CI.
    FreshCheck {
        #[arg(long)]
        full: bool,
    },
    /// Benchmarks against their baselines: `datapath`, `overlay`, `cni`, `store`, `ksr`, `vpp`,
    /// `policy` or `services`.
    Bench {
        #[arg(value_parser = ["datapath", "overlay", "cni", "store", "ksr", "vpp", "policy", "services"])]
        which: String,
        /// datapath and overlay: run the agents with `podRps = true` (results in
        /// datapath-pod-rps.json, overlay-pod-rps.json).
        #[arg(long)]
        pod_rps: bool,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` when set, else the workspace's `target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn check(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (network namespaces, BPF): run it as root or with sudo -E");
    }
    Ok(())
}

/// Builds the eBPF object. The agent's build script does the same when it builds; this
/// task exists to build (and check) the kernel side on its own.
fn build_ebpf() -> Result<PathBuf> {
    check(ebpf_cargo().args(["build", "--release"]))?;
    let obj = workspace_root().join("ebpf/contiv-ebpf/target/bpfel-unknown-none/release/contiv-ebpf");
    println!("eBPF object: {}", obj.display());
    Ok(obj)
}

/// A cargo command for the eBPF crate: its own workspace and pinned toolchain, so the
/// variables the outer cargo set must not leak into it.
fn ebpf_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root().join("ebpf/contiv-ebpf"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO") || k.starts_with("RUSTC") || k == "RUSTUP_TOOLCHAIN" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// `cargo fmt --check` and `cargo clippy -D warnings` on both workspaces; reports every
/// failure before failing.
fn lint() -> Result<()> {
    let steps: Vec<(&str, Command)> = vec![
        ("rustfmt (workspace)", {
            let mut c = cargo();
            c.args(["fmt", "--all", "--check"]);
            c
        }),
        ("clippy (workspace)", {
            let mut c = cargo();
            c.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
            c
        }),
        ("rustfmt (eBPF crate)", {
            let mut c = ebpf_cargo();
            c.args(["fmt", "--check"]);
            c
        }),
        ("clippy (eBPF crate)", {
            let mut c = ebpf_cargo();
            c.args(["clippy", "--release", "--", "-D", "warnings"]);
            c
        }),
    ];
    let mut failed = vec![];
    for (name, mut cmd) in steps {
        eprintln!("lint: {name}");
        if !cmd.status().with_context(|| format!("running {name}"))?.success() {
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Builds the binaries the tests, demo and benchmarks run.
pub fn build_bins(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let step = crate::progress::step(format!("building the binaries ({})", if release { "release" } else { "debug" }));
    check(&mut cmd)?;
    step.finish();
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// Builds the binaries together with every test target, so that they share one feature set.
/// The tests' dev-dependencies turn features on (the store's `test-support`, more of nix and
/// aya); a bins-only build without them compiled about 40 crates (ours, kube, etcd-client,
/// aya) a second time when `cargo test --workspace` came, doubling what CI writes to disk.
/// After this, `cargo test --workspace` only runs. Our `test-support` features only add
/// modules (fakes and helpers for tests); the dependencies' extra features add API.
fn build_bins_and_tests() -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--bins", "--tests"]);
    let step = crate::progress::step("building the binaries and tests (debug)");
    check(&mut cmd)?;
    step.finish();
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => {
            setup::run()?;
            build_ebpf().map(|_| ())
        }
        Task::Demo => {
            setup::run()?;
            require_root("the demo")?;
            let bins = build_bins(false)?;
            demo::run(&bins)
        }
        Task::Cluster { dir, cmd } => {
            require_root("the cluster in a box")?;
            if matches!(cmd, cluster::ClusterCmd::Up { .. }) {
                setup::run()?;
                let bins = build_bins(false)?;
                // SAFETY: set before any thread is started.
                unsafe { std::env::set_var("CONTIV_BIN_DIR", bins) };
            } else if std::env::var_os("CONTIV_BIN_DIR").is_none() {
                // SAFETY: as above.
                unsafe { std::env::set_var("CONTIV_BIN_DIR", workspace_root().join("target/debug")) };
            }
            cluster::run(dir, cmd)
        }
        Task::FreshCheck { full } => {
            require_root("the fresh-machine check")?;
            fresh_check::run(full)
        }
        Task::Lint => {
            setup::run()?;
            lint()
        }
        Task::Test { args } => {
            setup::run()?;
            require_root("the test suite")?;
            // The upgrade test starts from the previous release's agent.
            let previous = previous::agent()?;
            // SAFETY: set before any thread is started.
            unsafe { std::env::set_var("CONTIV_PREVIOUS_AGENT", previous) };
            // Tests that load the object directly (the vswitch's) find it where this builds it.
            build_ebpf()?;
            // Run every test binary even if one fails, so one run shows every failure.
            // Set-up made the vpp_papi virtualenv: tests needing it must not skip here.
            // `-p <crate>` narrows the run; otherwise the whole workspace.
            let narrowed = args.iter().any(|a| a == "-p" || a == "--package" || a.starts_with("--package="));
            if narrowed {
                build_bins(false)?;
            } else {
                build_bins_and_tests()?;
            }
            let mut cmd = cargo();
            cmd.args(["test", "--no-fail-fast"]);
            if !narrowed {
                cmd.arg("--workspace");
            }
            check(cmd.args(&args).env("CONTIV_REQUIRE_PAPI", "1"))
        }
        Task::Images => {
            setup::run()?;
            require_root("building images with buildah")?;
            images::run()
        }
        Task::Bench { which, pod_rps } => {
            setup::run()?;
            if pod_rps && which != "datapath" && which != "overlay" {
                bail!("--pod-rps applies to the datapath and overlay benchmarks only");
            }
            match which.as_str() {
                "datapath" => {
                    require_root("the datapath benchmark")?;
                    let bins = build_bins(true)?;
                    bench_datapath::run(&bins, pod_rps)
                }
                "overlay" => {
                    require_root("the overlay benchmark")?;
                    let bins = build_bins(true)?;
                    bench_overlay::run(&bins, pod_rps)
                }
                "vpp" => bench_vpp::run(),
                "cni" => {
                    require_root("the CNI benchmark")?;
                    let bins = build_bins(true)?;
                    bench_cni::run(&bins)
                }
                "ksr" => bench_ksr::run(),
                "policy" => {
                    require_root("the policy benchmark")?;
                    let bins = build_bins(true)?;
                    bench_policy::run(&bins)
                }
                "services" => {
                    require_root("the services benchmark")?;
                    let bins = build_bins(true)?;
                    bench_services::run(&bins)
                }
                _ => bench_store::run(),
            }
        }
    }
}
