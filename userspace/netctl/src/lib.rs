//! netctl: runs the plugin without Kubernetes by writing Kubernetes manifests into the contiv
//! store in exactly the model contiv-ksr writes, and inspects what the store holds.
//!
//! - [`manifest`]: YAML -> k8s-openapi types -> model (`contiv-cluster-model`), with errors
//!   naming the file, document and field.
//! - [`apply`] / [`delete`]: write or remove the objects' keys.
//! - [`get`]: tables (or JSON) of nodes, pods, services, endpoints, policies, IPAM.
//! - [`node`]: what a node's agent enforces, read from its maps (`get policies --node`).
//! - [`inspect`]: a node's datapath live through its agent (`monitor`, `trace`).

pub mod agent;
pub mod get;
pub mod inspect;
pub mod manifest;
pub mod node;

use std::sync::Arc;

use contiv_cluster_model::{ClusterObject, ObjectRef};
use contiv_store::{Store, StoreError};

/// What apply did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The key did not exist.
    Created,
    /// The key held a different value.
    Configured,
    /// The key already held this value; nothing written.
    Unchanged,
}

/// What delete did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The key was removed.
    Deleted,
    /// There was no such key.
    NotFound,
}

/// Writes each object under its key, skipping values that are already stored.
pub async fn apply(
    store: &Arc<dyn Store>,
    objects: &[ClusterObject],
) -> Result<Vec<(String, ApplyOutcome)>, StoreError> {
    let mut out = Vec::with_capacity(objects.len());
    for obj in objects {
        let key = obj.key();
        let value = obj.encode();
        let outcome = match store.get(&key).await? {
            Some(kv) if kv.value == value => ApplyOutcome::Unchanged,
            Some(_) => ApplyOutcome::Configured,
            None => ApplyOutcome::Created,
        };
        if outcome != ApplyOutcome::Unchanged {
            store.put(&key, value, None).await?;
        }
        out.push((key, outcome));
    }
    Ok(out)
}

/// Removes each object's key.
pub async fn delete(store: &Arc<dyn Store>, objects: &[ObjectRef]) -> Result<Vec<(String, DeleteOutcome)>, StoreError> {
    let mut out = Vec::with_capacity(objects.len());
    for obj in objects {
        let key = obj.key();
        let outcome = if store.delete(&key).await? { DeleteOutcome::Deleted } else { DeleteOutcome::NotFound };
        out.push((key, outcome));
    }
    Ok(out)
}
