//! contiv-stn as root, in a throwaway network namespace where a veth stands in for the
//! node's NIC: the addresses and the default route are gone while it runs and back after
//! SIGTERM, after kill -9 plus a restart, and after kill -9 plus `contiv-stn restore`.
//! Skipped (one line) when not root.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    ($name:literal) => {
        if !is_root() {
            eprintln!("skipping {}: needs root (network namespaces)", $name);
            return;
        }
    };
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace with `nic0` (the "NIC", a veth) configured like a node's uplink.
struct NodeNs {
    name: String,
    dir: tempfile::TempDir,
}

impl NodeNs {
    /// A namespace with nothing in it but `lo`.
    fn bare_named(what: &str) -> Self {
        let name = format!("cstn-{what}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        Self { name, dir: tempfile::tempdir().unwrap() }
    }

    /// A namespace whose `nic0` is up but has no address or route yet.
    fn bare() -> Self {
        let name = format!("cstn-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        // From here on, Drop deletes the namespace, whatever fails next.
        let ns = Self { name, dir: tempfile::tempdir().unwrap() };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "link", "add", "nic0", "type", "veth", "peer", "name", "wire0"]);
        ip(&["-n", n, "link", "set", "nic0", "up"]);
        ip(&["-n", n, "link", "set", "wire0", "up"]);
        ns
    }

    /// Runs `ip -n <ns> <args>`.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn new() -> Self {
        let ns = Self::bare();
        let n = ns.name.as_str();
        ip(&["-n", n, "addr", "add", "192.168.77.2/24", "dev", "nic0"]);
        ip(&["-n", n, "addr", "add", "192.168.78.2/24", "dev", "nic0"]);
        ip(&["-n", n, "addr", "add", "2001:db8:77::2/64", "dev", "nic0", "nodad"]);
        ip(&["-n", n, "route", "add", "default", "via", "192.168.77.1", "dev", "nic0"]);
        ip(&["-n", n, "route", "add", "10.200.0.0/16", "via", "192.168.77.5", "dev", "nic0", "metric", "50"]);
        ip(&["-n", n, "-6", "route", "add", "2001:db8:99::/48", "via", "2001:db8:77::1", "dev", "nic0"]);
        ns
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("stn.json")
    }

    /// `ip -j` output of addresses and routes on nic0 (the config an operator would compare).
    fn config(&self) -> (Vec<String>, Vec<String>) {
        let addrs: Value = serde_json::from_str(&ip(&["-n", &self.name, "-j", "addr", "show", "dev", "nic0"])).unwrap();
        let mut a: Vec<String> = addrs[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["scope"] != "link")
            .map(|x| {
                let flag = if x["noprefixroute"] == true { " noprefixroute" } else { "" };
                format!("{}/{}{flag}", x["local"].as_str().unwrap(), x["prefixlen"])
            })
            .collect();
        a.sort();
        let mut routes = Vec::new();
        for fam in ["-4", "-6"] {
            let r: Value =
                serde_json::from_str(&ip(&["-n", &self.name, fam, "-j", "route", "show", "dev", "nic0"])).unwrap();
            for x in r.as_array().unwrap() {
                if x["dst"].as_str().is_some_and(|d| d.starts_with("fe80")) {
                    continue;
                }
                routes.push(format!(
                    "{} via {} metric {} proto {} scope {} src {}",
                    x["dst"].as_str().unwrap(),
                    x["gateway"].as_str().unwrap_or("-"),
                    x["metric"].as_u64().unwrap_or(0),
                    x["protocol"].as_str().unwrap_or("-"),
                    x["scope"].as_str().unwrap_or("-"),
                    x["prefsrc"].as_str().unwrap_or("-")
                ));
            }
        }
        routes.sort();
        (a, routes)
    }

    fn stn(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, env!("CARGO_BIN_EXE_contiv-stn"), "--state-file"]);
        c.arg(self.state_file()).args(args);
        c
    }

    fn start(&self) -> Child {
        self.start_with(&[])
    }

    /// [`NodeNs::start`] with more flags for `run`.
    fn start_with(&self, flags: &[&str]) -> Child {
        let mut args = vec!["run", "--interface", "nic0"];
        args.extend_from_slice(flags);
        let mut child = self.stn(&args).stdout(Stdio::null()).spawn().expect("contiv-stn");
        let deadline = Instant::now() + Duration::from_secs(10);
        // Taken by this process: its pid in the record (ip netns exec execs contiv-stn), and
        // nothing on the NIC. A record left by a killed run must not count: this run first
        // gives that back, then takes the NIC again.
        let recorded_pid = || -> Option<u64> {
            let v: Value = serde_json::from_slice(&std::fs::read(self.state_file()).ok()?).ok()?;
            v["pid"].as_u64()
        };
        while !(recorded_pid() == Some(u64::from(child.id())) && self.config() == (vec![], vec![])) {
            if Instant::now() > deadline {
                // Not left running (in a namespace about to be deleted) by the panic.
                let _ = child.kill();
                let _ = child.wait();
                panic!("contiv-stn did not take nic0: {:?}", self.config());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn wait(mut child: Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("contiv-stn did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, as the kubelet stops the sidecar, and its exit.
fn stop(child: Child) -> std::process::ExitStatus {
    signal(&child, libc::SIGTERM);
    wait(child)
}

/// A run that took the NIC, killed with SIGKILL: the record it left.
fn killed_while_holding(ns: &NodeNs) -> Value {
    let child = ns.start();
    signal(&child, libc::SIGKILL);
    let _ = wait(child);
    serde_json::from_slice(&std::fs::read(ns.state_file()).unwrap()).unwrap()
}

fn handover(path: &Path) -> Value {
    let v: Value = serde_json::from_slice(&std::fs::read(path).expect("state file")).unwrap();
    v["handover"].clone()
}

fn assert_taken(ns: &NodeNs) {
    let (addrs, routes) = ns.config();
    assert!(addrs.is_empty(), "addresses still on the host: {addrs:?}");
    assert!(routes.is_empty(), "routes still on the host: {routes:?}");
    let out = ip(&["-n", &ns.name, "route", "show", "default"]);
    assert!(out.trim().is_empty(), "default route still there: {out}");
}

#[test]
fn takes_the_nic_while_running_and_gives_it_back_on_sigterm_root() {
    require_root!("takes_the_nic_while_running_and_gives_it_back_on_sigterm_root");
    let ns = NodeNs::new();
    let before = ns.config();
    assert!(before.1.iter().any(|r| r.starts_with("default via 192.168.77.1")), "{before:?}");
    let child = ns.start();
    assert_taken(&ns);
    let h = handover(&ns.state_file());
    assert_eq!(h["addresses"], serde_json::json!(["192.168.77.2/24", "192.168.78.2/24"]), "node IP first");
    let routes = h["routes"].as_array().unwrap();
    assert!(routes.iter().any(|r| r["dst"] == "0.0.0.0/0" && r["gateway"] == "192.168.77.1"), "{routes:?}");
    assert!(routes.iter().any(|r| r["dst"] == "10.200.0.0/16" && r["gateway"] == "192.168.77.5"), "{routes:?}");
    assert_eq!(h["mtu"], 1500);
    assert!(stop(child).success());
    assert_eq!(ns.config(), before, "everything is back, metrics and IPv6 included");
    assert!(!ns.state_file().exists(), "the state file is gone once the NIC is back");
}

#[test]
fn after_kill_9_the_next_start_restores_first_root() {
    require_root!("after_kill_9_the_next_start_restores_first_root");
    let ns = NodeNs::new();
    let before = ns.config();
    let child = ns.start();
    let show = || ns.stn(&["show"]).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success();
    assert!(show(), "show (the startup probe) passes while the NIC is held");
    signal(&child, libc::SIGKILL);
    let _ = wait(child);
    assert_taken(&ns);
    assert!(ns.state_file().exists(), "the record survives the crash");
    // The record of a run that is gone holds nothing back: the next run gives the NIC back
    // (its link up) before it takes it again, and VPP must not start meanwhile.
    assert!(!show(), "show passes on the record of a run that is gone");

    // The next start gives the NIC back from the record, then takes it again: its record
    // (and handover) still describes the original configuration.
    let child = ns.start();
    assert_taken(&ns);
    assert!(show(), "show passes once the next run holds the NIC");
    assert_eq!(handover(&ns.state_file())["addresses"][0], "192.168.77.2/24");
    assert!(stop(child).success());
    assert_eq!(ns.config(), before);
}

/// A start after a crash while VPP holds the NIC (the host has no such interface, its PCI
/// function is on vfio-pci) keeps the previous run's record and the NIC where it is, rather
/// than giving it back under a running VPP; SIGTERM later gives back what that record holds.
#[test]
fn a_start_while_dpdk_holds_the_nic_keeps_the_record_root() {
    require_root!("a_start_while_dpdk_holds_the_nic_keeps_the_record_root");
    const PCI: &str = "0000:00:08.0";
    let ns = NodeNs::new();
    let before = ns.config();
    // VPP has the NIC: its PCI function (a veth here, so written into the record) is bound
    // to vfio-pci on a sysfs bus of our own, and the host has no nic0 (moved away).
    let mut record = killed_while_holding(&ns);
    record["pci_address"] = PCI.into();
    record["driver"] = "virtio-pci".into();
    std::fs::write(ns.state_file(), serde_json::to_vec(&record).unwrap()).unwrap();
    let bus = tempfile::tempdir().unwrap();
    let dev = bus.path().join("devices").join(PCI);
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::create_dir_all(bus.path().join("drivers/vfio-pci")).unwrap();
    std::os::unix::fs::symlink("../../drivers/vfio-pci", dev.join("driver")).unwrap();
    let held = NodeNs::bare_named("held");
    ns.ip(&["link", "set", "nic0", "netns", &held.name]);

    let mut c = ns.stn(&["run", "--interface", "nic0"]);
    let mut child = c.env("CONTIV_STN_PCI_ROOT", bus.path()).stdout(Stdio::null()).spawn().expect("contiv-stn");
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = || -> Option<u64> {
        let v: Value = serde_json::from_slice(&std::fs::read(ns.state_file()).ok()?).ok()?;
        v["pid"].as_u64()
    };
    while pid() != Some(u64::from(child.id())) {
        if Instant::now() > deadline {
            // Not left running (in a namespace about to be deleted) by the panic.
            let _ = child.kill();
            let _ = child.wait();
            panic!("the record was not kept for this run");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "contiv-stn keeps running with VPP holding the NIC");
    assert_eq!(handover(&ns.state_file())["addresses"][0], "192.168.77.2/24", "the original record");
    assert_eq!(std::fs::read_to_string(bus.path().join("devices").join(PCI).join("driver_override")).ok(), None);

    // VPP lets go and the NIC is back on the host: SIGTERM gives its configuration back.
    held.ip(&["link", "set", "nic0", "netns", &ns.name]);
    assert!(stop(child).success());
    assert_eq!(ns.config(), before);
    assert!(!ns.state_file().exists());
}

#[test]
fn after_kill_9_restore_gives_everything_back_root() {
    require_root!("after_kill_9_restore_gives_everything_back_root");
    let ns = NodeNs::new();
    let before = ns.config();
    let child = ns.start();
    signal(&child, libc::SIGKILL);
    let _ = wait(child);
    assert_taken(&ns);
    let out = ns.stn(&["restore"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ns.config(), before);
    assert!(!ns.state_file().exists());
    // Restoring again is harmless.
    assert!(ns.stn(&["restore"]).status().unwrap().success());
}

#[test]
fn a_missing_interface_is_a_clear_error_and_changes_nothing_root() {
    require_root!("a_missing_interface_is_a_clear_error_and_changes_nothing_root");
    let ns = NodeNs::new();
    let before = ns.config();
    let out = ns.stn(&["run", "--interface", "nosuch0"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nosuch0") && err.contains("not found"), "{err}");
    assert!(!ns.state_file().exists());
    assert_eq!(ns.config(), before);
}

/// An ECMP default route through two gateways of the NIC (a multipath route: no output
/// interface of its own, one per next hop) is recorded, handed over and given back; the
/// kernel drops it when the NIC's addresses go.
#[test]
fn a_multipath_default_route_through_the_nic_comes_back_root() {
    require_root!("a_multipath_default_route_through_the_nic_comes_back_root");
    let ns = NodeNs::bare();
    ns.ip(&["addr", "add", "192.168.77.2/24", "dev", "nic0"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "nexthop",
        "via",
        "192.168.77.1",
        "dev",
        "nic0",
        "nexthop",
        "via",
        "192.168.77.3",
        "dev",
        "nic0",
    ]);
    let default_route = || ns.ip(&["route", "show", "default"]);
    let before = (ns.config(), default_route());
    assert!(before.1.contains("nexthop via 192.168.77.3"), "{}", before.1);
    // What is checked while it runs is read first and asserted after the stop: a failed
    // assertion must not leave contiv-stn running in a namespace about to be deleted.
    let child = ns.start();
    let held = (ns.config(), default_route());
    let routes = handover(&ns.state_file())["routes"].clone();
    assert!(stop(child).success());
    assert_eq!(held, ((vec![], vec![]), String::new()), "nothing left on the host while held");
    assert!(
        routes.as_array().unwrap().iter().any(|r| r["dst"] == "0.0.0.0/0" && r["gateway"] == "192.168.77.1"),
        "the default route is handed over through its first gateway: {routes}"
    );
    assert_eq!((ns.config(), default_route()), before, "the multipath default route is back");
}

/// A NIC with no IPv4 address yet (DHCP pending) is not taken: VPP would have nothing to
/// serve the node with, and the host would be left without a network.
#[test]
fn a_nic_without_an_ipv4_address_is_not_taken_root() {
    require_root!("a_nic_without_an_ipv4_address_is_not_taken_root");
    let ns = NodeNs::bare();
    ns.ip(&["addr", "add", "2001:db8:77::2/64", "dev", "nic0", "nodad"]);
    let before = ns.config();
    let out = ns.stn(&["run", "--interface", "nic0"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nic0 has no IPv4 address"), "{err}");
    assert!(!ns.state_file().exists());
    assert_eq!(ns.config(), before);
    assert!(ns.ip(&["link", "show", "nic0"]).contains("state UP"), "the link is left up");
}

/// Runs contiv-stn until it exits on its own (or panics after 10 s); its status and stderr.
fn run_to_exit(mut c: Command) -> (std::process::ExitStatus, String) {
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("contiv-stn");
    let mut stderr = child.stderr.take().unwrap();
    let status = wait(child);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    (status, err)
}

fn recorded_routes(path: &Path) -> Vec<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).expect("state file")).unwrap();
    v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} metric {}", r["dst"].as_str().unwrap(), r["metric"].as_u64().unwrap_or(0)))
        .collect()
}

/// GCE: a /32 address, the gateway reachable only through an on-link host route, and the
/// default route through that gateway. The kernel lists the default route first; replayed
/// first it fails (ENETUNREACH), so the host route must come back before it.
#[test]
fn a_gce_like_on_link_gateway_and_the_default_route_through_it_come_back_root() {
    require_root!("a_gce_like_on_link_gateway_and_the_default_route_through_it_come_back_root");
    let ns = NodeNs::bare();
    ns.ip(&["addr", "add", "10.128.0.5/32", "dev", "nic0"]);
    ns.ip(&["route", "add", "10.128.0.1", "dev", "nic0", "proto", "dhcp", "scope", "link", "src", "10.128.0.5"]);
    ns.ip(&["route", "add", "default", "via", "10.128.0.1", "dev", "nic0", "proto", "dhcp", "src", "10.128.0.5"]);
    let before = ns.config();
    assert_eq!(before.1.len(), 2, "{before:?}");
    assert!(before.1[0].starts_with("10.128.0.1 via - metric 0 proto dhcp scope link"), "{before:?}");
    let child = ns.start();
    assert_taken(&ns);
    let routes = handover(&ns.state_file())["routes"].clone();
    assert!(routes.as_array().unwrap().iter().any(|r| r["dst"] == "10.128.0.1/32" && r["gateway"].is_null()));
    assert!(routes.as_array().unwrap().iter().any(|r| r["dst"] == "0.0.0.0/0" && r["gateway"] == "10.128.0.1"));
    let status = stop(child);
    assert_eq!(ns.config(), before, "every route is back");
    assert!(status.success(), "{status}");
    assert!(!ns.state_file().exists());
}

/// NetworkManager: addresses with `noprefixroute`, their subnet route added by NM as
/// `proto kernel` with metric 100. The kernel will not make that route again, so it is
/// recorded and given back; so is a `proto kernel` route at a metric the kernel does not
/// use. The connected route the kernel makes for a plain address is left to the kernel.
#[test]
fn network_manager_noprefixroute_subnet_routes_are_recorded_and_come_back_root() {
    require_root!("network_manager_noprefixroute_subnet_routes_are_recorded_and_come_back_root");
    let ns = NodeNs::bare();
    ns.ip(&["addr", "add", "192.168.50.2/24", "dev", "nic0", "noprefixroute"]);
    ns.ip(&[
        "route",
        "add",
        "192.168.50.0/24",
        "dev",
        "nic0",
        "proto",
        "kernel",
        "scope",
        "link",
        "src",
        "192.168.50.2",
        "metric",
        "100",
    ]);
    ns.ip(&["route", "add", "default", "via", "192.168.50.1", "dev", "nic0", "proto", "dhcp", "metric", "100"]);
    ns.ip(&["addr", "add", "192.168.60.2/24", "dev", "nic0"]);
    ns.ip(&[
        "route",
        "add",
        "192.168.60.0/24",
        "dev",
        "nic0",
        "proto",
        "kernel",
        "scope",
        "link",
        "src",
        "192.168.60.2",
        "metric",
        "600",
    ]);
    ns.ip(&["addr", "add", "2001:db8:50::2/64", "dev", "nic0", "noprefixroute", "nodad"]);
    ns.ip(&["-6", "route", "add", "2001:db8:50::/64", "dev", "nic0", "proto", "kernel", "metric", "100"]);
    let before = ns.config();
    assert!(before.0.contains(&"192.168.50.2/24 noprefixroute".to_string()), "{before:?}");
    let child = ns.start();
    assert_taken(&ns);
    let mut recorded = recorded_routes(&ns.state_file());
    recorded.sort();
    assert_eq!(
        recorded,
        [
            "0.0.0.0/0 metric 100",
            "192.168.50.0/24 metric 100",
            "192.168.60.0/24 metric 600",
            "2001:db8:50::/64 metric 100"
        ],
        "the kernel's own 192.168.60.0/24 (metric 0) is left to the kernel"
    );
    // VPP makes connected routes from the addresses itself: only the default route is handed over.
    assert_eq!(
        handover(&ns.state_file())["routes"],
        serde_json::json!([{"dst": "0.0.0.0/0", "gateway": "192.168.50.1"}])
    );
    let status = stop(child);
    assert_eq!(ns.config(), before, "every route is back");
    assert!(status.success(), "{status}");
}

/// A route that cannot come back does not keep the others from coming back: every failure
/// is reported, the exit is non-zero and the state file stays.
#[test]
fn a_route_that_cannot_come_back_does_not_stop_the_others_root() {
    require_root!("a_route_that_cannot_come_back_does_not_stop_the_others_root");
    let ns = NodeNs::new();
    let before = ns.config();
    // Without 192.168.77.2/24 the default route and 10.200.0.0/16 (both via 192.168.77.x)
    // cannot come back; everything else can.
    let mut v = killed_while_holding(&ns);
    v["addresses"].as_array_mut().unwrap().retain(|a| a["address"] != "192.168.77.2/24");
    std::fs::write(ns.state_file(), serde_json::to_vec(&v).unwrap()).unwrap();
    let (status, err) = run_to_exit(ns.stn(&["restore"]));
    let lost = |s: &String| s.starts_with("192.168.77.") || s.starts_with("default") || s.starts_with("10.200.");
    let expected: (Vec<String>, Vec<String>) = (
        before.0.iter().filter(|a| !lost(a)).cloned().collect(),
        before.1.iter().filter(|r| !lost(r)).cloned().collect(),
    );
    assert_eq!(ns.config(), expected, "all but the two routes came back; stderr: {err}");
    assert!(!status.success());
    assert!(err.contains("0.0.0.0/0") && err.contains("10.200.0.0/16"), "both failures reported: {err}");
    assert!(ns.state_file().exists(), "the state file stays when something could not be given back");
}

/// A take that fails (here: no CAP_NET_ADMIN, so nothing can be removed) whose rollback also
/// fails keeps the state file: it is the only record of the NIC's configuration.
#[test]
fn a_failed_take_whose_rollback_fails_keeps_the_state_file_root() {
    require_root!("a_failed_take_whose_rollback_fails_keeps_the_state_file_root");
    let ns = NodeNs::new();
    let before = ns.config();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, "setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]);
    c.args([env!("CARGO_BIN_EXE_contiv-stn"), "--state-file"]).arg(ns.state_file());
    c.args(["run", "--interface", "nic0"]);
    let (status, err) = run_to_exit(c);
    assert!(!status.success());
    assert!(ns.state_file().exists(), "the record is kept when the rollback failed: {err}");
    assert!(err.contains("taking nic0") && err.contains("putting back"), "both errors reported: {err}");
    assert_eq!(ns.config(), before);
    // With the capability, `contiv-stn restore` then finishes the job.
    let (status, err) = run_to_exit(ns.stn(&["restore"]));
    assert!(status.success(), "{err}");
    assert!(!ns.state_file().exists());
    assert_eq!(ns.config(), before);
}

/// `contiv-stn restore` without a state file (a node that never ran it, or where it gave
/// everything back) succeeds and changes nothing: the uninstall DaemonSet runs it on every node.
#[test]
fn restore_without_a_state_file_is_a_no_op_success() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir/stn.json");
    let out = Command::new(env!("CARGO_BIN_EXE_contiv-stn")).arg("--state-file").arg(&missing).arg("restore").output();
    let out = out.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to restore"));
    assert!(!missing.parent().unwrap().exists(), "nothing created");
}

/// VPP never gave the host a default route (it did not come up with the NIC): contiv-stn
/// gives the NIC back by itself, so the node is not left offline, and exits with an error.
#[test]
fn a_host_left_without_a_default_route_gets_its_nic_back_root() {
    require_root!("a_host_left_without_a_default_route_gets_its_nic_back_root");
    let ns = NodeNs::new();
    let before = ns.config();
    let child = ns.start_with(&["--give-back-after", "2"]);
    assert_taken(&ns);
    let status = wait(child);
    assert!(!status.success(), "exits with an error: {status:?}");
    assert_eq!(ns.config(), before, "everything is back");
    assert!(!ns.state_file().exists(), "nothing left to restore");
}

/// VPP's host interconnect gave the host a default route: contiv-stn keeps the NIC until
/// it is told to stop.
#[test]
fn a_default_route_through_vpp_keeps_the_nic_taken_root() {
    require_root!("a_default_route_through_vpp_keeps_the_nic_taken_root");
    let ns = NodeNs::new();
    let before = ns.config();
    let mut child = ns.start_with(&["--give-back-after", "2"]);
    // What VPP's tap gives the host.
    ns.ip(&["link", "add", "vpp1", "type", "veth", "peer", "name", "vpp1peer"]);
    ns.ip(&["addr", "add", "169.254.99.2/30", "dev", "vpp1"]);
    ns.ip(&["link", "set", "vpp1peer", "up"]);
    ns.ip(&["link", "set", "vpp1", "up"]);
    ns.ip(&["route", "add", "default", "via", "169.254.99.1", "dev", "vpp1"]);
    std::thread::sleep(Duration::from_secs(4));
    assert!(child.try_wait().unwrap().is_none(), "still holding the NIC");
    assert!(ns.config().0.is_empty(), "the NIC's addresses stay taken");
    ns.ip(&["link", "del", "vpp1"]);
    assert!(stop(child).success());
    assert_eq!(ns.config(), before);
}

/// The NIC is down while taken (VPP skips a device whose host interface is up), and the
/// MTU and MAC it had come back with it (a driver bound anew starts from its defaults).
#[test]
fn the_nic_is_down_while_taken_and_gets_its_mtu_and_mac_back_root() {
    require_root!("the_nic_is_down_while_taken_and_gets_its_mtu_and_mac_back_root");
    let ns = NodeNs::new();
    ns.ip(&["link", "set", "nic0", "mtu", "1460"]);
    let link = |ns: &NodeNs| -> Value { serde_json::from_str(&ns.ip(&["-j", "link", "show", "nic0"])).unwrap() };
    let before = ns.config();
    let mac = link(&ns)[0]["address"].as_str().unwrap().to_owned();
    let child = ns.start();
    let taken = link(&ns);
    assert!(!taken[0]["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "down while taken: {taken}");
    // As a driver bound anew would have it.
    ns.ip(&["link", "set", "nic0", "mtu", "1500", "address", "02:00:00:00:00:99"]);
    assert!(stop(child).success());
    let back = link(&ns);
    assert!(back[0]["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "up again: {back}");
    assert_eq!((back[0]["mtu"].as_u64(), back[0]["address"].as_str()), (Some(1460), Some(mac.as_str())));
    assert_eq!(ns.config(), before);
}
