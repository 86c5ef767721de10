//! The cluster in a box (3 nodes, kernel uplink): pods on different nodes talk over the
//! overlay, the host reaches its pods, pods reach the host, node addresses and the outside
//! (masqueraded), path MTU discovery works, the fabric carries only VXLAN for pod traffic.

use std::time::Duration;

use contiv_tests::cluster::{BoxOptions, ClusterBox, EXTERNAL_IP};

fn ping(b: &ClusterBox, from: &str, to: std::net::Ipv4Addr) -> bool {
    b.cmd(from, "ping")
        .args(["-c", "2", "-i", "0.2", "-W", "2", &to.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn smoke_cross_node_ping() {
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let a = b.add_pod("node-1", "default/a", &[("app", "a")], &[]).ip;
    let c = b.add_pod("node-2", "default/c", &[("app", "c")], &[]).ip;
    assert!(ping(&b, "default/a", c), "a -> c\n{}\n{}", b.agent_log("node-1"), b.agent_log("node-2"));
    assert!(ping(&b, "default/c", a), "c -> a");
    assert!(ping(&b, "node-1", a), "host -> local pod");
    assert!(ping(&b, "node-1", c), "host -> remote pod");
    assert!(ping(&b, "default/a", b.node("node-1").ip), "pod -> own node");
    assert!(ping(&b, "default/a", b.node("node-2").ip), "pod -> other node");
    assert!(ping(&b, "default/a", EXTERNAL_IP), "pod -> outside");
    let _ = Duration::from_secs(1);
}
