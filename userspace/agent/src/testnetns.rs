//! Test helpers: a network namespace of a test's own, and `ip` inside it.

use std::path::PathBuf;

/// A namespace of this test's own (`<prefix><pid>`), deleted when dropped (also on failure).
pub struct TestNetns(pub String);

impl TestNetns {
    /// Creates it.
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}{}", std::process::id());
        let added = std::process::Command::new("ip").args(["netns", "add", &name]).status().expect("ip netns");
        assert!(added.success(), "ip netns add {name}");
        Self(name)
    }

    /// Its path under /run/netns.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `ip -n ns args`, which must succeed; its output.
pub fn ip(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip").arg("-n").arg(ns).args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
