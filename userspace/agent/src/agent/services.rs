//! The agent's service proxy: programs set up at start, the plan recomputed from the
//! cluster model when services, endpoints, nodes or pods change, conntrack expiry, and the
//! `/services` report (read from the maps, so it shows what the node really does).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Instant,
};

use contiv_common::{SVC_LOCAL_BASE, SvcBackendKey, SvcKey, map_names, svc_flags};
use serde::Serialize;

use super::{Agent, Inner};
use crate::{
    conntrack::{ConntrackError, ConntrackFill, ConntrackQuery, ConntrackReport, flows_report},
    datapath::CtTable,
    proxy::{ApplyStats, GcStats, Released, gc_conntrack, monotonic_ns},
    proxyhealth::Server,
    services::{HealthCheck, ServiceChanges, Skipped, proto_name},
};

/// One frontend as `netctl get services` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontendReport {
    pub namespace: String,
    pub service: String,
    pub port_name: String,
    pub protocol: &'static str,
    /// `ip:port`, or `*:port` for a NodePort (on every node address).
    pub frontend: String,
    pub kind: &'static str,
    pub flags: Vec<&'static str>,
    pub service_id: u32,
    /// The Cluster set, as SVC_BACKENDS holds it.
    pub backends: Vec<BackendReport>,
    /// The Local set (externalTrafficPolicy / internalTrafficPolicy Local).
    pub local_backends: Vec<BackendReport>,
    pub connections: u64,
    pub no_endpoint_rejects: u64,
    pub source_denied: u64,
    /// Flows from outside to a backend on another node dropped: no free source port on the
    /// node's address.
    pub snat_exhausted: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendReport {
    pub address: String,
    pub local: bool,
}

/// `GET /services`. With services off (`enabled` false) only the conntrack fields are
/// filled in: the table serves NetworkPolicy too, and is swept either way.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServicesReport {
    pub node: String,
    /// `[services] enabled`: false when this agent is not the node's service proxy.
    pub enabled: bool,
    pub frontends: Vec<FrontendReport>,
    pub skipped: Vec<Skipped>,
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// What the proxy's `/healthz` (port 10256) answers, and why.
    pub proxy_health: crate::proxyhealth::ProxyHealthReport,
    /// Where that server listens; none unless it has bound its address.
    pub proxy_healthz_address: Option<String>,
    /// While it cannot bind its address (kube-proxy still holds it?): that address and why.
    pub proxy_healthz_waiting: Option<String>,
    pub dead_backends: Vec<String>,
    /// The node addresses in the datapath's map: this node's own and the other nodes'.
    pub node_addresses: Vec<NodeAddressReport>,
    /// `[services] nodePortAddresses` as configured (empty: every node address).
    pub node_port_addresses: Vec<String>,
    /// Entries in the conntrack table as the last sweep (`lastGc`, every 10 s) left it, 0
    /// before the first: counting them here would read the whole table.
    pub conntrack_entries: usize,
    /// Of which UDP.
    pub conntrack_udp: usize,
    pub conntrack_max: u32,
    pub socket_programs: Vec<String>,
    pub last_apply: Option<ApplyStats>,
    pub last_gc: Option<GcStats>,
    /// Entries the sweeps removed since the agent started.
    pub conntrack_expired_total: u64,
    /// The node's connected UDP sockets aborted since the agent started, because the
    /// backend they were balanced to left the service.
    pub udp_sockets_aborted_total: u64,
    /// Connected UDP sockets of the node noted now (SOCK_UDP_BACKEND), and how many fit
    /// (`[services] connectedUdpSockets`).
    pub udp_sockets_tracked: usize,
    pub udp_sockets_max: u32,
    /// Connected UDP sockets balanced while that map was full: not noted, so never aborted.
    pub udp_sockets_untracked_total: u64,
    /// The maps that could not be read, each with why: what they hold is missing above
    /// (an empty frontend list is not an empty table then).
    pub read_errors: Vec<String>,
}

/// One entry of the node-address map.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddressReport {
    pub address: Ipv4Addr,
    /// One of this node's own addresses (else another node's).
    pub this_node: bool,
    /// Whether NodePorts are served on it (`[services] nodePortAddresses`).
    pub node_ports: bool,
}

fn flag_names(flags: u32) -> (&'static str, Vec<&'static str>) {
    let kind = if flags & svc_flags::NODE_PORT != 0 {
        "NodePort"
    } else if flags & svc_flags::CLUSTER_IP != 0 {
        "ClusterIP"
    } else {
        "External"
    };
    let mut out = vec![];
    for (bit, name) in [
        (svc_flags::ETP_LOCAL, "externalTrafficPolicy=Local"),
        (svc_flags::ITP_LOCAL, "internalTrafficPolicy=Local"),
        (svc_flags::AFFINITY, "sessionAffinity=ClientIP"),
        (svc_flags::SOURCE_RANGES, "loadBalancerSourceRanges"),
    ] {
        if flags & bit != 0 {
            out.push(name);
        }
    }
    (kind, out)
}

/// Notes in SOCK_UDP_BACKEND the node's connected UDP sockets an agent from before that
/// map noted in SOCK_REVNAT, so they are aborted like any other when their backend leaves.
fn adopt_legacy_udp_notes(dp: &mut crate::datapath::Datapath) {
    let socks = match crate::sockdiag::connected_udp4() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("listing the node's UDP sockets (sock_diag) to adopt an older agent's notes: {e}");
            return;
        }
    };
    let socks: Vec<(u64, Ipv4Addr, u16)> = socks.iter().map(|s| (s.cookie, s.peer.0, s.peer.1)).collect();
    match dp.adopt_legacy_udp_notes(&socks) {
        Ok(0) => {}
        Ok(n) => log::info!("SOCK_UDP_BACKEND: {n} connected UDP sockets an older agent noted in SOCK_REVNAT adopted"),
        Err(e) => log::warn!("adopting an older agent's notes of connected UDP sockets: {e}"),
    }
}

impl Agent {
    /// Attaches the service programs (socket programs at the cgroup2 root, the uplink's
    /// ingress) and reads back what the service maps hold. Called once at start.
    pub(super) fn setup_services(&self, inner: &mut Inner) -> anyhow::Result<()> {
        use anyhow::Context;
        let cfg = &self.config.services;
        if !cfg.enabled {
            inner.datapath.detach_sockets();
            log::info!("services are off ([services] enabled = false)");
            return Ok(());
        }
        let root = cfg.cgroup_root.clone().or_else(crate::datapath::cgroup2_root);
        match root {
            Some(root) => {
                inner
                    .datapath
                    .attach_sockets(&root)
                    .with_context(|| format!("attaching the socket programs at {}", root.display()))?;
                log::info!("services: socket programs at cgroup {}", root.display());
                // Upgraded from an agent that noted connected UDP sockets in SOCK_REVNAT: its
                // programs, which noted there, are gone now.
                let dp = &mut inner.datapath;
                if dp.created_here(map_names::SOCK_UDP_BACKEND) && !dp.created_here(map_names::SOCK_REVNAT) {
                    adopt_legacy_udp_notes(dp);
                }
            }
            None => log::warn!(
                "services: no cgroup2 hierarchy found (set [services] cgroupRoot); TCP to services is translated per \
                 packet instead of at connect()"
            ),
        }
        if let Some(u) = &self.uplink {
            inner.datapath.attach_uplink(&u.ifname).with_context(|| format!("attaching to the uplink {}", u.ifname))?;
        }
        inner.proxy.resync(&inner.datapath).context("reading the service maps")?;
        Ok(())
    }

    /// Warns, once per address, of node addresses that take NodePorts on an interface other
    /// than the uplink: clients outside reach NodePorts only through the uplink.
    async fn warn_node_ports_off_uplink(
        &self,
        node: &rtnetlink::Handle,
        takes: &BTreeSet<Ipv4Addr>,
        uplink_ifindex: u32,
        uplink: &str,
    ) {
        let held = match crate::uplink::node_addresses(node).await {
            Ok(h) => h,
            Err(e) => return log::debug!("listing the node's addresses: {e}"),
        };
        let mut logged = self.skipped_logged.lock().unwrap_or_else(|p| p.into_inner());
        for (_, ip, label) in crate::uplink::node_ports_off_uplink(&held, takes, uplink_ifindex) {
            if logged.insert(format!("node-port-off-uplink {ip} {label}")) {
                log::warn!(
                    "NodePorts at {ip} ({label}) answer pods and this node only: clients outside the cluster reach \
                     NodePorts through the uplink {uplink} (set [services] nodePortAddresses to leave {ip} out)"
                );
            }
        }
    }

    /// Notes what changed for the service plan (the service task picks it up).
    pub fn services_changed(&self, changes: ServiceChanges) {
        if !self.config.services.enabled {
            return;
        }
        let mut queue = self.service_changes.lock().unwrap_or_else(|p| p.into_inner());
        queue.merge(changes);
        self.proxy_health.queued(Instant::now());
    }

    /// Brings the service plan up to date with the cluster model (recomputing the services
    /// that changed since the last call) and installs the difference. `None` when services
    /// are off or the model is not there yet.
    pub async fn sync_services(&self) -> Option<ApplyStats> {
        if !self.config.services.enabled {
            return None;
        }
        let model = self.model.get()?.clone();
        // Not from a model that is still being listed: its plan, of part of the cluster or
        // none of it, would be applied in full (the first apply after a start compares every
        // entry) and remove what the maps hold, and the backends it lacks would be taken
        // for gone (their flows flushed). The listing's resync wakes this task again.
        if !self.model_listed() {
            return None;
        }
        // A store that lost its data: the services stay as installed (the marker's return
        // resyncs everything).
        if self.store_lost_its_data(&model.read().unwrap_or_else(|p| p.into_inner())) {
            // Held on purpose, which /healthz must not read as a proxy that stopped: load
            // balancers would drain every node at once while every node forwards.
            let _queue = self.service_changes.lock().unwrap_or_else(|p| p.into_inner());
            self.proxy_health.held();
            return None;
        }
        let started = Instant::now();
        let mut changes = {
            let mut queue = self.service_changes.lock().unwrap_or_else(|p| p.into_inner());
            self.proxy_health.taken();
            std::mem::take(&mut *queue)
        };
        let triggers = std::mem::take(&mut changes.trigger_times);
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        // The first plan is of everything, hostPorts and node addresses included.
        changes.all |= !inner.proxy.planned();
        let (delta, live) = {
            let m = model.read().unwrap_or_else(|p| p.into_inner());
            if changes.all || changes.nodes {
                // A node on its way out answers 503 on /healthz (load balancers drain it).
                let params = inner.proxy.params();
                if let Some(node) = m.nodes().find(|n| n.name == params.node_name) {
                    self.proxy_health.set_node_eligible(!node.to_be_deleted);
                }
            }
            // This node's hostPorts, served as services of their own (crate::hostports):
            // they follow the attachments and the pods' objects.
            let host_ports = {
                let params = inner.proxy.params();
                // The node's addresses as the last plan has them, unless nodes changed.
                let addrs = if changes.all || changes.nodes {
                    crate::services::local_node_addrs(params, &*m)
                } else {
                    crate::services::local_addrs(&inner.proxy.plan().node_addrs)
                };
                let pods = inner
                    .state
                    .attachments()
                    .filter(|a| a.complete && !inner.leaving.contains(&a.key()) && !inner.gone.contains(&a.key()))
                    .filter_map(|a| m.pod(&a.pod_namespace, &a.pod_name).map(|p| (p, a.ip)));
                crate::hostports::host_port_services(&params.node_name, params.proxy_name.as_deref(), &addrs, pods)
            };
            changes.services.extend(crate::hostports::changed(&inner.host_ports, &host_ports));
            inner.host_ports = host_ports;
            let src = crate::hostports::WithHostPorts { cluster: &*m, host_ports: &inner.host_ports };
            let delta = inner.proxy.update(&src, &changes);
            // Addresses pods hold: they matter only while a removed backend may be refused.
            let mut live = BTreeSet::new();
            if inner.proxy.needs_live_ips(&delta) {
                live.extend(m.pods().flat_map(|p| p.ips.iter()).filter_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                }));
                live.extend(inner.state.attachments().map(|a| a.ip));
            }
            (delta, live)
        };
        let planned = started.elapsed();
        if delta.skipped_changed {
            let mut logged = self.skipped_logged.lock().unwrap_or_else(|p| p.into_inner());
            for s in &inner.proxy.plan().skipped {
                if logged.insert(format!("{}: {}", s.service, s.reason)) {
                    if s.warn {
                        log::warn!("service {} not programmed: {}", s.service, s.reason);
                    } else {
                        log::info!("service {} not programmed: {}", s.service, s.reason);
                    }
                }
            }
        }
        let result = inner.proxy.apply(&mut inner.datapath, &delta, &live, Instant::now());
        sync_pod_egress(inner);
        abort_udp_sockets_left(inner);
        let refusals = Arc::new(inner.proxy.refusals());
        // As kube-proxy: the health servers follow a plan once the maps hold it (a node
        // must not say it has a local endpoint its maps do not lead to).
        if result.is_ok() {
            let plan = inner.proxy.plan();
            let hc_addrs = crate::services::health_check_addrs(inner.proxy.params(), &plan.node_addrs);
            inner.health.update(&plan.health_checks, hc_addrs.as_deref());
        }
        // Node addresses on other interfaces than the uplink answer NodePorts to pods and
        // this node only: said once per address (`tc_from_uplink` runs on the uplink alone).
        let off_uplink = match (&self.uplink, delta.node_addrs) {
            (Some(u), true) => {
                let takes: BTreeSet<Ipv4Addr> = inner
                    .proxy
                    .plan()
                    .node_addrs
                    .iter()
                    .filter(|(_, a)| a.local != 0 && a.no_node_ports == 0)
                    .map(|(ip, _)| *ip)
                    .collect();
                Some((inner.node.clone(), takes, u.ifindex, u.ifname.clone()))
            }
            _ => None,
        };
        drop(guard);
        if let Some((node, takes, uplink_ifindex, uplink)) = off_uplink {
            self.warn_node_ports_off_uplink(&node, &takes, uplink_ifindex, &uplink).await;
        }
        self.set_refusals(refusals);
        self.programming.synced(started.elapsed());
        match result {
            Ok(stats) => {
                let now = std::time::SystemTime::now();
                self.proxy_health.updated(now);
                self.programming.programmed(&triggers, now);
                log::debug!("services applied in {:?} (planned in {planned:?}): {stats:?}", started.elapsed());
                *self.last_apply.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
                Some(stats)
            }
            Err(e) => {
                // Retried in a second (the service task asks `services_due`), comparing
                // every entry with the maps. The changes' times wait for that apply.
                self.programming.failed();
                self.service_changes.lock().unwrap_or_else(|p| p.into_inner()).trigger_times.extend(triggers);
                log::error!("applying services: {e}; retrying");
                None
            }
        }
    }

    /// Hands the vswitch the destinations it refuses.
    pub(super) fn set_refusals(&self, refusals: Arc<contiv_vswitch::Refusals>) {
        if let Some(slot) = self.slowpath.builtin()
            && let Ok(p) = slot.lock()
            && let Some(port) = p.as_ref()
        {
            port.with_backend(|b| b.set_refusals(refusals));
        }
    }

    /// When the service task re-applies without a cluster change: removed backends stop
    /// being refused, or a failed apply is retried.
    pub async fn services_due(&self) -> Option<Instant> {
        // Nothing is due before the model is listed (`sync_services` waits for it; the
        // listing itself wakes the services task).
        if !self.model_listed() {
            return None;
        }
        self.inner.lock().await.proxy.next_due(Instant::now())
    }

    /// One conntrack sweep, on a thread of the blocking pool and the table's own handle:
    /// reading a full table takes a while, and nothing else (CNI requests, service and
    /// policy changes) waits for it. Also with services off: NetworkPolicy records every
    /// new flow in the same table, and a closed flow's entries must not outlive it (a new
    /// connection on the same ports would pass as established).
    pub async fn gc_conntrack(&self) -> Option<GcStats> {
        // The table the programs write (pinned aside while a resize waits for its finish).
        // With the addresses no pod holds now: their flows go too.
        let (ct_pin, released) = {
            let inner = self.inner.lock().await;
            let mut held: std::collections::BTreeSet<Ipv4Addr> = inner.state.attachments().map(|a| a.ip).collect();
            held.insert(self.params.gateway_ip);
            held.extend(self.params.host_pod_address);
            let released = Released {
                subnet: self.params.pod_subnet,
                held,
                as_of_ns: monotonic_ns(),
                departed: inner.departures.list(),
            };
            (inner.datapath.ct_pin(), released)
        };
        let departed = released.departed.clone();
        let timeouts = self.config.services.timeouts;
        let swept = tokio::task::spawn_blocking(move || {
            let mut table = CtTable::open_at(&ct_pin).map_err(|e| e.to_string())?;
            gc_conntrack(&mut table, &timeouts, monotonic_ns(), Some(&released)).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match swept {
            Ok(stats) => {
                if !departed.is_empty() {
                    log::info!(
                        "conntrack: flows of departed nodes' pod subnets removed ({})",
                        departed.iter().map(|(net, _)| net.to_string()).collect::<Vec<_>>().join(", ")
                    );
                    let mut inner = self.inner.lock().await;
                    if inner.departures.swept(&departed) {
                        super::save_holders(&inner.departures, &self.config.state_dir.join(super::SUBNET_HOLDERS_FILE));
                    }
                }
                if stats.expired > 0 {
                    log::debug!(
                        "conntrack: {} of {} entries expired (sweep took {} us)",
                        stats.expired,
                        stats.scanned,
                        stats.took_us
                    );
                }
                *self.last_gc.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
                self.ct_expired_total.fetch_add(stats.expired as u64, std::sync::atomic::Ordering::Relaxed);
                Some(stats)
            }
            Err(e) => {
                log::error!("conntrack sweep: {e}");
                None
            }
        }
    }

    /// Removes the SOCK_UDP_BACKEND notes of sockets that are gone. `sock_release` removes a
    /// note when its socket closes, so this finds only what it could not see: a socket that
    /// closed while a resize copied the notes, or whose connect() failed after it was
    /// noted. A note goes when two sweeps in a row (10 s apart) find no connected socket
    /// with its cookie: a socket being connected is noted a moment before the kernel
    /// connects it. Also logs when sockets went untracked because the map was full.
    pub async fn sweep_udp_notes(&self) {
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        let untracked = inner.datapath.sock_counters().map_or(0, |c| c.udp_untracked);
        if untracked > inner.udp_untracked_logged {
            log::warn!(
                "{} connected UDP sockets to services not tracked ({untracked} since the map was created): \
                 SOCK_UDP_BACKEND is full ([services] connectedUdpSockets = {}); they keep their backends \
                 if those leave the service",
                untracked - inner.udp_untracked_logged,
                self.config.services.connected_udp_sockets
            );
            inner.udp_untracked_logged = untracked;
        }
        // The notes first, then the sockets: a note older than the listing has its socket in it.
        let noted = match inner.datapath.sock_udp_cookies() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("{e}");
                return;
            }
        };
        if noted.is_empty() {
            inner.udp_notes_unseen.clear();
            return;
        }
        let live: BTreeSet<u64> = match crate::sockdiag::connected_udp4() {
            Ok(socks) => socks.iter().map(|s| s.cookie).collect(),
            Err(e) => {
                log::warn!("listing the node's UDP sockets (sock_diag): {e}");
                return;
            }
        };
        let (gone, unseen) = notes_gone(noted, &live, &inner.udp_notes_unseen);
        inner.udp_notes_unseen = unseen;
        if !gone.is_empty() {
            match inner.datapath.forget_udp_sockets(&gone) {
                Ok(()) => log::info!("SOCK_UDP_BACKEND: removed {} notes of sockets that are gone", gone.len()),
                Err(e) => log::warn!("{e}"),
            }
        }
    }

    /// The conntrack table's flows (`GET /conntrack`, see [`crate::conntrack`]): read on
    /// the table's own handle, named from the cluster model and the service plan. An error
    /// names a pod or service of the query this node does not know.
    pub async fn conntrack_report(&self, q: &ConntrackQuery) -> Result<ConntrackReport, ConntrackError> {
        let pods = self.pod_directory().await;
        let (filter, services) = {
            let inner = self.inner.lock().await;
            let ports = &inner.proxy.plan().ports;
            let named: Vec<(u32, &str, &str)> =
                ports.iter().map(|(id, p)| (*id, p.namespace.as_str(), p.name.as_str())).collect();
            let services: HashMap<u32, String> = ports
                .iter()
                .map(|(id, p)| {
                    let port = if p.port_name.is_empty() { String::new() } else { format!(":{}", p.port_name) };
                    (*id, format!("{}/{}{port}", p.namespace, p.name))
                })
                .collect();
            (q.filter(&pods, &named).map_err(ConntrackError::Query)?, services)
        };
        // Read and grouped on a thread of the blocking pool: a full table is hundreds of
        // thousands of entries, and CNI requests share this runtime.
        let ct_pin = self.inner.lock().await.datapath.ct_pin();
        let timeouts = self.config.services.timeouts;
        let (n_entries, (flows, flows_total, matched)) = tokio::task::spawn_blocking(move || {
            let entries = CtTable::open_at(&ct_pin).and_then(|t| t.entries())?;
            let n = entries.len();
            Ok::<_, crate::datapath::DatapathError>((
                n,
                flows_report(entries, monotonic_ns(), &timeouts, &services, &pods, &filter),
            ))
        })
        .await
        .map_err(|e| ConntrackError::Read(e.to_string()))?
        .map_err(|e| ConntrackError::Read(e.to_string()))?;
        Ok(ConntrackReport {
            node: self.config.node_name.clone(),
            entries: n_entries,
            max: self.config.services.conntrack_entries,
            flows_total,
            matched,
            filter: q.describe(),
            limit: q.limit(),
            flows,
        })
    }

    /// The conntrack table's fill as the last sweep left it, and what the sweeps removed;
    /// reads nothing.
    pub fn conntrack_fill(&self) -> ConntrackFill {
        ConntrackFill {
            last_gc: *self.last_gc.lock().unwrap_or_else(|p| p.into_inner()),
            expired_total: self.ct_expired_total.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// What the node programs for services, read from the maps; with services off, the
    /// conntrack fill alone.
    pub async fn services_report(&self) -> ServicesReport {
        let fill = self.conntrack_fill();
        let mut r = ServicesReport {
            node: self.config.node_name.clone(),
            enabled: self.config.services.enabled,
            conntrack_max: self.config.services.conntrack_entries,
            conntrack_entries: fill.last_gc.map_or(0, |g| g.remaining),
            conntrack_udp: fill.last_gc.map_or(0, |g| g.remaining_udp),
            last_gc: fill.last_gc,
            conntrack_expired_total: fill.expired_total,
            ..Default::default()
        };
        if !r.enabled {
            return r;
        }
        r.udp_sockets_max = self.config.services.connected_udp_sockets;
        r.last_apply = *self.last_apply.lock().unwrap_or_else(|p| p.into_inner());
        r.proxy_health = self.proxy_health.report(Instant::now());
        match self.proxy_health.server() {
            Server::Listening(addr) => r.proxy_healthz_address = Some(addr.to_string()),
            Server::Waiting { addr, error } => r.proxy_healthz_waiting = Some(format!("{addr}: {error}")),
            Server::Off => {}
        }
        r.node_port_addresses = self.config.services.node_port_addresses.clone();
        let guard = self.inner.lock().await;
        let inner = &*guard;
        r.udp_sockets_aborted_total = inner.udp_sockets_aborted;
        let dp = &inner.datapath;
        let e = &mut r.read_errors;
        r.udp_sockets_tracked = read(e, dp.sock_udp_cookies()).map_or(0, |c| c.len());
        r.udp_sockets_untracked_total = read(e, dp.sock_counters()).map_or(0, |c| c.udp_untracked);
        let frontends = read(e, dp.svc_frontends()).unwrap_or_default();
        let backends = read(e, dp.svc_backends()).unwrap_or_default();
        let counters = read(e, dp.svc_counters()).unwrap_or_default();
        let dead_backends = read(e, dp.dead_backends()).unwrap_or_default();
        let node_addrs = read(e, dp.node_addrs()).unwrap_or_default();
        let ports = &inner.proxy.plan().ports;
        let list = |id: u32, base: u32, n: u16| -> Vec<BackendReport> {
            (0..u32::from(n))
                .filter_map(|i| backends.get(&SvcBackendKey { svc_id: id, ordinal: base + i }))
                .map(|b| BackendReport { address: format!("{}:{}", Ipv4Addr::from(b.ip), b.port), local: b.local != 0 })
                .collect()
        };
        for (k, fe) in &frontends {
            let info = ports.get(&fe.svc_id);
            let (mut kind, mut flags) = flag_names(fe.flags);
            if info.is_some_and(|i| crate::hostports::is_host_port_service(&i.name)) {
                kind = "HostPort";
            }
            match info.and_then(|i| i.topology) {
                Some(crate::services::PREFER_SAME_NODE) => flags.push("topology=PreferSameNode"),
                Some(crate::services::PREFER_SAME_ZONE) => flags.push("topology=PreferSameZone"),
                _ => {}
            }
            let c = counters.get(&fe.svc_id).copied().unwrap_or_default();
            let ip = Ipv4Addr::from(k.ip);
            r.frontends.push(FrontendReport {
                namespace: info.map(|i| i.namespace.clone()).unwrap_or_default(),
                service: info.map(|i| i.name.clone()).unwrap_or_default(),
                port_name: info.map(|i| i.port_name.clone()).unwrap_or_default(),
                protocol: proto_name(k.proto),
                frontend: if ip.is_unspecified() { format!("*:{}", k.port) } else { format!("{ip}:{}", k.port) },
                kind,
                flags,
                service_id: fe.svc_id,
                backends: list(fe.svc_id, 0, fe.count),
                local_backends: list(fe.svc_id, SVC_LOCAL_BASE, fe.local_count),
                connections: c.connections,
                no_endpoint_rejects: c.no_backend,
                source_denied: c.source_denied,
                snat_exhausted: c.snat_exhausted,
            });
        }
        r.frontends
            .sort_by(|a, b| (&a.namespace, &a.service, &a.frontend).cmp(&(&b.namespace, &b.service, &b.frontend)));
        r.skipped = inner.proxy.plan().skipped.clone();
        r.health_checks = inner.proxy.plan().health_checks.clone();
        r.dead_backends = dead_backends
            .iter()
            .map(|k: &SvcKey| format!("{}:{}/{}", Ipv4Addr::from(k.ip), k.port, proto_name(k.proto)))
            .collect();
        r.node_addresses = node_addrs
            .iter()
            .map(|(ip, a)| NodeAddressReport {
                address: *ip,
                this_node: a.local != 0,
                node_ports: a.no_node_ports == 0,
            })
            .collect();
        r.socket_programs = dp
            .link_pins()
            .iter()
            .filter_map(|p| p.file_name()?.to_str()?.strip_prefix("cgroup_").map(str::to_owned))
            .collect();
        r
    }
}

/// A map read's value, or `None` with its error noted for the report.
fn read<T>(errors: &mut Vec<String>, result: Result<T, crate::datapath::DatapathError>) -> Option<T> {
    result.map_err(|e| errors.push(e.to_string())).ok()
}

/// Of the `noted` sockets, those to forget (not `live` now, nor at the sweep before: in
/// `unseen_before`), and those to look for again at the next sweep (not live now).
fn notes_gone(noted: Vec<u64>, live: &BTreeSet<u64>, unseen_before: &BTreeSet<u64>) -> (Vec<u64>, BTreeSet<u64>) {
    let (gone, unseen): (Vec<u64>, Vec<u64>) =
        noted.into_iter().filter(|c| !live.contains(c)).partition(|c| unseen_before.contains(c));
    (gone, unseen.into_iter().collect())
}

/// Aborts the node's connected UDP sockets that were balanced to a backend that has left
/// that service since the last apply: a socket keeps the backend connect() gave it, so
/// without this it would stay on a backend whose pod lives on but no longer serves. The
/// client's next call fails with ECONNABORTED and its next connect() is balanced anew (as
/// Cilium does). Pods' UDP is balanced per packet and needs none of this. Each such socket
/// is noted in SOCK_UDP_BACKEND from its connect() until it closes.
fn abort_udp_sockets_left(inner: &mut super::Inner) {
    let left = inner.proxy.take_udp_left();
    if left.is_empty() {
        return;
    }
    let socks = match crate::sockdiag::connected_udp4() {
        Ok(s) => s,
        Err(e) => {
            log::warn!(
                "listing the node's UDP sockets (sock_diag): {e}; sockets balanced to backends that left keep them"
            );
            return;
        }
    };
    let backends: BTreeSet<([u8; 4], u16)> = left.iter().map(|(_, ip, port)| (*ip, *port)).collect();
    for s in socks.iter().filter(|s| backends.contains(&(s.peer.0.octets(), s.peer.1))) {
        let note = match inner.datapath.sock_udp_backend(s.cookie) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("{e}");
                return;
            }
        };
        let backend = (note.backend_ip, note.backend_port);
        if backend != (s.peer.0.octets(), s.peer.1) || !left.contains(&(note.svc_id, backend.0, backend.1)) {
            continue;
        }
        // A service deleted meanwhile is gone from the plan: named by its port id.
        let service = match inner.proxy.plan().ports.get(&note.svc_id) {
            Some(p) if p.port_name.is_empty() => format!("{}/{}", p.namespace, p.name),
            Some(p) => format!("{}/{}:{}", p.namespace, p.name, p.port_name),
            None => format!("service port {}", note.svc_id),
        };
        match crate::sockdiag::abort(s) {
            Ok(()) => {
                inner.udp_sockets_aborted += 1;
                log::info!(
                    "aborted UDP socket {}:{} -> {service}: its backend {}:{} left the service",
                    s.local.0,
                    s.local.1,
                    s.peer.0,
                    s.peer.1
                );
            }
            // Closed meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => log::warn!("aborting UDP socket {}:{} -> {service} (sock_diag): {e}", s.local.0, s.local.1),
        }
    }
}

/// Gives every pod `tc_to_pod` on its egress while a UDP service port has a backend that is
/// this node's own address, and takes it away once none has. Pods' UDP to a service is
/// balanced per packet; handed to this node's stack, the answers reach the pod by its veth,
/// where only that program gives them the frontend back as source. It is not always on
/// because each attach costs an RCU grace period, which every ADD would pay (measured:
/// ADD p50 13.6 -> 29 ms). Checked on every apply while on, so a pod that an ADD wired
/// while it changed gets it too.
fn sync_pod_egress(inner: &mut super::Inner) {
    let want = inner.proxy.udp_answers_via_stack();
    if !want && !inner.pod_egress {
        return;
    }
    let pods: Vec<String> = inner
        .state
        .attachments()
        .filter(|a| {
            let key = a.key();
            a.complete && !inner.gone.contains(&key) && !inner.leaving.contains(&key) && !inner.attaching.contains(&key)
        })
        .map(|a| a.host_ifname.clone())
        .collect();
    for name in pods {
        if inner.datapath.pod_has_egress(&name) == want {
            continue;
        }
        if let Err(e) = inner.datapath.set_pod_egress(&name, want) {
            log::error!("{name}: {} tc_to_pod: {e}", if want { "attaching" } else { "detaching" });
        }
    }
    if want != inner.pod_egress {
        log::info!(
            "tc_to_pod {} pods' egress: {} UDP service has a backend answering through this node's stack (its own address, or outside the cluster)",
            if want { "on" } else { "off" },
            if want { "a" } else { "no" }
        );
    }
    inner.pod_egress = want;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_udp_note_goes_when_two_sweeps_in_a_row_miss_its_socket() {
        let live: BTreeSet<u64> = [1, 2].into();
        // First sweep: 3 and 4 have no socket; looked for again, not forgotten yet.
        let (gone, unseen) = notes_gone(vec![1, 2, 3, 4], &live, &BTreeSet::new());
        assert!(gone.is_empty(), "one miss may be a socket being connected");
        assert_eq!(unseen, [3, 4].into());
        // Second sweep: 3 is still missing and goes; 4 connected meanwhile and stays; 5 is
        // new and missed once.
        let live: BTreeSet<u64> = [1, 2, 4].into();
        let (gone, unseen) = notes_gone(vec![1, 2, 3, 4, 5], &live, &unseen);
        assert_eq!(gone, vec![3]);
        assert_eq!(unseen, [5].into());
    }

    #[test]
    fn a_report_with_services_off_says_so_and_names_no_healthz_address() {
        let gc = GcStats { scanned: 9, expired: 1, took_us: 3, remaining: 8, remaining_udp: 2 };
        let r = ServicesReport {
            node: "n1".into(),
            conntrack_entries: 8,
            conntrack_udp: 2,
            last_gc: Some(gc),
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["enabled"], false);
        assert!(v["proxyHealthzAddress"].is_null(), "{v}");
        // The fields clients read keep their names.
        assert_eq!((v["conntrackEntries"].as_u64(), v["conntrackUdp"].as_u64()), (Some(8), Some(2)));
        assert_eq!(v["lastGc"]["remainingUdp"], 2);
    }
}
