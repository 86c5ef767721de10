//! The agent and the cluster store (root, real etcd): node registration and pod subnets
//! from node IDs, the agent's cluster model following what netctl writes.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use std::sync::Arc;

use contiv_tests::{ControlPlane, Node, NodeOptions, bin, run};

fn etcd_node(cp: &Arc<ControlPlane>, name: &str) -> Node {
    Node::start(NodeOptions {
        pod_subnet: None,
        control_plane: Some(cp.clone()),
        node_name: Some(name.to_owned()),
        ..NodeOptions::default()
    })
}

fn subnet_of(ip: Ipv4Addr) -> [u8; 3] {
    let o = ip.octets();
    [o[0], o[1], o[2]]
}

fn wait_for_log(node: &Node, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.agent_log().contains(needle) {
        assert!(Instant::now() < deadline, "agent never logged {needle:?}:\n{}", node.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agents_starting_together_get_distinct_node_subnets_that_survive_restart() {
    let cp = Arc::new(ControlPlane::start());
    let names = [contiv_tests::unique("node-a"), contiv_tests::unique("node-b")];
    let handles: Vec<_> = names
        .iter()
        .cloned()
        .map(|name| {
            let cp = cp.clone();
            std::thread::spawn(move || etcd_node(&cp, &name))
        })
        .collect();
    // Join every start before judging any, so a failed start never leaks a running node.
    let started: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
    let mut nodes: Vec<Node> = started.into_iter().map(|r| r.expect("node start")).collect();
    let pa = nodes[0].add_pod();
    let pb = nodes[1].add_pod();
    assert_ne!(subnet_of(pa.ip), subnet_of(pb.ip), "two nodes share a pod subnet");
    for ip in [pa.ip, pb.ip] {
        let o = ip.octets();
        assert_eq!((o[0], o[1]), (10, 1), "{ip} is outside podSubnetCIDR 10.1.0.0/16");
        assert!(o[2] >= 1, "node IDs start at 1");
    }
    // Both nodes are registered in the store.
    let out = run(cp.cmd(&bin("netctl")).args(["--etcd", cp.local_endpoint(), "get", "nodes", "-o", "json"]));
    for n in &names {
        assert!(out.contains(n.as_str()), "{n} not registered: {out}");
    }
    // A restarted agent gets its old ID and subnet back.
    nodes[0].stop_agent();
    nodes[0].start_agent();
    let pa2 = nodes[0].add_pod();
    assert_eq!(subnet_of(pa2.ip), subnet_of(pa.ip));
    assert_ne!(pa2.ip, pa.ip);
}

#[test]
fn agent_model_follows_what_netctl_writes() {
    let cp = Arc::new(ControlPlane::start());
    let node = etcd_node(&cp, &contiv_tests::unique("node-m"));
    wait_for_log(&node, "cluster model resync (Start)");
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../userspace/netctl/tests/fixtures/cluster");
    run(cp.cmd(&bin("netctl")).args(["--etcd", cp.local_endpoint(), "apply", "-f"]).arg(&fixtures));
    wait_for_log(&node, "cluster: added /contiv/k8s/namespace/shop");
    wait_for_log(&node, "cluster: added /contiv/k8s/service/");
    run(cp
        .cmd(&bin("netctl"))
        .args(["--etcd", cp.local_endpoint(), "delete", "-f"])
        .arg(fixtures.join("00-namespaces.yaml")));
    wait_for_log(&node, "cluster: deleted /contiv/k8s/namespace/shop");
    // A malformed value is skipped with its key logged; the agent keeps running.
    let put = cp.etcdctl(&["put", "/contiv/k8s/service/default/broken", "{not json"]);
    assert!(put.status.success(), "{put:?}");
    wait_for_log(&node, "/contiv/k8s/service/default/broken");
    let pod = node.add_pod();
    assert!(contiv_tests::ping(
        &pod.ns,
        Ipv4Addr::new(pod.ip.octets()[0], pod.ip.octets()[1], pod.ip.octets()[2], 1),
        1
    ));
}

/// A node whose file fixes its pod subnet registers that subnet (its ID is the one the
/// plan gives it), so other nodes route to it what its pods use; a node started after it
/// gets another ID.
#[test]
fn a_fixed_pod_subnet_is_the_one_the_node_registers() {
    let cp = Arc::new(ControlPlane::start());
    let fixed_name = contiv_tests::unique("node-f");
    let fixed = Node::start(NodeOptions {
        pod_subnet: Some("10.1.5.0/24".into()),
        control_plane: Some(cp.clone()),
        node_name: Some(fixed_name.clone()),
        ..NodeOptions::default()
    });
    let other = etcd_node(&cp, &contiv_tests::unique("node-o"));
    let out = run(cp.cmd(&bin("netctl")).args(["--etcd", cp.local_endpoint(), "get", "nodes", "-o", "json"]));
    let nodes: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let registered = nodes.as_array().into_iter().flatten().find(|n| n["name"] == fixed_name.as_str());
    assert!(registered.is_some_and(|n| n.to_string().contains("\"10.1.5.0/24\"")), "{out}");
    let pod = fixed.add_pod();
    assert_eq!(subnet_of(pod.ip), [10, 1, 5]);
    let p = other.add_pod();
    assert_ne!(subnet_of(p.ip), [10, 1, 5], "another node got the fixed node's subnet");
}

/// An agent restarting while the store is away still lets the runtime tear pods down: its
/// CNI socket is served from the first moment, DEL from the node's own records, while the
/// join retries; STATUS says it is not available.
#[test]
fn pods_are_torn_down_while_the_agent_cannot_reach_the_store() {
    let cp = Arc::new(ControlPlane::start());
    let mut node = etcd_node(&cp, "n1");
    let (gone, kept) = (node.add_pod(), node.add_pod());
    node.stop_agent();
    cp.kill_etcd();
    node.spawn_agent();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.socket.exists() {
        assert!(Instant::now() < deadline, "no CNI socket:\n{}", node.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = node.cni("STATUS", "", "", "", "1.1.0").json();
    assert_eq!(status["code"], 50, "{status}");
    let before = node.pod_links().len();
    let started = Instant::now();
    node.del_pod(&gone).ok();
    assert!(started.elapsed() < Duration::from_secs(10), "DEL did not wait for the store");
    assert_eq!(node.pod_links().len(), before - 1, "the pod's interface is deleted");
    assert_eq!(node.durable_attachments(), std::slice::from_ref(&kept.container_id), "its record is released");
    node.del_pod(&gone).ok();
    assert!(
        node.agent_log().contains("store not reachable yet"),
        "the agent still tries the store:\n{}",
        node.agent_log()
    );
    // An ADD waits for the agent (up to 20 s); a SIGTERM meanwhile still stops it well
    // within the DaemonSet's 10 s grace period, and the socket goes.
    let ns = contiv_tests::Netns::new("tdn");
    let (netns, conf) = (ns.path().to_string_lossy().into_owned(), node.net_conf("1.1.0"));
    let socket = node.socket.clone();
    let add = std::thread::spawn(move || {
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "waiting"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        contiv_tests::invoke_plugin(&bin("contiv-cni"), &env, &conf, None)
    });
    std::thread::sleep(Duration::from_millis(500));
    let stopping = Instant::now();
    assert!(node.stop_agent().success());
    assert!(stopping.elapsed() < Duration::from_secs(8), "stopped in {:?}", stopping.elapsed());
    assert!(!socket.exists(), "the socket is removed");
    let out = add.join().unwrap();
    assert_ne!(out.exit_code, 0, "the waiting ADD did not succeed: {out:?}");
}
