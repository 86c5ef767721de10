//! NetworkPolicy semantics in the cluster in a box (root), from real `networking.k8s.io/v1`
//! YAML applied with `netctl apply`: six pods in three namespaces on two nodes, each serving
//! TCP and UDP on ports 80 and 81; every scenario applies its policies, probes the whole
//! truth table (pod -> pod, TCP 80, TCP 81, UDP 80, each probe a new flow) until it matches
//! what Kubernetes says, and deletes them again. Same-node and cross-node pairs are both in
//! every table (egress is checked on the sender's node, ingress on the receiver's).
//!
//! Two boxes, so the two halves run in parallel: isolation and peers; ports and ipBlock.

use std::time::Duration;

use contiv_tests::{
    cluster::{BoxOptions, ClusterBox, ContainerPort},
    netpol::{Case, Proto, Servers, expect_eventually, matrix},
};

const PODS: [&str; 6] = ["x/a", "x/b", "x/c", "y/a", "y/b", "z/c"];
const PROBES: [(Proto, u16); 3] = [(Proto::Tcp, 80), (Proto::Tcp, 81), (Proto::Udp, 80)];
/// Propagation plus a retry or two; the target is well under a second.
const SETTLE: Duration = Duration::from_secs(15);

/// The box: pods labelled `pod=<name>`; x/a names port 80 `web`, x/b names port 81 `web`
/// (the same name, different numbers); namespaces labelled `ns=<name>`, y also `env=prod`.
fn cluster() -> (ClusterBox, Servers) {
    let mut b = ClusterBox::up(BoxOptions::for_test(2));
    let web = |port: u16| ContainerPort { name: "web".into(), port, protocol: "TCP".into() };
    for (i, id) in PODS.iter().enumerate() {
        let node = if i % 2 == 0 { "node-1" } else { "node-2" };
        let name = &id[2..];
        let ports = match *id {
            "x/a" => vec![web(80)],
            "x/b" => vec![web(81)],
            _ => vec![],
        };
        b.add_pod(node, id, &[("pod", name)], &ports);
    }
    b.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {ns: y, env: prod}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: z, labels: {ns: z}}\n",
    );
    let mut servers = Servers::new();
    for id in PODS {
        servers.serve(&b.pod(id).netns, &[80, 81]);
    }
    (b, servers)
}

/// Applies `yaml`, checks the table against `expect`, deletes the policies again and waits
/// until everything is open once more.
fn scenario(b: &ClusterBox, what: &str, yaml: &str, expect: impl Fn(&Case) -> bool) {
    let cases = matrix(b, &PODS, &PROBES);
    b.apply_yaml(yaml);
    expect_eventually(b, what, &cases, SETTLE, expect);
    b.delete_yaml(yaml);
    expect_eventually(b, &format!("{what}: deleted"), &cases, SETTLE, |_| true);
}

fn tcp(c: &Case, port: u16) -> bool {
    c.proto == Proto::Tcp && c.port == port
}

#[test]
fn policy_isolation_directions_types_union_and_peer_selectors() {
    let (b, _servers) = cluster();
    let cases = matrix(&b, &PODS, &PROBES);
    expect_eventually(&b, "no policy: everything open", &cases, SETTLE, |_| true);

    scenario(
        &b,
        "ingress default deny for x/a (policyTypes omitted: Ingress only)",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-a, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: a}}\n",
        |c| c.to != "x/a",
    );
    scenario(
        &b,
        "egress default deny in y (policyTypes: [Egress]; ingress stays open)",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-egress, namespace: y}\n\
         spec:\n  podSelector: {}\n  policyTypes: [Egress]\n",
        |c| !c.from.starts_with("y/"),
    );
    scenario(
        &b,
        "egress rules without policyTypes isolate both directions",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-to-c, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: b}}\n  egress:\n  - to: [{podSelector: {matchLabels: {pod: c}}}]\n",
        // x/b: no ingress at all; egress only to x/c (not z/c: another namespace).
        |c| c.to != "x/b" && (c.from != "x/b" || c.to == "x/c"),
    );
    scenario(
        &b,
        "policies are additive: deny-all plus two allows in namespace x",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: x}\n\
         spec:\n  podSelector: {}\n  policyTypes: [Ingress]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-y-80, namespace: x}\n\
         spec:\n  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n    ports: [{port: 80}]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: c-udp, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: c}}\n  ingress:\n  - ports: [{protocol: UDP, port: 80}]\n",
        |c| {
            if !c.to.starts_with("x/") {
                return true;
            }
            (c.from.starts_with("y/") && tcp(c, 80)) || (c.to == "x/c" && c.proto == Proto::Udp)
        },
    );
    scenario(
        &b,
        "allow-all forms: ingress [{}] and egress [{}] on top of deny-all",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: z}\n\
         spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-all, namespace: z}\n\
         spec:\n  podSelector: {}\n  ingress: [{}]\n  egress: [{}]\n  policyTypes: [Ingress, Egress]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: y}\n\
         spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
        |c| !c.from.starts_with("y/") && !c.to.starts_with("y/"),
    );
    scenario(
        &b,
        "namespaceSelector and podSelector in one peer (AND), matchExpressions In / NotIn",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: and, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: env, operator: In, values: [prod]}]}\n      podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}\n",
        |c| c.to != "x/a" || c.from == "y/b",
    );
    scenario(
        &b,
        "separate peers (OR), matchExpressions Exists / DoesNotExist",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: or, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: c}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: env, operator: DoesNotExist}, {key: ns, operator: Exists}]}\n      podSelector: {matchLabels: {pod: c}}\n    - podSelector: {matchExpressions: [{key: pod, operator: In, values: [b]}]}\n",
        // z/c (a pod c in a namespace without env), x/b (pod b in x); not y/*, not x/a.
        |c| c.to != "x/c" || c.from == "z/c" || c.from == "x/b",
    );
    scenario(
        &b,
        "namespaceSelector alone selects every pod of the namespace; {} selects all namespaces",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ns-only, namespace: y}\n\
         spec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: z}}}]\n  - from: [{namespaceSelector: {}}]\n    ports: [{port: 81}]\n",
        |c| c.to != "y/a" || c.from == "z/c" || tcp(c, 81),
    );
}

#[test]
fn policy_ports_named_ranges_protocols_and_ip_blocks() {
    let (b, _servers) = cluster();
    let ip = |id: &str| b.pod(id).ip;
    scenario(
        &b,
        "a named port resolves per pod (web is 80 on x/a, 81 on x/b); protocol only: all its ports",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: x}\n\
         spec:\n  podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b, c]}]}\n  ingress:\n  - ports: [{port: web}, {protocol: UDP}]\n",
        |c| match c.to.as_str() {
            "x/a" => tcp(c, 80) || c.proto == Proto::Udp,
            "x/b" => tcp(c, 81) || c.proto == Proto::Udp,
            // x/c has no port named web.
            "x/c" => c.proto == Proto::Udp,
            _ => true,
        },
    );
    scenario(
        &b,
        "endPort ranges; a port without protocol is TCP only",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: range, namespace: y}\n\
         spec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - ports: [{port: 81, endPort: 90}]\n  - ports: [{port: 60, endPort: 80, protocol: TCP}]\n",
        |c| c.to != "y/b" || c.proto == Proto::Tcp,
    );
    scenario(
        &b,
        "an SCTP rule never opens TCP or UDP",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: sctp, namespace: z}\n\
         spec:\n  podSelector: {}\n  ingress:\n  - ports: [{protocol: SCTP, port: 80}, {protocol: SCTP, port: 81}]\n",
        |c| c.to != "z/c",
    );
    scenario(
        &b,
        "egress named ports resolve against each destination pod",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: out-web, namespace: y}\n\
         spec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: x}}}]\n    ports: [{port: web}]\n",
        |c| match (c.from.as_str(), c.to.as_str()) {
            ("y/a", "x/a") => tcp(c, 80),
            ("y/a", "x/b") => tcp(c, 81),
            ("y/a", _) => false,
            _ => true,
        },
    );
    scenario(
        &b,
        "an empty ports list and a rule without ports allow everything; a protocol-only port all of it",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: mixed, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: c}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: z}}}]\n    ports: []\n  - from: [{podSelector: {}}]\n    ports: [{protocol: UDP}]\n",
        |c| c.to != "x/c" || c.from == "z/c" || (c.from.starts_with("x/") && c.proto == Proto::Udp),
    );
    // ipBlock: pod addresses are addresses like any other; an except carves them out.
    let yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: blocks, namespace: y}}\n\
         spec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n\
         \x20 - from: [{{ipBlock: {{cidr: 10.1.0.0/16, except: [{xb}/32]}}}}]\n    ports: [{{port: 80}}]\n\
         \x20 - from: [{{ipBlock: {{cidr: {xc}/32}}}}]\n    ports: [{{port: 81}}]\n",
        xb = ip("x/b"),
        xc = ip("x/c"),
    );
    scenario(&b, "ipBlock matches pod /32s, except excludes a pod", &yaml, |c| {
        c.to != "y/a" || (tcp(c, 80) && c.from != "x/b") || (tcp(c, 81) && c.from == "x/c")
    });
    let yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: egress-blocks, namespace: z}}\n\
         spec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n\
         \x20 - to: [{{ipBlock: {{cidr: 0.0.0.0/0, except: [{xa}/32, {ya}/32]}}}}]\n\
         \x20 - to: [{{podSelector: {{}}, namespaceSelector: {{matchLabels: {{ns: y}}}}}}]\n    ports: [{{port: 81}}]\n",
        xa = ip("x/a"),
        ya = ip("y/a"),
    );
    scenario(&b, "egress ipBlock with pod excepts, unioned with a pod rule", &yaml, |c| {
        c.from != "z/c" || (c.to != "x/a" && c.to != "y/a") || (c.to == "y/a" && tcp(c, 81))
    });
}
