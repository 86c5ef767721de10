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
    /// EndpointSlice keys by the service they belong to (namespace, service name): the
    /// service proxy recomputes one service at a time.
    slices_by_service: BTreeMap<(String, String), BTreeSet<String>>,
    /// contiv-ksr's marker key is in the store (KSR synced it fully; see `keys::KSR_MARKER`).
    ksr_marker: bool,
}

/// The service an object's EndpointSlice belongs to.
fn slice_owner(object: &Object) -> Option<(String, String)> {
    match object {
        Object::K8s(ClusterObject::EndpointSlice(s)) => {
            s.service_name.as_ref().map(|svc| (s.namespace.clone(), svc.clone()))
        }
        _ => None,
    }
}

impl ClusterModel {
    /// The store revision the model reflects.
    /// Whether contiv-ksr's marker is in the store: KSR synced everything into it. A store
    /// that had the marker and lost it lost its data (wiped, restored from an old backup)
    /// until KSR fills it again.
    pub fn ksr_marker(&self) -> bool {
        self.ksr_marker
    }

    pub(crate) fn set_ksr_marker(&mut self, present: bool) {
        self.ksr_marker = present;
    }

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

    /// A Service by namespace and name.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        match self.objects.get(&keys::k8s_key(Kind::Service, Some(namespace), name)) {
            Some(Object::K8s(ClusterObject::Service(s))) => Some(s),
            _ => None,
        }
    }

    /// A Pod by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        match self.objects.get(&keys::k8s_key(Kind::Pod, Some(namespace), name)) {
            Some(Object::K8s(ClusterObject::Pod(p))) => Some(p),
            _ => None,
        }
    }

    /// The EndpointSlices of one service (label `kubernetes.io/service-name`), in key order.
    pub fn endpoint_slices_of(&self, namespace: &str, service: &str) -> impl Iterator<Item = &EndpointSlice> {
        self.slices_by_service.get(&(namespace.to_owned(), service.to_owned())).into_iter().flatten().filter_map(|k| {
            match self.objects.get(k) {
                Some(Object::K8s(ClusterObject::EndpointSlice(s))) => Some(s),
                _ => None,
            }
        })
    }

    fn unindex(&mut self, key: &str, old: Option<&Object>) {
        if let Some(owner) = old.and_then(slice_owner)
            && let Some(set) = self.slices_by_service.get_mut(&owner)
        {
            set.remove(key);
            if set.is_empty() {
                self.slices_by_service.remove(&owner);
            }
        }
    }

    /// Applies a decoded put; returns the previous object.
    pub(crate) fn insert(&mut self, key: String, object: Object) -> Option<Object> {
        self.malformed.remove(&key);
        if let Some(owner) = slice_owner(&object) {
            self.slices_by_service.entry(owner).or_default().insert(key.clone());
        }
        let old = self.objects.insert(key.clone(), object);
        if let Some(prev) = &old
            && slice_owner(prev) != self.objects.get(&key).and_then(slice_owner)
        {
            self.unindex(&key, Some(prev));
        }
        old
    }

    /// Applies a delete; returns the removed object.
    pub(crate) fn remove(&mut self, key: &str) -> Option<Object> {
        self.malformed.remove(key);
        let old = self.objects.remove(key);
        self.unindex(key, old.as_ref());
        old
    }

    pub(crate) fn mark_malformed(&mut self, key: String) {
        self.malformed.insert(key);
    }
}

#[cfg(test)]
mod tests {
    use contiv_cluster_model::AddressType;

    use super::*;

    fn slice(name: &str, service: Option<&str>) -> (String, Object) {
        let s = EndpointSlice {
            name: name.into(),
            namespace: "shop".into(),
            service_name: service.map(str::to_owned),
            address_type: AddressType::IPv4,
            endpoints: vec![],
            ports: vec![],
            last_change_trigger_time: None,
        };
        (keys::k8s_key(Kind::EndpointSlice, Some("shop"), name), Object::K8s(ClusterObject::EndpointSlice(s)))
    }

    fn names_of<'a>(m: &'a ClusterModel, svc: &str) -> Vec<&'a str> {
        m.endpoint_slices_of("shop", svc).map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn slices_are_found_by_their_service_through_puts_relabels_and_deletes() {
        let mut m = ClusterModel::default();
        for (name, svc) in [("web-a", Some("web")), ("web-b", Some("web")), ("db-a", Some("db")), ("loose", None)] {
            let (k, o) = slice(name, svc);
            m.insert(k, o);
        }
        assert_eq!(names_of(&m, "web"), ["web-a", "web-b"]);
        assert_eq!(names_of(&m, "db"), ["db-a"]);
        // The same slice put again stays listed once; relabelled, it moves.
        let (k, o) = slice("web-b", Some("web"));
        m.insert(k, o);
        assert_eq!(names_of(&m, "web"), ["web-a", "web-b"]);
        let (k, o) = slice("web-b", Some("db"));
        m.insert(k, o);
        assert_eq!(names_of(&m, "web"), ["web-a"]);
        assert_eq!(names_of(&m, "db"), ["db-a", "web-b"]);
        // Unlabelled, it belongs to no service; deleted, it is gone.
        let (k, o) = slice("web-b", None);
        m.insert(k, o);
        assert_eq!(names_of(&m, "db"), ["db-a"]);
        m.remove(&keys::k8s_key(Kind::EndpointSlice, Some("shop"), "web-a"));
        assert!(names_of(&m, "web").is_empty());
        assert!(m.slices_by_service.keys().all(|(_, svc)| svc == "db"), "no empty index entries");
        // Another namespace's service of the same name is another service.
        assert_eq!(m.endpoint_slices_of("other", "db").count(), 0);
    }
}
