//! A pod's `hostPort`s, served by the service datapath.
//!
//! Each container port with a `hostPort` of a pod attached on this node becomes a service
//! of its own, fed to the service planner beside the cluster's Services: its frontends are
//! `hostPort` on each of this node's addresses (or on `hostIP` alone), its one backend is the
//! pod's address and container port, and its traffic policy is Local (the client's address
//! is kept). What that gives, with no rule in the node's stack:
//! - clients outside the node (other nodes, their pods, the outside) are translated by
//!   `tc_from_uplink` and their replies translated back from conntrack, TCP and UDP alike;
//! - pods and processes of this node are translated at `connect()` (TCP) or by
//!   `tc_from_pod` (UDP), a pod reaching its own hostPort included (hairpin);
//! - the pod's NetworkPolicy ingress rules see the real client, as for any service.
//!
//! Frontends are exact node addresses, never the "every node address" wildcard of a
//! NodePort: a pod on node B reaching node A's address must reach A's pod, even when B runs
//! a pod with the same hostPort (a DaemonSet). `127.0.0.1:hostPort` is not served here; the
//! `portmap` plugin chained after contiv-cni (deploy/) still serves it, and everything
//! else when services are off.
//!
//! The services are named `hostPort:<pod>:<port>:<protocol>` (with `<hostIP>:` before the
//! port for one bound to an address) in the pod's namespace: no
//! Service can have that name (a Service name is a DNS label), so the two never collide.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use contiv_cluster_model::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Node, Pod, PortRef, Protocol, Service,
    ServicePort, ServiceType, SessionAffinity, TrafficPolicy,
};
use contiv_node_registry::NodeRegistration;

use crate::services::{ServiceSource, SvcName};

/// The hostPort services of this node, by name.
pub type HostPortServices = BTreeMap<SvcName, (Service, EndpointSlice)>;

const PREFIX: &str = "hostPort:";

/// Whether a service name is one of ours.
pub fn is_host_port_service(name: &str) -> bool {
    name.starts_with(PREFIX)
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// The hostPort services of `pods` (each with the address this node gave it).
/// `node_addrs`: this node's addresses, where a hostPort without `hostIP` is served; a
/// `hostIP` that is not one of them is not served (its traffic never reaches this node,
/// and a frontend on another node's address would capture this node's traffic to it).
/// `proxy_name`: the service proxy name this agent answers to (the services carry it, so
/// hostPorts are served whichever Services the agent serves).
pub fn host_port_services<'a>(
    node_name: &str,
    proxy_name: Option<&str>,
    node_addrs: &[Ipv4Addr],
    pods: impl IntoIterator<Item = (&'a Pod, Ipv4Addr)>,
) -> HostPortServices {
    // One address per pod: a pod name may have two attachments for a moment (a pod
    // deleted and created again under its name before the old sandbox's DEL); the one the
    // Pod object lists is the pod's.
    let mut chosen: BTreeMap<(&str, &str), (&Pod, Ipv4Addr)> = BTreeMap::new();
    for (pod, ip) in pods {
        let listed = |ip: Ipv4Addr| pod.ips.contains(&IpAddr::V4(ip));
        match chosen.entry((pod.namespace.as_str(), pod.name.as_str())) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((pod, ip));
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                if listed(ip) && !listed(o.get().1) {
                    o.insert((pod, ip));
                }
            }
        }
    }
    let mut out = HostPortServices::new();
    for (pod, ip) in chosen.into_values() {
        if pod.host_network {
            continue;
        }
        for cp in &pod.container_ports {
            let Some(host_port) = cp.host_port else { continue };
            let addrs: Vec<IpAddr> = match cp.host_ip {
                None => node_addrs.iter().copied().map(IpAddr::V4).collect(),
                Some(IpAddr::V4(a)) if node_addrs.contains(&a) => vec![IpAddr::V4(a)],
                Some(_) => continue,
            };
            if addrs.is_empty() {
                continue;
            }
            let proto = protocol_name(cp.protocol);
            // Two hostPorts of a pod may differ by hostIP alone (the API keys them on all
            // three): the address then names the service too.
            let name = match cp.host_ip {
                Some(a) => format!("{PREFIX}{}:{a}:{host_port}:{proto}", pod.name),
                None => format!("{PREFIX}{}:{host_port}:{proto}", pod.name),
            };
            let port_name = String::new();
            let service = Service {
                name: name.clone(),
                namespace: pod.namespace.clone(),
                service_type: ServiceType::ClusterIP,
                cluster_ips: vec![],
                headless: false,
                ports: vec![ServicePort {
                    name: port_name.clone(),
                    protocol: cp.protocol,
                    port: host_port,
                    target_port: PortRef::Number(cp.port),
                    node_port: None,
                }],
                external_ips: addrs,
                load_balancer_ips: vec![],
                session_affinity: SessionAffinity::None,
                external_traffic_policy: TrafficPolicy::Local,
                internal_traffic_policy: TrafficPolicy::Cluster,
                health_check_node_port: None,
                service_proxy_name: proxy_name.map(str::to_owned),
                headless_label: false,
                load_balancer_source_ranges: vec![],
            };
            let slice = EndpointSlice {
                name: name.clone(),
                namespace: pod.namespace.clone(),
                service_name: Some(name.clone()),
                address_type: AddressType::IPv4,
                endpoints: vec![Endpoint {
                    addresses: vec![IpAddr::V4(ip)],
                    conditions: EndpointConditions { ready: true, serving: true, terminating: false },
                    node_name: Some(node_name.to_owned()),
                    zone: None,
                    hints_for_zones: vec![],
                    hints_for_nodes: vec![],
                }],
                ports: vec![EndpointPort { name: port_name, protocol: cp.protocol, port: Some(cp.port) }],
                last_change_trigger_time: None,
            };
            out.insert((pod.namespace.clone(), name), (service, slice));
        }
    }
    out
}

/// Names whose service differs between `old` and `new` (added, removed or changed).
pub fn changed(old: &HostPortServices, new: &HostPortServices) -> Vec<SvcName> {
    let mut out: Vec<SvcName> = old.iter().filter(|(k, v)| new.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect();
    out.extend(new.keys().filter(|k| !old.contains_key(*k)).cloned());
    out
}

/// The cluster's services with this node's hostPort services beside them.
pub struct WithHostPorts<'a, S> {
    pub cluster: &'a S,
    pub host_ports: &'a HostPortServices,
}

impl<S: ServiceSource> ServiceSource for WithHostPorts<'_, S> {
    fn all_services(&self) -> Vec<&Service> {
        let mut all = self.cluster.all_services();
        all.extend(self.host_ports.values().map(|(s, _)| s));
        all
    }
    fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        if is_host_port_service(name) {
            return self.host_ports.get(&(namespace.to_owned(), name.to_owned())).map(|(s, _)| s);
        }
        self.cluster.service(namespace, name)
    }
    fn slices_of(&self, namespace: &str, name: &str) -> Vec<&EndpointSlice> {
        if is_host_port_service(name) {
            return self
                .host_ports
                .get(&(namespace.to_owned(), name.to_owned()))
                .map(|(_, sl)| sl)
                .into_iter()
                .collect();
        }
        self.cluster.slices_of(namespace, name)
    }
    fn nodes(&self) -> Vec<&Node> {
        self.cluster.nodes()
    }
    fn registrations(&self) -> Vec<&NodeRegistration> {
        self.cluster.registrations()
    }
}

#[cfg(test)]
mod tests {
    use contiv_cluster_model::{ContainerPort, Labels};
    use contiv_common::{SVC_LOCAL_BASE, SvcKey, svc_flags};

    use super::*;
    use crate::services::{ServiceChanges, ServiceParams, ServicePlan, ServicePlanner};

    /// A cluster with no Services of its own.
    struct Empty;

    impl ServiceSource for Empty {
        fn all_services(&self) -> Vec<&Service> {
            vec![]
        }
        fn service(&self, _: &str, _: &str) -> Option<&Service> {
            None
        }
        fn slices_of(&self, _: &str, _: &str) -> Vec<&EndpointSlice> {
            vec![]
        }
        fn nodes(&self) -> Vec<&Node> {
            vec![]
        }
        fn registrations(&self) -> Vec<&NodeRegistration> {
            vec![]
        }
    }

    const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 11);
    const OTHER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

    fn port(protocol: Protocol, port: u16, host_port: Option<u16>, host_ip: Option<&str>) -> ContainerPort {
        ContainerPort { name: None, protocol, port, host_port, host_ip: host_ip.map(|a| a.parse().unwrap()) }
    }

    fn pod(name: &str, ports: Vec<ContainerPort>) -> Pod {
        Pod {
            name: name.into(),
            namespace: "default".into(),
            labels: Labels::new(),
            ips: vec![],
            node_name: Some("n1".into()),
            host_network: false,
            container_ports: ports,
        }
    }

    fn params() -> ServiceParams {
        ServiceParams {
            node_name: "n1".into(),
            proxy_name: None,
            node_ips: vec![NODE_IP, OTHER_ADDR],
            node_ports: Default::default(),
        }
    }

    fn services(pods: &[(Pod, Ipv4Addr)]) -> HostPortServices {
        host_port_services("n1", None, &[NODE_IP, OTHER_ADDR], pods.iter().map(|(p, ip)| (p, *ip)))
    }

    fn plan(hp: &HostPortServices) -> ServicePlan {
        let mut planner = ServicePlanner::new(params());
        planner.update(&WithHostPorts { cluster: &Empty, host_ports: hp }, &ServiceChanges::everything());
        planner.into_plan()
    }

    #[test]
    fn a_host_port_is_an_exact_frontend_on_each_node_address_with_the_pod_as_its_local_backend() {
        let web = pod(
            "web",
            vec![
                port(Protocol::Tcp, 80, Some(8080), None),
                port(Protocol::Udp, 53, Some(5353), None),
                port(Protocol::Tcp, 9090, None, None),
            ],
        );
        let hp = services(&[(web, Ipv4Addr::new(10, 1, 1, 5))]);
        assert_eq!(hp.len(), 2);
        let p = plan(&hp);
        let mut got: Vec<(Ipv4Addr, u16, u8)> =
            p.frontends.keys().map(|k| (Ipv4Addr::from(k.ip), k.port, k.proto)).collect();
        got.sort();
        assert_eq!(
            got,
            vec![(OTHER_ADDR, 5353, 17), (OTHER_ADDR, 8080, 6), (NODE_IP, 5353, 17), (NODE_IP, 8080, 6)],
            "never the every-address wildcard of a NodePort"
        );
        let fe = p.frontends[&SvcKey { ip: NODE_IP.octets(), port: 8080, proto: 6, _pad: 0 }];
        assert_eq!(fe.flags, svc_flags::EXTERNAL_IP | svc_flags::ETP_LOCAL, "the client address is kept");
        assert_eq!((fe.count, fe.local_count), (1, 1));
        let backends: Vec<(u32, [u8; 4], u16)> =
            p.backends.iter().filter(|(k, _)| k.svc_id == fe.svc_id).map(|(k, b)| (k.ordinal, b.ip, b.port)).collect();
        assert_eq!(backends, vec![(0, [10, 1, 1, 5], 80), (SVC_LOCAL_BASE, [10, 1, 1, 5], 80)]);
        let info = &p.ports[&fe.svc_id];
        assert_eq!((info.namespace.as_str(), info.name.as_str()), ("default", "hostPort:web:8080:TCP"));
        assert!(p.skipped.is_empty(), "{:?}", p.skipped);
    }

    #[test]
    fn of_two_attachments_under_one_pod_name_the_address_the_pod_lists_is_the_backend() {
        let mut web = pod("web", vec![port(Protocol::Tcp, 80, Some(8080), None)]);
        web.ips = vec![IpAddr::V4(Ipv4Addr::new(10, 1, 1, 9))];
        for order in [[5, 9], [9, 5]] {
            let pods: Vec<(Pod, Ipv4Addr)> = order.iter().map(|&d| (web.clone(), Ipv4Addr::new(10, 1, 1, d))).collect();
            let hp = services(&pods);
            let backends: Vec<IpAddr> = hp.values().flat_map(|(_, sl)| sl.endpoints[0].addresses.clone()).collect();
            assert_eq!(backends, vec![IpAddr::V4(Ipv4Addr::new(10, 1, 1, 9))], "attachments in order {order:?}");
        }
    }

    #[test]
    fn host_ip_narrows_the_frontends_to_that_node_address_and_other_addresses_are_not_served() {
        let pods = [
            (pod("a", vec![port(Protocol::Tcp, 80, Some(80), Some("10.9.0.1"))]), Ipv4Addr::new(10, 1, 1, 5)),
            // Another node's address: never a frontend here.
            (pod("b", vec![port(Protocol::Tcp, 80, Some(81), Some("192.168.100.12"))]), Ipv4Addr::new(10, 1, 1, 6)),
            (pod("c", vec![port(Protocol::Tcp, 80, Some(82), Some("fd00::1"))]), Ipv4Addr::new(10, 1, 1, 7)),
        ];
        let mut host_network = pod("d", vec![port(Protocol::Tcp, 80, Some(83), None)]);
        host_network.host_network = true;
        let mut all = pods.to_vec();
        all.push((host_network, NODE_IP));
        let p = plan(&services(&all));
        let got: Vec<(Ipv4Addr, u16)> = p.frontends.keys().map(|k| (Ipv4Addr::from(k.ip), k.port)).collect();
        assert_eq!(got, vec![(OTHER_ADDR, 80)]);
    }

    #[test]
    fn host_ports_that_differ_by_host_ip_alone_are_both_served() {
        let (node, other) = (NODE_IP.to_string(), OTHER_ADDR.to_string());
        let web = pod(
            "web",
            vec![port(Protocol::Tcp, 80, Some(8080), Some(&node)), port(Protocol::Tcp, 81, Some(8080), Some(&other))],
        );
        let hp = services(&[(web, Ipv4Addr::new(10, 1, 1, 5))]);
        let mut names: Vec<&str> = hp.keys().map(|(_, n)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, [format!("hostPort:web:{other}:8080:TCP"), format!("hostPort:web:{node}:8080:TCP")]);
        let p = plan(&hp);
        let target = |addr: Ipv4Addr| {
            let fe = p.frontends[&SvcKey { ip: addr.octets(), port: 8080, proto: 6, _pad: 0 }];
            p.backends.iter().find(|(k, _)| k.svc_id == fe.svc_id).map(|(_, b)| b.port)
        };
        assert_eq!((target(NODE_IP), target(OTHER_ADDR)), (Some(80), Some(81)));
    }

    #[test]
    fn changes_name_what_came_went_or_differs_and_the_planner_follows_them() {
        let ip = Ipv4Addr::new(10, 1, 1, 5);
        let a = pod("a", vec![port(Protocol::Tcp, 80, Some(8080), None)]);
        let b = pod("b", vec![port(Protocol::Udp, 53, Some(53), None)]);
        let before = services(&[(a.clone(), ip), (b.clone(), Ipv4Addr::new(10, 1, 1, 6))]);
        // a moved to another address, b left, c came.
        let c = pod("c", vec![port(Protocol::Tcp, 22, Some(2222), None)]);
        let after = services(&[(a, Ipv4Addr::new(10, 1, 1, 9)), (c, Ipv4Addr::new(10, 1, 1, 7))]);
        let mut names: Vec<String> = changed(&before, &after).into_iter().map(|(_, n)| n).collect();
        names.sort();
        assert_eq!(names, ["hostPort:a:8080:TCP", "hostPort:b:53:UDP", "hostPort:c:2222:TCP"]);
        assert!(changed(&after, &after).is_empty());

        // Applied as a change, the kept plan equals the plan computed whole.
        let mut planner = ServicePlanner::new(params());
        planner.update(&WithHostPorts { cluster: &Empty, host_ports: &before }, &ServiceChanges::everything());
        let changes = ServiceChanges { services: changed(&before, &after).into_iter().collect(), ..Default::default() };
        planner.update(&WithHostPorts { cluster: &Empty, host_ports: &after }, &changes);
        assert_eq!(planner.into_plan(), plan(&after));
        let ports: Vec<u16> = plan(&after).frontends.keys().map(|k| k.port).collect();
        assert_eq!(ports, [2222, 8080, 2222, 8080]);
    }
}
