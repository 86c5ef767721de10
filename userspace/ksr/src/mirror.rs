//! The store side of the reflector: the desired content of each kind's key prefix (what the
//! API server says exists) and the writes that make the store hold exactly that.
//!
//! Watcher tasks feed it ([`Mirror::replace`] after each (re)list, [`Mirror::apply`] /
//! [`Mirror::remove`] for watch events). Writes whose value is unchanged are skipped. A write
//! that fails marks the kind dirty; [`Mirror::repair`] (run periodically) converges dirty kinds
//! by listing the store and diffing, and resyncs everything when the KSR marker key is gone
//! (the store lost its data).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use contiv_cluster_model::keys::{self, Kind};
use contiv_store::{Store, StoreError};
use tokio::sync::Mutex;

/// Counters exported on /metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Keys written (puts that changed a value).
    pub puts: AtomicU64,
    /// Puts skipped because the store already held the value.
    pub unchanged: AtomicU64,
    /// Keys deleted.
    pub deletes: AtomicU64,
    /// Store operations that failed.
    pub store_errors: AtomicU64,
    /// Objects that could not be converted into the model (skipped).
    pub convert_errors: AtomicU64,
    /// Errors reported by the Kubernetes watchers (each is retried with backoff).
    pub watch_errors: AtomicU64,
    /// Full resyncs after the marker key went missing.
    pub marker_resyncs: AtomicU64,
    /// Converges of a kind's prefix (after each list and each repair).
    pub converges: AtomicU64,
}

#[derive(Debug, Default)]
struct KindState {
    /// Key -> encoded value of every object of the kind the API server has.
    desired: BTreeMap<String, Vec<u8>>,
    /// The kind has been listed at least once.
    synced: bool,
    /// A store write failed; the store may differ from `desired`.
    dirty: bool,
}

#[derive(Debug, Default)]
struct State {
    kinds: BTreeMap<Kind, KindState>,
    /// The marker was written after every kind synced.
    marker_written: bool,
    /// The last store operation failed.
    store_down: bool,
}

/// A per-kind snapshot for health and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindStatus {
    /// The kind.
    pub kind: Kind,
    /// Objects reflected.
    pub objects: usize,
    /// Listed at least once.
    pub synced: bool,
    /// Store possibly out of date (a write failed, repair pending).
    pub dirty: bool,
}

/// See the module docs.
pub struct Mirror {
    store: Arc<dyn Store>,
    kinds: Vec<Kind>,
    state: Mutex<State>,
    /// Counters for /metrics.
    pub counters: Counters,
}

impl Mirror {
    /// A mirror writing `kinds` into `store`.
    pub fn new(store: Arc<dyn Store>, kinds: &[Kind]) -> Self {
        let state = State { kinds: kinds.iter().map(|k| (*k, KindState::default())).collect(), ..State::default() };
        Mirror { store, kinds: kinds.to_vec(), state: Mutex::new(state), counters: Counters::default() }
    }

    /// The store written to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn note<T>(&self, state: &mut State, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => state.store_down = false,
            Err(_) => {
                state.store_down = true;
                self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// Replaces the desired content of `kind` (after a list) and converges the store to it.
    pub async fn replace(&self, kind: Kind, desired: BTreeMap<String, Vec<u8>>) {
        let mut state = self.state.lock().await;
        let ks = state.kinds.entry(kind).or_default();
        ks.desired = desired;
        ks.synced = true;
        ks.dirty = true;
        self.converge(&mut state, kind).await;
        self.write_marker_if_ready(&mut state).await;
    }

    /// An object was added or changed.
    pub async fn apply(&self, kind: Kind, key: String, value: Vec<u8>) {
        let mut state = self.state.lock().await;
        let ks = state.kinds.entry(kind).or_default();
        if ks.desired.get(&key) == Some(&value) && !ks.dirty {
            self.counters.unchanged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        ks.desired.insert(key.clone(), value.clone());
        let r = self.store.put(&key, value, None).await;
        if self.note(&mut state, r).is_ok() {
            self.counters.puts.fetch_add(1, Ordering::Relaxed);
        } else {
            log::warn!("store write of {key} failed; will repair");
            state.kinds.entry(kind).or_default().dirty = true;
        }
    }

    /// An object was deleted (or can no longer be represented).
    pub async fn remove(&self, kind: Kind, key: &str) {
        let mut state = self.state.lock().await;
        let ks = state.kinds.entry(kind).or_default();
        let known = ks.desired.remove(key).is_some();
        if !known && !ks.dirty && ks.synced {
            return;
        }
        let r = self.store.delete(key).await;
        match self.note(&mut state, r) {
            Ok(existed) => {
                if existed {
                    self.counters.deletes.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                log::warn!("store delete of {key} failed: {e}; will repair");
                state.kinds.entry(kind).or_default().dirty = true;
            }
        }
    }

    /// Makes the store's prefix of `kind` equal to the desired content: puts what differs,
    /// deletes what the API server no longer has. Clears `dirty` on success.
    async fn converge(&self, state: &mut State, kind: Kind) {
        let prefix = kind.prefix();
        let listed = self.store.list(&prefix).await;
        let listed = match self.note(state, listed) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("listing {prefix} failed: {e}; will retry");
                return;
            }
        };
        self.counters.converges.fetch_add(1, Ordering::Relaxed);
        let Some(ks) = state.kinds.get(&kind) else { return };
        let mut actual: BTreeMap<String, Vec<u8>> = listed.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let mut writes = Vec::new();
        for (key, value) in &ks.desired {
            match actual.remove(key) {
                Some(v) if &v == value => {
                    self.counters.unchanged.fetch_add(1, Ordering::Relaxed);
                }
                _ => writes.push((key.clone(), value.clone())),
            }
        }
        let stale: Vec<String> = actual.into_keys().collect();
        let mut ok = true;
        for (key, value) in writes {
            let r = self.store.put(&key, value, None).await;
            match self.note(state, r) {
                Ok(_) => {
                    self.counters.puts.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    log::warn!("store write of {key} failed: {e}");
                    ok = false;
                }
            }
        }
        for key in stale {
            let r = self.store.delete(&key).await;
            match self.note(state, r) {
                Ok(_) => {
                    log::info!("deleted {key}: no longer in the API");
                    self.counters.deletes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    log::warn!("store delete of {key} failed: {e}");
                    ok = false;
                }
            }
        }
        if let Some(ks) = state.kinds.get_mut(&kind) {
            ks.dirty = !ok;
        }
    }

    async fn write_marker_if_ready(&self, state: &mut State) {
        if state.marker_written || !state.kinds.values().all(|k| k.synced && !k.dirty) {
            return;
        }
        let r = self.store.put(keys::KSR_MARKER, marker_value(), None).await;
        match self.note(state, r) {
            Ok(_) => {
                log::info!("all kinds synced; wrote {}", keys::KSR_MARKER);
                state.marker_written = true;
            }
            Err(e) => log::warn!("writing {} failed: {e}", keys::KSR_MARKER),
        }
    }

    /// Repairs after failures and data loss: if the marker was written once and is now gone,
    /// every synced kind is converged (a full resync); otherwise dirty kinds are. Writes the
    /// marker once everything is in sync. Returns whether a full resync ran.
    pub async fn repair(&self) -> bool {
        let mut state = self.state.lock().await;
        let mut full = false;
        if state.marker_written {
            let r = self.store.get(keys::KSR_MARKER).await;
            match self.note(&mut state, r) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    log::warn!("{} is missing: the store lost its data; resyncing", keys::KSR_MARKER);
                    self.counters.marker_resyncs.fetch_add(1, Ordering::Relaxed);
                    state.marker_written = false;
                    for ks in state.kinds.values_mut() {
                        ks.dirty |= ks.synced;
                    }
                    full = true;
                }
                Err(e) => {
                    log::warn!("reading {} failed: {e}", keys::KSR_MARKER);
                    return false;
                }
            }
        }
        let dirty: Vec<Kind> = state.kinds.iter().filter(|(_, k)| k.synced && k.dirty).map(|(k, _)| *k).collect();
        for kind in dirty {
            self.converge(&mut state, kind).await;
        }
        self.write_marker_if_ready(&mut state).await;
        full
    }

    /// Per-kind status, in the order the kinds were given.
    pub async fn status(&self) -> Vec<KindStatus> {
        let state = self.state.lock().await;
        self.kinds
            .iter()
            .map(|kind| {
                let ks = state.kinds.get(kind);
                KindStatus {
                    kind: *kind,
                    objects: ks.map_or(0, |k| k.desired.len()),
                    synced: ks.is_some_and(|k| k.synced),
                    dirty: ks.is_some_and(|k| k.dirty),
                }
            })
            .collect()
    }

    /// Ready: every kind listed and in sync, the marker written, the store reachable.
    pub async fn ready(&self) -> bool {
        let state = self.state.lock().await;
        state.marker_written && !state.store_down && state.kinds.values().all(|k| k.synced && !k.dirty)
    }

    /// The desired value of a key (what KSR believes the API server has), for tests.
    pub async fn desired(&self, kind: Kind, key: &str) -> Option<Vec<u8>> {
        self.state.lock().await.kinds.get(&kind)?.desired.get(key).cloned()
    }
}

/// Value of the marker key.
fn marker_value() -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    serde_json::to_vec(
        &serde_json::json!({"v": contiv_cluster_model::MODEL_VERSION, "writer": "contiv-ksr", "synced_at": now}),
    )
    .unwrap_or_default()
}
