//! The agent's link to the cluster store: it registers the node (ID and pod subnet from the
//! node registry, under a lease kept alive), and watches the store so the dataplane gets
//! cluster changes as events (add/update/delete per kind, plus a full resync after start
//! or a store reconnect). The store is etcd when `etcdEndpoints` is set, else the embedded
//! store in `storeDir`.

use std::{sync::Arc, time::Duration};

use contiv_cluster_model::{ClusterObject, Kind, NodeAddress};
use contiv_cluster_watch::{ClusterEvent, ClusterModel, ClusterWatch};
use contiv_node_registry::{IpamAllocation, IpamConfig, NodeDetails, NodeRegistration, NodeRegistry};
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
    .context("node registry")?
    .with_lease_ttl(i64::from(config.node_lease_seconds));
    // The node's pods hold addresses of the subnet its state records: the node claims that
    // subnet's ID, also after a wiped or restored store, or refuses to start.
    if let Some(subnet) = crate::state::subnet_in_use(&config.state_dir)
        && !config.pod_subnet_fixed
        && let Some(id) = registry.ipam().id_of(subnet.into())
    {
        registry.pin(&config.node_name, id);
    }
    // A subnet the file fixes is what the node must register (other nodes route the
    // registered one to it): its ID is claimed when the store has no allocation for the
    // node yet. An allocation made before (another subnet then) is kept, with a warning.
    let fixed_id = config.pod_subnet_fixed.then(|| registry.ipam().id_of(config.pod_subnet.into())).flatten();
    if config.pod_subnet_fixed && fixed_id.is_none() {
        log::warn!(
            "podSubnet {} is no node subnet of the cluster's plan ({} cut into /{}): other nodes route the \
             subnet this node registers, not it; a fixed podSubnet suits a single node",
            config.pod_subnet,
            config.pod_subnet_cidr,
            config.pod_prefix_len
        );
    }
    if let Some(id) = fixed_id {
        let allocated = registry.allocations().await.context("reading the node allocations")?;
        if !allocated.iter().any(|a| a.name == config.node_name) {
            registry.pin(&config.node_name, id);
        }
    }
    let allocation = registry
        .allocate(&config.node_name)
        .await
        .with_context(|| format!("allocating a node ID for {}", config.node_name))?;
    log::info!("node {} has ID {} and pod CIDR {}", allocation.name, allocation.id, allocation.pod_cidr);
    if fixed_id.is_some_and(|id| id != allocation.id) {
        log::warn!(
            "node {}: podSubnet {} is fixed, but the store allocated it {} before; other nodes route that one here",
            allocation.name,
            config.pod_subnet,
            allocation.pod_cidr
        );
    }
    Ok(ClusterLink { store, registry: Arc::new(registry), allocation })
}

/// The live nodes as the store has them now (the agent's starting point, so a restarted
/// agent never removes the routes to other nodes while its watch starts).
///
/// A failed read is retried, then fails the start: an empty list would make the restarted
/// agent remove every route to other nodes (the pins keep forwarding while it restarts).
pub async fn registrations(link: &ClusterLink) -> anyhow::Result<Vec<NodeRegistration>> {
    let mut attempt = 0;
    loop {
        match link.registry.nodes().await {
            Ok(nodes) => return Ok(nodes),
            Err(e) if attempt + 1 < STORE_START_ATTEMPTS => {
                attempt += 1;
                log::warn!("reading the node registrations: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context("reading the node registrations")),
        }
    }
}

/// The cluster watch, listing the store while the agent starts ([`start_listing`]).
pub struct Listing {
    watch: Arc<ClusterWatch>,
    listed: tokio::task::JoinHandle<()>,
}

/// Starts listing the cluster model, so that the list (10,000 services are 20,000 objects
/// to fetch and decode) is taken while the agent loads its datapath, whose program
/// verification leaves a CPU free. [`spawn`] then starts the watch from this list.
pub fn start_listing(link: &ClusterLink) -> Listing {
    let watch = Arc::new(ClusterWatch::new(link.store.clone()));
    let primer = watch.clone();
    let listed = tokio::spawn(async move {
        let started = std::time::Instant::now();
        match primer.prime().await {
            Ok(n) => log::info!("cluster model listed: {n} objects in {:?}", started.elapsed()),
            // The watch lists again, with its retries.
            Err(e) => log::warn!("listing the cluster model at start: {e}"),
        }
    });
    Listing { watch, listed }
}

/// The node's own addresses, for its registration (every non-loopback IPv4 address), and
/// its underlay address (the overlay's tunnel endpoint) when it has an uplink.
fn node_details(uplink_ip: Option<std::net::Ipv4Addr>) -> NodeDetails {
    let mut addresses = node_addresses();
    if let Some(ip) = uplink_ip {
        // The underlay address first: it is the one other nodes reach this node at.
        addresses.retain(|a| a.address != ip.to_string());
        addresses.insert(0, NodeAddress { address_type: "InternalIP".into(), address: ip.to_string() });
    }
    NodeDetails { addresses, uplink_ip }
}

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

/// What the dataplane receives from the cluster watch: every change is logged, and the
/// live node registrations go to the agent (through a watch channel, so a burst of
/// changes is applied once with the latest set).
pub struct DataplaneEvents {
    pub resyncs: u64,
    pub changes: u64,
    registrations: watch::Sender<Vec<NodeRegistration>>,
    /// NetworkPolicy: bumped when pods, namespaces or policies change (a burst is applied
    /// once); the first resync marks the model loaded.
    policy: watch::Sender<u64>,
    agent: std::sync::Arc<crate::agent::Agent>,
    /// Bumped when something services depend on changed (the service task recomputes
    /// once per burst).
    services: watch::Sender<u64>,
}

/// What an event changes for the service plan: the services whose object or slices it
/// touches, node addresses (nodes, registrations), everything after a resync. Pods
/// appearing, leaving or changing address change no service's entries but whether a
/// removed backend is refused (only while no pod holds its address): an empty change,
/// which re-applies. `None`: nothing to do.
fn service_changes(event: &ClusterEvent) -> Option<crate::services::ServiceChanges> {
    use contiv_cluster_watch::Object;
    let mut c = crate::services::ServiceChanges::default();
    let mut relevant = false;
    let mut note = |o: &Object| match o {
        Object::Registration(_) | Object::K8s(ClusterObject::Node(_)) => {
            c.nodes = true;
            relevant = true;
        }
        Object::K8s(ClusterObject::Service(s)) => {
            c.services.insert((s.namespace.clone(), s.name.clone()));
            relevant = true;
        }
        Object::K8s(ClusterObject::EndpointSlice(sl)) => {
            if let Some(svc) = &sl.service_name {
                c.services.insert((sl.namespace.clone(), svc.clone()));
            }
            relevant = true;
        }
        _ => {}
    };
    // A slice written (not removed) carries the time of the change it reflects; an update
    // that keeps the time is no new change (sampling it again would count one change twice).
    fn slice(o: &Object) -> Option<&contiv_cluster_model::EndpointSlice> {
        match o {
            Object::K8s(ClusterObject::EndpointSlice(sl)) => Some(sl),
            _ => None,
        }
    }
    let trigger = |o| slice(o).and_then(|sl| sl.last_change_trigger_time.as_deref());
    let written = match event {
        ClusterEvent::Resync(_) => return Some(crate::services::ServiceChanges::everything()),
        ClusterEvent::Added { object, .. } => {
            note(object);
            relevant |= matches!(object, Object::K8s(ClusterObject::Pod(_)));
            Some(object)
        }
        ClusterEvent::Deleted { object, .. } => {
            note(object);
            relevant |= matches!(object, Object::K8s(ClusterObject::Pod(_)));
            None
        }
        ClusterEvent::Updated { old, new, .. } => {
            note(old);
            note(new);
            if let (Object::K8s(ClusterObject::Pod(a)), Object::K8s(ClusterObject::Pod(b))) = (old, new) {
                relevant |= a.ips != b.ips || a.container_ports != b.container_ports;
            }
            (trigger(new) != trigger(old)).then_some(new)
        }
    };
    if let Some(t) = written.and_then(slice).and_then(|sl| sl.trigger_time()) {
        c.trigger_times.push(t);
    }
    relevant.then_some(c)
}

impl DataplaneEvents {
    fn on_event(&mut self, model: &ClusterModel, event: &ClusterEvent) {
        let registrations_changed = match event {
            ClusterEvent::Resync(_) => true,
            ClusterEvent::Added { object, .. } | ClusterEvent::Deleted { object, .. } => {
                matches!(object, contiv_cluster_watch::Object::Registration(_))
            }
            ClusterEvent::Updated { new, .. } => matches!(new, contiv_cluster_watch::Object::Registration(_)),
        };
        let policy_changed = match event {
            ClusterEvent::Resync(_) => {
                self.agent.mark_model_synced();
                true
            }
            ClusterEvent::Added { object, .. } | ClusterEvent::Deleted { object, .. } => policy_input(object),
            ClusterEvent::Updated { old, new, .. } => policy_input(old) || policy_input(new),
        };
        if policy_changed {
            self.policy.send_modify(|n| *n += 1);
        }
        if let Some(changes) = service_changes(event) {
            self.agent.services_changed(changes);
            self.services.send_modify(|n| *n = n.wrapping_add(1));
        }
        if registrations_changed {
            let regs: Vec<NodeRegistration> = model.registrations().cloned().collect();
            // A resync always hands the list over: the agent started from its own read,
            // which this channel's first value (empty) knows nothing of.
            let resync = matches!(event, ClusterEvent::Resync(_));
            self.registrations.send_if_modified(|cur| {
                let changed = resync || *cur != regs;
                *cur = regs;
                changed
            });
        }
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

/// Whether an object is an input of NetworkPolicy.
fn policy_input(object: &contiv_cluster_watch::Object) -> bool {
    use contiv_cluster_model::ClusterObject;
    matches!(
        object,
        contiv_cluster_watch::Object::K8s(
            ClusterObject::Pod(_) | ClusterObject::Namespace(_) | ClusterObject::NetworkPolicy(_)
        )
    )
}

/// Background work that lives as long as the agent: the node's registration (re-registered
/// if its lease is lost), the cluster watch, and the task handing node registrations to the
/// agent's dataplane.
///
/// The registration is not withdrawn when the agent stops: the node's pods keep forwarding
/// without their agent, and other nodes must keep routing to them through an agent restart
/// or upgrade. A node whose agent stays away drops out when its lease expires (the
/// registry's TTL); the restarted agent registers again under a new lease first.
pub fn spawn(
    link: &ClusterLink,
    listing: Listing,
    agent: std::sync::Arc<crate::agent::Agent>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let node_name = agent.config().node_name.clone();
    let uplink_ip = agent.node_ip();
    let shutdown_for_registration = shutdown.clone();
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let registry = link.registry.clone();
    let name = node_name.clone();
    // Never resolves: the task is aborted at exit, leaving the lease to expire on its own.
    let reg_stop = std::future::pending::<()>();
    let registration = tokio::spawn(async move {
        registry
            .keep_registered(
                &name,
                node_details(uplink_ip),
                |r| log::info!("registered node {} (ID {}, pod CIDR {})", r.name, r.id, r.pod_cidr),
                reg_stop,
            )
            .await;
    });
    let Listing { watch, listed } = listing;
    agent.set_model(watch.model());
    let watch_stop = stopped(shutdown.clone());
    let (reg_tx, mut reg_rx) = watch::channel(Vec::new());
    let (policy_tx, mut policy_rx) = watch::channel(0u64);
    let (svc_tx, svc_rx) = watch::channel(0u64);
    let events_agent = agent.clone();
    let watcher = tokio::spawn(async move {
        let mut events = DataplaneEvents {
            resyncs: 0,
            changes: 0,
            registrations: reg_tx,
            policy: policy_tx,
            agent: events_agent,
            services: svc_tx,
        };
        let mut consumer = |m: &ClusterModel, e: &ClusterEvent| events.on_event(m, e);
        let mut watch_stop = std::pin::pin!(watch_stop);
        tokio::select! {
            // Listed or not (a failed list is taken again by the watch).
            _ = listed => {}
            () = &mut watch_stop => return,
        }
        watch.run(&mut consumer, watch_stop).await;
    });
    let services = tokio::spawn(run_services(agent.clone(), svc_rx, stopped(shutdown.clone())));
    let apply_stop = stopped(shutdown);
    let applier = tokio::spawn(async move {
        let mut apply_stop = std::pin::pin!(apply_stop);
        loop {
            tokio::select! {
                changed = reg_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let regs = reg_rx.borrow_and_update().clone();
                    agent.set_registrations(regs).await;
                }
                changed = policy_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    policy_rx.borrow_and_update();
                    agent.apply_model().await;
                }
                () = &mut apply_stop => return,
            }
        }
    });
    // The registration task never ends by itself; dropping its handle would not stop it, so
    // abort it once the others have ended (the lease is then left to expire).
    let stop_registration = stopped(shutdown_for_registration);
    let registration_guard = tokio::spawn(async move {
        stop_registration.await;
        registration.abort();
    });
    vec![registration_guard, watcher, applier, services]
}

/// The service task: recomputes and applies the service plan after each burst of relevant
/// changes, and when removed backends stop being refused.
async fn run_services(
    agent: std::sync::Arc<crate::agent::Agent>,
    mut dirty: watch::Receiver<u64>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    loop {
        let wait = match agent.services_due().await {
            Some(due) => due.saturating_duration_since(std::time::Instant::now()) + Duration::from_millis(50),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            changed = dirty.changed() => {
                if changed.is_err() {
                    return;
                }
                dirty.borrow_and_update();
            }
            () = tokio::time::sleep(wait) => {}
            () = agent.services_kicked() => {}
            () = &mut stop => return,
        }
        agent.sync_services().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contiv_cluster_model::{AddressType, EndpointSlice};
    use contiv_cluster_watch::Object;

    fn slice(trigger: Option<&str>) -> Object {
        Object::K8s(ClusterObject::EndpointSlice(EndpointSlice {
            name: "web-a".into(),
            namespace: "default".into(),
            service_name: Some("web".into()),
            address_type: AddressType::IPv4,
            endpoints: vec![],
            ports: vec![],
            last_change_trigger_time: trigger.map(str::to_owned),
        }))
    }

    #[test]
    fn a_written_slice_brings_its_trigger_time_and_a_removed_one_does_not() {
        let key = "/contiv/k8s/endpointslice/default/web-a".to_owned();
        let t = "2026-12-03T17:05:59.25Z";
        let added = service_changes(&ClusterEvent::Added { key: key.clone(), object: slice(Some(t)) }).unwrap();
        assert_eq!(added.services, [("default".to_owned(), "web".to_owned())].into());
        let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_796_317_559_250);
        assert_eq!(added.trigger_times, vec![at]);
        // An update samples the new object's time, not the old one's.
        let updated = service_changes(&ClusterEvent::Updated {
            key: key.clone(),
            old: slice(Some("2026-12-03T17:00:00Z")),
            new: slice(Some(t)),
        })
        .unwrap();
        assert_eq!(updated.trigger_times, added.trigger_times);
        // Rewritten with the same time (another field changed): that change was sampled.
        let same =
            service_changes(&ClusterEvent::Updated { key: key.clone(), old: slice(Some(t)), new: slice(Some(t)) })
                .unwrap();
        assert!(same.trigger_times.is_empty() && !same.services.is_empty());
        let deleted = service_changes(&ClusterEvent::Deleted { key: key.clone(), object: slice(Some(t)) }).unwrap();
        assert!(deleted.trigger_times.is_empty() && !deleted.services.is_empty());
        // Without the annotation (a hand-written slice) the change is planned, unsampled.
        let plain = service_changes(&ClusterEvent::Added { key, object: slice(None) }).unwrap();
        assert!(plain.trigger_times.is_empty() && !plain.services.is_empty());
    }
}
