//! The cluster state store: one async API ([`Store`]) over two backends.
//!
//! - [`etcd::EtcdStore`]: etcd v3 (the multi-node case; contiv-ksr writes, agents watch).
//! - [`embedded::EmbeddedStore`]: a persistent store inside the process (single-node use,
//!   no extra process; several processes of the node may open the same directory), with the
//!   same semantics: a global revision counter, MVCC enough to
//!   serve watches from a recent revision, leases with expiry, compare-and-swap transactions.
//!
//! [`open`] picks the backend from a [`StoreConfig`]: etcd when endpoints are configured,
//! else the embedded store at a path.
//!
//! Revisions follow etcd: every write (put, delete, transaction with writes) bumps one global
//! revision; a key's `mod_revision` is the revision of its last write; a missing key has
//! revision 0. A watch started from revision `r` delivers every change with revision `>= r`
//! in order, survives reconnects of the backend, and fails with [`StoreError::Compacted`]
//! when `r` is older than the history kept, so the caller lists again and resumes.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::{Deserialize, Serialize};

pub mod embedded;
pub mod etcd;
mod lease;
pub mod metrics;
#[cfg(feature = "test-support")]
pub mod testing;

pub use lease::spawn_keep_alive;

/// A store revision (etcd's: a global, monotonically increasing write counter).
pub type Revision = i64;
/// A lease id; 0 means "no lease".
pub type LeaseId = i64;

/// One key with its value and versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last write of this key.
    pub mod_revision: Revision,
    /// Revision of the write that created this key (since its last deletion).
    pub create_revision: Revision,
    /// Lease the key is attached to; 0 when none.
    pub lease: LeaseId,
}

/// The result of a prefix listing: the values and the store revision they were read at.
/// Watching from `revision + 1` afterwards misses nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResult {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv.value` is empty, `kv.mod_revision` is the
/// revision of the delete and `kv.create_revision` is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// What a watch stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// Changes, in revision order. All events of one revision (one transaction) arrive in
    /// the same message.
    Events(Vec<WatchEvent>),
    /// The backend connection broke and the watch was re-established, resuming at
    /// `resumed_from` (the last delivered revision + 1). No event was lost; this is a hint
    /// for consumers that want to resync anyway.
    Reconnected { resumed_from: Revision },
}

/// A watch: an endless stream of messages; it ends only after yielding an error
/// ([`StoreError::Compacted`] when history is gone or, embedded store, when the consumer left
/// too many messages unread; [`StoreError::Rewound`] when the store lost data under it; or a
/// fatal error). Either way: list again, then watch anew.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchMessage, StoreError>> + Send>>;

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists with exactly this mod_revision (0 is the same as `Absent`).
    ModRevision(String, Revision),
    /// The key exists and holds exactly this value.
    Value(String, Vec<u8>),
}

/// An operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
    /// Reads a key; its result lands in [`TxnResult::gets`].
    Get {
        key: String,
    },
}

/// A compare-and-swap transaction: if every compare holds, run `success`, else `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

/// The outcome of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the compares held (the `success` branch ran).
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
    /// One entry per `TxnOp::Get` of the branch that ran, in order.
    pub gets: Vec<Option<KeyValue>>,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested revision was compacted away; list again and watch from the new revision.
    /// The embedded store also ends a watch with it when its consumer left
    /// `embedded::Options::watch_buffer` messages unread (`requested`: the first revision not
    /// delivered).
    #[error("revision {requested} is compacted (oldest kept: {compacted})")]
    Compacted { requested: Revision, compacted: Revision },
    /// The store's revision went below what this watch already delivered: the store was
    /// wiped or restored from a backup. List again and watch from the new revision.
    #[error("the store went back from revision {watched} to {current} (wiped or restored); list again")]
    Rewound { watched: Revision, current: Revision },
    /// The lease does not exist (expired or revoked).
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The backend could not be reached or answered with a transport error.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The etcd server answered with an error.
    #[error("etcd: {0}")]
    Etcd(#[source] etcd_client::Error),
    /// The embedded store's files could not be read or written.
    #[error("embedded store at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The embedded store's files are damaged.
    #[error("embedded store at {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// The store was closed.
    #[error("store closed")]
    Closed,
    /// The configuration is invalid.
    #[error("invalid store configuration: {0}")]
    Config(String),
}

/// The store API. Object safe: use it as `Arc<dyn Store>`.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Writes one key, optionally attached to a lease; returns the new store revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError>;
    /// Deletes one key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Deletes every key under a prefix; returns how many there were.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError>;
    /// Lists every key under a prefix, sorted by key, with the revision of the read.
    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError>;
    /// Runs a compare-and-swap transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError>;
    /// Grants a lease that expires `ttl` seconds after the last keep-alive.
    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId, StoreError>;
    /// Refreshes a lease once; returns its TTL in seconds. Fails with
    /// [`StoreError::LeaseNotFound`] once it expired.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<i64, StoreError>;
    /// Revokes a lease, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Watches every key under `prefix` from revision `from` (inclusive; 0 = from now on).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;
    /// Discards history older than `revision` (watches from before it get `Compacted`).
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;
    /// Which backend this is ("etcd" or "embedded"), for logs.
    fn backend(&self) -> &'static str;
    /// Why this handle can no longer write until it is opened again (the embedded store
    /// after a failed fsync), if so: its owner should restart rather than keep failing.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StoreConfig {
    /// etcd client URLs (e.g. `http://127.0.0.1:2379`). Empty: use the embedded store.
    pub etcd_endpoints: Vec<String>,
    /// Directory of the embedded store.
    pub embedded_path: PathBuf,
    /// How long to wait when dialing etcd.
    pub dial_timeout_ms: u64,
    /// Embedded store: fsync each write (slower, survives power loss, not only crashes).
    pub embedded_fsync: bool,
    /// TLS towards etcd (`https://` endpoints): the CA that signed etcd's server certificate
    /// and, for client-certificate authentication, this client's certificate and key.
    pub etcd_tls: Option<TlsConfig>,
}

/// TLS settings of the etcd client: PEM files, read when the store is opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate(s) that signed etcd's server certificate.
    pub ca_file: PathBuf,
    /// Client certificate presented to etcd (`--client-cert-auth`); needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name the server certificate must carry; default: the endpoint's host.
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// The TLS settings of a command line's `--etcd-ca-file`, `--etcd-cert-file`,
    /// `--etcd-key-file` and `--etcd-server-name`: none without a CA file (and then no
    /// client certificate either).
    pub fn from_flags(
        ca_file: Option<PathBuf>,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
        server_name: Option<String>,
    ) -> Result<Option<Self>, StoreError> {
        match ca_file {
            Some(ca_file) => Ok(Some(Self { ca_file, cert_file, key_file, server_name })),
            None if cert_file.is_some() || key_file.is_some() => {
                Err(StoreError::Config("--etcd-cert-file and --etcd-key-file need --etcd-ca-file".into()))
            }
            None => Ok(None),
        }
    }

    /// Checks the combination of settings (not the files; [`open`] reads them).
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.ca_file.as_os_str().is_empty() {
            return Err(StoreError::Config("etcd TLS needs a CA file".into()));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(StoreError::Config("etcd TLS: a client certificate needs its key file".into())),
            (None, Some(_)) => Err(StoreError::Config("etcd TLS: a key file needs its client certificate".into())),
            _ => Ok(()),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            etcd_endpoints: Vec::new(),
            embedded_path: PathBuf::from("/var/lib/contiv/store"),
            dial_timeout_ms: 5000,
            embedded_fsync: false,
            etcd_tls: None,
        }
    }
}

impl StoreConfig {
    /// A config for etcd at these endpoints.
    pub fn etcd(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self { etcd_endpoints: endpoints.into_iter().map(Into::into).collect(), ..Self::default() }
    }
    /// The same config with TLS towards etcd.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.etcd_tls = Some(tls);
        self
    }
    /// Checks that endpoints and TLS settings fit together: `https://` endpoints need TLS
    /// settings, TLS settings need `https://` endpoints, and one scheme for all.
    pub fn validate(&self) -> Result<(), StoreError> {
        if let Some(bad) = self.etcd_endpoints.iter().find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return Err(StoreError::Config(format!("etcd endpoint {bad:?} must be an http:// or https:// URL")));
        }
        let https = self.etcd_endpoints.iter().filter(|e| e.starts_with("https://")).count();
        if https != 0 && https != self.etcd_endpoints.len() {
            return Err(StoreError::Config("etcd endpoints mix http:// and https://".into()));
        }
        match (&self.etcd_tls, https > 0) {
            (Some(tls), true) => tls.validate(),
            (None, true) => {
                Err(StoreError::Config("https:// etcd endpoints need TLS settings (at least a CA file)".into()))
            }
            (Some(_), false) if !self.etcd_endpoints.is_empty() => {
                Err(StoreError::Config("etcd TLS settings are given but the endpoints are http://".into()))
            }
            _ => Ok(()),
        }
    }
    /// A config for the embedded store in this directory.
    pub fn embedded(path: impl Into<PathBuf>) -> Self {
        Self { embedded_path: path.into(), ..Self::default() }
    }
}

/// Opens the store the config names: etcd when endpoints are configured, else embedded.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    config.validate()?;
    if config.etcd_endpoints.is_empty() {
        let options = embedded::Options { fsync: config.embedded_fsync, ..embedded::Options::default() };
        Ok(Arc::new(embedded::EmbeddedStore::open_with(&config.embedded_path, options)?))
    } else {
        let timeout = Duration::from_millis(config.dial_timeout_ms.max(1));
        Ok(Arc::new(etcd::EtcdStore::connect_with(&config.etcd_endpoints, timeout, config.etcd_tls.as_ref()).await?))
    }
}

/// Resolves, with the reason, once `store` says it can no longer write until opened again
/// ([`Store::failure`]), looked at every 2 s: its owner then exits to be restarted.
pub async fn until_failed(store: Arc<dyn Store>) -> String {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Some(why) = store.failure() {
            return why;
        }
    }
}

/// Splits `items`, in order, into batches of at most `max_items` items and `max_bytes`
/// bytes (`size` of each): what one store transaction may carry. An item larger than
/// `max_bytes` goes alone.
pub fn batches<T>(items: Vec<T>, max_items: usize, max_bytes: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        match out.last_mut() {
            Some(b) if b.len() < max_items && bytes + n <= max_bytes => {
                bytes += n;
                b.push(item);
            }
            _ => {
                bytes = n;
                out.push(vec![item]);
            }
        }
    }
    out
}

/// The end of the range of keys starting with `prefix` (etcd's `prefix_end`): `None` when
/// the prefix is empty or all 0xff (no upper bound).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
