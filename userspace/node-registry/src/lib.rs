//! Node registry and IPAM allocation.
//!
//! Each agent registers its node (name, addresses) under a lease it keeps alive. Node IDs are
//! allocated with one compare-and-swap transaction that claims both the ID
//! (`/contiv/node-ids/<id>`, absent before) and the node's allocation
//! (`/contiv/ipam/nodes/<name>`, absent before), so two agents starting at once never share
//! an ID and one name never gets two. The allocation is not under the lease: a restarted
//! agent finds it and gets its old ID and pod CIDR back. The pod CIDR derives from the ID
//! ([`ipam::IpamConfig::pod_cidr`]). The cluster's plan is stored once at
//! `/contiv/ipam/config` by the first agent; an agent configured differently is refused.
//!
//! Values are versioned JSON (`contiv_cluster_model::encode`), keys come from
//! `contiv_cluster_model::keys`.

pub mod departed;
pub mod ipam;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use contiv_cluster_model::keys;
use contiv_cluster_model::{DecodeError, NodeAddress};
use contiv_store::{Compare, LeaseId, Store, StoreError, Txn, TxnOp};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

pub use departed::DepartedNodes;
pub use ipam::{IpamConfig, IpamError};

/// Default TTL of a node registration's lease.
pub const DEFAULT_LEASE_TTL_SECS: i64 = 10;

/// How many times [`NodeRegistry::register`] tries before it reports contention.
const REGISTER_ROUNDS: usize = 3;

/// The value under `/contiv/node-ids/<id>`: who holds the ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdClaim {
    /// The node holding the ID.
    pub name: String,
}

/// The value under `/contiv/ipam/nodes/<name>`: a node's ID and pod CIDR (persistent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamAllocation {
    pub name: String,
    pub id: u32,
    pub pod_cidr: IpNet,
}

/// The value under `/contiv/nodes/<name>`: a live node (under its agent's lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub name: String,
    pub id: u32,
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
    pub pod_cidr: IpNet,
    /// The node's underlay address: where other nodes send its pods' traffic (the overlay's
    /// tunnel endpoint). Absent for a node without an uplink (a single-node setup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_ip: Option<std::net::Ipv4Addr>,
}

/// What a node registers about itself besides its name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeDetails {
    pub addresses: Vec<NodeAddress>,
    pub uplink_ip: Option<std::net::Ipv4Addr>,
}

impl From<Vec<NodeAddress>> for NodeDetails {
    fn from(addresses: Vec<NodeAddress>) -> Self {
        Self { addresses, uplink_ip: None }
    }
}

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The addressing plan is invalid.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// Every node ID of the plan is taken.
    #[error("no free node id: all {max} ids of the pod subnet are allocated")]
    Exhausted { max: u32 },
    /// The store holds a different addressing plan than this agent's configuration.
    #[error("IPAM configuration mismatch: the cluster uses {stored:?}, this node is configured with {local:?}")]
    ConfigMismatch { stored: IpamConfig, local: IpamConfig },
    /// A registry value in the store cannot be decoded.
    #[error("malformed value at {key}: {source}")]
    Malformed {
        key: String,
        #[source]
        source: DecodeError,
    },
    /// The ID recorded for this node is claimed by another node (store damaged by hand, or
    /// wiped and another node took the ID first).
    #[error("node {name}: its id {id} is claimed by {holder}")]
    Conflict { name: String, id: u32, holder: String },
    /// The store allocates this node another ID than the one its pods' addresses come from.
    #[error(
        "node {name} runs with id {running} ({running_cidr}), but the store allocates it id {stored}; \
         its pods' addresses would be routed to no node. Restore the allocation, or drain the node \
         and remove its state (the agent's stateDir)"
    )]
    Moved { name: String, running: u32, running_cidr: String, stored: u32 },
    /// Another host holds a live registration under this node name.
    #[error(
        "node name {name} is registered live from {address}, and this node is {ours}: two hosts with one \
         node name would hand out the same pod addresses"
    )]
    NameTaken { name: String, address: std::net::Ipv4Addr, ours: std::net::Ipv4Addr },
    /// Allocation kept losing races (should not happen; bounded to avoid spinning).
    #[error("node {0}: gave up allocating an id after too many concurrent conflicts")]
    Contention(String),
    /// Invalid node name.
    #[error("invalid node name {0:?}")]
    BadName(String),
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, RegistryError> {
    contiv_cluster_model::decode(value).map_err(|source| RegistryError::Malformed { key: key.to_string(), source })
}

/// Registers nodes and allocates their IDs and pod CIDRs in a [`Store`].
#[derive(Clone)]
pub struct NodeRegistry {
    store: Arc<dyn Store>,
    ipam: IpamConfig,
    lease_ttl_secs: i64,
    /// The ID each node name runs with, once known (its addresses are in use): every later
    /// allocation (a re-registration after the store was wiped or restored) claims that
    /// ID or fails; it never moves the node to another pod CIDR.
    pinned: Arc<std::sync::Mutex<BTreeMap<String, u32>>>,
}

/// A live registration. Its lease is kept alive in the background until [`deregister`]
/// or drop (after a drop the lease simply expires).
///
/// [`deregister`]: Registration::deregister
pub struct Registration {
    /// What was registered.
    pub node: NodeRegistration,
    /// The lease the registration key lives under.
    pub lease: LeaseId,
    store: Arc<dyn Store>,
    keep_alive: JoinHandle<StoreError>,
    /// How often the registration key is looked at (as often as the lease is kept alive).
    check_every: Duration,
}

impl Registration {
    /// Resolves when the registration is lost: its lease expired or was revoked, or its key
    /// was deleted or replaced while the lease lives (`etcdctl del`, a restore): the agent
    /// should register again.
    pub async fn lost(&mut self) -> StoreError {
        let key = keys::node(&self.node.name);
        let (store, lease, every) = (&self.store, self.lease, self.check_every);
        let key_gone = async {
            loop {
                tokio::time::sleep(every).await;
                match store.get(&key).await {
                    Ok(Some(kv)) if kv.lease == lease => {}
                    Ok(Some(_)) => return StoreError::Unavailable(format!("{key} was replaced")),
                    Ok(None) => return StoreError::Unavailable(format!("{key} was deleted")),
                    // The keep-alive says whether the store is gone for good.
                    Err(_) => {}
                }
            }
        };
        tokio::select! {
            ended = &mut self.keep_alive => match ended {
                Ok(e) => e,
                Err(join) => StoreError::Unavailable(format!("keep-alive task ended: {join}")),
            },
            e = key_gone => e,
        }
    }

    /// Removes the live registration (revokes the lease). The ID and pod CIDR stay allocated
    /// to this node name.
    pub async fn deregister(self) -> Result<(), RegistryError> {
        self.keep_alive.abort();
        match self.store.lease_revoke(self.lease).await {
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

impl NodeRegistry {
    /// A registry over `store` with this addressing plan and the default lease TTL.
    pub fn new(store: Arc<dyn Store>, ipam: IpamConfig) -> Result<Self, RegistryError> {
        ipam.validate()?;
        Ok(Self { store, ipam, lease_ttl_secs: DEFAULT_LEASE_TTL_SECS, pinned: Default::default() })
    }

    /// Sets the registration lease TTL (seconds).
    pub fn with_lease_ttl(mut self, secs: i64) -> Self {
        self.lease_ttl_secs = secs.max(1);
        self
    }

    /// The addressing plan.
    pub fn ipam(&self) -> &IpamConfig {
        &self.ipam
    }

    /// Registers `name`: checks the cluster plan, allocates (or finds) its ID and pod CIDR,
    /// writes its live registration under a fresh lease and keeps the lease alive.
    pub async fn register(&self, name: &str, details: impl Into<NodeDetails>) -> Result<Registration, RegistryError> {
        let details = details.into();
        // A round fails when the registration key or the allocation changed under it (a
        // concurrent registration, or the departed-node sweep releasing the allocation
        // between the two): the next round allocates again (the pin brings the same ID back).
        for _ in 0..REGISTER_ROUNDS {
            if let Some(reg) = self.try_register(name, &details).await? {
                return Ok(reg);
            }
        }
        Err(RegistryError::Contention(name.to_string()))
    }

    /// One round of [`Self::register`]; `None` when its transaction's compares failed.
    async fn try_register(&self, name: &str, details: &NodeDetails) -> Result<Option<Registration>, RegistryError> {
        let details = details.clone();
        let alloc = self.allocate(name).await?;
        // The registration holds only while the allocation and the ID's claim are as they
        // are now: a release (which needs the node unregistered) that slipped in after the
        // allocation would otherwise leave a live node whose ID the next new node gets.
        let alloc_key = keys::ipam_node(name);
        let claim_key = keys::node_id(alloc.id);
        let (Some(alloc_kv), Some(claim_kv)) = (self.store.get(&alloc_key).await?, self.store.get(&claim_key).await?)
        else {
            log::warn!("node {name}: its allocation was released while it registered; allocating again");
            return Ok(None);
        };
        let still_ours = contiv_cluster_model::decode::<IpamAllocation>(&alloc_kv.value)
            .is_ok_and(|a| a.id == alloc.id)
            && contiv_cluster_model::decode::<NodeIdClaim>(&claim_kv.value).is_ok_and(|c| c.name == name);
        if !still_ours {
            log::warn!("node {name}: its allocation changed while it registered; allocating again");
            return Ok(None);
        }
        let node = NodeRegistration {
            name: name.to_string(),
            id: alloc.id,
            addresses: details.addresses,
            pod_cidr: alloc.pod_cidr,
            uplink_ip: details.uplink_ip,
        };
        // A live registration of this name from another underlay address is another host
        // with the same node name (a cloned machine): both would hand out the same pod
        // addresses. Refused until that one's lease ends (a node whose address changed
        // waits one lease TTL).
        let key = keys::node(name);
        let existing = self.store.get(&key).await?;
        let compare = match &existing {
            Some(kv) => {
                if let Ok(live) = contiv_cluster_model::decode::<NodeRegistration>(&kv.value)
                    && let (Some(theirs), Some(ours)) = (live.uplink_ip, node.uplink_ip)
                    && theirs != ours
                {
                    return Err(RegistryError::NameTaken { name: name.to_string(), address: theirs, ours });
                }
                Compare::ModRevision(key.clone(), kv.mod_revision)
            }
            None => Compare::Absent(key.clone()),
        };
        let lease = self.store.lease_grant(self.lease_ttl_secs).await?;
        let res = self
            .store
            .txn(Txn {
                compares: vec![
                    compare,
                    Compare::ModRevision(alloc_key, alloc_kv.mod_revision),
                    Compare::ModRevision(claim_key, claim_kv.mod_revision),
                ],
                success: vec![TxnOp::Put {
                    key: key.clone(),
                    value: contiv_cluster_model::encode(&node),
                    lease: Some(lease),
                }],
                failure: vec![],
            })
            .await?;
        if !res.succeeded {
            let _ = self.store.lease_revoke(lease).await;
            return Ok(None);
        }
        let interval = Duration::from_millis((self.lease_ttl_secs as u64 * 1000 / 3).max(100));
        let keep_alive = contiv_store::spawn_keep_alive(self.store.clone(), lease, interval);
        log::info!("node {name} registered: id {}, pod CIDR {}", node.id, node.pod_cidr);
        Ok(Some(Registration { node, lease, store: self.store.clone(), keep_alive, check_every: interval }))
    }

    /// Keeps `name` registered until `shutdown` resolves: registers, and when the lease is
    /// lost (e.g. etcd was unreachable longer than the TTL) registers again with backoff.
    /// `on_registered` sees every (re-)registration (the ID and CIDR never change for a name).
    /// At shutdown the registration is withdrawn.
    pub async fn keep_registered(
        &self,
        name: &str,
        details: impl Into<NodeDetails>,
        mut on_registered: impl FnMut(&NodeRegistration) + Send,
        shutdown: impl Future<Output = ()>,
    ) {
        let details = details.into();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut reg = tokio::select! {
                r = self.register(name, details.clone()) => match r {
                    Ok(reg) => reg,
                    Err(e) => {
                        log::warn!("registering node {name} failed: {e}; retrying in {backoff:?}");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = &mut shutdown => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            backoff = Duration::from_millis(200);
            on_registered(&reg.node);
            tokio::select! {
                e = reg.lost() => log::warn!("node {name} lost its registration ({e}); registering again"),
                () = &mut shutdown => {
                    if let Err(e) = reg.deregister().await {
                        log::warn!("withdrawing the registration of node {name}: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Withdraws the live registration of `name` if it is the one at `uplink_ip` (an agent
    /// whose node IP changed, before it restarts to register the new one): its lease is
    /// revoked. A registration at another address, or none, is left alone.
    pub async fn withdraw(&self, name: &str, uplink_ip: std::net::Ipv4Addr) -> Result<(), RegistryError> {
        let key = keys::node(name);
        let Some(kv) = self.store.get(&key).await? else { return Ok(()) };
        let live: NodeRegistration = decode(&kv.key, &kv.value)?;
        if live.uplink_ip != Some(uplink_ip) || kv.lease == 0 {
            return Ok(());
        }
        match self.store.lease_revoke(kv.lease).await {
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the plan if the cluster has none; fails if the cluster has a different one.
    pub async fn ensure_ipam_config(&self) -> Result<(), RegistryError> {
        let res = self
            .store
            .txn(Txn {
                compares: vec![Compare::Absent(keys::IPAM_CONFIG.into())],
                success: vec![TxnOp::Put {
                    key: keys::IPAM_CONFIG.into(),
                    value: contiv_cluster_model::encode(&self.ipam),
                    lease: None,
                }],
                failure: vec![TxnOp::Get { key: keys::IPAM_CONFIG.into() }],
            })
            .await?;
        if res.succeeded {
            return Ok(());
        }
        let Some(Some(kv)) = res.gets.into_iter().next() else {
            return Ok(()); // deleted in between: nothing to disagree with
        };
        let stored: IpamConfig = decode(&kv.key, &kv.value)?;
        if stored != self.ipam {
            return Err(RegistryError::ConfigMismatch { stored, local: self.ipam });
        }
        Ok(())
    }

    /// Allocates the node's ID and pod CIDR, or returns the ones it already has. Once this
    /// registry allocated (or [`Self::pin`] named) an ID, only that one.
    pub async fn allocate(&self, name: &str) -> Result<IpamAllocation, RegistryError> {
        let pinned = self.pins().get(name).copied();
        let alloc = self.allocate_as(name, pinned).await?;
        self.pins().insert(name.to_string(), alloc.id);
        Ok(alloc)
    }

    /// Node `name` runs with the pod CIDR of `id` (its state says so): allocations claim it.
    pub fn pin(&self, name: &str, id: u32) {
        self.pins().insert(name.to_string(), id);
    }

    fn pins(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u32>> {
        self.pinned.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Self::allocate`], claiming `want` when the store has no allocation for the node (a
    /// wiped or restored store); an allocation of another ID is an error.
    async fn allocate_as(&self, name: &str, want: Option<u32>) -> Result<IpamAllocation, RegistryError> {
        if name.is_empty() || name.contains('/') {
            return Err(RegistryError::BadName(name.to_string()));
        }
        self.ensure_ipam_config().await?;
        let max = self.ipam.max_node_id();
        let alloc_key = keys::ipam_node(name);
        // Each failed round means another node won an ID, so this is bounded by the id space.
        let rounds = (max as usize).saturating_add(64).min(100_000);
        for _ in 0..rounds {
            if let Some(kv) = self.store.get(&alloc_key).await? {
                let alloc: IpamAllocation = decode(&kv.key, &kv.value)?;
                if let Some(running) = want.filter(|w| *w != alloc.id) {
                    return Err(RegistryError::Moved {
                        name: name.to_string(),
                        running,
                        running_cidr: self.ipam.pod_cidr(running).map(|c| c.to_string()).unwrap_or_default(),
                        stored: alloc.id,
                    });
                }
                self.confirm_claim(&alloc).await?;
                return Ok(alloc);
            }
            let taken = self.allocations_by_id().await?;
            let id = match want {
                Some(w) => match taken.get(&w) {
                    Some(holder) if holder != name => {
                        return Err(RegistryError::Conflict { name: name.to_string(), id: w, holder: holder.clone() });
                    }
                    _ => w,
                },
                None => match (1..=max).find(|id| !taken.contains_key(id)) {
                    Some(id) => id,
                    None => return Err(RegistryError::Exhausted { max }),
                },
            };
            if want.is_some() {
                log::warn!("node {name}: the store has no allocation for it; claiming its id {id} again");
            }
            let alloc = IpamAllocation { name: name.to_string(), id, pod_cidr: self.ipam.pod_cidr(id)? };
            let claim = NodeIdClaim { name: name.to_string() };
            // The ID's claim may already name this node (its allocation alone was lost): it
            // is written again, compared by its revision.
            let ours = if taken.contains_key(&id) { self.store.get(&keys::node_id(id)).await? } else { None };
            let claim_compare = match ours {
                Some(kv) => Compare::ModRevision(kv.key, kv.mod_revision),
                None => Compare::Absent(keys::node_id(id)),
            };
            let res = self
                .store
                .txn(Txn {
                    compares: vec![claim_compare, Compare::Absent(alloc_key.clone())],
                    success: vec![
                        TxnOp::Put { key: keys::node_id(id), value: contiv_cluster_model::encode(&claim), lease: None },
                        TxnOp::Put { key: alloc_key.clone(), value: contiv_cluster_model::encode(&alloc), lease: None },
                    ],
                    failure: vec![],
                })
                .await?;
            if res.succeeded {
                log::info!("node {name}: allocated id {id}, pod CIDR {}", alloc.pod_cidr);
                return Ok(alloc);
            }
        }
        Err(RegistryError::Contention(name.to_string()))
    }

    /// Makes sure the ID claim of an existing allocation is there and names this node.
    async fn confirm_claim(&self, alloc: &IpamAllocation) -> Result<(), RegistryError> {
        let key = keys::node_id(alloc.id);
        let res = self
            .store
            .txn(Txn {
                compares: vec![Compare::Absent(key.clone())],
                success: vec![TxnOp::Put {
                    key: key.clone(),
                    value: contiv_cluster_model::encode(&NodeIdClaim { name: alloc.name.clone() }),
                    lease: None,
                }],
                failure: vec![TxnOp::Get { key: key.clone() }],
            })
            .await?;
        if let Some(Some(kv)) = res.gets.into_iter().next() {
            let claim: NodeIdClaim = decode(&kv.key, &kv.value)?;
            if claim.name != alloc.name {
                return Err(RegistryError::Conflict { name: alloc.name.clone(), id: alloc.id, holder: claim.name });
            }
        }
        Ok(())
    }

    /// Frees a node's ID and pod CIDR (the node left the cluster for good), as
    /// [`DepartedNodes`] does: in one transaction that holds only while the allocation is as
    /// read and the node has no live registration. The ID's claim is deleted with it only if
    /// it names this node; a claim of the ID by another node stays. Returns whether the
    /// allocation was released (false: there is none, the node is registered, or a
    /// concurrent change won).
    pub async fn release(&self, name: &str) -> Result<bool, RegistryError> {
        let alloc_key = keys::ipam_node(name);
        let Some(kv) = self.store.get(&alloc_key).await? else { return Ok(false) };
        let alloc: IpamAllocation = decode(&kv.key, &kv.value)?;
        let claim_key = keys::node_id(alloc.id);
        let mut compares =
            vec![Compare::ModRevision(alloc_key.clone(), kv.mod_revision), Compare::Absent(keys::node(name))];
        let mut success = vec![TxnOp::Delete { key: alloc_key }];
        match self.store.get(&claim_key).await? {
            Some(claim) => {
                // The claim as read: ours is deleted, another node's is left alone.
                compares.push(Compare::ModRevision(claim_key.clone(), claim.mod_revision));
                if contiv_cluster_model::decode::<NodeIdClaim>(&claim.value).is_ok_and(|c| c.name == name) {
                    success.push(TxnOp::Delete { key: claim_key });
                }
            }
            None => compares.push(Compare::Absent(claim_key)),
        }
        let res = self.store.txn(Txn { compares, success, failure: vec![] }).await?;
        Ok(res.succeeded)
    }

    /// ID claims: id -> node name. Malformed claims still count as taken (logged).
    pub async fn allocations_by_id(&self) -> Result<BTreeMap<u32, String>, RegistryError> {
        let list = self.store.list(keys::NODE_IDS_PREFIX).await?;
        let mut out = BTreeMap::new();
        for kv in list.kvs {
            let Some(id) = keys::parse_node_id(&kv.key) else {
                log::warn!("ignoring unexpected key {} under {}", kv.key, keys::NODE_IDS_PREFIX);
                continue;
            };
            let name = match contiv_cluster_model::decode::<NodeIdClaim>(&kv.value) {
                Ok(c) => c.name,
                Err(e) => {
                    log::warn!("malformed node id claim at {}: {e}; treating the id as taken", kv.key);
                    String::new()
                }
            };
            out.insert(id, name);
        }
        Ok(out)
    }

    /// Every node's allocation (name -> allocation); malformed values are logged and skipped.
    pub async fn allocations(&self) -> Result<Vec<IpamAllocation>, RegistryError> {
        Ok(self.decode_all(keys::IPAM_NODES_PREFIX).await?)
    }

    /// The live registrations; malformed values are logged and skipped.
    pub async fn nodes(&self) -> Result<Vec<NodeRegistration>, RegistryError> {
        Ok(self.decode_all(keys::NODES_PREFIX).await?)
    }

    async fn decode_all<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        let list = self.store.list(prefix).await?;
        Ok(list
            .kvs
            .into_iter()
            .filter_map(|kv| match contiv_cluster_model::decode(&kv.value) {
                Ok(v) => Some(v),
                Err(e) => {
                    log::warn!("skipping malformed value at {}: {e}", kv.key);
                    None
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn registry() -> (tempfile::TempDir, Arc<dyn Store>, NodeRegistry) {
        let dir = tempfile::tempdir().unwrap();
        let store = contiv_store::open(&contiv_store::StoreConfig::embedded(dir.path())).await.unwrap();
        let registry = NodeRegistry::new(store.clone(), IpamConfig::default()).unwrap();
        registry.ensure_ipam_config().await.unwrap();
        (dir, store, registry)
    }

    async fn claim_of(store: &dyn Store, id: u32) -> Option<String> {
        let kv = store.get(&keys::node_id(id)).await.unwrap()?;
        Some(contiv_cluster_model::decode::<NodeIdClaim>(&kv.value).unwrap().name)
    }

    #[tokio::test]
    async fn release_leaves_another_nodes_claim_of_the_id() {
        let (_dir, store, registry) = registry().await;
        // "a"'s allocation says id 5, but the claim of 5 names "b" (a damaged or raced store).
        let alloc = IpamAllocation { name: "a".into(), id: 5, pod_cidr: registry.ipam().pod_cidr(5).unwrap() };
        store.put(&keys::ipam_node("a"), contiv_cluster_model::encode(&alloc), None).await.unwrap();
        store
            .put(&keys::node_id(5), contiv_cluster_model::encode(&NodeIdClaim { name: "b".into() }), None)
            .await
            .unwrap();
        assert!(registry.release("a").await.unwrap(), "a's allocation is released");
        assert_eq!(store.get(&keys::ipam_node("a")).await.unwrap(), None);
        assert_eq!(claim_of(store.as_ref(), 5).await.as_deref(), Some("b"), "b keeps its claim of id 5");
    }

    /// The departed-node sweep's release (which holds only while the node is unregistered)
    /// lands between the allocation and the registration: the node must not end up live
    /// without an allocation, whose ID the next new node would be given.
    #[tokio::test]
    async fn a_release_between_allocation_and_registration_does_not_free_a_live_nodes_id() {
        use contiv_store::testing::{Call, Intercept, Intercepted};
        struct ReleaseOnce(std::sync::atomic::AtomicBool);
        #[async_trait::async_trait]
        impl Intercept for ReleaseOnce {
            async fn before(&self, inner: &dyn Store, call: Call<'_>) -> Result<(), contiv_store::StoreError> {
                let registers = |t: &Txn| {
                    t.success.iter().any(|op| matches!(op, TxnOp::Put { key, .. } if *key == keys::node("a")))
                };
                if let Call::Txn(t) = call
                    && registers(t)
                    && !self.0.swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    // What `release("a")` writes: the allocation and its own claim go.
                    let kv = inner.get(&keys::ipam_node("a")).await?.expect("a was allocated");
                    let alloc: IpamAllocation = contiv_cluster_model::decode(&kv.value).unwrap();
                    let res = inner
                        .txn(Txn {
                            compares: vec![Compare::Absent(keys::node("a"))],
                            success: vec![
                                TxnOp::Delete { key: keys::ipam_node("a") },
                                TxnOp::Delete { key: keys::node_id(alloc.id) },
                            ],
                            failure: vec![],
                        })
                        .await?;
                    assert!(res.succeeded, "the release went through");
                }
                Ok(())
            }
        }
        let (_dir, store, _) = registry().await;
        let raced: Arc<dyn Store> = Intercepted::new(store.clone(), ReleaseOnce(Default::default()));
        let registry = NodeRegistry::new(raced, IpamConfig::default()).unwrap();
        let a = registry.register("a", NodeDetails::default()).await.unwrap();
        assert_eq!(a.node.id, 1);
        let kv = store.get(&keys::ipam_node("a")).await.unwrap().expect("a live node keeps an allocation");
        assert_eq!(contiv_cluster_model::decode::<IpamAllocation>(&kv.value).unwrap().id, 1);
        assert_eq!(claim_of(store.as_ref(), 1).await.as_deref(), Some("a"), "and the claim of its ID");
        let b = registry.allocate("b").await.unwrap();
        assert_ne!(b.id, a.node.id, "a new node gets another ID than a live one");
    }

    #[tokio::test]
    async fn release_of_a_live_node_does_nothing() {
        let (_dir, store, registry) = registry().await;
        let reg = registry.register("a", NodeDetails::default()).await.unwrap();
        assert!(!registry.release("a").await.unwrap(), "a registered node keeps its allocation");
        assert!(store.get(&keys::ipam_node("a")).await.unwrap().is_some());
        let id = reg.node.id;
        assert_eq!(claim_of(store.as_ref(), id).await.as_deref(), Some("a"));
        reg.deregister().await.unwrap();
        assert!(registry.release("a").await.unwrap(), "released once it is gone");
        assert_eq!(store.get(&keys::ipam_node("a")).await.unwrap(), None);
        assert_eq!(claim_of(store.as_ref(), id).await, None, "its own claim goes with it");
    }
}
