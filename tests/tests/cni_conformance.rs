//! The real contiv-cni binary against a real agent (root): error codes, CHECK, STATUS,
//! GC, and chaining with Debian's containernetworking-plugins as libcni would run a
//! conflist (each plugin gets the previous one's result as prevResult; DEL in reverse);
//! the staged network config list the agent puts in place once ready; a DEL while no agent
//! runs, recorded and carried out later.

use std::path::Path;

use contiv_tests::{Netns, Node, NodeOptions, invoke_plugin, ping};
use serde_json::{Value, json};

fn node() -> Node {
    Node::start(NodeOptions::default())
}

#[test]
fn error_cases_return_the_spec_codes() {
    let node = node();
    let pod_ns = Netns::new("ctp");
    let netns = pod_ns.path().to_string_lossy().into_owned();
    let conf = node.net_conf("1.0.0");
    let cni = |env: &[(&str, &str)], stdin: &str| invoke_plugin(&contiv_tests::bin("contiv-cni"), env, stdin, None);

    // 4: a missing CNI_* variable, named in the message.
    let out = cni(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "x"), ("CNI_IFNAME", "eth0")], &conf);
    assert_eq!(out.error_code(), Some(4), "{out:?}");
    assert!(out.stdout.contains("CNI_NETNS"));
    assert_ne!(out.exit_code, 0);
    let out = cni(&[], &conf);
    assert_eq!(out.error_code(), Some(4));
    assert!(out.stdout.contains("CNI_COMMAND"));

    let add_env =
        [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "x"), ("CNI_NETNS", netns.as_str()), ("CNI_IFNAME", "eth0")];
    // 6: undecodable config.
    let out = cni(&add_env, "{bad");
    assert_eq!(out.error_code(), Some(6), "{out:?}");
    // 7: invalid config (no name).
    let out = cni(&add_env, r#"{"cniVersion":"1.0.0","type":"contiv-cni"}"#);
    assert_eq!(out.error_code(), Some(7), "{out:?}");
    // 1: unsupported version.
    let out = cni(&add_env, r#"{"cniVersion":"9.9.9","name":"n","type":"contiv-cni"}"#);
    assert_eq!(out.error_code(), Some(1), "{out:?}");
    // 11: agent not reachable.
    let gone = json!({"cniVersion":"1.0.0","name":"n","type":"contiv-cni","agentSocket":"/run/contiv-nowhere.sock"})
        .to_string();
    let out = cni(&add_env, &gone);
    assert_eq!(out.error_code(), Some(11), "{out:?}");
    // 50: STATUS with no agent.
    let gone11 = json!({"cniVersion":"1.1.0","name":"n","type":"contiv-cni","agentSocket":"/run/contiv-nowhere.sock"})
        .to_string();
    let out = cni(&[("CNI_COMMAND", "STATUS")], &gone11);
    assert_eq!(out.error_code(), Some(50), "{out:?}");
    // STATUS with the real agent ready: success, no output.
    let out = node.cni("STATUS", "", "", "", "1.1.0");
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""));
    // VERSION.
    let out = cni(&[("CNI_COMMAND", "VERSION")], &conf);
    assert_eq!(out.json()["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    // The failed ADDs left nothing behind.
    assert!(node.pod_links().is_empty());
}

#[test]
fn results_follow_the_requested_version_and_check_detects_damage() {
    let node = node();
    for version in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let ns = Netns::new("ctp");
        let id = contiv_tests::unique("v");
        let out = node.cni("ADD", &id, &ns.path().to_string_lossy(), "eth0", version);
        out.ok();
        let r = out.json();
        assert_eq!(r["cniVersion"], version);
        assert_eq!(r["ips"][0]["version"].as_str().is_some(), version.starts_with("0."), "{r}");
        assert_eq!(r["interfaces"][1]["mtu"].as_u64().is_some(), version == "1.1.0", "{r}");
        if version != "0.3.1" {
            let conf = json!({"cniVersion": version, "name": node.network_name, "type": "contiv-cni",
                "agentSocket": node.socket, "prevResult": r})
            .to_string();
            node.cni_with_conf("CHECK", &id, &ns.path().to_string_lossy(), "eth0", &conf).ok();
            // Break the pod's default route: CHECK must notice.
            ns.ip(&["route", "del", "default"]);
            let out = node.cni_with_conf("CHECK", &id, &ns.path().to_string_lossy(), "eth0", &conf);
            assert_ne!(out.exit_code, 0, "CHECK missed a deleted default route");
        }
        node.cni("DEL", &id, &ns.path().to_string_lossy(), "eth0", version).ok();
    }
}

#[test]
fn check_looks_in_the_namespace_the_runtime_names_and_at_each_part_add_set() {
    let node = node();
    let ns = Netns::new("ctp");
    let id = contiv_tests::unique("chk");
    let netns = ns.path().to_string_lossy().into_owned();
    let out = node.cni("ADD", &id, &netns, "eth0", "1.1.0");
    out.ok();
    let r = out.json();
    let gateway = r["ips"][0]["gateway"].as_str().expect("a gateway").to_owned();
    let conf = json!({"cniVersion": "1.1.0", "name": node.network_name, "type": "contiv-cni",
        "agentSocket": node.socket, "prevResult": r})
    .to_string();
    let check = |netns: &str| node.cni_with_conf("CHECK", &id, netns, "eth0", &conf);
    check(&netns).ok();

    // CHECK inspects CNI_NETNS, not the path ADD was given: another path to the same
    // namespace passes, a namespace without the interface fails.
    let holder = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "sleep", "60"])
        .spawn()
        .expect("a process in the pod namespace");
    let same = format!("/proc/{}/ns/net", holder.id());
    let in_ns = || std::fs::read_link(&same).ok() == std::fs::read_link("/proc/self/ns/net").ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while in_ns() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let through_proc = check(&same);
    let mut holder = holder;
    let _ = holder.kill();
    let _ = holder.wait();
    through_proc.ok();
    let other = Netns::new("ctp");
    let out = check(&other.path().to_string_lossy());
    assert_ne!(out.exit_code, 0, "CHECK passed on a namespace without the pod's interface: {out:?}");

    // Each part ADD set, broken and restored in turn.
    let neigh = ns.ip(&["neigh", "show", "dev", "eth0", &gateway]);
    let mac = neigh.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).expect("the gateway's MAC").to_owned();
    let mtu = r["interfaces"][1]["mtu"].to_string();
    let damage: [(&str, &[&str], &[&str]); 3] = [
        // Raised past what the path carries (lowered is a chained plugin's choice: see the
        // tuning chain below).
        ("MTU", &["link", "set", "eth0", "mtu", "9000"], &["link", "set", "eth0", "mtu", &mtu]),
        (
            "gateway neighbour MAC",
            &["neigh", "replace", &gateway, "lladdr", "02:00:00:00:00:99", "dev", "eth0", "nud", "permanent"],
            &["neigh", "replace", &gateway, "lladdr", &mac, "dev", "eth0", "nud", "permanent"],
        ),
        (
            "gateway neighbour state",
            &["neigh", "replace", &gateway, "lladdr", &mac, "dev", "eth0", "nud", "reachable"],
            &["neigh", "replace", &gateway, "lladdr", &mac, "dev", "eth0", "nud", "permanent"],
        ),
    ];
    for (what, breaks, repairs) in damage {
        ns.ip(breaks);
        let out = check(&netns);
        assert_ne!(out.exit_code, 0, "CHECK missed a changed {what}: {out:?}");
        ns.ip(repairs);
        check(&netns).ok();
    }
    // The scope-link route to the gateway (the default route stays in the kernel without it).
    ns.ip(&["route", "del", &format!("{gateway}/32"), "dev", "eth0"]);
    let out = check(&netns);
    assert_ne!(out.exit_code, 0, "CHECK missed the deleted route to the gateway: {out:?}");
    node.cni("DEL", &id, &netns, "eth0", "1.1.0").ok();
}

/// The host's procfs mounted at a directory of its own (what the DaemonSet's `/hostproc`
/// is); unmounted on drop.
struct HostProc(std::path::PathBuf);

impl HostProc {
    fn mount() -> Self {
        let dir = std::env::temp_dir().join(contiv_tests::unique("contiv-hostproc-"));
        std::fs::create_dir_all(&dir).unwrap();
        contiv_tests::run(std::process::Command::new("mount").args(["-t", "proc", "proc"]).arg(&dir));
        Self(dir)
    }
}

impl Drop for HostProc {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A runtime that names the pod's namespace by its process (`/proc/<pid>/ns/net`, as
/// cri-dockerd does) gives a PID of the host's; an agent with a PID namespace of its own
/// (a DaemonSet without hostPID) wires the pod through `hostProcDir`, the host's procfs,
/// and without it refuses the path as a namespace that does not exist (not another
/// process's namespace).
#[test]
fn a_namespace_named_by_a_host_process_is_wired_by_an_agent_with_its_own_pids() {
    let host_proc = HostProc::mount();
    // The agent's own /proc needs a mount namespace of its own, where this machine's
    // /sys/fs/bpf (a private mount) propagates nowhere: the agent would refuse it. The pins
    // are in the same bpffs all the same.
    const PRIVATE_BPFFS: &str = "allowPrivateBpffs = true\n";
    let node = Node::start(NodeOptions {
        own_pid_namespace: true,
        extra_config: format!("{PRIVATE_BPFFS}hostProcDir = \"{}\"\n", host_proc.0.display()),
        ..NodeOptions::default()
    });
    let plain = Node::start(NodeOptions {
        own_pid_namespace: true,
        pod_subnet: Some("10.1.2.0/24".into()),
        extra_config: PRIVATE_BPFFS.into(),
        ..NodeOptions::default()
    });
    let ns = Netns::new("ctp");
    let mut holder =
        std::process::Command::new("ip").args(["netns", "exec", ns.name(), "sleep", "60"]).spawn().expect("a holder");
    let by_process = format!("/proc/{}/ns/net", holder.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // The holder is in the pod's namespace once both paths name the same nsfs inode.
    let inode = |p: &Path| std::fs::metadata(p).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    while inode(Path::new(&by_process)) != inode(&ns.path()) {
        assert!(std::time::Instant::now() < deadline, "the holder never entered {}", ns.name());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    let id = contiv_tests::unique("pid");
    let out = plain.cni("ADD", &id, &by_process, "eth0", "1.1.0");
    assert_eq!(out.error_code(), Some(4), "without hostProcDir the agent cannot see the host's PID: {out:?}");
    assert!(out.stdout.contains("CNI_NETNS"), "{out:?}");
    assert!(plain.pod_links().is_empty(), "the refused ADD left nothing behind");

    let out = node.cni("ADD", &id, &by_process, "eth0", "1.1.0");
    out.ok();
    let r = out.json();
    let ip = contiv_tests::pod_ip(&r);
    assert!(ns.ip(&["-4", "addr", "show", "dev", "eth0"]).contains(&format!("{ip}/")), "the pod got its address");
    assert_eq!(r["interfaces"][1]["sandbox"], by_process.as_str(), "the result names the sandbox as given");
    assert!(ping(&ns, r["ips"][0]["gateway"].as_str().unwrap().parse().unwrap(), 1), "the pod reaches its gateway");
    let conf = json!({"cniVersion": "1.1.0", "name": node.network_name, "type": "contiv-cni",
        "agentSocket": node.socket, "prevResult": r})
    .to_string();
    node.cni_with_conf("CHECK", &id, &by_process, "eth0", &conf).ok();
    let _ = holder.kill();
    let _ = holder.wait();
    node.cni("DEL", &id, &by_process, "eth0", "1.1.0").ok();
    assert!(node.pod_links().is_empty(), "DEL after the process left removed the pod's link");
}

#[test]
fn gc_removes_attachments_not_listed_as_valid() {
    let node = node();
    let keep = node.add_pod();
    let stale1 = node.add_pod();
    let stale2 = node.add_pod();
    let conf = json!({
        "cniVersion": "1.1.0", "name": node.network_name, "type": "contiv-cni", "agentSocket": node.socket,
        "cni.dev/valid-attachments": [{"containerID": keep.container_id, "ifname": "eth0"}],
    })
    .to_string();
    node.cni_with_conf("GC", "", "", "", &conf).ok();
    assert_eq!(node.pod_links().len(), 1);
    assert!(node.pod_counters(stale1.ip).is_none() && node.pod_counters(stale2.ip).is_none());
    assert!(node.pod_counters(keep.ip).is_some());
    assert!(ping(&keep.ns, "10.1.1.1".parse().unwrap(), 1));
}

/// Runs a conflist the way libcni does: ADD in order with prevResult threaded through.
fn conflist_add(node: &Node, plugins: &[Value], id: &str, netns: &str) -> Value {
    let mut prev: Option<Value> = None;
    for p in plugins {
        prev = Some(invoke_in_chain(node, "ADD", p, id, netns, prev.as_ref()).json());
    }
    prev.unwrap()
}

/// One plugin of the list, given the list's name and version (and prevResult) as libcni does.
fn invoke_in_chain(
    node: &Node,
    command: &str,
    plugin: &Value,
    id: &str,
    netns: &str,
    prev: Option<&Value>,
) -> contiv_tests::CniOutput {
    let mut conf = plugin.clone();
    conf["cniVersion"] = json!("1.0.0");
    conf["name"] = json!(node.network_name);
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    let ty = conf["type"].as_str().unwrap().to_owned();
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ];
    let out = invoke_plugin(&plugin_path(&ty), &env, &conf.to_string(), Some(node.ns.name()));
    assert_eq!(out.exit_code, 0, "{ty} {command} failed: {} {}", out.stdout, out.stderr);
    out
}

fn conflist_run(node: &Node, command: &str, plugins: &[Value], id: &str, netns: &str, result: &Value) {
    let order: Vec<&Value> = if command == "DEL" { plugins.iter().rev().collect() } else { plugins.iter().collect() };
    for p in order {
        invoke_in_chain(node, command, p, id, netns, Some(result));
    }
}

fn plugin_path(ty: &str) -> std::path::PathBuf {
    if ty == "contiv-cni" {
        return contiv_tests::bin("contiv-cni");
    }
    let p = Path::new("/usr/lib/cni").join(ty);
    assert!(p.exists(), "{} missing: `cargo xtask setup` installs containernetworking-plugins", p.display());
    p
}

#[test]
fn chains_with_debian_tuning_and_bandwidth_plugins() {
    let node = node();
    let plugins = vec![
        json!({"type": "contiv-cni", "agentSocket": node.socket}),
        json!({"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.rp_filter": "2"}, "mtu": 1300}),
        json!({"type": "bandwidth", "ingressRate": 800_000_000u64, "ingressBurst": 1_000_000u64,
               "egressRate": 800_000_000u64, "egressBurst": 1_000_000u64}),
    ];
    let a = Netns::new("ctp");
    let b = Netns::new("ctp");
    let (ida, idb) = (contiv_tests::unique("ch"), contiv_tests::unique("ch"));
    let ra = conflist_add(&node, &plugins, &ida, &a.path().to_string_lossy());
    let rb = conflist_add(&node, &plugins, &idb, &b.path().to_string_lossy());
    // The chained result still carries our interfaces and address, plus bandwidth's ifb.
    assert_eq!(ra["cniVersion"], "1.0.0");
    assert_eq!(ra["interfaces"][1]["name"], "eth0");
    assert!(ra["ips"][0]["address"].as_str().unwrap().ends_with("/32"));
    let names: Vec<&str> = ra["interfaces"].as_array().unwrap().iter().filter_map(|i| i["name"].as_str()).collect();
    assert!(names.iter().any(|n| n.starts_with("bwp")), "bandwidth's ifb missing from {names:?}");
    // tuning applied its sysctl inside the pod.
    let v = contiv_tests::run(a.cmd("cat").arg("/proc/sys/net/ipv4/conf/eth0/rp_filter"));
    assert_eq!(v.trim(), "2");
    // And lowered the interface's MTU, which CHECK allows (the spec: a later plugin may
    // change what an earlier one set).
    assert!(a.ip(&["link", "show", "eth0"]).contains("mtu 1300"), "tuning's mtu");
    // Traffic still flows through our datapath. (The bandwidth plugin's qdiscs never see
    // fast-path traffic; contiv-cni enforces the `bandwidth` capability itself, see
    // node_datapath's bandwidth test.)
    let ipb = contiv_tests::pod_ip(&rb);
    assert!(ping(&a, ipb, 2), "chained pods cannot talk");
    conflist_run(&node, "CHECK", &plugins, &ida, &a.path().to_string_lossy(), &ra);
    conflist_run(&node, "DEL", &plugins, &ida, &a.path().to_string_lossy(), &ra);
    conflist_run(&node, "DEL", &plugins, &idb, &b.path().to_string_lossy(), &rb);
    assert!(node.pod_links().is_empty(), "DEL of the chain left veths");
    let links = node.ns.ip(&["-o", "link", "show"]);
    assert!(!links.contains("bwp"), "bandwidth's ifb left behind: {links}");
}

#[test]
fn network_config_mtu_and_dns_reach_the_pod_and_the_result() {
    let node = node();
    let ns = Netns::new("ctp");
    let id = contiv_tests::unique("m");
    let conf = json!({"cniVersion": "1.1.0", "name": node.network_name, "type": "contiv-cni",
        "agentSocket": node.socket, "mtu": 1400,
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"], "options": null,
                "sortlist": ["10.0.0.0/8"]}})
    .to_string();
    let out = node.cni_with_conf("ADD", &id, &ns.path().to_string_lossy(), "eth0", &conf);
    out.ok();
    let r = out.json();
    assert_eq!(r["interfaces"][1]["mtu"], 1400, "{r}");
    assert_eq!(r["dns"]["nameservers"], json!(["10.96.0.10"]), "{r}");
    assert_eq!(r["dns"]["search"], json!(["svc.cluster.local"]), "{r}");
    assert!(ns.ip(&["link", "show", "eth0"]).contains("mtu 1400"));
    // A bad MTU (here one the overlay cannot carry) is an invalid configuration, refused
    // alike by contiv-cni and the agent, and builds nothing.
    let bad = json!({"cniVersion": "1.1.0", "name": node.network_name, "type": "contiv-cni",
        "agentSocket": node.socket, "mtu": 9001})
    .to_string();
    let ns2 = Netns::new("ctp");
    let out = node.cni_with_conf("ADD", "bad-mtu", &ns2.path().to_string_lossy(), "eth0", &bad);
    assert_eq!(out.error_code(), Some(7), "{out:?}");
    assert_eq!(node.pod_links().len(), 1);
}

/// A copy of contiv-cni that any user may run (the build directory may not be), in a
/// directory removed on drop.
struct WorldExecutable {
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl WorldExecutable {
    fn contiv_cni() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(contiv_tests::unique("contiv-cni-any-"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("contiv-cni");
        std::fs::copy(contiv_tests::bin("contiv-cni"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir, bin }
    }
}

impl Drop for WorldExecutable {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_non_root_caller_is_told_it_must_run_as_root_with_code_5_not_try_again() {
    let node = node();
    let pod_ns = Netns::new("ctp");
    let netns = pod_ns.path().to_string_lossy().into_owned();
    let cni = WorldExecutable::contiv_cni();
    // The agent's real socket (root, 0600), contiv-cni as `nobody`.
    let setpriv = Path::new("/usr/bin/setpriv");
    assert!(setpriv.exists(), "setpriv missing: `cargo xtask setup` installs util-linux");
    let env =
        [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "nonroot"), ("CNI_NETNS", netns.as_str()), ("CNI_IFNAME", "eth0")];
    let mut cmd = std::process::Command::new(setpriv);
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&cni.bin);
    cmd.env_clear().envs(env).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("setpriv");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), node.net_conf("1.1.0").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).expect("an error object on stdout");
    assert_eq!(v["code"], 5, "{v}");
    assert!(v["msg"].as_str().unwrap().contains("must run as root"), "{v}");
    let details = v["details"].as_str().unwrap();
    assert!(details.contains(&node.socket.to_string_lossy().into_owned()), "{v}");
    assert!(
        details.contains("owned by uid 0") && details.contains("mode 0600") && details.contains("uid 65534"),
        "{v}"
    );
    // Refused before the agent saw anything; root with the same input succeeds.
    assert!(node.pod_links().is_empty());
    let out = invoke_plugin(&cni.bin, &env, &node.net_conf("1.1.0"), None);
    assert_eq!(out.exit_code, 0, "{out:?}");
    node.cni("DEL", "nonroot", &netns, "eth0", "1.1.0").ok();
}

#[test]
fn ipam_exhaustion_is_plugin_code_101_and_a_del_frees_an_address() {
    // A /29: network, gateway (.1) and broadcast leave five pod addresses.
    let node = Node::start(NodeOptions { pod_subnet: Some("10.1.1.0/29".into()), ..NodeOptions::default() });
    let pods: Vec<contiv_tests::Pod> = (0..4).map(|_| node.add_pod()).collect();
    assert_eq!(node.cni("STATUS", "", "", "", "1.1.0").exit_code, 0, "one address left");
    let pods: Vec<contiv_tests::Pod> = pods.into_iter().chain([node.add_pod()]).collect();
    // STATUS says so before an ADD fails (the spec: resources exhausted), with code 50.
    let status = node.cni("STATUS", "", "", "", "1.1.0").json();
    assert_eq!((status["code"].as_u64(), &status["msg"]), (Some(50), &json!("no free pod address")), "{status}");
    let ns = Netns::new("ctp");
    let out = node.cni("ADD", "one-too-many", &ns.path().to_string_lossy(), "eth0", "1.1.0");
    let v = out.json();
    let code = v["code"].as_u64().unwrap_or_else(|| panic!("not an error: {v}"));
    assert!(code >= 100, "plugin-specific errors are 100 and up (0-99 are the spec's): {v}");
    assert_eq!(code, 101, "{v}");
    assert_eq!(v["msg"], "no free pod address", "{v}");
    assert!(v["details"].as_str().unwrap().contains("10.1.1.0/29"), "{v}");
    // Nothing was built for the refused ADD.
    assert_eq!(node.pod_links().len(), 5);
    assert!(ns.ip(&["-o", "link", "show"]).lines().all(|l| !l.contains("eth0")));
    // A DEL frees one, and the next ADD gets it.
    node.del_pod(&pods[2]).ok();
    assert_eq!(node.cni("STATUS", "", "", "", "1.1.0").exit_code, 0, "an address is free again");
    let out = node.cni("ADD", "one-too-many", &ns.path().to_string_lossy(), "eth0", "1.1.0");
    out.ok();
    assert_eq!(contiv_tests::pod_ip(&out.json()), pods[2].ip);
}

/// An ADD of an attachment that exists is an error (the spec: the interface is already in
/// the container), also when repeated as it was; the attachment stays as it is.
#[test]
fn a_repeated_add_is_code_102_and_leaves_the_pod_as_it_is() {
    let node = node();
    let pod = node.add_pod();
    let netns = pod.ns.path().to_string_lossy().into_owned();
    let out = node.cni("ADD", &pod.container_id, &netns, "eth0", "1.1.0");
    let v = out.json();
    assert_eq!(v["code"], 102, "{v}");
    assert_eq!(v["msg"], "attachment already exists", "{v}");
    assert!(v["details"].as_str().unwrap().contains(&pod.ip.to_string()), "{v}");
    assert_ne!(out.exit_code, 0);
    let other = Netns::new("ctp");
    let v = node.cni("ADD", &pod.container_id, &other.path().to_string_lossy(), "eth0", "1.1.0").json();
    assert_eq!(v["code"], 102, "in another namespace too: {v}");
    // The pod kept its interface and address, and is still served.
    assert_eq!(node.pod_links().len(), 1);
    assert!(pod.ns.ip(&["-4", "-o", "addr", "show", "eth0"]).contains(&pod.ip.to_string()));
    assert!(ping(&pod.ns, "10.1.1.1".parse().unwrap(), 1), "the pod still reaches its gateway");
}

/// install-cni leaves the network config list as `<name>.staged`, which runtimes do not
/// load; the agent puts it in place once it is ready (`cniConfStaged`), so a node whose
/// agent cannot start never looks ready for pods.
#[test]
fn the_agent_puts_the_staged_network_config_in_place_once_ready() {
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let conf = Dir(std::env::temp_dir().join(contiv_tests::unique("contiv-netd-")));
    std::fs::create_dir_all(&conf.0).unwrap();
    let (staged, target) = (conf.0.join("05-contiv.conflist.staged"), conf.0.join("05-contiv.conflist"));
    std::fs::write(&staged, "{\"cniVersion\": \"1.0.0\", \"name\": \"contiv\", \"plugins\": []}\n").unwrap();
    let node = Node::start(NodeOptions {
        extra_config: format!("cniConfStaged = \"{}\"\n", staged.display()),
        ..NodeOptions::default()
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !target.exists() {
        assert!(std::time::Instant::now() < deadline, "the agent never put {} in place", target.display());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!staged.exists(), "renamed, not copied");
    assert!(std::fs::read_to_string(&target).unwrap().contains("\"name\": \"contiv\""));
    drop(node);
}

/// DEL while no agent runs (crash-looping, between an upgrade's pods, uninstalled)
/// succeeds, as the spec asks of DEL: kubelet would otherwise keep the pod Terminating. It
/// is recorded beside the socket, and the agent, running again, carries it out.
#[test]
fn a_del_while_no_agent_runs_succeeds_and_the_agent_carries_it_out() {
    let mut node = Node::start(NodeOptions::default());
    let pod = node.add_pod();
    let netns = pod.ns.path().to_string_lossy().into_owned();
    node.stop_agent();
    let add = node.cni("ADD", &contiv_tests::unique("late"), &netns, "eth1", "1.1.0");
    assert_eq!(add.exit_code, 1, "only DEL is deferred: {add:?}");
    let del = node.cni("DEL", &pod.container_id, &netns, &pod.ifname, "1.1.0");
    assert_eq!(del.exit_code, 0, "{del:?}");
    let pending = Path::new(&node.socket).parent().unwrap().join("pending-del");
    assert_eq!(std::fs::read_dir(&pending).unwrap().count(), 1, "recorded for the agent");
    node.start_agent();
    let released = format!("released {}", pod.ip);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !node.agent_log().contains(&released) || std::fs::read_dir(&pending).unwrap().count() != 0 {
        assert!(std::time::Instant::now() < deadline, "the recorded DEL was not carried out: {}", node.agent_log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The pod is gone from the agent's records: CHECK finds nothing to check.
    let conf = json!({"cniVersion": "1.1.0", "name": node.network_name, "type": "contiv-cni",
        "agentSocket": node.socket, "prevResult": pod.result})
    .to_string();
    let check = node.cni_with_conf("CHECK", &pod.container_id, &netns, &pod.ifname, &conf);
    assert_ne!(check.exit_code, 0, "{check:?}");
}

/// A DEL contiv-cni recorded while the agent did not answer comes before an ADD of the
/// same attachment that reaches the agent first (a runtime retrying its ADD): the agent
/// carries the DEL out first, the ADD succeeds, and no later pass over the records undoes
/// the new attachment.
#[test]
fn a_recorded_del_is_carried_out_before_an_add_of_the_same_attachment() {
    let node = node();
    let pod = node.add_pod();
    let netns = pod.ns.path().to_string_lossy().into_owned();
    // The agent's socket is away for a moment (as between an upgrade's two agents): the
    // DEL is recorded for it.
    let away = node.socket.with_extension("away");
    std::fs::rename(&node.socket, &away).unwrap();
    let del = node.cni("DEL", &pod.container_id, &netns, &pod.ifname, "1.1.0");
    std::fs::rename(&away, &node.socket).unwrap();
    assert_eq!(del.exit_code, 0, "{del:?}");
    let pending = node.socket.parent().unwrap().join("pending-del");
    let recorded = || std::fs::read_dir(&pending).map_or(0, |d| d.count());
    assert_eq!(recorded(), 1, "recorded for the agent");

    // The runtime's ADD of the attachment, in a new namespace.
    let fresh = Netns::new("ctp");
    let fresh_path = fresh.path().to_string_lossy().into_owned();
    let add = node.cni("ADD", &pod.container_id, &fresh_path, &pod.ifname, "1.1.0");
    add.ok();
    assert_eq!(recorded(), 0, "the recorded DEL was done first");
    // (Done by the ADD; or by the agent's pass over the records, every 10 s, had it come
    // in between.)
    let log = node.agent_log();
    assert!(log.contains("done before its ADD") || log.contains("recorded while no agent ran: done"), "{log}");
    // Past the agent's next pass over the records (every 10 s), the new attachment stands.
    std::thread::sleep(std::time::Duration::from_secs(11));
    let conf = json!({"cniVersion": "1.1.0", "name": node.network_name, "type": "contiv-cni",
        "agentSocket": node.socket, "prevResult": add.json()})
    .to_string();
    node.cni_with_conf("CHECK", &pod.container_id, &fresh_path, &pod.ifname, &conf).ok();
    assert_eq!(node.pod_links().len(), 1, "the new attachment's interface alone");
}

/// contiv-cni is a pod's first network: a pod whose namespace routes already (another
/// network through Multus, or contiv-cni's own first attachment) is refused with a message
/// that says so, not a netlink "File exists", and no interface of the refused ADD is left
/// (the failed ADD's usual undo); the first attachment keeps working.
#[test]
fn an_add_into_a_namespace_another_network_routes_is_refused_and_leaves_nothing() {
    let node = node();
    let pod = node.add_pod();
    let netns = pod.ns.path().to_string_lossy().into_owned();
    let second = node.cni("ADD", &pod.container_id, &netns, "net1", "1.1.0").json();
    assert_eq!(second["code"], 100, "{second}");
    assert_eq!(second["msg"], "contiv-cni must be the pod's first network", "{second}");
    assert!(second["details"].as_str().unwrap().contains("a default route via 10.1.1.1"), "{second}");
    assert!(pod.ns.ip(&["-o", "link", "show"]).lines().all(|l| !l.contains("net1")), "no net1 left behind");

    // A namespace another plugin wired first (its default route through a device of its own).
    let other = Netns::new("ctp");
    other.ip(&["link", "add", "first0", "type", "veth", "peer", "name", "first1"]);
    other.ip(&["addr", "add", "192.0.2.10/24", "dev", "first0"]);
    for dev in ["first0", "first1"] {
        other.ip(&["link", "set", dev, "up"]);
    }
    other.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    let v = node.cni("ADD", &contiv_tests::unique("multus"), &other.path().to_string_lossy(), "net1", "1.1.0").json();
    assert_eq!(v["msg"], "contiv-cni must be the pod's first network", "{v}");
    assert!(v["details"].as_str().unwrap().contains("a default route via 192.0.2.1"), "{v}");
    assert_eq!(node.pod_links().len(), 1, "only the first pod's host interface");
    assert!(ping(&pod.ns, "10.1.1.1".parse().unwrap(), 1), "the first pod still reaches its gateway");
}
