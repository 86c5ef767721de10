//! NetworkPolicy -> the node's POLICY map entries and isolation bits: a pure function of
//! the cluster model (policies, pods, namespaces) and the node's own pods.
//!
//! For every local pod and direction it is isolated in (some policy selecting it has that
//! policy type), the rules of every selecting policy are flattened into one longest-prefix
//! table keyed by peer prefix: each entry holds the union of the (protocol, port range)s
//! every rule allows for *all* addresses that resolve to it. So:
//! - `ipBlock` `cidr` and each `except` become entries (an except an empty one, unless
//!   other rules allow those addresses);
//! - selected pods become `/32` entries carrying their own rules plus every block rule
//!   that covers them (an `ipBlock` matches pod addresses too, and a pod in an `except` is
//!   out of that block like any other address);
//! - a rule without peers is a `0.0.0.0/0` entry; without ports it allows everything
//!   (ICMP included); a port without protocol is TCP; a protocol without port is all its
//!   ports; `endPort` makes a range; named ports resolve per pod: against the local pod for
//!   ingress, against the peer pod at each address for egress (a pod lacking the name
//!   contributes nothing; an address no pod holds resolves no name).
//!
//! A local pod whose Pod object is not in the store (wired before contiv-ksr reflected
//! it) fails closed until it is: isolated as its namespace's policies isolate, allowed only
//! its node. Entries beyond the POLICY map's size fail closed too (see `fit`).
//!
//! The pod's own address and its node's addresses (the node's IPs and the pods' gateway)
//! are always allowed: traffic to and from the pod's node is never subject to policy.
//! hostNetwork pods are neither subject to policy nor selected as peers (their address is
//! their node's). Entries that would not change a lookup (equal to the nearest covering
//! entry, or empty with nothing covering them) are left out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use contiv_cluster_model::{
    ContainerPort, Labels, Namespace, NetworkPolicy, Pod, PolicyPeer, PolicyPort, PolicyType, PortRef, Protocol,
};
use contiv_common::{
    MAX_POLICY_ENTRIES, MAX_POLICY_PORT_RANGES, PolicyPorts, PortRange, pod_flags, policy_dir, policy_ports,
};
use ipnet::Ipv4Net;

/// The label every namespace carries (set by the API server).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A pod as policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct PodInfo<'a> {
    pub ip: Ipv4Addr,
    pub namespace: &'a str,
    pub labels: &'a Labels,
    pub ports: &'a [ContainerPort],
}

/// What the compiler reads.
#[derive(Debug, Default)]
pub struct PolicyInputs<'a> {
    pub policies: Vec<&'a NetworkPolicy>,
    /// Namespace labels by name (a namespace absent here has only its name label).
    pub namespaces: BTreeMap<&'a str, &'a Labels>,
    /// Every pod of the cluster that can be a peer (an IPv4 address, not hostNetwork).
    pub peers: Vec<PodInfo<'a>>,
    /// This node's pods.
    pub local: Vec<PodInfo<'a>>,
    /// This node's own addresses (its IPs, the pods' gateway).
    pub node_addresses: Vec<Ipv4Addr>,
    /// Local pods whose Pod object the store does not hold (yet): their labels are not
    /// known, so which policies select them is not either.
    pub unlabelled: BTreeSet<Ipv4Addr>,
}

/// The key of one POLICY entry, as the plan holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntryKey {
    pub pod: Ipv4Addr,
    /// [`policy_dir`].
    pub direction: u8,
    pub peer: Ipv4Net,
}

/// What the node must enforce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// Isolation bits ([`pod_flags::INGRESS_ISOLATED`], [`pod_flags::EGRESS_ISOLATED`]) of
    /// the local pods that have any.
    pub isolation: BTreeMap<Ipv4Addr, u8>,
    pub entries: BTreeMap<PolicyEntryKey, PolicyPorts>,
    /// What could not be represented exactly (denied rather than allowed), one line each.
    pub problems: Vec<String>,
}

// === impl PortSet ===

/// A union of (protocol, port range)s, or everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortSet {
    any: bool,
    /// Per protocol: sorted, disjoint, non-adjacent ranges.
    ranges: BTreeMap<u8, Vec<(u16, u16)>>,
}

impl PortSet {
    pub fn all() -> Self {
        Self { any: true, ranges: BTreeMap::new() }
    }

    pub fn is_empty(&self) -> bool {
        !self.any && self.ranges.is_empty()
    }

    /// Adds a range, merging it with overlapping and adjacent ones.
    pub fn add(&mut self, protocol: u8, first: u16, last: u16) {
        if self.any {
            return;
        }
        let list = self.ranges.entry(protocol).or_default();
        let (mut lo, mut hi) = (first.min(last), first.max(last));
        let mut kept = Vec::with_capacity(list.len() + 1);
        for &(a, b) in list.iter() {
            if u32::from(b) + 1 < u32::from(lo) || u32::from(hi) + 1 < u32::from(a) {
                kept.push((a, b));
            } else {
                lo = lo.min(a);
                hi = hi.max(b);
            }
        }
        kept.push((lo, hi));
        kept.sort_unstable();
        *list = kept;
    }

    pub fn union(&mut self, other: &PortSet) {
        if self.any {
            return;
        }
        if other.any {
            *self = Self::all();
            return;
        }
        for (proto, list) in &other.ranges {
            for &(a, b) in list {
                self.add(*proto, a, b);
            }
        }
    }

    /// Whether a new flow of `protocol` to `port` is allowed.
    pub fn allows(&self, protocol: u8, port: u16) -> bool {
        self.any || self.ranges.get(&protocol).is_some_and(|l| l.iter().any(|&(a, b)| a <= port && port <= b))
    }

    /// The map value; `Err` with the value holding the first ranges when there are more
    /// than an entry holds (the rest is then not allowed).
    #[expect(clippy::result_large_err, reason = "both arms are the map value; Err says it was cut short")]
    pub fn to_value(&self) -> Result<PolicyPorts, PolicyPorts> {
        let mut v = PolicyPorts::default();
        if self.any {
            v.flags = policy_ports::ANY;
            return Ok(v);
        }
        let all: Vec<PortRange> = self
            .ranges
            .iter()
            .flat_map(|(proto, list)| {
                list.iter().map(|&(first, last)| PortRange { first, last, protocol: *proto, _pad: 0 })
            })
            .collect();
        for (slot, r) in v.ranges.iter_mut().zip(&all) {
            *slot = *r;
        }
        v.count = all.len().min(MAX_POLICY_PORT_RANGES) as u16;
        if all.len() > MAX_POLICY_PORT_RANGES { Err(v) } else { Ok(v) }
    }

    /// The set a map value holds.
    pub fn from_value(v: &PolicyPorts) -> Self {
        if v.flags & policy_ports::ANY != 0 {
            return Self::all();
        }
        let mut s = Self::default();
        for r in v.ranges.iter().take(usize::from(v.count).min(MAX_POLICY_PORT_RANGES)) {
            s.add(r.protocol, r.first, r.last);
        }
        s
    }

    /// `TCP:80`, `UDP:1000-2000`, `any`, or `none`.
    pub fn describe(&self) -> Vec<String> {
        if self.any {
            return vec!["any".into()];
        }
        let mut out = vec![];
        for (proto, list) in &self.ranges {
            for &(a, b) in list {
                let p = protocol_name(*proto);
                out.push(if a == 0 && b == u16::MAX {
                    format!("{p}:all")
                } else if a == b {
                    format!("{p}:{a}")
                } else {
                    format!("{p}:{a}-{b}")
                });
            }
        }
        if out.is_empty() {
            out.push("none".into());
        }
        out
    }
}

pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

pub fn protocol_name(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        1 => "ICMP".into(),
        n => format!("proto{n}"),
    }
}

/// The container port `name` of `protocol` on a pod.
fn named_port(ports: &[ContainerPort], name: &str, protocol: Protocol) -> Option<u16> {
    ports.iter().find(|p| p.protocol == protocol && p.name.as_deref() == Some(name)).map(|p| p.port)
}

/// What a rule's `ports` allow: numbers everywhere, names against `named_for` (the pod the
/// names belong to; `None`: names resolve to nothing).
fn rule_ports(ports: &[PolicyPort], named_for: Option<&[ContainerPort]>) -> PortSet {
    if ports.is_empty() {
        return PortSet::all();
    }
    let mut set = PortSet::default();
    for p in ports {
        let proto = protocol_number(p.protocol);
        match &p.port {
            None => set.add(proto, 0, u16::MAX),
            Some(PortRef::Number(n)) => set.add(proto, *n, p.end_port.unwrap_or(*n).max(*n)),
            Some(PortRef::Name(name)) => {
                if let Some(n) = named_for.and_then(|ports| named_port(ports, name, p.protocol)) {
                    set.add(proto, n, n);
                }
            }
        }
    }
    set
}

fn has_named_ports(ports: &[PolicyPort]) -> bool {
    ports.iter().any(|p| matches!(p.port, Some(PortRef::Name(_))))
}

// === peers ===

/// Addresses a peer clause selects.
#[derive(Debug, Clone)]
enum Area {
    /// A block minus its exceptions (a rule without peers: 0.0.0.0/0).
    Block { cidr: Ipv4Net, except: Vec<Ipv4Net> },
    /// One pod.
    Pod(Ipv4Addr),
}

impl Area {
    /// Whether every address that resolves to trie node `p` is in the area (the trie holds
    /// the cidr and every except, so it is all or nothing).
    fn covers(&self, p: &Ipv4Net) -> bool {
        match self {
            Area::Block { cidr, except } => cidr.contains(p) && !except.iter().any(|e| e.contains(p)),
            Area::Pod(ip) => p.prefix_len() == 32 && p.addr() == *ip,
        }
    }

    fn contains_addr(&self, ip: Ipv4Addr) -> bool {
        match self {
            Area::Block { cidr, except } => cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip)),
            Area::Pod(p) => *p == ip,
        }
    }
}

/// One contribution to a pod's table: these addresses may use these ports.
#[derive(Debug, Clone)]
struct Grant {
    area: Area,
    ports: PortSet,
}

/// A rule's peers, resolved against the cluster (independent of the local pod).
struct ResolvedRule<'p, 'a> {
    areas: Vec<Area>,
    /// Pods among the peers (for egress named ports, resolved per pod).
    pods: Vec<&'p PodInfo<'a>>,
    ports: &'p [PolicyPort],
}

impl<'a> PolicyInputs<'a> {
    fn namespace_labels(&self, ns: &str) -> Labels {
        let mut labels = self.namespaces.get(ns).map(|l| (*l).clone()).unwrap_or_default();
        labels.entry(NAMESPACE_NAME_LABEL.into()).or_insert_with(|| ns.to_owned());
        labels
    }

    /// The rule's peers as areas and pods.
    fn resolve<'p>(
        &'p self,
        policy: &NetworkPolicy,
        peers: &[PolicyPeer],
        ports: &'p [PolicyPort],
        egress: bool,
    ) -> ResolvedRule<'p, 'a> {
        let named = egress && has_named_ports(ports);
        let mut areas = vec![];
        let mut pods: Vec<&PodInfo> = vec![];
        let mut ns_match: HashMap<&str, bool> = HashMap::new();
        if peers.is_empty() {
            areas.push(Area::Block { cidr: Ipv4Net::default(), except: vec![] });
            if named {
                pods.extend(self.peers.iter());
            }
        }
        for peer in peers {
            match peer {
                PolicyPeer::IpBlock(b) => {
                    let ipnet::IpNet::V4(cidr) = b.cidr else { continue };
                    let except: Vec<Ipv4Net> = b
                        .except
                        .iter()
                        .filter_map(|e| if let ipnet::IpNet::V4(e) = e { Some(e.trunc()) } else { None })
                        .collect();
                    let area = Area::Block { cidr: cidr.trunc(), except };
                    if named {
                        pods.extend(self.peers.iter().filter(|p| area.contains_addr(p.ip)));
                    }
                    areas.push(area);
                }
                PolicyPeer::Pods { namespace_selector, pod_selector } => {
                    ns_match.clear();
                    for p in &self.peers {
                        let ns_ok = match namespace_selector {
                            None => p.namespace == policy.namespace,
                            Some(sel) => *ns_match
                                .entry(p.namespace)
                                .or_insert_with(|| sel.matches(&self.namespace_labels(p.namespace))),
                        };
                        if ns_ok && pod_selector.as_ref().is_none_or(|s| s.matches(p.labels)) {
                            areas.push(Area::Pod(p.ip));
                            pods.push(p);
                        }
                    }
                }
            }
        }
        ResolvedRule { areas, pods, ports }
    }
}

/// The grants a resolved rule makes to local pod `local`.
fn grants(rule: &ResolvedRule, local: &PodInfo, egress: bool, out: &mut Vec<Grant>) {
    if !egress || !has_named_ports(rule.ports) {
        // Ingress names resolve against the local pod; egress without names is numeric.
        let ports = rule_ports(rule.ports, (!egress).then_some(local.ports));
        if !ports.is_empty() {
            out.extend(rule.areas.iter().map(|a| Grant { area: a.clone(), ports: ports.clone() }));
        }
        return;
    }
    // Egress with named ports: numbers for every area, names per peer pod.
    let numeric = rule_ports(rule.ports, None);
    if !numeric.is_empty() {
        out.extend(rule.areas.iter().map(|a| Grant { area: a.clone(), ports: numeric.clone() }));
    }
    for p in &rule.pods {
        let ports = rule_ports(rule.ports, Some(p.ports));
        if !ports.is_empty() {
            out.push(Grant { area: Area::Pod(p.ip), ports });
        }
    }
}

/// Flattens grants into longest-prefix entries (see the module docs).
fn flatten(grants: &[Grant]) -> BTreeMap<Ipv4Net, PortSet> {
    let mut nodes: BTreeSet<Ipv4Net> = BTreeSet::new();
    let mut by_pod: HashMap<Ipv4Addr, PortSet> = HashMap::new();
    let mut blocks: Vec<&Grant> = vec![];
    for g in grants {
        match &g.area {
            Area::Block { cidr, except } => {
                nodes.insert(*cidr);
                nodes.extend(except.iter().copied());
                blocks.push(g);
            }
            Area::Pod(ip) => {
                nodes.insert(Ipv4Net::new(*ip, 32).expect("a /32 is valid"));
                by_pod.entry(*ip).or_default().union(&g.ports);
            }
        }
    }
    // Shortest prefixes first, so a node's covering entries are decided before it.
    let mut order: Vec<Ipv4Net> = nodes.into_iter().collect();
    order.sort_by_key(|n| (n.prefix_len(), n.network()));
    let mut kept: BTreeMap<Ipv4Net, PortSet> = BTreeMap::new();
    let empty = PortSet::default();
    for node in order {
        let mut value = PortSet::default();
        for g in &blocks {
            if g.area.covers(&node) {
                value.union(&g.ports);
            }
        }
        if node.prefix_len() == 32
            && let Some(p) = by_pod.get(&node.addr())
        {
            value.union(p);
        }
        let covering = (0..node.prefix_len())
            .rev()
            .find_map(|len| kept.get(&Ipv4Net::new(node.network(), len).expect("valid length").trunc()))
            .unwrap_or(&empty);
        if value != *covering {
            kept.insert(node, value);
        }
    }
    kept
}

/// A shared POLICY table: direction (egress), the selecting policies, and the local pod
/// when ingress named ports are resolved against it.
type TableKey = (bool, Vec<usize>, Option<Ipv4Addr>);

/// Compiles the node's policy state.
pub fn compile(inputs: &PolicyInputs) -> CompiledPolicy {
    compile_within(inputs, MAX_POLICY_ENTRIES as usize)
}

/// Compiles the node's policy state into at most `capacity` entries (see [`fit`]).
pub fn compile_within(inputs: &PolicyInputs, capacity: usize) -> CompiledPolicy {
    let mut out = CompiledPolicy::default();
    // Per local pod, the policies selecting it.
    let selecting: Vec<Vec<usize>> = inputs
        .local
        .iter()
        .map(|l| {
            inputs
                .policies
                .iter()
                .enumerate()
                .filter(|(_, p)| p.namespace == l.namespace && p.pod_selector.matches(l.labels))
                .map(|(i, _)| i)
                .collect()
        })
        .collect();
    // Rules resolved once per (policy, direction), only for policies that select a pod here.
    let mut resolved: HashMap<(usize, bool), Vec<ResolvedRule>> = HashMap::new();
    // Tables are shared by pods with the same selecting policies (unless ingress names are
    // resolved against the local pod).
    let mut tables: HashMap<TableKey, BTreeMap<Ipv4Net, PortSet>> = HashMap::new();
    let node_grants: Vec<Grant> =
        inputs.node_addresses.iter().map(|ip| Grant { area: Area::Pod(*ip), ports: PortSet::all() }).collect();
    for (local, policies) in inputs.local.iter().zip(&selecting) {
        if inputs.unlabelled.contains(&local.ip) {
            unlabelled(&mut out, inputs, local);
            continue;
        }
        let mut bits = 0;
        for egress in [false, true] {
            let ptype = if egress { PolicyType::Egress } else { PolicyType::Ingress };
            let active: Vec<usize> =
                policies.iter().copied().filter(|i| inputs.policies[*i].policy_types.contains(&ptype)).collect();
            if active.is_empty() {
                continue;
            }
            bits |= if egress { pod_flags::EGRESS_ISOLATED } else { pod_flags::INGRESS_ISOLATED };
            let names_local =
                !egress && active.iter().any(|i| inputs.policies[*i].ingress.iter().any(|r| has_named_ports(&r.ports)));
            let table_key = (egress, active.clone(), names_local.then_some(local.ip));
            if !tables.contains_key(&table_key) {
                let mut all = node_grants.clone();
                for &i in &active {
                    let policy = inputs.policies[i];
                    let rules = resolved.entry((i, egress)).or_insert_with(|| {
                        let list = if egress { &policy.egress } else { &policy.ingress };
                        list.iter().map(|r| inputs.resolve(policy, &r.peers, &r.ports, egress)).collect()
                    });
                    for rule in rules.iter() {
                        grants(rule, local, egress, &mut all);
                    }
                }
                tables.insert(table_key.clone(), flatten(&all));
            }
            let direction = if egress { policy_dir::EGRESS } else { policy_dir::INGRESS };
            let table = &tables[&table_key];
            let own = Ipv4Net::new(local.ip, 32).expect("a /32 is valid");
            for (peer, ports) in table.iter().chain(std::iter::once((&own, &PortSet::all()))) {
                let value = match ports.to_value() {
                    Ok(v) => v,
                    Err(v) => {
                        out.problems.push(format!(
                            "{}/{}: more than {MAX_POLICY_PORT_RANGES} port ranges for peers {peer} ({}); \
                             the ranges beyond them are denied",
                            local.namespace,
                            local.ip,
                            if egress { "egress" } else { "ingress" }
                        ));
                        v
                    }
                };
                out.entries.insert(PolicyEntryKey { pod: local.ip, direction, peer: *peer }, value);
            }
        }
        if bits != 0 {
            out.isolation.insert(local.ip, bits);
        }
    }
    fit(&mut out, inputs, capacity);
    out
}

/// A local pod whose labels are not known (its Pod object is not in the store: a pod wired
/// before contiv-ksr reflected it, or while the store is away) fails closed: isolated in
/// each direction some policy of its namespace isolates, allowed only its node (and
/// itself), and said in `problems`, until its labels are known. (Left unisolated, a pod
/// the namespace's default-deny policy selects would be open meanwhile.)
fn unlabelled(out: &mut CompiledPolicy, inputs: &PolicyInputs, local: &PodInfo) {
    let mut bits = 0;
    for p in inputs.policies.iter().filter(|p| p.namespace == local.namespace) {
        if p.policy_types.contains(&PolicyType::Ingress) {
            bits |= pod_flags::INGRESS_ISOLATED;
        }
        if p.policy_types.contains(&PolicyType::Egress) {
            bits |= pod_flags::EGRESS_ISOLATED;
        }
    }
    if bits == 0 {
        return;
    }
    out.isolation.insert(local.ip, bits);
    for (bit, direction) in
        [(pod_flags::INGRESS_ISOLATED, policy_dir::INGRESS), (pod_flags::EGRESS_ISOLATED, policy_dir::EGRESS)]
    {
        if bits & bit != 0 {
            node_only(out, inputs, local.ip, direction);
        }
    }
    out.problems.push(format!(
        "{}/{}: its Pod object is not in the store, so its labels are not known: isolated by its \
         namespace's policies from everything but its node until they are",
        local.namespace, local.ip
    ));
}

/// Keeps the entries within the POLICY map's `capacity`, failing closed: the map refuses
/// entries beyond it, and a refused entry below a broader allow (an `except`, a pod with
/// fewer ports than its block) would let its addresses through. When the entries do not
/// fit, the pods with the fewest entries keep all of theirs; every other isolated pod keeps
/// only the entries of its own address and its node's (always allowed) and stays
/// isolated: denied everything else until its entries fit, and said in `problems`.
fn fit(out: &mut CompiledPolicy, inputs: &PolicyInputs, capacity: usize) {
    if out.entries.len() <= capacity {
        return;
    }
    // Per pod: its entries, and its isolated directions (each has the pod's own entry).
    let mut per_pod: BTreeMap<Ipv4Addr, (usize, BTreeSet<u8>)> = BTreeMap::new();
    for key in out.entries.keys() {
        let (n, directions) = per_pod.entry(key.pod).or_default();
        *n += 1;
        directions.insert(key.direction);
    }
    let minimal = |directions: &BTreeSet<u8>| directions.len() * (inputs.node_addresses.len() + 1);
    let mut room = capacity.saturating_sub(per_pod.values().map(|(_, d)| minimal(d)).sum());
    let mut order: Vec<(usize, Ipv4Addr)> =
        per_pod.iter().map(|(ip, (n, d))| (n.saturating_sub(minimal(d)), *ip)).collect();
    order.sort_unstable();
    let mut reduced = BTreeSet::new();
    for (more, ip) in order {
        if more <= room {
            room -= more;
        } else {
            reduced.insert(ip);
        }
    }
    out.entries.retain(|key, _| !reduced.contains(&key.pod));
    for ip in reduced {
        for &direction in &per_pod[&ip].1 {
            node_only(out, inputs, ip, direction);
        }
        let namespace = inputs.local.iter().find(|l| l.ip == ip).map_or("?", |l| l.namespace);
        out.problems.push(format!(
            "{namespace}/{ip}: its NetworkPolicy entries do not fit the node's POLICY map ({capacity} entries); \
             it is isolated from everything but its node until they do"
        ));
    }
}

/// The entries of a pod isolated from everything but its node (and itself) in `direction`.
fn node_only(out: &mut CompiledPolicy, inputs: &PolicyInputs, pod: Ipv4Addr, direction: u8) {
    for peer in inputs.node_addresses.iter().chain(std::iter::once(&pod)) {
        let key = PolicyEntryKey { pod, direction, peer: Ipv4Net::from(*peer) };
        out.entries.insert(key, PortSet::all().to_value().unwrap_or_else(|v| v));
    }
}

/// A pod attached on this node: its address and the Pod object it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct LocalPod<'a> {
    pub ip: Ipv4Addr,
    pub namespace: &'a str,
    pub name: &'a str,
}

static NO_LABELS: Labels = BTreeMap::new();

/// The compiler's inputs from the cluster model and the node's pods. Peers are every pod
/// with an IPv4 address except hostNetwork ones (their address is their node's: neither
/// selected as peers nor subject to policy); a local pod's address is its attachment's
/// (known before the Pod's status says it); a local pod whose Pod object is not in the
/// store is `unlabelled` (see [`unlabelled`]).
pub fn inputs<'a>(
    pods: impl Iterator<Item = &'a Pod>,
    namespaces: impl Iterator<Item = &'a Namespace>,
    policies: impl Iterator<Item = &'a NetworkPolicy>,
    local: &[LocalPod<'a>],
    mut node_addresses: Vec<Ipv4Addr>,
) -> PolicyInputs<'a> {
    let pods: Vec<&Pod> = pods.collect();
    let by_name: HashMap<(&str, &str), &Pod> =
        pods.iter().map(|p| ((p.namespace.as_str(), p.name.as_str()), *p)).collect();
    let local_names: std::collections::HashSet<(&str, &str)> = local.iter().map(|l| (l.namespace, l.name)).collect();
    let mut out = PolicyInputs {
        policies: policies.collect(),
        namespaces: namespaces.map(|n| (n.name.as_str(), &n.labels)).collect(),
        ..Default::default()
    };
    for p in pods.iter().filter(|p| !p.host_network) {
        if local_names.contains(&(p.namespace.as_str(), p.name.as_str())) {
            continue;
        }
        for ip in p.ips.iter().filter_map(|ip| if let IpAddr::V4(v4) = ip { Some(*v4) } else { None }) {
            out.peers.push(PodInfo { ip, namespace: &p.namespace, labels: &p.labels, ports: &p.container_ports });
        }
    }
    for l in local {
        let pod = by_name.get(&(l.namespace, l.name));
        let info = PodInfo {
            ip: l.ip,
            namespace: l.namespace,
            labels: pod.map_or(&NO_LABELS, |p| &p.labels),
            ports: pod.map_or(&[][..], |p| p.container_ports.as_slice()),
        };
        // A pod of unknown labels is no selector's peer (a selector that would match no
        // labels, `NotIn`, must not let it in).
        match pod {
            Some(_) => out.peers.push(info),
            None => {
                out.unlabelled.insert(l.ip);
            }
        }
        out.local.push(info);
    }
    node_addresses.sort();
    node_addresses.dedup();
    out.node_addresses = node_addresses;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use contiv_cluster_model::ToModel;
    use serde_json::json;

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const SCTP: u8 = 132;
    const ICMP: u8 = 1;
    const INGRESS: u8 = policy_dir::INGRESS;
    const EGRESS: u8 = policy_dir::EGRESS;

    /// A NetworkPolicy from its Kubernetes JSON, converted as contiv-ksr and netctl do.
    fn netpol(name: &str, ns: &str, spec: serde_json::Value) -> NetworkPolicy {
        let k8s: k8s_openapi::api::networking::v1::NetworkPolicy = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec
        }))
        .expect("NetworkPolicy JSON");
        k8s.to_model().expect("valid policy")
    }

    fn pod(ns: &str, name: &str, ip: [u8; 4], labels: &[(&str, &str)], ports: &[(&str, Protocol, u16)]) -> Pod {
        Pod {
            name: name.into(),
            namespace: ns.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ips: vec![IpAddr::V4(Ipv4Addr::from(ip))],
            node_name: Some("n1".into()),
            host_network: false,
            container_ports: ports
                .iter()
                .map(|(n, protocol, port)| ContainerPort {
                    name: Some(n.to_string()),
                    protocol: *protocol,
                    port: *port,
                    host_port: None,
                    host_ip: None,
                })
                .collect(),
        }
    }

    fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
        Namespace { name: name.into(), labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 11);
    const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);

    /// A cluster: pods (those in 10.1.1.0/24 are local), namespaces and policies.
    struct World {
        pods: Vec<Pod>,
        namespaces: Vec<Namespace>,
        policies: Vec<NetworkPolicy>,
    }

    impl World {
        fn compile(&self) -> Compiled {
            self.compile_within(MAX_POLICY_ENTRIES as usize)
        }

        fn compile_within(&self, capacity: usize) -> Compiled {
            self.compile_with(capacity, &[])
        }

        /// With `ghosts`: local pods whose Pod objects are not in the store.
        fn compile_with(&self, capacity: usize, ghosts: &[LocalPod]) -> Compiled {
            let mut local: Vec<LocalPod> = self
                .pods
                .iter()
                .filter(|p| !p.host_network)
                .filter_map(|p| match p.ips[0] {
                    IpAddr::V4(ip) if ip.octets()[2] == 1 => {
                        Some(LocalPod { ip, namespace: &p.namespace, name: &p.name })
                    }
                    _ => None,
                })
                .collect();
            local.extend_from_slice(ghosts);
            let inputs =
                inputs(self.pods.iter(), self.namespaces.iter(), self.policies.iter(), &local, vec![NODE, GATEWAY]);
            Compiled(compile_within(&inputs, capacity))
        }
    }

    struct Compiled(CompiledPolicy);

    impl Compiled {
        /// What the datapath decides for a new flow: isolation bit, then longest match.
        fn allows(&self, pod: [u8; 4], direction: u8, peer: [u8; 4], proto: u8, port: u16) -> bool {
            let (pod, peer) = (Ipv4Addr::from(pod), Ipv4Addr::from(peer));
            let bit = if direction == INGRESS { pod_flags::INGRESS_ISOLATED } else { pod_flags::EGRESS_ISOLATED };
            if self.0.isolation.get(&pod).copied().unwrap_or(0) & bit == 0 {
                return true;
            }
            let best = self
                .0
                .entries
                .iter()
                .filter(|(k, _)| k.pod == pod && k.direction == direction && k.peer.contains(&peer))
                .max_by_key(|(k, _)| k.peer.prefix_len());
            best.is_some_and(|(_, v)| PortSet::from_value(v).allows(proto, port))
        }

        fn ingress(&self, to: [u8; 4], from: [u8; 4], proto: u8, port: u16) -> bool {
            self.allows(to, INGRESS, from, proto, port)
        }

        fn egress(&self, from: [u8; 4], to: [u8; 4], proto: u8, port: u16) -> bool {
            self.allows(from, EGRESS, to, proto, port)
        }

        fn isolation(&self, pod: [u8; 4]) -> u8 {
            self.0.isolation.get(&Ipv4Addr::from(pod)).copied().unwrap_or(0)
        }
    }

    const A: [u8; 4] = [10, 1, 1, 10];
    const B: [u8; 4] = [10, 1, 1, 11];
    const C: [u8; 4] = [10, 1, 2, 20];
    const D: [u8; 4] = [10, 1, 2, 21];
    const E: [u8; 4] = [10, 1, 3, 30];
    const OUTSIDE: [u8; 4] = [203, 0, 113, 10];

    fn world(policies: Vec<NetworkPolicy>) -> World {
        World {
            pods: vec![
                pod("default", "a", A, &[("app", "web"), ("tier", "front")], &[("http", Protocol::Tcp, 8080)]),
                pod("default", "b", B, &[("app", "db")], &[("http", Protocol::Tcp, 9090)]),
                pod("default", "c", C, &[("app", "web"), ("tier", "back")], &[("http", Protocol::Tcp, 7070)]),
                pod("other", "d", D, &[("app", "web")], &[("dns", Protocol::Udp, 5353)]),
                pod("third", "e", E, &[], &[]),
            ],
            namespaces: vec![
                namespace("default", &[("team", "a")]),
                namespace("other", &[("team", "b"), ("env", "prod")]),
                namespace("third", &[("env", "dev")]),
            ],
            policies,
        }
    }

    #[test]
    fn policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() {
        let c = world(vec![
            netpol("in-only", "default", json!({"podSelector": {"matchLabels": {"app": "web"}}})),
            netpol("eg-rules", "default", json!({"podSelector": {"matchLabels": {"app": "db"}}, "egress": [{}]})),
        ])
        .compile();
        // No rules, no types: Ingress only (default deny ingress, egress untouched).
        assert_eq!(c.isolation(A), pod_flags::INGRESS_ISOLATED);
        assert!(!c.ingress(A, C, TCP, 80));
        assert!(c.egress(A, OUTSIDE, TCP, 80), "not isolated for egress");
        // Egress rules without types: Ingress and Egress.
        assert_eq!(c.isolation(B), pod_flags::INGRESS_ISOLATED | pod_flags::EGRESS_ISOLATED);
        assert!(!c.ingress(B, A, TCP, 80));
        assert!(c.egress(B, OUTSIDE, UDP, 53), "egress: [{{}}] allows everything");
        // Explicit Egress only: ingress stays open.
        let c = world(vec![netpol(
            "eg",
            "default",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{"ports": [{"port": 1}]}]}),
        )])
        .compile();
        assert_eq!(c.isolation(A), pod_flags::EGRESS_ISOLATED);
        assert!(c.ingress(A, E, TCP, 2), "ingress rules of an Egress-only policy are ignored");
        assert!(!c.egress(A, E, TCP, 2));
    }

    #[test]
    fn selectors_match_labels_and_expressions_in_notin_exists_doesnotexist() {
        let sel = |expr: serde_json::Value| {
            world(vec![netpol(
                "p",
                "default",
                json!({"podSelector": {"matchLabels": {"app": "db"}},
                       "ingress": [{"from": [{"podSelector": {"matchExpressions": [expr]}}]}]}),
            )])
            .compile()
        };
        // Peers in the policy's namespace only: a (web, front), c (web, back).
        let c = sel(json!({"key": "tier", "operator": "In", "values": ["front"]}));
        assert!(c.ingress(B, A, TCP, 1) && !c.ingress(B, C, TCP, 1));
        let c = sel(json!({"key": "tier", "operator": "NotIn", "values": ["front"]}));
        assert!(!c.ingress(B, A, TCP, 1) && c.ingress(B, C, TCP, 1));
        assert!(c.ingress(B, B, TCP, 1), "b has no tier label: NotIn matches (and it is itself)");
        let c = sel(json!({"key": "tier", "operator": "Exists"}));
        assert!(c.ingress(B, A, TCP, 1) && c.ingress(B, C, TCP, 1));
        assert!(!c.ingress(B, D, TCP, 1), "d has no tier and is in another namespace");
        let c = sel(json!({"key": "tier", "operator": "DoesNotExist"}));
        assert!(!c.ingress(B, A, TCP, 1) && !c.ingress(B, C, TCP, 1));
        assert!(!c.ingress(B, D, TCP, 1), "another namespace: not a peer without a namespaceSelector");
    }

    #[test]
    fn namespace_selector_alone_combined_with_pods_and_as_separate_peers() {
        let c = world(vec![netpol(
            "p",
            "default",
            json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}], "ports": [{"port": 1}]},
                {"from": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "Exists"}]},
                           "podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 2}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "third"}}},
                          {"podSelector": {"matchLabels": {"tier": "back"}}}], "ports": [{"port": 3}]}
            ]}),
        )])
        .compile();
        assert!(c.ingress(B, D, TCP, 1), "every pod of a prod namespace");
        assert!(!c.ingress(B, E, TCP, 1) && !c.ingress(B, A, TCP, 1));
        assert!(c.ingress(B, D, TCP, 2), "web pod in a namespace with env");
        assert!(!c.ingress(B, E, TCP, 2), "env namespace but not web");
        assert!(!c.ingress(B, A, TCP, 2), "web but its namespace has no env label");
        assert!(c.ingress(B, E, TCP, 3), "first peer: the namespace by its name label");
        assert!(c.ingress(B, C, TCP, 3), "second peer: tier=back in the policy's namespace");
        assert!(!c.ingress(B, A, TCP, 3) && !c.ingress(B, D, TCP, 3));
        assert!(!c.ingress(B, OUTSIDE, TCP, 1), "selectors never match outside addresses");
    }

    #[test]
    fn a_local_pod_of_unknown_labels_fails_closed_until_its_object_arrives() {
        let w = world(vec![
            netpol("deny-in", "default", json!({"podSelector": {}, "policyTypes": ["Ingress"]})),
            netpol(
                "db",
                "default",
                json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [{"podSelector":
                    {"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["untrusted"]}]}}]}]}),
            ),
        ]);
        const GHOST: [u8; 4] = [10, 1, 1, 12];
        const STRAY: [u8; 4] = [10, 1, 1, 13];
        let ghosts = [
            LocalPod { ip: GHOST.into(), namespace: "default", name: "ghost" },
            LocalPod { ip: STRAY.into(), namespace: "third", name: "stray" },
        ];
        let c = w.compile_with(MAX_POLICY_ENTRIES as usize, &ghosts);
        assert_eq!(c.isolation(GHOST), pod_flags::INGRESS_ISOLATED, "as its namespace's policies isolate");
        assert!(c.ingress(GHOST, NODE.octets(), TCP, 8080) && c.ingress(GHOST, GATEWAY.octets(), UDP, 53));
        assert!(!c.ingress(GHOST, A, TCP, 8080) && !c.ingress(GHOST, OUTSIDE, TCP, 8080));
        assert!(c.egress(GHOST, OUTSIDE, TCP, 443), "no policy of its namespace isolates egress");
        // Nor is it a peer: `NotIn` would match a pod without labels.
        assert!(c.ingress(B, A, TCP, 9090) && !c.ingress(B, GHOST, TCP, 9090));
        assert_eq!(c.isolation(STRAY), 0, "no policy in its namespace");
        assert_eq!(c.0.problems.len(), 1, "{:?}", c.0.problems);
        assert!(c.0.problems[0].starts_with("default/10.1.1.12: its Pod object is not in the store"));
    }

    #[test]
    fn entries_beyond_the_map_leave_the_largest_pods_isolated_to_their_node() {
        let w = world(vec![
            netpol(
                "web",
                "default",
                json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                    {"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.1.2.0/24"]}}], "ports": [{"port": 80}]},
                    {"from": [{"namespaceSelector": {}}], "ports": [{"port": 81}]}
                ]}),
            ),
            netpol(
                "db",
                "default",
                json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [{"podSelector": {}}]}]}),
            ),
        ]);
        let full = w.compile();
        assert!(full.0.problems.is_empty(), "{:?}", full.0.problems);
        let count = |c: &Compiled, pod: [u8; 4]| c.0.entries.keys().filter(|k| k.pod == Ipv4Addr::from(pod)).count();
        let (a, b) = (count(&full, A), count(&full, B));
        assert!(a > b, "a's table ({a}) is larger than b's ({b})");
        assert_eq!(w.compile_within(a + b).0, full.0, "entries that fit are all kept");

        // One entry short: a, the pod with more entries, keeps its own and its node's.
        let short = w.compile_within(a + b - 1);
        assert_eq!(count(&short, B), b, "b fits and keeps every entry");
        assert!(short.ingress(B, A, TCP, 5432) && !short.ingress(B, OUTSIDE, TCP, 5432));
        assert_eq!(short.isolation(A), full.isolation(A), "a stays isolated");
        assert!(short.ingress(A, NODE.octets(), TCP, 80) && short.ingress(A, GATEWAY.octets(), TCP, 10250));
        assert!(short.ingress(A, A, TCP, 80), "its own address");
        for (from, port) in [(OUTSIDE, 80), (C, 81), (B, 81), (E, 81)] {
            assert!(full.ingress(A, from, TCP, port), "{from:?}:{port} allowed in full");
            assert!(!short.ingress(A, from, TCP, port), "{from:?}:{port} denied, not let through");
        }
        assert_eq!(short.0.problems.len(), 1, "{:?}", short.0.problems);
        assert!(short.0.problems[0].starts_with("default/10.1.1.10: "), "{}", short.0.problems[0]);

        // A pod whose table has no entries of its node's (blocks allowing everything
        // cover them) still keeps its node when reduced.
        let w = world(vec![
            netpol(
                "blocks",
                "default",
                json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                    {"from": [{"ipBlock": {"cidr": "192.168.0.0/16"}}]},
                    {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.5.0.0/16", "10.6.0.0/16", "10.7.0.0/16"]}}]}
                ]}),
            ),
            netpol(
                "db",
                "default",
                json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [{"podSelector": {}}]}]}),
            ),
        ]);
        let full = w.compile();
        let node_entry = |c: &Compiled, peer: Ipv4Addr| {
            c.0.entries.contains_key(&PolicyEntryKey { pod: A.into(), direction: INGRESS, peer: peer.into() })
        };
        assert!(!node_entry(&full, NODE) && !node_entry(&full, GATEWAY), "covered: {:?}", full.0.entries);
        let short = w.compile_within(count(&full, B) + 3);
        assert_eq!(count(&short, B), count(&full, B), "b fits");
        assert!(full.ingress(A, [192, 168, 7, 7], TCP, 1) && !short.ingress(A, [192, 168, 7, 7], TCP, 1));
        assert!(short.ingress(A, NODE.octets(), TCP, 8080) && short.ingress(A, GATEWAY.octets(), UDP, 53));
    }

    #[test]
    fn ip_blocks_match_pod_addresses_and_except_carves_them_out() {
        let c = world(vec![netpol(
            "p",
            "default",
            json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [
                {"from": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]}}], "ports": [{"port": 80}]},
                {"from": [{"ipBlock": {"cidr": "10.1.2.21/32"}}], "ports": [{"port": 81}]},
                {"from": [{"podSelector": {"matchLabels": {"tier": "back"}}}], "ports": [{"port": 82}]},
                {"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.1.3.30/32"]}}], "ports": [{"port": 83}]}
            ]}),
        )])
        .compile();
        assert!(c.ingress(B, A, TCP, 80), "a pod inside the block");
        assert!(c.ingress(B, E, TCP, 80), "another namespace's pod inside the block");
        assert!(!c.ingress(B, C, TCP, 80) && !c.ingress(B, D, TCP, 80), "pods in the except");
        assert!(!c.ingress(B, [10, 1, 2, 99], TCP, 80), "any address in the except");
        assert!(c.ingress(B, D, TCP, 81), "a pod's /32 as a block");
        assert!(!c.ingress(B, C, TCP, 81));
        // c is in the except of the first block but selected by a pod rule: the union holds.
        assert!(c.ingress(B, C, TCP, 82) && !c.ingress(B, C, TCP, 80));
        assert!(c.ingress(B, OUTSIDE, TCP, 83) && c.ingress(B, D, TCP, 83), "0.0.0.0/0 covers pods too");
        assert!(!c.ingress(B, E, TCP, 83), "a pod /32 except");
        assert!(c.ingress(B, E, TCP, 80), "...still in the first block");
        assert!(!c.ingress(B, OUTSIDE, TCP, 80));
    }

    #[test]
    fn ports_protocols_ranges_and_named_ports_resolve_per_pod() {
        let c = world(vec![
            netpol(
                "in",
                "default",
                json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                    {"ports": [{"port": "http"}, {"port": 8000, "endPort": 8010}, {"protocol": "UDP"},
                               {"protocol": "SCTP", "port": 9000}]}
                ]}),
            ),
            netpol(
                "out",
                "default",
                json!({"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Egress"], "egress": [
                    {"ports": [{"port": "http"}, {"protocol": "UDP", "port": "dns"}, {"port": 443}]}
                ]}),
            ),
        ])
        .compile();
        // Ingress names resolve against the local pod: a's http is 8080 (c's 7070 is remote).
        assert!(c.ingress(A, E, TCP, 8080) && !c.ingress(A, E, TCP, 7070));
        // endPort: both ends included.
        assert!(c.ingress(A, E, TCP, 8000) && c.ingress(A, E, TCP, 8010) && !c.ingress(A, E, TCP, 8011));
        // A protocol without a port: every port of it.
        assert!(c.ingress(A, E, UDP, 1) && c.ingress(A, E, UDP, 65535));
        // A port without a protocol is TCP; SCTP opens SCTP only.
        assert!(c.ingress(A, E, SCTP, 9000));
        assert!(!c.ingress(A, E, TCP, 9000), "an SCTP rule never opens TCP");
        assert!(!c.ingress(A, E, ICMP, 0), "ICMP needs a rule without ports");
        // Egress names resolve against each peer pod: http is 8080 on a, 7070 on c, none on d.
        assert!(c.egress(B, A, TCP, 8080) && !c.egress(B, A, TCP, 7070));
        assert!(c.egress(B, C, TCP, 7070) && !c.egress(B, C, TCP, 8080));
        assert!(!c.egress(B, E, TCP, 8080) && !c.egress(B, E, TCP, 7070), "e has no port named http");
        assert!(c.egress(B, D, UDP, 5353) && !c.egress(B, D, TCP, 5353), "dns is UDP on d");
        assert!(c.egress(B, OUTSIDE, TCP, 443) && !c.egress(B, OUTSIDE, TCP, 8080), "no pod there: numbers only");
    }

    #[test]
    fn policies_are_additive_and_allow_all_forms_allow_everything() {
        let c = world(vec![
            netpol("one", "default", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}]})),
            netpol("two", "default", json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]})),
            netpol("deny", "default", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})),
        ])
        .compile();
        assert!(c.ingress(A, B, TCP, 80), "from policy one");
        assert!(c.ingress(A, E, UDP, 81) && c.ingress(A, B, UDP, 81), "from policy two (any source)");
        assert!(!c.ingress(A, E, TCP, 80), "e is not in the namespace");
        assert!(!c.ingress(B, E, UDP, 81), "policy two does not select b");
        assert!(!c.egress(A, B, TCP, 80), "deny-all egress");
        let c = world(vec![
            netpol("all-in", "default", json!({"podSelector": {}, "ingress": [{}]})),
            netpol("all-out", "default", json!({"podSelector": {}, "egress": [{"to": [], "ports": []}]})),
        ])
        .compile();
        for (proto, port) in [(TCP, 1), (UDP, 53), (SCTP, 7), (ICMP, 0)] {
            assert!(c.ingress(A, OUTSIDE, proto, port) && c.egress(A, OUTSIDE, proto, port));
        }
    }

    #[test]
    fn own_node_and_self_are_always_allowed_and_host_network_pods_are_no_peers() {
        let mut w = world(vec![netpol(
            "deny",
            "default",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "host"}}}]}]}),
        )]);
        let mut host = pod("default", "hostpod", NODE.octets(), &[("app", "host")], &[]);
        host.host_network = true;
        w.pods.push(host);
        let c = w.compile();
        for ip in [NODE.octets(), GATEWAY.octets(), A] {
            assert!(c.egress(A, ip, TCP, 10250) && c.ingress(A, ip, UDP, 1) && c.egress(A, ip, ICMP, 0));
        }
        assert!(!c.egress(A, B, TCP, 80));
        assert!(!c.ingress(A, [192, 168, 100, 12], TCP, 80), "another node's address");
        assert!(!c.0.isolation.contains_key(&NODE), "a hostNetwork pod is not subject to policy");
        // The hostNetwork pod is not a peer: its label selects nothing (the node address
        // is allowed as the node's, and other nodes' hostNetwork pods not at all).
        w.pods.last_mut().unwrap().ips = vec![IpAddr::V4(Ipv4Addr::new(192, 168, 100, 12))];
        let c = w.compile();
        assert!(!c.ingress(A, [192, 168, 100, 12], TCP, 80));
    }

    #[test]
    fn the_table_is_the_longest_match_union_and_redundant_entries_are_left_out() {
        let c = world(vec![netpol(
            "p",
            "default",
            json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [
                {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 80}]},
                {"from": [{"ipBlock": {"cidr": "10.1.0.0/16"}}], "ports": [{"port": 80}]},
                {"from": [{"podSelector": {}}], "ports": [{"port": 80}]},
                {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}}], "ports": [{"port": 81}]}
            ]}),
        )])
        .compile();
        let peers: Vec<String> =
            c.0.entries
                .keys()
                .filter(|k| k.pod == Ipv4Addr::from(B) && k.direction == INGRESS)
                .map(|k| k.peer.to_string())
                .collect();
        // 10/8 (80, 81), the except (80 only); pods and 10.1/16 add nothing; self and the
        // node's addresses.
        assert_eq!(peers, ["10.0.0.0/8", "10.1.1.1/32", "10.1.1.11/32", "10.9.0.0/16", "192.168.100.11/32"]);
        assert!(c.ingress(B, [10, 9, 1, 1], TCP, 80) && !c.ingress(B, [10, 9, 1, 1], TCP, 81));
        assert!(c.ingress(B, [10, 200, 0, 1], TCP, 81));
    }

    #[test]
    fn port_sets_merge_ranges_and_too_many_ranges_are_denied_and_reported() {
        let mut s = PortSet::default();
        s.add(TCP, 10, 20);
        s.add(TCP, 21, 30);
        s.add(TCP, 5, 12);
        s.add(UDP, 1, 1);
        assert_eq!(s.describe(), ["TCP:5-30", "UDP:1"]);
        let ports: Vec<serde_json::Value> = (0..40).map(|i| json!({"port": 1000 + 2 * i})).collect();
        let c = world(vec![netpol(
            "p",
            "default",
            json!({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"ports": ports}]}),
        )])
        .compile();
        assert!(c.ingress(B, E, TCP, 1000) && c.ingress(B, E, TCP, 1062));
        assert!(!c.ingress(B, E, TCP, 1064), "beyond the entry's ranges: denied, not allowed");
        assert!(c.0.problems.iter().any(|p| p.contains("more than 32 port ranges")), "{:?}", c.0.problems);
    }
}
