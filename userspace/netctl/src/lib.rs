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
use contiv_store::{Compare, KeyValue, Store, StoreError, Txn, TxnOp};

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

/// Objects per store transaction. etcd refuses a request with more than 128 operations
/// (`--max-txn-ops`) or over 1.5 MiB (`--max-request-bytes`); a batch holds one compare and
/// one write per object, so stay under both with room to spare.
pub const TXN_MAX_OBJECTS: usize = 100;
/// Bytes of keys and values per store transaction: etcd's default 1.5 MiB per request, less
/// 64 KiB for the compares, keys and framing. Also the most one object may take (the
/// Kubernetes API server stores nothing larger either), so a set that one request can
/// carry is always written in one.
pub const TXN_MAX_BYTES: usize = 1536 * 1024 - 64 * 1024;
/// How often a batch is read again when another writer changed one of its keys between
/// netctl's read and its write.
const CONTENDED_RETRIES: usize = 5;

/// Why apply or delete stopped.
#[derive(Debug, thiserror::Error)]
pub enum WriteFailure {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another writer kept changing a key of the batch between netctl's read and its write.
    #[error("the store kept changing under netctl (another writer on {0}); tried {CONTENDED_RETRIES} times")]
    Contended(String),
    /// One object alone is larger than a store request may be.
    #[error("{key} is {bytes} bytes encoded; netctl writes at most {TXN_MAX_BYTES} bytes per store request")]
    TooLarge { key: String, bytes: usize },
}

/// A failed apply or delete: the cause, and what earlier transactions already wrote.
///
/// A manifest of up to [`TXN_MAX_OBJECTS`] objects is written in one transaction, so it lands
/// completely or not at all; a larger one is written in batches, each all-or-nothing, and
/// `done` lists the objects of the batches that landed before the failure.
#[derive(Debug)]
pub struct WriteError<O> {
    pub cause: WriteFailure,
    pub done: Vec<(String, O)>,
}

impl<O> std::fmt::Display for WriteError<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.done.len() {
            0 => write!(f, "{}; nothing was written", self.cause),
            n => write!(
                f,
                "{}; the first {n} objects were written (in transactions of up to {TXN_MAX_OBJECTS}), the rest were not",
                self.cause
            ),
        }
    }
}

impl<O: std::fmt::Debug> std::error::Error for WriteError<O> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

/// Splits keyed items into batches of at most [`TXN_MAX_OBJECTS`] items and
/// [`TXN_MAX_BYTES`] bytes (no item is larger: [`write_all`] checks first).
fn batches<T>(items: Vec<(String, T)>, size: impl Fn(&T) -> usize) -> Vec<Vec<(String, T)>> {
    contiv_store::batches(items, TXN_MAX_OBJECTS, TXN_MAX_BYTES, |(key, item)| key.len() + size(item))
}

/// Reads a batch's keys in one transaction: each key's current entry, in order.
async fn read_batch<T>(store: &Arc<dyn Store>, batch: &[(String, T)]) -> Result<Vec<Option<KeyValue>>, StoreError> {
    let txn = Txn {
        compares: Vec::new(),
        success: batch.iter().map(|(key, _)| TxnOp::Get { key: key.clone() }).collect(),
        failure: Vec::new(),
    };
    Ok(store.txn(txn).await?.gets)
}

/// The compare that holds while a key is as it was read.
fn unchanged_since_read(key: &str, read: &Option<KeyValue>) -> Compare {
    match read {
        Some(kv) => Compare::ModRevision(key.to_string(), kv.mod_revision),
        None => Compare::Absent(key.to_string()),
    }
}

/// Runs one batch: read its keys, decide each key's outcome and operation, and write the
/// operations in one transaction that holds only if no key changed since the read (else read
/// again). Returns the outcomes in batch order.
async fn write_batch<T, O>(
    store: &Arc<dyn Store>,
    batch: &[(String, T)],
    decide: impl Fn(&str, &T, &Option<KeyValue>) -> (O, Option<TxnOp>),
) -> Result<Vec<(String, O)>, WriteFailure> {
    for _ in 0..CONTENDED_RETRIES {
        let read = read_batch(store, batch).await?;
        let mut compares = Vec::with_capacity(batch.len());
        let mut ops = Vec::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        for ((key, item), current) in batch.iter().zip(&read) {
            let (outcome, op) = decide(key, item, current);
            compares.push(unchanged_since_read(key, current));
            ops.extend(op);
            outcomes.push((key.clone(), outcome));
        }
        if ops.is_empty() || store.txn(Txn { compares, success: ops, failure: Vec::new() }).await?.succeeded {
            return Ok(outcomes);
        }
    }
    Err(WriteFailure::Contended(batch.first().map(|(k, _)| k.clone()).unwrap_or_default()))
}

/// Runs the batches in order; a failure reports what the earlier batches wrote.
async fn write_all<T, O>(
    store: &Arc<dyn Store>,
    items: Vec<(String, T)>,
    size: impl Fn(&T) -> usize,
    decide: impl Fn(&str, &T, &Option<KeyValue>) -> (O, Option<TxnOp>) + Copy,
) -> Result<Vec<(String, O)>, WriteError<O>> {
    // An object no request can carry fails the whole set before anything is written.
    if let Some((key, item)) = items.iter().find(|(k, v)| k.len() + size(v) > TXN_MAX_BYTES) {
        let cause = WriteFailure::TooLarge { key: key.clone(), bytes: key.len() + size(item) };
        return Err(WriteError { cause, done: Vec::new() });
    }
    let mut done = Vec::with_capacity(items.len());
    for batch in batches(items, size) {
        match write_batch(store, &batch, decide).await {
            Ok(outcomes) => done.extend(outcomes),
            Err(cause) => return Err(WriteError { cause, done }),
        }
    }
    Ok(done)
}

/// Writes each object under its key, skipping values that are already stored.
///
/// Atomic: up to [`TXN_MAX_OBJECTS`] objects land in one store transaction, all or none (see
/// [`WriteError`] for larger sets). An object named twice is written once, with the value it
/// has last, and reported once. A key another writer changes between netctl's read and its
/// write makes netctl read and decide again, so the outcomes reported are what happened.
pub async fn apply(
    store: &Arc<dyn Store>,
    objects: &[ClusterObject],
) -> Result<Vec<(String, ApplyOutcome)>, WriteError<ApplyOutcome>> {
    let items = dedup_last_wins(objects.iter().map(|o| (o.key(), o.encode())));
    write_all(store, items, Vec::len, |key, value, current| match current {
        Some(kv) if kv.value == *value => (ApplyOutcome::Unchanged, None),
        _ => (
            if current.is_some() { ApplyOutcome::Configured } else { ApplyOutcome::Created },
            Some(TxnOp::Put { key: key.to_string(), value: value.clone(), lease: None }),
        ),
    })
    .await
}

/// Removes each object's key; atomic like [`apply`].
pub async fn delete(
    store: &Arc<dyn Store>,
    objects: &[ObjectRef],
) -> Result<Vec<(String, DeleteOutcome)>, WriteError<DeleteOutcome>> {
    let items = dedup_last_wins(objects.iter().map(|o| (o.key(), ())));
    write_all(
        store,
        items,
        |_| 0,
        |key, _, current| match current {
            Some(_) => (DeleteOutcome::Deleted, Some(TxnOp::Delete { key: key.to_string() })),
            None => (DeleteOutcome::NotFound, None),
        },
    )
    .await
}

/// One entry per key, in order of first appearance, holding the key's last value (a store
/// transaction may not name a key twice).
fn dedup_last_wins<T>(items: impl Iterator<Item = (String, T)>) -> Vec<(String, T)> {
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut out: Vec<(String, T)> = Vec::new();
    for (key, value) in items {
        match index.get(&key) {
            Some(&i) => out[i].1 = value,
            None => {
                index.insert(key.clone(), out.len());
                out.push((key, value));
            }
        }
    }
    out
}
