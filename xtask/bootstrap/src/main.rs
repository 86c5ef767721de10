//! `cargo xtask ...` (the alias in `.cargo/config.toml`) runs this first. xtask itself
//! depends on crates whose build scripts need Debian packages (etcd-client's needs protoc
//! and the well-known .proto files), so on a fresh machine it could not even be built to
//! run `cargo xtask setup`. This binary has no such dependency: it installs the packages
//! building xtask needs (the same list and checks as set-up, from `../src/packages.rs`),
//! then runs `cargo run --package xtask` with the same arguments and exits with its status.

#[path = "../../src/packages.rs"]
#[allow(dead_code)]
mod packages;

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let needed: Vec<packages::Requirement> =
        packages::REQUIREMENTS.iter().filter(|r| packages::BUILD_XTASK.contains(&r.package)).copied().collect();
    if let Err(e) = packages::install_packages(&needed) {
        eprintln!("xtask: installing what building xtask needs: {e}");
        return ExitCode::FAILURE;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--quiet", "--package", "xtask", "--"])
        .args(std::env::args_os().skip(1))
        .status();
    match status {
        Ok(s) => ExitCode::from(s.code().map_or(1, |c| u8::try_from(c).unwrap_or(1))),
        Err(e) => {
            eprintln!("xtask: running cargo: {e}");
            ExitCode::FAILURE
        }
    }
}
