//! The trimmed cluster model: only what the dataplane needs from each Kubernetes kind.
//!
//! Field order is the serialization order; maps are `BTreeMap`s, so the JSON of a value is
//! deterministic and two writers (contiv-ksr, netctl) produce byte-identical values.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::keys::{Kind, ObjectRef};

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// L4 protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP (the Kubernetes default).
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp,
}

/// A port given by number or by the name of a container port (Kubernetes `IntOrString`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    /// A port number.
    Number(u16),
    /// A named container port.
    Name(String),
}

// === Pod ===

/// A pod: where it runs, its addresses, labels and named ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod labels (policy and service selectors match these).
    #[serde(default)]
    pub labels: Labels,
    /// Pod IPs (status.podIPs), primary first; empty until the pod has an address, and once
    /// it has finished (Succeeded, Failed).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Node the pod is scheduled to, if any.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Whether the pod uses the host's network namespace.
    #[serde(default)]
    pub host_network: bool,
    /// Ports declared by the pod's containers, then its native sidecars' (init containers
    /// with restartPolicy Always; their hostPorts left out, as the kubelet maps none).
    #[serde(default)]
    pub container_ports: Vec<ContainerPort>,
}

impl Pod {
    /// Resolves a service target port or policy port against this pod: a number is itself,
    /// a name is the container port of that name and protocol (`None` if the pod has none).
    pub fn resolve_port(&self, port: &PortRef, protocol: Protocol) -> Option<u16> {
        match port {
            PortRef::Number(n) => Some(*n),
            PortRef::Name(name) => self
                .container_ports
                .iter()
                .find(|p| p.protocol == protocol && p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.port),
        }
    }
}

/// A port a container declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPort {
    /// Port name, referenced by a service's targetPort or a policy's port.
    #[serde(default)]
    pub name: Option<String>,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Port number inside the pod.
    pub port: u16,
    /// `hostPort`: the port on the node that leads to this one (absent when not exposed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    /// `hostIP`: the one node address the host port is bound to (absent: every address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

// === Namespace ===

/// Label every namespace carries, its name (the API server sets it).
pub const LABEL_NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

/// A namespace: its labels (network policy namespace selectors match these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// Namespace name.
    pub name: String,
    /// Namespace labels.
    #[serde(default)]
    pub labels: Labels,
}

// === Service ===

/// Label whose value names the proxy that owns a service; other proxies ignore it.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label whose presence makes proxies ignore a service.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label on an EndpointSlice naming its service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// EndpointSlice annotation: when the pod or service change the slice reflects happened.
pub const ANNOTATION_LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Kubernetes' default ClientIP session affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// Service type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ServiceType {
    /// Reachable on its cluster IPs.
    #[default]
    ClusterIP,
    /// Also on every node's addresses at the node ports.
    NodePort,
    /// Also on load-balancer ingress IPs.
    LoadBalancer,
    /// A DNS alias; not proxied.
    ExternalName,
}

/// External or internal traffic policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on the receiving node.
    Local,
}

/// Session affinity of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SessionAffinity {
    /// Each connection is balanced independently.
    #[default]
    None,
    /// Connections from one client IP stick to one endpoint.
    ClientIP {
        /// Stickiness timeout in seconds.
        timeout_seconds: u32,
    },
}

/// A service: its frontends and how they balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// Service type.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Cluster IPs; empty for headless services (clusterIP: None) and ExternalName.
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    /// Whether spec.clusterIP is "None".
    #[serde(default)]
    pub headless: bool,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// spec.externalIPs.
    #[serde(default)]
    pub external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress[].ip of VIP-mode entries (`ipMode` unset or `VIP`);
    /// hostname-only and `ipMode: Proxy` entries are dropped, as kube-proxy drops them.
    #[serde(default)]
    pub load_balancer_ips: Vec<IpAddr>,
    /// Session affinity.
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    /// External traffic policy (NodePort/LoadBalancer/external IPs).
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
    /// Internal traffic policy (cluster IPs).
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    /// spec.healthCheckNodePort (LoadBalancer with Local external traffic policy).
    #[serde(default)]
    pub health_check_node_port: Option<u16>,
    /// Value of the `service.kubernetes.io/service-proxy-name` label, if set.
    #[serde(default)]
    pub service_proxy_name: Option<String>,
    /// Whether the `service.kubernetes.io/headless` label is set.
    #[serde(default)]
    pub headless_label: bool,
    /// spec.loadBalancerSourceRanges: who may connect through the load-balancer IPs
    /// (empty: anyone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<ipnet::IpNet>,
}

impl Service {
    /// Whether a proxy called `proxy_name` (`None` for the default proxy) must ignore this
    /// service, following kube-proxy's rules: a service-proxy-name label that names another
    /// proxy, the headless label, a headless or ExternalName service.
    pub fn ignored_by_proxy(&self, proxy_name: Option<&str>) -> bool {
        self.service_proxy_name.as_deref() != proxy_name
            || self.headless_label
            || self.headless
            || self.service_type == ServiceType::ExternalName
    }
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Port name (empty when the service has a single unnamed port).
    #[serde(default)]
    pub name: String,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Port on the cluster IPs.
    pub port: u16,
    /// Port on the endpoints: a number or a container port name (defaults to `port`).
    pub target_port: PortRef,
    /// Node port, for NodePort and LoadBalancer services.
    #[serde(default)]
    pub node_port: Option<u16>,
}

// === EndpointSlice ===

/// Address family of an EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressType {
    /// IPv4 addresses.
    IPv4,
    /// IPv6 addresses.
    IPv6,
}

/// An EndpointSlice: backends of (part of) a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSlice {
    /// Slice name.
    pub name: String,
    /// Slice namespace (the service's).
    pub namespace: String,
    /// Service this slice belongs to (label `kubernetes.io/service-name`).
    #[serde(default)]
    pub service_name: Option<String>,
    /// Address family.
    pub address_type: AddressType,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Ports every endpoint of the slice serves.
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
    /// When the change this slice reflects happened (annotation
    /// `endpoints.kubernetes.io/last-change-trigger-time`, RFC 3339, set by the
    /// EndpointSlice controller): where the node's network programming latency starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change_trigger_time: Option<String>,
}

impl EndpointSlice {
    /// [`EndpointSlice::last_change_trigger_time`] as a time; none when absent or (in a
    /// value not written by [`crate::convert`]) not RFC 3339.
    pub fn trigger_time(&self) -> Option<std::time::SystemTime> {
        self.last_change_trigger_time.as_deref()?.parse::<jiff::Timestamp>().ok().map(Into::into)
    }
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Addresses (fungible: they all reach the same backend).
    pub addresses: Vec<IpAddr>,
    /// Conditions, with Kubernetes' defaults applied (unset ready = true, unset serving =
    /// true, unset terminating = false).
    pub conditions: EndpointConditions,
    /// Node hosting the endpoint.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Zone of the endpoint.
    #[serde(default)]
    pub zone: Option<String>,
    /// `hints.forZones[].name`: the zones whose nodes should use this endpoint (topology
    /// aware routing, `trafficDistribution: PreferClose`/`PreferSameZone`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hints_for_zones: Vec<String>,
    /// `hints.forNodes[].name`: the nodes that should use this endpoint
    /// (`trafficDistribution: PreferSameNode`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hints_for_nodes: Vec<String>,
}

/// Endpoint conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointConditions {
    /// Ready to receive new traffic.
    pub ready: bool,
    /// Serving (may be terminating yet still able to serve).
    pub serving: bool,
    /// Terminating.
    pub terminating: bool,
}

/// A port on the endpoints of a slice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPort {
    /// Name, matching a service port name.
    #[serde(default)]
    pub name: String,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Port number; `None` means all ports.
    #[serde(default)]
    pub port: Option<u16>,
}

// === NetworkPolicy ===

/// Operator of a label selector requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    /// Label value is in the set.
    In,
    /// Label absent or value not in the set.
    NotIn,
    /// Label present.
    Exists,
    /// Label absent.
    DoesNotExist,
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorRequirement {
    /// Label key.
    pub key: String,
    /// Operator.
    pub operator: SelectorOperator,
    /// Values (for In / NotIn).
    #[serde(default)]
    pub values: Vec<String>,
}

/// A label selector; the empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LabelSelector {
    /// Labels that must be equal.
    #[serde(default)]
    pub match_labels: Labels,
    /// Further requirements (all must hold).
    #[serde(default)]
    pub match_expressions: Vec<SelectorRequirement>,
}

impl LabelSelector {
    /// Whether `labels` satisfy this selector.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => value.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// Direction a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyType {
    /// Traffic into the selected pods.
    Ingress,
    /// Traffic out of the selected pods.
    Egress,
}

/// An address block, minus exceptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpBlock {
    /// The block (host bits cleared).
    pub cidr: IpNet,
    /// Sub-blocks excluded from it.
    #[serde(default)]
    pub except: Vec<IpNet>,
}

/// A peer of a policy rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyPeer {
    /// Pods selected by labels. No namespace selector: the policy's own namespace; no pod
    /// selector: all pods of the selected namespaces.
    Pods {
        /// Namespaces whose pods are peers.
        #[serde(default)]
        namespace_selector: Option<LabelSelector>,
        /// Pods that are peers.
        #[serde(default)]
        pod_selector: Option<LabelSelector>,
    },
    /// An address block.
    IpBlock(IpBlock),
}

/// A port of a policy rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyPort {
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Port number or named container port; `None` means all ports.
    #[serde(default)]
    pub port: Option<PortRef>,
    /// Last port of a range starting at a numeric `port`.
    #[serde(default)]
    pub end_port: Option<u16>,
}

/// A policy rule. An empty `peers` list matches all peers; an empty `ports` list all ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    /// `from` (ingress) or `to` (egress) peers.
    #[serde(default)]
    pub peers: Vec<PolicyPeer>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<PolicyPort>,
}

/// A network policy, complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    /// Policy name.
    pub name: String,
    /// Policy namespace.
    pub namespace: String,
    /// Pods of the namespace the policy applies to.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// Directions the policy isolates, with Kubernetes' defaulting applied (Ingress always
    /// unless given; Egress when egress rules exist).
    pub policy_types: Vec<PolicyType>,
    /// Allowed ingress.
    #[serde(default)]
    pub ingress: Vec<PolicyRule>,
    /// Allowed egress.
    #[serde(default)]
    pub egress: Vec<PolicyRule>,
}

// === Node ===

/// The node label naming its zone (`topology.kubernetes.io/zone`).
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// A node address with its type (`InternalIP`, `ExternalIP`, `Hostname`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    /// Address type as Kubernetes names it.
    pub address_type: String,
    /// The address (an IP for the *IP types, a name otherwise).
    pub address: String,
}

/// A node: addresses and pod CIDRs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// Addresses.
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
    /// spec.podCIDRs.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    /// The `topology.kubernetes.io/zone` label: the zone whose endpoint hints this node's
    /// proxy follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The node is on its way out: it has a deletion timestamp, or the cluster autoscaler
    /// tainted it `ToBeDeletedByClusterAutoscaler`. Its proxy's `/healthz` then answers 503,
    /// so load balancers drain it before it goes (as kube-proxy's does).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub to_be_deleted: bool,
}

impl Node {
    /// IPs of the given address type (`InternalIP`, `ExternalIP`).
    pub fn ips_of_type(&self, address_type: &str) -> Vec<IpAddr> {
        self.addresses
            .iter()
            .filter(|a| a.address_type == address_type)
            .filter_map(|a| a.address.parse().ok())
            .collect()
    }
}

// === identity ===

/// A model type stored under a Kubernetes object key.
pub trait ModelObject: Serialize + serde::de::DeserializeOwned {
    /// The kind this type models.
    const KIND: Kind;
    /// The object's identity.
    fn object_ref(&self) -> ObjectRef;
    /// The object's store key.
    fn key(&self) -> String {
        self.object_ref().key()
    }
}

macro_rules! namespaced {
    ($t:ty, $kind:expr) => {
        impl ModelObject for $t {
            const KIND: Kind = $kind;
            fn object_ref(&self) -> ObjectRef {
                ObjectRef::namespaced($kind, self.namespace.clone(), self.name.clone())
            }
        }
    };
}
macro_rules! cluster {
    ($t:ty, $kind:expr) => {
        impl ModelObject for $t {
            const KIND: Kind = $kind;
            fn object_ref(&self) -> ObjectRef {
                ObjectRef::cluster($kind, self.name.clone())
            }
        }
    };
}
namespaced!(Pod, Kind::Pod);
namespaced!(Service, Kind::Service);
namespaced!(EndpointSlice, Kind::EndpointSlice);
namespaced!(NetworkPolicy, Kind::NetworkPolicy);
cluster!(Namespace, Kind::Namespace);
cluster!(Node, Kind::Node);
