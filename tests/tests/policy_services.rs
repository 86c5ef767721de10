//! NetworkPolicy through Services in the cluster in a box (root), from real YAML applied
//! with `netctl apply`: policy sees the post-DNAT backend (its pod and its target port), for
//! a ClusterIP from pods and for a NodePort from outside (local backend: the client's own
//! address; remote backend: the SNAT'ing node's address); an egress-isolated pod resolves
//! names through the kube-dns ClusterIP when a rule allows port 53 to the DNS pods.

use std::{net::SocketAddrV4, time::Duration};

use contiv_tests::{
    cluster::{BoxOptions, ClusterBox, ROUTER_IP, enter},
    netpol::{Case, Proto, Servers, expect_eventually, pod_counter, probe},
    send_spoofed_syn,
};

const SETTLE: Duration = Duration::from_secs(15);
const WEB_VIP: &str = "10.96.0.10";
const DNS_VIP: &str = "10.96.0.53";
const NODE_PORT: u16 = 30080;

fn services(b: &ClusterBox) -> String {
    let web = b.pod("x/web").ip;
    let dns = b.pod("kube-system/dns").ip;
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: x}}\n\
         spec:\n  type: NodePort\n  clusterIP: {WEB_VIP}\n  clusterIPs: [{WEB_VIP}]\n  selector: {{app: web}}\n\
         \x20 ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: {NODE_PORT}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: x, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nendpoints: [{{addresses: [{web}], conditions: {{ready: true}}, nodeName: node-2}}]\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\n\
         spec:\n  clusterIP: {DNS_VIP}\n  clusterIPs: [{DNS_VIP}]\n  selector: {{k8s-app: kube-dns}}\n\
         \x20 ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: kube-dns-1, namespace: kube-system, labels: {{kubernetes.io/service-name: kube-dns}}}}\n\
         addressType: IPv4\nendpoints: [{{addresses: [{dns}], conditions: {{ready: true}}, nodeName: node-2}}]\n\
         ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]\n"
    )
}

fn to(b: &ClusterBox, from: &str, label: &str, dst: &str, proto: Proto, port: u16) -> Case {
    Case { from: from.into(), to: label.into(), dst: dst.parse().unwrap_or_else(|_| b.node(dst).ip), port, proto }
}

#[test]
fn policy_sees_the_backend_behind_cluster_ips_and_node_ports_and_dns_works_for_egress_isolated_pods() {
    let mut opts = BoxOptions::for_test(2);
    opts.agent_config = "statusAddr = \"0.0.0.0:9192\"\n".into();
    let mut b = ClusterBox::up(opts);
    b.add_pod("node-2", "x/web", &[("app", "web")], &[]);
    b.add_pod("node-1", "x/client", &[("app", "client")], &[]);
    b.add_pod("node-1", "x/other", &[("app", "other")], &[]);
    b.add_pod("node-2", "kube-system/dns", &[("k8s-app", "kube-dns")], &[]);
    let mut servers = Servers::new();
    servers.serve(&b.pod("x/web").netns, &[8080]);
    servers.serve(&b.pod("kube-system/dns").netns, &[53]);
    servers.serve(&b.pod("x/other").netns, &[53]);
    b.apply_yaml(&services(&b));
    let cases = vec![
        to(&b, "x/client", "web via ClusterIP", WEB_VIP, Proto::Tcp, 80),
        to(&b, "x/other", "web via ClusterIP", WEB_VIP, Proto::Tcp, 80),
        to(&b, "external", "web via node-1 (remote backend, SNAT)", "node-1", Proto::Tcp, NODE_PORT),
        to(&b, "external", "web via node-2 (local backend)", "node-2", Proto::Tcp, NODE_PORT),
    ];
    expect_eventually(&b, "services without policy", &cases, SETTLE, |_| true);

    // The backend admits app=client on its target port: the check sees the backend pod and
    // port behind the ClusterIP; nothing from outside is admitted.
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: x}\n\
                  spec:\n  podSelector: {matchLabels: {app: web}}\n\
                  \x20 ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n";
    b.apply_yaml(policy);
    expect_eventually(&b, "backend admits the client pod on 8080", &cases, SETTLE, |c| c.from == "x/client");
    // A rule on the service's port (80) admits nothing: the backend's port is 8080.
    b.apply_yaml(&policy.replace("port: 8080", "port: 80"));
    expect_eventually(&b, "a rule on the service port admits nothing", &cases, SETTLE, |_| false);
    // From outside: the client's address reaches a local backend (node-2); through node-1
    // the backend sees node-1's address. (The external client reaches the nodes' subnet from
    // its address on it, the nodes' router address, not from its "internet" address.)
    b.apply_yaml(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: outside, namespace: x}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n\
         \x20 ingress: [{{from: [{{ipBlock: {{cidr: {ROUTER_IP}/32}}}}]}}]\n"
    ));
    expect_eventually(&b, "the external client's own address", &cases, SETTLE, |c| c.to.contains("node-2"));
    // From outside, a packet claiming node-2's own address, which web (on node-2) always
    // admits: dropped at node-2's uplink, as the kernel drops such a martian. The real
    // client's connection, the control, is delivered (and counted) the same way.
    let (web, n2) = (b.pod("x/web").ip, b.node("node-2").ip);
    let delivered = || pod_counter(&b, "node-2", web, "fromTunnelPackets");
    let before = delivered();
    let ext = b.netns_of("external").unwrap();
    enter(&ext, move || send_spoofed_syn(n2, SocketAddrV4::new(n2, NODE_PORT)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(delivered(), before, "the spoofed SYN never reaches web");
    assert!(probe(&ext, n2, NODE_PORT, Proto::Tcp), "the real client is admitted");
    assert!(delivered() > before, "and its packets counted where the spoofed one would have been");
    b.apply_yaml(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: outside, namespace: x}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n\
         \x20 ingress: [{{from: [{{ipBlock: {{cidr: {}/32}}}}]}}]\n",
        b.node("node-1").ip
    ));
    expect_eventually(&b, "node-1's address (NodePort SNAT)", &cases, SETTLE, |c| c.to.contains("node-1"));

    // DNS for an egress-isolated pod: port 53 to the DNS pods, through the kube-dns ClusterIP.
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: dns-only, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n\
         \x20 - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]\n\
         \x20   ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]\n",
    );
    let other = b.pod("x/other").ip.to_string();
    let dns_cases = vec![
        to(&b, "x/client", "kube-dns ClusterIP", DNS_VIP, Proto::Udp, 53),
        to(&b, "x/client", "kube-dns ClusterIP", DNS_VIP, Proto::Tcp, 53),
        to(&b, "x/client", "x/other directly", &other, Proto::Udp, 53),
        to(&b, "x/other", "kube-dns ClusterIP", DNS_VIP, Proto::Udp, 53),
    ];
    expect_eventually(&b, "DNS through the ClusterIP only", &dns_cases, SETTLE, |c| c.to.starts_with("kube-dns"));
}
