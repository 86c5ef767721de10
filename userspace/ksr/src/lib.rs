//! contiv-ksr: reflects the Kubernetes objects the dataplane needs (Pods, Namespaces,
//! Services, EndpointSlices, NetworkPolicies, Nodes) into the contiv store, in the model and
//! under the keys of `contiv-cluster-model`.
//!
//! - [`reflect`]: one kube-runtime watcher per kind (default backoff). Every (re)list
//!   converges the kind's key prefix to the API's state: adds, updates (unchanged values are
//!   not rewritten), and deletes keys of objects that no longer exist.
//! - [`mirror`]: the store side, with repair after failed writes and a full resync when the
//!   marker key disappears (the store lost its data).
//! - [`leader`]: leader election on a Lease; only the leader reflects ([`run_elected`]).
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.
//! - Departed nodes: while reflecting, KSR also frees the node ID and pod CIDR of nodes that
//!   left the cluster (no Kubernetes Node, no live agent, in two sweeps in a row; see
//!   `contiv_node_registry::departed`), so a cluster whose nodes come and go does not run out.

pub mod http;
pub mod leader;
pub mod mirror;
pub mod reflect;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use contiv_cluster_model::Kind;
use contiv_store::Store;

pub use http::{Health, Role};
pub use leader::{Attempt, ElectionConfig, LeaderElector};
pub use mirror::{Counters, Mirror};

/// A running reflector: the mirror (status, counters) and its tasks.
pub struct Reflector {
    /// The store side.
    pub mirror: Arc<Mirror>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Reflector {
    /// Starts the six watchers on `client`, the repair loop (marker check and retry of
    /// failed writes every `repair_interval`) and the departed-node sweep (every
    /// [`DEFAULT_DEPARTED_SWEEP`]).
    pub fn start(client: kube::Client, store: Arc<dyn Store>, repair_interval: Duration) -> Self {
        Self::start_with(client, store, repair_interval, Some(DEFAULT_DEPARTED_SWEEP), Arc::default())
    }

    /// [`Reflector::start`] with the departed-node sweep every `departed_sweep` (`None`: off),
    /// counting into `counters`.
    pub fn start_with(
        client: kube::Client,
        store: Arc<dyn Store>,
        repair_interval: Duration,
        departed_sweep: Option<Duration>,
        counters: Arc<Counters>,
    ) -> Self {
        let mirror = Arc::new(Mirror::with_counters(store, &Kind::ALL, counters));
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
        if let Some(every) = departed_sweep {
            tasks.push(tokio::spawn(sweep_departed_nodes(mirror.clone(), every)));
        }
        Reflector { mirror, tasks }
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.mirror.stop_writing();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Runs leader election and reflects while leading, until `stop` resolves:
/// candidate -> (Lease acquired) -> leader: a fresh [`Reflector`] (a full list and converge)
/// -> (renewals failed for the renew deadline, or the Lease was taken) -> writes fenced,
/// reflector dropped -> candidate again. On `stop` the leader fences its writes first and
/// then releases the Lease, so the next leader never overlaps with it.
pub async fn run_elected(
    client: kube::Client,
    store: Arc<dyn Store>,
    repair_interval: Duration,
    departed_sweep: Option<Duration>,
    election: ElectionConfig,
    health: Arc<Health>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut elector = LeaderElector::new(client.clone(), election);
    loop {
        health.set_role(Role::Candidate);
        let h = health.clone();
        let report = move |round: Result<&str, &kube::Error>| match round {
            Ok(holder) => h.set_role(Role::Follower(holder.to_string())),
            Err(_) => h.set_role(Role::Candidate),
        };
        if !elector.acquire(report, &mut stop).await {
            return;
        }
        log::info!("{}: leading; reflecting into the store", elector.config().identity);
        let reflector =
            Reflector::start_with(client.clone(), store.clone(), repair_interval, departed_sweep, health.counters());
        health.set_leader(reflector.mirror.clone());
        let mirror = reflector.mirror.clone();
        // Writes go only as long as the last renewal allows, even if this process stalls
        // past it before `hold` can notice.
        mirror.set_write_deadline(elector.valid_until());
        let store_deadline = elector.config().store_deadline;
        let renewed = mirror.clone();
        let ended = tokio::select! {
            lost = elector.hold(&mut stop, |until| renewed.set_write_deadline(Some(until))) => {
                if lost { Ended::Lost } else { Ended::Stopped }
            }
            () = store_failing_for(&mirror, store_deadline) => Ended::StoreDown,
        };
        reflector.mirror.stop_writing();
        drop(reflector);
        health.set_role(Role::Candidate);
        match ended {
            Ended::Lost => log::warn!("{}: lost leadership; stopped writing", elector.config().identity),
            Ended::Stopped | Ended::StoreDown => {
                if let Err(e) = elector.release().await {
                    log::warn!("releasing the lease: {e}");
                }
                if matches!(ended, Ended::Stopped) {
                    return;
                }
                log::warn!(
                    "{}: every store operation failed for {store_deadline:?}; released the lease for a replica \
                     that reaches the store, competing again in {:?}",
                    elector.config().identity,
                    elector.config().lease_duration
                );
                tokio::select! {
                    () = tokio::time::sleep(elector.config().lease_duration) => {}
                    () = &mut stop => return,
                }
            }
        }
    }
}

/// Why a term as leader ended.
enum Ended {
    /// Renewals failed, or someone else holds the Lease.
    Lost,
    /// `stop` resolved.
    Stopped,
    /// The store refused every operation for the store deadline.
    StoreDown,
}

/// How often KSR looks for departed nodes by default: a node's ID and pod CIDR are freed
/// between one and two sweeps after it stopped being a Kubernetes Node with a live agent.
pub const DEFAULT_DEPARTED_SWEEP: Duration = Duration::from_secs(60);

/// Every `every`, once the Nodes are listed: frees the allocations of nodes that are neither
/// Kubernetes Nodes nor registered, in this sweep and the one before, unchanged in between.
async fn sweep_departed_nodes(mirror: Arc<mirror::Mirror>, every: Duration) {
    let mut departed = contiv_node_registry::DepartedNodes::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Until the Nodes are listed every allocation would look departed.
        let Some(members) = mirror.names(Kind::Node) else { continue };
        if !mirror.is_writing() {
            return;
        }
        match departed.sweep(mirror.store().as_ref(), &members).await {
            Ok(released) => {
                mirror.counters.departed_nodes_released.fetch_add(released.len() as u64, Ordering::Relaxed);
            }
            Err(e) => log::warn!("looking for departed nodes: {e}"),
        }
    }
}

/// Resolves once every store operation of `mirror` has failed for `deadline`.
async fn store_failing_for(mirror: &mirror::Mirror, deadline: Duration) {
    loop {
        if mirror.store_down_for().is_some_and(|d| d >= deadline) {
            return;
        }
        tokio::time::sleep((deadline / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))).await;
    }
}

#[cfg(feature = "test-support")]
pub mod testing;
