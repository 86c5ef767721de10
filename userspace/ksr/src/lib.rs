//! contiv-ksr: reflects the Kubernetes objects the dataplane needs (Pods, Namespaces,
//! Services, EndpointSlices, NetworkPolicies, Nodes) into the contiv store, in the model and
//! under the keys of `contiv-cluster-model`.
//!
//! - [`reflect`]: one kube-runtime watcher per kind (default backoff). Every (re)list
//!   converges the kind's key prefix to the API's state: adds, updates (unchanged values are
//!   not rewritten), and deletes keys of objects that no longer exist.
//! - [`mirror`]: the store side, with repair after failed writes and a full resync when the
//!   marker key disappears (the store lost its data).
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.

pub mod http;
pub mod mirror;
pub mod reflect;

use std::sync::Arc;
use std::time::Duration;

use contiv_cluster_model::Kind;
use contiv_store::Store;

pub use mirror::Mirror;

/// A running reflector: the mirror (status, counters) and its tasks.
pub struct Reflector {
    /// The store side.
    pub mirror: Arc<Mirror>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Reflector {
    /// Starts the six watchers on `client` and the repair loop (marker check and retry of
    /// failed writes every `repair_interval`).
    pub fn start(client: kube::Client, store: Arc<dyn Store>, repair_interval: Duration) -> Self {
        let mirror = Arc::new(Mirror::new(store, &Kind::ALL));
        let mut tasks = reflect::spawn_all(&client, &mirror);
        let m = mirror.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(repair_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                m.repair().await;
            }
        }));
        Reflector { mirror, tasks }
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(feature = "test-support")]
pub mod testing;
