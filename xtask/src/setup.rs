//! `cargo xtask setup`: installs what is missing, quietly when everything is present.
//! Debian packages, the pinned nightly (with rust-src) for the eBPF crate, bpf-linker
//! built against Debian's LLVM 22 (the LLVM that nightly ships).
//!
//! Every package is listed with the files that show it is really there. A package that
//! dpkg calls installed but whose file is missing is installed again, and a file still
//! missing after the install stops set-up with the package that should have provided it,
//! so the next missing piece fails here with a clear message instead of deep in a build
//! script. Only Debian 12 (bookworm) packages are used: CI runs on bookworm
//! (`cargo xtask fresh-check` proves the list on a fresh bookworm root).

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// A Debian package the build, the tests, the demo or the benchmarks need, and the files
/// it stands in for (any one path of an entry's alternatives, `a|b`, is enough).
pub struct Requirement {
    pub package: &'static str,
    pub files: &'static [&'static str],
    pub why: &'static str,
}

const fn req(package: &'static str, files: &'static [&'static str], why: &'static str) -> Requirement {
    Requirement { package, files, why }
}

/// Debian packages and what they must provide.
pub const REQUIREMENTS: &[Requirement] = &[
    // eBPF toolchain: bpf-linker links against LLVM 22; libxdp-sys (xsk-rs) builds libbpf/libxdp with clang.
    req("clang", &["/usr/bin/clang"], "libxdp-sys builds libxdp's BPF objects with clang"),
    req("llvm", &["/usr/bin/llvm-strip"], "libxdp-sys strips its BPF objects"),
    req("clang-22", &["/usr/bin/clang-22"], "the clang matching LLVM 22"),
    req(
        "llvm-22-dev",
        &["/usr/lib/llvm-22/bin/llvm-config", "/usr/lib/llvm-22/lib/libLLVM.so"],
        "bpf-linker links LLVM 22",
    ),
    req("libpolly-22-dev", &["/usr/lib/llvm-22/lib/libPolly.a"], "LLVM 22's cmake files reference Polly"),
    req("libzstd-dev", &["/usr/include/zstd.h"], "LLVM 22 links zstd"),
    req("libelf-dev", &["/usr/include/libelf.h", "/usr/include/gelf.h"], "libbpf (built by libxdp-sys)"),
    req("zlib1g-dev", &["/usr/include/zlib.h"], "libbpf and LLVM link zlib"),
    req("m4", &["/usr/bin/m4"], "libxdp's configure"),
    req("pkg-config", &["/usr/bin/pkg-config"], "libxdp's configure finds libelf/zlib"),
    req("gcc-multilib", &["/usr/include/asm"], "asm/ headers for BPF C objects (libxdp)"),
    req("make", &["/usr/bin/make"], "libxdp-sys runs make"),
    // gRPC code generation: protoc, and the well-known .proto files etcd-client imports
    // (on bookworm protobuf-compiler does not pull them in).
    req("protobuf-compiler", &["/usr/bin/protoc"], "tonic/prost code generation"),
    req(
        "libprotobuf-dev",
        &["/usr/include/google/protobuf/descriptor.proto", "/usr/include/google/protobuf/struct.proto"],
        "etcd-client's protos import google/protobuf/*.proto",
    ),
    // Runtime tools: namespaces, inspection, traffic, the store, chained CNI plugins.
    req("bpftool", &["/usr/sbin/bpftool"], "map dumps in tests and the demo"),
    req(
        "iproute2",
        &["/usr/sbin/ip|/usr/bin/ip|/sbin/ip|/bin/ip", "/usr/sbin/tc|/sbin/tc"],
        "namespaces, veths, qdiscs",
    ),
    req(
        "util-linux",
        &["/usr/bin/nsenter", "/usr/bin/setpriv"],
        "agents run under nsenter --net; setpriv runs contiv-cni as a non-root user in tests",
    ),
    req("nftables", &["/usr/sbin/nft"], "the agent masquerades pod traffic leaving the cluster"),
    req("tcpdump", &["/usr/bin/tcpdump"], "tests check what crosses the fabric"),
    req("procps", &["/usr/sbin/sysctl|/sbin/sysctl"], "sysctl in node namespaces"),
    req("ethtool", &["/usr/sbin/ethtool|/sbin/ethtool"], "offload settings"),
    req("iputils-ping", &["/usr/bin/ping|/bin/ping"], "ping between pods"),
    req("iperf3", &["/usr/bin/iperf3"], "throughput in tests and benchmarks"),
    req("sockperf", &["/usr/bin/sockperf"], "latency benchmarks"),
    req("etcd-server", &["/usr/bin/etcd"], "the cluster store in tests and benchmarks"),
    req("etcd-client", &["/usr/bin/etcdctl"], "store benchmark baseline and tests"),
    req(
        "containernetworking-plugins",
        &["/usr/lib/cni/ptp", "/usr/lib/cni/host-local", "/usr/lib/cni/bandwidth", "/usr/lib/cni/tuning"],
        "chaining tests and the CNI benchmark's reference plugins",
    ),
    req(
        "ca-certificates",
        &["/etc/ssl/certs/ca-certificates.crt"],
        "cargo and rustup downloads; the images' CA bundle",
    ),
    // Images and deploy checks.
    req("buildah", &["/usr/bin/buildah"], "cargo xtask images: OCI images without a Docker daemon"),
    req("libc6-dev", &["/usr/lib/x86_64-linux-gnu/libc.a"], "the static contiv-cni the agent image installs on hosts"),
    req("binutils", &["/usr/bin/strip"], "cargo xtask images strips debug info from binaries"),
    req("openssl", &["/usr/bin/openssl"], "deploy/tls/gen-certs.sh and its test"),
    // The real VPP Python client (vpp-papi, from PyPI) checks the fake VPP and is the VPP
    // benchmark's baseline; it lives in a virtualenv under target/.
    req("python3", &["/usr/bin/python3"], "runs vpp_papi in the VPP tests and benchmark"),
    req(
        "python3-venv",
        &["/usr/lib/python3.11/ensurepip/__init__.py"],
        "python3 -m venv (with pip) for the vpp_papi virtualenv",
    ),
];

/// vpp_papi, VPP's own Python client, pinned; ply is its parser dependency.
pub const PAPI_PACKAGES: &[&str] = &["vpp-papi==2.4.2", "ply==3.11"];
/// The virtualenv holding it, under the workspace's target directory.
pub const PAPI_VENV: &str = "target/vpp-papi-venv";

/// Pinned nightly for the eBPF crate (its rust-toolchain.toml says the same).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-08-01";
pub const BPF_LINKER_VERSION: &str = "0.13.0";

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn file_present(spec: &str) -> bool {
    spec.split('|').any(|p| Path::new(p).exists())
}

fn dpkg_installed(package: &str) -> bool {
    let out = Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", package]).output();
    matches!(out, Ok(o) if o.status.success() && o.stdout == b"installed")
}

/// Packages that are not installed, or whose files are missing.
fn missing_packages(reqs: &[Requirement]) -> Vec<&'static str> {
    reqs.iter()
        .filter(|r| !dpkg_installed(r.package) || !r.files.iter().all(|f| file_present(f)))
        .map(|r| r.package)
        .collect()
}

pub fn as_root(args: &[&str]) -> Command {
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

/// Installs (or reinstalls) what `reqs` lists and is missing, then checks every file.
pub fn install_packages(reqs: &[Requirement]) -> Result<()> {
    let missing = missing_packages(reqs);
    if !missing.is_empty() {
        eprintln!("setup: installing Debian packages: {}", missing.join(" "));
        let ok = as_root(&["apt-get", "update", "-qq"]).status().context("running apt-get")?.success();
        if !ok {
            bail!("apt-get update failed");
        }
        // --reinstall also repairs a package dpkg lists whose files were removed.
        let mut args = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends", "--reinstall"];
        args.extend(missing.iter().copied());
        let status = as_root(&args).env("DEBIAN_FRONTEND", "noninteractive").status()?;
        if !status.success() {
            bail!("apt-get install {} failed", missing.join(" "));
        }
    }
    let mut problems = vec![];
    for r in reqs {
        for f in r.files.iter().filter(|f| !file_present(f)) {
            problems
                .push(format!("  {f} is missing: Debian package {} should have provided it ({})", r.package, r.why));
        }
    }
    if !problems.is_empty() {
        bail!("set-up is incomplete after installing packages:\n{}", problems.join("\n"));
    }
    Ok(())
}

/// Installs the toolchain (if pinned) and the components it lacks.
fn ensure_components(toolchain: Option<&str>, components: &[&str]) -> Result<()> {
    let mut list = Command::new("rustup");
    if let Some(t) = toolchain {
        list.arg(format!("+{t}"));
    }
    let installed = list
        .args(["component", "list", "--installed"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let missing: Vec<&str> = components
        .iter()
        .copied()
        .filter(|c| {
            !installed
                .as_deref()
                .is_some_and(|l| l.lines().any(|line| line == *c || line.starts_with(&format!("{c}-"))))
        })
        .collect();
    if installed.is_some() && missing.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    match toolchain {
        Some(t) if installed.is_none() => {
            eprintln!("setup: installing Rust {t} with {} (eBPF programs)", components.join(", "));
            cmd.args(["toolchain", "install", t, "--profile", "minimal"]);
            for c in components {
                cmd.args(["-c", c]);
            }
        }
        _ => {
            eprintln!("setup: adding Rust components {}", missing.join(", "));
            cmd.args(["component", "add"]).args(&missing);
            if let Some(t) = toolchain {
                cmd.args(["--toolchain", t]);
            }
        }
    }
    let status = cmd.env_remove("RUSTUP_TOOLCHAIN").status().context("running rustup")?;
    if !status.success() {
        bail!("{cmd:?} failed");
    }
    Ok(())
}

/// Creates the vpp_papi virtualenv if it is missing or holds another version.
fn ensure_papi_venv() -> Result<()> {
    let venv = crate::workspace_root().join(PAPI_VENV);
    let python = venv.join("bin/python");
    let check = "import importlib.metadata as m; assert m.version('vpp_papi') == '2.4.2'; import ply";
    if quiet(Command::new(&python).args(["-c", check])) {
        return Ok(());
    }
    eprintln!("setup: creating {} with {}", venv.display(), PAPI_PACKAGES.join(" "));
    let status = Command::new("/usr/bin/python3").args(["-m", "venv", "--clear"]).arg(&venv).status()?;
    if !status.success() {
        bail!("python3 -m venv {} failed", venv.display());
    }
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(PAPI_PACKAGES)
        .status()
        .context("running pip")?;
    if !status.success() || !quiet(Command::new(&python).args(["-c", check])) {
        bail!("installing {} into {} failed", PAPI_PACKAGES.join(" "), venv.display());
    }
    Ok(())
}

pub fn run() -> Result<()> {
    install_packages(REQUIREMENTS)?;
    ensure_papi_venv()?;

    // The workspace's own toolchain needs clippy and rustfmt for `cargo xtask lint`.
    ensure_components(None, &["clippy", "rustfmt"])?;
    // The eBPF crate's pinned nightly: rust-src for build-std, clippy and rustfmt for lint.
    ensure_components(Some(EBPF_TOOLCHAIN), &["rust-src", "clippy", "rustfmt"])?;

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !linker_ok {
        let step = crate::progress::step(format!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (several minutes on 2 cores)"
        ));
        let status = Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env_remove("RUSTUP_TOOLCHAIN")
            .status()
            .context("running cargo install bpf-linker")?;
        if !status.success() {
            bail!("installing bpf-linker failed");
        }
        step.finish();
    }
    if !quiet(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker is not on PATH (is ~/.cargo/bin in PATH?)");
    }
    Ok(())
}
