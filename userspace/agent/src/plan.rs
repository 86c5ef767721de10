//! Desired state -> plan: what the node's dataplane must hold, as a pure function of the
//! node's configuration, its pod attachments and the cluster model (node registrations).
//!
//! No I/O happens here; [`crate::apply`] installs the difference between a plan and what
//! the kernel holds. Each section of a [`Plan`] is keyed the way its backend stores it, so
//! the difference is a plain map diff:
//!
//! | section | backend | key |
//! |---|---|---|
//! | `config` | CONFIG map | (one entry) |
//! | `pods`, `pod_ifaces` | PODS / POD_IFACES maps | pod IP / host ifindex |
//! | `remote_routes` | REMOTE_ROUTES LPM map | prefix |
//! | `host_routes` | kernel routes (protocol `contiv`) | destination prefix |
//! | `host_neighbours` | kernel neighbour table | (ifindex, address) |
//! | `masquerade` | nftables table `ip contiv` | (one rule set) |
//! | `policy` | POLICY LPM map (+ isolation bits in the pods' entries) | (pod, direction, peer prefix) |
//! | `netns` | NODE_NETNS map | network-namespace cookie (the node's and its pods') |
//!
//! Services have a plan of their own ([`crate::services`]), computed from the cluster
//! model and applied by its own task, so a pod ADD never diffs ten thousand services.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use contiv_common::{DatapathConfig, PodEndpoint, PolicyPorts, RemoteRoute, config_flags, pod_flags, route_flags};
use contiv_node_registry::NodeRegistration;
use ipnet::Ipv4Net;

use crate::{
    policy::{CompiledPolicy, PolicyEntryKey},
    state::PodAttachment,
};

/// What the plan needs to know about the node itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeParams {
    pub node_name: String,
    /// VPP mode: the host's address in the pod subnet (vpp_host.rs), one of the node's
    /// addresses; no pod holds it.
    pub host_pod_address: Option<Ipv4Addr>,
    pub gateway_ip: Ipv4Addr,
    pub gateway_mac: [u8; 6],
    pub pod_subnet: Ipv4Net,
    /// The cluster's whole pod range (all nodes' subnets), for masquerading.
    pub cluster_pod_cidr: Ipv4Net,
    /// Host end of the slow-path port (0 = none).
    pub slowport_ifindex: u32,
    /// The overlay, when the node has an uplink.
    pub overlay: Option<OverlayParams>,
    /// Masquerade pod traffic leaving the cluster through this uplink.
    pub masquerade_uplink: Option<String>,
    /// `uplink = "vpp"`: VPP owns the wire; pods' traffic that is not for a local pod goes to
    /// the slow-path port (VPP). No overlay, no masquerade (VPP's NAT44-ED) on this node.
    pub vpp_uplink: bool,
    /// The uplink's ifindex (replies to clients outside leave by it; 0 = none).
    pub uplink_ifindex: u32,
    /// The cookie of the node's own network namespace (0 = unknown).
    pub netns_cookie: u64,
    /// The monitor's event rate and burst per CPU, and whether allowed new flows are
    /// monitored too (`[monitor]`).
    pub monitor: crate::config::MonitorConfig,
    /// The node's own `127.0.0.1:<nodePort>` is balanced (`[services] nodePortAddresses`
    /// takes the loopback address, as it does by default).
    pub loopback_node_ports: bool,
    /// The conntrack UDP timeout (`[services] timeouts.udp`): how long an unconnected UDP
    /// socket of the node keeps its backend for a service address it sends nothing to.
    pub udp_timeout_s: u32,
}

/// NODE_NETNS value of a pod's namespace.
pub const NETNS_POD: u8 = 1;
/// NODE_NETNS value of the node's own namespace.
pub const NETNS_NODE: u8 = 2;

/// The node's overlay device and underlay address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayParams {
    pub ifindex: u32,
    pub vni: u32,
    pub node_ip: Ipv4Addr,
    /// MTU of routes into the overlay (the pods' path MTU).
    pub mtu: u32,
    /// The device's UDP port: pods' own UDP to it is dropped, and the datapath builds
    /// outer headers with it on pods' packets unless `device_encap`.
    pub port: u16,
    /// `overlayEncap = "device"`: the device builds them.
    pub device_encap: bool,
}

/// A kernel route the agent owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostRoute {
    pub ifindex: u32,
    /// Preferred source address (the node's underlay address for overlay routes).
    pub src: Option<Ipv4Addr>,
    /// Route MTU (0: the device's).
    pub mtu: u32,
}

/// The nftables masquerade rule for pod traffic leaving the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masquerade {
    pub cluster_pod_cidr: Ipv4Net,
    pub uplink: String,
}

/// Everything the node's dataplane must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub config: DatapathConfig,
    pub pods: BTreeMap<Ipv4Addr, PodEndpoint>,
    pub pod_ifaces: BTreeMap<u32, PodEndpoint>,
    pub remote_routes: BTreeMap<Ipv4Net, RemoteRoute>,
    pub host_routes: BTreeMap<Ipv4Net, HostRoute>,
    pub host_neighbours: BTreeMap<(u32, Ipv4Addr), [u8; 6]>,
    pub masquerade: Option<Masquerade>,
    pub netns: BTreeMap<u64, u8>,
    /// NetworkPolicy entries; `None` while the cluster model is not known yet (after a
    /// restart, before the store answered): what is installed stays, isolation included.
    pub policy: Option<BTreeMap<PolicyEntryKey, PolicyPorts>>,
}

/// Adds the compiled NetworkPolicy to a plan: its entries, and the isolation bits of the
/// pods it isolates (on both of their endpoint entries).
pub fn add_policy(plan: &mut Plan, compiled: CompiledPolicy) {
    for ep in plan.pods.values_mut().chain(plan.pod_ifaces.values_mut()) {
        ep.flags = (ep.flags & !pod_flags::ISOLATION)
            | compiled.isolation.get(&std::net::Ipv4Addr::from(ep.ip)).copied().unwrap_or(0);
    }
    // Entries of pods that are not (or no longer) wired here would never be read.
    let mut entries = compiled.entries;
    entries.retain(|k, _| plan.pods.contains_key(&k.pod));
    plan.policy = Some(entries);
}

/// The pod's entry in PODS / POD_IFACES.
pub fn endpoint(a: &PodAttachment) -> PodEndpoint {
    let mut flags = 0;
    if let Some(b) = a.bandwidth {
        if b.egress_limited() {
            flags |= pod_flags::EGRESS_LIMITED;
        }
        if b.ingress_limited() {
            flags |= pod_flags::INGRESS_LIMITED;
        }
    }
    PodEndpoint {
        ip: a.ip.octets(),
        host_ifindex: a.host_ifindex,
        mac: crate::config::parse_mac(&a.pod_mac).unwrap_or_default(),
        flags,
        _pad: 0,
    }
}

/// The node's plan. `attachments`: the pods wired on this node (only complete ones count);
/// `registrations`: the live nodes of the cluster (this one included, or not).
pub fn plan<'a>(
    node: &NodeParams,
    attachments: impl IntoIterator<Item = &'a PodAttachment>,
    registrations: impl IntoIterator<Item = &'a NodeRegistration>,
) -> Plan {
    let mut p = Plan {
        config: DatapathConfig {
            gateway_ip: node.gateway_ip.octets(),
            slowport_ifindex: node.slowport_ifindex,
            gateway_mac: node.gateway_mac,
            pod_subnet: node.pod_subnet.network().octets(),
            pod_mask: node.pod_subnet.netmask().octets(),
            overlay_ifindex: node.overlay.as_ref().map_or(0, |o| o.ifindex),
            vni: node.overlay.as_ref().map_or(0, |o| o.vni),
            node_ip: node.overlay.as_ref().map_or([0; 4], |o| o.node_ip.octets()),
            // VPP mode: its tunnels' port, so that the pods' own VXLAN packets are dropped
            // as in kernel mode (nothing else reads it there: no overlay device).
            overlay_port: node
                .overlay
                .as_ref()
                .map_or(if node.vpp_uplink { contiv_vpp_backend::desired::VXLAN_PORT } else { 0 }, |o| o.port),
            flags: if node.vpp_uplink { config_flags::VPP_UPLINK } else { 0 }
                | if node.monitor.flows { config_flags::MONITOR_FLOWS } else { 0 }
                | if node.loopback_node_ports { 0 } else { config_flags::NO_LOOPBACK_NODE_PORTS }
                | if node.overlay.as_ref().is_some_and(|o| o.device_encap) { config_flags::DEVICE_ENCAP } else { 0 },
            uplink_ifindex: node.uplink_ifindex,
            monitor_rate: node.monitor.rate,
            monitor_burst: node.monitor.burst,
            cluster_pod_net: node.cluster_pod_cidr.network().octets(),
            cluster_pod_mask: node.cluster_pod_cidr.netmask().octets(),
            udp_sticky_s: node.udp_timeout_s,
            _pad2: 0,
        },
        ..Default::default()
    };
    if node.netns_cookie != 0 {
        p.netns.insert(node.netns_cookie, NETNS_NODE);
    }

    for a in attachments.into_iter().filter(|a| a.complete && a.host_ifindex != 0) {
        let ep = endpoint(a);
        p.pods.insert(a.ip, ep);
        p.pod_ifaces.insert(a.host_ifindex, ep);
        // The host reaches its pods (kubelet probes, replies to what pods send it) through
        // their veths, without ARP: the pod's MAC is known.
        let host_route = Ipv4Net::new(a.ip, 32).expect("a /32 is valid");
        p.host_routes.insert(host_route, HostRoute { ifindex: a.host_ifindex, src: None, mtu: 0 });
        p.host_neighbours.insert((a.host_ifindex, a.ip), ep.mac);
        if a.netns_cookie != 0 && a.netns_cookie != node.netns_cookie {
            p.netns.insert(a.netns_cookie, NETNS_POD);
        }
    }

    if let Some(overlay) = &node.overlay {
        let mut seen_subnets = BTreeSet::new();
        for r in registrations.into_iter().filter(|r| r.name != node.node_name) {
            let (Some(node_ip), ipnet::IpNet::V4(subnet)) = (r.uplink_ip, r.pod_cidr) else {
                continue;
            };
            if node_ip == overlay.node_ip || subnet.contains(&node.pod_subnet.network()) {
                // A registration claiming our own address or subnet (a stale record of this
                // node under another name): never route our own traffic away.
                continue;
            }
            let subnet = subnet.trunc();
            if !seen_subnets.insert(subnet) {
                continue;
            }
            let to = RemoteRoute { node_ip: node_ip.octets(), flags: 0 };
            p.remote_routes.insert(subnet, to);
            p.remote_routes.insert(
                Ipv4Net::new(node_ip, 32).expect("a /32 is valid"),
                RemoteRoute { node_ip: node_ip.octets(), flags: route_flags::NODE_ADDRESS },
            );
            // Host -> remote pods: into the overlay device, whose egress program sets the key.
            p.host_routes
                .insert(subnet, HostRoute { ifindex: overlay.ifindex, src: Some(overlay.node_ip), mtu: overlay.mtu });
        }
    }

    p.masquerade = node
        .masquerade_uplink
        .as_ref()
        .map(|uplink| Masquerade { cluster_pod_cidr: node.cluster_pod_cidr, uplink: uplink.clone() });
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandwidth::BandwidthLimits;

    fn node(overlay: bool) -> NodeParams {
        NodeParams {
            host_pod_address: None,
            node_name: "n1".into(),
            gateway_ip: Ipv4Addr::new(10, 1, 1, 1),
            gateway_mac: [2, 0xfe, 0, 0, 0, 1],
            pod_subnet: "10.1.1.0/24".parse().unwrap(),
            cluster_pod_cidr: "10.1.0.0/16".parse().unwrap(),
            slowport_ifindex: 3,
            overlay: overlay.then(|| OverlayParams {
                ifindex: 4,
                vni: 7,
                node_ip: Ipv4Addr::new(192, 168, 100, 11),
                mtu: 1450,
                port: 4789,
                device_encap: false,
            }),
            masquerade_uplink: overlay.then(|| "eth0".to_owned()),
            vpp_uplink: false,
            uplink_ifindex: 0,
            netns_cookie: 0,
            monitor: Default::default(),
            loopback_node_ports: true,
            udp_timeout_s: 60,
        }
    }

    fn pod(n: u8, complete: bool) -> PodAttachment {
        PodAttachment {
            container_id: format!("c{n}"),
            ifname: "eth0".into(),
            netns: format!("/run/netns/p{n}"),
            network_name: "contiv".into(),
            ip: Ipv4Addr::new(10, 1, 1, n),
            host_ifname: format!("cv{n}"),
            host_ifindex: 100 + u32::from(n),
            host_mac: "02:00:00:00:00:01".into(),
            pod_mac: format!("02:00:00:00:01:{n:02x}"),
            complete,
            mtu: 1450,
            dns: Default::default(),
            pod_namespace: "default".into(),
            pod_name: format!("p{n}"),
            bandwidth: None,
            netns_cookie: 0,
        }
    }

    fn reg(name: &str, id: u8, node_ip: Option<[u8; 4]>) -> NodeRegistration {
        NodeRegistration {
            name: name.into(),
            id: u32::from(id),
            addresses: vec![],
            pod_cidr: format!("10.1.{id}.0/24").parse().unwrap(),
            uplink_ip: node_ip.map(Ipv4Addr::from),
        }
    }

    #[test]
    fn complete_pods_get_map_entries_a_host_route_and_a_neighbour() {
        let pods = [pod(5, true), pod(6, false)];
        let p = plan(&node(false), &pods, &[]);
        assert_eq!(p.pods.len(), 1, "an unfinished ADD is not in the datapath");
        let ep = p.pods[&Ipv4Addr::new(10, 1, 1, 5)];
        assert_eq!(ep.host_ifindex, 105);
        assert_eq!(ep.mac, [2, 0, 0, 0, 1, 5]);
        assert_eq!(p.pod_ifaces[&105], ep);
        assert_eq!(
            p.host_routes[&"10.1.1.5/32".parse::<Ipv4Net>().unwrap()],
            HostRoute { ifindex: 105, src: None, mtu: 0 }
        );
        assert_eq!(p.host_neighbours[&(105, Ipv4Addr::new(10, 1, 1, 5))], [2, 0, 0, 0, 1, 5]);
        assert_eq!(p.config.pod_subnet, [10, 1, 1, 0]);
        assert_eq!(p.config.pod_mask, [255, 255, 255, 0]);
        assert_eq!((p.config.cluster_pod_net, p.config.cluster_pod_mask), ([10, 1, 0, 0], [255, 255, 0, 0]));
        assert_eq!(p.config.udp_sticky_s, 60);
        assert_eq!(p.config.overlay_ifindex, 0);
        assert!(p.masquerade.is_none());
    }

    #[test]
    fn bandwidth_limits_become_endpoint_flags() {
        let mut a = pod(5, true);
        a.bandwidth = Some(BandwidthLimits { ingress_rate: 1_000_000, ..Default::default() });
        let p = plan(&node(false), [&a], &[]);
        assert_eq!(p.pods[&a.ip].flags, pod_flags::INGRESS_LIMITED);
    }

    #[test]
    fn remote_nodes_get_overlay_routes_and_we_never_route_to_ourselves() {
        let regs = [
            reg("n1", 1, Some([192, 168, 100, 11])), // this node
            reg("n2", 2, Some([192, 168, 100, 12])),
            reg("n3", 3, None),                         // no uplink address: unreachable
            reg("stale", 1, Some([192, 168, 100, 99])), // claims our subnet
        ];
        let p = plan(&node(true), &[], &regs);
        let subnet: Ipv4Net = "10.1.2.0/24".parse().unwrap();
        assert_eq!(p.remote_routes.len(), 2, "{:?}", p.remote_routes);
        assert_eq!(p.remote_routes[&subnet], RemoteRoute { node_ip: [192, 168, 100, 12], flags: 0 });
        assert_eq!(p.remote_routes[&"192.168.100.12/32".parse::<Ipv4Net>().unwrap()].flags, route_flags::NODE_ADDRESS);
        assert_eq!(
            p.host_routes[&subnet],
            HostRoute { ifindex: 4, src: Some(Ipv4Addr::new(192, 168, 100, 11)), mtu: 1450 }
        );
        assert_eq!(p.config.overlay_ifindex, 4);
        assert_eq!(p.config.vni, 7);
        assert_eq!(p.config.node_ip, [192, 168, 100, 11]);
        assert_eq!(p.config.overlay_port, 4789, "the programs build the outer UDP header for the device's port");
        assert_eq!(p.config.flags & config_flags::DEVICE_ENCAP, 0);
        let mut device = node(true);
        device.overlay.as_mut().unwrap().device_encap = true;
        let d = plan(&device, &[], &[]);
        assert_eq!(d.config.overlay_port, 4789, "the device builds them; the port is still the overlay's");
        assert_eq!(d.config.flags & config_flags::DEVICE_ENCAP, config_flags::DEVICE_ENCAP);
        assert_eq!(
            p.masquerade,
            Some(Masquerade { cluster_pod_cidr: "10.1.0.0/16".parse().unwrap(), uplink: "eth0".into() })
        );
    }

    #[test]
    fn policy_sets_isolation_bits_on_both_endpoint_entries_and_keeps_only_local_pods_entries() {
        use crate::policy::{CompiledPolicy, PolicyEntryKey};
        let mut a = pod(5, true);
        a.bandwidth = Some(BandwidthLimits { ingress_rate: 1_000_000, ..Default::default() });
        let pods = [a, pod(6, true)];
        let mut p = plan(&node(false), &pods, &[]);
        assert_eq!(p.policy, None, "unknown until the model is loaded");
        let key = |n: u8| PolicyEntryKey {
            pod: Ipv4Addr::new(10, 1, 1, n),
            direction: contiv_common::policy_dir::INGRESS,
            peer: "10.0.0.0/8".parse().unwrap(),
        };
        let compiled = CompiledPolicy {
            isolation: [(Ipv4Addr::new(10, 1, 1, 5), pod_flags::INGRESS_ISOLATED)].into(),
            entries: [(key(5), PolicyPorts::default()), (key(9), PolicyPorts::default())].into(),
            problems: vec![],
        };
        add_policy(&mut p, compiled);
        let want = pod_flags::INGRESS_LIMITED | pod_flags::INGRESS_ISOLATED;
        assert_eq!(p.pods[&Ipv4Addr::new(10, 1, 1, 5)].flags, want, "bandwidth bits kept");
        assert_eq!(p.pod_ifaces[&105].flags, want);
        assert_eq!(p.pods[&Ipv4Addr::new(10, 1, 1, 6)].flags, 0);
        let entries = p.policy.unwrap();
        assert!(entries.contains_key(&key(5)) && !entries.contains_key(&key(9)), "10.1.1.9 is not wired here");
    }

    #[test]
    fn without_an_overlay_registrations_route_nothing() {
        let p = plan(&node(false), &[], &[reg("n2", 2, Some([192, 168, 100, 12]))]);
        assert!(p.remote_routes.is_empty() && p.host_routes.is_empty());
    }

    #[test]
    fn vpp_uplink_sets_the_config_flag_and_nothing_kernel_side() {
        let mut n = node(false);
        n.vpp_uplink = true;
        let p = plan(&n, [&pod(5, true)], &[reg("n2", 2, Some([192, 168, 100, 12]))]);
        assert_eq!(p.config.flags, config_flags::VPP_UPLINK);
        assert!(p.remote_routes.is_empty() && p.masquerade.is_none(), "VPP tunnels and NATs, not the kernel");
        assert_eq!(p.pods.len(), 1, "local pods stay on the fast path");
        assert_eq!(p.config.overlay_port, 4789, "VPP's tunnels' port: pods' own VXLAN is dropped");
        assert_eq!(plan(&node(false), &[], &[]).config.overlay_port, 0, "no overlay, no VPP: no port");
        assert_eq!(plan(&node(true), &[], &[]).config.flags, 0, "kernel mode by default");
        let no_loopback = NodeParams { loopback_node_ports: false, ..node(true) };
        assert_eq!(
            plan(&no_loopback, &[], &[]).config.flags,
            config_flags::NO_LOOPBACK_NODE_PORTS,
            "nodePortAddresses without the loopback address"
        );
    }

    #[test]
    fn a_node_leaving_removes_its_routes() {
        let with = plan(&node(true), &[], &[reg("n2", 2, Some([192, 168, 100, 12]))]);
        let without = plan(&node(true), &[], &[]);
        assert_eq!(with.remote_routes.len(), 2);
        assert!(without.remote_routes.is_empty() && without.host_routes.is_empty());
    }
}
