//! `cargo xtask setup`: installs what is missing, quietly when everything is present.
//! Debian packages, the pinned nightly (with rust-src) for the eBPF crate, bpf-linker
//! built against Debian's LLVM 22 (the LLVM that nightly ships).

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Debian packages the build, the tests, the demo and the benchmarks need.
pub const PACKAGES: &[&str] = &[
    // eBPF toolchain: bpf-linker links against LLVM 22; libxdp-sys (xsk-rs) builds with clang.
    "clang", "llvm", "clang-22", "llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "libelf-dev",
    "zlib1g-dev", "m4", "pkg-config", "gcc-multilib",
    // gRPC code generation.
    "protobuf-compiler",
    // Runtime tools: namespaces, inspection, traffic, the store, chained CNI plugins.
    "bpftool", "iproute2", "util-linux", "ethtool", "iputils-ping", "iperf3", "sockperf",
    "etcd-server", "etcd-client", "containernetworking-plugins",
];

/// Pinned nightly for the eBPF crate (its rust-toolchain.toml says the same).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-08-01";
pub const BPF_LINKER_VERSION: &str = "0.13.0";

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", p]).output();
            !matches!(out, Ok(o) if o.status.success() && o.stdout == b"installed")
        })
        .collect()
}

fn as_root(args: &[&str]) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new(args[0]);
        c.args(&args[1..]);
        c
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").args(args);
        c
    }
}

pub fn run() -> Result<()> {
    let missing = missing_packages();
    if !missing.is_empty() {
        eprintln!("setup: installing Debian packages: {}", missing.join(" "));
        let ok = as_root(&["apt-get", "update", "-qq"]).status()?.success();
        if !ok {
            bail!("apt-get update failed");
        }
        let mut args = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
        args.extend(missing.iter().copied());
        let status = as_root(&args).env("DEBIAN_FRONTEND", "noninteractive").status()?;
        if !status.success() {
            bail!("apt-get install failed");
        }
    }

    let has_toolchain = Command::new("rustup")
        .args(["+".to_owned() + EBPF_TOOLCHAIN, "component".into(), "list".into(), "--installed".into()])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"));
    if !has_toolchain {
        eprintln!("setup: installing Rust {EBPF_TOOLCHAIN} with rust-src (eBPF programs)");
        let status = Command::new("rustup")
            .args(["toolchain", "install", EBPF_TOOLCHAIN, "--profile", "minimal", "-c", "rust-src"])
            .status()
            .context("running rustup")?;
        if !status.success() {
            bail!("rustup toolchain install {EBPF_TOOLCHAIN} failed");
        }
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !linker_ok {
        eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
        let status = Command::new("cargo")
            .args([
                "install", "bpf-linker", "--version", BPF_LINKER_VERSION,
                "--no-default-features", "--features", "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env_remove("RUSTUP_TOOLCHAIN")
            .status()
            .context("running cargo install bpf-linker")?;
        if !status.success() {
            bail!("installing bpf-linker failed");
        }
    }
    if !quiet(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker is not on PATH (is ~/.cargo/bin in PATH?)");
    }
    Ok(())
}
