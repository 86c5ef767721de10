//! The etcd v3 backend (etcd-client over gRPC).
//!
//! Unary calls go through tonic channels that reconnect on their own; a call made while etcd
//! is down fails with [`StoreError::Unavailable`] and the caller retries. Watches are owned by
//! a task that re-establishes the gRPC watch with exponential backoff (100 ms .. 5 s) and
//! resumes from the last delivered revision + 1, so nothing is missed; it tells the consumer
//! with [`WatchMessage::Reconnected`]. Large listings are paged at one fixed revision.
//!
//! Every request requires a leader (`hasleader` metadata, etcd's `WithRequireLeader`): a member
//! cut off from the cluster's majority answers "no leader" (mapped to
//! [`StoreError::Unavailable`]) instead of serving stale reads or holding a watch that never
//! delivers anything, and cancels the watches on it after a few election timeouts, so they
//! reconnect, possibly to a member that has a leader.
//!
//! Watches ask for progress notifications: etcd tells a quiet watch the store's revision now
//! and then (every 10 minutes by default; only a watch that got every change up to it), and a
//! reconnect resumes after that revision, so changes elsewhere that were compacted meanwhile
//! do not fail the resumed watch with `Compacted`.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, CompactionOptions, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions,
    EventType, GetOptions, Identity, KvClient, LeaseClient, PutOptions, TlsOptions, Txn as EtcdTxn, TxnOp as EtcdTxnOp,
    TxnOpResponse, WatchClient, WatchOptions,
};
use tokio::sync::mpsc;

use crate::{
    Compare, EventKind, KeyValue, LeaseId, ListResult, Revision, Store, StoreError, TlsConfig, Txn, TxnOp, TxnResult,
    WatchEvent, WatchMessage, WatchStream,
};

/// Largest gRPC message we accept (a watch response of one big transaction, a list page).
const MAX_MESSAGE: usize = 256 << 20;
/// Keys per page when listing.
const PAGE: i64 = 5000;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A store backed by an etcd v3 cluster.
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    lease: LeaseClient,
    watch: WatchClient,
}

impl EtcdStore {
    /// Connects to etcd over plain HTTP (checks that one endpoint answers within `dial_timeout`).
    pub async fn connect(endpoints: &[String], dial_timeout: Duration) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, dial_timeout, None).await
    }

    /// Connects to etcd, over TLS when `tls` is given (`https://` endpoints): the server
    /// certificate is checked against the CA file, and the client certificate, if set, is
    /// presented for etcd's `--client-cert-auth`.
    pub async fn connect_with(
        endpoints: &[String],
        dial_timeout: Duration,
        tls: Option<&TlsConfig>,
    ) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Config("no etcd endpoints".into()));
        }
        let mut options = connect_options(dial_timeout);
        if let Some(tls) = tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let client = tokio::time::timeout(dial_timeout, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| StoreError::Unavailable(format!("no answer from {endpoints:?} in {dial_timeout:?}")))?
            .map_err(map_err)?;
        let store = Self {
            kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
            lease: client.lease_client(),
            watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
        };
        // A cheap read proves the endpoint answers.
        tokio::time::timeout(dial_timeout, store.kv.clone().get("/contiv/", Some(GetOptions::new().with_count_only())))
            .await
            .map_err(|_| StoreError::Unavailable(format!("no answer from {endpoints:?} in {dial_timeout:?}")))?
            .map_err(map_err)?;
        Ok(store)
    }
}

/// The client's options, TLS aside.
fn connect_options(dial_timeout: Duration) -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(dial_timeout)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        // A partitioned member fails requests and cancels watches rather than going silent.
        .with_require_leader(true)
}

/// Reads the PEM files of `tls` into the client's TLS options.
fn tls_options(tls: &TlsConfig) -> Result<TlsOptions, StoreError> {
    tls.validate()?;
    let read =
        |path: &std::path::Path| std::fs::read(path).map_err(|source| StoreError::Io { path: path.to_owned(), source });
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca_file)?));
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(name) = &tls.server_name {
        options = options.domain_name(name.clone());
    }
    Ok(options)
}

fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match &e {
        E::TransportError(_) | E::IoError(_) => StoreError::Unavailable(e.to_string()),
        E::GRpcStatus(status) => {
            let msg = status.message();
            if msg.contains("lease not found") {
                // The lease id is not in the message; callers that know it re-wrap.
                StoreError::LeaseNotFound(0)
            } else if msg.contains("compacted") {
                StoreError::Compacted { requested: 0, compacted: 0 }
            } else if matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
            ) {
                StoreError::Unavailable(e.to_string())
            } else {
                StoreError::Etcd(e)
            }
        }
        E::LeaseKeepAliveError(m) if m.contains("lease not found") => StoreError::LeaseNotFound(0),
        _ => StoreError::Etcd(e),
    }
}

fn with_lease(e: StoreError, lease: LeaseId) -> StoreError {
    match e {
        StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease),
        other => other,
    }
}

fn kv_from(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        lease: kv.lease(),
    }
}

fn header_rev(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map_or(0, |h| h.revision())
}

fn txn_op(op: TxnOp) -> EtcdTxnOp {
    match op {
        TxnOp::Put { key, value, lease } => {
            EtcdTxnOp::put(key, value, lease.filter(|l| *l != 0).map(|l| PutOptions::new().with_lease(l)))
        }
        TxnOp::Delete { key } => EtcdTxnOp::delete(key, None),
        TxnOp::Get { key } => EtcdTxnOp::get(key, None),
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self.kv.clone().get(key, None).await.map_err(map_err)?;
        Ok(resp.kvs().first().map(kv_from))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        let options = lease.filter(|l| *l != 0).map(|l| PutOptions::new().with_lease(l));
        let resp =
            self.kv.clone().put(key, value, options).await.map_err(|e| with_lease(map_err(e), lease.unwrap_or(0)))?;
        Ok(header_rev(resp.header()))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let resp = self.kv.clone().delete(key, None).await.map_err(map_err)?;
        Ok(resp.deleted() > 0)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let resp = self.kv.clone().delete(prefix, Some(DeleteOptions::new().with_prefix())).await.map_err(map_err)?;
        Ok(resp.deleted().max(0) as u64)
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        let mut kv = self.kv.clone();
        let end = crate::prefix_end(prefix.as_bytes()).unwrap_or_else(|| vec![0]);
        // etcd rejects an empty key; "\0" with range end "\0" means every key.
        let mut from = if prefix.is_empty() { vec![0] } else { prefix.as_bytes().to_vec() };
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let resp = kv.get(from.clone(), Some(options)).await.map_err(map_err)?;
            if revision == 0 {
                revision = header_rev(resp.header());
            }
            kvs.extend(resp.kvs().iter().map(kv_from));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(ListResult { kvs, revision })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .into_iter()
            .map(|c| match c {
                Compare::Absent(key) => EtcdCompare::create_revision(key, CompareOp::Equal, 0),
                Compare::ModRevision(key, rev) => EtcdCompare::mod_revision(key, CompareOp::Equal, rev),
                Compare::Value(key, value) => EtcdCompare::value(key, CompareOp::Equal, value),
            })
            .collect();
        let leases: Vec<LeaseId> = txn
            .success
            .iter()
            .chain(&txn.failure)
            .filter_map(|op| match op {
                TxnOp::Put { lease: Some(l), .. } if *l != 0 => Some(*l),
                _ => None,
            })
            .collect();
        let request = EtcdTxn::new()
            .when(compares)
            .and_then(txn.success.into_iter().map(txn_op).collect::<Vec<_>>())
            .or_else(txn.failure.into_iter().map(txn_op).collect::<Vec<_>>());
        let resp = self
            .kv
            .clone()
            .txn(request)
            .await
            .map_err(|e| with_lease(map_err(e), leases.first().copied().unwrap_or(0)))?;
        let gets = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(kv_from)),
                _ => None,
            })
            .collect();
        Ok(TxnResult { succeeded: resp.succeeded(), revision: header_rev(resp.header()), gets })
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId, StoreError> {
        let resp = self.lease.clone().grant(ttl_secs.max(1), None).await.map_err(map_err)?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<i64, StoreError> {
        let (_keeper, mut stream) =
            self.lease.clone().keep_alive(lease).await.map_err(|e| with_lease(map_err(e), lease))?;
        // `keep_alive` already sent one refresh and checked its answer; ask once more for the TTL.
        drop(_keeper);
        match stream.message().await {
            Ok(Some(resp)) if resp.ttl() <= 0 => Err(StoreError::LeaseNotFound(lease)),
            Ok(Some(resp)) => Ok(resp.ttl()),
            // The stream closed after the first (good) answer: the lease is alive.
            Ok(None) => Ok(1),
            Err(e) => Err(with_lease(map_err(e), lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.lease.clone().revoke(lease).await.map_err(|e| with_lease(map_err(e), lease))?;
        Ok(())
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let (tx, rx) = mpsc::channel(1024);
        let start = if from > 0 {
            from
        } else {
            // "From now": pin it to a revision so a reconnect resumes correctly.
            let resp = self.kv.clone().get(prefix, Some(GetOptions::new().with_count_only())).await.map_err(map_err)?;
            header_rev(resp.header()) + 1
        };
        let task =
            WatchTask { client: self.watch.clone(), prefix: prefix.to_owned(), next: start, tx, established: false };
        tokio::spawn(task.run());
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.kv.clone().compact(revision, Some(CompactionOptions::new().with_physical())).await.map_err(map_err)?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "etcd"
    }
}

// === impl WatchTask ===

/// Owns one logical watch across gRPC reconnects.
struct WatchTask {
    client: WatchClient,
    prefix: String,
    /// The next revision the consumer expects.
    next: Revision,
    tx: mpsc::Sender<Result<WatchMessage, StoreError>>,
    /// The current session got at least one answer from etcd.
    established: bool,
}

enum Outcome {
    /// The consumer went away or the watch ended for good.
    Done,
    /// The connection broke; reconnect.
    Broken(String),
}

impl WatchTask {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut first = true;
        let mut logged = false;
        loop {
            self.established = false;
            let consumer = self.tx.clone();
            let outcome = tokio::select! {
                o = self.session(!first) => o,
                () = consumer.closed() => Outcome::Done,
            };
            first = false;
            match outcome {
                Outcome::Done => return,
                Outcome::Broken(why) => {
                    if self.established {
                        backoff = BACKOFF_MIN;
                        logged = false;
                    }
                    if !logged {
                        log::warn!(
                            "etcd watch of {} broke at revision {}: {why}; reconnecting",
                            self.prefix,
                            self.next
                        );
                        logged = true;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = consumer.closed() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// One gRPC watch; returns when it breaks. `reconnecting`: tell the consumer once it is up.
    async fn session(&mut self, reconnecting: bool) -> Outcome {
        let options = WatchOptions::new().with_prefix().with_start_revision(self.next).with_progress_notify();
        let mut stream = match self.client.clone().watch(self.prefix.clone(), Some(options)).await {
            Ok(s) => s,
            Err(e) => return Outcome::Broken(e.to_string()),
        };
        let mut announced = !reconnecting;
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Outcome::Broken("watch stream closed by the server".into()),
                Err(e) => return Outcome::Broken(e.to_string()),
            };
            if resp.compact_revision() > 0 {
                let err = StoreError::Compacted { requested: self.next, compacted: resp.compact_revision() };
                let _ = self.tx.send(Err(err)).await;
                return Outcome::Done;
            }
            if resp.canceled() {
                return Outcome::Broken(format!("watch canceled: {}", resp.cancel_reason()));
            }
            self.established = true;
            if !announced {
                announced = true;
                let current = header_rev(resp.header());
                if current > 0 && current < self.next - 1 {
                    // etcd is behind what we already delivered: it was wiped or restored.
                    let err = StoreError::Rewound { watched: self.next - 1, current };
                    log::warn!("etcd watch of {}: {err}", self.prefix);
                    let _ = self.tx.send(Err(err)).await;
                    return Outcome::Done;
                }
                log::info!("etcd watch of {} resumed at revision {}", self.prefix, self.next);
                if self.tx.send(Ok(WatchMessage::Reconnected { resumed_from: self.next })).await.is_err() {
                    return Outcome::Done;
                }
            }
            if resp.events().is_empty() {
                // A progress notification: etcd sends one only to a watch that got every change
                // up to its revision, so a reconnect may resume after it. Not the answer to the
                // creation, whose revision is the store's, ahead of what a watch from an older
                // revision got. (Only timed notifications arrive here: the ones asked for with
                // RequestProgress were not ordered with the events in etcd releases before the
                // fix of etcd-io/etcd#15220, and are not used.)
                if !resp.created() {
                    self.next = self.next.max(header_rev(resp.header()) + 1);
                }
                continue;
            }
            let mut events = Vec::with_capacity(resp.events().len());
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let mut kv = kv_from(kv);
                let kind = match ev.event_type() {
                    EventType::Put => EventKind::Put,
                    EventType::Delete => {
                        kv.value.clear();
                        kv.create_revision = 0;
                        kv.lease = 0;
                        EventKind::Delete
                    }
                };
                self.next = self.next.max(kv.mod_revision + 1);
                events.push(WatchEvent { kind, kv });
            }
            if self.tx.send(Ok(WatchMessage::Events(events))).await.is_err() {
                return Outcome::Done;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_require_a_leader() {
        // etcd-client keeps the flag private; its Debug output shows it.
        let options = format!("{:?}", connect_options(Duration::from_secs(1)));
        assert!(options.contains("require_leader: true"), "{options}");
    }
}
