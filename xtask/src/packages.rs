//! The Debian packages set-up installs, and how: std only (plus libc), because
//! `xtask-bootstrap` includes this file to install what building xtask itself needs
//! (etcd-client's protoc and well-known .proto files) before xtask can be compiled.

use std::{path::Path, process::Command};

/// A Debian package the build, the tests, the demo or the benchmarks need, and the files
/// it stands in for (any one path of an entry's alternatives, `a|b`, is enough).
#[derive(Clone, Copy, Debug)]
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
        &[
            "/usr/sbin/ip|/usr/bin/ip|/sbin/ip|/bin/ip",
            "/usr/sbin/tc|/sbin/tc",
            "/usr/bin/nstat|/usr/sbin/nstat|/bin/nstat",
            "/usr/bin/ss|/bin/ss|/usr/sbin/ss",
        ],
        "namespaces, veths, qdiscs; nstat and ss report a failed reset-probe run's TCP counters",
    ),
    req(
        "util-linux",
        &["/usr/bin/nsenter", "/usr/bin/setpriv", "/usr/bin/unshare"],
        "agents run under nsenter --net (one test's under unshare --pid, as in a DaemonSet without \
         hostPID); setpriv runs contiv-cni as a non-root user in tests",
    ),
    req(
        "mount",
        &["/usr/bin/mount|/bin/mount", "/usr/bin/umount|/bin/umount"],
        "a CNI test mounts the host's procfs where the DaemonSet mounts it for the agent (/hostproc)",
    ),
    req("nftables", &["/usr/sbin/nft"], "the agent masquerades pod traffic leaving the cluster"),
    req(
        "iptables",
        &["/usr/sbin/iptables-nft-restore", "/usr/sbin/iptables-legacy-restore", "/usr/sbin/iptables-save"],
        "the services benchmark's kube-proxy iptables-mode baselines (nf_tables and legacy backends); \
         the box tests' DNAT rules and the portmap plugin's",
    ),
    req("tcpdump", &["/usr/bin/tcpdump"], "tests check what crosses the fabric"),
    req("curl", &["/usr/bin/curl"], "the services tests ask healthCheckNodePorts over HTTP, as load balancers do"),
    req("procps", &["/usr/sbin/sysctl|/sbin/sysctl"], "sysctl in node namespaces"),
    req("ethtool", &["/usr/sbin/ethtool|/sbin/ethtool"], "offload settings"),
    req("iputils-ping", &["/usr/bin/ping|/bin/ping"], "ping between pods"),
    req("iperf3", &["/usr/bin/iperf3"], "throughput in tests and benchmarks"),
    req("sockperf", &["/usr/bin/sockperf"], "latency benchmarks"),
    req(
        "fonts-dejavu-core",
        &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"],
        "text in the services benchmark's plot (plotters draws it from this TTF file)",
    ),
    req("etcd-server", &["/usr/bin/etcd"], "the cluster store in tests and benchmarks"),
    req("etcd-client", &["/usr/bin/etcdctl"], "store benchmark baseline and tests"),
    req(
        "containernetworking-plugins",
        &[
            "/usr/lib/cni/ptp",
            "/usr/lib/cni/host-local",
            "/usr/lib/cni/bandwidth",
            "/usr/lib/cni/tuning",
            "/usr/lib/cni/portmap",
        ],
        "chaining tests (portmap: the box's hostPorts) and the CNI benchmark's reference plugins",
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

/// What building the xtask binary itself needs beyond the CI image (gcc, git, python3):
/// `xtask-bootstrap` installs these first, so `cargo xtask setup` works on a fresh machine.
#[allow(dead_code)] // read by xtask-bootstrap
pub const BUILD_XTASK: &[&str] = &["protobuf-compiler", "libprotobuf-dev"];

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
pub fn install_packages(reqs: &[Requirement]) -> Result<(), String> {
    let missing = missing_packages(reqs);
    if !missing.is_empty() {
        eprintln!("setup: installing Debian packages: {}", missing.join(" "));
        let ok =
            as_root(&["apt-get", "update", "-qq"]).status().map_err(|e| format!("running apt-get: {e}"))?.success();
        if !ok {
            return Err("apt-get update failed".into());
        }
        // --reinstall also repairs a package dpkg lists whose files were removed.
        let mut args = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends", "--reinstall"];
        args.extend(missing.iter().copied());
        let status = as_root(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("running apt-get: {e}"))?;
        if !status.success() {
            return Err(format!("apt-get install {} failed", missing.join(" ")));
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
        return Err(format!("set-up is incomplete after installing packages:\n{}", problems.join("\n")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_bootstrap_installs_is_listed_with_its_files() {
        for p in BUILD_XTASK {
            let r = REQUIREMENTS.iter().find(|r| r.package == *p).unwrap_or_else(|| panic!("{p} not in REQUIREMENTS"));
            assert!(!r.files.is_empty(), "{p} names the files it provides");
        }
    }
}
