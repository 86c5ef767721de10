//! The embedded store: the whole key space in memory, made durable by an append-only log
//! of committed writes plus a periodic snapshot, in one directory owned by one process
//! (an exclusive `flock` on `<dir>/lock`; a second opener gets [`StoreError::Locked`]).
//!
//! Files: `snapshot.json` (full state at some revision) and `log.jsonl` (one JSON record per
//! commit after it). Opening loads the snapshot and replays the log; a torn last line (a crash
//! mid-write) is dropped. Writes are flushed to the kernel on every commit (crash-safe for
//! the process); `Options::fsync` also syncs them to disk.
//!
//! History: the events of the last `Options::history` revisions are kept for watches
//! (including the ones replayed from the log at open); older start revisions get
//! [`StoreError::Compacted`]. Leases expire on a background thread; after a reopen their
//! TTL starts afresh (as etcd does after a leader change).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    Compare, EventKind, KeyValue, LeaseId, ListResult, Revision, Store, StoreError, Txn, TxnOp, TxnResult,
    WatchEvent, WatchMessage, WatchStream,
};

const SNAPSHOT: &str = "snapshot.json";
const LOG: &str = "log.jsonl";
const LOCK: &str = "lock";

/// Tuning of the embedded store.
#[derive(Debug, Clone)]
pub struct Options {
    /// fsync the log after every commit.
    pub fsync: bool,
    /// How many revisions of events to keep for watches.
    pub history: usize,
    /// Write a snapshot (and empty the log) after this many log records.
    pub snapshot_every: usize,
    /// How often the lease expiry thread looks for expired leases.
    pub expiry_tick: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { fsync: false, history: 100_000, snapshot_every: 50_000, expiry_tick: Duration::from_millis(100) }
    }
}

/// The embedded store (see the module docs).
pub struct EmbeddedStore {
    state: Arc<Mutex<State>>,
    path: PathBuf,
}

struct LeaseState {
    ttl: i64,
    deadline: Instant,
}

struct Watcher {
    prefix: String,
    tx: mpsc::UnboundedSender<Result<WatchMessage, StoreError>>,
}

struct State {
    dir: PathBuf,
    options: Options,
    kvs: BTreeMap<String, KeyValue>,
    revision: Revision,
    /// The oldest revision a watch may start from.
    compacted: Revision,
    history: VecDeque<(Revision, Vec<WatchEvent>)>,
    leases: HashMap<LeaseId, LeaseState>,
    next_lease: LeaseId,
    watchers: Vec<Watcher>,
    log: File,
    log_records: usize,
    _lock: File,
}

// === on-disk format ===

/// A value: text when it is UTF-8 (values are JSON), bytes otherwise.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Val {
    Text(String),
    Bytes(Vec<u8>),
}

impl Val {
    fn from_bytes(bytes: &[u8]) -> Val {
        match std::str::from_utf8(bytes) {
            Ok(s) => Val::Text(s.to_owned()),
            Err(_) => Val::Bytes(bytes.to_vec()),
        }
    }
    fn into_bytes(self) -> Vec<u8> {
        match self {
            Val::Text(s) => s.into_bytes(),
            Val::Bytes(b) => b,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
enum Change {
    Put { key: String, value: Val, lease: LeaseId },
    Delete { key: String },
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "rec", rename_all = "camelCase")]
enum Record {
    Commit { rev: Revision, changes: Vec<Change> },
    LeaseGrant { id: LeaseId, ttl: i64 },
    LeaseRevoke { id: LeaseId },
    Compact { rev: Revision },
}

#[derive(Serialize, Deserialize)]
struct SnapshotKv {
    key: String,
    value: Val,
    mod_revision: Revision,
    create_revision: Revision,
    lease: LeaseId,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    revision: Revision,
    next_lease: LeaseId,
    leases: Vec<(LeaseId, i64)>,
    kvs: Vec<SnapshotKv>,
}

// === impl EmbeddedStore ===

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir.as_ref(), Options::default())
    }

    /// Opens (or creates) the store in `dir`.
    pub fn open_with(dir: &Path, options: Options) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK)).map_err(io)?;
        // SAFETY: flock on a file descriptor we own; no memory is shared.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                StoreError::Locked(dir.to_path_buf())
            } else {
                io(err)
            });
        }
        let now = Instant::now();
        let mut kvs = BTreeMap::new();
        let mut revision = 1;
        let mut next_lease = 1;
        let mut leases = HashMap::new();
        match std::fs::read(dir.join(SNAPSHOT)) {
            Ok(bytes) => {
                let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    path: dir.join(SNAPSHOT),
                    detail: e.to_string(),
                })?;
                revision = snap.revision;
                next_lease = snap.next_lease;
                for (id, ttl) in snap.leases {
                    leases.insert(id, LeaseState { ttl, deadline: now + secs(ttl) });
                }
                for kv in snap.kvs {
                    let kv = KeyValue {
                        key: kv.key,
                        value: kv.value.into_bytes(),
                        mod_revision: kv.mod_revision,
                        create_revision: kv.create_revision,
                        lease: kv.lease,
                    };
                    kvs.insert(kv.key.clone(), kv);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let log_path = dir.join(LOG);
        let log = OpenOptions::new().create(true).append(true).read(true).open(&log_path).map_err(io)?;
        let mut state = State {
            dir: dir.to_path_buf(),
            compacted: revision,
            options,
            kvs,
            revision,
            history: VecDeque::new(),
            leases,
            next_lease,
            watchers: Vec::new(),
            log,
            log_records: 0,
            _lock: lock,
        };
        state.replay(&log_path, now)?;
        let state = Arc::new(Mutex::new(state));
        spawn_expiry(Arc::downgrade(&state));
        Ok(Self { state, path: dir.to_path_buf() })
    }

    /// The directory of this store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way we
        // could repair; keep serving what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(1) as u64)
}

fn spawn_expiry(state: Weak<Mutex<State>>) {
    let tick = match state.upgrade() {
        Some(s) => s.lock().unwrap_or_else(|p| p.into_inner()).options.expiry_tick,
        None => return,
    };
    std::thread::Builder::new()
        .name("store-lease-expiry".into())
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                let Some(state) = state.upgrade() else { return };
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let expired: Vec<LeaseId> =
                    st.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
                for id in expired {
                    if let Err(e) = st.revoke(id) {
                        log::error!("embedded store: expiring lease {id:x}: {e}");
                    }
                }
            }
        })
        .map(drop)
        .unwrap_or_else(|e| log::error!("embedded store: cannot start the lease expiry thread: {e}"));
}

// === impl State ===

impl State {
    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io { path: self.dir.clone(), source }
    }

    fn replay(&mut self, log_path: &Path, now: Instant) -> Result<(), StoreError> {
        let file = File::open(log_path).map_err(|e| self.io(e))?;
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        let mut good_len: u64 = 0;
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(|e| self.io(e))?;
            if n == 0 {
                break;
            }
            if !line.ends_with('\n') {
                log::warn!("embedded store {}: dropping a torn last log record", self.dir.display());
                break;
            }
            let record: Record = serde_json::from_str(line.trim_end()).map_err(|e| StoreError::Corrupt {
                path: log_path.to_path_buf(),
                detail: format!("record at byte {good_len}: {e}"),
            })?;
            good_len += n as u64;
            self.log_records += 1;
            match record {
                Record::Commit { rev, changes } => {
                    let events = self.apply(rev, changes);
                    self.revision = rev;
                    self.push_history(rev, events);
                }
                Record::LeaseGrant { id, ttl } => {
                    self.leases.insert(id, LeaseState { ttl, deadline: now + secs(ttl) });
                    self.next_lease = self.next_lease.max(id + 1);
                }
                Record::LeaseRevoke { id } => {
                    self.leases.remove(&id);
                }
                Record::Compact { rev } => self.compact_to(rev),
            }
        }
        // Cut a torn tail so later appends start on a record boundary.
        self.log.set_len(good_len).map_err(|e| self.io(e))?;
        Ok(())
    }

    /// Applies changes at `rev` to the key space; returns the events.
    fn apply(&mut self, rev: Revision, changes: Vec<Change>) -> Vec<WatchEvent> {
        let mut events = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                Change::Put { key, value, lease } => {
                    let create_revision = self.kvs.get(&key).map_or(rev, |kv| kv.create_revision);
                    let kv = KeyValue { key: key.clone(), value: value.into_bytes(), mod_revision: rev, create_revision, lease };
                    events.push(WatchEvent { kind: EventKind::Put, kv: kv.clone() });
                    self.kvs.insert(key, kv);
                }
                Change::Delete { key } => {
                    if self.kvs.remove(&key).is_some() {
                        events.push(WatchEvent { kind: EventKind::Delete, kv: deleted(key, rev) });
                    }
                }
            }
        }
        events
    }

    fn push_history(&mut self, rev: Revision, events: Vec<WatchEvent>) {
        self.history.push_back((rev, events));
        while self.history.len() > self.options.history.max(1) {
            if let Some((old, _)) = self.history.pop_front() {
                self.compacted = self.compacted.max(old + 1);
            }
        }
    }

    fn compact_to(&mut self, rev: Revision) {
        let rev = rev.min(self.revision);
        while self.history.front().is_some_and(|(r, _)| *r < rev) {
            self.history.pop_front();
        }
        self.compacted = self.compacted.max(rev);
    }

    fn append(&mut self, record: &Record) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
            path: self.dir.clone(),
            detail: format!("cannot encode a log record: {e}"),
        })?;
        line.push(b'\n');
        self.log.write_all(&line).map_err(|e| self.io(e))?;
        if self.options.fsync {
            self.log.sync_data().map_err(|e| self.io(e))?;
        }
        self.log_records += 1;
        Ok(())
    }

    fn maybe_snapshot(&mut self) -> Result<(), StoreError> {
        if self.log_records < self.options.snapshot_every.max(1) {
            return Ok(());
        }
        let snap = Snapshot {
            revision: self.revision,
            next_lease: self.next_lease,
            leases: self.leases.iter().map(|(id, l)| (*id, l.ttl)).collect(),
            kvs: self
                .kvs
                .values()
                .map(|kv| SnapshotKv {
                    key: kv.key.clone(),
                    value: Val::from_bytes(&kv.value),
                    mod_revision: kv.mod_revision,
                    create_revision: kv.create_revision,
                    lease: kv.lease,
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&snap).map_err(|e| StoreError::Corrupt {
            path: self.dir.clone(),
            detail: format!("cannot encode the snapshot: {e}"),
        })?;
        let tmp = self.dir.join(format!("{SNAPSHOT}.tmp"));
        let mut f = File::create(&tmp).map_err(|e| self.io(e))?;
        f.write_all(&bytes).map_err(|e| self.io(e))?;
        f.sync_all().map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, self.dir.join(SNAPSHOT)).map_err(|e| self.io(e))?;
        // The snapshot holds everything now; the log starts empty.
        self.log.set_len(0).map_err(|e| self.io(e))?;
        self.log.sync_all().map_err(|e| self.io(e))?;
        self.log_records = 0;
        Ok(())
    }

    /// Commits changes as one revision: log, apply, notify. No-op when nothing changes.
    fn commit(&mut self, changes: Vec<Change>) -> Result<Revision, StoreError> {
        let changes: Vec<Change> = changes
            .into_iter()
            .filter(|c| match c {
                Change::Put { .. } => true,
                Change::Delete { key } => self.kvs.contains_key(key),
            })
            .collect();
        if changes.is_empty() {
            return Ok(self.revision);
        }
        let rev = self.revision + 1;
        let record = Record::Commit { rev, changes };
        self.append(&record)?;
        let events = match record {
            Record::Commit { changes, .. } => self.apply(rev, changes),
            _ => Vec::new(),
        };
        self.revision = rev;
        self.notify(&events);
        self.push_history(rev, events);
        self.maybe_snapshot()?;
        Ok(rev)
    }

    fn notify(&mut self, events: &[WatchEvent]) {
        self.watchers.retain(|w| {
            let mine: Vec<WatchEvent> = events.iter().filter(|e| e.kv.key.starts_with(&w.prefix)).cloned().collect();
            if mine.is_empty() {
                return !w.tx.is_closed();
            }
            w.tx.send(Ok(WatchMessage::Events(mine))).is_ok()
        });
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<LeaseId, StoreError> {
        match lease {
            None | Some(0) => Ok(0),
            Some(id) if self.leases.contains_key(&id) => Ok(id),
            Some(id) => Err(StoreError::LeaseNotFound(id)),
        }
    }

    fn holds(&self, compare: &Compare) -> bool {
        match compare {
            Compare::Absent(key) => !self.kvs.contains_key(key),
            Compare::ModRevision(key, rev) => self.kvs.get(key).map_or(0, |kv| kv.mod_revision) == *rev,
            Compare::Value(key, value) => self.kvs.get(key).is_some_and(|kv| &kv.value == value),
        }
    }

    fn revoke(&mut self, id: LeaseId) -> Result<(), StoreError> {
        if self.leases.remove(&id).is_none() {
            return Err(StoreError::LeaseNotFound(id));
        }
        let keys: Vec<String> = self.kvs.values().filter(|kv| kv.lease == id).map(|kv| kv.key.clone()).collect();
        self.commit(keys.into_iter().map(|key| Change::Delete { key }).collect())?;
        self.append(&Record::LeaseRevoke { id })?;
        Ok(())
    }

    fn keys_under(&self, prefix: &str) -> impl Iterator<Item = &KeyValue> {
        self.kvs.range(prefix.to_owned()..).take_while(move |(k, _)| k.starts_with(prefix)).map(|(_, kv)| kv)
    }
}

fn deleted(key: String, rev: Revision) -> KeyValue {
    KeyValue { key, value: Vec::new(), mod_revision: rev, create_revision: 0, lease: 0 }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        let mut st = self.lock();
        let lease = st.check_lease(lease)?;
        st.commit(vec![Change::Put { key: key.to_owned(), value: Val::from_bytes(&value), lease }])
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut st = self.lock();
        if !st.kvs.contains_key(key) {
            return Ok(false);
        }
        st.commit(vec![Change::Delete { key: key.to_owned() }])?;
        Ok(true)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let keys: Vec<String> = st.keys_under(prefix).map(|kv| kv.key.clone()).collect();
        let n = keys.len() as u64;
        st.commit(keys.into_iter().map(|key| Change::Delete { key }).collect())?;
        Ok(n)
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        let st = self.lock();
        Ok(ListResult { kvs: st.keys_under(prefix).cloned().collect(), revision: st.revision })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let mut st = self.lock();
        let succeeded = txn.compares.iter().all(|c| st.holds(c));
        let ops = if succeeded { txn.success } else { txn.failure };
        let mut gets = Vec::new();
        let mut changes = Vec::new();
        for op in ops {
            match op {
                TxnOp::Get { key } => gets.push(st.kvs.get(&key).cloned()),
                TxnOp::Put { key, value, lease } => {
                    let lease = st.check_lease(lease)?;
                    changes.push(Change::Put { key, value: Val::from_bytes(&value), lease });
                }
                TxnOp::Delete { key } => changes.push(Change::Delete { key }),
            }
        }
        let revision = st.commit(changes)?;
        Ok(TxnResult { succeeded, revision, gets })
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId, StoreError> {
        let mut st = self.lock();
        let id = st.next_lease;
        let ttl = ttl_secs.max(1);
        st.append(&Record::LeaseGrant { id, ttl })?;
        st.next_lease += 1;
        st.leases.insert(id, LeaseState { ttl, deadline: Instant::now() + secs(ttl) });
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<i64, StoreError> {
        let mut st = self.lock();
        let l = st.leases.get_mut(&lease).ok_or(StoreError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + secs(l.ttl);
        Ok(l.ttl)
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.lock().revoke(lease)
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.lock();
        let start = if from <= 0 { st.revision + 1 } else { from };
        if start < st.compacted {
            // Reported through the stream, as etcd does.
            let _ = tx.send(Err(StoreError::Compacted { requested: start, compacted: st.compacted }));
        } else {
            for (rev, events) in &st.history {
                if *rev < start {
                    continue;
                }
                let mine: Vec<WatchEvent> = events.iter().filter(|e| e.kv.key.starts_with(prefix)).cloned().collect();
                if !mine.is_empty() {
                    let _ = tx.send(Ok(WatchMessage::Events(mine)));
                }
            }
            st.watchers.push(Watcher { prefix: prefix.to_owned(), tx });
        }
        drop(st);
        Ok(Box::pin(UnboundedStream(rx)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut st = self.lock();
        st.append(&Record::Compact { rev: revision })?;
        st.compact_to(revision);
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }
}

/// A receiver as a stream (saves a dependency on tokio-stream).
struct UnboundedStream<T>(mpsc::UnboundedReceiver<T>);

impl<T> futures::Stream for UnboundedStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
