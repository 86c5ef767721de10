//! The agent's in-memory model of the cluster, keyed by store key.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use contiv_cluster_model::keys::{self, Kind};
use contiv_cluster_model::{ClusterObject, DecodeError, EndpointSlice, Namespace, NetworkPolicy, Node, Pod, Service};
use contiv_node_registry::NodeRegistration;
use contiv_store::Revision;

/// One object of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// A reflected Kubernetes object (`/contiv/k8s/...`).
    K8s(ClusterObject),
    /// A live node registration (`/contiv/nodes/<name>`).
    Registration(NodeRegistration),
}

/// The kind of an [`Object`]: a Kubernetes kind or a node registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    K8s(Kind),
    Registration,
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> ObjectKind {
        match self {
            Object::K8s(o) => ObjectKind::K8s(o.object_ref().kind),
            Object::Registration(_) => ObjectKind::Registration,
        }
    }
}

/// Why a stored value was skipped.
#[derive(Debug, thiserror::Error)]
pub enum SkipReason {
    #[error(transparent)]
    Model(#[from] DecodeError),
    #[error("registration names node {found:?}, not the node of its key")]
    RegistrationMismatch { found: String },
}

/// Decodes the value under `key`: `Ok(None)` for keys the model does not hold.
pub fn decode_entry(key: &str, value: &[u8]) -> Result<Option<Object>, SkipReason> {
    if key.starts_with(keys::K8S_PREFIX) {
        return Ok(Some(Object::K8s(ClusterObject::decode(key, value)?)));
    }
    if let Some(name) = key.strip_prefix(keys::NODES_PREFIX) {
        let reg: NodeRegistration = contiv_cluster_model::decode(value)?;
        if reg.name != name {
            return Err(SkipReason::RegistrationMismatch { found: reg.name });
        }
        return Ok(Some(Object::Registration(reg)));
    }
    Ok(None)
}

/// The cluster as the agent knows it: every decodable object under the watched prefixes,
/// at `revision`.
#[derive(Debug, Clone, Default)]
pub struct ClusterModel {
    objects: BTreeMap<String, Object>,
    /// Keys whose current value could not be decoded (their last good value, if any, is kept).
    malformed: BTreeSet<String>,
    revision: Revision,
}

impl ClusterModel {
    /// The store revision the model reflects.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub(crate) fn set_revision(&mut self, revision: Revision) {
        self.revision = self.revision.max(revision);
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the model holds nothing.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The object stored under `key`.
    pub fn get(&self, key: &str) -> Option<&Object> {
        self.objects.get(key)
    }

    /// Every object with its key, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Object)> {
        self.objects.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Keys whose latest value is malformed.
    pub fn malformed_keys(&self) -> impl Iterator<Item = &str> {
        self.malformed.iter().map(String::as_str)
    }

    fn under(&self, prefix: String) -> impl Iterator<Item = &Object> {
        self.objects
            .range::<String, _>((Bound::Included(prefix.clone()), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
    }

    /// Objects of one Kubernetes kind, in key order.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &ClusterObject> {
        self.under(kind.prefix()).filter_map(|o| match o {
            Object::K8s(c) => Some(c),
            Object::Registration(_) => None,
        })
    }

    /// How many objects of one Kubernetes kind.
    pub fn count(&self, kind: Kind) -> usize {
        self.of_kind(kind).count()
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.of_kind(Kind::Pod).filter_map(|o| if let ClusterObject::Pod(p) = o { Some(p) } else { None })
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.of_kind(Kind::Namespace).filter_map(|o| if let ClusterObject::Namespace(p) = o { Some(p) } else { None })
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.of_kind(Kind::Service).filter_map(|o| if let ClusterObject::Service(p) = o { Some(p) } else { None })
    }

    pub fn endpoint_slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.of_kind(Kind::EndpointSlice)
            .filter_map(|o| if let ClusterObject::EndpointSlice(p) = o { Some(p) } else { None })
    }

    pub fn policies(&self) -> impl Iterator<Item = &NetworkPolicy> {
        self.of_kind(Kind::NetworkPolicy)
            .filter_map(|o| if let ClusterObject::NetworkPolicy(p) = o { Some(p) } else { None })
    }

    /// Kubernetes Node objects (as reflected by contiv-ksr).
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.of_kind(Kind::Node).filter_map(|o| if let ClusterObject::Node(p) = o { Some(p) } else { None })
    }

    /// Live node registrations (agents that are up), by node name order.
    pub fn registrations(&self) -> impl Iterator<Item = &NodeRegistration> {
        self.under(keys::NODES_PREFIX.to_string()).filter_map(|o| match o {
            Object::Registration(r) => Some(r),
            Object::K8s(_) => None,
        })
    }

    /// Applies a decoded put; returns the previous object.
    pub(crate) fn insert(&mut self, key: String, object: Object) -> Option<Object> {
        self.malformed.remove(&key);
        self.objects.insert(key, object)
    }

    /// Applies a delete; returns the removed object.
    pub(crate) fn remove(&mut self, key: &str) -> Option<Object> {
        self.malformed.remove(key);
        self.objects.remove(key)
    }

    pub(crate) fn mark_malformed(&mut self, key: String) {
        self.malformed.insert(key);
    }
}
