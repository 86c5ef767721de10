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
//! then removes the logs before `log-<gen>` (readers keep their log open until they have read it to the
//! end; seeing `log-<gen+1>` tells them `log-<gen>` is final). An instance that fell behind
//! by more than that reloads the snapshot, and its watches get `Compacted` (list again).
//! Without a snapshot the logs must start at `log-0`: a missing `snapshot.json` next to
//! logs of later generations is [`StoreError::Corrupt`] (their state cannot be rebuilt).
//!
//! Snapshots are housekeeping: one that cannot be written (disk full) does not fail the write
//! that triggered it, which is already in the log. The failure is logged once per streak of
//! failures, and the snapshot is tried again after another `Options::snapshot_every` records.
//! If the rename fails after `log-<gen+1>` was created, the store continues in the new
//! generation anyway (readers may follow it already); the snapshot on disk stays older and
//! opening follows the chain of logs.
//!
//! fsync: a failed fsync of the log (after each commit with `Options::fsync`, or before a
//! snapshot) leaves the durability of records already written unknown, and retrying it would
//! report success for data the kernel may have dropped (PostgreSQL's "fsyncgate"). The record
//! stays in the log (other processes may have read it already) and is applied, the write
//! returns [`StoreError::Io`] (outcome unknown, like an etcd timeout), and this instance
//! refuses every later write until it is reopened (the process restarts). Reads go on. A
//! snapshot also fsyncs the directory after creating the next log and after the rename (a
//! file's fsync does not make its name durable), and an open with `Options::fsync` after
//! creating a log; a failure there refuses writes the same way.
//!
//! History: the events of the last `Options::history` revisions are kept for watches
//! (including the ones replayed from the log at open); older start revisions get
//! [`StoreError::Compacted`], and so does the revision of the snapshot loaded (its events are
//! not kept). A watch buffers at most `Options::watch_buffer` messages its consumer has not
//! read; one more ends it with [`StoreError::Compacted`] (list again), so a stalled consumer
//! costs bounded memory.
//!
//! Leases: grants and keep-alives are log records with a wall-clock time, so every process
//! agrees on deadlines; the deadline in a snapshot is wall-clock too. Each instance turns a
//! deadline into one on its monotonic clock when it applies the record (the time left, at most
//! the TTL), and expires by that, so a step of the wall clock does not expire or extend the
//! leases it already knows. Any process expires a lease whose deadline passed (after catching
//! up under the lock): in the background and before every write, so a keep-alive of a lease
//! past its deadline fails with [`StoreError::LeaseNotFound`] (the lease is revoked). A revoke
//! is one log record (the lease and the deletion of its keys), never half applied. A lease
//! never expires less than its TTL after this instance opened the store, so leases survive a
//! restart of their owner like etcd's do after a leader change. Writes are flushed to the
//! kernel on every commit (safe against a process crash); `Options::fsync` also syncs them to
//! disk.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// Messages a watch buffers for a consumer that does not read them; when it would need
    /// more, the watch ends with [`StoreError::Compacted`] (list again). As etcd's client
    /// buffers 1024.
    pub watch_buffer: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            fsync: false,
            history: 100_000,
            snapshot_every: 50_000,
            poll: Duration::from_millis(50),
            watch_buffer: 1024,
        }
    }
}

/// The embedded store (see the module docs).
pub struct EmbeddedStore {
    state: Arc<Mutex<State>>,
    path: PathBuf,
}

struct LeaseState {
    ttl: i64,
    /// Unix ms after which the lease is expired (what snapshots keep).
    deadline_ms: i64,
    /// The same deadline on this instance's monotonic clock: what it expires the lease by.
    expires: Instant,
}

struct Watcher {
    prefix: String,
    /// The watch's start revision: earlier revisions are not its business.
    start: Revision,
    /// Bounded; one slot is kept for the error that ends the watch.
    tx: mpsc::Sender<Result<WatchMessage, StoreError>>,
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
    /// The same moment on the monotonic clock.
    opened: Instant,
    lock: File,
    /// Why this instance refuses writes: an fsync failed (see the module docs).
    failed: Option<String>,
    /// `log_records` from which a snapshot is tried (after a failure: `snapshot_every` later).
    snapshot_at: usize,
    /// Snapshots that failed in a row (logged once per streak).
    snapshot_failures: u32,
    /// Test hook: the next fsyncs of the log fail.
    #[cfg(test)]
    fail_sync: bool,
    /// Test hook: the next fsyncs of the directory fail.
    #[cfg(test)]
    fail_dir_sync: bool,
    /// Test hook: fsyncs of the directory done.
    #[cfg(test)]
    dir_syncs: usize,
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
    Commit {
        rev: Revision,
        changes: Vec<Change>,
    },
    LeaseGrant {
        id: LeaseId,
        ttl: i64,
        at: i64,
    },
    LeaseKeepAlive {
        id: LeaseId,
        at: i64,
    },
    /// Revokes a lease that holds no keys. (Logs of older versions wrote the deletion of a
    /// lease's keys as a `Commit` before it; they read the same.)
    LeaseRevoke {
        id: LeaseId,
    },
    /// Revokes a lease and deletes its keys at `rev`, in one record. A tag of its own: an
    /// older binary sharing the directory fails on it (Corrupt) rather than reading it as a
    /// revoke without keys and keeping them.
    LeaseRevokeWithKeys {
        id: LeaseId,
        rev: Revision,
        keys: Vec<String>,
    },
    Compact {
        rev: Revision,
    },
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

/// A lease with this wall-clock deadline, seen now by an instance that opened the store at
/// `opened_ms` (wall clock) = `opened` (monotonic). Its monotonic deadline is the time left
/// (at most the TTL, so a wall-clock step between the writer and this reader moves it by no
/// more than that). Neither deadline comes before the TTL passed since the store was opened.
fn lease_state(ttl: i64, deadline_ms: i64, opened_ms: i64, opened: Instant) -> LeaseState {
    let ttl_ms = ttl_ms(ttl);
    let deadline_ms = deadline_ms.max(opened_ms + ttl_ms);
    let left = (deadline_ms - now_ms()).clamp(0, ttl_ms);
    let expires =
        (Instant::now() + Duration::from_millis(left as u64)).max(opened + Duration::from_millis(ttl_ms as u64));
    LeaseState { ttl, deadline_ms, expires }
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
        let opened = Instant::now();
        let mut kvs = BTreeMap::new();
        let mut revision = 1;
        // Nothing before the first revision is lost.
        let mut compacted = 1;
        let mut next_lease = 1;
        let mut generation = 0;
        let mut leases = HashMap::new();
        let snapshot_found = match std::fs::read(dir.join(SNAPSHOT)) {
            Ok(bytes) => {
                let snap: Snapshot = serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt { path: dir.join(SNAPSHOT), detail: e.to_string() })?;
                revision = snap.revision;
                // The snapshot's own revision has no events left: watches start after it.
                compacted = snap.revision + 1;
                next_lease = snap.next_lease;
                generation = snap.generation;
                for (id, ttl, deadline_ms) in snap.leases {
                    leases.insert(id, lease_state(ttl, deadline_ms, opened_ms, opened));
                }
                for kv in snap.kvs {
                    let kv = KeyValue::from(kv);
                    kvs.insert(kv.key.clone(), kv);
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io(e)),
        };
        // Logs of older generations are leftovers of a snapshot interrupted before cleanup;
        // the ones from `generation` on must follow each other (the chain catching up reads).
        let mut logs = std::collections::BTreeSet::new();
        for g in log_generations(dir).map_err(io)? {
            if g + 1 < generation {
                let _ = std::fs::remove_file(dir.join(log_name(g)));
            } else if g >= generation {
                logs.insert(g);
            }
        }
        if logs.iter().zip(generation..).any(|(found, expected)| *found != expected) {
            let names: Vec<String> = logs.iter().map(|g| log_name(*g)).collect();
            let detail = if snapshot_found {
                format!(
                    "{SNAPSHOT} continues in {} but the logs are {}: a generation is missing",
                    log_name(generation),
                    names.join(", ")
                )
            } else {
                format!(
                    "{SNAPSHOT} is missing but {} continue a snapshot (the chain does not start at {}); \
                     restore {SNAPSHOT} or move the logs away to start empty",
                    names.join(", "),
                    log_name(0)
                )
            };
            return Err(StoreError::Corrupt { path: dir.to_path_buf(), detail });
        }
        // A snapshot being written when its writer crashed.
        let tmp = dir.join(format!("{SNAPSHOT}.tmp"));
        if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.is_file()) {
            let _ = std::fs::remove_file(&tmp);
        }
        let log = open_log(dir, generation).map_err(io)?;
        let snapshot_every = options.snapshot_every.max(1);
        let mut state = State {
            dir: dir.to_path_buf(),
            compacted,
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
            opened,
            lock: lock.try_clone().map_err(io)?,
            failed: None,
            snapshot_at: snapshot_every,
            snapshot_failures: 0,
            #[cfg(test)]
            fail_sync: false,
            #[cfg(test)]
            fail_dir_sync: false,
            #[cfg(test)]
            dir_syncs: 0,
        };
        if state.options.fsync {
            // A log this open created: its name must survive a power loss like its records.
            state.sync_dir().map_err(io)?;
        }
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

    /// Runs `f` as a writer (see [`State::writing`]).
    fn write<T>(&self, f: impl FnOnce(&mut State) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.lock().writing(f)
    }
}

/// The generations of the logs in `dir`.
fn log_generations(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(g) = name.to_str().and_then(|n| n.strip_prefix("log-")?.strip_suffix(".jsonl")?.parse().ok()) {
            found.push(g);
        }
    }
    Ok(found)
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
            // The last error logged: one that repeats every tick (a corrupt record, a full
            // disk under an expired lease) is logged once, and its end once.
            let mut failing: Option<String> = None;
            loop {
                std::thread::sleep(tick);
                let Some(state) = state.upgrade() else { return };
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                let result = st.catch_up().map_err(|e| format!("reading the log: {e}")).and_then(|()| {
                    // An instance that refuses writes cannot revoke (and would fail every tick).
                    if st.failed.is_none() && st.any_expired(Instant::now()) {
                        st.writing(|_| Ok(())).map_err(|e| format!("expiring leases: {e}"))
                    } else {
                        Ok(())
                    }
                });
                match (result, &failing) {
                    (Ok(()), None) => {}
                    (Ok(()), Some(_)) => {
                        log::info!("embedded store {}: background work succeeds again", st.dir.display());
                        failing = None;
                    }
                    (Err(e), Some(last)) if *last == e => {}
                    (Err(e), _) => {
                        log::error!("embedded store {}: {e} (retrying every {tick:?})", st.dir.display());
                        failing = Some(e);
                    }
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
                    self.switch_log(self.generation + 1, next);
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
        // The snapshot's own revision has no events here: watches start after it.
        let compacted = snap.revision + 1;
        for w in self.watchers.drain(..) {
            // The slot kept free for this error makes it fit.
            let _ = w.tx.try_send(Err(StoreError::Compacted { requested, compacted }));
        }
        let generation = snap.generation;
        self.load(snap);
        self.history.clear();
        self.compacted = compacted;
        self.switch_log(generation, log);
        Ok(())
    }

    /// Continues in log `generation` (opened as `log`) from its start.
    fn switch_log(&mut self, generation: u64, log: File) {
        self.generation = generation;
        self.log = log;
        self.offset = 0;
        self.log_records = 0;
        self.snapshot_at = self.options.snapshot_every.max(1);
    }

    fn load(&mut self, snap: Snapshot) {
        self.revision = snap.revision;
        self.next_lease = snap.next_lease;
        self.generation = snap.generation;
        let (opened_ms, opened) = (self.opened_ms, self.opened);
        self.leases = snap
            .leases
            .into_iter()
            .map(|(id, ttl, deadline_ms)| (id, lease_state(ttl, deadline_ms, opened_ms, opened)))
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
                let record: Record = match serde_json::from_slice(line) {
                    Ok(record) => record,
                    Err(e) => {
                        // The records before it were applied (their events sent): they are
                        // read, and the next call starts at the bad one, not before them.
                        self.offset += start as u64;
                        return Err(StoreError::Corrupt {
                            path: self.dir.join(log_name(self.generation)),
                            detail: format!("record at byte {}: {e}", self.offset),
                        });
                    }
                };
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
            Record::Commit { rev, changes } => self.apply_commit(rev, changes),
            Record::LeaseGrant { id, ttl, at } => {
                let lease = lease_state(ttl, at + ttl_ms(ttl), self.opened_ms, self.opened);
                self.leases.insert(id, lease);
                self.next_lease = self.next_lease.max(id + 1);
            }
            Record::LeaseKeepAlive { id, at } => {
                let (opened_ms, opened) = (self.opened_ms, self.opened);
                if let Some(l) = self.leases.get_mut(&id) {
                    *l = lease_state(l.ttl, at + ttl_ms(l.ttl), opened_ms, opened);
                }
            }
            Record::LeaseRevoke { id } => {
                self.leases.remove(&id);
            }
            Record::LeaseRevokeWithKeys { id, rev, keys } => {
                self.apply_commit(rev, keys.into_iter().map(|key| Change::Delete { key }).collect());
                self.leases.remove(&id);
            }
            Record::Compact { rev } => self.compact_to(rev),
        }
    }

    fn apply_commit(&mut self, rev: Revision, changes: Vec<Change>) {
        let events = self.apply(rev, changes);
        self.revision = rev;
        self.notify(rev, &events);
        self.push_history(rev, events);
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

    /// Refuses writes once an fsync failed (see the module docs).
    fn writable(&self) -> Result<(), StoreError> {
        match &self.failed {
            None => Ok(()),
            Some(why) => Err(StoreError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other(format!(
                    "writes are refused since {why}: the durability of the log is unknown; reopen the store \
                     (restart the process)"
                )),
            }),
        }
    }

    /// Runs `f` as a writer: under the cross-process lock, caught up, torn tail cut, leases
    /// past their deadline revoked.
    fn writing<T>(&mut self, f: impl FnOnce(&mut State) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.writable()?;
        let lock = self.lock.try_clone().map_err(|e| self.io(e))?;
        let _guard = FlockGuard::take(&lock, &self.dir)?;
        self.catch_up()?;
        self.cut_torn_tail()?;
        self.expire_leases()?;
        f(self)
    }

    /// fsyncs the log (data; `all` also its metadata).
    fn sync_log(&self, all: bool) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_sync {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        if all { self.log.sync_all() } else { self.log.sync_data() }
    }

    /// fsyncs the directory, so the names created or renamed in it survive a power loss
    /// (an fsync of a file does not make its directory entry durable).
    fn sync_dir(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        {
            if self.fail_dir_sync {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            self.dir_syncs += 1;
        }
        File::open(&self.dir)?.sync_all()
    }

    /// An fsync of the log failed: from now on this instance refuses writes.
    fn sync_failed(&mut self, e: &std::io::Error) -> StoreError {
        let what = log_name(self.generation);
        self.refuse_writes(&what, e)
    }

    /// An fsync of `what` failed: from now on this instance refuses writes.
    fn refuse_writes(&mut self, what: &str, e: &std::io::Error) -> StoreError {
        let why = format!("an fsync of {what} failed ({e})");
        log::error!(
            "embedded store {}: {why}; records already written may not be on disk; this instance refuses \
             writes until the store is reopened",
            self.dir.display()
        );
        self.failed = Some(why);
        match self.writable() {
            Err(e) => e,
            Ok(()) => unreachable!("failed was just set"),
        }
    }

    /// Appends a record (the caller holds the cross-process lock and is caught up) and
    /// applies it.
    fn append(&mut self, record: Record) -> Result<(), StoreError> {
        self.writable()?;
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
        let synced = if self.options.fsync { self.sync_log(false) } else { Ok(()) };
        // The record is complete in the log: other processes may have read it already, so it
        // is applied here too, even when its fsync failed.
        self.offset += line.len() as u64;
        self.log_records += 1;
        self.apply_record(record);
        // A failed fsync is not retried (it could report success for data the kernel
        // dropped): the outcome of this write is unknown and later writes are refused.
        synced.map_err(|e| self.sync_failed(&e))
    }

    /// Writes a snapshot when the log is long enough. Housekeeping: the record that made the
    /// log long is durable already, so a failure is logged (once per streak) and the
    /// snapshot tried again `snapshot_every` records later, never the caller's error.
    fn maybe_snapshot(&mut self) {
        if self.log_records < self.snapshot_at || self.failed.is_some() {
            return;
        }
        let every = self.options.snapshot_every.max(1);
        match self.snapshot() {
            Ok(()) => {
                if self.snapshot_failures > 0 {
                    log::info!(
                        "embedded store {}: snapshot written after {} failed attempts",
                        self.dir.display(),
                        self.snapshot_failures
                    );
                }
                self.snapshot_failures = 0;
            }
            Err(e) => {
                self.snapshot_failures += 1;
                self.snapshot_at = self.log_records + every;
                if self.snapshot_failures == 1 {
                    log::error!(
                        "embedded store {}: writing a snapshot failed: {e}; writes go on in the log (it grows), \
                         trying again after {every} more records",
                        self.dir.display()
                    );
                } else if self.snapshot_failures.is_power_of_two() {
                    log::warn!(
                        "embedded store {}: writing a snapshot failed {} times in a row: {e}",
                        self.dir.display(),
                        self.snapshot_failures
                    );
                }
            }
        }
    }

    fn snapshot(&mut self) -> Result<(), StoreError> {
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
        let discard = |tmp: &Path| {
            // Only a file this writer made (a directory in the way stays).
            if std::fs::symlink_metadata(tmp).is_ok_and(|m| m.is_file()) {
                let _ = std::fs::remove_file(tmp);
            }
        };
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            discard(&tmp);
            return Err(StoreError::Io { path: tmp, source: e });
        }
        // Order matters (see the module docs): the log synced, a new log, then the snapshot,
        // then an old log dropped.
        if let Err(e) = self.sync_log(true) {
            discard(&tmp);
            return Err(self.sync_failed(&e));
        }
        let new_log = match open_log(&self.dir, next) {
            Ok(f) => f,
            Err(e) => {
                discard(&tmp);
                return Err(self.io(e));
            }
        };
        // The new log's name must be on disk before a snapshot of its generation: after a
        // power loss, a snapshot naming a log that vanished could not be followed.
        if let Err(e) = self.sync_dir() {
            discard(&tmp);
            // Other instances may follow the new log already and write there.
            self.switch_log(next, new_log);
            return Err(self.refuse_writes("the store directory", &e));
        }
        if let Err(e) = std::fs::rename(&tmp, self.dir.join(SNAPSHOT)) {
            discard(&tmp);
            // Other instances may follow the new log already: so does this one. The snapshot
            // on disk stays older; opening follows the chain of logs from it.
            self.switch_log(next, new_log);
            return Err(self.io(e));
        }
        // The rename on disk before the log it replaces goes.
        if let Err(e) = self.sync_dir() {
            self.switch_log(next, new_log);
            return Err(self.refuse_writes("the store directory", &e));
        }
        // Keep the generation just finished for instances that have not switched yet; every
        // older one goes (not only the one before it: after a failed rename there are two), so
        // an instance still reading one sees it unlinked and reloads the snapshot.
        for g in log_generations(&self.dir).unwrap_or_default() {
            if g < self.generation {
                let _ = std::fs::remove_file(self.dir.join(log_name(g)));
            }
        }
        self.switch_log(next, new_log);
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
        self.maybe_snapshot();
        Ok(rev)
    }

    /// Sends the events of revision `rev` to the watches they concern. A watch whose consumer
    /// left `watch_buffer` messages unread ends with `Compacted` (it must list again).
    fn notify(&mut self, rev: Revision, events: &[WatchEvent]) {
        let dir = &self.dir;
        self.watchers.retain(|w| {
            if w.tx.is_closed() {
                return false;
            }
            if rev < w.start {
                return true;
            }
            let mine: Vec<WatchEvent> = events.iter().filter(|e| e.kv.key.starts_with(&w.prefix)).cloned().collect();
            if mine.is_empty() {
                return true;
            }
            // Only this store sends, under its lock: the capacity seen is there to use.
            if w.tx.capacity() > 1 {
                return w.tx.try_send(Ok(WatchMessage::Events(mine))).is_ok();
            }
            log::warn!(
                "embedded store {}: a watch of {:?} has {} messages unread; ending it at revision {rev} (list again)",
                dir.display(),
                w.prefix,
                w.tx.max_capacity() - 1
            );
            let _ = w.tx.try_send(Err(StoreError::Compacted { requested: rev, compacted: rev + 1 }));
            false
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

    /// Revokes a lease: one record that deletes its keys (one revision, if it has any) and
    /// removes it.
    fn revoke(&mut self, id: LeaseId) -> Result<(), StoreError> {
        if !self.leases.contains_key(&id) {
            return Err(StoreError::LeaseNotFound(id));
        }
        let keys: Vec<String> = self.kvs.values().filter(|kv| kv.lease == id).map(|kv| kv.key.clone()).collect();
        let record = match keys.is_empty() {
            true => Record::LeaseRevoke { id },
            false => Record::LeaseRevokeWithKeys { id, rev: self.revision + 1, keys },
        };
        self.append(record)?;
        self.maybe_snapshot();
        Ok(())
    }

    fn any_expired(&self, now: Instant) -> bool {
        self.leases.values().any(|l| l.expires <= now)
    }

    /// Revokes the leases past their deadline; only as a writer (lock held, caught up: a
    /// keep-alive may have arrived).
    fn expire_leases(&mut self) -> Result<(), StoreError> {
        let now = Instant::now();
        let expired: Vec<LeaseId> = self.leases.iter().filter(|(_, l)| l.expires <= now).map(|(id, _)| *id).collect();
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
            st.maybe_snapshot();
            Ok(id)
        })
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<i64, StoreError> {
        // `write` revoked the lease if its deadline passed: then it is not found.
        self.write(|st| {
            let ttl = st.leases.get(&lease).ok_or(StoreError::LeaseNotFound(lease))?.ttl;
            st.append(Record::LeaseKeepAlive { id: lease, at: now_ms() })?;
            st.maybe_snapshot();
            Ok(ttl)
        })
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.write(|st| st.revoke(lease))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let mut st = self.read()?;
        // One slot more than the messages it buffers, for the error that ends the watch.
        let (tx, rx) = mpsc::channel(st.options.watch_buffer.max(1) + 1);
        let start = if from <= 0 { st.revision + 1 } else { from };
        let mut replay = VecDeque::new();
        if start < st.compacted {
            // Reported through the stream, as etcd does.
            replay.push_back(Err(StoreError::Compacted { requested: start, compacted: st.compacted }));
        } else {
            // The history is in memory anyway; what is newer goes through the bounded channel.
            for (rev, events) in &st.history {
                if *rev < start {
                    continue;
                }
                let mine: Vec<WatchEvent> = events.iter().filter(|e| e.kv.key.starts_with(prefix)).cloned().collect();
                if !mine.is_empty() {
                    replay.push_back(Ok(WatchMessage::Events(mine)));
                }
            }
            st.watchers.push(Watcher { prefix: prefix.to_owned(), start, tx });
        }
        drop(st);
        Ok(Box::pin(Watch { replay, rx }))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.write(|st| {
            st.append(Record::Compact { rev: revision })?;
            st.maybe_snapshot();
            Ok(())
        })
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }
}

/// A watch: the events replayed from the history, then the live ones.
struct Watch {
    replay: VecDeque<Result<WatchMessage, StoreError>>,
    rx: mpsc::Receiver<Result<WatchMessage, StoreError>>,
}

impl futures::Stream for Watch {
    type Item = Result<WatchMessage, StoreError>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if let Some(m) = self.replay.pop_front() {
            return std::task::Poll::Ready(Some(m));
        }
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail_syncs(s: &EmbeddedStore, fail: bool) {
        s.lock().fail_sync = fail;
    }

    #[tokio::test]
    async fn a_failed_fsync_is_not_retried_and_later_writes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open_with(dir.path(), Options { fsync: true, ..Options::default() }).unwrap();
        s.put("/a", b"1".to_vec(), None).await.unwrap();
        let lease = s.lease_grant(60).await.unwrap();
        fail_syncs(&s, true);
        assert!(matches!(s.put("/b", b"2".to_vec(), None).await, Err(StoreError::Io { .. })), "durability unknown");
        // The disk seems fine again: a retried fsync would say so, and lie.
        fail_syncs(&s, false);
        assert!(matches!(s.put("/c", b"3".to_vec(), None).await, Err(StoreError::Io { .. })), "writes refused");
        assert!(matches!(s.lease_keep_alive(lease).await, Err(StoreError::Io { .. })));
        assert!(matches!(s.delete("/a").await, Err(StoreError::Io { .. })));
        // Its owner can tell (the agent restarts on it).
        assert!(s.failure().is_some_and(|why| why.contains("fsync")), "{:?}", s.failure());
        // Reads go on; the record whose fsync failed is in the log, as other processes see it.
        assert_eq!(s.get("/a").await.unwrap().unwrap().value, b"1");
        assert_eq!(s.get("/b").await.unwrap().unwrap().value, b"2");
        assert_eq!(s.get("/c").await.unwrap(), None);
        drop(s);
        // Reopened (the process restarted): writes again.
        let s = EmbeddedStore::open_with(dir.path(), Options { fsync: true, ..Options::default() }).unwrap();
        assert_eq!(s.get("/b").await.unwrap().unwrap().value, b"2");
        s.put("/c", b"3".to_vec(), None).await.unwrap();
        assert_eq!(s.failure(), None);
    }

    #[tokio::test]
    async fn a_failed_fsync_before_a_snapshot_refuses_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options { snapshot_every: 2, ..Options::default() };
        let s = EmbeddedStore::open_with(dir.path(), options).unwrap();
        s.put("/a", b"1".to_vec(), None).await.unwrap();
        fail_syncs(&s, true);
        // Without Options::fsync the write is done once in the kernel; the snapshot's fsync
        // of the log fails after it.
        s.put("/b", b"2".to_vec(), None).await.expect("the write itself succeeded");
        assert!(!dir.path().join(SNAPSHOT).exists());
        assert!(!dir.path().join(format!("{SNAPSHOT}.tmp")).exists(), "the temporary snapshot is removed");
        fail_syncs(&s, false);
        assert!(matches!(s.put("/c", b"3".to_vec(), None).await, Err(StoreError::Io { .. })));
        assert_eq!(s.get("/b").await.unwrap().unwrap().value, b"2");
    }

    #[tokio::test]
    async fn a_snapshot_makes_the_names_it_creates_durable() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options { snapshot_every: 2, ..Options::default() };
        let s = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        s.put("/a", b"1".to_vec(), None).await.unwrap();
        assert_eq!(s.lock().dir_syncs, 0, "no fsync option, no snapshot yet");
        s.put("/b", b"2".to_vec(), None).await.unwrap();
        assert!(dir.path().join(SNAPSHOT).exists());
        // Once after creating the next log, once after the rename.
        assert_eq!(s.lock().dir_syncs, 2);
        // With Options::fsync, the log an open creates is made durable too.
        let fresh = tempfile::tempdir().unwrap();
        let f = EmbeddedStore::open_with(fresh.path(), Options { fsync: true, ..Options::default() }).unwrap();
        assert_eq!(f.lock().dir_syncs, 1);
    }

    #[tokio::test]
    async fn a_failed_directory_fsync_in_a_snapshot_refuses_later_writes_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options { snapshot_every: 2, ..Options::default() };
        let s = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        s.put("/a", b"1".to_vec(), None).await.unwrap();
        s.lock().fail_dir_sync = true;
        s.put("/b", b"2".to_vec(), None).await.expect("the write itself succeeded");
        assert!(!dir.path().join(format!("{SNAPSHOT}.tmp")).exists(), "the temporary snapshot is removed");
        s.lock().fail_dir_sync = false;
        assert!(matches!(s.put("/c", b"3".to_vec(), None).await, Err(StoreError::Io { .. })), "writes refused");
        assert!(s.failure().is_some_and(|why| why.contains("directory")), "{:?}", s.failure());
        assert_eq!(s.get("/b").await.unwrap().unwrap().value, b"2");
        drop(s);
        let s = EmbeddedStore::open_with(dir.path(), options).unwrap();
        assert_eq!(s.get("/a").await.unwrap().unwrap().value, b"1");
        assert_eq!(s.get("/b").await.unwrap().unwrap().value, b"2");
        s.put("/c", b"3".to_vec(), None).await.unwrap();
        assert_eq!(s.get("/c").await.unwrap().unwrap().value, b"3");
    }
}
