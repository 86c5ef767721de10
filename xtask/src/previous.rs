//! The previous release's agent, for the upgrade test (tests/tests/upgrade.rs): built from
//! git history at [`PREVIOUS_RELEASE`], the last commit whose pinned maps have the previous
//! layout. Its sources are exported with `git archive` into target/previous/src and built in
//! a target directory of their own (cargo's artifact names do not tell two trees' path
//! crates of the same name and version apart, so a shared directory would mix them); the
//! binary is kept in target/previous.
//!
//! PREVIOUS_RELEASE deliberately stays at the oldest layout (every map at version 1, no
//! SCHEMA map): the agent migrates from any older version in one step, and starting from
//! the oldest exercises every migration there is (POD_COUNTERS' entries carried over, CONFIG
//! rebuilt across two layout changes). Move it only when support for that layout is dropped,
//! and then to the oldest layout still supported.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{check, workspace_root};

/// The release the upgrade test starts from (map layouts: every map at version 1; see above).
pub const PREVIOUS_RELEASE: &str = "c66da6cf5cb9c684e98d2442c4cf0871dd92c993";

/// Builds (once) and returns the previous release's agent binary.
pub fn agent() -> Result<PathBuf> {
    let root = workspace_root();
    let target = crate::target_dir();
    let out = target.join("previous").join(format!("contiv-agent-{}", &PREVIOUS_RELEASE[..12]));
    if out.exists() {
        return Ok(out);
    }
    let has_commit = Command::new("git")
        .current_dir(&root)
        .args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    if !has_commit {
        bail!(
            "the upgrade test needs commit {PREVIOUS_RELEASE} (the previous release) in this clone's history; \
             fetch it or clone without --depth"
        );
    }
    eprintln!("building the previous release's agent ({}) for the upgrade test...", &PREVIOUS_RELEASE[..12]);
    let src = target.join("previous").join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let archive = Command::new("git")
        .current_dir(&root)
        .args(["archive", "--format=tar", PREVIOUS_RELEASE])
        .output()
        .context("git archive")?;
    if !archive.status.success() {
        bail!("git archive {PREVIOUS_RELEASE} failed");
    }
    let mut tar = Command::new("tar").current_dir(&src).arg("-x").stdin(std::process::Stdio::piped()).spawn()?;
    std::io::Write::write_all(tar.stdin.as_mut().context("tar stdin")?, &archive.stdout)?;
    drop(tar.stdin.take());
    if !tar.wait()?.success() {
        bail!("unpacking the previous release failed");
    }
    let build_dir = target.join("previous").join("target");
    let mut cargo = Command::new("cargo");
    cargo.current_dir(&src).args(["build", "-p", "contiv-agent", "--bin", "contiv-agent"]);
    cargo.env("CARGO_TARGET_DIR", &build_dir);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_") && k != "CARGO_TARGET_DIR" && k != "CARGO_HOME" {
            cargo.env_remove(k);
        }
    }
    check(&mut cargo)?;
    std::fs::copy(build_dir.join("debug/contiv-agent"), &out)?;
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&build_dir);
    Ok(out)
}
