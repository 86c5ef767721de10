//! The store side of the reflector: the desired content of each kind's key prefix (what the
//! API server says exists) and the writes that make the store hold exactly that.
//!
//! Watcher tasks feed it ([`Mirror::replace`] after each (re)list, [`Mirror::apply`] /
//! [`Mirror::remove`] for watch events). Writes whose value is unchanged are skipped. A write
//! that fails marks the kind dirty; [`Mirror::repair`] (run periodically) converges dirty kinds
//! by listing the store and diffing, and resyncs everything when the KSR marker key is gone
//! (the store lost its data).
//!
//! Locking: the in-memory state sits behind a short synchronous lock that is never held
//! across a store call, so `/readyz` and `/metrics` answer at once even during a relist of
//! thousands of objects. Store writes of one kind are serialised by that kind's writer lock
//! (a watch event and a repair of the same kind must not interleave); kinds write in
//! parallel. A converge writes in transactions of [`BATCH`] operations, [`IN_FLIGHT`] at a
//! time, instead of one request per key.
//!
//! Fencing: [`Mirror::stop_writing`] (leadership lost) makes every later write a no-op error,
//! before the reflector's tasks are even aborted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use contiv_cluster_model::keys::{self, Kind};
use contiv_store::{Compare, Store, StoreError, Txn, TxnOp};
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
    /// Allocations (node ID and pod CIDR) freed because their node left the cluster.
    pub departed_nodes_released: AtomicU64,
}

#[derive(Debug, Default)]
struct KindState {
    /// Key -> encoded value of every object of the kind the API server has.
    desired: BTreeMap<String, Vec<u8>>,
    /// The kind has been listed at least once.
    synced: bool,
    /// A store write failed; the store may differ from `desired`.
    dirty: bool,
    /// Since when the kind's list or watch has failed without an event in between, and
    /// its last failure (a watch that works again yields no event until the kind changes:
    /// a quiet spell longer than the watcher's retry backoff says it works).
    watch_failing_since: Option<std::time::Instant>,
    watch_last_failure: Option<std::time::Instant>,
    /// The kind's watcher task is gone (its stream ended, it panicked): nothing follows
    /// the kind any more.
    watch_ended: bool,
}

#[derive(Debug, Default)]
struct State {
    kinds: BTreeMap<Kind, KindState>,
    /// The marker was written after every kind synced.
    marker_written: bool,
    /// The store revision of KSR's last write of the marker (every write rewrites it while
    /// it is as KSR left it): a marker older than that comes from a backup the store was
    /// restored from.
    marker_revision: Option<contiv_store::Revision>,
    /// A write went without the marker (the marker was not as KSR left it: another of its
    /// writes had just moved it, or the store lost or restored it): the next repair looks.
    marker_behind: bool,
    /// How long a kind's list or watch may keep failing before KSR is not ready, and how long
    /// without a failure counts as working again.
    watch_stall: std::time::Duration,
    watch_quiet: std::time::Duration,
    /// The last store operation failed.
    store_down: bool,
    /// Since when every store operation failed (the first failure after a success).
    store_down_since: Option<std::time::Instant>,
}

/// How long a kind's list or watch may keep failing (the watcher retries with a backoff of
/// up to 30 s) before KSR says it is not ready: that kind is frozen in the store meanwhile
/// (a ClusterRole edited to drop it, an API server that keeps refusing it).
pub const DEFAULT_WATCH_STALL: std::time::Duration = std::time::Duration::from_secs(120);
/// A kind that failed is taken as working again after this long without a failure: the
/// watcher retries at least every 30 s (kube-runtime's backoff, jitter up to as much again),
/// and a watch that works yields nothing until the kind changes.
pub const DEFAULT_WATCH_QUIET: std::time::Duration = std::time::Duration::from_secs(90);

/// Operations per store transaction when converging (etcd allows 128 by default).
pub const BATCH: usize = 100;
/// Bytes of keys and values per store transaction when converging: etcd refuses a request
/// over 1.5 MiB by default (`--max-request-bytes`), and a hundred full EndpointSlices pass
/// that. Room is left for the request's framing. One operation larger than this still
/// goes, alone (the API server stores no object over 1.5 MiB either).
pub const BATCH_BYTES: usize = 1024 * 1024;
/// Transactions in flight at once when converging.
pub const IN_FLIGHT: usize = 4;

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
    state: std::sync::Mutex<State>,
    /// One writer per kind at a time.
    writers: BTreeMap<Kind, Mutex<()>>,
    /// Cleared when this instance must not write any more (leadership lost).
    writable: AtomicBool,
    /// Under leader election: until when the last renewal of the Lease lets this replica
    /// write (`None`: no limit). Past it nothing is written, even before the elector notices
    /// (a process stalled past its renew deadline must not write what it buffered once it
    /// runs again, while another replica may lead).
    write_deadline: std::sync::Mutex<Option<std::time::Instant>>,
    /// Counters for /metrics (shared across leadership terms).
    pub counters: Arc<Counters>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("store", &self.store.backend())
            .field("kinds", &self.kinds)
            .field("writing", &self.is_writing())
            .finish_non_exhaustive()
    }
}

impl Mirror {
    /// A mirror writing `kinds` into `store`.
    pub fn new(store: Arc<dyn Store>, kinds: &[Kind]) -> Self {
        Self::with_counters(store, kinds, Arc::default())
    }

    /// A mirror counting into `counters` (kept by the caller across mirrors).
    pub fn with_counters(store: Arc<dyn Store>, kinds: &[Kind], counters: Arc<Counters>) -> Self {
        let state = State {
            kinds: kinds.iter().map(|k| (*k, KindState::default())).collect(),
            watch_stall: DEFAULT_WATCH_STALL,
            watch_quiet: DEFAULT_WATCH_QUIET,
            ..State::default()
        };
        Mirror {
            store,
            kinds: kinds.to_vec(),
            state: std::sync::Mutex::new(state),
            writers: kinds.iter().map(|k| (*k, Mutex::new(()))).collect(),
            writable: AtomicBool::new(true),
            write_deadline: std::sync::Mutex::new(None),
            counters,
        }
    }

    /// Writes go only until `until` (see `write_deadline`); a later renewal moves it.
    pub fn set_write_deadline(&self, until: Option<std::time::Instant>) {
        *self.write_deadline.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = until;
    }

    /// The store written to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// From now on nothing is written: every write fails without reaching the store.
    pub fn stop_writing(&self) {
        self.writable.store(false, Ordering::SeqCst);
    }

    /// Whether writes still reach the store: not stopped, and within the write deadline.
    pub fn is_writing(&self) -> bool {
        let deadline = *self.write_deadline.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.writable.load(Ordering::SeqCst) && deadline.is_none_or(|d| std::time::Instant::now() < d)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn writer(&self, kind: Kind) -> &Mutex<()> {
        self.writers.get(&kind).unwrap_or_else(|| panic!("mirror was not made for kind {kind}"))
    }

    fn fence(&self) -> Result<(), StoreError> {
        if self.is_writing() { Ok(()) } else { Err(StoreError::Closed) }
    }

    fn note<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => {
                let mut state = self.state();
                state.store_down = false;
                state.store_down_since = None;
            }
            Err(_) => {
                let mut state = self.state();
                state.store_down = true;
                state.store_down_since.get_or_insert_with(std::time::Instant::now);
                self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// How long every store operation has failed (`None`: the last one succeeded).
    pub fn store_down_for(&self) -> Option<std::time::Duration> {
        self.state().store_down_since.map(|t| t.elapsed())
    }

    fn mark_dirty(&self, kind: Kind) {
        self.state().kinds.entry(kind).or_default().dirty = true;
    }

    /// Replaces the desired content of `kind` (after a list) and converges the store to it.
    pub async fn replace(&self, kind: Kind, desired: BTreeMap<String, Vec<u8>>) {
        let _writer = self.writer(kind).lock().await;
        {
            let mut state = self.state();
            let ks = state.kinds.entry(kind).or_default();
            ks.desired = desired;
            ks.synced = true;
            ks.dirty = true;
        }
        self.converge(kind).await;
        drop(_writer);
        self.write_marker_if_ready().await;
    }

    /// An object was added or changed.
    pub async fn apply(&self, kind: Kind, key: String, value: Vec<u8>) {
        let _writer = self.writer(kind).lock().await;
        {
            let mut state = self.state();
            let ks = state.kinds.entry(kind).or_default();
            if ks.desired.get(&key) == Some(&value) && !ks.dirty {
                self.counters.unchanged.fetch_add(1, Ordering::Relaxed);
                return;
            }
            ks.desired.insert(key.clone(), value.clone());
        }
        let r = self.write(vec![TxnOp::Put { key: key.clone(), value, lease: None }]).await;
        if self.note(r).is_ok() {
            self.counters.puts.fetch_add(1, Ordering::Relaxed);
        } else {
            log::warn!("store write of {key} failed; will repair");
            self.mark_dirty(kind);
        }
    }

    /// An object was deleted (or can no longer be represented).
    pub async fn remove(&self, kind: Kind, key: &str) {
        let _writer = self.writer(kind).lock().await;
        {
            let mut state = self.state();
            let ks = state.kinds.entry(kind).or_default();
            let known = ks.desired.remove(key).is_some();
            if !known && !ks.dirty && ks.synced {
                return;
            }
        }
        let r = self
            .write(vec![TxnOp::Get { key: key.to_string() }, TxnOp::Delete { key: key.to_string() }])
            .await
            .map(|res| res.gets.first().is_some_and(Option::is_some));
        match self.note(r) {
            Ok(existed) => {
                if existed {
                    self.counters.deletes.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                log::warn!("store delete of {key} failed: {e}; will repair");
                self.mark_dirty(kind);
            }
        }
    }

    /// Makes the store's prefix of `kind` equal to the desired content: puts what differs,
    /// deletes what the API server no longer has, in batched transactions. Clears `dirty` on
    /// success. The caller holds the kind's writer lock.
    async fn converge(&self, kind: Kind) {
        if let Err(e) = self.fence() {
            log::debug!("not converging {kind}: {e}");
            return;
        }
        let prefix = kind.prefix();
        let listed = self.store.list(&prefix).await;
        let listed = match self.note(listed) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("listing {prefix} failed: {e}; will retry");
                return;
            }
        };
        self.counters.converges.fetch_add(1, Ordering::Relaxed);
        let mut actual: BTreeMap<String, Vec<u8>> = listed.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
        // The diff is computed under the state lock (no I/O); the writes happen after it.
        let mut ops = Vec::new();
        let mut puts = 0u64;
        {
            let state = self.state();
            let Some(ks) = state.kinds.get(&kind) else { return };
            for (key, value) in &ks.desired {
                match actual.remove(key) {
                    Some(v) if &v == value => {
                        self.counters.unchanged.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        puts += 1;
                        ops.push(TxnOp::Put { key: key.clone(), value: value.clone(), lease: None });
                    }
                }
            }
        }
        let deletes = actual.len() as u64;
        for key in actual.into_keys() {
            log::info!("deleting {key}: no longer in the API");
            ops.push(TxnOp::Delete { key });
        }
        let ok = self.write_batches(ops).await;
        if ok {
            self.counters.puts.fetch_add(puts, Ordering::Relaxed);
            self.counters.deletes.fetch_add(deletes, Ordering::Relaxed);
        }
        if let Some(ks) = self.state().kinds.get_mut(&kind) {
            ks.dirty = !ok;
        }
    }

    /// Runs `ops` as unconditional transactions of at most [`BATCH`] operations and
    /// [`BATCH_BYTES`] bytes, with up to [`IN_FLIGHT`] of them outstanding. True when every
    /// one succeeded.
    async fn write_batches(&self, ops: Vec<TxnOp>) -> bool {
        use futures::StreamExt;
        let batches = batches(ops);
        let results: Vec<bool> = futures::stream::iter(batches)
            .map(|success| async move {
                let r = self.write(success).await;
                match self.note(r) {
                    Ok(_) => true,
                    Err(e) => {
                        log::warn!("store transaction failed: {e}");
                        false
                    }
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().all(|ok| ok)
    }

    /// Runs `ops` as one transaction (fenced). Once the marker has been written, a write
    /// rewrites it too, so the marker's revision is that of KSR's last write: a store
    /// restored from a backup taken before it holds an older marker ([`Mirror::repair`]).
    /// Only while the marker is as KSR last wrote it, though: a write never makes a marker
    /// the store lost (agents would take a store holding little more than this write for a
    /// complete one, and drop every policy and service it lacks), nor renews one a restore
    /// brought back (its age is what tells the restore). `ops` go in either case.
    async fn write(&self, ops: Vec<TxnOp>) -> Result<contiv_store::TxnResult, StoreError> {
        self.fence()?;
        let ours = {
            let state = self.state();
            state.marker_revision.filter(|_| state.marker_written)
        };
        let Some(revision) = ours else {
            return self.store.txn(Txn { compares: vec![], success: ops, failure: vec![] }).await;
        };
        // The ops are not repeated in a failure branch: a batch is up to 1 MiB, and etcd
        // refuses a request over 1.5 MiB. A compare that fails costs a second round trip.
        let mut success = ops.clone();
        success.push(TxnOp::Put { key: keys::KSR_MARKER.into(), value: marker_value(), lease: None });
        let compares = vec![Compare::ModRevision(keys::KSR_MARKER.into(), revision)];
        let res = self.store.txn(Txn { compares, success, failure: vec![] }).await?;
        if res.succeeded {
            let mut state = self.state();
            if state.marker_written {
                state.marker_revision = state.marker_revision.max(Some(res.revision));
            }
            return Ok(res);
        }
        {
            let mut state = self.state();
            if state.marker_written {
                state.marker_behind = true;
            }
        }
        self.store.txn(Txn { compares: vec![], success: ops, failure: vec![] }).await
    }

    /// Moves the marker past writes that went without it while it was KSR's (`revision`, as
    /// read): a backup taken after them must not look older than KSR's last write.
    async fn catch_up_marker(&self, revision: contiv_store::Revision) {
        let txn = Txn {
            compares: vec![Compare::ModRevision(keys::KSR_MARKER.into(), revision)],
            success: vec![TxnOp::Put { key: keys::KSR_MARKER.into(), value: marker_value(), lease: None }],
            failure: vec![],
        };
        let r = match self.fence() {
            Ok(()) => self.store.txn(txn).await,
            Err(e) => Err(e),
        };
        match self.note(r) {
            Ok(res) if res.succeeded => {
                let mut state = self.state();
                if state.marker_written {
                    state.marker_revision = state.marker_revision.max(Some(res.revision));
                    state.marker_behind = false;
                }
            }
            // Moved again meanwhile: the next repair looks again.
            Ok(_) => {}
            Err(e) => log::warn!("rewriting {} failed: {e}", keys::KSR_MARKER),
        }
    }

    async fn write_marker_if_ready(&self) {
        {
            let state = self.state();
            if state.marker_written || !state.kinds.values().all(|k| k.synced && !k.dirty) {
                return;
            }
        }
        let r = match self.fence() {
            Ok(()) => self.store.put(keys::KSR_MARKER, marker_value(), None).await,
            Err(e) => Err(e),
        };
        match self.note(r) {
            Ok(revision) => {
                log::info!("all kinds synced; wrote {}", keys::KSR_MARKER);
                let mut state = self.state();
                state.marker_written = true;
                state.marker_revision = Some(revision);
            }
            Err(e) => log::warn!("writing {} failed: {e}", keys::KSR_MARKER),
        }
    }

    /// Repairs after failures and data loss: if the marker was written once and is now gone,
    /// or is older than this KSR's last write (the store was restored from a backup: its keys
    /// are as old as the backup), every synced kind is converged (a full resync); otherwise dirty
    /// kinds are. Writes the marker once everything is in sync. Returns whether a full resync
    /// ran.
    pub async fn repair(&self) -> bool {
        let mut full = false;
        let written = {
            let state = self.state();
            state.marker_written.then_some(state.marker_revision)
        };
        if let Some(revision) = written {
            let r = self.store.get(keys::KSR_MARKER).await;
            let lost = match self.note(r) {
                // Newer than recorded: a write of ours still in flight.
                Ok(Some(kv)) if revision.is_none_or(|r| kv.mod_revision >= r) => {
                    if self.state().marker_behind {
                        self.catch_up_marker(kv.mod_revision).await;
                    }
                    None
                }
                Ok(Some(kv)) => Some(format!(
                    "{} is older than this KSR's last write (revision {}, not {}): the store was restored \
                     from a backup",
                    keys::KSR_MARKER,
                    kv.mod_revision,
                    revision.unwrap_or_default()
                )),
                Ok(None) => Some(format!("{} is missing: the store lost its data", keys::KSR_MARKER)),
                Err(e) => {
                    log::warn!("reading {} failed: {e}", keys::KSR_MARKER);
                    return false;
                }
            };
            if let Some(why) = lost {
                log::warn!("{why}; resyncing");
                self.counters.marker_resyncs.fetch_add(1, Ordering::Relaxed);
                {
                    let mut state = self.state();
                    state.marker_written = false;
                    state.marker_behind = false;
                    // A store restored without bumping its revision counts from the backup's.
                    state.marker_revision = None;
                    for ks in state.kinds.values_mut() {
                        ks.dirty |= ks.synced;
                    }
                }
                full = true;
                // A restored marker goes until the resync is done: agents keep what they have
                // meanwhile instead of following the backup's content as it is rewritten.
                let r = match self.fence() {
                    Ok(()) => self.store.delete(keys::KSR_MARKER).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = self.note(r) {
                    log::warn!("removing {} before the resync failed: {e}", keys::KSR_MARKER);
                }
            }
        }
        let dirty: Vec<Kind> =
            self.state().kinds.iter().filter(|(_, k)| k.synced && k.dirty).map(|(k, _)| *k).collect();
        for kind in dirty {
            let _writer = self.writer(kind).lock().await;
            // Re-check: the watcher may have converged it meanwhile.
            if self.state().kinds.get(&kind).is_some_and(|k| k.dirty) {
                self.converge(kind).await;
            }
        }
        self.write_marker_if_ready().await;
        full
    }

    /// Per-kind status, in the order the kinds were given (no waiting on store calls).
    pub fn status_now(&self) -> Vec<KindStatus> {
        let state = self.state();
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

    /// Ready: every kind listed and in sync, the marker written, the store reachable, and
    /// every kind still followed (no watcher gone, none failing for longer than the stall).
    pub fn ready_now(&self) -> bool {
        self.not_ready_because().is_none()
    }

    /// Why [`Mirror::ready_now`] is false (`None`: it is true).
    pub fn not_ready_because(&self) -> Option<String> {
        let state = self.state();
        let stalled: Vec<String> = state
            .kinds
            .iter()
            .filter_map(|(kind, k)| {
                if k.watch_ended {
                    Some(format!("{kind}: its watcher stopped"))
                } else {
                    let failing = k.watch_failing_since?.elapsed();
                    let still = k.watch_last_failure.is_some_and(|t| t.elapsed() < state.watch_quiet);
                    (still && failing >= state.watch_stall)
                        .then(|| format!("{kind}: list/watch failing for {}s", failing.as_secs()))
                }
            })
            .collect();
        if !stalled.is_empty() {
            Some(stalled.join("; "))
        } else if state.store_down {
            Some("the store is not reachable".into())
        } else if !state.kinds.values().all(|k| k.synced && !k.dirty) {
            Some("kinds not in sync yet".into())
        } else if !state.marker_written {
            Some("marker not written yet".into())
        } else {
            None
        }
    }

    /// The kind's list or watch answered (an event of any kind).
    pub fn watch_ok(&self, kind: Kind) {
        if let Some(k) = self.state().kinds.get_mut(&kind) {
            k.watch_failing_since = None;
            k.watch_last_failure = None;
        }
    }

    /// The kind's list or watch failed (the watcher retries).
    pub fn watch_failed(&self, kind: Kind) {
        let mut state = self.state();
        let quiet = state.watch_quiet;
        if let Some(k) = state.kinds.get_mut(&kind) {
            let now = std::time::Instant::now();
            // A quiet spell since the last failure: the kind worked meanwhile.
            if k.watch_last_failure.is_some_and(|t| now - t >= quiet) {
                k.watch_failing_since = None;
            }
            k.watch_failing_since.get_or_insert(now);
            k.watch_last_failure = Some(now);
        }
    }

    /// The kind's watcher is gone.
    pub fn watch_ended(&self, kind: Kind) {
        if let Some(k) = self.state().kinds.get_mut(&kind) {
            k.watch_ended = true;
        }
    }

    /// How long a kind's list or watch may keep failing before KSR is not ready, and how long
    /// without a failure counts as working again (defaults [`DEFAULT_WATCH_STALL`],
    /// [`DEFAULT_WATCH_QUIET`]).
    pub fn set_watch_stall(&self, stall: std::time::Duration, quiet: std::time::Duration) {
        let mut state = self.state();
        state.watch_stall = stall;
        state.watch_quiet = quiet;
    }

    /// [`Mirror::status_now`], for async callers.
    pub async fn status(&self) -> Vec<KindStatus> {
        self.status_now()
    }

    /// [`Mirror::ready_now`], for async callers.
    pub async fn ready(&self) -> bool {
        self.ready_now()
    }

    /// The names of the objects of a cluster-scoped `kind` the API server has, once the kind
    /// has been listed (`None` before).
    pub fn names(&self, kind: Kind) -> Option<std::collections::BTreeSet<String>> {
        let state = self.state();
        let ks = state.kinds.get(&kind).filter(|k| k.synced)?;
        Some(ks.desired.keys().filter_map(|key| keys::ObjectRef::parse(key)).map(|r| r.name).collect())
    }

    /// The desired value of a key (what KSR believes the API server has), for tests.
    pub async fn desired(&self, kind: Kind, key: &str) -> Option<Vec<u8>> {
        self.state().kinds.get(&kind)?.desired.get(key).cloned()
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

/// `ops` split, in order, into transactions of at most [`BATCH`] operations and
/// [`BATCH_BYTES`] bytes of keys and values.
fn batches(ops: Vec<TxnOp>) -> Vec<Vec<TxnOp>> {
    contiv_store::batches(ops, BATCH, BATCH_BYTES, |op| match op {
        TxnOp::Put { key, value, .. } => key.len() + value.len(),
        TxnOp::Delete { key } | TxnOp::Get { key } => key.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(i: usize, bytes: usize) -> TxnOp {
        TxnOp::Put { key: format!("/contiv/k8s/endpointslice/d/s{i:03}"), value: vec![b'x'; bytes], lease: None }
    }

    fn total(b: &[TxnOp]) -> usize {
        b.iter()
            .map(|op| match op {
                TxnOp::Put { key, value, .. } => key.len() + value.len(),
                TxnOp::Delete { key } | TxnOp::Get { key } => key.len(),
            })
            .sum()
    }

    /// A hundred 20 KB EndpointSlices are about 2 MB: more than etcd takes in one request.
    #[test]
    fn batches_hold_at_most_a_hundred_operations_and_a_mebibyte() {
        let ops: Vec<TxnOp> = (0..250).map(|i| put(i, 20_000)).collect();
        let out = batches(ops.clone());
        assert!(out.len() >= 5, "{} batches", out.len());
        assert!(out.iter().all(|b| b.len() <= BATCH && total(b) <= BATCH_BYTES));
        assert_eq!(out.concat(), ops, "every operation once, in order");

        let small: Vec<TxnOp> = (0..250).map(|i| TxnOp::Delete { key: format!("/k/{i}") }).collect();
        let out = batches(small);
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), vec![100, 100, 50]);

        // One operation over the cap goes alone, between the others.
        let out = batches(vec![put(0, 10), put(1, BATCH_BYTES + 1), put(2, 10)]);
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1]);
        assert!(batches(vec![]).is_empty());
    }

    /// Past the write deadline (the last Lease renewal's) nothing reaches the store, even
    /// before anyone calls `stop_writing`; the kind is repaired once a renewal moves it.
    #[tokio::test]
    async fn nothing_is_written_past_the_write_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let store = contiv_store::open(&contiv_store::StoreConfig::embedded(dir.path())).await.unwrap();
        let m = Mirror::new(store.clone(), &[Kind::Pod]);
        m.replace(Kind::Pod, BTreeMap::new()).await;
        let key = "/contiv/k8s/pod/default/a".to_string();
        m.set_write_deadline(Some(std::time::Instant::now()));
        assert!(!m.is_writing());
        m.apply(Kind::Pod, key.clone(), b"1".to_vec()).await;
        assert!(store.get(&key).await.unwrap().is_none(), "written past the deadline");
        m.set_write_deadline(Some(std::time::Instant::now() + std::time::Duration::from_secs(60)));
        assert!(m.is_writing());
        m.repair().await;
        assert_eq!(store.get(&key).await.unwrap().unwrap().value, b"1", "repaired once renewed");
    }
}
