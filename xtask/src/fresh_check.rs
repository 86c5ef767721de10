//! `cargo xtask fresh-check [--full]`: proves that set-up works on a machine that never had
//! the project, independent of what this machine happens to have installed.
//!
//! 1. `mmdebstrap --variant=minbase bookworm` makes a minimal Debian 12 root (with this
//!    host's apt sources, so bookworm-security and -updates are there as on CI machines), with
//!    only what the CI machine image brings (gcc, git, python3 with pip, ca-certificates).
//! 2. The image's Rust is installed the way that image has it: rustup with the same stable
//!    toolchain as this machine, nothing else (no nightly, no bpf-linker, no components).
//! 3. The committed HEAD is cloned into the root (a clean clone; uncommitted changes are not
//!    in it, as on CI).
//! 4. In a private mount namespace (so every mount disappears with it), chrooted, with /proc,
//!    /sys (the host's bpffs included, as a DaemonSet pod sees it), /dev and a fresh /run:
//!    `cargo xtask setup`, `cargo build --workspace --all-targets`, then a short test subset:
//!    contiv-cni's tests (no root), the store conformance suite on a real etcd, and one
//!    end-to-end node test (namespaces, BPF, the CNI binary). With `--full`, `.ci/run` and
//!    `cargo xtask demo` instead of the subset.
//!
//! The root lives in `target/fresh-check/` and is removed at the start of the next run
//! (keep it to look around after a failure). Needs root, and about 4 GB of disk for the root (15 GB with the build).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    check,
    setup::{Requirement, install_packages},
    workspace_root,
};

/// What the fresh-check itself needs on this host.
const HOST_REQUIREMENTS: &[Requirement] =
    &[Requirement { package: "mmdebstrap", files: &["/usr/bin/mmdebstrap"], why: "builds the minimal bookworm root" }];

/// What the CI machine image brings besides Rust (see the env notes of this workplace).
const IMAGE_PACKAGES: &str = "ca-certificates,gcc,libc6-dev,git,python3,python3-pip,procps";

pub fn run(full: bool) -> Result<()> {
    install_packages(HOST_REQUIREMENTS)?;
    let root_dir = workspace_root().join("target/fresh-check");
    let root = root_dir.join("root");
    if root_dir.exists() {
        eprintln!("fresh-check: removing the previous root");
        std::fs::remove_dir_all(&root_dir).with_context(|| format!("removing {}", root_dir.display()))?;
    }
    std::fs::create_dir_all(&root_dir)?;

    eprintln!("fresh-check: [1/4] minimal bookworm root in {}", root.display());
    let mut mm = Command::new("mmdebstrap");
    mm.args(["--variant=minbase", "--include", IMAGE_PACKAGES, "bookworm"]).arg(&root);
    // The host's deb822 sources (bookworm, -updates, -security) as the mirror list.
    let sources = Path::new("/etc/apt/sources.list.d/debian.sources");
    if sources.exists() {
        mm.arg(sources);
    }
    check(&mut mm)?;
    // The machine's network environment, not the project's: its resolver and the CA
    // certificates it added locally (a TLS-inspecting egress proxy signs with one).
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf")).context("copying resolv.conf")?;
    let local_cas = Path::new("/usr/local/share/ca-certificates");
    for entry in std::fs::read_dir(local_cas).into_iter().flatten().flatten() {
        std::fs::copy(entry.path(), root.join("usr/local/share/ca-certificates").join(entry.file_name()))?;
    }

    eprintln!("fresh-check: [2/4] rustup with this machine's stable toolchain");
    let rustc_version =
        String::from_utf8(Command::new("rustc").env_remove("RUSTUP_TOOLCHAIN").arg("--version").output()?.stdout)?;
    let version = rustc_version.split_whitespace().nth(1).context("parsing rustc --version")?.to_owned();
    let rustup = which("rustup")?;
    let bin = root.join("root/.cargo/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(&rustup, bin.join("rustup")).context("copying rustup")?;
    for proxy in ["cargo", "rustc", "rustdoc", "rustfmt", "cargo-fmt", "cargo-clippy", "clippy-driver"] {
        std::os::unix::fs::symlink("rustup", bin.join(proxy))?;
    }

    eprintln!("fresh-check: [3/4] a clean clone of HEAD");
    let src = root.join("src/contiv");
    check(Command::new("git").arg("clone").arg("--quiet").arg("--no-local").arg(workspace_root()).arg(&src))?;

    let steps = if full {
        "bash .ci/run\ncargo xtask demo\n".to_owned()
    } else {
        [
            "cargo xtask setup",
            "cargo build --workspace --all-targets",
            "cargo test -p contiv-cni",
            "cargo test -p contiv-store --test conformance",
            "cargo test -p contiv-tests --test node_datapath pods_talk_tcp_and_udp_both_ways_through_the_fast_path",
        ]
        .join("\n")
    };
    let inner = format!(
        r#"set -eux
export HOME=/root PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo CARGO_TERM_COLOR=never
export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# No incremental caches: a one-off build, and they would double the root's disk use.
export CARGO_INCREMENTAL=0
update-ca-certificates >/dev/null
rustup toolchain install {version} --profile minimal
rustup default {version}
cd /src/contiv
{steps}
"#
    );
    std::fs::write(root_dir.join("inner.sh"), &inner)?;
    std::fs::copy(root_dir.join("inner.sh"), root.join("inner.sh"))?;
    let r = root.display();
    // Mounts are made in a private mount namespace: they vanish when it ends, also on a crash.
    let outer = format!(
        r#"set -eu
mount --make-rprivate /
mount -t proc proc {r}/proc
mount --rbind /sys {r}/sys
mount --rbind /dev {r}/dev
mount -t tmpfs tmpfs {r}/run
mount -t tmpfs tmpfs {r}/tmp
exec chroot {r} /usr/bin/env -i bash /inner.sh
"#
    );
    eprintln!(
        "fresh-check: [4/4] in the root: {}",
        if full { ".ci/run and the demo" } else { "setup, build, test subset" }
    );
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", &outer])
        .status()
        .context("running unshare")?;
    ensure!(status.success(), "fresh-check failed ({status}); the root is kept in {}", root.display());
    eprintln!("fresh-check: passed on a fresh bookworm root ({})", root_dir.display());
    Ok(())
}

fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p.canonicalize()?);
        }
    }
    bail!("{name} not found on PATH")
}
