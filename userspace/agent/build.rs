//! Builds the eBPF object (ebpf/contiv-ebpf) with its pinned nightly toolchain and
//! bpf-linker, and leaves it in OUT_DIR for `include_bytes_aligned!`.
//! `cargo xtask setup` installs the toolchain and linker. Set CONTIV_EBPF_OBJECT to
//! use a prebuilt object instead.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("contiv-ebpf");
    println!("cargo:rerun-if-env-changed=CONTIV_EBPF_OBJECT");
    if let Some(prebuilt) = env::var_os("CONTIV_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &out).expect("copying CONTIV_EBPF_OBJECT");
        return;
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let ebpf_dir = manifest_dir.join("../../ebpf/contiv-ebpf");
    let common_dir = manifest_dir.join("../../ebpf/contiv-common");
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!("cargo:rerun-if-changed={}", dir.join("Cargo.toml").display());
    }
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("rust-toolchain.toml").display());
    println!("cargo:rerun-if-changed={}", ebpf_dir.join(".cargo/config.toml").display());

    // The rustup proxy `cargo` picks the toolchain from ebpf/contiv-ebpf/rust-toolchain.toml
    // once the variables the outer cargo set for this build script are removed.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf_dir).args(["build", "--release"]);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO") || key.starts_with("RUSTC") || key == "RUSTUP_TOOLCHAIN" || key == "RUSTFLAGS" {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().expect("running cargo for ebpf/contiv-ebpf");
    assert!(
        status.success(),
        "building the eBPF object failed; run `cargo xtask setup` (pinned nightly + bpf-linker) first"
    );
    let built = ebpf_dir.join("target/bpfel-unknown-none/release/contiv-ebpf");
    std::fs::copy(&built, &out).expect("copying the eBPF object");
}
