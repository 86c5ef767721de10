//! End to end on one node (root): pods created by the real contiv-cni binary talk through
//! the eBPF fast path; the vswitch answers the gateway through AF_XDP; spoofing is
//! dropped; DEL leaves nothing behind; the agent can restart under running pods.

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use contiv_tests::{
    Node, NodeOptions, Pod, counter, iperf3_bps, ping, send_header_hiding_fragments, send_lone_later_fragment,
    set_ip_options,
};

fn node() -> Node {
    Node::start(NodeOptions::default())
}

/// Sends `payload` over TCP from `client` to a listener in `server` and returns what
/// the server read (echoed back to the client, which checks it).
fn tcp_exchange(client: &Pod, server: &Pod, payload: &'static [u8]) {
    let server_ip = server.ip;
    let listener = server.ns.enter(move || TcpListener::bind((server_ip, 0)).expect("bind"));
    let port = listener.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        let mut buf = vec![0u8; payload.len()];
        s.read_exact(&mut buf).expect("server read");
        s.write_all(&buf).expect("server echo");
        peer
    });
    let addr = SocketAddr::from((server_ip, port));
    let mut stream =
        client.ns.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"));
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(payload).unwrap();
    let mut echo = vec![0u8; payload.len()];
    stream.read_exact(&mut echo).expect("client read echo");
    assert_eq!(echo, payload);
    let peer = srv.join().unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(client.ip), "server saw the client's real address");
}

fn udp_exchange(client: &Pod, server: &Pod) -> bool {
    let (server_ip, client_ip) = (server.ip, client.ip);
    let srv = server.ns.enter(move || UdpSocket::bind((server_ip, 0)).unwrap());
    let cli = client.ns.enter(move || UdpSocket::bind((client_ip, 0)).unwrap());
    srv.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    cli.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    cli.send_to(b"ping", srv.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 16];
    let Ok((n, from)) = srv.recv_from(&mut buf) else {
        return false;
    };
    assert_eq!(&buf[..n], b"ping");
    assert_eq!(from, cli.local_addr().unwrap());
    srv.send_to(b"pong", from).unwrap();
    matches!(cli.recv_from(&mut buf), Ok((4, _)))
}

#[test]
fn pods_talk_tcp_and_udp_both_ways_through_the_fast_path() {
    let node = node();
    let pods: Vec<Pod> = (0..3).map(|_| node.add_pod()).collect();
    let ips: HashSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), 3);
    for (a, b) in [(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)] {
        tcp_exchange(&pods[a], &pods[b], b"hello through the eBPF fast path");
        assert!(udp_exchange(&pods[a], &pods[b]), "UDP {a} -> {b}");
    }
    // The fast path counted what it forwarded; the host stack never routed it.
    for p in &pods {
        let c = node.pod_counters(p.ip).expect("counters entry");
        assert!(counter(&c, "fwd_packets") >= 8, "{c:?}");
        assert!(counter(&c, "fwd_bytes") > 0);
        assert_eq!(counter(&c, "drop_spoofed_ip"), 0);
    }
    // The result is what a runtime expects: pod interface in the sandbox, /32, gateway.
    let r = &pods[0].result;
    assert_eq!(r["cniVersion"], "1.0.0");
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    assert_eq!(r["interfaces"][1]["sandbox"], pods[0].ns.path().to_string_lossy().as_ref());
    assert_eq!(r["ips"][0]["interface"], 1);
    assert_eq!(r["ips"][0]["gateway"], "10.1.1.1");
    assert!(r["ips"][0]["address"].as_str().unwrap().ends_with("/32"));
    // TTL decremented by one routed hop.
    let out = pods[0].ns.cmd("ping").args(["-c", "1", "-W", "2", &pods[1].ip.to_string()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("ttl=63"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn gateway_arp_and_ping_are_answered_by_the_vswitch_over_af_xdp() {
    let node = node();
    let pod = node.add_pod();
    let before = node.slowport_counters();
    let pod_before = node.pod_counters(pod.ip).unwrap();
    // Forget the static neighbour entry so the pod has to ARP for the gateway.
    pod.ns.ip(&["neigh", "del", "10.1.1.1", "dev", "eth0"]);
    assert!(ping(&pod.ns, Ipv4Addr::new(10, 1, 1, 1), 3), "gateway did not answer:\n{}", node.agent_log());
    let neigh = pod.ns.ip(&["neigh", "show", "10.1.1.1"]);
    assert!(neigh.contains("02:fe:00:00:00:01"), "ARP not answered with the gateway MAC: {neigh}");
    let after = node.slowport_counters();
    assert!(
        counter(&after, "to_vswitch_packets") >= counter(&before, "to_vswitch_packets") + 4,
        "ARP + 3 echo requests went through the AF_XDP socket: {before:?} -> {after:?}"
    );
    assert!(counter(&after, "from_vswitch_delivered") >= counter(&before, "from_vswitch_delivered") + 4);
    let pod_after = node.pod_counters(pod.ip).unwrap();
    assert!(counter(&pod_after, "slow_packets") >= counter(&pod_before, "slow_packets") + 4);
    assert!(counter(&pod_after, "from_slow_packets") >= counter(&pod_before, "from_slow_packets") + 4);

    // ping -R: the gateway answers with the route recorded, itself in it on arrival and on
    // the way back, as a Linux host answers.
    let out = pod.ns.cmd("ping").args(["-R", "-c", "1", "-W", "2", "10.1.1.1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let route = text.split_once("RR:").map(|(_, r)| r.split("\n\n").next().unwrap_or_default()).unwrap_or_default();
    let hops: Vec<&str> = route.split_whitespace().collect();
    let (me, gw) = (pod.ip.to_string(), "10.1.1.1");
    assert!(out.status.success(), "ping -R to the gateway: {text}");
    assert_eq!(hops, [me.as_str(), gw, gw, me.as_str()], "the recorded route: {text}");

    // ping -T tsandaddr: the Timestamp option comes back too, the gateway's times between
    // the pod's, each with its address.
    let out = pod.ns.cmd("ping").args(["-T", "tsandaddr", "-c", "1", "-W", "2", "10.1.1.1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let stamps = text.split_once("TS:").map(|(_, r)| r.split("\n\n").next().unwrap_or_default()).unwrap_or_default();
    let stamped: Vec<&str> = stamps.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(out.status.success(), "ping -T to the gateway: {text}");
    assert_eq!(stamped, [me.as_str(), gw, gw, me.as_str()], "who stamped the echo: {text}");
}

/// The interface index of `name` in the node's namespace, if it exists.
fn link_index(node: &Node, name: &str) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["-n", node.ns.name(), "-o", "link", "show", "dev", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).split(':').next().and_then(|i| i.trim().parse().ok())
}

#[test]
fn a_slow_path_port_deleted_from_outside_is_recreated_and_served_again() {
    let node = node();
    let pod = node.add_pod();
    let gateway = Ipv4Addr::new(10, 1, 1, 1);
    assert!(ping(&pod.ns, gateway, 1), "the gateway answers:\n{}", node.agent_log());
    let index = link_index(&node, "cslow0").expect("cslow0 exists");
    // Someone deletes the port (one end takes the other with it).
    node.ns.ip(&["link", "del", "cslow1"]);
    assert_eq!(link_index(&node, "cslow0"), None, "both ends are gone");
    // The agent notices its socket's interface went away, re-creates the port at the same
    // index (the datapath config names it) with its programs, and serves it again.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ping(&pod.ns, gateway, 1) {
        assert!(std::time::Instant::now() < deadline, "the gateway never answered again:\n{}", node.agent_log());
    }
    assert_eq!(link_index(&node, "cslow0"), Some(index), "the host end keeps its index");
    let mtu = node.ns.ip(&["-o", "link", "show", "dev", "cslow1"]);
    assert!(mtu.contains("mtu 1500") && mtu.contains("xdp"), "the vswitch end has its MTU and XDP program: {mtu}");
    // The fast path still hands the slow path what it cannot serve.
    let drops = node.vswitch_drops("unknown_destination");
    assert!(!ping(&pod.ns, Ipv4Addr::new(10, 1, 1, 250), 1));
    assert!(node.vswitch_drops("unknown_destination") > drops);
}

#[test]
fn unknown_destinations_go_to_the_slow_path_and_are_dropped() {
    let node = node();
    let pod = node.add_pod();
    let before = node.pod_counters(pod.ip).unwrap();
    let drops_before = node.vswitch_drops("unknown_destination");
    assert!(!ping(&pod.ns, Ipv4Addr::new(10, 1, 1, 250), 2), "nobody has 10.1.1.250");
    let after = node.pod_counters(pod.ip).unwrap();
    assert!(counter(&after, "slow_packets") >= counter(&before, "slow_packets") + 2);
    assert_eq!(counter(&after, "fwd_packets"), counter(&before, "fwd_packets"));
    assert!(node.vswitch_drops("unknown_destination") >= drops_before + 2);
    let metrics = node.status("/metrics");
    assert!(
        metrics.contains("contiv_slowpath_verdicts_total{verdict=\"drop\",reason=\"unknown_destination\"}"),
        "{metrics}"
    );
    // Without K8S_POD_* in CNI_ARGS the attachment is named by its container ID.
    let pod_series =
        format!("contiv_pod_slowpath_packets_total{{namespace=\"\",pod=\"{}\",interface=\"eth0\"}}", pod.container_id);
    assert!(metrics.contains(&pod_series), "{pod_series} in\n{metrics}");
}

/// The packet counters a frame from a pod can move on the fast path: forwarded, host,
/// tunnel. (Not the slow path's: the pod's ARP for the gateway goes there when it likes.)
fn sent_anywhere(node: &Node, ip: Ipv4Addr) -> u64 {
    let c = node.pod_counters(ip).unwrap();
    ["fwd_packets", "host_packets", "tunnel_packets"].iter().map(|k| counter(&c, k)).sum()
}

#[test]
fn fragments_take_the_fast_path() {
    let node = node();
    // IPv6 off: the slow-path count below is for IPv4 (see `add_pod_ipv4_only`).
    let a = node.add_pod_ipv4_only();
    let b = node.add_pod();
    let b_ip = b.ip;
    let srv = b.ns.enter(move || UdpSocket::bind((b_ip, 0)).unwrap());
    srv.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let dst = srv.local_addr().unwrap();
    let a_ip = a.ip;
    let cli = a.ns.enter(move || UdpSocket::bind((a_ip, 0)).unwrap());
    cli.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 4096];

    // A 3000-byte datagram leaves pod a as three fragments (MTU 1500); the fast path
    // forwards each, and so it does b's 3000-byte answer.
    let frag_before = node.vswitch_drops("fragment");
    let (fwd_before, slow_before) = {
        let c = node.pod_counters(a.ip).unwrap();
        (counter(&c, "fwd_packets"), counter(&c, "slow_packets"))
    };
    let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    cli.send_to(&big, dst).unwrap();
    let (n, from) = srv.recv_from(&mut buf).expect("the fragmented datagram arrives");
    assert_eq!((&buf[..n], from), (&big[..], cli.local_addr().unwrap()));
    srv.send_to(&big, from).unwrap();
    let (n, _) = cli.recv_from(&mut buf).expect("the fragmented answer arrives");
    assert_eq!(&buf[..n], &big[..]);
    let c = node.pod_counters(a.ip).unwrap();
    assert!(counter(&c, "fwd_packets") >= fwd_before + 3, "{c:?}");
    assert_eq!(counter(&c, "slow_packets"), slow_before, "{c:?}");
    assert_eq!(node.vswitch_drops("fragment"), frag_before);

    // A large ping: its fragments borrow the echo's identifier, both ways.
    let ok =
        a.ns.cmd("ping")
            .args(["-c", "2", "-i", "0.2", "-W", "2", "-s", "3000", &b.ip.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    assert!(ok, "a 3000-byte ping from a to b is answered");

    // A later fragment whose first never passed: its ports are unknown, so it is dropped
    // (its bytes are payload, never read as ports): counted as a fragment drop, and
    // nowhere it could go.
    let sent = sent_anywhere(&node, a.ip);
    let dropped = counter(&node.pod_counters(a.ip).unwrap(), "drop_fragment");
    let (SocketAddr::V4(dst4), src) = (dst, a.ip) else { unreachable!() };
    a.ns.enter(move || send_lone_later_fragment(src, dst4));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sent_anywhere(&node, a.ip), sent, "a lone later fragment goes nowhere");
    let c = node.pod_counters(a.ip).unwrap();
    assert_eq!(counter(&c, "drop_fragment"), dropped + 1, "{c:?}");

    // Fragments that hide a TCP header from the policy stage (RFC 1858): a first one too
    // short for the flags, one at offset 8 rewriting them. Both dropped, and counted.
    let sent = sent_anywhere(&node, a.ip);
    let to_b = std::net::SocketAddrV4::new(b.ip, 22);
    a.ns.enter(move || send_header_hiding_fragments(src, to_b));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sent_anywhere(&node, a.ip), sent, "neither fragment goes anywhere");
    let c = node.pod_counters(a.ip).unwrap();
    assert_eq!(counter(&c, "drop_fragment"), dropped + 3, "{c:?}");

    // An address of the cluster's pod range that no node owns: dropped, and counted.
    let no_route = counter(&c, "drop_no_route");
    a.ns.enter(|| {
        let s = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.send_to(b"x", (std::net::Ipv4Addr::new(10, 1, 200, 5), 9)).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    let c = node.pod_counters(a.ip).unwrap();
    assert_eq!(counter(&c, "drop_no_route"), no_route + 1, "{c:?}");
}

/// Packets with IPv4 options are forwarded by the fast path as the kernel forwards them:
/// their transport header is read past the options (for conntrack, policy and NAT).
#[test]
fn ip_options_take_the_fast_path() {
    let node = node();
    // IPv6 off: the slow-path count below is for IPv4 (see `add_pod_ipv4_only`).
    let a = node.add_pod_ipv4_only();
    let b = node.add_pod();
    let (a_ip, b_ip) = (a.ip, b.ip);
    let srv = b.ns.enter(move || UdpSocket::bind((b_ip, 0)).unwrap());
    srv.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let dst = srv.local_addr().unwrap();
    let cli = a.ns.enter(move || UdpSocket::bind((a_ip, 0)).unwrap());
    cli.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    set_ip_options(&cli);
    let mut buf = [0u8; 4096];
    let (fwd_before, slow_before) = {
        let c = node.pod_counters(a.ip).unwrap();
        (counter(&c, "fwd_packets"), counter(&c, "slow_packets"))
    };

    // UDP, both ways; and a 3000-byte datagram, whose first fragment alone carries the
    // options (NOP is not copied into later fragments).
    cli.send_to(b"with options", dst).unwrap();
    let (n, from) = srv.recv_from(&mut buf).expect("a datagram with options arrives");
    assert_eq!((&buf[..n], from), (&b"with options"[..], cli.local_addr().unwrap()));
    srv.send_to(b"answer", from).unwrap();
    let (n, _) = cli.recv_from(&mut buf).expect("the answer arrives");
    assert_eq!(&buf[..n], b"answer");
    let big: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
    cli.send_to(&big, dst).unwrap();
    let (n, _) = srv.recv_from(&mut buf).expect("a fragmented datagram with options arrives");
    assert_eq!(&buf[..n], &big[..]);

    // TCP with options on every segment (b's stack answers the handshake with them too).
    let listener = b.ns.enter(move || TcpListener::bind((b_ip, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
    });
    let mut s = a.ns.enter(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        set_ip_options(&s);
        s.connect_timeout(&addr.into(), Duration::from_secs(5)).expect("a connection with options");
        TcpStream::from(s)
    });
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).expect("the echo over a connection with options");
    assert_eq!(&got, b"hello");
    echo.join().unwrap();

    // ping -R: an echo with the Record Route option, answered with it.
    let out = a.ns.cmd("ping").args(["-R", "-c", "1", "-W", "2", &b.ip.to_string()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("RR:"), "ping -R from a to b: {text}");

    let c = node.pod_counters(a.ip).unwrap();
    assert!(counter(&c, "fwd_packets") >= fwd_before + 8, "{c:?}");
    assert_eq!(counter(&c, "slow_packets"), slow_before, "nothing took the slow path: {c:?}");
}

#[test]
fn spoofed_source_ip_and_mac_are_dropped_and_counted() {
    let node = node();
    let a = node.add_pod();
    let b = node.add_pod();
    assert!(udp_exchange(&a, &b), "baseline");

    // Source IP that is not the pod's own.
    a.ns.ip(&["addr", "add", "10.1.1.200/32", "dev", "eth0"]);
    let b_ip = b.ip;
    let srv = b.ns.enter(move || UdpSocket::bind((b_ip, 0)).unwrap());
    srv.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let spoofer = a.ns.enter(|| UdpSocket::bind((Ipv4Addr::new(10, 1, 1, 200), 0)).unwrap());
    for _ in 0..5 {
        spoofer.send_to(b"spoof", srv.local_addr().unwrap()).unwrap();
    }
    let mut buf = [0u8; 16];
    assert!(srv.recv_from(&mut buf).is_err(), "spoofed datagram must not arrive");
    let c = node.pod_counters(a.ip).unwrap();
    assert!(counter(&c, "drop_spoofed_ip") >= 5, "{c:?}");

    // Source MAC that is not the pod's own.
    a.ns.ip(&["link", "set", "eth0", "address", "02:de:ad:be:ef:01"]);
    assert!(!udp_exchange(&a, &b), "frames with a foreign MAC must be dropped");
    let c = node.pod_counters(a.ip).unwrap();
    assert!(counter(&c, "drop_spoofed_mac") >= 1, "{c:?}");
}

#[test]
fn del_removes_interface_ip_and_every_map_entry_without_leaks() {
    let node = node();
    let keep = node.add_pod();
    let links_before = node.pod_links().len();
    let entries = |m: &str| node.dump_map(m).len();
    let (pods0, ifaces0, counters0) = (entries("PODS"), entries("POD_IFACES"), entries("POD_COUNTERS"));
    let link_pins = || std::fs::read_dir(node.pin_dir.join("links")).unwrap().count();
    let pins0 = link_pins();
    let mut seen = HashSet::new();
    for i in 0..50 {
        let pod = node.add_pod();
        seen.insert(pod.ip);
        assert_eq!(node.pod_links().len(), links_before + 1);
        // tc_from_pod only: tc_to_pod waits for a service that needs it.
        assert_eq!(link_pins(), pins0 + 1, "the pod's link is pinned");
        assert!(node.pod_counters(pod.ip).is_some());
        node.del_pod(&pod).ok();
        // DEL is idempotent: a second DEL, and a DEL after the namespace is gone, succeed.
        node.del_pod(&pod).ok();
        if i % 10 == 0 {
            drop(pod.ns);
            node.cni("DEL", &pod.container_id, "", "eth0", "1.0.0").ok();
        }
        assert!(node.pod_counters(pod.ip).is_none(), "counters of {} left behind", pod.ip);
    }
    assert_eq!(node.pod_links().len(), links_before, "veths leaked");
    assert_eq!(link_pins(), pins0, "link pins leaked");
    assert_eq!(entries("PODS"), pods0, "PODS leaked");
    assert_eq!(entries("POD_IFACES"), ifaces0, "POD_IFACES leaked");
    assert_eq!(entries("POD_COUNTERS"), counters0, "POD_COUNTERS leaked");
    assert!(!seen.contains(&keep.ip), "an address in use was handed out again");
    assert_eq!(
        node.durable_attachments(),
        std::slice::from_ref(&keep.container_id),
        "only the kept pod holds an address"
    );
    // The kept pod still works.
    assert!(ping(&keep.ns, Ipv4Addr::new(10, 1, 1, 1), 1));
    // An interface an ADD's rollback could not delete (no record holds it) goes with the
    // runtime's DEL: it has the name only that attachment's host end has.
    let digest =
        contiv_tests::run(std::process::Command::new("sh").args(["-c", "printf %s leftover/eth0 | sha256sum"]));
    let leftover = format!("cv{}", &digest[..11]);
    node.ns.ip(&["link", "add", &leftover, "type", "veth", "peer", "name", "leftover-peer"]);
    assert!(node.pod_links().contains(&leftover));
    node.cni("DEL", "leftover", "", "eth0", "1.0.0").ok();
    assert!(!node.pod_links().contains(&leftover), "the leftover interface is deleted");
}

#[test]
fn concurrent_adds_get_distinct_addresses_and_concurrent_dels_all_succeed() {
    let node = std::sync::Arc::new(node());
    let entries = |m: &str| node.dump_map(m).len();
    let (pods0, ifaces0) = (entries("PODS"), entries("POD_IFACES"));
    let handles: Vec<_> = (0..32)
        .map(|_| {
            let node = node.clone();
            std::thread::spawn(move || node.add_pod())
        })
        .collect();
    let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
    let pods: Vec<Pod> = joined.into_iter().map(|r| r.expect("ADD")).collect();
    let ips: HashSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), 32, "addresses must be distinct");
    assert_eq!(node.pod_links().len(), 32);
    assert!(ping(&pods[0].ns, pods[31].ip, 1));
    // All at once, as a node drain does: one DEL's plan must not put back what another is
    // removing (a route to an interface already deleted failed every later DEL).
    let pods: Vec<std::sync::Arc<Pod>> = pods.into_iter().map(std::sync::Arc::new).collect();
    let handles: Vec<_> = pods
        .iter()
        .map(|p| {
            let (node, p) = (node.clone(), p.clone());
            std::thread::spawn(move || node.del_pod(&p).exit_code)
        })
        .collect();
    let codes: Vec<i32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(codes.iter().all(|c| *c == 0), "DEL exit codes: {codes:?}");
    assert_eq!(node.pod_links().len(), 0);
    assert_eq!(entries("PODS"), pods0, "PODS leaked");
    assert_eq!(entries("POD_IFACES"), ifaces0, "POD_IFACES leaked");
    assert!(node.durable_attachments().is_empty(), "addresses still held: {:?}", node.durable_attachments());
    let routes = node.ns.ip(&["-4", "route", "show", "proto", "84"]);
    assert!(pods.iter().all(|p| !routes.contains(&p.ip.to_string())), "pod routes left: {routes}");
}

#[test]
fn agent_restart_keeps_pods_connected_and_addresses_reserved() {
    let mut node = node();
    let a = node.add_pod();
    let b = node.add_pod();
    assert!(ping(&a.ns, b.ip, 1));
    let old_prog = link_prog_id(&node, &node.pod_links()[0]);
    let slow_index = link_index(&node, "cslow0").expect("cslow0 exists");
    let status = node.stop_agent();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    assert!(!node.socket.exists(), "socket removed on shutdown");
    // While the agent is down, the kernel fast path keeps forwarding.
    assert!(ping(&a.ns, b.ip, 2), "fast path must survive the agent");
    tcp_exchange(&a, &b, b"agent is down");
    // And an unreachable agent is "try again later" for the runtime.
    let out = node.cni("ADD", "late", &a.ns.path().to_string_lossy(), "eth1", "1.0.0");
    assert_eq!(out.error_code(), Some(11), "{out:?}");
    node.start_agent();
    // The slow-path port is made anew at the index the pods' programs send to.
    assert_eq!(link_index(&node, "cslow0"), Some(slow_index), "the slow-path port keeps its index");
    assert!(ping(&a.ns, b.ip, 1));
    assert!(ping(&b.ns, Ipv4Addr::new(10, 1, 1, 1), 1), "slow path back");
    let c = node.add_pod();
    assert!(c.ip != a.ip && c.ip != b.ip, "no address in use is reissued");
    tcp_exchange(&c, &a, b"after restart");
    // The restarted agent replaced the pinned tcx links: the old program is gone from
    // the kernel (nothing references it any more), the new one serves every pod.
    let old_prog = old_prog.expect("a pinned link before the restart");
    let progs = contiv_tests::run(std::process::Command::new("bpftool").args(["-j", "prog", "show"]));
    let progs: serde_json::Value = serde_json::from_str(&progs).unwrap();
    assert!(
        !progs.as_array().unwrap().iter().any(|p| p["id"].as_u64() == Some(old_prog)),
        "the old tc_from_pod (id {old_prog}) is still loaded: links stacked"
    );
    for link in node.pod_links() {
        assert_ne!(link_prog_id(&node, &link), Some(old_prog), "{link} still runs the old program");
        assert!(link_prog_id(&node, &link).is_some(), "{link} has no pinned link");
    }
    // CHECK passes on a pod wired before the restart.
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": node.network_name, "type": "contiv-cni",
        "agentSocket": node.socket, "prevResult": a.result,
    })
    .to_string();
    node.cni_with_conf("CHECK", &a.container_id, &a.ns.path().to_string_lossy(), "eth0", &conf).ok();
}

/// Program id behind the pinned tcx link of a pod interface.
fn link_prog_id(node: &Node, host_ifname: &str) -> Option<u64> {
    let pin = node.pin_dir.join("links").join(host_ifname);
    let out = std::process::Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(pin).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["prog_id"].as_u64()
}

#[test]
fn bandwidth_capability_limits_hold_on_the_fast_path() {
    let node = node();
    let limit = |dir: &str, bits: u64| serde_json::json!({"runtimeConfig": {"bandwidth": {format!("{dir}Rate"): bits, format!("{dir}Burst"): 100_000}}});
    let sender = node.add_pod_with(limit("egress", 20_000_000));
    // As containerd sends the capability: go-cni's struct has no JSON tags, so its keys
    // arrive capitalised (and the unset direction as zeros).
    let receiver = node.add_pod_with(serde_json::json!({"runtimeConfig": {"bandwidth": {
        "IngressRate": 30_000_000, "IngressBurst": 100_000, "EgressRate": 0, "EgressBurst": 0}}}));
    let free = node.add_pod();
    // The shapers sit where the limits apply, and nowhere else.
    let qdisc =
        |ns: &contiv_tests::Netns, dev: &str| contiv_tests::run(ns.cmd("tc").args(["qdisc", "show", "dev", dev]));
    assert!(qdisc(&sender.ns, "eth0").contains("tbf"), "no shaper on the egress-limited pod");
    assert!(!qdisc(&free.ns, "eth0").contains("tbf"), "a shaper on an unlimited pod");
    let receiver_host = receiver.result["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert!(qdisc(&node.ns, &receiver_host).contains("tbf"), "no shaper on the ingress-limited pod's host veth");

    let egress = iperf3_bps(&sender.ns, &free.ns, free.ip, 3);
    let ingress = iperf3_bps(&free.ns, &receiver.ns, receiver.ip, 3);
    let unlimited = iperf3_bps(&free.ns, &sender.ns, sender.ip, 2);
    eprintln!(
        "egress-limited 20 Mbit/s: {egress:.0} bit/s; ingress-limited 30 Mbit/s: {ingress:.0} bit/s; unlimited direction: {unlimited:.0} bit/s"
    );
    assert!((14e6..=21e6).contains(&egress), "egress limit 20 Mbit/s not held: {egress} bit/s");
    assert!((21e6..=31.5e6).contains(&ingress), "ingress limit 30 Mbit/s not held: {ingress} bit/s");
    // Limits are per pod and per direction: what the egress-limited pod receives is not paced.
    assert!(unlimited > 200e6, "an unlimited direction was slowed: {unlimited} bit/s");
    // Rate-limited traffic still went through the fast path, not the host's routing.
    let c = node.pod_counters(sender.ip).unwrap();
    assert!(counter(&c, "fwd_bytes") > 5_000_000, "{c:?}");
    // CHECK sees a shaper go, on either side.
    let check = |pod: &contiv_tests::Pod| {
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": node.network_name, "type": "contiv-cni",
            "agentSocket": node.socket, "prevResult": pod.result})
        .to_string();
        node.cni_with_conf("CHECK", &pod.container_id, &pod.ns.path().to_string_lossy(), "eth0", &conf)
    };
    check(&sender).ok();
    check(&receiver).ok();
    contiv_tests::run(sender.ns.cmd("tc").args(["qdisc", "del", "dev", "eth0", "root"]));
    assert_ne!(check(&sender).exit_code, 0, "CHECK missed the pod's egress shaper going");
    contiv_tests::run(node.ns.cmd("tc").args(["qdisc", "del", "dev", &receiver_host, "root"]));
    assert_ne!(check(&receiver).exit_code, 0, "CHECK missed the host end's ingress shaper going");
    check(&free).ok();
}

#[test]
fn agent_refuses_a_bpffs_private_to_its_mount_namespace() {
    // `ip netns exec` gives the agent a private mount namespace with a fresh /sys: a bpffs
    // mounted there dies with the agent, and with it every pin (a restart would stop pods).
    let ns = contiv_tests::Netns::new("ctb");
    let dir = tempfile_dir();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "nodeName = \"private\"\npodSubnet = \"10.1.1.0/24\"\ncniSocket = \"{}\"\nstateDir = \"{}\"\nbpfPinDir = \"/sys/fs/bpf/{}\"\n",
            dir.join("cni.sock").display(),
            dir.join("state").display(),
            contiv_tests::unique("contiv-private-")
        ),
    )
    .unwrap();
    let out = ns
        .cmd(contiv_tests::bin("contiv-agent").to_str().unwrap())
        .arg("--config")
        .arg(&config)
        .output()
        .expect("running the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "the agent must refuse to start: {stderr}");
    assert!(stderr.contains("mount -t bpf bpf /sys/fs/bpf"), "says how to mount it: {stderr}");
    assert!(stderr.contains("allowPrivateBpffs"), "says how to override: {stderr}");
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(contiv_tests::unique("contiv-private-"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn restart_removes_what_an_add_cut_short_left_behind() {
    let mut node = node();
    let a = node.add_pod();
    // An ADD interrupted by a crash leaves a host end named like ours (its pod end in the
    // pod's namespace) and a pin under links/, but no record: its address was never handed
    // out (the record precedes the reply).
    let pod = contiv_tests::Netns::new("ctp");
    let orphan = "cv0123456789a";
    node.ns.ip(&["link", "add", orphan, "type", "veth", "peer", "name", "eth0", "netns", pod.name()]);
    let pin = node.pin_dir.join("links").join(orphan);
    let egress_pin = node.pin_dir.join("links").join(format!("{orphan}_egress"));
    for pin in [&pin, &egress_pin] {
        contiv_tests::run(
            std::process::Command::new("bpftool")
                .args(["map", "pin", "pinned"])
                .arg(node.pin_dir.join("PODS"))
                .arg(pin),
        );
    }
    assert!(pin.exists() && node.pod_links().contains(&orphan.to_owned()));
    let status = node.stop_agent();
    assert!(status.success());
    node.start_agent();
    assert!(!node.pod_links().contains(&orphan.to_owned()), "the orphan host end is still there");
    assert!(!pin.exists(), "the orphan pin is still there");
    assert!(!egress_pin.exists(), "the orphan's egress pin is still there");
    assert!(!pod.ip(&["-o", "link", "show"]).contains("eth0"), "the pod end went with its peer");
    // The recorded pod is untouched and still forwards.
    assert_eq!(node.pod_links().len(), 1);
    assert!(ping(&a.ns, Ipv4Addr::new(10, 1, 1, 1), 1));
    let b = node.add_pod();
    assert_ne!(a.ip, b.ip);
    tcp_exchange(&a, &b, b"after the cleanup");
}

/// CPUs set in the RPS mask of a pod's host end, read through the node's own sysfs.
fn rps_cpus(node: &Node, host_ifname: &str) -> u32 {
    let mask = contiv_tests::run(node.ns.cmd("cat").arg(format!("/sys/class/net/{host_ifname}/queues/rx-0/rps_cpus")));
    mask.trim()
        .chars()
        .filter(|c| *c != ',')
        .map(|c| c.to_digit(16).unwrap_or_else(|| panic!("not a cpumask: {mask:?}")).count_ones())
        .sum()
}

fn online_cpus() -> u32 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    text.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().unwrap() - a.parse::<u32>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

fn sys_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().filter(|l| l.contains(" /sys ")).count()
}

#[test]
fn pod_rps_follows_the_config_on_new_and_existing_pods() {
    let mounts = sys_mounts();
    let mut node = node();
    let a = node.add_pod();
    let link_a = node.pod_links()[0].clone();
    assert_eq!(rps_cpus(&node, &link_a), 0, "podRps is off by default");

    // Turned on: the restarted agent sets it on the pod it finds, and on new pods.
    node.stop_agent();
    let config = std::fs::read_to_string(&node.config_path).unwrap();
    std::fs::write(&node.config_path, format!("{config}podRps = true\n")).unwrap();
    node.start_agent();
    let cpus = online_cpus();
    assert_eq!(rps_cpus(&node, &link_a), cpus, "the existing pod steers over every online CPU");
    let b = node.add_pod();
    for link in node.pod_links() {
        assert_eq!(rps_cpus(&node, &link), cpus, "{link}");
    }
    tcp_exchange(&a, &b, b"one backlog per flow");
    assert!(ping(&b.ns, a.ip, 1));

    // Turned off again: the restart clears it.
    node.stop_agent();
    std::fs::write(&node.config_path, format!("{config}podRps = false\n")).unwrap();
    node.start_agent();
    for link in node.pod_links() {
        assert_eq!(rps_cpus(&node, &link), 0, "{link}");
    }
    // The agent mounted its sysfs in a mount namespace of its own: nothing new here.
    assert_eq!(sys_mounts(), mounts, "a sysfs mount leaked into the host's mount namespace");
}
