//! NetworkPolicy over time and at the edges, in the cluster in a box (root), from real YAML
//! applied with `netctl apply`:
//! - label changes on pods and namespaces, new pods and deleted policies: new connections
//!   follow the new rules; connections established before a change keep flowing, also
//!   when the change now denies them (the rule this datapath implements: policy decides a
//!   flow's first packet; conntrack carries the flow until it ends or idles out);
//! - the pod's own node is always allowed (both ways), other nodes are not; hostNetwork pods
//!   are neither subject to policy nor selectable as peers; an ICMP "fragmentation needed"
//!   for an allowed flow reaches an ingress-isolated pod, one for an unknown flow does not,
//!   and the same holds for "time exceeded" about the pod's own pings; an error addressed to
//!   anyone but the sender of the packet it quotes is related to no flow and dropped; an
//!   echo request does not pass on the entry of a reply; fragmented echo replies reach an
//!   ingress-isolated pod that pinged;
//! - egress is checked on the sender's node and ingress on the receiver's, drops are counted
//!   per pod and reason (counters and metrics), `netctl get policies --node` shows the maps;
//! - with the service proxy off, the agent still sweeps conntrack: a closed flow's entries
//!   leave the table (else a new connection on the same ports would pass as established).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use contiv_tests::{
    cluster::{BoxOptions, ClusterBox, enter, pod_yaml},
    netpol::{Case, Proto, Servers, expect_eventually, pod_counter, probe},
};

const SETTLE: Duration = Duration::from_secs(15);

fn boxed(nodes: usize) -> ClusterBox {
    let mut opts = BoxOptions::for_test(nodes);
    // As deployed: the status endpoint on the node's addresses (netctl get --node reads it).
    opts.agent_config = "statusAddr = \"0.0.0.0:9192\"\n".into();
    ClusterBox::up(opts)
}

fn case(b: &ClusterBox, from: &str, to: &str, proto: Proto, port: u16) -> Case {
    let dst = b.pod_opt(to).map(|p| p.ip).unwrap_or_else(|| b.node(to).ip);
    Case { from: from.into(), to: to.into(), dst, port, proto }
}

/// Rewrites a pod's labels (its Pod object only; the namespace keeps its labels).
fn relabel(b: &ClusterBox, id: &str, labels: &[(&str, &str)]) {
    let p = b.pod(id);
    let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let doc = pod_yaml(&p.namespace, &p.name, &p.node, &labels, &[], Some(p.ip));
    b.apply_yaml(doc.split("---\n").nth(1).expect("the Pod document"));
}

fn namespace_labels(b: &ClusterBox, ns: &str, labels: &str) {
    b.apply_yaml(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{kubernetes.io/metadata.name: {ns}{labels}}}}}\n"
    ));
}

/// A TCP connection kept open: exchanges a message whenever asked.
struct Conn(TcpStream);

impl Conn {
    fn open(b: &ClusterBox, from: &str, to: Ipv4Addr, port: u16) -> Self {
        let addr = SocketAddr::from((to, port));
        let s = enter(&b.netns_of(from).unwrap(), move || TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
            .unwrap_or_else(|e| panic!("connect {from} -> {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut c = Self(s);
        assert!(c.exchange(), "the new connection works");
        c
    }

    fn exchange(&mut self) -> bool {
        let mut buf = [0u8; 11];
        self.0.write_all(b"established").is_ok() && self.0.read_exact(&mut buf).is_ok() && &buf == b"established"
    }
}

/// A UDP socket connected to a peer: the same 5-tuple on every exchange.
struct Datagrams(UdpSocket);

impl Datagrams {
    fn open(b: &ClusterBox, from: &str, to: Ipv4Addr, port: u16) -> Self {
        let s = enter(&b.netns_of(from).unwrap(), move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            s.connect((to, port)).unwrap();
            s
        });
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Self(s)
    }

    fn exchange(&self) -> bool {
        let mut buf = [0u8; 16];
        self.0.send(b"same flow").is_ok() && matches!(self.0.recv(&mut buf), Ok(9))
    }
}

#[test]
fn policy_follows_label_changes_new_pods_and_deletions_and_established_flows_keep_going() {
    let mut b = boxed(2);
    b.add_pod("node-2", "x/server", &[("app", "server")], &[]);
    b.add_pod("node-1", "x/client", &[("app", "client")], &[]);
    b.add_pod("node-1", "y/other", &[("app", "other")], &[]);
    let mut servers = Servers::new();
    for id in ["x/server", "x/client", "y/other"] {
        servers.serve(&b.pod(id).netns, &[80]);
    }
    let server = b.pod("x/server").ip;
    // Flows established before any policy: TCP and UDP, client -> server across nodes, and
    // one the server itself opened (its egress becomes isolated below).
    let mut tcp = Conn::open(&b, "x/client", server, 80);
    let udp = Datagrams::open(&b, "x/client", server, 80);
    assert!(udp.exchange());
    let mut outbound = Conn::open(&b, "x/server", b.pod("y/other").ip, 80);

    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: friends, namespace: x}\n\
                  spec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n\
                  \x20 - from: [{podSelector: {matchLabels: {role: friend}}}]\n\
                  \x20 - from: [{namespaceSelector: {matchLabels: {team: blue}}}]\n";
    b.apply_yaml(policy);
    let to_server =
        |from: &str| vec![case(&b, from, "x/server", Proto::Tcp, 80), case(&b, from, "x/server", Proto::Udp, 80)];
    let mut cases = to_server("x/client");
    cases.extend(to_server("y/other"));
    cases.push(case(&b, "x/server", "y/other", Proto::Tcp, 80));
    expect_eventually(&b, "nobody is a friend yet; the server's egress is closed", &cases, SETTLE, |_| false);
    // The rule for established connections: they keep flowing, both ways, TCP and UDP.
    assert!(tcp.exchange(), "an established TCP connection the new policy denies keeps flowing");
    assert!(udp.exchange(), "an established UDP flow (same 5-tuple) keeps flowing");
    assert!(outbound.exchange(), "a connection the server opened keeps flowing after its egress closed");

    // A pod label change: the client becomes a friend, then stops being one.
    relabel(&b, "x/client", &[("app", "client"), ("role", "friend")]);
    expect_eventually(&b, "client labelled role=friend", &cases, SETTLE, |c| c.from == "x/client");
    relabel(&b, "x/client", &[("app", "client")]);
    expect_eventually(&b, "label removed again", &cases, SETTLE, |_| false);
    assert!(tcp.exchange(), "still flowing after two more changes");

    // A namespace label change: y joins team blue, then leaves.
    namespace_labels(&b, "y", ", team: blue");
    expect_eventually(&b, "namespace y labelled team=blue", &cases, SETTLE, |c| c.from == "y/other");
    namespace_labels(&b, "y", "");
    expect_eventually(&b, "namespace label removed", &cases, SETTLE, |_| false);

    // New pods: a friend that did not exist when the policy was written, and a second
    // server the existing policy selects.
    b.add_pod("node-1", "x/newfriend", &[("role", "friend")], &[]);
    b.add_pod("node-1", "x/server2", &[("app", "server")], &[]);
    servers.serve(&b.pod("x/server2").netns, &[80]);
    let mut cases2 = cases.clone();
    for from in ["x/newfriend", "x/client"] {
        cases2.push(case(&b, from, "x/server", Proto::Tcp, 80));
        cases2.push(case(&b, from, "x/server2", Proto::Tcp, 80));
    }
    expect_eventually(&b, "new pods", &cases2, SETTLE, |c| c.from == "x/newfriend");

    // A deleted policy: everything is open again.
    b.delete_yaml(policy);
    expect_eventually(&b, "policy deleted", &cases2, SETTLE, |_| true);
    assert!(tcp.exchange() && udp.exchange() && outbound.exchange());
}

/// The Internet checksum (RFC 1071).
fn csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What an ICMP error quotes: an IPv4 header `src -> dst` of protocol `proto` with `options`
/// (a multiple of 4 bytes), then the first 8 bytes of its payload.
fn quote(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], first8: [u8; 8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40, "IPv4 options: {options:?}");
    let mut inner = vec![0x45 + options.len() as u8 / 4, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    inner[2..4].copy_from_slice(&1400u16.to_be_bytes());
    inner.extend_from_slice(&src.octets());
    inner.extend_from_slice(&dst.octets());
    inner.extend_from_slice(options);
    let c = csum(&inner);
    inner[10..12].copy_from_slice(&c.to_be_bytes());
    inner.extend_from_slice(&first8);
    inner
}

/// An ICMP message (`kind`, `code`, the 4 bytes after the checksum, then `body`) sent from
/// namespace `ns` to `to` on a raw socket (the kernel adds the outer IPv4 header).
fn send_icmp(ns: &str, to: Ipv4Addr, kind: u8, code: u8, rest: [u8; 4], body: &[u8]) {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(body);
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let s = enter(ns, raw_icmp_socket);
    let n = s.send_to(&icmp, &SocketAddr::from((to, 0)).into()).expect("sendto");
    assert_eq!(n, icmp.len());
}

/// A raw ICMP socket in the calling thread's namespace: it sends ICMP as written, and
/// receives a copy of every ICMP packet (with its IPv4 header) the namespace receives.
fn raw_icmp_socket() -> socket2::Socket {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::ICMPV4))
        .expect("raw ICMP socket")
}

/// An ICMP "fragmentation needed" (MTU `mtu`) quoting a UDP packet `src:sport -> dst:dport`
/// whose header carries `options`, sent from namespace `ns` to `src`.
fn send_frag_needed(ns: &str, src: SocketAddr, dst: SocketAddr, mtu: u16, options: &[u8]) {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else { panic!("IPv4 only") };
    let [sp, sp2] = src.port().to_be_bytes();
    let [dp, dp2] = dst.port().to_be_bytes();
    let udp = [sp, sp2, dp, dp2, 0x05, 0x64, 0, 0]; // length 1380, no checksum
    let [m, m2] = mtu.to_be_bytes();
    send_icmp(ns, *src.ip(), 3, 4, [0, 0, m, m2], &quote(*src.ip(), *dst.ip(), 17, options, udp));
}

/// The path MTU a connected socket sees (IP_MTU).
/// A UDP socket in `ns` connected to `to:port`, whose first exchange (with an echo server
/// there) went through: the flow is allowed and tracked. Reads time out after 2 s.
fn allowed_udp_flow(ns: &str, to: Ipv4Addr, port: u16) -> UdpSocket {
    let s = enter(ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.connect((to, port)).unwrap();
        s
    });
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8];
    s.send(b"hi").unwrap();
    assert!(matches!(s.recv(&mut buf), Ok(2)), "{ns} -> {to}:{port} UDP is allowed");
    s
}

fn path_mtu(s: &UdpSocket) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) into a stack integer of the size passed.
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU, (&mut v as *mut i32).cast(), &mut len)
    };
    assert_eq!(rc, 0, "IP_MTU: {}", std::io::Error::last_os_error());
    v
}

#[test]
fn own_node_always_allowed_host_network_pods_exempt_and_frag_needed_of_allowed_flows_passes() {
    let mut b = boxed(2);
    let p = b.add_pod("node-1", "x/p", &[("pod", "p")], &[]);
    let q = b.add_pod("node-2", "x/q", &[("pod", "q")], &[]);
    let mut servers = Servers::new();
    for ns in [&p.netns, &q.netns, &b.node("node-1").netns.clone(), &b.node("node-2").netns.clone()] {
        servers.serve(ns, &[80, 81]);
    }
    // A hostNetwork pod on node-2: its address is the node's.
    let node2 = b.node("node-2").ip;
    b.apply_yaml(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: hostclient, namespace: x, labels: {{app: hostclient}}}}\n\
         spec:\n  nodeName: node-2\n  hostNetwork: true\n  containers: [{{name: c, image: contiv/box}}]\n\
         status:\n  podIP: {node2}\n  podIPs: [{{ip: {node2}}}]\n"
    ));
    // p: isolated both ways; it may talk UDP to q, and "the hostclient pod" may reach it.
    // The hostNetwork pod itself is selected by a deny-all policy (which must not bind it).
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: p}}\n  policyTypes: [Ingress, Egress]\n\
         \x20 ingress: [{from: [{podSelector: {matchLabels: {app: hostclient}}}]}]\n\
         \x20 egress: [{to: [{podSelector: {matchLabels: {pod: q}}}], ports: [{protocol: UDP}]}]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: host, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {app: hostclient}}\n  policyTypes: [Ingress, Egress]\n",
    );
    let cases = vec![
        case(&b, "node-1", "x/p", Proto::Tcp, 80), // kubelet probe from p's own node
        case(&b, "x/p", "node-1", Proto::Tcp, 81), // p to its own node
        case(&b, "node-2", "x/p", Proto::Tcp, 80), // another node (where hostclient lives)
        case(&b, "x/p", "node-2", Proto::Tcp, 80), // p to another node
        case(&b, "x/p", "x/q", Proto::Udp, 80),    // p's one egress rule
        case(&b, "x/p", "x/q", Proto::Tcp, 80),    // ...UDP only
        case(&b, "node-2", "x/q", Proto::Tcp, 80), // hostclient is not subject to its policy
        case(&b, "x/q", "node-2", Proto::Tcp, 80), // ...nor are other pods to it
    ];
    expect_eventually(&b, "own node, other nodes, hostNetwork", &cases, SETTLE, |c| {
        matches!(
            (c.from.as_str(), c.to.as_str()),
            ("node-1", "x/p") | ("x/p", "node-1") | ("node-2", "x/q") | ("x/q", "node-2")
        ) || (c.to == "x/q" && c.proto == Proto::Udp)
    });

    // ICMP errors: p's UDP flow to q is allowed and tracked; a "fragmentation needed" about
    // it from node-2 (not otherwise allowed into p) reaches p and lowers its path MTU. One
    // about a flow p never sent is dropped by p's ingress rules.
    let (q_ip, p_ip) = (q.ip, p.ip);
    let allowed = allowed_udp_flow(&p.netns, q_ip, 81);
    // (Path MTUs are per destination: the unknown flow goes elsewhere, to node-2 itself.)
    let unknown = enter(&p.netns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.connect((node2, 80)).unwrap();
        s
    });
    assert_eq!(path_mtu(&allowed), 1450);
    assert_eq!(path_mtu(&unknown), 1450);
    let drops_before = pod_counter(&b, "node-1", p_ip, "dropPolicyIngress");
    let node2_ns = b.node("node-2").netns.clone();
    send_frag_needed(&node2_ns, allowed.local_addr().unwrap(), SocketAddr::from((q_ip, 81)), 1300, &[]);
    send_frag_needed(&node2_ns, unknown.local_addr().unwrap(), SocketAddr::from((node2, 80)), 1200, &[]);
    b.wait_for(Duration::from_secs(5), "the allowed flow's frag-needed arrives", || path_mtu(&allowed) == 1300);
    b.wait_for(Duration::from_secs(5), "the unknown flow's frag-needed is dropped and counted", || {
        pod_counter(&b, "node-1", p_ip, "dropPolicyIngress") > drops_before
    });
    assert_eq!(path_mtu(&unknown), 1450, "nothing reached the socket of the flow p never sent");
    // One quoting a header with IP options (NOPs) is read past them, found to be about the
    // allowed flow, and passes too.
    send_frag_needed(&node2_ns, allowed.local_addr().unwrap(), SocketAddr::from((q_ip, 81)), 1280, &[1, 1, 1, 0]);
    b.wait_for(Duration::from_secs(5), "the frag-needed quoting options arrives", || path_mtu(&allowed) == 1280);
    let p_ns = p.netns.clone();
    let route = enter(&p_ns, move || {
        std::process::Command::new("ip").args(["route", "get", &q_ip.to_string()]).output().unwrap()
    });
    assert!(String::from_utf8_lossy(&route.stdout).contains("mtu 1280"), "{route:?}");
}

/// The ICMP messages a raw ICMP socket receives within `within`: each one's type, and the
/// identifier of the echo it is (echo, echo reply) or quotes (an error about an echo).
fn icmp_seen(s: &socket2::Socket, within: Duration) -> Vec<(u8, u16)> {
    let mut seen = vec![];
    let until = std::time::Instant::now() + within;
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < until {
        let Ok(n) = (&*s).read(&mut buf) else { continue };
        let icmp = &buf[usize::from(buf[0] & 0x0f) * 4..n];
        let id_at = |m: &[u8]| m.get(4..6).map(|b| u16::from_be_bytes([b[0], b[1]]));
        let id = match icmp[0] {
            0 | 8 => id_at(icmp),
            _ => icmp.get(8..).and_then(|q| id_at(q.get(usize::from(q.first()? & 0x0f) * 4..)?)),
        };
        seen.push((icmp[0], id.unwrap_or_default()));
    }
    seen
}

/// A pod isolated for ingress (nothing admitted) pings out, as `ping` and `mtr` do: the echo
/// replies come back as its flow's, and so do the ICMP errors a router sends about its
/// echoes ("time exceeded", "host unreachable"), as conntrack passes a RELATED error. An
/// error about an echo it never sent is dropped by its ingress rules and counted.
/// Waits until `node`'s agent has pod `pod` isolated for ingress.
fn wait_ingress_isolated(b: &ClusterBox, node: &str, pod: &str) {
    wait_isolated(b, node, pod, "ingress");
}

/// Waits until `node`'s agent shows `pod` isolated in `direction` (`ingress`, `egress`).
fn wait_isolated(b: &ClusterBox, node: &str, pod: &str, direction: &str) {
    let field = format!("{direction}Isolated");
    b.wait_for(SETTLE, &format!("{pod} is isolated for {direction} on {node}"), || {
        b.status_json(node, "/policies").is_some_and(|v| {
            v["pods"].as_array().into_iter().flatten().any(|p| p["podName"] == pod && p[field.as_str()] == true)
        })
    });
}

/// A TCP segment with only SYN and ACK set, `src -> dst`, sent from namespace `ns` on a raw
/// socket (the kernel adds the IPv4 header): a pod with CAP_NET_RAW forging the answer to a
/// connection nobody opened.
fn send_syn_ack(ns: &str, src: SocketAddr, dst: SocketAddr) {
    send_tcp(ns, src, dst, 0x12, 0x1000_0000, b"");
}

/// A TCP segment `src -> dst` with `flags`, sequence number `seq` and `payload`, sent from
/// namespace `ns` on a raw socket (the kernel adds the IPv4 header).
fn send_tcp(ns: &str, src: SocketAddr, dst: SocketAddr, flags: u8, seq: u32, payload: &[u8]) {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else { panic!("IPv4 only") };
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&0x2000_0001u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let mut pseudo = [src.ip().octets(), dst.ip().octets()].concat();
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let c = csum(&pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let to = *dst.ip();
    enter(ns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::TCP))
            .expect("raw TCP socket");
        let n = s.send_to(&tcp, &SocketAddr::from((to, 0)).into()).expect("sendto");
        assert_eq!(n, tcp.len());
    });
}

/// The TCP segments from `from` a raw TCP socket receives within `within`: their flags and
/// payloads.
fn tcp_seen(s: &socket2::Socket, from: SocketAddr, within: Duration) -> Vec<(u8, Vec<u8>)> {
    let SocketAddr::V4(from) = from else { panic!("IPv4 only") };
    let mut seen = vec![];
    let until = std::time::Instant::now() + within;
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < until {
        let Ok(n) = (&*s).read(&mut buf) else { continue };
        let tcp = &buf[usize::from(buf[0] & 0x0f) * 4..n];
        if buf[12..16] != from.ip().octets() || tcp.len() < 20 || tcp[0..2] != from.port().to_be_bytes() {
            continue;
        }
        seen.push((tcp[13], tcp[usize::from(tcp[12] >> 4) * 4..].to_vec()));
    }
    seen
}

/// A pod isolated for egress (nothing allowed) with CAP_NET_RAW forges the answer to a
/// connection nobody opened (a SYN-ACK to a pod on another node), then sends data on that
/// flow: nothing reaches the other pod, and the drops are counted on the sender. (The
/// datapath hands a pod's untracked SYN-ACK to the node's stack, which brought it the
/// connection; recorded, the forged one would carry every later segment of the flow past
/// the sender's egress rules, through the stack, which forwards them.)
#[test]
fn a_forged_syn_ack_does_not_open_a_way_out_past_egress_policy() {
    let mut b = boxed(2);
    let m = b.add_pod("node-1", "x/m", &[("pod", "m")], &[]);
    let r = b.add_pod("node-2", "x/r", &[("pod", "r")], &[]);
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: m, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: m}}\n  policyTypes: [Egress]\n",
    );
    wait_isolated(&b, "node-1", "m", "egress");
    // r listens to every TCP segment that reaches it, as a raw receiver would.
    let receiver = enter(&r.netns, || {
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::TCP))
            .expect("raw TCP socket")
    });
    let (from, to) = (SocketAddr::from((m.ip, 41234)), SocketAddr::from((r.ip, 80)));
    let drops_before = pod_counter(&b, "node-1", m.ip, "dropPolicyEgress");
    send_syn_ack(&m.netns, from, to);
    std::thread::sleep(Duration::from_millis(200));
    // ACK|PSH with data on the forged flow, twice.
    for i in 0..2u32 {
        send_tcp(&m.netns, from, to, 0x18, 0x1000_0001 + 6 * i, b"exfil\n");
    }
    let seen = tcp_seen(&receiver, from, Duration::from_secs(2));
    assert!(seen.is_empty(), "m's forged flow reached r past m's egress rules: {seen:?}");
    b.wait_for(Duration::from_secs(10), "m's forged segments are counted as egress drops", || {
        pod_counter(&b, "node-1", m.ip, "dropPolicyEgress") >= drops_before + 3
    });
}

/// A pod that forges a SYN-ACK to a pod of its node, as if answering a connection the
/// node's stack had brought it, gains nothing: its own connection from that port is still
/// checked against the other pod's ingress rules (the datapath tracks such an answer so
/// that the real answers of a hostPort's pod pass its egress rules; a SYN from the side
/// that answered opens nothing).
#[test]
fn a_forged_syn_ack_does_not_open_a_way_past_policy() {
    let mut b = boxed(1);
    let v = b.add_pod("node-1", "x/v", &[("pod", "v")], &[]);
    let m = b.add_pod("node-1", "x/m", &[("pod", "m")], &[]);
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: v, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: v}}\n  policyTypes: [Ingress]\n",
    );
    wait_ingress_isolated(&b, "node-1", "v");
    let v_ip = v.ip;
    let listener = enter(&v.netns, move || std::net::TcpListener::bind((v_ip, 80)).expect("bind"));
    std::thread::spawn(move || for _ in listener.incoming() {});
    let (from, to) = (SocketAddr::from((m.ip, 41234)), SocketAddr::from((v.ip, 80)));
    let connect = move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&from.into()).expect("bind 41234");
        s.connect_timeout(&to.into(), Duration::from_secs(2))
    };
    let before = enter(&m.netns, connect);
    assert!(before.is_err(), "v's ingress rules refuse m: {before:?}");
    send_syn_ack(&m.netns, from, to);
    std::thread::sleep(Duration::from_millis(200));
    let after = enter(&m.netns, connect);
    assert!(after.is_err(), "after m's forged SYN-ACK to v, m's connection from that port still meets v's rules");
}

#[test]
fn icmp_errors_about_an_ingress_isolated_pods_echoes_reach_it() {
    let mut b = boxed(2);
    let r = b.add_pod("node-1", "x/r", &[("pod", "r")], &[]);
    let q = b.add_pod("node-2", "x/q", &[("pod", "q")], &[]);
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: r, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: r}}\n  policyTypes: [Ingress]\n",
    );
    wait_ingress_isolated(&b, "node-1", "r");
    let (r_ip, q_ip) = (r.ip, q.ip);
    let node2_ns = b.node("node-2").netns.clone();
    let sock = enter(&r.netns, raw_icmp_socket);

    // r's echo to q, and q's reply.
    send_icmp(&r.netns, q_ip, 8, 0, [0x42, 0x42, 0, 1], b"are you there");
    let seen = icmp_seen(&sock, Duration::from_secs(2));
    assert!(seen.contains(&(0, 0x4242)), "q's echo reply reaches r: {seen:?}");

    // node-2, standing for a router on the way, reports "time exceeded" for that echo and
    // for one r never sent (identifier 0x4343). Node-2 is not r's node: nothing admits it.
    let drops_before = pod_counter(&b, "node-1", r_ip, "dropPolicyIngress");
    let echo = |id: u16| {
        let [h, l] = id.to_be_bytes();
        quote(r_ip, q_ip, 1, &[], [8, 0, 0, 0, h, l, 0, 1])
    };
    send_icmp(&node2_ns, r_ip, 11, 0, [0; 4], &echo(0x4343));
    send_icmp(&node2_ns, r_ip, 11, 0, [0; 4], &echo(0x4242));
    let seen = icmp_seen(&sock, Duration::from_secs(2));
    assert!(seen.contains(&(11, 0x4242)), "the error about r's echo reaches r: {seen:?}");
    assert!(!seen.contains(&(11, 0x4343)), "the error about an echo r never sent does not: {seen:?}");
    b.wait_for(Duration::from_secs(5), "the unknown echo's error is counted as dropped", || {
        pod_counter(&b, "node-1", r_ip, "dropPolicyIngress") > drops_before
    });

    // q answered with an echo reply of r's identifier; an echo request with it, from q to
    // r, is no answer: r's rules refuse it (they admit nothing), while r's own echo still
    // gets its reply. Nor is a request with an identifier next to it, or its complement
    // (which matched r's reply entry when the responder's side was keyed by it).
    let drops_before = pod_counter(&b, "node-1", r_ip, "dropPolicyIngress");
    let forged = [0x4242u16, !0x4242, 0x4241, 0x4243];
    for id in forged {
        let [h, l] = id.to_be_bytes();
        send_icmp(&q.netns, r_ip, 8, 0, [h, l, 0, 7], b"let me in");
    }
    send_icmp(&r.netns, q_ip, 8, 0, [0x42, 0x42, 0, 2], b"still there?");
    let seen = icmp_seen(&sock, Duration::from_secs(2));
    for id in forged {
        assert!(!seen.contains(&(8, id)), "q's echo request with identifier {id:#x} does not reach r: {seen:?}");
    }
    assert!(seen.contains(&(0, 0x4242)), "r's next echo is answered: {seen:?}");
    b.wait_for(Duration::from_secs(5), "q's echo requests are counted as dropped by r's rules", || {
        pod_counter(&b, "node-1", r_ip, "dropPolicyIngress") >= drops_before + forged.len() as u64
    });
}

/// An ICMP error is related to the flow it quotes only when it is addressed to the sender
/// of the packet it quotes, as netfilter requires. p's UDP flow to q is tracked; an error
/// quoting q's answer in that flow, addressed to v or w (isolated for ingress, admitting
/// nothing), is dropped whether p sends it (to v on its node, to w on q's) or p's node
/// does (into the overlay, to w): counted as malformed on p, and on node-2's overlay. q's
/// own error about p's packet still reaches p.
#[test]
fn an_icmp_error_for_anyone_but_the_sender_of_what_it_quotes_is_dropped() {
    let mut b = boxed(2);
    let p = b.add_pod("node-1", "x/p", &[("pod", "p")], &[]);
    let v = b.add_pod("node-1", "x/v", &[("pod", "v"), ("closed", "yes")], &[]);
    let q = b.add_pod("node-2", "x/q", &[("pod", "q")], &[]);
    let w = b.add_pod("node-2", "x/w", &[("pod", "w"), ("closed", "yes")], &[]);
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: closed, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {closed: \"yes\"}}\n  policyTypes: [Ingress]\n",
    );
    wait_ingress_isolated(&b, "node-1", "v");
    wait_ingress_isolated(&b, "node-2", "w");
    let mut servers = Servers::new();
    servers.serve(&q.netns, &[81]);
    let (p_ip, q_ip) = (p.ip, q.ip);
    let flow = allowed_udp_flow(&p.netns, q_ip, 81);
    let [ph, pl] = flow.local_addr().unwrap().port().to_be_bytes();

    // "Port unreachable" quoting q's answer in the flow (q:81 -> p), addressed elsewhere.
    let answer = quote(q_ip, p_ip, 17, &[], [0, 81, ph, pl, 0, 10, 0, 0]);
    let (v_sock, w_sock) = (enter(&v.netns, raw_icmp_socket), enter(&w.netns, raw_icmp_socket));
    let p_sock = enter(&p.netns, raw_icmp_socket);
    let overlay_malformed = || {
        let node = b.status_json("node-2", "/node").expect("/node");
        node["overlayCounters"]["rxMalformed"].as_u64().unwrap_or_else(|| panic!("no rxMalformed in {node}"))
    };
    let (p_malformed, w_malformed) = (pod_counter(&b, "node-1", p_ip, "dropMalformed"), overlay_malformed());
    send_icmp(&p.netns, v.ip, 3, 3, [0; 4], &answer);
    send_icmp(&p.netns, w.ip, 3, 3, [0; 4], &answer);
    send_icmp(&b.node("node-1").netns, w.ip, 3, 3, [0; 4], &answer);
    let errors = |seen: Vec<(u8, u16)>| seen.into_iter().filter(|(t, _)| *t == 3).count();
    assert_eq!(errors(icmp_seen(&v_sock, Duration::from_secs(2))), 0, "v gets no error p addressed to it");
    assert_eq!(errors(icmp_seen(&w_sock, Duration::from_millis(500))), 0, "nor does w, from p or p's node");
    b.wait_for(Duration::from_secs(5), "p's two errors are counted as malformed on p", || {
        pod_counter(&b, "node-1", p_ip, "dropMalformed") >= p_malformed + 2
    });
    b.wait_for(Duration::from_secs(5), "node-1's error is counted as malformed on node-2's overlay", || {
        overlay_malformed() > w_malformed
    });

    // q's own "port unreachable" about p's packet (p -> q:81) is addressed to p: it passes.
    let sent = quote(p_ip, q_ip, 17, &[], [ph, pl, 0, 81, 0, 10, 0, 0]);
    send_icmp(&q.netns, p_ip, 3, 3, [0; 4], &sent);
    assert!(errors(icmp_seen(&p_sock, Duration::from_secs(2))) > 0, "q's error about p's packet reaches p");
}

/// `ping -c 3 -s <size> -M dont` (fragmented by the sender, whatever the path MTU) from
/// namespace `ns`; its output, and whether every echo was answered.
fn ping_big(ns: &str, dst: Ipv4Addr, size: u16) -> (bool, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "dont", "-s"])
        .arg(size.to_string())
        .arg(dst.to_string())
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && text.contains(" 3 received"), text)
}

/// A pod isolated for ingress (it admits TCP port 80 only) pings a pod on another node with
/// 3000 bytes of payload: the echoes and their replies cross in fragments, and the replies'
/// later fragments pass on the flow of their first (their bytes are payload, never read as
/// an ICMP header).
#[test]
fn an_ingress_isolated_pods_big_echoes_get_their_fragmented_replies() {
    let mut b = boxed(2);
    let r = b.add_pod("node-1", "x/r", &[("pod", "r")], &[]);
    let q = b.add_pod("node-2", "x/q", &[("pod", "q")], &[]);
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: r, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: r}}\n  policyTypes: [Ingress]\n\
         \x20 ingress: [{ports: [{protocol: TCP, port: 80}]}]\n",
    );
    wait_ingress_isolated(&b, "node-1", "r");
    let (ok, out) = ping_big(&r.netns, q.ip, 64);
    assert!(ok, "r's small echoes are answered:\n{out}");
    let (ok, out) = ping_big(&r.netns, q.ip, 3000);
    assert!(ok, "r's 3000-byte echoes are answered, in fragments:\n{out}");
}

#[test]
fn checks_run_on_each_side_drops_are_counted_and_netctl_shows_what_the_maps_hold() {
    let mut b = boxed(2);
    let a = b.add_pod("node-1", "x/a", &[("pod", "a")], &[]);
    let bb = b.add_pod("node-2", "x/b", &[("pod", "b")], &[]);
    let c = b.add_pod("node-1", "x/c", &[("pod", "c")], &[]);
    let mut servers = Servers::new();
    for p in [&a, &bb, &c] {
        servers.serve(&p.netns, &[80]);
    }
    let egress = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a-out, namespace: x}\n\
                  spec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n\
                  \x20 egress: [{to: [{podSelector: {matchLabels: {pod: c}}}], ports: [{port: 80}]}]\n";
    let ingress = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-in, namespace: x}\n\
                   spec:\n  podSelector: {matchLabels: {pod: b}}\n\
                   \x20 ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]\n";
    b.apply_yaml(egress);
    b.apply_yaml(ingress);
    let cases = vec![
        case(&b, "x/a", "x/b", Proto::Tcp, 80),
        case(&b, "x/a", "x/c", Proto::Tcp, 80),
        case(&b, "x/c", "x/b", Proto::Tcp, 80),
    ];
    expect_eventually(&b, "both policies", &cases, SETTLE, |c| c.from == "x/c" || c.to == "x/c");
    // a -> b is stopped by a's egress rules on node-1: it never reaches node-2.
    let (a_egress, b_ingress) =
        (pod_counter(&b, "node-1", a.ip, "dropPolicyEgress"), pod_counter(&b, "node-2", bb.ip, "dropPolicyIngress"));
    assert!(!probe(&a.netns, bb.ip, 80, Proto::Tcp));
    assert!(pod_counter(&b, "node-1", a.ip, "dropPolicyEgress") > a_egress, "counted on the sender's node");
    assert_eq!(pod_counter(&b, "node-2", bb.ip, "dropPolicyIngress"), b_ingress, "never reached the receiver");
    // Without a's egress policy, a -> b leaves node-1 and b's ingress rules stop it on node-2.
    b.delete_yaml(egress);
    b.wait_for(SETTLE, "a's egress is no longer isolated on node-1", || {
        b.status_json("node-1", "/policies").is_some_and(|v| {
            v["pods"].as_array().into_iter().flatten().any(|p| p["podName"] == "a" && p["egressIsolated"] == false)
        })
    });
    let tunnel = pod_counter(&b, "node-1", a.ip, "tunnelPackets");
    assert!(!probe(&a.netns, bb.ip, 80, Proto::Tcp));
    assert!(pod_counter(&b, "node-1", a.ip, "tunnelPackets") > tunnel, "a's SYNs left node-1");
    assert!(pod_counter(&b, "node-2", bb.ip, "dropPolicyIngress") > b_ingress, "counted on the receiver's node");
    let metrics = b.status("node-2", "/metrics").unwrap();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("contiv_pod_dropped_packets_total{namespace=\"x\",pod=\"b\"") && l.contains("policy_ingress")
        })
        .unwrap_or_else(|| panic!("no policy_ingress drops of x/b in\n{metrics}"));
    assert!(line.rsplit(' ').next().unwrap().parse::<u64>().unwrap() > 0, "{line}");

    // What the maps hold, through netctl: node-2 enforces b's ingress (c's /32, every port;
    // the node's own addresses), nothing for egress; node-1 knows nothing of b.
    let out = b.netctl(&["get", "policies", "--node", "node-2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let row = |dir: &str, peer: &str| {
        text.lines()
            .any(|l| l.starts_with("x/b ") && l.contains(&format!(" {dir} ")) && l.contains(&format!(" {peer} ")))
    };
    assert!(row("ingress", &format!("{}/32", c.ip)), "{text}");
    assert!(row("ingress", &format!("{}/32", b.node("node-2").ip)), "the node's own address: {text}");
    assert!(row("egress", "(not isolated)"), "{text}");
    assert!(!row("ingress", &format!("{}/32", a.ip)), "{text}");
    let out = b.netctl(&["get", "policies", "--node", "node-1", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let pods: Vec<&str> = v["pods"].as_array().unwrap().iter().map(|p| p["podName"].as_str().unwrap()).collect();
    assert!(pods.contains(&"a") && pods.contains(&"c") && !pods.contains(&"b"), "{v}");
    assert!(
        v["pods"].as_array().unwrap().iter().all(|p| p["ingressIsolated"] == false && p["egressIsolated"] == false)
    );
    let out = b.netctl(&["get", "policies", "--node", "node-9"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no node node-9"));
}

/// The conntrack entries of one TCP flow (either direction) in a node's pinned CT map.
fn ct_entries_of(b: &ClusterBox, node: &str, a: SocketAddr, z: SocketAddr) -> usize {
    let entries = contiv_tests::dump_pinned_map(&b.node(node).pin_dir.join("CT"));
    let ends = |ip: std::net::IpAddr, port: u16| {
        let octets = match ip {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(_) => vec![],
        };
        (serde_json::Value::from(octets), serde_json::Value::from(port))
    };
    let (a_ip, a_port) = ends(a.ip(), a.port());
    let (z_ip, z_port) = ends(z.ip(), z.port());
    entries
        .iter()
        .filter(|e| {
            let k = &e["key"];
            (k["src"] == a_ip && k["sport"] == a_port && k["dst"] == z_ip && k["dport"] == z_port)
                || (k["src"] == z_ip && k["sport"] == z_port && k["dst"] == a_ip && k["dport"] == a_port)
        })
        .count()
}

#[test]
fn conntrack_is_swept_with_the_service_proxy_off() {
    let mut opts = BoxOptions::for_test(1);
    // Closed flows idle out after 1 s; the sweep runs every 10 s.
    opts.agent_config = "[services]\nenabled = false\n[services.timeouts]\ntcpClosing = 1\n".into();
    let mut b = ClusterBox::up(opts);
    b.add_pod("node-1", "x/server", &[("app", "server")], &[]);
    b.add_pod("node-1", "x/client", &[("app", "client")], &[]);
    let mut servers = Servers::new();
    servers.serve(&b.pod("x/server").netns, &[80]);
    let mut conn = Conn::open(&b, "x/client", b.pod("x/server").ip, 80);
    assert!(conn.exchange());
    let (client, server) = (conn.0.local_addr().unwrap(), conn.0.peer_addr().unwrap());
    assert_eq!(ct_entries_of(&b, "node-1", client, server), 2, "the open flow is tracked, both directions");
    drop(conn);
    b.wait_for(Duration::from_secs(30), "the closed flow's conntrack entries are swept", || {
        ct_entries_of(&b, "node-1", client, server) == 0
    });
}

/// The store loses its data (wiped, or restored from a backup older than the objects)
/// after contiv-ksr had synced it: an empty model would open every isolated pod. The
/// agents keep NetworkPolicy as installed until KSR's marker is back.
#[test]
fn policy_stays_while_the_store_has_lost_its_data() {
    let mut b = boxed(2);
    b.add_pod("node-1", "x/server", &[("app", "server")], &[]);
    b.add_pod("node-2", "x/client", &[("app", "client")], &[]);
    let mut servers = Servers::new();
    servers.serve(&b.pod("x/server").netns, &[80]);
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n",
    );
    // contiv-ksr synced the store (the box writes its objects with netctl; the marker is KSR's).
    b.etcdctl(&["put", "/contiv/ksr/marker", "{}"]);
    let cases = vec![case(&b, "x/client", "x/server", Proto::Tcp, 80)];
    expect_eventually(&b, "deny-all in force", &cases, SETTLE, |_| false);
    // Every reflected object and the marker go, in one revision (as with a wiped store
    // relisted, the watch sees them go together).
    b.etcdctl(&["del", "--prefix", "/contiv/k"]);
    for second in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        let open = contiv_tests::netpol::probe_all(&b, &cases);
        assert_eq!(open, vec![false], "{second} s after the store lost its data, the isolated pod is open");
    }
    // KSR filled the store again (here: with nothing, and its marker): policy follows it.
    b.etcdctl(&["put", "/contiv/ksr/marker", "{}"]);
    expect_eventually(&b, "the store's (empty) policy", &cases, SETTLE, |_| true);
}
