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
    fn new() -> Self {
        let name = format!("cstn-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        let ns = Self { name, dir: tempfile::tempdir().unwrap() };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "link", "add", "nic0", "type", "veth", "peer", "name", "wire0"]);
        ip(&["-n", n, "link", "set", "nic0", "up"]);
        ip(&["-n", n, "link", "set", "wire0", "up"]);
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
            .map(|x| format!("{}/{}", x["local"].as_str().unwrap(), x["prefixlen"]))
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
                    "{} via {} metric {} proto {}",
                    x["dst"].as_str().unwrap(),
                    x["gateway"].as_str().unwrap_or("-"),
                    x["metric"].as_u64().unwrap_or(0),
                    x["protocol"].as_str().unwrap_or("-")
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
        let child = self.stn(&["run", "--interface", "nic0"]).stdout(Stdio::null()).spawn().expect("contiv-stn");
        let deadline = Instant::now() + Duration::from_secs(10);
        // Taken by this process: its pid in the record (ip netns exec execs contiv-stn), and
        // nothing on the NIC. A record left by a killed run must not count: this run first
        // gives that back, then takes the NIC again.
        let recorded_pid = || -> Option<u64> {
            let v: Value = serde_json::from_slice(&std::fs::read(self.state_file()).ok()?).ok()?;
            v["pid"].as_u64()
        };
        while !(recorded_pid() == Some(u64::from(child.id())) && self.config() == (vec![], vec![])) {
            assert!(Instant::now() < deadline, "contiv-stn did not take nic0: {:?}", self.config());
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
    signal(&child, libc::SIGTERM);
    assert!(wait(child).success());
    assert_eq!(ns.config(), before, "everything is back, metrics and IPv6 included");
    assert!(!ns.state_file().exists(), "the state file is gone once the NIC is back");
}

#[test]
fn after_kill_9_the_next_start_restores_first_root() {
    require_root!("after_kill_9_the_next_start_restores_first_root");
    let ns = NodeNs::new();
    let before = ns.config();
    let child = ns.start();
    signal(&child, libc::SIGKILL);
    let _ = wait(child);
    assert_taken(&ns);
    assert!(ns.state_file().exists(), "the record survives the crash");

    // The next start gives the NIC back from the record, then takes it again: its record
    // (and handover) still describes the original configuration.
    let child = ns.start();
    assert_taken(&ns);
    assert_eq!(handover(&ns.state_file())["addresses"][0], "192.168.77.2/24");
    signal(&child, libc::SIGTERM);
    assert!(wait(child).success());
    assert_eq!(ns.config(), before);
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
