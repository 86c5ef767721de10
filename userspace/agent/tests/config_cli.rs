//! The agent binary refuses a bad configuration before touching anything; `check-config` and
//! `render-startup-conf` as an operator runs them (no root): the [vpp] section is validated and
//! shown, and VPP's startup.conf comes out of it.

use std::process::{Command, Output};

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

fn agent_with(config: &str, command: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_contiv-agent"))
        .arg("--config")
        .arg(&path)
        .arg(command)
        .env("RUST_LOG", "off")
        .output()
        .expect("running contiv-agent")
}

const VPP_CONFIG: &str = r#"
nodeName = "n1"
uplink = "vpp"
[vpp]
apiSocket = "/run/vpp/contiv-api.sock"
uplinkPci = "0000:00:08.0"
uplinkName = "uplink0"
rxQueues = 2
rxDescriptors = 2048
txDescriptors = 512
mainCore = 0
workerCores = [1, 2]
"#;

#[test]
fn render_startup_conf_prints_the_nic_cpus_plugins_and_socket() {
    let out = agent_with(VPP_CONFIG, "render-startup-conf");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conf = String::from_utf8(out.stdout).unwrap();
    for line in [
        "socket-name /run/vpp/contiv-api.sock",
        "dev 0000:00:08.0 {",
        "name uplink0",
        "num-rx-queues 2",
        "num-rx-desc 2048",
        "num-tx-desc 512",
        "main-core 0",
        "corelist-workers 1-2",
        "plugin default { disable }",
        "plugin af_xdp_plugin.so { enable }",
        "plugin nat_plugin.so { enable }",
        "plugin vxlan_plugin.so { enable }",
    ] {
        assert!(conf.contains(line), "{line:?} missing in\n{conf}");
    }
}

#[test]
fn render_startup_conf_without_a_nic_is_a_config_error() {
    let out = agent_with("uplink = \"vpp\"\n", "render-startup-conf");
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG");
    assert!(String::from_utf8_lossy(&out.stderr).contains("uplinkPci"), "names the missing field");
    assert!(out.stdout.is_empty(), "no half-written startup.conf");
}

#[test]
fn check_config_shows_the_vpp_section_and_refuses_bad_values() {
    let out = agent_with(VPP_CONFIG, "check-config");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("uplink: Vpp") && text.contains("0000:00:08.0") && text.contains("contiv-api.sock"),
        "{text}"
    );
    let out = agent_with("uplink = \"vpp\"\n[vpp]\nrxDescriptors = 1000\n", "check-config");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rxDescriptors"));
}
