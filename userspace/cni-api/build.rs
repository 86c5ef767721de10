fn main() {
    println!("cargo:rerun-if-changed=proto/cni.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/cni.proto"], &["proto"])
        .expect("compiling proto/cni.proto (needs protoc: cargo xtask setup installs it)");
}
