//! The cluster in a box, kernel uplink mode (root): pods on different nodes talk over the
//! overlay, hosts reach their pods (kubelet probes), pods reach hosts, node addresses and the
//! outside (masqueraded to the node's address), path MTU discovery works and nothing is
//! fragmented, the fabric carries only VXLAN between node addresses for pod traffic, nodes
//! leave and come back (a subnet given to another node while an agent was down loses its
//! old flows when the agent starts), an agent restart keeps a cross-node TCP flow alive, and hostPorts
//! answer clients from everywhere (served by the datapath, and by Debian's `portmap`
//! plugin chained after contiv-cni when services are off).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use contiv_tests::cluster::{BoxOptions, BoxPod, ClusterBox, EXTERNAL_IP, enter};

fn ping(b: &ClusterBox, from: &str, to: Ipv4Addr) -> bool {
    b.cmd(from, "ping")
        .args(["-c", "2", "-i", "0.2", "-W", "2", &to.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A TCP listener in namespace `ns` on `ip`; returns the address and the thread that
/// accepts one connection, echoes what it reads and returns the peer's address.
fn echo_server(ns: &str, ip: Ipv4Addr) -> (SocketAddr, std::thread::JoinHandle<SocketAddr>) {
    let listener = enter(ns, move || TcpListener::bind((ip, 0)).expect("bind"));
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).expect("server read");
        s.write_all(&buf[..n]).expect("server echo");
        peer
    });
    (addr, t)
}

/// Connects from namespace `ns` to `addr`, exchanges a message; returns the address the
/// server saw as the client.
fn tcp_exchange(ns: &str, addr: SocketAddr, server: std::thread::JoinHandle<SocketAddr>) -> SocketAddr {
    let mut s = enter(ns, move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("connect from {ns} to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"across the overlay").unwrap();
    let mut buf = [0u8; 18];
    s.read_exact(&mut buf).expect("echo");
    assert_eq!(&buf, b"across the overlay");
    server.join().unwrap()
}

fn udp_exchange(from: &BoxPod, to: &BoxPod) -> bool {
    let (to_ip, from_ip) = (to.ip, from.ip);
    let srv = enter(&to.netns, move || UdpSocket::bind((to_ip, 0)).unwrap());
    let cli = enter(&from.netns, move || UdpSocket::bind((from_ip, 0)).unwrap());
    srv.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    cli.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    cli.send_to(b"dns-like question", srv.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 64];
    let Ok((n, peer)) = srv.recv_from(&mut buf) else { return false };
    assert_eq!(&buf[..n], b"dns-like question");
    assert_eq!(peer, cli.local_addr().unwrap(), "the server sees the client pod's own address and port");
    srv.send_to(b"answer", peer).unwrap();
    matches!(cli.recv_from(&mut buf), Ok((6, _)))
}

fn counter(b: &ClusterBox, node: &str, pod: &BoxPod, name: &str) -> u64 {
    let pods = b.status_json(node, "/pods").expect("/pods");
    pods.as_array()
        .unwrap()
        .iter()
        .find(|p| p["ip"] == pod.ip.to_string())
        .and_then(|p| p["counters"][name].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} for {} in {pods}", pod.ip))
}

#[test]
fn pods_on_three_nodes_talk_tcp_udp_and_icmp_both_ways() {
    let mut b = ClusterBox::up(BoxOptions::for_test(3));
    let pods: Vec<BoxPod> =
        (1..=3).map(|i| b.add_pod(&format!("node-{i}"), &format!("default/p{i}"), &[("app", "p")], &[])).collect();
    for (x, y) in [(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)] {
        let (from, to) = (&pods[x], &pods[y]);
        assert!(ping(&b, &from.id(), to.ip), "ICMP {} -> {}", from.id(), to.id());
        let (addr, server) = echo_server(&to.netns, to.ip);
        let seen = tcp_exchange(&from.netns, addr, server);
        assert_eq!(seen.ip(), std::net::IpAddr::V4(from.ip), "no address translation between pods");
        assert!(udp_exchange(from, to), "UDP {} -> {}", from.id(), to.id());
    }
    // The fast path encapsulated it (no host routing) and the other side delivered it.
    for (i, p) in pods.iter().enumerate() {
        let node = format!("node-{}", i + 1);
        assert!(counter(&b, &node, p, "tunnelPackets") >= 8, "{} sent over the overlay", p.id());
        assert!(counter(&b, &node, p, "fromTunnelPackets") >= 8, "{} received over the overlay", p.id());
    }
    // Labels of the Pod objects reached the agents (for the features that select by them).
    let report = b.status_json("node-2", "/pods").unwrap();
    assert_eq!(report[0]["podNamespace"], "default");
    assert_eq!(report[0]["podName"], "p2");
    assert_eq!(report[0]["labels"]["app"], "p", "{report}");
}

#[test]
fn hosts_reach_pods_and_pods_reach_hosts_nodes_and_the_outside_masqueraded() {
    let mut b = ClusterBox::up(BoxOptions::for_test(3));
    let pods: Vec<BoxPod> =
        (1..=3).map(|i| b.add_pod(&format!("node-{i}"), &format!("default/w{i}"), &[], &[])).collect();
    // host -> local pod TCP connect on every node: what kubelet's probes do.
    for (i, p) in pods.iter().enumerate() {
        let node = b.node(&format!("node-{}", i + 1)).clone();
        let (addr, server) = echo_server(&p.netns, p.ip);
        let seen = tcp_exchange(&node.netns, addr, server);
        assert_eq!(seen.ip(), std::net::IpAddr::V4(node.ip), "the probe comes from the node's address");
    }
    // host -> remote pod.
    let (addr, server) = echo_server(&pods[1].netns, pods[1].ip);
    tcp_exchange(&b.node("node-1").netns.clone(), addr, server);
    // pod -> its own node and pod -> another node, TCP to servers on the node addresses.
    for target in ["node-1", "node-2"] {
        let n = b.node(target).clone();
        let (addr, server) = echo_server(&n.netns, n.ip);
        let seen = tcp_exchange(&pods[0].netns, addr, server);
        assert_eq!(seen.ip(), std::net::IpAddr::V4(pods[0].ip), "a node sees the pod's own address");
    }
    // pod -> outside: the external server sees the node's address; the reply comes back.
    for (i, p) in pods.iter().enumerate() {
        let (addr, server) = echo_server(&b.state.external.clone(), EXTERNAL_IP);
        let seen = tcp_exchange(&p.netns, addr, server);
        let node_ip = b.node(&format!("node-{}", i + 1)).ip;
        assert_eq!(seen.ip(), std::net::IpAddr::V4(node_ip), "masqueraded to the node's address");
        assert!(ping(&b, &p.id(), EXTERNAL_IP));
    }
    assert!(counter(&b, "node-1", &pods[0], "hostPackets") > 0, "handed to the node's stack by the fast path");
}

#[test]
fn path_mtu_discovery_works_and_nothing_is_fragmented() {
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let remote = b.add_pod("node-2", "default/far", &[], &[]);
    let pod = b.add_pod("node-1", "default/near", &[], &[]);
    let mtu = Command::new("ip").args(["-n", &pod.netns, "-o", "link", "show", "eth0"]).output().unwrap();
    assert!(String::from_utf8_lossy(&mtu.stdout).contains("mtu 1450"), "pods get underlay MTU - 50");
    let df_ping = |b: &ClusterBox, from: &str, size: u32| {
        let out = b
            .cmd(from, "ping")
            .args(["-c", "1", "-W", "2", "-M", "do", "-s", &size.to_string(), &remote.ip.to_string()])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    // 1422 bytes of ICMP payload + 28 bytes of headers = 1450: the largest that fits.
    let (ok, out) = df_ping(&b, &pod.id(), 1422);
    assert!(ok, "a DF packet of exactly the path MTU passes: {out}");
    // A pod whose interface is bigger than the path (its network config says 1500): the
    // datapath answers an oversize DF packet with "fragmentation needed" naming the MTU.
    let big = b.add_pod_with("node-1", "default/bigmtu", &[], &[], r#"{"mtu": 1500}"#);
    let (ok, out) = df_ping(&b, &big.id(), 1422);
    assert!(ok, "fits: {out}");
    let (ok, out) = df_ping(&b, &big.id(), 1423);
    assert!(!ok && out.contains("mtu = 1450"), "one byte more gets fragmentation-needed with the MTU: {out}");
    let vswitch = b.status_json("node-1", "/vswitch").unwrap();
    assert!(vswitch["vswitch"]["frag_needed_sent"].as_u64().unwrap() >= 1, "{vswitch}");
    // The sender learnt the path MTU: the next big datagram is sized to it and arrives.
    let (ok, out) = df_ping(&b, &big.id(), 1422);
    assert!(ok, "after PMTU discovery: {out}");
    // A jumbo pod interface: a packet far bigger than the slow-path port (1500) still gets
    // its "fragmentation needed" (the datapath hands the port its headers).
    let jumbo = b.add_pod_with("node-1", "default/jumbo", &[], &[], r#"{"mtu": 4000}"#);
    let (ok, out) = df_ping(&b, &jumbo.id(), 3000);
    assert!(!ok && out.contains("mtu = 1450"), "a 3028-byte packet gets fragmentation-needed: {out}");
    let (ok, out) = df_ping(&b, &jumbo.id(), 1422);
    assert!(ok, "after PMTU discovery: {out}");
    // An echo request to the gateway that big cannot be answered from its headers: counted.
    let gateway = Ipv4Addr::from(u32::from(jumbo.ip) & 0xffff_ff00 | 1).to_string();
    let out = b.cmd(&jumbo.id(), "ping").args(["-c", "1", "-W", "1", "-s", "3000", &gateway]).output();
    assert!(!out.unwrap().status.success(), "no reply from part of an echo request");
    let vswitch = b.status_json("node-1", "/vswitch").unwrap();
    assert_eq!(vswitch["vswitch"]["drops"]["truncated"], 1, "{vswitch}");
    // Nobody fragmented anything on the way.
    for node in ["node-1", "node-2"] {
        let out = b.cmd(node, "nstat").args(["-az", "IpFragCreates"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let frags: u64 = text
            .lines()
            .find(|l| l.starts_with("IpFragCreates"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no IpFragCreates in {text}"));
        assert_eq!(frags, 0, "{node} fragmented packets");
    }
}

#[test]
fn the_fabric_carries_only_vxlan_between_node_addresses_for_pod_traffic() {
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let a = b.add_pod("node-1", "default/a", &[], &[]);
    let c = b.add_pod("node-2", "default/c", &[], &[]);
    // One capture per node port of the fabric: everything each node puts on the wire (the
    // bridge device itself only shows what it floods).
    let captures: Vec<(std::path::PathBuf, std::process::Child)> = ["n1", "n2"]
        .iter()
        .map(|port| {
            let pcap = b.state.dir.join(format!("fabric-{port}.pcap"));
            let child = b
                .cmd("fabric", "tcpdump")
                // Immediate mode: packets reach the file as they come, not a ring block later.
                .args(["-i", port, "-n", "--immediate-mode", "-U", "-w"])
                .arg(&pcap)
                .args(["not", "arp", "and", "not", "port", "2379"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("tcpdump (Debian package tcpdump)");
            (pcap, child)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let device_tx =
        |b: &ClusterBox| -> Vec<u64> { ["node-1", "node-2"].iter().map(|n| overlay_device_tx_packets(b, n)).collect() };
    let before = device_tx(&b);
    assert!(ping(&b, &a.id(), c.ip));
    let (addr, server) = echo_server(&c.netns, c.ip);
    tcp_exchange(&a.netns, addr, server);
    assert!(udp_exchange(&c, &a));
    // An address of the cluster's pod range no node owns (a node that left, one not known
    // yet): nothing leaves for it, least of all with the pod's address as source.
    let a_ip = a.ip;
    enter(&a.netns, move || {
        let s = UdpSocket::bind((a_ip, 0)).unwrap();
        for _ in 0..3 {
            s.send_to(b"nobody's", (Ipv4Addr::new(10, 1, 250, 9), 9)).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    // The pods' packets get their outer headers in tc_from_pod and leave by the uplink: the
    // VXLAN device sent none of them (it serves the node's own packets).
    assert_eq!(device_tx(&b), before, "pod packets went through the overlay device's transmit path");
    let mut text = String::new();
    for (pcap, mut child) in captures {
        // SAFETY: SIGTERM to a tcpdump we started, by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        let out = Command::new("tcpdump").args(["-n", "-r"]).arg(&pcap).output().expect("tcpdump -r");
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    // tcpdump prints a VXLAN packet's inner header on a line of its own; the outer lines
    // (with a timestamp) are what crossed the fabric.
    let lines: Vec<&str> = text.lines().filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit())).collect();
    assert!(lines.len() >= 20, "the pod traffic crossed the fabric: {text}");
    assert!(text.contains(&format!("{} > {}", a.ip, c.ip)), "the inner packets are the pods': {text}");
    let nodes = [b.node("node-1").ip.to_string(), b.node("node-2").ip.to_string()];
    for l in &lines {
        let vxlan = l.contains(": VXLAN") && l.contains(".4789:");
        let between_nodes = nodes.iter().all(|n| l.contains(n.as_str()));
        assert!(vxlan && between_nodes, "not VXLAN between node addresses: {l}");
        assert!(!l.contains(" 10.1."), "a pod address on the wire: {l}");
    }
    // Both directions carry the overlay's VNI (the box's default, 1).
    for (from, to) in [(&nodes[0], &nodes[1]), (&nodes[1], &nodes[0])] {
        let outer: Vec<&&str> =
            lines.iter().filter(|l| l.contains(&format!("{from}.")) && l.contains(&format!("> {to}."))).collect();
        assert!(!outer.is_empty(), "no VXLAN from {from} to {to}: {text}");
        assert!(outer.iter().all(|l| l.contains("vni 1")), "VNI 1 from {from} to {to}: {text}");
    }
}

#[test]
fn pods_talk_across_nodes_through_the_overlay_device_when_configured_so() {
    let mut opts = BoxOptions::for_test(2);
    opts.agent_config = "overlayEncap = \"device\"\n".into();
    let mut b = ClusterBox::up(opts);
    let a = b.add_pod("node-1", "default/a", &[], &[]);
    let c = b.add_pod("node-2", "default/c", &[], &[]);
    let before = [overlay_device_tx_packets(&b, "node-1"), overlay_device_tx_packets(&b, "node-2")];
    assert!(ping(&b, &a.id(), c.ip));
    let (addr, server) = echo_server(&c.netns, c.ip);
    tcp_exchange(&a.netns, addr, server);
    assert!(udp_exchange(&a, &c));
    assert!(udp_exchange(&c, &a));
    // tc_from_pod set a tunnel key and the device built the headers, on both nodes.
    for (i, node) in ["node-1", "node-2"].iter().enumerate() {
        let sent = overlay_device_tx_packets(&b, node) - before[i];
        assert!(sent >= 4, "{node}'s cvx0 sent only {sent} packets with overlayEncap = \"device\"");
    }
    // The overlay's port is still the nodes' own: a pod's UDP to it at node-2 is dropped
    // (a VXLAN packet of its own would pass as the overlay's there), counted.
    let node2 = b.node("node-2").ip;
    let dropped = || contiv_tests::netpol::pod_counter(&b, "node-1", a.ip, "dropOverlayPort");
    let before = dropped();
    let a_ip = a.ip;
    enter(&a.netns, move || UdpSocket::bind((a_ip, 0)).unwrap().send_to(b"vxlan?", (node2, 4789)).unwrap());
    b.wait_for(Duration::from_secs(5), "a's UDP to the overlay's port is dropped", || dropped() == before + 1);
}

/// Packets the node's overlay device (cvx0) has sent.
fn overlay_device_tx_packets(b: &ClusterBox, node: &str) -> u64 {
    let out = b.cmd(node, "ip").args(["-s", "-j", "link", "show", "cvx0"]).output().expect("ip -s link");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    v[0]["stats64"]["tx"]["packets"].as_u64().expect("tx packets of cvx0")
}

/// How many remote pod subnets a node's agent routes (99 when it does not answer).
fn remote_routes(b: &ClusterBox, node: &str) -> usize {
    b.status_json(node, "/node").and_then(|v| v["remoteRoutes"].as_object().map(|m| m.len())).unwrap_or(99)
}

/// Whether a node's agent tracks a flow naming `ip` (panics if it does not answer).
fn tracks(b: &ClusterBox, node: &str, ip: Ipv4Addr) -> bool {
    let flows = b.status_json(node, "/conntrack").expect("/conntrack")["flows"].clone();
    let ip = ip.to_string();
    let ip_of = |v: &serde_json::Value| v.as_str().map(|s| s.split([':', ' ']).next().unwrap_or("").to_owned());
    flows.as_array().into_iter().flatten().any(|f| {
        [&f["client"], &f["server"], &f["backend"]].into_iter().any(|v| ip_of(v).as_deref() == Some(ip.as_str()))
    })
}

/// A node leaves while another node's agent is down, and a new node is given its pod
/// subnet: the agent, started again, sweeps the flows of the old node's pods (a new pod
/// on one of their addresses would ride them past policy). A restart that finds the
/// subnet still the old node's (its registration lapsed, nobody else holds it) sweeps
/// nothing.
#[test]
fn a_subnet_that_changed_hands_while_an_agent_was_down_loses_its_old_flows() {
    let mut opts = BoxOptions::for_test(2);
    opts.agent_config = "nodeLeaseSeconds = 5\n".into();
    let mut b = ClusterBox::up(opts);
    let p1 = b.add_pod("node-1", "default/stay", &[], &[]);
    let p2 = b.add_pod("node-2", "default/leave", &[], &[]);
    let subnet = b.status_json("node-2", "/node").unwrap()["podSubnet"].as_str().expect("podSubnet").to_owned();
    let listener = enter(&p2.netns, move || TcpListener::bind((p2.ip, 0)).expect("bind"));
    let to = listener.local_addr().unwrap();
    let _client = enter(&p1.netns, move || TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect"));
    let _server = listener.accept().expect("accept");
    assert!(tracks(&b, "node-1", p2.ip), "node-1 tracks the connection to node-2's pod");
    // node-2's agent is gone (killed, its registration lapses); node-1's restarts.
    b.stop_agent("node-2", true);
    b.wait_for(Duration::from_secs(30), "node-1 drops node-2's routes", || remote_routes(&b, "node-1") == 0);
    b.stop_agent("node-1", false);
    b.start_agent("node-1");
    let swept_once = |b: &ClusterBox| b.status_json("node-1", "/services").is_some_and(|s| !s["lastGc"].is_null());
    b.wait_for(Duration::from_secs(30), "node-1's first sweep since its start", || swept_once(&b));
    assert!(tracks(&b, "node-1", p2.ip), "a lapse across a restart keeps the flow past a sweep");
    // node-1's agent is down while node-9 is given node-2's subnet.
    b.stop_agent("node-1", false);
    let reg = serde_json::json!({"v": 1, "name": "node-9", "id": 9, "addresses": [], "pod_cidr": subnet});
    b.etcdctl(&["put", "/contiv/nodes/node-9", &reg.to_string()]);
    // It starts and stops again before its first sweep (10 s after the start): the next
    // start still finds the handover.
    b.start_agent("node-1");
    assert!(!swept_once(&b), "stopped before the first sweep");
    b.stop_agent("node-1", false);
    b.start_agent("node-1");
    b.wait_for(Duration::from_secs(30), "node-1 sweeps the flow of node-2's pod", || !tracks(&b, "node-1", p2.ip));
    let log = b.agent_log("node-1");
    assert!(log.contains(&format!("pod subnet {subnet} changed hands while this agent was down")), "{log}");
}

#[test]
fn a_node_that_leaves_loses_its_routes_and_comes_back_with_its_subnet() {
    // A short lease (the default, 60 s, outlasts an agent upgrade).
    let mut opts = BoxOptions::for_test(3);
    opts.agent_config = "nodeLeaseSeconds = 5\n".into();
    let mut b = ClusterBox::up(opts);
    let p1 = b.add_pod("node-1", "default/stay", &[], &[]);
    let subnet_before = b.status_json("node-3", "/node").unwrap()["podSubnet"].clone();
    let p3 = b.add_pod("node-3", "default/leave", &[], &[]);
    assert!(ping(&b, &p1.id(), p3.ip));
    // A TCP connection stays open to node-3's pod, idle while node-3 is away.
    let listener = enter(&p3.netns, move || TcpListener::bind((p3.ip, 0)).expect("bind"));
    let to = listener.local_addr().unwrap();
    let mut client =
        enter(&p1.netns, move || TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect"));
    let (mut server, _) = listener.accept().expect("accept");
    let names_p3 = |b: &ClusterBox| tracks(b, "node-1", p3.ip);
    assert!(names_p3(&b), "node-1 tracks the connection to node-3's pod");
    // The agent goes away for good (killed): its registration expires with its lease.
    b.stop_agent("node-3", true);
    b.wait_for(Duration::from_secs(40), "node-1 and node-2 drop node-3's routes", || {
        remote_routes(&b, "node-1") == 2 && remote_routes(&b, "node-2") == 2
    });
    assert!(!ping(&b, &p1.id(), p3.ip), "no route to a departed node's pods");
    b.start_agent("node-3");
    assert_eq!(b.status_json("node-3", "/node").unwrap()["podSubnet"], subnet_before, "the same subnet again");
    b.wait_converged(Duration::from_secs(30));
    assert!(ping(&b, &p1.id(), p3.ip), "traffic resumes");
    // A lapsed registration is no departure: the subnet stayed node-3's, and node-1's
    // sweeps (every 10 s, several while node-3 was away) left the connection's entries.
    assert!(names_p3(&b), "node-1 still tracks the connection to node-3's pod");
    client.write_all(b"still here").unwrap();
    let mut buf = [0u8; 10];
    server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    server.read_exact(&mut buf).expect("the idle connection carries data again");
    assert_eq!(&buf, b"still here");
}

/// A node's underlay address changes (DHCP, an address moved): its agent exits to start
/// again with the new one, withdrawing its registration at the old one, so the other nodes
/// reach its pods at the new address without waiting out the lease.
#[test]
fn a_node_whose_address_changes_is_reached_at_the_new_one() {
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let p1 = b.add_pod("node-1", "default/moving", &[], &[]);
    let p2 = b.add_pod("node-2", "default/peer", &[], &[]);
    assert!(ping(&b, &p2.id(), p1.ip));
    assert!(b.status("node-1", "/node").is_some(), "node-1's status endpoint answers");
    let old = contiv_tests::cluster::node_ip(1);
    let new = Ipv4Addr::new(192, 168, 100, 41);
    for args in [
        vec!["addr".to_string(), "del".into(), format!("{old}/24"), "dev".into(), "eth0".into()],
        vec!["addr".into(), "add".into(), format!("{new}/24"), "dev".into(), "eth0".into()],
        vec!["route".into(), "replace".into(), "default".into(), "via".into(), "192.168.100.1".into()],
    ] {
        let out = b.cmd("node-1", "ip").args(&args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }
    b.wait_for(Duration::from_secs(30), "node-1's agent exits, saying why", || {
        b.agent_log("node-1").contains("no longer holds the node IP") && b.status("node-1", "/node").is_none()
    });
    // The DaemonSet starts it again.
    b.stop_agent("node-1", false);
    b.start_agent("node-1");
    b.wait_for(Duration::from_secs(20), "node-2 reaches node-1's pod at its new address", || ping(&b, &p2.id(), p1.ip));
    let regs = b.netctl(&["get", "nodes", "-o", "json"]);
    assert!(String::from_utf8_lossy(&regs.stdout).contains(&new.to_string()), "{regs:?}");
}

/// Routes the kernel flushed behind the agent's back (the overlay device bounced by an
/// operator or a network manager) come back with the next resync.
#[test]
fn routes_flushed_behind_the_agents_back_come_back() {
    let mut opts = BoxOptions::for_test(2);
    opts.agent_config = "resyncSeconds = 2\n".into();
    let mut b = ClusterBox::up(opts);
    let p1 = b.add_pod("node-1", "default/a", &[], &[]);
    let p2 = b.add_pod("node-2", "default/b", &[], &[]);
    assert!(ping(&b, &p1.id(), p2.ip));
    let ours = |b: &ClusterBox| {
        let out = b.cmd("node-1", "ip").args(["-4", "route", "show", "proto", "84"]).output().expect("ip route");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = ours(&b);
    // The device the routes to node-2's pods use.
    let dev = before
        .lines()
        .filter(|l| !l.contains("/32"))
        .find_map(|l| l.split_whitespace().skip_while(|w| *w != "dev").nth(1).map(str::to_owned))
        .unwrap_or_else(|| panic!("no route to another node's pods in {before:?}"));
    for state in ["down", "up"] {
        let out = b.cmd("node-1", "ip").args(["link", "set", &dev, state]).output().expect("ip link");
        assert!(out.status.success(), "{out:?}");
    }
    assert_ne!(ours(&b), before, "bouncing {dev} flushed no route: the test shows nothing");
    b.wait_for(Duration::from_secs(15), "node-1's routes are back", || ours(&b) == before);
    assert!(ping(&b, &p1.id(), p2.ip), "traffic to node-2's pods resumes");
}

#[test]
fn an_agent_restart_keeps_an_established_cross_node_tcp_flow() {
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let client = b.add_pod("node-1", "default/client", &[], &[]);
    let server = b.add_pod("node-2", "default/server", &[], &[]);
    let server_ip = server.ip;
    let listener = enter(&server.netns, move || TcpListener::bind((server_ip, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r, st) = (received.clone(), stop.clone());
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buf = [0u8; 65536];
        while !st.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => return Err("connection closed".to_string()),
                Ok(n) => {
                    r.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    });
    let mut stream = enter(&client.netns, move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap());
    let st = stop.clone();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 8192];
        while !st.load(Ordering::Relaxed) {
            if let Err(e) = stream.write_all(&chunk) {
                return Err(e.to_string());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Handed back open, so the receiver stops on the flag, not on our close.
        Ok(stream)
    });
    let progress = |what: &str| {
        let before = received.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while received.load(Ordering::Relaxed) < before + 100_000 {
            assert!(Instant::now() < deadline, "the flow stalled {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    progress("before the restarts");
    let routes_before = remote_routes(&b, "node-1");
    for node in ["node-1", "node-2"] {
        let before = received.load(Ordering::Relaxed);
        b.stop_agent(node, false);
        progress(&format!("while the agent of {node} was down"));
        if node == "node-2" {
            // Down for longer than a quick restart (an image pull in an upgrade): the other
            // node keeps its routes, the lease outlasts it.
            std::thread::sleep(Duration::from_secs(12));
            assert_eq!(
                remote_routes(&b, "node-1"),
                routes_before,
                "node-1 dropped node-2's routes while its agent was away"
            );
            progress("12 s after the agent of node-2 stopped");
        }
        b.start_agent(node);
        progress(&format!("after the agent of {node} came back"));
        assert!(received.load(Ordering::Relaxed) > before);
    }
    stop.store(true, Ordering::Relaxed);
    let stream = writer.join().unwrap();
    assert!(stream.is_ok(), "the sender saw no error: {:?}", stream.err());
    assert_eq!(reader.join().unwrap(), Ok(()), "the receiver saw no error");
    drop(stream);
    assert!(received.load(Ordering::Relaxed) > 500_000);
}

/// Kubelet probes at scale: thousands of host -> local pod connects, each closed with a
/// reset, reuse source ports while the datapath still tracks the earlier flows; every one
/// must connect.
#[test]
fn thousands_of_reset_host_to_pod_connects_all_succeed() {
    let mut b = ClusterBox::up(BoxOptions::for_test(1));
    let pod = b.add_pod("node-1", "default/probed", &[], &[]);
    let node = b.node("node-1").clone();
    let ip = pod.ip;
    let listener = enter(&pod.netns, move || TcpListener::bind((ip, 0)).expect("bind"));
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    // A narrow ephemeral range makes source ports come back within seconds, as they do
    // over a long run of probes.
    Command::new("ip")
        .args(["netns", "exec", &node.netns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40499"])
        .status()
        .unwrap();
    let (failures, first) = enter(&node.netns, move || {
        let mut failures = 0;
        let mut first = None;
        for i in 0..6000 {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => contiv_tests::close_with_reset(&s),
                Err(e) => {
                    failures += 1;
                    first.get_or_insert(format!("connect {i}: {e}"));
                }
            }
        }
        (failures, first)
    });
    // What each side's stack counted (resets, challenge ACKs, ICMP errors, overflows) and
    // what the datapath saw: a failure names its cause ahead of the agent's log.
    let seen = if failures == 0 {
        String::new()
    } else {
        let stack = |ns: &str| {
            let script =
                "nstat -asz | awk '$2 != 0 && ($1 ~ /^(Tcp|Icmp|TcpExt)/)'; ss -tan | grep -v LISTEN | head -20";
            let o = Command::new("ip").args(["netns", "exec", ns, "sh", "-c", script]).output().unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        format!(
            "pod's stack:\n{}\nnode's stack:\n{}\npods: {:?}\nvswitch: {:?}\n",
            stack(&pod.netns),
            stack(&node.netns),
            b.status_json("node-1", "/pods"),
            b.status_json("node-1", "/vswitch")
        )
    };
    assert_eq!(failures, 0, "first failure: {first:?}\n{seen}{}", b.agent_log("node-1"));
}

/// A TCP echo server on `ip:port` in namespace `ns` for any number of connections; each
/// client's address, as the server saw it, comes out of the channel. Stops with the flag.
fn echo_service(ns: &str, ip: Ipv4Addr, port: u16, stop: Arc<AtomicBool>) -> std::sync::mpsc::Receiver<SocketAddr> {
    let listener = enter(ns, move || TcpListener::bind((ip, port)).expect("bind"));
    listener.set_nonblocking(true).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, peer)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            if let Ok(n) = s.read(&mut buf) {
                let _ = s.write_all(&buf[..n]);
            }
            let _ = tx.send(peer);
        }
    });
    rx
}

/// Connects from namespace `ns` to `addr` and exchanges a message; the error says where
/// it failed.
fn try_exchange(ns: &str, addr: SocketAddr) -> Result<(), String> {
    let mut s = enter(ns, move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"through a hostPort").map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 18];
    s.read_exact(&mut buf).map_err(|e| format!("answer: {e}"))?;
    if &buf != b"through a hostPort" {
        return Err(format!("a wrong answer: {buf:?}"));
    }
    Ok(())
}

/// hostPorts with `[services] enabled = false`: then only Debian's `portmap` plugin, which
/// deploy/'s network config list chains after contiv-cni, serves them. It DNATs the node's
/// port to the pod in the node's stack, so the pod's replies must go back through that
/// stack to be translated back, whichever path the client came by: from outside, from
/// another node, from a pod on another node (over the overlay), from the node itself, from
/// a pod beside it, from the pod itself. The plugin's DEL removes its rules.
#[test]
fn host_ports_of_the_portmap_plugin_answer_every_client_with_services_off() {
    use contiv_tests::cluster::{HostPort, ROUTER_IP};
    let mut opts = BoxOptions::for_test(2);
    opts.agent_config = "[services]\nenabled = false\n".into();
    let mut b = ClusterBox::up(opts);
    let web = b.add_pod_with_host_ports(
        "node-1",
        "default/web",
        &[("app", "web")],
        &[HostPort::new(30080, 8080, "tcp"), HostPort::new(30053, 5353, "udp")],
    );
    let near = b.add_pod("node-1", "default/near", &[], &[]);
    let far = b.add_pod("node-2", "default/far", &[], &[]);
    let (node1, node2) = (b.node("node-1").clone(), b.node("node-2").clone());
    let external = b.state.external.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let peers = echo_service(&web.netns, web.ip, 8080, stop.clone());
    let front = SocketAddr::from((node1.ip, 30080));
    // Who connects, and the source the pod sees (None: the plugin masquerades a pod of the
    // node and the node itself to a node address).
    let clients: Vec<(&str, String, Option<Ipv4Addr>)> = vec![
        ("the outside", external.clone(), Some(ROUTER_IP)),
        ("node-2", node2.netns.clone(), Some(node2.ip)),
        ("a pod on node-2", far.netns.clone(), Some(far.ip)),
        ("node-1", node1.netns.clone(), None),
        ("a pod on node-1", near.netns.clone(), None),
        ("the pod itself", web.netns.clone(), None),
    ];
    let check_all = |b: &ClusterBox, when: &str| {
        for (who, ns, source) in &clients {
            if let Err(e) = try_exchange(ns, front) {
                panic!("{when}: {who} -> {front}: {e}\n{}", b.agent_log("node-1"));
            }
            let seen = peers.recv_timeout(Duration::from_secs(5)).expect("the server saw the client");
            if let Some(ip) = source {
                assert_eq!(seen.ip(), std::net::IpAddr::V4(*ip), "{when}: the source of {who} is kept");
            }
        }
    };
    check_all(&b, "first");

    // UDP from outside: a connected socket takes only the answer that comes from the
    // address it sent to.
    let web_ip = web.ip;
    let srv = enter(&web.netns, move || UdpSocket::bind((web_ip, 5353)).unwrap());
    srv.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let udp_front = SocketAddr::from((node1.ip, 30053));
    let cli = enter(&external, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(udp_front).unwrap();
        s
    });
    cli.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    cli.send(b"question").unwrap();
    let mut buf = [0u8; 64];
    let (n, peer) = srv.recv_from(&mut buf).expect("the pod got the datagram");
    assert_eq!((&buf[..n], peer.ip()), (&b"question"[..], std::net::IpAddr::V4(ROUTER_IP)));
    srv.send_to(b"answer", peer).unwrap();
    assert_eq!(cli.recv(&mut buf).map_err(|e| e.to_string()), Ok(6), "the answer, from {udp_front}");

    // A restarted agent keeps it working.
    b.stop_agent("node-1", false);
    b.start_agent("node-1");
    check_all(&b, "after an agent restart");
    stop.store(true, Ordering::Relaxed);

    // DEL: portmap removes its rules from the node.
    b.del_pod("default/web");
    let rules = Command::new("ip").args(["netns", "exec", &node1.netns, "iptables-save"]).output().unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains("30080"), "the hostPort rules are gone: {rules}");
}

/// A connected UDP socket in `ns` sends to `addr`; `srv` (the pod's socket) must get it and
/// its answer must reach the client, which takes only what comes from `addr`. Returns the
/// source the pod saw.
fn try_udp_exchange(ns: &str, addr: SocketAddr, srv: &UdpSocket) -> Result<SocketAddr, String> {
    let cli = enter(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(addr)?;
        Ok::<_, std::io::Error>(s)
    })
    .map_err(|e| format!("socket: {e}"))?;
    cli.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    cli.send(b"question").map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 64];
    let (n, peer) = srv.recv_from(&mut buf).map_err(|e| format!("the pod got nothing: {e}"))?;
    if &buf[..n] != b"question" {
        return Err(format!("the pod got {:?}", &buf[..n]));
    }
    srv.send_to(b"answer", peer).map_err(|e| format!("answer: {e}"))?;
    match cli.recv(&mut buf) {
        Ok(n) if &buf[..n] == b"answer" => Ok(peer),
        Ok(n) => Err(format!("a wrong answer: {:?}", &buf[..n])),
        Err(e) => Err(format!("no answer from {addr}: {e}")),
    }
}

/// The hostPort frontends a node programs: (frontend, kind, service, backends).
fn host_port_frontends(b: &ClusterBox, node: &str) -> Vec<(String, String, String, Vec<String>)> {
    let Some(r) = b.status_json(node, "/services") else { return vec![] };
    r["frontends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == "HostPort")
        .map(|f| {
            let backends = f["backends"].as_array().into_iter().flatten();
            (
                f["frontend"].as_str().unwrap_or_default().to_owned(),
                f["kind"].as_str().unwrap_or_default().to_owned(),
                f["service"].as_str().unwrap_or_default().to_owned(),
                backends.map(|b| b["address"].as_str().unwrap_or_default().to_owned()).collect(),
            )
        })
        .collect()
}

/// hostPorts served by the datapath (the agent's `hostports`): the Pod object declares
/// them, and the agent programs each as a frontend on its node's address with the pod as
/// its one backend, while deploy/'s `portmap` still runs after contiv-cni. TCP and UDP
/// answer every client: the outside, node-2 and its pod, node-1 and its pod, the pod
/// itself; each keeps its own source address, which portmap would have masqueraded for a
/// pod beside the server. Node-2 programs nothing of them. An agent restart keeps them;
/// the pod's NetworkPolicy decides who gets in, by the real client; DEL takes them away.
#[test]
fn host_ports_are_served_by_the_datapath_to_every_client_under_the_pods_policy() {
    use contiv_tests::cluster::{HostPort, ROUTER_IP};
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let web = b.add_pod_with_host_ports(
        "node-1",
        "default/web",
        &[("app", "web")],
        &[HostPort::new(30080, 8080, "tcp"), HostPort::new(30053, 5353, "udp")],
    );
    let near = b.add_pod("node-1", "default/near", &[("app", "near")], &[]);
    let far = b.add_pod("node-2", "default/far", &[("app", "far")], &[]);
    let (node1, node2) = (b.node("node-1").clone(), b.node("node-2").clone());
    let want = vec![
        (
            format!("{}:30053", node1.ip),
            "HostPort".to_owned(),
            "hostPort:web:30053:UDP".to_owned(),
            vec![format!("{}:5353", web.ip)],
        ),
        (
            format!("{}:30080", node1.ip),
            "HostPort".to_owned(),
            "hostPort:web:30080:TCP".to_owned(),
            vec![format!("{}:8080", web.ip)],
        ),
    ];
    b.wait_for(Duration::from_secs(15), "node-1 programs the hostPorts", || {
        let mut got = host_port_frontends(&b, "node-1");
        got.sort();
        got == want
    });
    assert!(host_port_frontends(&b, "node-2").is_empty(), "node-2 serves none of node-1's hostPorts");

    let external = b.state.external.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let peers = echo_service(&web.netns, web.ip, 8080, stop.clone());
    let web_ip = web.ip;
    let udp_srv = enter(&web.netns, move || UdpSocket::bind((web_ip, 5353)).unwrap());
    udp_srv.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let (front, udp_front) = (SocketAddr::from((node1.ip, 30080)), SocketAddr::from((node1.ip, 30053)));
    // Who connects, and the source the pod sees (None: not checked; the node's own
    // sockets pick a node address, the pod itself is seen as the pods' gateway).
    let clients: Vec<(&str, String, Option<Ipv4Addr>)> = vec![
        ("the outside", external.clone(), Some(ROUTER_IP)),
        ("node-2", node2.netns.clone(), Some(node2.ip)),
        ("a pod on node-2", far.netns.clone(), Some(far.ip)),
        ("node-1", node1.netns.clone(), None),
        ("a pod on node-1", near.netns.clone(), Some(near.ip)),
        ("the pod itself", web.netns.clone(), None),
    ];
    let check_all = |b: &ClusterBox, when: &str| {
        for (who, ns, source) in &clients {
            if let Err(e) = try_exchange(ns, front) {
                panic!("{when}: TCP {who} -> {front}: {e}\n{}", b.agent_log("node-1"));
            }
            let seen = peers.recv_timeout(Duration::from_secs(5)).expect("the server saw the client");
            let udp_seen = try_udp_exchange(ns, udp_front, &udp_srv)
                .unwrap_or_else(|e| panic!("{when}: UDP {who} -> {udp_front}: {e}\n{}", b.agent_log("node-1")));
            if let Some(ip) = source {
                assert_eq!(seen.ip(), std::net::IpAddr::V4(*ip), "{when}: TCP keeps the source of {who}");
                assert_eq!(udp_seen.ip(), std::net::IpAddr::V4(*ip), "{when}: UDP keeps the source of {who}");
            }
        }
    };
    check_all(&b, "first");
    b.stop_agent("node-1", false);
    b.start_agent("node-1");
    check_all(&b, "after an agent restart");

    // The pod admits the pod beside it and the outside; the node itself always gets in.
    b.apply_yaml(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web-in, namespace: default}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n\
         \x20 ingress: [{{from: [{{podSelector: {{matchLabels: {{app: near}}}}}}, {{ipBlock: {{cidr: {ROUTER_IP}/32}}}}]}}]\n"
    ));
    b.wait_for(Duration::from_secs(15), "the policy keeps the pod on node-2 out", || {
        try_exchange(&far.netns, front).is_err()
    });
    for (who, ns, _) in &clients {
        let denied = *who == "node-2" || *who == "a pod on node-2";
        match try_exchange(ns, front) {
            Ok(()) => {
                assert!(!denied, "TCP {who} got past the pod's policy");
                peers.recv_timeout(Duration::from_secs(5)).expect("the server saw the client");
            }
            Err(e) => assert!(denied, "TCP {who} is admitted by the policy: {e}\n{}", b.agent_log("node-1")),
        }
        let udp = try_udp_exchange(ns, udp_front, &udp_srv);
        assert_eq!(udp.is_err(), denied, "UDP {who}: {udp:?}");
    }
    stop.store(true, Ordering::Relaxed);

    // DEL: the frontends go with the pod.
    b.del_pod("default/web");
    b.wait_for(Duration::from_secs(15), "node-1 drops the hostPorts", || host_port_frontends(&b, "node-1").is_empty());
    assert!(try_exchange(&external, front).is_err(), "nothing answers on the hostPort any more");
}

/// A DNAT in a node's stack, the way kube-proxy's iptables mode renders a Service (what
/// runs instead of contiv's services with `[services] enabled = false`; an address contiv
/// does not serve goes the same way): a pod's connection to the virtual address is
/// translated by node-1's stack to a pod on node-2, or on node-1, and the backend's
/// replies must come back through node-1's stack to be translated back.
#[test]
fn a_dnat_in_the_nodes_stack_to_a_pod_on_any_node_is_translated_back() {
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let client = b.add_pod("node-1", "default/client", &[], &[]);
    let local = b.add_pod("node-1", "default/local", &[], &[]);
    let remote = b.add_pod("node-2", "default/remote", &[], &[]);
    let node1 = b.node("node-1").netns.clone();
    let stop = Arc::new(AtomicBool::new(false));
    for (vip, backend) in [("10.99.0.1", &remote), ("10.99.0.2", &local)] {
        let peers = echo_service(&backend.netns, backend.ip, 8080, stop.clone());
        let rule = format!("PREROUTING -d {vip}/32 -p tcp --dport 80 -j DNAT --to-destination {}:8080", backend.ip);
        let out = Command::new("ip")
            .args(["netns", "exec", &node1, "iptables", "-t", "nat", "-A"])
            .args(rule.split(' '))
            .output()
            .unwrap();
        assert!(out.status.success(), "iptables: {}", String::from_utf8_lossy(&out.stderr));
        let front: SocketAddr = format!("{vip}:80").parse().unwrap();
        for i in 0..3 {
            if let Err(e) = try_exchange(&client.netns, front) {
                panic!("connection {i} to {vip} (-> {}): {e}\n{}", backend.id(), b.agent_log("node-1"));
            }
            let seen = peers.recv_timeout(Duration::from_secs(5)).expect("the backend saw the client");
            assert_eq!(seen.ip(), std::net::IpAddr::V4(client.ip), "the backend sees the client pod");
        }
    }
    stop.store(true, Ordering::Relaxed);
}

/// `contiv-agent cleanup`, as the uninstall DaemonSet runs it once the agent is gone:
/// the pins go, and with them the programs on the uplink (and the pods, and at the cgroup
/// root); the overlay device and the slow-path port go too. Run twice, it still succeeds.
#[test]
fn cleanup_removes_what_an_agent_left_on_its_node() {
    let mut b = ClusterBox::up(BoxOptions::for_test(1));
    let node = b.node("node-1").clone();
    b.stop_agent("node-1", false);
    let in_node = |args: &[&str]| {
        let out = Command::new("ip").args(["netns", "exec", &node.netns]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let links = || in_node(&["ip", "-o", "link", "show"]);
    assert!(links().contains("cvx0") && links().contains("cslow0"), "{}", links());
    // The kernel's ids of the agent's BPF links (uplink, pods' veths, slow path, cgroup root).
    let bpf_link_id = |out: &[u8]| serde_json::from_slice::<serde_json::Value>(out).ok()?["id"].as_u64();
    let mut pinned = vec![];
    for entry in std::fs::read_dir(node.pin_dir.join("links")).unwrap() {
        let path = entry.unwrap().path();
        let out = Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(&path).output().unwrap();
        pinned.push(bpf_link_id(&out.stdout).unwrap_or_else(|| panic!("{}: no link id", path.display())));
    }
    assert!(pinned.len() >= 10, "the uplink's, the slow path's and the socket programs' links: {pinned:?}");
    let agent = contiv_tests::bin("contiv-agent");
    for round in 0..2 {
        // nsenter, not `ip netns exec`, which mounts a sysfs of its own over /sys and so
        // hides bpffs (the uninstall DaemonSet mounts it at /sys/fs/bpf).
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.netns))
            .arg(&agent)
            .arg("--config")
            .arg(&node.config)
            .arg("cleanup")
            .output()
            .unwrap();
        assert!(out.status.success(), "cleanup #{round}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(!node.pin_dir.exists(), "the pins are gone");
    assert!(!links().contains("cvx0") && !links().contains("cslow0"), "{}", links());
    let out = Command::new("bpftool").args(["-j", "link", "show"]).output().unwrap();
    let live: Vec<u64> = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
        .unwrap()
        .iter()
        .filter_map(|l| l["id"].as_u64())
        .collect();
    let left: Vec<&u64> = pinned.iter().filter(|id| live.contains(id)).collect();
    assert!(left.is_empty(), "links still attached after cleanup: {left:?}");
}

/// A UDP server in `ns` on `ip`; `received` reports whether a datagram arrived.
fn udp_listener(ns: &str, ip: Ipv4Addr) -> UdpSocket {
    let srv = enter(ns, move || UdpSocket::bind((ip, 0)).expect("bind"));
    srv.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    srv
}

/// The payloads that arrived at `srv` until it went quiet.
fn received(srv: &UdpSocket) -> Vec<(String, SocketAddr)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok((n, peer)) = srv.recv_from(&mut buf) {
        got.push((String::from_utf8_lossy(&buf[..n]).into_owned(), peer));
    }
    got
}

/// A VXLAN payload (VNI 1, the box's) carrying a UDP datagram `from` -> `to`, inner
/// Ethernet to `dst_mac`.
fn vxlan_payload(dst_mac: [u8; 6], from: SocketAddr, to: SocketAddr, data: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else { panic!("IPv4 only") };
    let mut p = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x66, 0x08, 0x00]);
    p.extend_from_slice(&ipv4_udp(from, to, data));
    p
}

/// An IPv4 UDP datagram `from` -> `to` (header checksum set, no UDP checksum).
fn ipv4_udp(from: SocketAddrV4, to: SocketAddrV4, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    let total = (20 + 8 + data.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&from.ip().octets());
    ip.extend_from_slice(&to.ip().octets());
    let mut sum: u32 = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&from.port().to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&(8 + data.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

fn mac_of(b: &ClusterBox, target: &str, ifname: &str) -> [u8; 6] {
    let out = b.cmd(target, "cat").arg(format!("/sys/class/net/{ifname}/address")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let bytes: Vec<u8> = text.trim().split(':').map(|h| u8::from_str_radix(h, 16).expect("mac")).collect();
    bytes.try_into().unwrap_or_else(|_| panic!("no MAC of {ifname} on {target}: {text}"))
}

/// Pod addresses are the overlay's: from the wire, a plain packet with a pod's source (the
/// gateway every isolated pod admits, another node's pod) never reaches a pod; and a
/// VXLAN packet of a pod's own making, or one sent to another address of a node, never
/// passes as the overlay's, whose inner packet would be judged as another pod's.
#[test]
fn forged_pod_sources_never_reach_a_pod() {
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let z = b.add_pod("node-2", "default/z", &[], &[]);
    let y = b.add_pod("node-1", "default/y", &[], &[]);
    let x = b.add_pod("node-1", "default/x", &[], &[]);
    let (node1, node2) = (b.node("node-1").ip, b.node("node-2").ip);
    let external = b.state.external.clone();
    // The outside routes z's address to its node, as a router next to the nodes could.
    run_ok(b.cmd("external", "ip").args(["route", "add", &format!("{}/32", z.ip), "via", &node2.to_string()]));
    let z_gateway = Ipv4Addr::from(u32::from(z.ip) & 0xffff_ff00 | 1);
    for forged in [z_gateway, y.ip] {
        run_ok(b.cmd("external", "ip").args(["addr", "add", &format!("{forged}/32"), "dev", "lo"]));
    }
    let srv = udp_listener(&z.netns, z.ip);
    let to = srv.local_addr().unwrap();
    for (source, what) in [(EXTERNAL_IP, "outside"), (z_gateway, "gateway"), (y.ip, "pod")] {
        enter(&external, move || {
            let s = UdpSocket::bind((source, 0)).unwrap();
            for _ in 0..3 {
                s.send_to(what.as_bytes(), to).unwrap();
            }
        });
    }
    let got: Vec<String> = received(&srv).into_iter().map(|(m, _)| m).collect();
    assert!(got.iter().any(|m| m == "outside"), "the outside reaches the pod: {got:?}");
    assert!(!got.iter().any(|m| m == "gateway" || m == "pod"), "forged sources got through: {got:?}");

    // A VXLAN packet whose inner datagram says y -> z. Sent by node-1's own stack to
    // node-2's registered address, it is the overlay's (the control: the packet is good).
    let cvx_mac = mac_of(&b, "node-2", "cvx0");
    let forged = SocketAddr::from((y.ip, 5555));
    let send_vni = |ns: String, from: Ipv4Addr, at: Ipv4Addr, what: &'static str, vni: u8| {
        let mut payload = vxlan_payload(cvx_mac, forged, to, what.as_bytes());
        payload[6] = vni;
        enter(&ns, move || {
            let s = UdpSocket::bind((from, 0)).unwrap();
            for _ in 0..3 {
                s.send_to(&payload, (at, 4789)).unwrap();
            }
        });
    };
    let send = |ns: String, from: Ipv4Addr, at: Ipv4Addr, what: &'static str| send_vni(ns, from, at, what, 1);
    send(b.node("node-1").netns.clone(), node1, node2, "overlay");
    let got = received(&srv);
    assert!(got.iter().any(|(m, p)| m == "overlay" && *p == forged), "the crafted packet is valid: {got:?}");
    // The same from the same node with another VNI is not the overlay's (someone else's
    // VXLAN on the port; the device takes any VNI).
    send_vni(b.node("node-1").netns.clone(), node1, node2, "another vni", 2);
    // node-2 gets a second address: the same packet sent there is not the overlay's.
    let second = Ipv4Addr::new(192, 168, 100, 250);
    run_ok(b.cmd("node-2", "ip").args(["addr", "add", &format!("{second}/24"), "dev", "eth0"]));
    send(b.node("node-1").netns.clone(), node1, second, "second address");
    // Pod x makes it with an ordinary UDP socket: its node masquerades it to node-1's
    // address on the way, and the inner packet would pass as pod y's.
    send(x.netns.clone(), x.ip, second, "from a pod");
    send(x.netns.clone(), x.ip, node2, "from a pod to the node");
    let got = received(&srv);
    assert!(got.is_empty(), "forged overlay packets got through: {got:?}");
    // node-1's stack sent its three to the second address and three with VNI 2 to node-2,
    // which refused them as not the overlay's; the pod's never left node-1.
    let node = b.status_json("node-2", "/node").expect("/node");
    let spoofed = node["overlayCounters"]["rxSpoofed"].as_u64().unwrap_or_else(|| panic!("{node}"));
    assert_eq!(spoofed, 6, "{node}");
}

/// A pod's own IPIP, SIT or GRE packet to a node's address (another node's, its own) is
/// dropped at its edge and counted: a node with such a tunnel, even a fallback device like
/// `tunl0` once up, would decapsulate it, and its stack hand the inner packet, whatever its
/// source, to a pod past every check of the datapath. (This kernel has none of those
/// tunnels, so a raw socket on node-2 stands for one.) The same packets to an address
/// outside the cluster leave, and node-1's own stack still reaches node-2 with them.
#[test]
fn a_pods_own_ipip_sit_or_gre_to_a_node_never_leaves_it() {
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let z = b.add_pod("node-2", "default/z", &[], &[]);
    let x = b.add_pod("node-1", "default/x", &[], &[]);
    let (node1, node2) = (b.node("node-1").ip, b.node("node-2").ip);
    const PROTOS: [u8; 3] = [4, 41, 47];
    // The inner packet claims to be z's gateway talking to z: node-2's stack would route
    // it to z.
    let gateway = Ipv4Addr::from(u32::from(z.ip) & 0xffff_ff00 | 1);
    let inner = |what: &str| ipv4_udp(SocketAddrV4::new(gateway, 5555), SocketAddrV4::new(z.ip, 7777), what.as_bytes());
    let x_ns = x.netns.clone();
    let send_from_x = move |proto: u8, to: Ipv4Addr, what: &'static str| {
        let packet = inner(what);
        enter(&x_ns, move || contiv_tests::send_ip_packet(proto, x.ip, to, &packet));
    };
    let drops = || contiv_tests::netpol::pod_counter(&b, "node-1", x.ip, "dropOverlayPort");
    // Once node-1's agent knows node-2's address, x's GRE to it is dropped.
    b.wait_for(Duration::from_secs(20), "x's GRE to node-2 is dropped", || {
        send_from_x(47, node2, "probe");
        std::thread::sleep(Duration::from_millis(200));
        drops() > 0
    });

    let listeners =
        |ns: String| -> Vec<socket2::Socket> { PROTOS.iter().map(|&p| enter(&ns, move || raw_listener(p))).collect() };
    let at_node2 = listeners(b.node("node-2").netns.clone());
    let outside = listeners(b.state.external.clone());
    let before = drops();
    for proto in PROTOS {
        send_from_x(proto, node2, "from x to node-2");
        send_from_x(proto, node1, "from x to its node");
        send_from_x(proto, EXTERNAL_IP, "from x to the outside");
        let packet = inner("from node-1");
        enter(&b.node("node-1").netns.clone(), move || contiv_tests::send_ip_packet(proto, node1, node2, &packet));
    }
    for (proto, (n2, out)) in PROTOS.iter().zip(at_node2.iter().zip(&outside)) {
        let got = raw_received(n2);
        assert!(
            got.iter().any(|m| m == "from node-1"),
            "protocol {proto}: node-1's own packet reaches node-2: {got:?}"
        );
        assert!(!got.iter().any(|m| m.starts_with("from x")), "protocol {proto}: x's packet reached node-2: {got:?}");
        let got = raw_received(out);
        assert!(got.iter().any(|m| m == "from x to the outside"), "protocol {proto}: x's packet leaves: {got:?}");
    }
    assert_eq!(drops() - before, 2 * PROTOS.len() as u64, "x's packets to node-2 and to its own node, counted");
}

/// A raw IPv4 socket receiving every packet of protocol `proto` (in the calling thread's
/// network namespace).
fn raw_listener(proto: u8) -> socket2::Socket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(i32::from(proto).into()))
        .expect("raw socket");
    s.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    s
}

/// The payloads (after the inner IPv4 and UDP headers of [`ipv4_udp`]) a [`raw_listener`]
/// got until it went quiet.
fn raw_received(s: &socket2::Socket) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = (&*s).read(&mut buf) {
        let outer = usize::from(buf[0] & 0x0f) * 4;
        got.push(String::from_utf8_lossy(buf.get(outer + 28..n).unwrap_or_default()).into_owned());
    }
    got
}

fn run_ok(c: &mut Command) {
    let out = c.output().expect("run");
    assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The outer headers of the overlay: the inner packet's ECN field copied (CE as ECT(0), as
/// the kernel's tunnels do), DF clear (a narrower hop between nodes fragments rather than
/// drops), and the node's registered address as source even when its routes prefer another
/// (the receiver accepts the overlay only from that address).
#[test]
fn outer_headers_carry_ecn_no_df_and_the_registered_address() {
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let a = b.add_pod("node-1", "default/a", &[], &[]);
    let c = b.add_pod("node-2", "default/c", &[], &[]);
    let pcap = b.state.dir.join("outer.pcap");
    let mut tcpdump = b
        .cmd("fabric", "tcpdump")
        .args(["-i", "n1", "-n", "--immediate-mode", "-U", "-w"])
        .arg(&pcap)
        .args(["udp", "port", "4789"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(800));
    for tos in ["0x2", "0x3"] {
        let out = b.cmd(&a.id(), "ping").args(["-c", "1", "-W", "2", "-Q", tos, &c.ip.to_string()]).output().unwrap();
        assert!(out.status.success(), "ping -Q {tos}: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: SIGTERM to a tcpdump we started, by pid.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGTERM) };
    let _ = tcpdump.wait();
    let out = Command::new("tcpdump").args(["-n", "-v", "-r"]).arg(&pcap).output().expect("tcpdump -r");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // -v prints each header as "IP (tos ..., flags [...], ...)" then its addresses; the
    // outer one comes first, on the line with the timestamp.
    let requests: Vec<(&str, &str)> = text
        .split('\n')
        .collect::<Vec<_>>()
        .windows(4)
        .filter(|w| w[0].starts_with(|c: char| c.is_ascii_digit()) && w[3].contains("ICMP echo request"))
        .map(|w| (w[0], w[2]))
        .collect();
    assert_eq!(requests.len(), 2, "two echo requests crossed n1 in VXLAN: {text}");
    for ((outer, inner), want_inner) in requests.iter().zip(["tos 0x2,ECT(0)", "tos 0x3,CE"]) {
        assert!(inner.contains(want_inner), "inner {inner} in {text}");
        assert!(outer.contains("tos 0x2,ECT(0)"), "outer header's ECN: {outer} in {text}");
        assert!(outer.contains("flags [none]"), "outer header's DF: {outer} in {text}");
    }

    // node-1's routes prefer a second address: the node's own packets to c take the
    // overlay device, which would pick that as outer source, and node-2 would refuse them.
    let other = "192.168.100.251";
    run_ok(b.cmd("node-1", "ip").args(["addr", "add", &format!("{other}/24"), "dev", "eth0"]));
    run_ok(b.cmd("node-1", "ip").args(["route", "replace", "192.168.100.0/24", "dev", "eth0", "src", other]));
    assert!(ping(&b, "node-1", c.ip), "node-1 reaches c through the overlay device");
    let node = b.status_json("node-2", "/node").expect("/node");
    assert_eq!(node["overlayCounters"]["rxSpoofed"], 0, "{node}");
}
