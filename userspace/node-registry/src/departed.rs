//! Releasing the node ID and pod CIDR of nodes that left the cluster.
//!
//! An allocation outlives its agent on purpose (a restarted agent gets its ID and CIDR
//! back), so nothing frees it when a node is removed. In a cluster whose nodes come and go
//! (autoscaling, replaced machines) the plan's IDs would run out. contiv-ksr, which knows
//! the cluster's Nodes, sweeps periodically with [`DepartedNodes`]: an allocation whose node
//! is neither a Kubernetes Node nor registered (no live agent) in two sweeps in a row, and
//! unchanged in between, is released. The release is one transaction that holds only if the
//! allocation is still as read and the node is still not registered.

use std::collections::{BTreeMap, BTreeSet};

use contiv_cluster_model::keys;
use contiv_store::{Compare, Revision, Store, StoreError, Txn, TxnOp};

use crate::{IpamAllocation, NodeIdClaim};

/// Finds and releases the allocations of departed nodes; remembers candidates between sweeps.
#[derive(Debug, Default)]
pub struct DepartedNodes {
    /// Candidates of the last sweep: node name -> revision of its allocation.
    candidates: BTreeMap<String, Revision>,
}

impl DepartedNodes {
    /// A sweeper with no candidates yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Node names that were candidates in the last sweep (released in the next one if still so).
    pub fn candidates(&self) -> impl Iterator<Item = &str> {
        self.candidates.keys().map(String::as_str)
    }

    /// One sweep. `members` are the cluster's nodes (the names of its Kubernetes Nodes).
    /// An allocation of a name that is not a member and has no live registration becomes a
    /// candidate; one that was a candidate with the same revision in the previous sweep is
    /// released. Returns the allocations released.
    pub async fn sweep(
        &mut self,
        store: &dyn Store,
        members: &BTreeSet<String>,
    ) -> Result<Vec<IpamAllocation>, StoreError> {
        let registered: BTreeSet<String> = store
            .list(keys::NODES_PREFIX)
            .await?
            .kvs
            .into_iter()
            .filter_map(|kv| kv.key.strip_prefix(keys::NODES_PREFIX).map(str::to_string))
            .collect();
        let allocations = store.list(keys::IPAM_NODES_PREFIX).await?;
        let mut candidates = BTreeMap::new();
        let mut released = Vec::new();
        for kv in allocations.kvs {
            let alloc: IpamAllocation = match contiv_cluster_model::decode(&kv.value) {
                Ok(a) => a,
                Err(e) => {
                    log::warn!("skipping malformed allocation at {}: {e}", kv.key);
                    continue;
                }
            };
            if kv.key != keys::ipam_node(&alloc.name) {
                log::warn!("skipping allocation at {} naming node {}", kv.key, alloc.name);
                continue;
            }
            if members.contains(&alloc.name) || registered.contains(&alloc.name) {
                continue;
            }
            if self.candidates.get(&alloc.name) == Some(&kv.mod_revision) {
                if release(store, &alloc, kv.mod_revision).await? {
                    log::info!(
                        "released node id {} and pod CIDR {} of node {}: it is no Kubernetes Node and has no live agent",
                        alloc.id,
                        alloc.pod_cidr,
                        alloc.name
                    );
                    released.push(alloc);
                }
                // Lost a race (the node registered or was re-allocated): looked at again next time.
                continue;
            }
            candidates.insert(alloc.name, kv.mod_revision);
        }
        self.candidates = candidates;
        Ok(released)
    }
}

/// Deletes `alloc` (read at `revision`) and its ID claim, if the allocation is unchanged and
/// the node has no registration. A claim of the ID by another node is left alone.
async fn release(store: &dyn Store, alloc: &IpamAllocation, revision: Revision) -> Result<bool, StoreError> {
    let alloc_key = keys::ipam_node(&alloc.name);
    let claim_key = keys::node_id(alloc.id);
    let mut compares =
        vec![Compare::ModRevision(alloc_key.clone(), revision), Compare::Absent(keys::node(&alloc.name))];
    let mut success = vec![TxnOp::Delete { key: alloc_key }];
    if let Some(claim) = store.get(&claim_key).await?
        && contiv_cluster_model::decode::<NodeIdClaim>(&claim.value).is_ok_and(|c| c.name == alloc.name)
    {
        compares.push(Compare::ModRevision(claim_key.clone(), claim.mod_revision));
        success.push(TxnOp::Delete { key: claim_key });
    }
    Ok(store.txn(Txn { compares, success, failure: vec![] }).await?.succeeded)
}
