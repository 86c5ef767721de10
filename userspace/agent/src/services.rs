//! Cluster model -> service map entries: the pure half of the kube-proxy replacement.
//!
//! [`plan_services`] turns Services, EndpointSlices, nodes and registrations into the
//! entries of SVC_FRONTENDS, SVC_BACKENDS, SVC_SOURCE_RANGES and NODE_ADDRS for one node,
//! plus what the agent serves beside the maps (healthCheckNodePort servers, the refusals
//! the slow path answers) and why a service was left out. No I/O: the applier installs the
//! difference (see [`crate::apply`]).
//!
//! Semantics follow kube-proxy (see the service-proxy notes):
//! - one service port = one service id; every frontend of it (ClusterIPs, the NodePort on
//!   every node address, externalIPs, load-balancer IPs) leads to the same backends;
//! - the Cluster set is the ready endpoints, else the serving-and-terminating ones; the Local
//!   set (this node's endpoints, for externalTrafficPolicy / internalTrafficPolicy Local) is
//!   chosen the same way among local endpoints only;
//! - `targetPort` by name: EndpointSlices carry the number per slice (and so per pod);
//! - services of another proxy (`service.kubernetes.io/service-proxy-name`), headless ones
//!   and ExternalName are not programmed; SCTP ports are refused with a reason.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
};

use contiv_cluster_model::{
    AddressType, EndpointSlice, Node, Protocol, Service, ServiceType, SessionAffinity, TrafficPolicy,
};
use contiv_common::{NodeAddr, SVC_LOCAL_BASE, SvcBackend, SvcBackendKey, SvcFrontend, SvcKey, svc_flags};
use contiv_node_registry::NodeRegistration;
use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Who this proxy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceParams {
    pub node_name: String,
    /// `service.kubernetes.io/service-proxy-name` this proxy answers to (`None`: the default).
    pub proxy_name: Option<String>,
    /// This node's own addresses (NodePorts are served on them), besides its registration's.
    pub node_ips: Vec<Ipv4Addr>,
}

/// The cluster state services depend on.
#[derive(Debug, Clone, Copy)]
pub struct ServiceInputs<'a> {
    pub services: &'a [&'a Service],
    pub slices: &'a [&'a EndpointSlice],
    pub nodes: &'a [&'a Node],
    pub registrations: &'a [&'a NodeRegistration],
}

/// One programmed service port, for inspection and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePortInfo {
    pub namespace: String,
    pub name: String,
    /// The service port's name ("" for a single unnamed port).
    pub port_name: String,
    pub protocol: &'static str,
    /// Its frontends as `ip:port` (`*:port` for the NodePort).
    pub frontends: Vec<String>,
}

/// A healthCheckNodePort the agent answers (externalTrafficPolicy Local).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Endpoints of the service on this node (distinct addresses of the Local sets).
    pub local_endpoints: usize,
}

/// A service (or one of its ports) left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub service: String,
    pub reason: String,
    /// Worth a warning (an unsupported request), as opposed to by design (headless, another
    /// proxy's service).
    pub warn: bool,
}

/// Destinations the slow path refuses (TCP RST / ICMP port unreachable): frontends of
/// service ports without any endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Refusals {
    /// Exact frontends (ClusterIPs, externalIPs, load-balancer IPs): (ip, port, protocol).
    pub exact: BTreeSet<(Ipv4Addr, u16, u8)>,
    /// NodePorts without endpoints: (port, protocol) on every node address.
    pub node_ports: BTreeSet<(u16, u8)>,
}

/// The service half of a node's plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePlan {
    pub frontends: BTreeMap<SvcKey, SvcFrontend>,
    pub backends: BTreeMap<SvcBackendKey, SvcBackend>,
    /// loadBalancerSourceRanges: (service id, prefix).
    pub source_ranges: BTreeSet<(u32, Ipv4Net)>,
    pub node_addrs: BTreeMap<Ipv4Addr, NodeAddr>,
    pub ports: BTreeMap<u32, ServicePortInfo>,
    /// healthCheckNodePort -> what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub refusals: Refusals,
    /// Every backend address in use: (ip, port, protocol).
    pub endpoints: BTreeSet<(Ipv4Addr, u16, u8)>,
    pub skipped: Vec<Skipped>,
}

/// FNV-1a, 32 bits.
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Service ids: a hash of namespace/name/port/protocol, so they survive restarts and
/// unrelated changes (conntrack and affinity entries carry them); a collision takes the
/// next free value, in the order of the names. Returns the id of each of `names` (equal
/// names share one).
fn assign_ids(names: &[String]) -> Vec<u32> {
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_unstable_by(|a, b| names[*a].cmp(&names[*b]));
    let mut used = HashSet::with_capacity(names.len());
    let mut out = vec![0; names.len()];
    let mut prev: Option<usize> = None;
    for i in order {
        if let Some(p) = prev
            && names[p] == names[i]
        {
            out[i] = out[p];
            continue;
        }
        // Ids never collide with the Local-set ordinal bit and are never 0.
        let mut id = (fnv1a(names[i].as_bytes()) & 0x7fff_ffff).max(1);
        while !used.insert(id) {
            id = if id == 0x7fff_ffff { 1 } else { id + 1 };
        }
        out[i] = id;
        prev = Some(i);
    }
    out
}

fn proto_number(p: Protocol) -> Option<u8> {
    match p {
        Protocol::Tcp => Some(IPPROTO_TCP),
        Protocol::Udp => Some(IPPROTO_UDP),
        Protocol::Sctp => None,
    }
}

pub fn proto_name(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

fn v4s(ips: &[IpAddr]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    ips.iter().filter_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    ip: Ipv4Addr,
    port: u16,
    ready: bool,
    serving_terminating: bool,
    local: bool,
}

/// Ready endpoints, else the serving-and-terminating ones.
fn choose(c: &[Candidate]) -> Vec<Candidate> {
    let ready: Vec<Candidate> = c.iter().copied().filter(|c| c.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    c.iter().copied().filter(|c| c.serving_terminating).collect()
}

fn service_key(s: &Service) -> String {
    format!("{}/{}", s.namespace, s.name)
}

/// The service half of the node's plan.
pub fn plan_services(params: &ServiceParams, inputs: ServiceInputs<'_>) -> ServicePlan {
    let mut p = ServicePlan::default();

    // Node addresses: every node's (NodePorts from pods and hosts), this node's marked.
    for r in inputs.registrations {
        if let Some(ip) = r.uplink_ip {
            let local = u8::from(r.name == params.node_name);
            let e = p.node_addrs.entry(ip).or_default();
            e.local |= local;
        }
    }
    for n in inputs.nodes {
        let local = u8::from(n.name == params.node_name);
        for t in ["InternalIP", "ExternalIP"] {
            for ip in v4s(&n.ips_of_type(t)) {
                p.node_addrs.entry(ip).or_default().local |= local;
            }
        }
    }
    for ip in &params.node_ips {
        p.node_addrs.entry(*ip).or_default().local = 1;
    }

    // Which service ports are programmed, in a stable order.
    // (The plan is recomputed whole on every change: no per-element clones or string-keyed
    // trees on the way; the output maps are built from vectors in one go.)
    let mut services: Vec<&Service> = inputs.services.to_vec();
    services
        .sort_unstable_by(|a, b| (a.namespace.as_str(), a.name.as_str()).cmp(&(b.namespace.as_str(), b.name.as_str())));
    let mut port_names = vec![];
    let mut programmed = vec![];
    for s in services {
        if s.ignored_by_proxy(params.proxy_name.as_deref()) {
            let reason = if s.service_proxy_name.as_deref() != params.proxy_name.as_deref() {
                format!("labelled service.kubernetes.io/service-proxy-name={:?}", s.service_proxy_name.as_deref())
            } else if s.service_type == ServiceType::ExternalName {
                "ExternalName (DNS only)".to_owned()
            } else {
                "headless".to_owned()
            };
            p.skipped.push(Skipped { service: service_key(s), reason, warn: false });
            continue;
        }
        for port in &s.ports {
            if proto_number(port.protocol).is_none() {
                p.skipped.push(Skipped {
                    service: format!("{}:{}", service_key(s), port.port),
                    reason: format!("protocol {:?} is not supported (TCP and UDP are)", port.protocol),
                    warn: true,
                });
                continue;
            }
            port_names.push(format!("{}/{}/{}/{:?}", s.namespace, s.name, port.name, port.protocol));
            programmed.push((s, port));
        }
    }
    let ids = assign_ids(&port_names);
    drop(port_names);

    // Slices by service.
    let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::with_capacity(inputs.slices.len());
    for sl in inputs.slices {
        if sl.address_type != AddressType::IPv4 {
            continue;
        }
        if let Some(svc) = &sl.service_name {
            slices.entry((sl.namespace.as_str(), svc.as_str())).or_default().push(sl);
        }
    }
    let mut health: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    let mut frontends: HashMap<SvcKey, SvcFrontend> = HashMap::with_capacity(programmed.len());
    let mut backends: Vec<(SvcBackendKey, SvcBackend)> = Vec::with_capacity(programmed.len() * 2);
    let mut endpoints: Vec<(Ipv4Addr, u16, u8)> = Vec::with_capacity(programmed.len() * 2);
    let mut ports: HashMap<u32, ServicePortInfo> = HashMap::with_capacity(programmed.len());

    for ((s, port), id) in programmed.into_iter().zip(ids) {
        let proto = proto_number(port.protocol).expect("filtered above");
        // Endpoint candidates of this port.
        let mut cands: BTreeMap<(Ipv4Addr, u16), Candidate> = BTreeMap::new();
        for sl in slices.get(&(s.namespace.as_str(), s.name.as_str())).into_iter().flatten() {
            let Some(ep_port) = sl.ports.iter().find(|ep| ep.name == port.name && ep.protocol == port.protocol) else {
                continue;
            };
            let Some(number) = ep_port.port else { continue };
            for ep in &sl.endpoints {
                let local = ep.node_name.as_deref() == Some(params.node_name.as_str());
                for ip in v4s(&ep.addresses) {
                    let c = Candidate {
                        ip,
                        port: number,
                        ready: ep.conditions.ready,
                        serving_terminating: ep.conditions.serving && ep.conditions.terminating,
                        local,
                    };
                    // The same address in two slices (a slice being replaced): keep the best.
                    cands
                        .entry((ip, number))
                        .and_modify(|have| {
                            have.ready |= c.ready;
                            have.serving_terminating |= c.serving_terminating;
                        })
                        .or_insert(c);
                }
            }
        }
        let all: Vec<Candidate> = cands.into_values().collect();
        let cluster = choose(&all);
        let local_all: Vec<Candidate> = all.iter().copied().filter(|c| c.local).collect();
        let local = choose(&local_all);
        for (i, c) in cluster.iter().enumerate() {
            let b = SvcBackend { ip: c.ip.octets(), port: c.port, local: u8::from(c.local), _pad: 0 };
            backends.push((SvcBackendKey { svc_id: id, ordinal: i as u32 }, b));
            endpoints.push((c.ip, c.port, proto));
        }
        for (i, c) in local.iter().enumerate() {
            let b = SvcBackend { ip: c.ip.octets(), port: c.port, local: 1, _pad: 0 };
            backends.push((SvcBackendKey { svc_id: id, ordinal: SVC_LOCAL_BASE + i as u32 }, b));
            endpoints.push((c.ip, c.port, proto));
        }
        let count = cluster.len().min(usize::from(u16::MAX)) as u16;
        let local_count = local.len().min(usize::from(u16::MAX)) as u16;
        let mut common = 0;
        let mut affinity_timeout_s = 0;
        if let SessionAffinity::ClientIP { timeout_seconds } = s.session_affinity {
            common |= svc_flags::AFFINITY;
            affinity_timeout_s = timeout_seconds;
        }
        let etp = if s.external_traffic_policy == TrafficPolicy::Local { svc_flags::ETP_LOCAL } else { 0 };
        let itp = if s.internal_traffic_policy == TrafficPolicy::Local { svc_flags::ITP_LOCAL } else { 0 };
        let mut info = ServicePortInfo {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            port_name: port.name.clone(),
            protocol: proto_name(proto),
            frontends: vec![],
        };
        let mut add = |p: &mut ServicePlan, ip: Ipv4Addr, fport: u16, flags: u32, info: &mut ServicePortInfo| {
            let k = SvcKey { ip: ip.octets(), port: fport, proto, _pad: 0 };
            if let Some(have) = frontends.get(&k) {
                if have.svc_id != id {
                    p.skipped.push(Skipped {
                        service: format!("{}:{fport}", service_key(s)),
                        reason: format!(
                            "frontend {}:{fport}/{} is already taken by {}",
                            if ip.is_unspecified() { "*".to_owned() } else { ip.to_string() },
                            proto_name(proto),
                            ports.get(&have.svc_id).map(|i| format!("{}/{}", i.namespace, i.name)).unwrap_or_default()
                        ),
                        warn: true,
                    });
                }
                return;
            }
            let fe = SvcFrontend { svc_id: id, count, local_count, flags: flags | common, affinity_timeout_s };
            frontends.insert(k, fe);
            info.frontends.push(if ip.is_unspecified() { format!("*:{fport}") } else { format!("{ip}:{fport}") });
            if count == 0 {
                if ip.is_unspecified() {
                    p.refusals.node_ports.insert((fport, proto));
                } else {
                    p.refusals.exact.insert((ip, fport, proto));
                }
            }
        };
        for ip in v4s(&s.cluster_ips) {
            add(&mut p, ip, port.port, svc_flags::CLUSTER_IP | itp, &mut info);
        }
        if matches!(s.service_type, ServiceType::NodePort | ServiceType::LoadBalancer)
            && let Some(np) = port.node_port
        {
            add(&mut p, Ipv4Addr::UNSPECIFIED, np, svc_flags::NODE_PORT | etp, &mut info);
        }
        for ip in v4s(&s.external_ips) {
            add(&mut p, ip, port.port, svc_flags::EXTERNAL_IP | etp, &mut info);
        }
        let ranges: Vec<Ipv4Net> = s
            .load_balancer_source_ranges
            .iter()
            .filter_map(|n| match n {
                IpNet::V4(v4) => Some(v4.trunc()),
                IpNet::V6(_) => None,
            })
            .collect();
        let ranges_flag = if ranges.is_empty() { 0 } else { svc_flags::SOURCE_RANGES };
        if s.service_type == ServiceType::LoadBalancer {
            for ip in v4s(&s.load_balancer_ips) {
                add(&mut p, ip, port.port, svc_flags::EXTERNAL_IP | etp | ranges_flag, &mut info);
            }
            for r in &ranges {
                p.source_ranges.insert((id, *r));
            }
        }
        ports.insert(id, info);
        if s.external_traffic_policy == TrafficPolicy::Local && s.health_check_node_port.is_some() {
            health.entry(service_key(s)).or_default().extend(local.iter().map(|c| c.ip));
        }
    }
    p.frontends = frontends.into_iter().collect();
    p.backends = backends.into_iter().collect();
    p.endpoints = endpoints.into_iter().collect();
    p.ports = ports.into_iter().collect();
    for s in inputs.services {
        if let Some(hc) = s.health_check_node_port
            && s.external_traffic_policy == TrafficPolicy::Local
            && let Some(local) = health.get(&service_key(s))
        {
            p.health_checks.insert(
                hc,
                HealthCheck { namespace: s.namespace.clone(), name: s.name.clone(), local_endpoints: local.len() },
            );
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use contiv_cluster_model::{Endpoint, EndpointConditions, EndpointPort, PortRef, ServicePort};

    fn svc(name: &str, ip: &str, ports: Vec<ServicePort>) -> Service {
        Service {
            name: name.into(),
            namespace: "default".into(),
            service_type: ServiceType::ClusterIP,
            cluster_ips: vec![ip.parse().unwrap()],
            headless: false,
            ports,
            external_ips: vec![],
            load_balancer_ips: vec![],
            session_affinity: SessionAffinity::None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            service_proxy_name: None,
            headless_label: false,
            load_balancer_source_ranges: vec![],
        }
    }

    fn port(name: &str, proto: Protocol, port: u16, target: PortRef) -> ServicePort {
        ServicePort { name: name.into(), protocol: proto, port, target_port: target, node_port: None }
    }

    fn ep(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addresses: vec![ip.parse().unwrap()],
            conditions: EndpointConditions { ready, serving, terminating },
            node_name: Some(node.into()),
            zone: None,
        }
    }

    fn slice(name: &str, svc: &str, ports: Vec<(&str, Protocol, u16)>, endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            name: name.into(),
            namespace: "default".into(),
            service_name: Some(svc.into()),
            address_type: AddressType::IPv4,
            endpoints,
            ports: ports
                .into_iter()
                .map(|(n, p, port)| EndpointPort { name: n.into(), protocol: p, port: Some(port) })
                .collect(),
        }
    }

    fn params() -> ServiceParams {
        ServiceParams { node_name: "n1".into(), proxy_name: None, node_ips: vec![Ipv4Addr::new(192, 168, 100, 11)] }
    }

    fn run(services: &[Service], slices: &[EndpointSlice]) -> ServicePlan {
        let s: Vec<&Service> = services.iter().collect();
        let sl: Vec<&EndpointSlice> = slices.iter().collect();
        plan_services(&params(), ServiceInputs { services: &s, slices: &sl, nodes: &[], registrations: &[] })
    }

    fn backends_of(p: &ServicePlan, id: u32) -> Vec<(Ipv4Addr, u16)> {
        p.backends
            .iter()
            .filter(|(k, _)| k.svc_id == id && k.ordinal < SVC_LOCAL_BASE)
            .map(|(_, b)| (Ipv4Addr::from(b.ip), b.port))
            .collect()
    }

    fn frontend(p: &ServicePlan, ip: &str, port: u16, proto: u8) -> SvcFrontend {
        let ip: Ipv4Addr = ip.parse().unwrap();
        p.frontends[&SvcKey { ip: ip.octets(), port, proto, _pad: 0 }]
    }

    #[test]
    fn named_target_port_takes_each_slices_number_and_ports_get_their_own_ids() {
        let s = svc(
            "web",
            "10.96.0.10",
            vec![
                port("http", Protocol::Tcp, 80, PortRef::Name("web".into())),
                port("dns", Protocol::Udp, 53, PortRef::Number(53)),
            ],
        );
        // Two slices: pods whose "web" port is 8080, and pods whose "web" port is 9090.
        let a = slice(
            "web-a",
            "web",
            vec![("http", Protocol::Tcp, 8080), ("dns", Protocol::Udp, 53)],
            vec![ep("10.1.1.5", "n1", true, true, false)],
        );
        let b =
            slice("web-b", "web", vec![("http", Protocol::Tcp, 9090)], vec![ep("10.1.2.7", "n2", true, true, false)]);
        let p = run(&[s], &[a, b]);
        let http = frontend(&p, "10.96.0.10", 80, IPPROTO_TCP);
        let dns = frontend(&p, "10.96.0.10", 53, IPPROTO_UDP);
        assert_ne!(http.svc_id, dns.svc_id);
        assert_eq!(
            backends_of(&p, http.svc_id),
            vec![("10.1.1.5".parse().unwrap(), 8080), ("10.1.2.7".parse().unwrap(), 9090)]
        );
        assert_eq!(backends_of(&p, dns.svc_id), vec![("10.1.1.5".parse().unwrap(), 53)]);
        assert_eq!((http.count, http.local_count), (2, 1));
        assert!(p.refusals.exact.is_empty());
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready_and_none_means_refusal() {
        let s = svc("api", "10.96.0.20", vec![port("", Protocol::Tcp, 443, PortRef::Number(6443))]);
        let sl = |eps| slice("api-x", "api", vec![("", Protocol::Tcp, 6443)], eps);
        let p = run(
            std::slice::from_ref(&s),
            &[sl(vec![ep("10.1.1.2", "n1", true, true, false), ep("10.1.1.3", "n1", false, true, true)])],
        );
        let fe = frontend(&p, "10.96.0.20", 443, IPPROTO_TCP);
        assert_eq!(backends_of(&p, fe.svc_id), vec![("10.1.1.2".parse().unwrap(), 6443)], "ready only");
        let p = run(
            std::slice::from_ref(&s),
            &[sl(vec![ep("10.1.1.2", "n1", false, false, true), ep("10.1.1.3", "n1", false, true, true)])],
        );
        let fe = frontend(&p, "10.96.0.20", 443, IPPROTO_TCP);
        assert_eq!(backends_of(&p, fe.svc_id), vec![("10.1.1.3".parse().unwrap(), 6443)], "serving-terminating");
        let p = run(std::slice::from_ref(&s), &[sl(vec![ep("10.1.1.2", "n1", false, false, false)])]);
        let fe = frontend(&p, "10.96.0.20", 443, IPPROTO_TCP);
        assert_eq!(fe.count, 0);
        assert!(p.refusals.exact.contains(&("10.96.0.20".parse().unwrap(), 443, IPPROTO_TCP)));
    }

    #[test]
    fn local_set_is_chosen_apart_and_node_ports_external_and_lb_ips_share_the_id() {
        let mut s = svc("shop", "10.96.0.30", vec![port("", Protocol::Tcp, 80, PortRef::Number(8080))]);
        s.service_type = ServiceType::LoadBalancer;
        s.ports[0].node_port = Some(30080);
        s.external_ips = vec!["198.51.100.7".parse().unwrap()];
        s.load_balancer_ips = vec!["203.0.113.50".parse().unwrap()];
        s.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
        s.external_traffic_policy = TrafficPolicy::Local;
        s.health_check_node_port = Some(32000);
        s.session_affinity = SessionAffinity::ClientIP { timeout_seconds: 60 };
        // Cluster-wide: a ready remote endpoint; locally only a terminating one.
        let sl = slice(
            "shop-1",
            "shop",
            vec![("", Protocol::Tcp, 8080)],
            vec![ep("10.1.2.9", "n2", true, true, false), ep("10.1.1.9", "n1", false, true, true)],
        );
        let p = run(&[s], &[sl]);
        let c = frontend(&p, "10.96.0.30", 80, IPPROTO_TCP);
        let np = frontend(&p, "0.0.0.0", 30080, IPPROTO_TCP);
        let ext = frontend(&p, "198.51.100.7", 80, IPPROTO_TCP);
        let lb = frontend(&p, "203.0.113.50", 80, IPPROTO_TCP);
        assert!([np.svc_id, ext.svc_id, lb.svc_id].iter().all(|id| *id == c.svc_id));
        assert_eq!(c.flags, svc_flags::CLUSTER_IP | svc_flags::AFFINITY);
        assert_eq!(np.flags, svc_flags::NODE_PORT | svc_flags::ETP_LOCAL | svc_flags::AFFINITY);
        assert_eq!(lb.flags & svc_flags::SOURCE_RANGES, svc_flags::SOURCE_RANGES);
        assert_eq!(ext.flags & svc_flags::SOURCE_RANGES, 0, "source ranges guard the load-balancer IPs");
        assert_eq!(c.affinity_timeout_s, 60);
        assert_eq!((c.count, c.local_count), (1, 1));
        assert_eq!(p.backends[&SvcBackendKey { svc_id: c.svc_id, ordinal: 0 }].ip, [10, 1, 2, 9]);
        assert_eq!(p.backends[&SvcBackendKey { svc_id: c.svc_id, ordinal: SVC_LOCAL_BASE }].ip, [10, 1, 1, 9]);
        assert!(p.source_ranges.contains(&(c.svc_id, "203.0.113.0/24".parse().unwrap())));
        assert_eq!(p.health_checks[&32000].local_endpoints, 1);
        assert_eq!(p.ports[&c.svc_id].frontends.len(), 4);
    }

    #[test]
    fn other_proxies_headless_external_name_and_sctp_are_left_out_with_reasons() {
        let mut other = svc("other", "10.96.0.40", vec![port("", Protocol::Tcp, 80, PortRef::Number(80))]);
        other.service_proxy_name = Some("someone-else".into());
        let mut headless = svc("hl", "10.96.0.41", vec![port("", Protocol::Tcp, 80, PortRef::Number(80))]);
        headless.headless = true;
        headless.cluster_ips.clear();
        let sctp = svc(
            "sig",
            "10.96.0.42",
            vec![
                port("s", Protocol::Sctp, 3868, PortRef::Number(3868)),
                port("t", Protocol::Tcp, 80, PortRef::Number(80)),
            ],
        );
        let p = run(&[other, headless, sctp], &[]);
        assert_eq!(p.frontends.len(), 1, "only sig's TCP port: {:?}", p.frontends);
        let reasons: Vec<&str> = p.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert!(reasons.iter().any(|r| r.contains("someone-else")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("headless")), "{reasons:?}");
        assert!(p.skipped.iter().any(|s| s.warn && s.reason.contains("Sctp")), "{reasons:?}");
    }

    #[test]
    fn ids_are_stable_and_collisions_take_the_next_free_value() {
        let names: Vec<String> = ["x/y/z/Udp", "a/b/c/Tcp"].iter().map(|s| s.to_string()).collect();
        let first = assign_ids(&names);
        let mut more = names.clone();
        more.insert(0, "q/r/s/Tcp".into());
        let second = assign_ids(&more);
        assert_eq!(first[1], second[2], "a/b/c/Tcp keeps its id");
        assert_eq!(first[0], second[1], "x/y/z/Udp keeps its id");
        assert!(second.iter().all(|id| *id != 0 && *id < SVC_LOCAL_BASE));
        let set: BTreeSet<u32> = second.iter().copied().collect();
        assert_eq!(set.len(), 3);
        // Equal names share an id.
        assert_eq!(assign_ids(&["a".into(), "b".into(), "a".into()]).iter().collect::<BTreeSet<_>>().len(), 2);
        // Two names with the same hash: the one that sorts first keeps it, in any input order.
        let (a, b) = ("ns/svc-268724/http/Tcp".to_string(), "ns/svc-698200/http/Tcp".to_string());
        assert_eq!(fnv1a(a.as_bytes()) & 0x7fff_ffff, 2_069_169_110);
        assert_eq!(fnv1a(b.as_bytes()) & 0x7fff_ffff, 2_069_169_110);
        assert_eq!(assign_ids(&[b.clone(), a.clone()]), vec![2_069_169_111, 2_069_169_110]);
        assert_eq!(assign_ids(&[a, b]), vec![2_069_169_110, 2_069_169_111]);
    }

    #[test]
    fn node_addresses_come_from_registrations_nodes_and_the_node_itself() {
        let reg = |name: &str, ip: &str| NodeRegistration {
            name: name.into(),
            id: 1,
            addresses: vec![],
            pod_cidr: "10.1.1.0/24".parse().unwrap(),
            uplink_ip: Some(ip.parse().unwrap()),
        };
        let regs = [reg("n1", "192.168.100.11"), reg("n2", "192.168.100.12")];
        let r: Vec<&NodeRegistration> = regs.iter().collect();
        let p = plan_services(&params(), ServiceInputs { services: &[], slices: &[], nodes: &[], registrations: &r });
        assert_eq!(p.node_addrs[&"192.168.100.11".parse().unwrap()].local, 1);
        assert_eq!(p.node_addrs[&"192.168.100.12".parse().unwrap()].local, 0);
    }

    /// Not a benchmark (bench services measures programming latency): where a plan of 10,000
    /// services spends its time. `cargo test --release -p contiv-agent plan_10k -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing probe, run by hand in release mode"]
    fn plan_10k() {
        let services: Vec<Service> = (0..10_000u32)
            .map(|i| {
                let ip = Ipv4Addr::from(0x0a60_0000 + i).to_string();
                svc(&format!("svc-{i}"), &ip, vec![port("", Protocol::Tcp, 80, PortRef::Number(8080))])
            })
            .collect();
        let slices: Vec<EndpointSlice> = (0..10_000u32)
            .map(|i| {
                let eps = (2..4).map(|j| ep(&format!("10.1.{}.{j}", i % 200), "n1", true, true, false)).collect();
                slice(&format!("svc-{i}-abc"), &format!("svc-{i}"), vec![("", Protocol::Tcp, 8080)], eps)
            })
            .collect();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let p = run(&services, &slices);
            let planned = t.elapsed();
            assert_eq!(p.frontends.len(), 10_000);
            let t = std::time::Instant::now();
            drop(p);
            eprintln!("plan: {planned:?}, drop {:?}", t.elapsed());
        }
    }
}
