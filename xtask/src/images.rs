//! `cargo xtask images`: OCI images for the agent (with contiv-cni), KSR, STN and etcd,
//! built with buildah (Debian's package) from scratch, without a Docker daemon or any base
//! image from a registry, tagged `contiv/<name>:<crate version>` as the manifests name them
//! (the list is `contiv_deploy::IMAGES`).
//!
//! Each image holds its release binaries (debug info stripped) in /usr/bin, the Debian
//! programs they run (`Image::tools`: the agent's `nft`, for the masquerade), the shared
//! libraries they load (found with ldd, plus the dynamic loader), /etc/passwd and /etc/group
//! with root and nobody, the CA bundle, and empty /tmp and /run. contiv-cni is linked
//! statically: the init container copies it onto the host, whose libc may differ.
//!
//! After building, every image's entrypoint runs once under `buildah run --isolation chroot`
//! (`contiv_deploy::Image::smoke_args`: `check-config`, `--version`), and every image is
//! also written as an OCI archive to target/images/<name>-<version>.tar for transport.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use contiv_deploy::{IMAGES, Image, VERSION, image_ref};

use crate::{cargo, check, progress, workspace_root};

/// The target triple of the static contiv-cni.
const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn buildah() -> Command {
    let mut c = Command::new("buildah");
    c.stdin(Stdio::null());
    c
}

/// Shared libraries `bin` loads (absolute paths as the loader finds them), and the loader.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(vec![]);
    }
    ensure!(out.status.success(), "ldd {} failed", bin.display());
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or_default(),
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{}: {line}", bin.display());
        }
    }
    Ok(libs)
}

fn copy_into(rootfs: &Path, src: &Path, dest: &Path) -> Result<()> {
    let target = rootfs.join(dest.strip_prefix("/").unwrap_or(dest));
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Follow symlinks: the image gets the file under the name the loader asks for.
    std::fs::copy(src, &target).with_context(|| format!("copying {} into the image", src.display()))?;
    Ok(())
}

/// Lays out one image's root file system.
fn stage(image: &Image, binaries: &[(String, PathBuf)], rootfs: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(rootfs);
    for dir in ["usr/bin", "etc/ssl/certs", "tmp", "run", "var/lib", "var/run"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    copy_into(
        rootfs,
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
    )?;
    for (name, src) in binaries {
        let dest = rootfs.join("usr/bin").join(name);
        std::fs::copy(src, &dest).with_context(|| format!("copying {}", src.display()))?;
        // Debug info stays in target/; the image gets the code.
        check(Command::new("strip").arg("--strip-debug").arg(&dest))?;
        for lib in shared_libraries(src)? {
            copy_into(rootfs, &lib, &lib)?;
        }
    }
    ensure!(binaries.len() == image.binaries.len(), "{}: binaries missing", image.name);
    for tool in image.tools {
        let src = Path::new(tool);
        let name = src.file_name().context("a tool's path names a file")?;
        std::fs::copy(src, rootfs.join("usr/bin").join(name))
            .with_context(|| format!("copying {tool} (cargo xtask setup installs it)"))?;
        for lib in shared_libraries(src)? {
            copy_into(rootfs, &lib, &lib)?;
        }
    }
    Ok(())
}

/// Builds the image from `rootfs` and tags it `name:VERSION`.
fn build(image: &Image, rootfs: &Path) -> Result<()> {
    let container = output(buildah().args(["from", "scratch"]))?;
    let result = (|| {
        check(
            buildah()
                .args(["copy", "--quiet", &container])
                .arg(format!("{}/", rootfs.display()))
                .arg("/")
                .stdout(Stdio::null()),
        )?;
        let entrypoint = serde_json::to_string(&[format!("/usr/bin/{}", image.binaries[0])])?;
        check(buildah().args([
            "config",
            "--entrypoint",
            &entrypoint,
            "--cmd",
            "",
            // The binaries find the tools they run (nft) by PATH, as on a host.
            "--env",
            "PATH=/usr/bin:/bin",
            "--label",
            &format!("org.opencontainers.image.version={VERSION}"),
            "--label",
            &format!("org.opencontainers.image.title={}", image.name),
            "--label",
            "org.opencontainers.image.licenses=Apache-2.0",
            &container,
        ]))?;
        check(buildah().args(["commit", "--quiet", "--rm", &container, &image_ref(image)]).stdout(Stdio::null()))
    })();
    if result.is_err() {
        let _ = buildah().args(["rm", &container]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
    result
}

/// Runs the image's entrypoint once with its smoke-test arguments.
fn smoke(image: &Image) -> Result<String> {
    let name = format!("contiv-smoke-{}-{}", image.name.replace('/', "-"), std::process::id());
    let container = output(buildah().args(["from", "--name", &name, "--pull-never", &image_ref(image)]))?;
    let result = (|| {
        let inspect: serde_json::Value = serde_json::from_str(&output(buildah().args(["inspect", &container]))?)?;
        let entrypoint: Vec<String> = serde_json::from_value(inspect["OCIv1"]["config"]["Entrypoint"].clone())
            .context("the image has no entrypoint")?;
        ensure!(!entrypoint.is_empty(), "the image has an empty entrypoint");
        output(
            buildah().args(["run", "--isolation", "chroot", &container, "--"]).args(&entrypoint).args(image.smoke_args),
        )
    })();
    let _ = buildah().args(["rm", &container]).stdout(Stdio::null()).status();
    result.map(|out| out.lines().next().unwrap_or_default().to_string())
}

/// Where release binaries land.
fn release_dir() -> PathBuf {
    crate::target_dir().join("release")
}

pub fn run() -> Result<()> {
    let root = workspace_root();
    let have_stn = root.join("userspace/stn/Cargo.toml").exists();
    let images: Vec<&Image> = IMAGES
        .iter()
        .filter(|i| {
            let skip = i.package == Some("contiv-stn") && !have_stn;
            if skip {
                eprintln!("images: skipping {}: the contiv-stn crate (userspace/stn) is not in this tree", i.name);
            }
            !skip
        })
        .collect();
    let packages: Vec<&str> =
        images.iter().filter_map(|i| i.package).collect::<std::collections::BTreeSet<_>>().into_iter().collect();

    let step = progress::step(format!("building release binaries ({})", packages.join(", ")));
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--bins"]);
    for p in &packages {
        cmd.args(["-p", p]);
    }
    check(&mut cmd)?;
    step.finish();

    // contiv-cni runs on the host: link it statically (glibc's static libc, libc6-dev).
    let step = progress::step("building a static contiv-cni");
    let static_dir = crate::target_dir().join("static");
    check(
        cargo()
            .args(["build", "--release", "-p", "contiv-cni", "--bin", "contiv-cni", "--target", HOST_TRIPLE])
            .env("CARGO_TARGET_DIR", &static_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    let static_cni = static_dir.join(HOST_TRIPLE).join("release/contiv-cni");
    ensure!(shared_libraries(&static_cni)?.is_empty(), "{} is not static", static_cni.display());
    step.finish();

    let out_dir = root.join("target/images");
    std::fs::create_dir_all(&out_dir)?;
    let mut table = Vec::new();
    for image in images {
        let step = progress::step(format!("image {}", image_ref(image)));
        let binaries: Vec<(String, PathBuf)> = image
            .binaries
            .iter()
            .map(|b| {
                let path = match (image.package, *b) {
                    (_, "contiv-cni") => static_cni.clone(),
                    (Some(_), b) => release_dir().join(b),
                    (None, b) => PathBuf::from("/usr/bin").join(b),
                };
                (b.to_string(), path)
            })
            .collect();
        for (_, p) in &binaries {
            ensure!(p.exists(), "{} missing", p.display());
        }
        let rootfs = out_dir.join(image.name.replace('/', "-")).join("rootfs");
        stage(image, &binaries, &rootfs)?;
        build(image, &rootfs)?;
        let said = smoke(image).with_context(|| format!("running the entrypoint of {}", image_ref(image)))?;
        step.note(format!("entrypoint {} ran: {said}", image.smoke_args.join(" ")));
        // The tools the binaries run: each starts in the image.
        for tool in image.tools {
            let name = Path::new(tool).file_name().context("a tool's path names a file")?.to_string_lossy();
            let c = output(buildah().args(["from", "--pull-never", &image_ref(image)]))?;
            let bin = format!("/usr/bin/{name}");
            let v = output(buildah().args(["run", "--isolation", "chroot", &c, "--", &bin, "--version"]));
            let _ = buildah().args(["rm", &c]).stdout(Stdio::null()).status();
            step.note(format!("{name} --version: {}", v.with_context(|| format!("running {bin} in the image"))?));
        }
        // contiv-cni in the agent image is what the init container runs: try it too.
        if image.binaries.contains(&"contiv-cni") {
            let c = output(buildah().args(["from", "--pull-never", &image_ref(image)]))?;
            let v =
                output(buildah().args(["run", "--isolation", "chroot", &c, "--", "/usr/bin/contiv-cni", "--version"]));
            let _ = buildah().args(["rm", &c]).stdout(Stdio::null()).status();
            step.note(format!("contiv-cni --version: {}", v?));
        }
        let archive = out_dir.join(format!("{}-{VERSION}.tar", image.name.replace('/', "-")));
        let _ = std::fs::remove_file(&archive);
        check(
            buildah()
                .args(["push", "--quiet", &image_ref(image)])
                .arg(format!("oci-archive:{}:{}", archive.display(), image_ref(image)))
                .stdout(Stdio::null()),
        )?;
        let size = std::fs::metadata(&archive).map(|m| m.len()).unwrap_or(0);
        table.push((image_ref(image), said, archive, size));
        step.finish();
    }
    println!("\n{:<24} {:>8}  {:<40} entrypoint said", "image", "MiB", "archive");
    for (name, said, archive, size) in &table {
        println!(
            "{name:<24} {:>8.1}  {:<40} {said}",
            *size as f64 / (1 << 20) as f64,
            archive.strip_prefix(&root).unwrap_or(archive).display()
        );
    }
    println!("\nimages are in buildah's store (`buildah images`); push them with `buildah push` (deploy/README.md)");
    Ok(())
}
