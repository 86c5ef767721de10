//! The embedded store: the key space in memory, made durable by an append-only log of
//! committed writes plus a periodic snapshot, in one directory that several processes on the
//! node may open at once (the agent watching, `netctl` writing).
//!
//! Files in the directory:
//! - `snapshot.json`: the full state at some revision, and the generation of the log that
//!   continues it;
//! - `log-<gen>.jsonl`: one JSON record per line (a commit, a lease grant / keep-alive /
//!   revoke, a compaction) after that snapshot;
//! - `lock`: `flock`ed around every write, so writers in different processes take turns.
//!
//! Every instance keeps its own copy of the state and a read position in the log. Before each
//! operation, and every `Options::poll` in the background (to feed watches), it reads the
//! records other processes appended ("catching up"). A writer takes the lock, catches up,
//! assigns the next revision, appends its record with one `write`, and applies it. Only
//! complete lines are consumed; a torn last line left by a crashed writer is cut by the next
//! writer (which holds the lock, so nobody can be completing it). After
//! `Options::snapshot_every` records a writer writes a snapshot and switches everyone to the
//! next log generation: it creates `log-<gen+1>` first, then renames the snapshot into place,
//! then removes `log-<gen-1>` (readers keep their log open until they have read it to the
//! end; seeing `log-<gen+1>` tells them `log-<gen>` is final). An instance that fell behind
//! by more than that reloads the snapshot, and its watches get `Compacted` (list again).
//!
//! History: the events of the last `Options::history` revisions are kept for watches
//! (including the ones replayed from the log at open); older start revisions get
//! [`StoreError::Compacted`]. Leases: grants and keep-alives are log records with a wall-clock
//! time, so every process agrees on deadlines; any process expires a lease whose deadline
//! passed (after catching up under the lock). A lease never expires less than its TTL after
//! this instance opened the store, so leases survive a restart of their owner like etcd's do
//! after a leader change. Writes are flushed to the kernel on every commit (safe against a
//! process crash); `Options::fsync` also syncs them to disk.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    Compare, EventKind, KeyValue, LeaseId, ListResult, Revision, Store, StoreError, Txn, TxnOp, TxnResult, WatchEvent,
    WatchMessage, WatchStream,
};

const SNAPSHOT: &str = "snapshot.json";
const LOCK: &str = "lock";

fn log_name(generation: u64) -> String {
    format!("log-{generation}.jsonl")
}

/// Tuning of the embedded store.
#[derive(Debug, Clone)]
pub struct Options {
    /// fsync the log after every commit.
    pub fsync: bool,
    /// How many revisions of events to keep for watches.
    pub history: usize,
    /// Write a snapshot (and start a new log generation) after this many log records.
    pub snapshot_every: usize,
    /// How often the background thread reads other processes' writes (feeding watches) and
    /// looks for expired leases.
    pub poll: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { fsync: false, history: 100_000, snapshot_every: 50_000, poll: Duration::from_millis(50) }
    }
}

/// The embedded store (see the module docs).
pub struct EmbeddedStore {
    state: Arc<Mutex<State>>,
    path: PathBuf,
}

struct LeaseState {
    ttl: i64,
    /// Unix ms after which the lease is expired.
    deadline_ms: i64,
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
    /// The current log generation, its open file and how far it was consumed.
    generation: u64,
    log: File,
    offset: u64,
    /// Records in the current log generation.
    log_records: usize,
    /// Unix ms when this instance opened the store (leases get a grace period from here).
    opened_ms: i64,
    lock: File,
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
    LeaseGrant { id: LeaseId, ttl: i64, at: i64 },
    LeaseKeepAlive { id: LeaseId, at: i64 },
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

impl From<SnapshotKv> for KeyValue {
    fn from(kv: SnapshotKv) -> Self {
        KeyValue {
            key: kv.key,
            value: kv.value.into_bytes(),
            mod_revision: kv.mod_revision,
            create_revision: kv.create_revision,
            lease: kv.lease,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    revision: Revision,
    /// The log generation that continues this snapshot.
    generation: u64,
    next_lease: LeaseId,
    /// (id, ttl, deadline in unix ms)
    leases: Vec<(LeaseId, i64, i64)>,
    kvs: Vec<SnapshotKv>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn ttl_ms(ttl: i64) -> i64 {
    ttl.max(1) * 1000
}

/// An exclusive `flock` held until dropped.
struct FlockGuard<'a>(&'a File);

impl<'a> FlockGuard<'a> {
    fn take(file: &'a File, dir: &Path) -> Result<Self, StoreError> {
        loop {
            // SAFETY: flock on a descriptor we own; no memory is shared.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self(file));
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(StoreError::Io { path: dir.to_path_buf(), source: err });
            }
        }
    }
}

impl Drop for FlockGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
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
        let guard = FlockGuard::take(&lock, dir)?;
        let opened_ms = now_ms();
        let mut kvs = BTreeMap::new();
        let mut revision = 1;
        let mut next_lease = 1;
        let mut generation = 0;
        let mut leases = HashMap::new();
        match std::fs::read(dir.join(SNAPSHOT)) {
            Ok(bytes) => {
                let snap: Snapshot = serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt { path: dir.join(SNAPSHOT), detail: e.to_string() })?;
                revision = snap.revision;
                next_lease = snap.next_lease;
                generation = snap.generation;
                for (id, ttl, deadline_ms) in snap.leases {
                    leases.insert(id, LeaseState { ttl, deadline_ms });
                }
                for kv in snap.kvs {
                    let kv = KeyValue::from(kv);
                    kvs.insert(kv.key.clone(), kv);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // Logs of older generations are leftovers of a snapshot interrupted before cleanup.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let old = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("log-")?.strip_suffix(".jsonl")?.parse::<u64>().ok())
                    .is_some_and(|g| g + 1 < generation);
                if old {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let log = open_log(dir, generation).map_err(io)?;
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
            generation,
            log,
            offset: 0,
            log_records: 0,
            opened_ms,
            lock: lock.try_clone().map_err(io)?,
        };
        state.catch_up()?;
        drop(guard);
        let state = Arc::new(Mutex::new(state));
        spawn_background(Arc::downgrade(&state));
        Ok(Self { state, path: dir.to_path_buf() })
    }

    /// The directory of this store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state, caught up with other processes' writes.
    fn read(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        let mut st = self.lock();
        st.catch_up()?;
        Ok(st)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way we
        // could repair; keep serving what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` as a writer: under the cross-process lock, caught up, torn tail cut.
    fn write<T>(&self, f: impl FnOnce(&mut State) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut st = self.lock();
        let lock = st.lock.try_clone().map_err(|e| st.io(e))?;
        let _guard = FlockGuard::take(&lock, &st.dir)?;
        st.catch_up()?;
        st.cut_torn_tail()?;
        f(&mut st)
    }
}

/// Opens (creating it) a log; only under the cross-process lock.
fn open_log(dir: &Path, generation: u64) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).read(true).open(dir.join(log_name(generation)))
}

/// Opens a log some writer created.
fn open_existing_log(dir: &Path, generation: u64) -> std::io::Result<File> {
    OpenOptions::new().append(true).read(true).open(dir.join(log_name(generation)))
}

fn spawn_background(state: Weak<Mutex<State>>) {
    let tick = match state.upgrade() {
        Some(s) => s.lock().unwrap_or_else(|p| p.into_inner()).options.poll,
        None => return,
    };
    std::thread::Builder::new()
        .name("embedded-store".into())
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                let Some(state) = state.upgrade() else { return };
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = st.catch_up() {
                    log::error!("embedded store {}: reading the log: {e}", st.dir.display());
                    continue;
                }
                if st.any_expired(now_ms())
                    && let Err(e) = st.expire_leases()
                {
                    log::error!("embedded store {}: expiring leases: {e}", st.dir.display());
                }
            }
        })
        .map(drop)
        .unwrap_or_else(|e| log::error!("embedded store: cannot start its background thread: {e}"));
}

// === impl State ===

impl State {
    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io { path: self.dir.clone(), source }
    }

    /// Reads and applies every complete record appended to the log since the last call,
    /// following log generations; reloads the snapshot if this instance fell behind by more
    /// generations than are kept (its watches then get `Compacted` and must list again).
    fn catch_up(&mut self) -> Result<(), StoreError> {
        for _ in 0..1000 {
            let unlinked = self.read_log_tail()?;
            match open_existing_log(&self.dir, self.generation + 1) {
                Ok(next) => {
                    // The next generation exists, so this one is final: drain it, then switch.
                    self.read_log_tail()?;
                    self.generation += 1;
                    self.log = next;
                    self.offset = 0;
                    self.log_records = 0;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !unlinked {
                        return Ok(());
                    }
                    self.reload_snapshot()?;
                }
                Err(e) => return Err(self.io(e)),
            }
        }
        Err(StoreError::Unavailable(format!("embedded store {}: the log kept moving", self.dir.display())))
    }

    /// Replaces the state with the newest snapshot (this instance's log is gone).
    fn reload_snapshot(&mut self) -> Result<(), StoreError> {
        let path = self.dir.join(SNAPSHOT);
        let bytes = std::fs::read(&path).map_err(|e| self.io(e))?;
        let snap: Snapshot =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt { path, detail: e.to_string() })?;
        if snap.generation <= self.generation {
            return Err(StoreError::Corrupt {
                path: self.dir.clone(),
                detail: format!(
                    "log generation {} vanished but the snapshot is at {}",
                    self.generation, snap.generation
                ),
            });
        }
        let log = match open_existing_log(&self.dir, snap.generation) {
            Ok(f) => f,
            // Moved on again meanwhile: the caller loops and reloads the newer snapshot.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io(e)),
        };
        log::warn!(
            "embedded store {}: fell behind from revision {} to snapshot {}; watches must list again",
            self.dir.display(),
            self.revision,
            snap.revision
        );
        let requested = self.revision + 1;
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(Err(StoreError::Compacted { requested, compacted: snap.revision }));
        }
        self.load(snap);
        self.history.clear();
        self.compacted = self.revision;
        self.log = log;
        self.offset = 0;
        self.log_records = 0;
        Ok(())
    }

    fn load(&mut self, snap: Snapshot) {
        self.revision = snap.revision;
        self.next_lease = snap.next_lease;
        self.generation = snap.generation;
        let floor = self.opened_ms;
        self.leases = snap
            .leases
            .into_iter()
            .map(|(id, ttl, deadline_ms)| (id, LeaseState { ttl, deadline_ms: deadline_ms.max(floor + ttl_ms(ttl)) }))
            .collect();
        self.kvs = snap
            .kvs
            .into_iter()
            .map(|kv| {
                let kv = KeyValue::from(kv);
                (kv.key.clone(), kv)
            })
            .collect();
    }

    /// Reads the complete records after `offset`; returns whether the log file was removed
    /// (a newer snapshot replaced it). Reads in bounded chunks, so replaying a long log at
    /// open does not hold all of it in memory at once.
    fn read_log_tail(&mut self) -> Result<bool, StoreError> {
        const CHUNK: usize = 4 << 20;
        let meta = self.log.metadata().map_err(|e| self.io(e))?;
        let unlinked = std::os::unix::fs::MetadataExt::nlink(&meta) == 0;
        let len = meta.len();
        let mut buf: Vec<u8> = Vec::new();
        while len > self.offset {
            // Unconsumed bytes of the previous chunk (a record longer than a chunk) stay in front.
            let pending = buf.len();
            let want = ((len - self.offset) as usize).min(CHUNK.max(pending * 2)).max(pending + 1);
            buf.resize(want, 0);
            let mut filled = pending;
            while filled < buf.len() {
                let at = self.offset + filled as u64;
                let n = self.log.read_at(&mut buf[filled..], at).map_err(|e| self.io(e))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            let mut start = 0;
            while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
                let line = &buf[start..start + nl];
                let record: Record = serde_json::from_slice(line).map_err(|e| StoreError::Corrupt {
                    path: self.dir.join(log_name(self.generation)),
                    detail: format!("record at byte {}: {e}", self.offset + start as u64),
                })?;
                start += nl + 1;
                self.log_records += 1;
                self.apply_record(record);
            }
            self.offset += start as u64;
            if start == 0 && filled == pending {
                break; // nothing new could be read
            }
            if start == 0 && self.offset + filled as u64 >= len {
                break; // a partial last line: its writer may still be writing it
            }
            buf.drain(..start);
        }
        Ok(unlinked)
    }

    /// Cuts a partial last line: called by a writer holding the lock, so its writer crashed.
    fn cut_torn_tail(&mut self) -> Result<(), StoreError> {
        let len = self.log.metadata().map_err(|e| self.io(e))?.len();
        if len > self.offset {
            log::warn!(
                "embedded store {}: dropping a torn log record ({} bytes) left by a crashed writer",
                self.dir.display(),
                len - self.offset
            );
            self.log.set_len(self.offset).map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    fn apply_record(&mut self, record: Record) {
        match record {
            Record::Commit { rev, changes } => {
                let events = self.apply(rev, changes);
                self.revision = rev;
                self.notify(&events);
                self.push_history(rev, events);
            }
            Record::LeaseGrant { id, ttl, at } => {
                let deadline_ms = (at + ttl_ms(ttl)).max(self.opened_ms + ttl_ms(ttl));
                self.leases.insert(id, LeaseState { ttl, deadline_ms });
                self.next_lease = self.next_lease.max(id + 1);
            }
            Record::LeaseKeepAlive { id, at } => {
                let floor = self.opened_ms;
                if let Some(l) = self.leases.get_mut(&id) {
                    l.deadline_ms = (at + ttl_ms(l.ttl)).max(floor + ttl_ms(l.ttl));
                }
            }
            Record::LeaseRevoke { id } => {
                self.leases.remove(&id);
            }
            Record::Compact { rev } => self.compact_to(rev),
        }
    }

    /// Applies changes at `rev` to the key space; returns the events.
    fn apply(&mut self, rev: Revision, changes: Vec<Change>) -> Vec<WatchEvent> {
        let mut events = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                Change::Put { key, value, lease } => {
                    let create_revision = self.kvs.get(&key).map_or(rev, |kv| kv.create_revision);
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.into_bytes(),
                        mod_revision: rev,
                        create_revision,
                        lease,
                    };
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

    /// Appends a record (the caller holds the cross-process lock and is caught up) and
    /// applies it.
    fn append(&mut self, record: Record) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt {
            path: self.dir.clone(),
            detail: format!("cannot encode a log record: {e}"),
        })?;
        line.push(b'\n');
        if let Err(e) = self.log.write_all(&line) {
            // Do not leave half a record for the next writer to trip over.
            let _ = self.log.set_len(self.offset);
            return Err(self.io(e));
        }
        if self.options.fsync {
            self.log.sync_data().map_err(|e| self.io(e))?;
        }
        self.offset += line.len() as u64;
        self.log_records += 1;
        self.apply_record(record);
        Ok(())
    }

    fn maybe_snapshot(&mut self) -> Result<(), StoreError> {
        if self.log_records < self.options.snapshot_every.max(1) {
            return Ok(());
        }
        let next = self.generation + 1;
        let snap = Snapshot {
            revision: self.revision,
            generation: next,
            next_lease: self.next_lease,
            leases: self.leases.iter().map(|(id, l)| (*id, l.ttl, l.deadline_ms)).collect(),
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
        // Order matters (see the module docs): new log, then snapshot, then drop an old log.
        self.log.sync_all().map_err(|e| self.io(e))?;
        let new_log = open_log(&self.dir, next).map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, self.dir.join(SNAPSHOT)).map_err(|e| self.io(e))?;
        // Keep the generation just finished for instances that have not switched yet.
        if let Some(older) = self.generation.checked_sub(1) {
            let _ = std::fs::remove_file(self.dir.join(log_name(older)));
        }
        self.generation = next;
        self.log = new_log;
        self.offset = 0;
        self.log_records = 0;
        Ok(())
    }

    /// Commits changes as one revision. No-op when nothing changes.
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
        self.append(Record::Commit { rev, changes })?;
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
        if !self.leases.contains_key(&id) {
            return Err(StoreError::LeaseNotFound(id));
        }
        let keys: Vec<String> = self.kvs.values().filter(|kv| kv.lease == id).map(|kv| kv.key.clone()).collect();
        self.commit(keys.into_iter().map(|key| Change::Delete { key }).collect())?;
        self.append(Record::LeaseRevoke { id })?;
        self.maybe_snapshot()
    }

    fn any_expired(&self, now: i64) -> bool {
        self.leases.values().any(|l| l.deadline_ms <= now)
    }

    /// Revokes expired leases, as a writer (lock, catch up: a keep-alive may have arrived).
    fn expire_leases(&mut self) -> Result<(), StoreError> {
        let lock = self.lock.try_clone().map_err(|e| self.io(e))?;
        let _guard = FlockGuard::take(&lock, &self.dir)?;
        self.catch_up()?;
        self.cut_torn_tail()?;
        let now = now_ms();
        let expired: Vec<LeaseId> =
            self.leases.iter().filter(|(_, l)| l.deadline_ms <= now).map(|(id, _)| *id).collect();
        for id in expired {
            self.revoke(id)?;
        }
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
        Ok(self.read()?.kvs.get(key).cloned())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        self.write(|st| {
            let lease = st.check_lease(lease)?;
            st.commit(vec![Change::Put { key: key.to_owned(), value: Val::from_bytes(&value), lease }])
        })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.write(|st| {
            if !st.kvs.contains_key(key) {
                return Ok(false);
            }
            st.commit(vec![Change::Delete { key: key.to_owned() }])?;
            Ok(true)
        })
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        self.write(|st| {
            let keys: Vec<String> = st.keys_under(prefix).map(|kv| kv.key.clone()).collect();
            let n = keys.len() as u64;
            st.commit(keys.into_iter().map(|key| Change::Delete { key }).collect())?;
            Ok(n)
        })
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        let st = self.read()?;
        Ok(ListResult { kvs: st.keys_under(prefix).cloned().collect(), revision: st.revision })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        self.write(|st| {
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
        })
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId, StoreError> {
        self.write(|st| {
            let id = st.next_lease;
            st.append(Record::LeaseGrant { id, ttl: ttl_secs.max(1), at: now_ms() })?;
            st.maybe_snapshot()?;
            Ok(id)
        })
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<i64, StoreError> {
        self.write(|st| {
            let ttl = st.leases.get(&lease).ok_or(StoreError::LeaseNotFound(lease))?.ttl;
            st.append(Record::LeaseKeepAlive { id: lease, at: now_ms() })?;
            st.maybe_snapshot()?;
            Ok(ttl)
        })
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.write(|st| st.revoke(lease))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.read()?;
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
        self.write(|st| {
            st.append(Record::Compact { rev: revision })?;
            st.maybe_snapshot()
        })
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }
}

/// A receiver as a stream (saves a dependency on tokio-stream).
struct UnboundedStream<T>(mpsc::UnboundedReceiver<T>);

impl<T> futures::Stream for UnboundedStream<T> {
    type Item = T;
    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
