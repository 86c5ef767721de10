//! Conversions from Kubernetes API types (k8s-openapi) into the model.
//!
//! Both contiv-ksr (objects from the API server) and netctl (objects from YAML) call
//! [`ToModel::to_model`], so the values they store are byte-identical. Kubernetes defaulting
//! the API server would do is applied here too (protocol TCP, targetPort = port, policy types,
//! endpoint conditions), so a hand-written YAML and the API server's version of the same
//! object convert alike.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::keys::{Kind, ObjectRef};
use crate::model::*;

/// Why a Kubernetes object cannot be converted. `field` is a path such as
/// `spec.ports[1].targetPort`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required field is missing.
    #[error("{field}: required field is missing")]
    Missing {
        /// Path of the field.
        field: String,
    },
    /// A field has a value Kubernetes would reject.
    #[error("{field}: invalid value {value:?}: {reason}")]
    Invalid {
        /// Path of the field.
        field: String,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A valid value the model does not represent (an FQDN EndpointSlice).
    #[error("{field}: unsupported value {value:?}")]
    Unsupported {
        /// Path of the field.
        field: String,
        /// The value.
        value: String,
    },
}

impl ConvertError {
    /// What is wrong, without the field path.
    pub fn reason(&self) -> String {
        match self {
            ConvertError::Missing { .. } => "required field is missing".to_string(),
            ConvertError::Invalid { value, reason, .. } => format!("invalid value {value:?}: {reason}"),
            ConvertError::Unsupported { value, .. } => format!("unsupported value {value:?}"),
        }
    }

    /// Path of the offending field.
    pub fn field(&self) -> &str {
        match self {
            ConvertError::Missing { field }
            | ConvertError::Invalid { field, .. }
            | ConvertError::Unsupported { field, .. } => field,
        }
    }
}

fn invalid(field: impl Into<String>, value: impl ToString, reason: &str) -> ConvertError {
    ConvertError::Invalid { field: field.into(), value: value.to_string(), reason: reason.into() }
}

/// A Kubernetes API type contiv reflects.
pub trait ToModel {
    /// The model type it converts to.
    type Model: ModelObject;
    /// The store identity of the object (needs only its metadata; used for deletes).
    fn model_ref(&self) -> Result<ObjectRef, ConvertError>;
    /// Converts the object.
    fn to_model(&self) -> Result<Self::Model, ConvertError>;
}

// === helpers ===

fn name_of(meta: &meta::ObjectMeta) -> Result<String, ConvertError> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => {
            check_segment("metadata.name", n)?;
            Ok(n.to_string())
        }
        _ => Err(ConvertError::Missing { field: "metadata.name".into() }),
    }
}

fn namespace_of(meta: &meta::ObjectMeta) -> Result<String, ConvertError> {
    match meta.namespace.as_deref() {
        Some(n) if !n.is_empty() => {
            check_segment("metadata.namespace", n)?;
            Ok(n.to_string())
        }
        _ => Err(ConvertError::Missing { field: "metadata.namespace".into() }),
    }
}

fn check_segment(field: &str, s: &str) -> Result<(), ConvertError> {
    if s.contains('/') || s == "." || s == ".." {
        return Err(invalid(field, s, "a name may not contain '/' or be '.' or '..'"));
    }
    Ok(())
}

fn namespaced_ref(kind: Kind, meta: &meta::ObjectMeta) -> Result<ObjectRef, ConvertError> {
    Ok(ObjectRef::namespaced(kind, namespace_of(meta)?, name_of(meta)?))
}

fn labels_of(meta: &meta::ObjectMeta) -> Labels {
    meta.labels.clone().unwrap_or_default()
}

/// An address as Kubernetes reads one (`ParseIPSloppy`): IPv4 fields may carry leading
/// zeros, read as decimal, which the API server let into objects made before it refused
/// them ("010.001.002.003" is 10.1.2.3). Anything else as the standard parser reads it.
/// An IPv4-mapped IPv6 address (`::ffff:10.1.0.6`) is the IPv4 address it maps, as it is to
/// Kubernetes (Go's `To4` reads it so: an IPv4 EndpointSlice may hold one).
fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    parse_ip_as_written(s).map(|a| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    })
}

/// [`parse_ip_sloppy`] without reading a mapped IPv6 address as IPv4.
fn parse_ip_as_written(s: &str) -> Option<IpAddr> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Some(a);
    }
    let mut octets = [0u8; 4];
    let mut fields = s.split('.');
    for o in &mut octets {
        let f = fields.next()?;
        if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = f.trim_start_matches('0');
        *o = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    }
    fields.next().is_none().then_some(IpAddr::from(octets))
}

/// A prefix as Kubernetes reads one (`ParseCIDRSloppy`): address as [`parse_ip_sloppy`],
/// then `/` and the prefix length; host bits are cleared. The length of an IPv4-mapped IPv6
/// address counts its 128 bits: what remains mapped (`::ffff:10.0.0.0/104`) is the IPv4
/// prefix of 96 bits less (10.0.0.0/8), as Go's `IPNet` reads it.
fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let net = IpNet::new(parse_ip_as_written(addr)?, len.parse().ok()?).ok()?.trunc();
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), n.prefix_len() - 96).ok(),
            None => Some(net),
        },
        _ => Some(net),
    }
}

fn ip(field: &str, s: &str) -> Result<IpAddr, ConvertError> {
    parse_ip_sloppy(s.trim()).ok_or_else(|| invalid(field, s, "not an IP address"))
}

fn ips(field: &str, list: Option<&Vec<String>>) -> Result<Vec<IpAddr>, ConvertError> {
    list.into_iter().flatten().enumerate().map(|(i, s)| ip(&format!("{field}[{i}]"), s)).collect()
}

fn cidr(field: &str, s: &str) -> Result<IpNet, ConvertError> {
    let s = s.trim();
    if let Some(net) = parse_cidr_sloppy(s) {
        return Ok(net);
    }
    // A bare address is a host route, as Kubernetes' legacy parsing allowed.
    match parse_ip_sloppy(s) {
        Some(a) => Ok(IpNet::from(a)),
        None => Err(invalid(field, s, "not a CIDR")),
    }
}

/// The non-empty names of a list (hint names).
fn names<'a>(list: impl Iterator<Item = &'a String>) -> Vec<String> {
    list.filter(|n| !n.is_empty()).cloned().collect()
}

fn port(field: &str, n: i32) -> Result<u16, ConvertError> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(field, n, "port must be 1-65535")),
    }
}

/// 0 means "not allocated" for node ports.
fn optional_port(field: &str, n: Option<i32>) -> Result<Option<u16>, ConvertError> {
    match n {
        None | Some(0) => Ok(None),
        Some(n) => port(field, n).map(Some),
    }
}

fn protocol(field: &str, p: Option<&str>) -> Result<Protocol, ConvertError> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(invalid(field, other, "protocol must be TCP, UDP or SCTP")),
    }
}

fn port_ref(field: &str, p: &IntOrString) -> Result<PortRef, ConvertError> {
    match p {
        IntOrString::Int(n) => port(field, *n).map(PortRef::Number),
        IntOrString::String(s) if s.is_empty() => Err(invalid(field, s, "empty port name")),
        IntOrString::String(s) => Ok(PortRef::Name(s.clone())),
    }
}

fn traffic_policy(field: &str, p: Option<&str>) -> Result<TrafficPolicy, ConvertError> {
    match p {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(invalid(field, other, "must be Cluster or Local")),
    }
}

fn label_selector(field: &str, s: &meta::LabelSelector) -> Result<LabelSelector, ConvertError> {
    let match_expressions = s
        .match_expressions
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let f = format!("{field}.matchExpressions[{i}]");
            let operator = match r.operator.as_str() {
                "In" => SelectorOperator::In,
                "NotIn" => SelectorOperator::NotIn,
                "Exists" => SelectorOperator::Exists,
                "DoesNotExist" => SelectorOperator::DoesNotExist,
                other => {
                    return Err(invalid(format!("{f}.operator"), other, "must be In, NotIn, Exists or DoesNotExist"));
                }
            };
            let values = r.values.clone().unwrap_or_default();
            let needs_values = matches!(operator, SelectorOperator::In | SelectorOperator::NotIn);
            if needs_values == values.is_empty() {
                let reason =
                    if needs_values { "In and NotIn need values" } else { "Exists and DoesNotExist take no values" };
                return Err(invalid(format!("{f}.values"), values.join(","), reason));
            }
            Ok(SelectorRequirement { key: r.key.clone(), operator, values })
        })
        .collect::<Result<_, _>>()?;
    Ok(LabelSelector { match_labels: s.match_labels.clone().unwrap_or_default(), match_expressions })
}

// === impl Pod ===

impl ToModel for core::Pod {
    type Model = Pod;

    fn model_ref(&self) -> Result<ObjectRef, ConvertError> {
        namespaced_ref(Kind::Pod, &self.metadata)
    }

    fn to_model(&self) -> Result<Pod, ConvertError> {
        let status = self.status.as_ref();
        let mut pod_ips = Vec::new();
        if let Some(list) = status.and_then(|s| s.pod_ips.as_ref()).filter(|l| !l.is_empty()) {
            for (i, p) in list.iter().enumerate() {
                pod_ips.push(ip(&format!("status.podIPs[{i}].ip"), &p.ip)?);
            }
        } else if let Some(p) = status.and_then(|s| s.pod_ip.as_deref()).filter(|p| !p.is_empty()) {
            pod_ips.push(ip("status.podIP", p)?);
        }
        // A finished pod's status keeps its addresses, but the pod holds them no more: the
        // next pod may get them. No policy peer or hostPort may follow them (Calico and
        // kube-proxy treat a finished pod as gone).
        if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
            pod_ips.clear();
        }
        let spec = self.spec.as_ref();
        let mut container_ports = Vec::new();
        // The app containers' ports, then those of native sidecars (init containers with
        // restartPolicy Always), in the order Kubernetes' own port lookup searches them.
        // A sidecar's hostPort is not taken: the kubelet maps only app containers' ports.
        let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default().iter().enumerate();
        let sidecars = spec
            .and_then(|s| s.init_containers.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"));
        let all = containers.map(|(i, c)| ("containers", i, c)).chain(sidecars.map(|(i, c)| ("initContainers", i, c)));
        for (list, ci, c) in all {
            for (pi, p) in c.ports.iter().flatten().enumerate() {
                let f = format!("spec.{list}[{ci}].ports[{pi}]");
                let app = list == "containers";
                let mut host_port = if app { optional_port(&format!("{f}.hostPort"), p.host_port)? } else { None };
                // Unset, empty and 0.0.0.0 all mean every node address.
                let mut host_ip = None;
                if let Some(a) = p.host_ip.as_deref().filter(|a| app && !a.is_empty()) {
                    match parse_ip_sloppy(a.trim()) {
                        Some(a) => host_ip = Some(a).filter(|a| !a.is_unspecified()),
                        // The API server does not check hostIP (`localhost` gets in). Only
                        // the host port mapping is lost: the pod and its port (a named
                        // port's number) stay, or the pod would drop out of policy.
                        None => {
                            if let Some(hp) = host_port.take() {
                                log::warn!(
                                    "pod {}/{}: {f}.hostIP {a:?} is not an IP address; its hostPort {hp} is not mapped",
                                    self.metadata.namespace.as_deref().unwrap_or_default(),
                                    self.metadata.name.as_deref().unwrap_or_default(),
                                );
                            }
                        }
                    }
                }
                container_ports.push(ContainerPort {
                    name: p.name.clone().filter(|n| !n.is_empty()),
                    protocol: protocol(&format!("{f}.protocol"), p.protocol.as_deref())?,
                    port: port(&format!("{f}.containerPort"), p.container_port)?,
                    host_port,
                    host_ip,
                });
            }
        }
        Ok(Pod {
            name: name_of(&self.metadata)?,
            namespace: namespace_of(&self.metadata)?,
            labels: labels_of(&self.metadata),
            ips: pod_ips,
            node_name: spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            container_ports,
        })
    }
}

// === impl Namespace ===

impl ToModel for core::Namespace {
    type Model = Namespace;

    fn model_ref(&self) -> Result<ObjectRef, ConvertError> {
        Ok(ObjectRef::cluster(Kind::Namespace, name_of(&self.metadata)?))
    }

    fn to_model(&self) -> Result<Namespace, ConvertError> {
        let name = name_of(&self.metadata)?;
        let mut labels = labels_of(&self.metadata);
        // The API server sets this label to the name on every write, whatever the client
        // sent; a namespace from YAML converts the same.
        labels.insert(LABEL_NAMESPACE_NAME.to_string(), name.clone());
        Ok(Namespace { name, labels })
    }
}

// === impl Service ===

impl ToModel for core::Service {
    type Model = Service;

    fn model_ref(&self) -> Result<ObjectRef, ConvertError> {
        namespaced_ref(Kind::Service, &self.metadata)
    }

    fn to_model(&self) -> Result<Service, ConvertError> {
        let default_spec = core::ServiceSpec::default();
        let spec = self.spec.as_ref().unwrap_or(&default_spec);
        let service_type = match spec.type_.as_deref() {
            None | Some("ClusterIP") => ServiceType::ClusterIP,
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => ServiceType::ExternalName,
            Some(other) => {
                return Err(invalid("spec.type", other, "must be ClusterIP, NodePort, LoadBalancer or ExternalName"));
            }
        };
        let mut headless = false;
        let mut cluster_ips = Vec::new();
        let (field, list): (&str, Vec<&str>) = match spec.cluster_ips.as_ref() {
            Some(l) if !l.is_empty() => ("spec.clusterIPs", l.iter().map(String::as_str).collect()),
            _ => ("spec.clusterIP", spec.cluster_ip.as_deref().into_iter().collect()),
        };
        for (i, s) in list.into_iter().enumerate() {
            match s {
                "None" => headless = true,
                "" => {}
                s if field == "spec.clusterIP" => cluster_ips.push(ip(field, s)?),
                s => cluster_ips.push(ip(&format!("{field}[{i}]"), s)?),
            }
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| {
                let f = format!("spec.ports[{i}]");
                let number = port(&format!("{f}.port"), p.port)?;
                Ok(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: protocol(&format!("{f}.protocol"), p.protocol.as_deref())?,
                    port: number,
                    // Unset, 0 and "" are `port` (the API server's SetDefaults_Service).
                    target_port: match &p.target_port {
                        None | Some(IntOrString::Int(0)) => PortRef::Number(number),
                        Some(IntOrString::String(s)) if s.is_empty() => PortRef::Number(number),
                        Some(t) => port_ref(&format!("{f}.targetPort"), t)?,
                    },
                    node_port: optional_port(&format!("{f}.nodePort"), p.node_port)?,
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        let mut load_balancer_ips = Vec::new();
        let ingress = self.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // Only VIP-mode addresses are the proxy's to serve (kube-proxy's IsVIPMode): a
            // load balancer that says `ipMode: Proxy` delivers to node ports or pods itself, so
            // a pod's connection to its address must go out to it, not be short-circuited.
            let vip = matches!(ing.ip_mode.as_deref(), None | Some("VIP"));
            if let Some(s) = ing.ip.as_deref().filter(|s| !s.is_empty() && vip) {
                load_balancer_ips.push(ip(&format!("status.loadBalancer.ingress[{i}].ip"), s)?);
            }
        }
        let session_affinity = match spec.session_affinity.as_deref() {
            None | Some("None") => SessionAffinity::None,
            Some("ClientIP") => {
                let t = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                let timeout_seconds = match t {
                    None => DEFAULT_AFFINITY_TIMEOUT_SECONDS,
                    Some(t) if (1..=86_400).contains(&t) => t as u32,
                    Some(t) => {
                        return Err(invalid(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            t,
                            "must be 1-86400",
                        ));
                    }
                };
                SessionAffinity::ClientIP { timeout_seconds }
            }
            Some(other) => return Err(invalid("spec.sessionAffinity", other, "must be None or ClientIP")),
        };
        let load_balancer_source_ranges = spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                parse_cidr_sloppy(r.trim()).ok_or_else(|| {
                    invalid(format!("spec.loadBalancerSourceRanges[{i}]"), r, "must be a CIDR such as 10.0.0.0/8")
                })
            })
            .collect::<Result<Vec<_>, ConvertError>>()?;
        let labels = self.metadata.labels.as_ref();
        Ok(Service {
            name: name_of(&self.metadata)?,
            namespace: namespace_of(&self.metadata)?,
            service_type,
            cluster_ips,
            headless,
            ports,
            external_ips: ips("spec.externalIPs", spec.external_ips.as_ref())?,
            load_balancer_ips,
            session_affinity,
            external_traffic_policy: traffic_policy(
                "spec.externalTrafficPolicy",
                spec.external_traffic_policy.as_deref(),
            )?,
            internal_traffic_policy: traffic_policy(
                "spec.internalTrafficPolicy",
                spec.internal_traffic_policy.as_deref(),
            )?,
            health_check_node_port: optional_port("spec.healthCheckNodePort", spec.health_check_node_port)?,
            service_proxy_name: labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME)).cloned(),
            load_balancer_source_ranges,
            headless_label: labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)),
        })
    }
}

// === impl EndpointSlice ===

impl ToModel for discovery::EndpointSlice {
    type Model = EndpointSlice;

    fn model_ref(&self) -> Result<ObjectRef, ConvertError> {
        namespaced_ref(Kind::EndpointSlice, &self.metadata)
    }

    fn to_model(&self) -> Result<EndpointSlice, ConvertError> {
        let address_type = match self.address_type.as_str() {
            "IPv4" => AddressType::IPv4,
            "IPv6" => AddressType::IPv6,
            "FQDN" => {
                return Err(ConvertError::Unsupported { field: "addressType".into(), value: "FQDN".into() });
            }
            other => return Err(invalid("addressType", other, "must be IPv4, IPv6 or FQDN")),
        };
        let endpoints = self
            .endpoints
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, e)| {
                let f = format!("endpoints[{i}]");
                let addresses = e
                    .addresses
                    .iter()
                    .enumerate()
                    .map(|(j, a)| {
                        let addr = ip(&format!("{f}.addresses[{j}]"), a)?;
                        if addr.is_ipv4() != (address_type == AddressType::IPv4) {
                            return Err(invalid(
                                format!("{f}.addresses[{j}]"),
                                a,
                                "address family differs from addressType",
                            ));
                        }
                        Ok(addr)
                    })
                    .collect::<Result<_, _>>()?;
                // The API's defaults, as kube-proxy reads them: unset ready and serving are
                // true, unset terminating false. (So a terminating endpoint whose manager set
                // only `ready: false` is still a serving-and-terminating fallback.)
                let c = e.conditions.clone().unwrap_or_default();
                Ok(Endpoint {
                    addresses,
                    conditions: EndpointConditions {
                        ready: c.ready.unwrap_or(true),
                        serving: c.serving.unwrap_or(true),
                        terminating: c.terminating.unwrap_or(false),
                    },
                    node_name: e.node_name.clone().filter(|n| !n.is_empty()),
                    zone: e.zone.clone().filter(|z| !z.is_empty()),
                    hints_for_zones: names(e.hints.iter().flat_map(|h| h.for_zones.iter().flatten().map(|z| &z.name))),
                    hints_for_nodes: names(e.hints.iter().flat_map(|h| h.for_nodes.iter().flatten().map(|n| &n.name))),
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        let ports = self
            .ports
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| {
                let f = format!("ports[{i}]");
                Ok(EndpointPort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: protocol(&format!("{f}.protocol"), p.protocol.as_deref())?,
                    // The API does not check the number: one out of range (a third-party
                    // controller's 0) is that port unusable, as kube-proxy skips it, not
                    // the whole slice.
                    port: p.port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0),
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        Ok(EndpointSlice {
            name: name_of(&self.metadata)?,
            namespace: namespace_of(&self.metadata)?,
            service_name: self.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)).cloned(),
            address_type,
            endpoints,
            ports,
            last_change_trigger_time: trigger_time(&self.metadata),
        })
    }
}

/// The slice's last-change trigger time, in RFC 3339 as jiff prints it; none when it is
/// missing or not a time (kube-proxy ignores such a value too: it only feeds a metric, so it
/// never makes the slice unusable).
fn trigger_time(meta: &meta::ObjectMeta) -> Option<String> {
    let raw = meta.annotations.as_ref()?.get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME)?;
    raw.parse::<jiff::Timestamp>().ok().map(|t| t.to_string())
}

// === impl NetworkPolicy ===

fn policy_peers(
    field: &str,
    peers: Option<&Vec<networking::NetworkPolicyPeer>>,
) -> Result<Vec<PolicyPeer>, ConvertError> {
    peers
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| {
            let f = format!("{field}[{i}]");
            match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
                (Some(b), None, None) => {
                    let cidr_net = cidr(&format!("{f}.ipBlock.cidr"), &b.cidr)?;
                    let except = b
                        .except
                        .iter()
                        .flatten()
                        .enumerate()
                        .map(|(j, e)| {
                            let ef = format!("{f}.ipBlock.except[{j}]");
                            let net = cidr(&ef, e)?;
                            if !cidr_net.contains(&net) {
                                return Err(invalid(ef, e, "must be inside ipBlock.cidr"));
                            }
                            Ok(net)
                        })
                        .collect::<Result<_, _>>()?;
                    Ok(PolicyPeer::IpBlock(IpBlock { cidr: cidr_net, except }))
                }
                (Some(_), _, _) => Err(invalid(
                    format!("{f}.ipBlock"),
                    "ipBlock with selectors",
                    "ipBlock may not be combined with podSelector or namespaceSelector",
                )),
                (None, None, None) => {
                    Err(ConvertError::Missing { field: format!("{f}.podSelector|namespaceSelector|ipBlock") })
                }
                (None, ns, pods) => Ok(PolicyPeer::Pods {
                    namespace_selector: ns
                        .as_ref()
                        .map(|s| label_selector(&format!("{f}.namespaceSelector"), s))
                        .transpose()?,
                    pod_selector: pods.as_ref().map(|s| label_selector(&format!("{f}.podSelector"), s)).transpose()?,
                }),
            }
        })
        .collect()
}

fn policy_ports(
    field: &str,
    ports: Option<&Vec<networking::NetworkPolicyPort>>,
) -> Result<Vec<PolicyPort>, ConvertError> {
    ports
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| {
            let f = format!("{field}[{i}]");
            let port = p.port.as_ref().map(|x| port_ref(&format!("{f}.port"), x)).transpose()?;
            let end_port = match (p.end_port, &port) {
                (None, _) => None,
                (Some(e), Some(PortRef::Number(start))) => {
                    let end = self::port(&format!("{f}.endPort"), e)?;
                    if end < *start {
                        return Err(invalid(format!("{f}.endPort"), e, "must not be below port"));
                    }
                    Some(end)
                }
                (Some(e), _) => {
                    return Err(invalid(format!("{f}.endPort"), e, "needs a numeric port"));
                }
            };
            Ok(PolicyPort { protocol: protocol(&format!("{f}.protocol"), p.protocol.as_deref())?, port, end_port })
        })
        .collect()
}

impl ToModel for networking::NetworkPolicy {
    type Model = NetworkPolicy;

    fn model_ref(&self) -> Result<ObjectRef, ConvertError> {
        namespaced_ref(Kind::NetworkPolicy, &self.metadata)
    }

    fn to_model(&self) -> Result<NetworkPolicy, ConvertError> {
        let default_spec = networking::NetworkPolicySpec::default();
        let spec = self.spec.as_ref().unwrap_or(&default_spec);
        let pod_selector =
            spec.pod_selector.as_ref().map(|s| label_selector("spec.podSelector", s)).transpose()?.unwrap_or_default();
        let mut policy_types = match &spec.policy_types {
            Some(types) if !types.is_empty() => types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "Ingress" => Ok(PolicyType::Ingress),
                    "Egress" => Ok(PolicyType::Egress),
                    other => Err(invalid(format!("spec.policyTypes[{i}]"), other, "must be Ingress or Egress")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => {
                let mut t = vec![PolicyType::Ingress];
                if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                    t.push(PolicyType::Egress);
                }
                t
            }
        };
        policy_types.sort();
        policy_types.dedup();
        let ingress = spec
            .ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                Ok(PolicyRule {
                    peers: policy_peers(&format!("spec.ingress[{i}].from"), r.from.as_ref())?,
                    ports: policy_ports(&format!("spec.ingress[{i}].ports"), r.ports.as_ref())?,
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        let egress = spec
            .egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                Ok(PolicyRule {
                    peers: policy_peers(&format!("spec.egress[{i}].to"), r.to.as_ref())?,
                    ports: policy_ports(&format!("spec.egress[{i}].ports"), r.ports.as_ref())?,
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        Ok(NetworkPolicy {
            name: name_of(&self.metadata)?,
            namespace: namespace_of(&self.metadata)?,
            pod_selector,
            policy_types,
            ingress,
            egress,
        })
    }
}

// === impl Node ===

impl ToModel for core::Node {
    type Model = Node;

    fn model_ref(&self) -> Result<ObjectRef, ConvertError> {
        Ok(ObjectRef::cluster(Kind::Node, name_of(&self.metadata)?))
    }

    fn to_model(&self) -> Result<Node, ConvertError> {
        let addresses = self
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .map(|a| NodeAddress { address_type: a.type_.clone(), address: a.address.clone() })
            .collect();
        let spec = self.spec.as_ref();
        let mut pod_cidrs = Vec::new();
        match spec.and_then(|s| s.pod_cidrs.as_ref()).filter(|l| !l.is_empty()) {
            Some(list) => {
                for (i, c) in list.iter().enumerate() {
                    pod_cidrs.push(cidr(&format!("spec.podCIDRs[{i}]"), c)?);
                }
            }
            None => {
                if let Some(c) = spec.and_then(|s| s.pod_cidr.as_deref()).filter(|c| !c.is_empty()) {
                    pod_cidrs.push(cidr("spec.podCIDR", c)?);
                }
            }
        }
        let zone = self.metadata.labels.as_ref().and_then(|l| l.get(LABEL_TOPOLOGY_ZONE)).filter(|z| !z.is_empty());
        let to_be_deleted = self.metadata.deletion_timestamp.is_some()
            || spec.and_then(|s| s.taints.as_ref()).into_iter().flatten().any(|t| t.key == TAINT_TO_BE_DELETED);
        Ok(Node { name: name_of(&self.metadata)?, addresses, pod_cidrs, zone: zone.cloned(), to_be_deleted })
    }
}

/// Labels as a sorted map (re-exported for callers building objects by hand).
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[cfg(test)]
mod tests;
