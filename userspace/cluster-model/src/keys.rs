//! The store's key layout. Every key the control plane reads or writes is spelled here and
//! nowhere else.
//!
//! ```text
//! /contiv/k8s/<kind>/<namespace>/<name>   namespaced Kubernetes objects (pod, service,
//!                                         endpointslice, networkpolicy)
//! /contiv/k8s/<kind>/<name>               cluster-scoped ones (namespace, node)
//! /contiv/nodes/<name>                    node registrations (agent-owned, under a lease)
//! /contiv/node-ids/<id>                   node ID claims (decimal id -> node name)
//! /contiv/ipam/config                     cluster IPAM configuration (pod subnet, prefix length)
//! /contiv/ipam/nodes/<name>               a node's pod CIDR allocation
//! /contiv/ksr/marker                      written by contiv-ksr after a full sync; its absence
//!                                         means the store lost its data and KSR resyncs
//! ```
//!
//! Kubernetes names never contain `/`, so the last one or two path segments are always the
//! object's namespace and name.

use std::fmt;
use std::str::FromStr;

/// Root of everything contiv stores.
pub const ROOT: &str = "/contiv/";
/// Root of the reflected Kubernetes objects.
pub const K8S_PREFIX: &str = "/contiv/k8s/";
/// Root of node registrations.
pub const NODES_PREFIX: &str = "/contiv/nodes/";
/// Root of node ID claims.
pub const NODE_IDS_PREFIX: &str = "/contiv/node-ids/";
/// Root of IPAM state.
pub const IPAM_PREFIX: &str = "/contiv/ipam/";
/// Cluster IPAM configuration.
pub const IPAM_CONFIG: &str = "/contiv/ipam/config";
/// Root of per-node pod CIDR allocations.
pub const IPAM_NODES_PREFIX: &str = "/contiv/ipam/nodes/";
/// Marker contiv-ksr writes once it has fully synced the store; see the module docs.
pub const KSR_MARKER: &str = "/contiv/ksr/marker";

/// The Kubernetes kinds contiv reflects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 Pod (namespaced).
    Pod,
    /// core/v1 Namespace (cluster-scoped).
    Namespace,
    /// core/v1 Service (namespaced).
    Service,
    /// discovery/v1 EndpointSlice (namespaced).
    EndpointSlice,
    /// networking/v1 NetworkPolicy (namespaced).
    NetworkPolicy,
    /// core/v1 Node (cluster-scoped).
    Node,
}

impl Kind {
    /// All kinds, in the order they are usually synced (namespaces and nodes first).
    pub const ALL: [Kind; 6] =
        [Kind::Namespace, Kind::Node, Kind::Pod, Kind::Service, Kind::EndpointSlice, Kind::NetworkPolicy];

    /// The key segment naming this kind (`pod`, `namespace`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::Namespace => "namespace",
            Kind::Service => "service",
            Kind::EndpointSlice => "endpointslice",
            Kind::NetworkPolicy => "networkpolicy",
            Kind::Node => "node",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    /// The prefix under which all objects of this kind are stored, ending in `/`.
    pub fn prefix(self) -> String {
        format!("{K8S_PREFIX}{}/", self.as_str())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind segment that names none of the reflected kinds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?}")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| UnknownKind(s.to_string()))
    }
}

/// Identity of a reflected Kubernetes object: kind, namespace (for namespaced kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// The object's kind.
    pub kind: Kind,
    /// The namespace; `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// The object's name.
    pub name: String,
}

impl ObjectRef {
    /// A reference to a namespaced object.
    pub fn namespaced(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef { kind, namespace: Some(namespace.into()), name: name.into() }
    }

    /// A reference to a cluster-scoped object.
    pub fn cluster(kind: Kind, name: impl Into<String>) -> Self {
        ObjectRef { kind, namespace: None, name: name.into() }
    }

    /// The store key of this object.
    pub fn key(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{K8S_PREFIX}{}/{ns}/{}", self.kind.as_str(), self.name),
            None => format!("{K8S_PREFIX}{}/{}", self.kind.as_str(), self.name),
        }
    }

    /// Parses a key under [`K8S_PREFIX`]. Returns `None` for any other key, for a segment
    /// count that does not fit the kind, and for empty segments.
    pub fn parse(key: &str) -> Option<ObjectRef> {
        let rest = key.strip_prefix(K8S_PREFIX)?;
        let mut parts = rest.split('/');
        let kind: Kind = parts.next()?.parse().ok()?;
        let first = parts.next()?;
        let second = parts.next();
        if parts.next().is_some() || first.is_empty() {
            return None;
        }
        match (kind.is_namespaced(), second) {
            (true, Some(name)) if !name.is_empty() => Some(ObjectRef::namespaced(kind, first, name)),
            (false, None) => Some(ObjectRef::cluster(kind, first)),
            _ => None,
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{ns}/{}", self.kind, self.name),
            None => write!(f, "{}/{}", self.kind, self.name),
        }
    }
}

/// Key of a Kubernetes object; `namespace` is ignored for cluster-scoped kinds.
pub fn k8s_key(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    let ns = if kind.is_namespaced() { namespace } else { None };
    ObjectRef { kind, namespace: ns.map(str::to_string), name: name.to_string() }.key()
}

/// Key of a node registration.
pub fn node(name: &str) -> String {
    format!("{NODES_PREFIX}{name}")
}

/// Key of a node ID claim.
pub fn node_id(id: u32) -> String {
    format!("{NODE_IDS_PREFIX}{id}")
}

/// Parses the ID out of a node ID claim key.
pub fn parse_node_id(key: &str) -> Option<u32> {
    key.strip_prefix(NODE_IDS_PREFIX)?.parse().ok()
}

/// Key of a node's pod CIDR allocation.
pub fn ipam_node(name: &str) -> String {
    format!("{IPAM_NODES_PREFIX}{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaced_and_cluster_keys() {
        assert_eq!(k8s_key(Kind::Pod, Some("default"), "web-0"), "/contiv/k8s/pod/default/web-0");
        assert_eq!(k8s_key(Kind::Namespace, Some("x"), "kube-system"), "/contiv/k8s/namespace/kube-system");
        assert_eq!(k8s_key(Kind::Node, None, "n1"), "/contiv/k8s/node/n1");
        assert_eq!(k8s_key(Kind::EndpointSlice, Some("ns"), "svc-abc"), "/contiv/k8s/endpointslice/ns/svc-abc");
        assert_eq!(Kind::NetworkPolicy.prefix(), "/contiv/k8s/networkpolicy/");
        assert_eq!(node("n1"), "/contiv/nodes/n1");
        assert_eq!(node_id(7), "/contiv/node-ids/7");
        assert_eq!(parse_node_id("/contiv/node-ids/7"), Some(7));
        assert_eq!(parse_node_id("/contiv/node-ids/x"), None);
        assert_eq!(ipam_node("n1"), "/contiv/ipam/nodes/n1");
    }

    #[test]
    fn parse_roundtrip_and_rejects() {
        for r in [
            ObjectRef::namespaced(Kind::Service, "default", "kubernetes"),
            ObjectRef::cluster(Kind::Namespace, "default"),
            ObjectRef::cluster(Kind::Node, "node-1"),
        ] {
            assert_eq!(ObjectRef::parse(&r.key()), Some(r));
        }
        assert_eq!(ObjectRef::parse("/contiv/k8s/pod/onlyname"), None);
        assert_eq!(ObjectRef::parse("/contiv/k8s/node/ns/name"), None);
        assert_eq!(ObjectRef::parse("/contiv/k8s/bogus/ns/name"), None);
        assert_eq!(ObjectRef::parse("/contiv/k8s/pod/ns/"), None);
        assert_eq!(ObjectRef::parse("/contiv/nodes/n1"), None);
        assert_eq!(ObjectRef::parse(KSR_MARKER), None);
    }
}
