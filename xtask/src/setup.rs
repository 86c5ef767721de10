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

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

pub use crate::packages::{REQUIREMENTS, Requirement};

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

/// Installs (or reinstalls) what `reqs` lists and is missing, then checks every file.
pub fn install_packages(reqs: &[Requirement]) -> Result<()> {
    crate::packages::install_packages(reqs).map_err(anyhow::Error::msg)
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
