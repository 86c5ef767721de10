//! The agent binary refuses a bad configuration before touching anything.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_contiv-agent"))
}

#[test]
fn bad_config_exits_with_ex_config_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (text, needle) in [
        ("podSubnet = \"300.1.1.0/24\"", "podSubnet"),
        ("mtu = 1", "mtu"),
        ("nonsense = true", "nonsense"),
        ("gatewayMac = \"ff:ff:ff:ff:ff:ff\"", "gatewayMac"),
    ] {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let out = agent().arg("--config").arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("bad configuration") && err.contains(needle), "{text}: {err}");
    }
    let out = agent().arg("--config").arg(dir.path().join("missing.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn check_config_refuses_what_a_new_user_gets_wrong_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (text, needle) in [
        // The whole address space: the allocator's shift overflowed on it.
        ("podSubnet = \"10.0.0.0/0\"", "podSubnet 10.0.0.0/0"),
        ("podSubnetCIDR = \"10.0.0.0/0\"", "podSubnetCIDR 10.0.0.0/0"),
        // An empty socket path bound nothing, much later.
        ("cniSocket = \"\"", "cniSocket must not be empty"),
        ("stateDir = \"\"", "stateDir must not be empty"),
    ] {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let out = agent().arg("--config").arg(&path).arg("check-config").output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{text}: {}", String::from_utf8_lossy(&out.stdout));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("bad configuration") && err.contains(needle), "{text}: {err}");
        assert!(out.stdout.is_empty(), "{text}: nothing printed as if valid");
    }
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "nodeName = \"n7\"\nmtu = 1450\n").unwrap();
    let out = agent().arg("--config").arg(&path).arg("check-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("n7") && text.contains("1450"), "{text}");
}
