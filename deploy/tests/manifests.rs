//! Tests that fail on a broken manifest: every document parses strictly into its
//! Kubernetes type; the ConfigMap's agent config passes `contiv-agent check-config` and its
//! conflist `contiv-cni install`; every command and flag a manifest runs exists in the
//! binary it names; the ClusterRole grants exactly what KSR's code watches, and KSR runs
//! with exactly the manifests' RBAC against the fake API server; images are the ones
//! `cargo xtask images` builds; the VPP variant renders into a valid DaemonSet whose
//! startup.conf matches the agent config; the TLS script makes certificates etcd accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use contiv_deploy::{Document, IMAGES, Typed, containers, deploy_dir, image_of, parse_strict, render};
use serde_json::{Value, json};

// === helpers ===

/// Every variant an operator applies.
const VARIANTS: [&str; 4] = [".", "base", "vpp", "uninstall"];

fn rendered(variant: &str) -> Vec<Document> {
    render(&deploy_dir().join(variant)).unwrap_or_else(|e| panic!("rendering deploy/{variant}: {e}"))
}

fn find<'a>(docs: &'a [Document], kind: &str, name: &str) -> &'a Value {
    &docs
        .iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
        .value
}

fn workspace() -> PathBuf {
    deploy_dir().parent().expect("workspace root").to_owned()
}

/// A contiv binary of this tree, built (once per test process) if missing or stale.
fn binary(package: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    let mut built = built.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from);
    let path = target.join("debug").join(name);
    if built.insert(name.to_string()) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace())
            .args(["build", "--quiet", "-p", package, "--bin", name])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building {name} failed");
    }
    assert!(path.exists(), "{} missing after cargo build", path.display());
    path
}

fn config_map_data<'a>(docs: &'a [Document], name: &str, key: &str) -> &'a str {
    find(docs, "ConfigMap", name)["data"][key].as_str().unwrap_or_else(|| panic!("ConfigMap {name} has no {key}"))
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    containers(workload)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {}", workload["metadata"]["name"]))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

// === strict parsing ===

#[test]
fn every_document_parses_strictly_into_its_kubernetes_type() {
    let mut problems = Vec::new();
    let mut seen = 0;
    for variant in VARIANTS {
        for doc in rendered(variant) {
            seen += 1;
            if let Err(errors) = parse_strict(&doc.value) {
                problems.push(format!("deploy/{variant}: {}: {}", doc.origin(), errors.join("; ")));
            }
        }
    }
    assert!(problems.is_empty(), "manifests that do not parse strictly:\n{}", problems.join("\n"));
    assert!(seen >= 20, "only {seen} documents rendered");
}

#[test]
fn the_strict_parser_catches_typos_missing_fields_and_unknown_kinds() {
    let mut ds = find(&rendered("base"), "DaemonSet", "contiv-agent").clone();
    ds["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    let errors = parse_strict(&ds).unwrap_err();
    assert!(errors.iter().any(|e| e.contains("hostNetwrok")), "{errors:?}");
    let mut ds = find(&rendered("base"), "DaemonSet", "contiv-agent").clone();
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = json!("NET_ADMIN");
    assert!(parse_strict(&ds).is_err(), "a string where a list belongs");
    ds["spec"].as_object_mut().unwrap().remove("selector");
    assert!(parse_strict(&ds).is_err(), "selector is required");
    assert!(parse_strict(&json!({"apiVersion": "v1", "kind": "Pdo", "metadata": {"name": "x"}})).is_err());
}

#[test]
fn kustomizations_refuse_what_they_do_not_understand() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresource: [a.yaml]\n",
    )
    .unwrap();
    assert!(render(dir.path()).is_err(), "a misspelt key must not be ignored");
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [missing.yaml]\n",
    )
    .unwrap();
    assert!(render(dir.path()).is_err(), "a missing resource");
}

// === agent config and conflist ===

#[test]
fn agent_config_of_every_variant_passes_contiv_agent_check_config() {
    let agent = binary("contiv-agent", "contiv-agent");
    for variant in [".", "vpp"] {
        let docs = rendered(variant);
        let toml = config_map_data(&docs, "contiv-agent", "agent.toml");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(&agent).arg("--config").arg(&path).arg("check-config").output().unwrap();
        assert!(
            out.status.success(),
            "deploy/{variant}: check-config refused agent.toml: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(printed.contains("etcd_tls: Some("), "deploy/{variant}: TLS settings were read: {printed}");
    }
    // And it does refuse a broken one (the check is not a no-op).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "etcdEndpoints = [\"https://127.0.0.1:32379\"]\n").unwrap();
    let out = Command::new(&agent).arg("--config").arg(&path).arg("check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(78), "https without TLS settings must be refused");
}

#[test]
fn conflist_is_accepted_by_contiv_cni_install_and_removed_by_uninstall() {
    let cni = binary("contiv-cni", "contiv-cni");
    let docs = rendered(".");
    let conflist = config_map_data(&docs, "contiv-agent", "05-contiv.conflist");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("05-contiv.conflist");
    std::fs::write(&src, conflist).unwrap();
    let (bin, conf) = (dir.path().join("opt-cni-bin"), dir.path().join("etc-cni-net.d"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("05-contiv-old.conf"), "{}").unwrap();
    let out = Command::new(&cni)
        .args(["install", "--bin-dir"])
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .arg("--conflist")
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "contiv-cni install refused the conflist: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(conf.join("05-contiv.conflist")).unwrap(), conflist);
    assert!(bin.join("contiv-cni").exists());
    assert!(!conf.join("05-contiv-old.conf").exists(), "a stale contiv config is removed");
    // The installed plugin answers VERSION as a runtime would call it.
    let out = Command::new(bin.join("contiv-cni")).env("CNI_COMMAND", "VERSION").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));
    let out =
        Command::new(&cni).args(["uninstall", "--bin-dir"]).arg(&bin).arg("--conf-dir").arg(&conf).output().unwrap();
    assert!(out.status.success());
    assert!(!conf.join("05-contiv.conflist").exists() && !bin.join("contiv-cni").exists());
}

/// The shipped conflist asks the runtime for pods' bandwidth annotations (contiv-cni's
/// `bandwidth` capability; without it the runtime passes none and the annotations are
/// ignored), and speaks a version every plugin of the chain accepts: Debian's `portmap`
/// supports up to 1.0.0, and libcni refuses the whole chain above that. The conflist
/// `contiv-cni install` writes by default says the same.
#[test]
fn conflist_asks_for_bandwidth_at_a_version_the_whole_chain_speaks() {
    let docs = rendered(".");
    let shipped = config_map_data(&docs, "contiv-agent", "05-contiv.conflist");
    let dir = tempfile::tempdir().unwrap();
    let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
    let out = Command::new(binary("contiv-cni", "contiv-cni"))
        .args(["install", "--bin-dir"])
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let default = std::fs::read_to_string(conf.join("05-contiv.conflist")).unwrap();
    for (what, text) in [("shipped", shipped), ("default", default.as_ref())] {
        let v: serde_json::Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} conflist: {e}: {text}"));
        assert_eq!(v["cniVersion"], "1.0.0", "{what}");
        let plugins = v["plugins"].as_array().unwrap();
        let contiv = plugins.iter().find(|p| p["type"] == "contiv-cni").expect("contiv-cni in the chain");
        assert_eq!(contiv["capabilities"]["bandwidth"], true, "{what}: {contiv}");
        let portmap = plugins.iter().find(|p| p["type"] == "portmap").expect("portmap in the chain");
        assert_eq!(portmap["capabilities"]["portMappings"], true, "{what}: {portmap}");
    }
}

/// Uninstalling takes the datapath off each node: `contiv-agent cleanup` runs with the
/// host's bpffs where the agent pins (its default `bpfPinDir`, the one deploy/base uses)
/// and may delete links.
#[test]
fn uninstall_cleans_up_the_datapath_first() {
    let docs = rendered("uninstall");
    let ds = find(&docs, "DaemonSet", "contiv-uninstall");
    let pod = &ds["spec"]["template"]["spec"];
    let init = pod["initContainers"].as_array().expect("init containers");
    let cleanup = init.iter().find(|c| c["name"] == "cleanup").expect("a cleanup init container");
    assert_eq!(strings(&cleanup["command"]), ["/usr/bin/contiv-agent", "cleanup"]);
    assert!(strings(&cleanup["securityContext"]["capabilities"]["add"]).contains(&"NET_ADMIN".to_string()));
    let mounts = cleanup["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["mountPath"] == "/sys/fs/bpf"), "{mounts:?}");
    let config: toml::Table = toml::from_str(config_map_data(&rendered("base"), "contiv-agent", "agent.toml")).unwrap();
    assert!(config["bpfPinDir"].as_str().unwrap().starts_with("/sys/fs/bpf/"));
    let out = Command::new(binary("contiv-agent", "contiv-agent")).arg("check-config").output().unwrap();
    let defaults = String::from_utf8_lossy(&out.stdout);
    assert!(
        defaults.contains(&format!("bpf_pin_dir: \"{}\"", config["bpfPinDir"].as_str().unwrap())),
        "cleanup runs without the ConfigMap (deleted by then): the agent's default pin dir must be deploy/base's: {defaults}"
    );
}

/// Uninstalling gives the NIC back first, if deploy/vpp's contiv-stn sidecar could not
/// (SIGKILLed, OOM-killed or crash-looping when the agent DaemonSet went): `contiv-stn
/// restore` runs before the cleanup, from the image that has it, with NET_ADMIN, the host
/// network, and the host directory where the sidecar keeps its state file.
#[test]
fn uninstall_gives_the_nic_back_before_cleaning_up() {
    let docs = rendered("uninstall");
    let ds = find(&docs, "DaemonSet", "contiv-uninstall");
    let pod = &ds["spec"]["template"]["spec"];
    let init = pod["initContainers"].as_array().expect("init containers");
    let names: Vec<&str> = init.iter().filter_map(|c| c["name"].as_str()).collect();
    let restore = &init[0];
    assert_eq!(
        strings(&restore["command"]),
        ["/usr/bin/contiv-stn", "restore"],
        "the first init container gives the NIC back: {names:?}"
    );
    assert!(names.contains(&"cleanup"), "{names:?}");
    let image = restore["image"].as_str().unwrap();
    assert!(image_of(image).is_some_and(|i| i.binaries.contains(&"contiv-stn")), "{image} has no contiv-stn");
    assert_eq!(pod["hostNetwork"], json!(true), "the host's NIC, not a pod's");
    assert_eq!(strings(&restore["securityContext"]["capabilities"]["add"]), ["NET_ADMIN"]);
    assert!(restore["securityContext"]["privileged"].is_null());
    // The state file it reads is the one the sidecar writes, in the same host directory.
    let env_value = |c: &Value, name: &str| -> String {
        let env = c["env"].as_array().cloned().unwrap_or_default();
        let e = env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("{} sets no {name}", c["name"]));
        e["value"].as_str().unwrap().to_string()
    };
    let host_dir = |pod: &Value, c: &Value, dir: &Path| -> String {
        let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
        let m = mounts
            .iter()
            .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == dir)
            .unwrap_or_else(|| panic!("{} does not mount {}: {mounts:?}", c["name"], dir.display()));
        let volumes = pod["volumes"].as_array().unwrap();
        let v = volumes.iter().find(|v| v["name"] == m["name"]).expect("the mounted volume");
        v["hostPath"]["path"].as_str().unwrap_or_else(|| panic!("{} is not a hostPath volume", v["name"])).to_string()
    };
    let vpp = rendered("vpp");
    let agent = find(&vpp, "DaemonSet", "contiv-agent");
    let sidecar = container(agent, "stn");
    let state = env_value(sidecar, "CONTIV_STN_STATE_FILE");
    assert_eq!(env_value(restore, "CONTIV_STN_STATE_FILE"), state);
    let dir = Path::new(&state).parent().unwrap();
    assert_eq!(host_dir(pod, restore, dir), host_dir(&agent["spec"]["template"]["spec"], sidecar, dir));
    // Both can give the NIC back from DPDK's driver: the host's PCI bus, writable, within
    // the host's whole sysfs (the bus's devices/<address> entries are links into
    // /sys/devices: a mount of /sys/bus/pci alone leaves them dangling).
    for (pod, c) in [(pod, restore), (&agent["spec"]["template"]["spec"], sidecar)] {
        let root = env_value(c, "CONTIV_STN_PCI_ROOT");
        let sys = Path::new(&root).parent().and_then(Path::parent).unwrap();
        assert_eq!(Path::new(&root).strip_prefix(sys).unwrap(), Path::new("bus/pci"), "{}", c["name"]);
        assert_eq!(host_dir(pod, c, sys), "/sys", "{}", c["name"]);
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == sys)
            .unwrap();
        assert_ne!(mount["readOnly"], true, "{}", c["name"]);
    }
    // Giving the NIC back (DPDK's driver off, the interface back, addresses and routes)
    // takes longer than the base's grace period: the VPP variant gives it time.
    let grace = agent["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace >= 60, "terminationGracePeriodSeconds {grace}");
}

/// Once contiv-stn holds the NIC the node reaches nothing until VPP runs: every image a
/// container started after it needs is pulled before it, and never pulled again.
#[test]
fn the_vpp_variant_pulls_every_image_before_contiv_stn_takes_the_nic() {
    let vpp = rendered("vpp");
    let pod = &find(&vpp, "DaemonSet", "contiv-agent")["spec"]["template"]["spec"];
    let inits: Vec<&Value> = pod["initContainers"].as_array().unwrap().iter().collect();
    let stn = inits.iter().position(|c| c["name"] == "stn").expect("the stn sidecar");
    let pulled: BTreeSet<&str> = inits[..stn].iter().filter_map(|c| c["image"].as_str()).collect();
    let after = inits[stn + 1..].iter().copied().chain(pod["containers"].as_array().unwrap());
    for c in after {
        let image = c["image"].as_str().unwrap();
        assert!(
            pulled.contains(image),
            "{}'s image {image} is pulled only after the NIC is taken: {pulled:?}",
            c["name"]
        );
        let policy = c["imagePullPolicy"].as_str();
        let latest = !image.rsplit('/').next().unwrap().contains(':') || image.ends_with(":latest");
        assert!(
            policy == Some("IfNotPresent") || policy == Some("Never") || (policy.is_none() && !latest),
            "{} would pull {image} again ({policy:?})",
            c["name"]
        );
    }
}

// === commands and flags ===

/// The environment a container gets from its manifest (downward-API values made up).
fn container_env(c: &Value) -> BTreeMap<String, String> {
    c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let name = e["name"].as_str().unwrap_or_default().to_string();
            let value = e["value"]
                .as_str()
                .map_or_else(|| format!("{}-from-downward-api", name.to_lowercase()), str::to_string);
            (name, value)
        })
        .collect()
}

/// Kubernetes' `$(VAR)` expansion in command and args.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

#[test]
fn every_command_and_flag_a_manifest_runs_exists_in_its_binary() {
    let mut checked = 0;
    let mut problems = Vec::new();
    let etcd_help = {
        let out =
            Command::new("/usr/bin/etcd").arg("--help").output().expect("etcd (Debian etcd-server) for its flags");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    for variant in VARIANTS {
        for doc in rendered(variant) {
            for c in containers(&doc.value) {
                let image = c["image"].as_str().unwrap_or_default();
                let Some(img) = image_of(image) else {
                    // Not ours (the VPP image is the operator's): nothing to check it against.
                    assert!(image.starts_with("ligato/vpp-base"), "{}: unknown image {image}", doc.origin());
                    continue;
                };
                let env = container_env(c);
                let mut argv: Vec<String> = strings(&c["command"]);
                argv.extend(strings(&c["args"]));
                let argv: Vec<String> = argv.iter().map(|a| expand(a, &env)).collect();
                let Some(program) = argv.first() else {
                    problems.push(format!(
                        "{}: container {} runs the image's entrypoint implicitly; name it",
                        doc.origin(),
                        c["name"]
                    ));
                    continue;
                };
                let name =
                    program.strip_prefix("/usr/bin/").unwrap_or_else(|| panic!("{program}: binaries live in /usr/bin"));
                if !img.binaries.contains(&name) {
                    problems.push(format!("{}: image {image} has no {program}", doc.origin()));
                    continue;
                }
                checked += 1;
                if name == "etcd" {
                    for flag in argv[1..].iter().map(|a| a.split('=').next().unwrap_or_default()) {
                        if !etcd_help.contains(&format!("{flag} ")) && !etcd_help.contains(&format!("{flag}\n")) {
                            problems.push(format!("{}: etcd has no flag {flag}", doc.origin()));
                        }
                    }
                    continue;
                }
                // The agent image also carries contiv-cni, a package of its own.
                let package = if name == "contiv-cni" { "contiv-cni" } else { img.package.expect("contiv image") };
                let bin = binary(package, name);
                // clap parses everything before --help: an unknown flag, subcommand or bad
                // value fails; --help then exits 0 without running anything.
                let out = Command::new(&bin).args(&argv[1..]).arg("--help").env_clear().envs(&env).output().unwrap();
                if !out.status.success() {
                    problems.push(format!(
                        "{}: `{}` is not a valid command line: {}",
                        doc.origin(),
                        argv.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked >= 6, "only {checked} containers checked");
    // The check itself rejects an unknown flag.
    let out = Command::new(binary("contiv-ksr", "contiv-ksr")).args(["--leader-elekt", "--help"]).output().unwrap();
    assert!(!out.status.success(), "an unknown flag must fail the check");
}

// === images ===

#[test]
fn manifests_use_exactly_the_images_xtask_builds_with_the_crate_version() {
    let mut used = BTreeSet::new();
    for variant in VARIANTS {
        for doc in rendered(variant) {
            for c in containers(&doc.value) {
                let image = c["image"].as_str().unwrap_or_default().to_string();
                if image.starts_with("ligato/vpp-base") {
                    assert_eq!(variant, "vpp", "only the VPP variant runs VPP");
                    assert!(image.contains(':'), "the VPP image names an explicit tag: {image}");
                    continue;
                }
                let img = image_of(&image)
                    .unwrap_or_else(|| panic!("{}: {image} is not built by xtask images", doc.origin()));
                assert_eq!(image, contiv_deploy::image_ref(img), "{}: tag must be the crate version", doc.origin());
                used.insert(img.name);
            }
        }
    }
    for needed in ["contiv/agent", "contiv/ksr", "contiv/etcd", "contiv/stn"] {
        assert!(used.contains(needed), "{needed} is built but not deployed");
    }
    assert!(IMAGES.iter().all(|i| i.binaries.iter().all(|b| !b.contains('/'))));
}

// === RBAC ===

fn rule_set(rules: &Value) -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    for r in rules.as_array().into_iter().flatten() {
        for g in strings(&r["apiGroups"]) {
            for res in strings(&r["resources"]) {
                for v in strings(&r["verbs"]) {
                    set.insert((g.clone(), res.clone(), v));
                }
            }
        }
    }
    set
}

#[test]
fn cluster_role_grants_exactly_what_ksr_watches() {
    let docs = rendered(".");
    let granted = rule_set(&find(&docs, "ClusterRole", "contiv-ksr")["rules"]);
    let watched: BTreeSet<(String, String, String)> = contiv_ksr::reflect::watched_kinds()
        .iter()
        .flat_map(|w| {
            contiv_ksr::reflect::WATCH_VERBS.iter().map(|v| (w.group.clone(), w.resource.clone(), v.to_string()))
        })
        .collect();
    let extra: Vec<_> = granted.difference(&watched).collect();
    let missing: Vec<_> = watched.difference(&granted).collect();
    assert!(extra.is_empty() && missing.is_empty(), "ClusterRole grants too much: {extra:?}; too little: {missing:?}");
    // Nothing else in the cluster is granted to anyone: only KSR's bindings exist.
    let bindings: Vec<&Document> = docs.iter().filter(|d| d.kind().ends_with("Binding")).collect();
    assert_eq!(bindings.len(), 2);
    for b in bindings {
        assert_eq!(
            b.value["subjects"],
            json!([{"kind": "ServiceAccount", "name": "contiv-ksr", "namespace": "contiv"}])
        );
    }
    // The agent has no API access at all.
    let agent = find(&docs, "DaemonSet", "contiv-agent");
    assert_eq!(agent["spec"]["template"]["spec"]["automountServiceAccountToken"], json!(false));
}

fn grants(docs: &[Document]) -> Vec<contiv_ksr::testing::Grant> {
    let mut out = Vec::new();
    for d in docs.iter().filter(|d| d.kind() == "ClusterRoleBinding" || d.kind() == "RoleBinding") {
        let role =
            find(docs, d.value["roleRef"]["kind"].as_str().unwrap(), d.value["roleRef"]["name"].as_str().unwrap());
        let namespace =
            (d.kind() == "RoleBinding").then(|| d.value["metadata"]["namespace"].as_str().unwrap().to_string());
        for r in role["rules"].as_array().into_iter().flatten() {
            out.push(contiv_ksr::testing::Grant {
                namespace: namespace.clone(),
                rule: serde_json::from_value(r.clone()).unwrap(),
            });
        }
    }
    out
}

#[tokio::test]
async fn fake_apiserver_ksr_runs_with_exactly_the_manifest_rbac() {
    let docs = rendered(".");
    let deployment = find(&docs, "Deployment", "contiv-ksr");
    assert!(deployment["spec"]["replicas"].as_i64().unwrap() >= 2, "two replicas are what leader election is for");
    let ksr = container(deployment, "ksr");
    assert!(strings(&ksr["command"]).contains(&"--leader-elect".to_string()));
    assert_eq!(deployment["spec"]["template"]["spec"]["serviceAccountName"], json!("contiv-ksr"));
    // KSR opens its port only once the store answers, and waits for it: liveness must not
    // restart that wait (etcd of the same rollout may take minutes).
    let startup = &ksr["startupProbe"];
    assert_eq!(startup["httpGet"]["port"], ksr["livenessProbe"]["httpGet"]["port"]);
    let window = startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
    assert!(window >= 240, "the startup probe allows {window} s");
    assert!(ksr["livenessProbe"]["initialDelaySeconds"].is_null());
    let namespace = deployment["metadata"]["namespace"].as_str().unwrap();

    let api = contiv_ksr::testing::FakeApiServer::start().await.unwrap();
    api.apply(json!({"kind": "Namespace", "metadata": {"name": "default"}}));
    api.apply(json!({"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}));
    api.authorize(grants(&docs));
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&contiv_store::StoreConfig::embedded(dir.path())).await.unwrap();
    let mut election = contiv_ksr::ElectionConfig::new(namespace, contiv_ksr::leader::DEFAULT_LEASE_NAME, "ksr-0");
    election.lease_duration = Duration::from_secs(2);
    election.renew_deadline = Duration::from_millis(1500);
    election.retry_period = Duration::from_millis(200);
    let health = contiv_ksr::Health::elected(Default::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(contiv_ksr::run_elected(
        api.client(),
        store,
        Duration::from_millis(200),
        None,
        election,
        health.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(health.role() == contiv_ksr::Role::Leader && health.readiness().0) {
        assert!(
            Instant::now() < deadline,
            "KSR did not lead and sync with the manifests' RBAC; denied: {:?}",
            api.denied()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await; // a few renewals
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    assert!(api.denied().is_empty(), "requests the manifests do not allow: {:?}", api.denied());
    // The Role grants exactly the Lease verbs the code used (create, get, update).
    let used: BTreeSet<(String, String, String)> =
        api.requests().into_iter().filter(|a| a.resource == "leases").map(|a| (a.group, a.resource, a.verb)).collect();
    let role = rule_set(&find(&docs, "Role", "contiv-ksr-leader-election")["rules"]);
    assert_eq!(role, used, "Role vs what leader election does");
}

// === the agent DaemonSet ===

#[test]
fn agent_daemonset_runs_on_every_node_and_mounts_what_its_config_names() {
    let docs = rendered(".");
    let ds = find(&docs, "DaemonSet", "contiv-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], json!(true));
    assert_eq!(pod["priorityClassName"], json!("system-node-critical"));
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]), "tolerate every taint");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], json!("RollingUpdate"));
    let agent = container(ds, "agent");
    assert!(agent["securityContext"]["privileged"].is_null(), "the agent runs with named capabilities");
    let caps = strings(&agent["securityContext"]["capabilities"]["add"]);
    for cap in ["NET_ADMIN", "SYS_ADMIN", "BPF", "NET_RAW", "IPC_LOCK"] {
        assert!(caps.contains(&cap.to_string()), "missing capability {cap}");
    }
    let config: toml::Table = toml::from_str(config_map_data(&docs, "contiv-agent", "agent.toml")).unwrap();
    let status_port: u16 = config["statusAddr"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], json!("/readyz"));
    assert_eq!(agent["readinessProbe"]["httpGet"]["port"], json!(status_port));
    // Liveness waits for the start: joining the store may retry for minutes.
    let startup = &agent["startupProbe"];
    assert_eq!(startup["httpGet"]["port"], json!(status_port));
    let window = startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
    assert!(window >= 240, "the startup probe allows {window} s");
    assert!(agent["livenessProbe"]["initialDelaySeconds"].is_null());
    let mounts: Vec<String> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_string())
        .collect();
    let mounted = |p: &str| mounts.iter().any(|m| Path::new(p).starts_with(m));
    let tls = config["etcdTls"].as_table().unwrap();
    for path in [
        config["stateDir"].as_str().unwrap(),
        config["cniSocket"].as_str().unwrap(),
        config["bpfPinDir"].as_str().unwrap(),
        tls["caFile"].as_str().unwrap(),
        tls["certFile"].as_str().unwrap(),
        tls["keyFile"].as_str().unwrap(),
        config["services"]["cgroupRoot"].as_str().unwrap(),
        "/etc/contiv/agent.toml",
        "/run/netns",
        "/var/run/netns",
        // Not privileged, the agent finds /proc/sys read-only: it sets the node's net
        // sysctls through the host's /proc/sys/net mounted here (crate::sysctl).
        "/host/proc/sys/net/ipv4/ip_forward",
        // CNI_NETNS=/proc/<pid>/ns/net names a host PID (crate::podnet::runtime_netns_path).
        config["hostProcDir"].as_str().unwrap(),
        // The network config list install-cni staged, put in place once the agent is ready.
        config["cniConfStaged"].as_str().unwrap(),
    ] {
        assert!(mounted(path), "{path} (named by agent.toml or the runtime) is not mounted in the agent");
    }
    // The Services socket programs attach at the host's cgroup2 root, not at the
    // container's own cgroup namespace.
    let cgroup_root = config["services"]["cgroupRoot"].as_str().unwrap();
    let mount = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| Path::new(cgroup_root).starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap();
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert_eq!(volume["hostPath"]["path"], json!("/sys/fs/cgroup"), "cgroupRoot is the host's cgroup2 tree");
    let host_proc = config["hostProcDir"].as_str().unwrap();
    let mount = agent["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == host_proc).unwrap();
    assert_eq!(mount["readOnly"], json!(true));
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert_eq!(volume["hostPath"]["path"], json!("/proc"), "hostProcDir is the host's procfs");
    assert!(pod["hostPID"].is_null() || pod["hostPID"] == json!(false), "the agent needs no host PIDs");
    // The installer writes the host's CNI directories from the same ConfigMap.
    let install = container(ds, "install-cni");
    let argv = strings(&install["command"]);
    assert_eq!(&argv[..2], ["/usr/bin/contiv-cni", "install"]);
    // It stages the list where the agent looks for it (both see the host's directory at
    // the same place); contiv-cni's default name, as uninstall removes it.
    assert!(argv.contains(&"--staged".to_string()) && !argv.contains(&"--conf-name".to_string()), "{argv:?}");
    let conf_dir = &argv[argv.iter().position(|a| a == "--conf-dir").unwrap() + 1];
    assert_eq!(
        config["cniConfStaged"].as_str().unwrap(),
        format!("{conf_dir}/{}", contiv_cni::install::staged_name(contiv_cni::install::DEFAULT_CONF_NAME))
    );
    let conflist: Value = serde_json::from_str(config_map_data(&docs, "contiv-agent", "05-contiv.conflist")).unwrap();
    assert_eq!(
        conflist["plugins"][0]["agentSocket"].as_str(),
        config["cniSocket"].as_str(),
        "conflist and agent agree on the socket"
    );
    let etcd = find(&docs, "Service", "contiv-etcd");
    let node_port = etcd["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
    assert_eq!(
        config["etcdEndpoints"].as_array().unwrap()[0].as_str().unwrap(),
        format!("https://127.0.0.1:{node_port}")
    );
}

/// What the node's confinement would refuse, and what would wait for the pod network: a
/// container that is not privileged and writes under /sys/fs/ (bpffs) runs unconfined by
/// AppArmor (the runtime's default profile refuses writes there) and as SELinux's spc_t;
/// the agent may open a pod process's network namespace (hostProcDir); host-network
/// workloads resolve names with the node's resolver, not the cluster's DNS, which needs the
/// pod network they provide.
#[test]
fn bpffs_writers_are_not_confined_and_host_network_pods_use_the_nodes_resolver() {
    let mut writers = BTreeSet::new();
    for variant in VARIANTS {
        for d in rendered(variant).iter().filter(|d| matches!(d.kind(), "DaemonSet" | "Deployment")) {
            let (w, name) = (&d.value, d.name());
            let pod = &w["spec"]["template"]["spec"];
            if pod["hostNetwork"] == json!(true) {
                let dns = pod["dnsPolicy"].as_str();
                assert!(matches!(dns, None | Some("Default")), "deploy/{variant} {name}: dnsPolicy {dns:?}");
            }
            for c in containers(w) {
                let writes_bpffs = c["volumeMounts"].as_array().into_iter().flatten().any(|m| {
                    m["mountPath"].as_str().is_some_and(|p| p.starts_with("/sys/fs/")) && m["readOnly"] != json!(true)
                });
                if !writes_bpffs || c["securityContext"]["privileged"] == json!(true) {
                    continue;
                }
                let cname = c["name"].as_str().unwrap();
                writers.insert(format!("{name}/{cname}"));
                let key = format!("container.apparmor.security.beta.kubernetes.io/{cname}");
                assert_eq!(
                    w["spec"]["template"]["metadata"]["annotations"][&key],
                    json!("unconfined"),
                    "deploy/{variant} {name}: {cname} writes bpffs under the default AppArmor profile"
                );
                assert_eq!(
                    pod["securityContext"]["seLinuxOptions"]["type"],
                    json!("spc_t"),
                    "deploy/{variant} {name}: {cname} writes host paths as container_t"
                );
            }
        }
    }
    let want: BTreeSet<String> = ["contiv-agent/agent", "contiv-uninstall/cleanup"].map(String::from).into();
    assert_eq!(writers, want, "the containers that write bpffs without privilege");
    let docs = rendered(".");
    let agent = container(find(&docs, "DaemonSet", "contiv-agent"), "agent");
    let caps = strings(&agent["securityContext"]["capabilities"]["add"]);
    assert!(caps.contains(&"SYS_PTRACE".to_string()), "hostProcDir needs SYS_PTRACE: {caps:?}");
}

/// The README's overlay renames every image the manifests run: a name left as it is
/// resolves to a public registry's `contiv/...`.
#[test]
fn the_readmes_image_overlay_names_every_image() {
    let readme = std::fs::read_to_string(deploy_dir().join("README.md")).unwrap();
    let renamed: BTreeSet<&str> = readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- {name: "))
        .filter(|l| l.contains("newName:"))
        .filter_map(|l| l.split(',').next())
        .collect();
    let built: BTreeSet<&str> = IMAGES.iter().map(|i| i.name).collect();
    assert_eq!(renamed, built, "deploy/README.md's images: block");
}

// === the VPP variant ===

/// `name { ... }` sections of a VPP startup.conf, with their lines.
fn startup_sections(conf: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut depth = 0;
    for line in conf.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if depth == 0 {
            if let Some(name) = line.strip_suffix('{') {
                current = Some(name.trim().to_string());
                depth = 1;
                out.entry(name.trim().to_string()).or_default();
            }
            continue;
        }
        depth += line.matches('{').count();
        depth -= line.matches('}').count();
        if depth > 0 || line != "}" {
            out.entry(current.clone().unwrap()).or_default().push(line.to_string());
        }
    }
    out
}

#[test]
fn vpp_variant_adds_vpp_with_hugepages_and_a_startup_conf_matching_the_agent_config() {
    let docs = rendered("vpp");
    let ds = find(&docs, "DaemonSet", "contiv-agent");
    let vpp = container(ds, "vpp");
    assert_eq!(vpp["image"], json!("ligato/vpp-base:24.02"), "explicit, overridable with kustomize images:");
    let res = &vpp["resources"];
    assert_eq!(res["limits"]["hugepages-2Mi"], res["requests"]["hugepages-2Mi"], "hugepages need requests == limits");
    assert!(res["limits"]["memory"].is_string(), "hugepages need a memory limit");
    let config: toml::Table = toml::from_str(config_map_data(&docs, "contiv-agent", "agent.toml")).unwrap();
    assert_eq!(config["uplink"].as_str(), Some("vpp"));
    let sections = startup_sections(config_map_data(&docs, "contiv-vpp-startup", "startup.conf"));
    let setting = |section: &str, key: &str| {
        sections[section].iter().find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string())).unwrap_or_default()
    };
    assert_eq!(setting("socksvr", "socket-name"), config["vpp"]["apiSocket"].as_str().unwrap());
    assert_eq!(setting("statseg", "socket-name"), config["vpp"]["statsSocket"].as_str().unwrap());
    // The NIC DPDK takes is named as the agent looks it up (`[vpp] uplinkName`, default
    // uplink0); unnamed, VPP calls it after its bus address and the agent never finds it.
    let uplink_name = config["vpp"].get("uplinkName").and_then(|v| v.as_str()).unwrap_or("uplink0");
    assert!(sections["dpdk"].iter().any(|l| l == &format!("name {uplink_name}")), "{:?}", sections["dpdk"]);
    for plugin in ["dpdk_plugin.so", "af_xdp_plugin.so", "nat_plugin.so", "vxlan_plugin.so"] {
        assert!(sections["plugins"].iter().any(|l| l == &format!("plugin {plugin} {{ enable }}")), "{plugin} enabled");
    }
    // Agent and VPP share the directory of VPP's sockets.
    let socket_dir = Path::new(config["vpp"]["apiSocket"].as_str().unwrap()).parent().unwrap().to_owned();
    for c in ["agent", "vpp"] {
        let mounts = &container(ds, c)["volumeMounts"];
        assert!(
            mounts.as_array().unwrap().iter().any(|m| Path::new(m["mountPath"].as_str().unwrap()) == socket_dir),
            "{c} mounts {}",
            socket_dir.display()
        );
    }
    let agent = container(ds, "agent");
    assert!(agent["securityContext"]["privileged"].is_null(), "the merge kept the agent unprivileged");
    assert!(!strings(&agent["securityContext"]["capabilities"]["add"]).is_empty());
    // The merged DaemonSet is still a valid one.
    assert!(matches!(parse_strict(ds), Ok(Typed::DaemonSet(_))));
}

#[test]
fn vpp_variant_runs_contiv_stn_first_and_hands_the_nic_to_the_agent_through_its_state_file() {
    let docs = rendered("vpp");
    let ds = find(&docs, "DaemonSet", "contiv-agent");
    let spec = &ds["spec"]["template"]["spec"];
    let inits: Vec<&str> =
        spec["initContainers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(inits.last(), Some(&"stn"), "the stn sidecar starts after the other init containers: {inits:?}");
    let stn = container(ds, "stn");
    // A native sidecar: keeps running (and gives the NIC back on SIGTERM), and its startup
    // probe holds VPP and the agent back until the NIC is handed over.
    assert_eq!(stn["restartPolicy"], json!("Always"));
    assert_eq!(strings(&stn["startupProbe"]["exec"]["command"]), ["/usr/bin/contiv-stn", "show"]);
    assert_eq!(strings(&stn["securityContext"]["capabilities"]["add"]), ["NET_ADMIN"]);
    assert!(stn["securityContext"]["privileged"].is_null());
    // The NIC's name comes from the contiv-stn ConfigMap.
    let env = stn["env"].as_array().unwrap();
    let iface = env.iter().find(|e| e["name"] == "STN_INTERFACE").expect("STN_INTERFACE");
    assert_eq!(iface["valueFrom"]["configMapKeyRef"]["name"], json!("contiv-stn"));
    assert!(!config_map_data(&docs, "contiv-stn", "interface").is_empty());
    // The state file contiv-stn writes is the one the agent reads, in a directory both mount.
    let state = env.iter().find(|e| e["name"] == "CONTIV_STN_STATE_FILE").unwrap()["value"].as_str().unwrap();
    let config: toml::Table = toml::from_str(config_map_data(&docs, "contiv-agent", "agent.toml")).unwrap();
    assert_eq!(config["vpp"]["stnStateFile"].as_str(), Some(state));
    let dir = Path::new(state).parent().unwrap();
    for c in ["stn", "agent"] {
        let mounts = container(ds, c)["volumeMounts"].as_array().unwrap().clone();
        assert!(
            mounts.iter().any(|m| Path::new(m["mountPath"].as_str().unwrap()) == dir),
            "{c} mounts {}",
            dir.display()
        );
    }
    // The base variant (kernel uplink) runs no contiv-stn.
    let base = rendered(".");
    assert!(containers(find(&base, "DaemonSet", "contiv-agent")).iter().all(|c| c["name"] != "stn"));
}

// === TLS ===

#[tokio::test]
async fn gen_certs_script_makes_certificates_that_etcd_and_contiv_accept() {
    if Command::new("openssl").arg("version").output().is_err() {
        panic!("openssl (Debian package openssl) is needed: cargo xtask setup installs it");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("sh").arg(deploy_dir().join("tls/gen-certs.sh")).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "gen-certs.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("create secret generic contiv-etcd-client-tls"));
    let p = |n: &str| dir.path().join(n);
    let etcd = contiv_store::testing::EtcdServer::start_tls_files(&p("ca.crt"), &p("server.crt"), &p("server.key"))
        .expect("etcd starts with the script's server certificate");
    let tls = contiv_store::TlsConfig {
        ca_file: p("ca.crt"),
        cert_file: Some(p("client.crt")),
        key_file: Some(p("client.key")),
        server_name: None,
    };
    let mut config = contiv_store::StoreConfig::etcd([etcd.endpoint()]).with_tls(tls);
    config.dial_timeout_ms = 5000;
    let store = contiv_store::open(&config).await.expect("contiv connects with the script's client certificate");
    store.put("/contiv/tls-check", b"ok".to_vec(), None).await.unwrap();
    assert_eq!(store.get("/contiv/tls-check").await.unwrap().unwrap().value, b"ok");
}
