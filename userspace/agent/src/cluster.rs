//! The agent's link to the cluster store: it registers the node (ID and pod subnet from the
//! node registry, under a lease kept alive), and watches the store so the dataplane gets
//! cluster changes as events (add/update/delete per kind, plus a full resync after start
//! or a store reconnect). The store is etcd when `etcdEndpoints` is set, else the embedded
//! store in `storeDir`.

use std::{sync::Arc, time::Duration};

use contiv_cluster_model::{Kind, NodeAddress};
use contiv_cluster_watch::{ClusterEvent, ClusterModel, ClusterWatch};
use contiv_node_registry::{IpamAllocation, IpamConfig, NodeRegistry};
use contiv_store::Store;
use tokio::sync::watch;

use crate::config::AgentConfig;

/// How long the agent keeps trying to reach the store at start before giving up.
const STORE_START_ATTEMPTS: u32 = 30;

/// The joined cluster: store, registry, and this node's allocation.
pub struct ClusterLink {
    pub store: Arc<dyn Store>,
    pub registry: Arc<NodeRegistry>,
    pub allocation: IpamAllocation,
}

/// Opens the store and claims this node's ID and pod subnet (the old ones after a restart).
/// Store requests are timed into `metrics`.
pub async fn join(config: &AgentConfig, metrics: &contiv_store::metrics::StoreMetrics) -> anyhow::Result<ClusterLink> {
    use anyhow::Context;
    let store_config = config.store_config();
    let mut attempt = 0;
    let store = loop {
        match contiv_store::open(&store_config).await {
            Ok(s) => break metrics.instrument(s),
            Err(e) if attempt + 1 < STORE_START_ATTEMPTS => {
                attempt += 1;
                log::warn!("store not reachable yet ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e).context("opening the cluster store"),
        }
    };
    log::info!("cluster store: {}", store.backend());
    let registry = NodeRegistry::new(
        store.clone(),
        IpamConfig { pod_subnet_cidr: config.pod_subnet_cidr.into(), pod_prefix_len: config.pod_prefix_len },
    )
    .context("node registry")?;
    let allocation = registry
        .allocate(&config.node_name)
        .await
        .with_context(|| format!("allocating a node ID for {}", config.node_name))?;
    log::info!("node {} has ID {} and pod CIDR {}", allocation.name, allocation.id, allocation.pod_cidr);
    Ok(ClusterLink { store, registry: Arc::new(registry), allocation })
}

/// The node's own addresses, for its registration (every non-loopback IPv4 address).
fn node_addresses() -> Vec<NodeAddress> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    let mut out: Vec<NodeAddress> = addrs
        .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|v4| v4.ip())))
        .filter(|ip| !ip.is_loopback())
        .map(|ip| NodeAddress { address_type: "InternalIP".into(), address: ip.to_string() })
        .collect();
    out.dedup();
    out
}

/// What the dataplane receives from the cluster watch. The eBPF datapath programs pods
/// from the CNI today; services and policies land here for the service proxy and policy
/// renderer, which consume the same events.
#[derive(Debug, Default)]
pub struct DataplaneEvents {
    pub resyncs: u64,
    pub changes: u64,
}

impl DataplaneEvents {
    fn on_event(&mut self, model: &ClusterModel, event: &ClusterEvent) {
        match event {
            ClusterEvent::Resync(reason) => {
                self.resyncs += 1;
                let counts: Vec<String> =
                    Kind::ALL.iter().map(|k| format!("{}={}", k.as_str(), model.count(*k))).collect();
                log::info!("cluster model resync ({reason:?}) at revision {}: {}", model.revision(), counts.join(" "));
            }
            ClusterEvent::Added { key, .. } => {
                self.changes += 1;
                log::info!("cluster: added {key}");
            }
            ClusterEvent::Updated { key, .. } => {
                self.changes += 1;
                log::info!("cluster: updated {key}");
            }
            ClusterEvent::Deleted { key, .. } => {
                self.changes += 1;
                log::info!("cluster: deleted {key}");
            }
        }
    }
}

/// Background work that lives as long as the agent: the node's registration (re-registered
/// if its lease is lost, withdrawn on shutdown) and the cluster watch.
pub fn spawn(
    link: &ClusterLink,
    node_name: String,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let registry = link.registry.clone();
    let name = node_name.clone();
    let reg_stop = stopped(shutdown.clone());
    let registration = tokio::spawn(async move {
        registry
            .keep_registered(
                &name,
                node_addresses(),
                |r| log::info!("registered node {} (ID {}, pod CIDR {})", r.name, r.id, r.pod_cidr),
                reg_stop,
            )
            .await;
    });
    let watch = ClusterWatch::new(link.store.clone());
    let watch_stop = stopped(shutdown);
    let watcher = tokio::spawn(async move {
        let mut events = DataplaneEvents::default();
        let mut consumer = |m: &ClusterModel, e: &ClusterEvent| events.on_event(m, e);
        watch.run(&mut consumer, watch_stop).await;
    });
    vec![registration, watcher]
}
