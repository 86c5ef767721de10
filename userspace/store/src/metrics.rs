//! Request latencies of a store, for Prometheus (prometheus-client).
//!
//! [`StoreMetrics::instrument`] wraps any [`Store`] so each call is timed into the histogram
//! `contiv_store_request_duration_seconds{op, outcome}` (`op`: get, put, delete, list, txn,
//! lease_grant, ...; `outcome`: ok or error). A watch is timed until it is established.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::{KeyValue, LeaseId, ListResult, Revision, Store, StoreError, Txn, TxnResult, WatchStream};

/// Labels of one store request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The store operation.
    pub op: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// 0.25 ms .. ~8 s: a local embedded write up to an etcd leader election.
fn store_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The store's latency histograms; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    requests: HistogramFamily,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self { requests: Family::new_with_constructor(store_buckets as fn() -> Histogram) }
    }
}

impl StoreMetrics {
    /// New, empty histograms.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `contiv_store_request_duration_seconds` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "contiv_store_request_duration",
            "Latency of cluster store requests by operation and outcome",
            Unit::Seconds,
            self.requests.clone(),
        );
    }

    /// `store`, with every call timed.
    pub fn instrument(&self, store: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(Instrumented { inner: store, metrics: self.clone() })
    }

    fn observe<T>(&self, op: &'static str, start: Instant, r: &Result<T, StoreError>) {
        let outcome = if r.is_ok() { "ok" } else { "error" };
        self.requests.get_or_create(&RequestLabels { op, outcome }).observe(start.elapsed().as_secs_f64());
    }
}

/// A store whose calls are timed.
struct Instrumented {
    inner: Arc<dyn Store>,
    metrics: StoreMetrics,
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let start = Instant::now();
        let r = $call.await;
        $self.metrics.observe($op, start, &r);
        r
    }};
}

#[async_trait::async_trait]
impl Store for Instrumented {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        timed!(self, "get", self.inner.get(key))
    }
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        timed!(self, "put", self.inner.put(key, value, lease))
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        timed!(self, "delete", self.inner.delete(key))
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        timed!(self, "delete_prefix", self.inner.delete_prefix(prefix))
    }
    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        timed!(self, "list", self.inner.list(prefix))
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        timed!(self, "txn", self.inner.txn(txn))
    }
    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId, StoreError> {
        timed!(self, "lease_grant", self.inner.lease_grant(ttl_secs))
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<i64, StoreError> {
        timed!(self, "lease_keep_alive", self.inner.lease_keep_alive(lease))
    }
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        timed!(self, "lease_revoke", self.inner.lease_revoke(lease))
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        timed!(self, "watch", self.inner.watch(prefix, from))
    }
    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        timed!(self, "compact", self.inner.compact(revision))
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn failure(&self) -> Option<String> {
        self.inner.failure()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_are_timed_by_operation_and_outcome() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::open(&crate::StoreConfig::embedded(dir.path())).await.expect("embedded");
        let metrics = StoreMetrics::new();
        let store = metrics.instrument(store);
        store.put("/m/a", b"1".to_vec(), None).await.expect("put");
        store.put("/m/b", b"2".to_vec(), None).await.expect("put");
        store.get("/m/a").await.expect("get");
        assert!(store.lease_keep_alive(12345).await.is_err(), "no such lease");
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("contiv_store_request_duration_seconds_count{op=\"put\",outcome=\"ok\"} 2"), "{text}");
        assert!(text.contains("contiv_store_request_duration_seconds_count{op=\"get\",outcome=\"ok\"} 1"), "{text}");
        assert!(
            text.contains("contiv_store_request_duration_seconds_count{op=\"lease_keep_alive\",outcome=\"error\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE contiv_store_request_duration_seconds histogram"), "{text}");
    }
}
