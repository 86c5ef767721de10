//! `uplink = "vpp"`: the agent's VPP side (ARCHITECTURE.md, "the wire has one owner").
//!
//! VPP owns the NIC through DPDK. The eBPF datapath hands everything pods send that is not
//! for a local pod to the slow-path port, whose vswitch end is VPP's `af_xdp` interface, and
//! VPP does the rest: VXLAN to the other nodes, routes, NAT44-ED with the node IP, and the
//! tap to the host. This module keeps VPP programmed:
//!
//! - [`uplink_handover`]: the NIC's addresses and routes VPP takes over (contiv-stn's state
//!   file, or `[vpp] uplinkAddress` on a node whose VPP NIC the host never configured);
//! - [`remote_nodes`]: the node registry's live nodes as the backend's [`RemoteNode`]s (a pure
//!   function, filtered like the kernel plan filters them);
//! - [`bootstrap`]: before the agent joins the cluster store, VPP gets what needs no store
//!   ([`render_bootstrap`]: the uplink with the handed-over addresses and routes, the host
//!   interconnect tap with the host's default route, NAT44): on a single-NIC node contiv-stn
//!   took the host's network, and only VPP gives it back, so the store is not reachable
//!   before (contiv-init's job in the original Contiv). Its supervisor is parked and
//!   [`VppNode::start`] takes it over, growing the desired state to the full one;
//! - [`VppNode`]: renders [`VppDesired`] from the same inputs as the plan (node config, pod
//!   subnet, registrations) and feeds a [`VppSupervisor`], which converges VPP by diffing
//!   against its dumps and replays everything after VPP restarts. Nothing here touches eBPF.
//!
//! The slow-path port itself is kept across agent restarts ([`ensure_slow_port`]); its
//! programs are pinned and its XSK map is the one VPP registers its socket in (the datapath).

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use contiv_node_registry::NodeRegistration;
use contiv_vpp_backend::{
    AF_XDP_DEV_TYPE, NodeInputs, RemoteNode, SupervisorOptions, UplinkHandover, VppConfig, VppDesired, VppStatus,
    VppSupervisor,
    desired::{af_xdp_name, tap_name, vxlan_name},
    render, render_bootstrap,
};
use contiv_vpp_binapi::{Client, ClientOptions, api};
use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;
use tokio::sync::watch;

use crate::podnet;

/// How long the agent waits at start for contiv-stn to hand the NIC over.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(60);

/// The NIC configuration VPP takes over: `[vpp] uplinkAddress` when set, else contiv-stn's
/// state file, waited for up to `wait` (contiv-stn may still be taking the NIC).
pub async fn uplink_handover(cfg: &VppConfig, wait: Duration) -> anyhow::Result<UplinkHandover> {
    if let Some(h) = UplinkHandover::from_config(cfg) {
        return Ok(h);
    }
    let deadline = Instant::now() + wait;
    loop {
        match UplinkHandover::from_stn_state_file(&cfg.stn_state_file) {
            Ok(h) => return Ok(h),
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!(
                    "{e}; with uplink = \"vpp\" the node IP comes from contiv-stn (run it on the NIC) or from \
                     [vpp] uplinkAddress"
                )
            }
            Err(e) => {
                log::info!("waiting for the NIC handover: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// How long the agent waits at start for VPP to apply the bootstrap state before it joins
/// the cluster store anyway.
pub const BOOTSTRAP_WAIT: Duration = Duration::from_secs(60);

/// How often a wait logs that it is still waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The bootstrap's supervisor, converging [`render_bootstrap`]'s state until
/// [`VppNode::start`] takes it over (one agent, one node per process).
struct Bootstrap {
    api_socket: PathBuf,
    handover: UplinkHandover,
    desired: watch::Sender<VppDesired>,
    supervisor: VppSupervisor,
}

static PARKED: Mutex<Option<Bootstrap>> = Mutex::new(None);

fn take_parked() -> Option<Bootstrap> {
    PARKED.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn client_options(config: &VppConfig, node_name: &str) -> ClientOptions {
    let mut opts = ClientOptions::new(&config.api_socket);
    opts.name = format!("contiv-agent-{node_name}").chars().take(63).collect();
    opts
}

/// What VPP holds, by its interface names and device types, decides whether the bootstrap
/// may run: it removes what the reconciler owns and the bootstrap does not name.
#[derive(Debug, PartialEq, Eq)]
enum BootstrapPlan {
    /// VPP holds nothing the bootstrap would remove (a VPP that just started): apply it.
    Apply,
    /// VPP holds a previous agent's full state (`kept`: its af_xdp and tunnel interfaces),
    /// the host interconnect included: the host has its network, nothing to bootstrap, and
    /// the full state follows the join without re-creating anything.
    Skip { kept: Vec<String> },
    /// A previous agent's state without the host interconnect: the host has no way to the
    /// store but through the bootstrap, which removes `removed` until the full state
    /// re-creates them after the join.
    ApplyRemoving { removed: Vec<String> },
}

/// Decides from VPP's interfaces `(name, device type)` (a pure function).
fn bootstrap_plan<'a>(config: &VppConfig, interfaces: impl IntoIterator<Item = (&'a str, &'a str)>) -> BootstrapPlan {
    let tap = tap_name(config.host_tap_id);
    let mut has_tap = false;
    let mut previous = Vec::new();
    for (name, dev_type) in interfaces {
        has_tap |= name == tap;
        if name.starts_with("xdp-") || dev_type == AF_XDP_DEV_TYPE || name.starts_with("vxlan_tunnel") {
            previous.push(name.to_owned());
        }
    }
    match (previous.is_empty(), has_tap) {
        (true, _) => BootstrapPlan::Apply,
        (false, true) => BootstrapPlan::Skip { kept: previous },
        (false, false) => BootstrapPlan::ApplyRemoving { removed: previous },
    }
}

/// `uplink = "vpp"`, before joining the cluster store: brings up in VPP what needs no store
/// ([`render_bootstrap`]: the NIC's handed-over addresses and routes, the host interconnect
/// with the host's default route via VPP, NAT44 with the node IP) and waits, up to `wait`,
/// until a reconcile pass applied it. On a single-NIC node contiv-stn took the host's
/// network, and without this the store (a NodePort to etcd on the host network) cannot be
/// reached. The supervisor keeps converging it (VPP restarts included) until
/// [`VppNode::start`] takes it over. A VPP that cannot be reached, or refuses part of it, is
/// logged and the agent joins anyway; only a missing NIC handover is an error (as it is for
/// [`VppNode`]).
pub async fn bootstrap(config: &VppConfig, node_name: &str, wait: Duration) -> anyhow::Result<()> {
    let handover = uplink_handover(config, HANDOVER_WAIT).await?;
    let desired = render_bootstrap(config, &handover)?;
    let deadline = Instant::now() + wait;
    let socket = config.api_socket.display().to_string();

    // What VPP holds already: an agent restart finds the previous agent's full state.
    let mut probe = client_options(config, node_name);
    probe.connect_timeout = Duration::from_secs(2);
    probe.request_timeout = Duration::from_secs(5);
    let mut next_note = Instant::now();
    let plan = loop {
        let err = match Client::connect(probe.clone()).await {
            Ok(client) => {
                let dumped = client.dump(&api::SwInterfaceDump::default()).await;
                // Dropped, not closed (see remove_stale_port).
                drop(client);
                match dumped {
                    Ok(ifaces) => {
                        break Some(bootstrap_plan(
                            config,
                            ifaces.iter().map(|i| (i.interface_name.as_str(), i.interface_dev_type.as_str())),
                        ));
                    }
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            log::error!(
                "VPP bootstrap: VPP at {socket} cannot be reached ({err}) after {} s; joining the cluster store \
                 anyway (on a single-NIC node the host has no network until VPP holds the uplink and the host \
                 interconnect; they are applied as soon as VPP answers)",
                wait.as_secs()
            );
            break None;
        }
        if Instant::now() >= next_note {
            log::info!("VPP bootstrap: waiting for VPP at {socket}: {err}");
            next_note = Instant::now() + PROGRESS_EVERY;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    match &plan {
        Some(BootstrapPlan::Skip { kept }) => {
            log::info!(
                "VPP bootstrap: VPP holds a previous agent's state ({}) with the host interconnect; joining the \
                 cluster store, the full state follows without re-creating anything",
                kept.join(", ")
            );
            return Ok(());
        }
        Some(BootstrapPlan::ApplyRemoving { removed }) => log::warn!(
            "VPP bootstrap: VPP holds a previous agent's state ({}) but no host interconnect; bootstrapping \
             removes them until the cluster store is joined",
            removed.join(", ")
        ),
        Some(BootstrapPlan::Apply) | None => {}
    }

    let (tx, rx) = watch::channel(desired);
    let supervisor =
        VppSupervisor::spawn(Client::new(client_options(config, node_name)), rx, SupervisorOptions::default());
    let mut status = supervisor.status();
    let what = format!(
        "{} with {} and {} route(s), the host interconnect {} ({}), NAT44 with {}",
        config.uplink_name,
        handover.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
        handover.routes.len(),
        tap_name(config.host_tap_id),
        config.host_if_name,
        handover.node_ip().map(|ip| ip.to_string()).unwrap_or_default()
    );
    log::info!("VPP bootstrap: applying {what}, before joining the cluster store");
    // An unreachable VPP was waited for above: join now, the supervisor keeps trying.
    if plan.is_some() {
        match first_pass(&mut status, deadline).await {
            Some(r) if r.converged() => {
                log::info!("VPP bootstrap: applied ({} changes); joining the cluster store", r.applied.len())
            }
            Some(r) => log::error!(
                "VPP bootstrap: VPP refused {} change(s) ({}); joining the cluster store anyway",
                r.failed.len(),
                r.failed.iter().map(|f| format!("{}: {}", f.what, f.error)).collect::<Vec<_>>().join("; ")
            ),
            None => log::error!(
                "VPP bootstrap: no reconcile pass in {} s{}; joining the cluster store anyway",
                wait.as_secs(),
                status.borrow().last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
            ),
        }
    }
    *PARKED.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(Bootstrap { api_socket: config.api_socket.clone(), handover, desired: tx, supervisor });
    Ok(())
}

/// The first completed reconcile pass's report, or None at `deadline`; logs progress.
async fn first_pass(
    status: &mut watch::Receiver<VppStatus>,
    deadline: Instant,
) -> Option<contiv_vpp_backend::ReconcileReport> {
    let mut next_note = Instant::now() + PROGRESS_EVERY;
    loop {
        if let Some(r) = status.borrow_and_update().last.clone() {
            return Some(r);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        if now >= next_note {
            let s = status.borrow().clone();
            log::info!(
                "VPP bootstrap: waiting for a first pass (connected: {}{})",
                s.connected,
                s.last_error.map(|e| format!(", last error: {e}")).unwrap_or_default()
            );
            next_note = now + PROGRESS_EVERY;
        }
        tokio::select! {
            _ = status.changed() => {}
            _ = tokio::time::sleep_until(deadline.min(next_note).into()) => {}
        }
    }
}

/// The other nodes VPP tunnels to: every live registration except this node, with an
/// underlay address and an IPv4 pod subnet. Stale records that claim this node's address or
/// subnet are skipped (never route our own traffic away), and of two records claiming the
/// same subnet, address or ID the first (by name) wins, so one bad record cannot stop the rest.
pub fn remote_nodes<'a>(
    own_name: &str,
    own_subnet: Ipv4Net,
    own_ip: Ipv4Addr,
    registrations: impl IntoIterator<Item = &'a NodeRegistration>,
) -> Vec<RemoteNode> {
    let overlaps = |a: &Ipv4Net, b: &Ipv4Net| a.contains(&b.network()) || b.contains(&a.network());
    let mut regs: Vec<&NodeRegistration> = registrations.into_iter().filter(|r| r.name != own_name).collect();
    regs.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out: Vec<RemoteNode> = Vec::new();
    for r in regs {
        let (Some(node_ip), IpNet::V4(subnet)) = (r.uplink_ip, r.pod_cidr) else { continue };
        let subnet = subnet.trunc();
        if node_ip == own_ip || overlaps(&subnet, &own_subnet) {
            continue;
        }
        if out.iter().any(|o| overlaps(&o.pod_subnet, &subnet) || o.node_ip == node_ip || o.id == r.id) {
            log::warn!("node {} claims a pod subnet, address or ID another node has; left out", r.name);
            continue;
        }
        out.push(RemoteNode { id: r.id, name: r.name.clone(), pod_subnet: subnet, node_ip });
    }
    out
}

/// What VPP is rendered from besides the remote nodes (fixed while the agent runs).
#[derive(Debug, Clone)]
pub struct VppNodeParams {
    pub node_name: String,
    pub pod_subnet: Ipv4Net,
    /// The cluster's pod range: the uplink drops plain packets from it.
    pub cluster_pod_cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub gateway_mac: [u8; 6],
    /// The slow-path port's vswitch end (VPP's af_xdp interface binds there).
    pub slowpath_ifname: String,
    /// Pod MTU (the af_xdp interface's).
    pub mtu: u32,
    /// The host's address in the pod subnet (see vpp_host.rs), or why there is none (the
    /// host then reaches only this node's pods).
    pub host_address: Result<Ipv4Addr, String>,
}

struct View {
    remote_nodes: Vec<RemoteNode>,
    render_error: Option<String>,
}

/// This node's VPP, kept converged while the agent runs.
pub struct VppNode {
    config: VppConfig,
    handover: UplinkHandover,
    params: VppNodeParams,
    desired: watch::Sender<VppDesired>,
    status: watch::Receiver<VppStatus>,
    supervisor: Mutex<Option<VppSupervisor>>,
    view: Mutex<View>,
    /// What the host's side of the tap must hold (vpp_host.rs), and the last failure
    /// putting it in place, if the last try failed.
    host_side: std::sync::Arc<Mutex<crate::vpp_host::HostSide>>,
    host_side_error: std::sync::Arc<Mutex<Option<String>>>,
}

/// `/vswitch`'s `vpp` object.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VppReport {
    pub api_socket: String,
    /// Connected to VPP's API socket now.
    pub connected: bool,
    /// Connections made (a VPP restart makes it grow).
    pub generation: u64,
    /// Reconcile passes completed.
    pub passes: u64,
    /// The last pass: what was applied and what VPP refused.
    pub last_report: Option<contiv_vpp_backend::ReconcileReport>,
    /// The last connection or read error (e.g. a message whose CRC VPP does not list).
    pub last_error: Option<String>,
    /// Why the latest cluster state could not be rendered (the previous one stays).
    pub render_error: Option<String>,
    /// The host's address in the pod subnet (the source of its traffic to other nodes'
    /// pods), and why it is not in place on the host if the last try failed.
    pub host_address: Option<Ipv4Addr>,
    pub host_address_error: Option<String>,
    /// What VPP must hold.
    pub desired: VppDesired,
}

/// `/node`'s `vpp` object: the tunnels VPP keeps to the other nodes.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VppNodeReport {
    pub node_ip: Ipv4Addr,
    /// Other nodes by name.
    pub remote_nodes: std::collections::BTreeMap<String, RemoteNodeReport>,
}

/// A remote node as `/node` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteNodeReport {
    pub id: u32,
    pub pod_subnet: String,
    pub node_ip: Ipv4Addr,
    /// VPP's name of the tunnel to it.
    pub tunnel: String,
}

impl VppNode {
    /// Renders what VPP must hold and starts converging it. A slow-path port created anew
    /// (`fresh_port`) invalidates an af_xdp interface VPP may still hold from the old one,
    /// which is removed first. Fails if the node's own inputs cannot be rendered (a
    /// configuration error); inconsistent registrations only leave their nodes out.
    pub async fn start(
        config: VppConfig,
        handover: UplinkHandover,
        params: VppNodeParams,
        registrations: &[NodeRegistration],
        fresh_port: bool,
    ) -> anyhow::Result<Self> {
        let own = render_for(&config, &handover, &params, &[])?;
        let node_ip = handover.node_ip().expect("rendered, so it has an address");
        let remotes = remote_nodes(&params.node_name, params.pod_subnet, node_ip, registrations);
        let (desired, remotes, render_error) = match render_for(&config, &handover, &params, &remotes) {
            Ok(d) => (d, remotes, None),
            Err(e) => {
                log::error!("VPP: the cluster's nodes cannot be rendered ({e}); starting with this node only");
                (own, Vec::new(), Some(e.to_string()))
            }
        };
        if fresh_port {
            remove_stale_port(&config, &params.slowpath_ifname).await;
        }
        // The bootstrap's supervisor grows into the full state: what it applied is a subset
        // with the same names and specs, so the next pass only adds (one connection, no gap).
        let (tx, supervisor) = match take_parked() {
            Some(b) if b.api_socket == config.api_socket && b.handover == handover => {
                log::info!("VPP: the bootstrap's supervisor takes over the node's full state");
                b.desired.send_replace(desired);
                (b.desired, b.supervisor)
            }
            parked => {
                if let Some(b) = parked {
                    log::warn!("VPP: the NIC handover or API socket changed since the bootstrap; starting over");
                    b.supervisor.stop().await;
                }
                let (tx, rx) = watch::channel(desired);
                let opts = client_options(&config, &params.node_name);
                (tx, VppSupervisor::spawn(Client::new(opts), rx, SupervisorOptions::default()))
            }
        };
        log::info!(
            "VPP at {}: node IP {node_ip}, af_xdp on {}, {} remote node(s)",
            config.api_socket.display(),
            params.slowpath_ifname,
            remotes.len()
        );
        // Without an address, what an earlier agent put there goes.
        let host_side = std::sync::Arc::new(Mutex::new(crate::vpp_host::HostSide {
            ifname: config.host_if_name.clone(),
            address: params.host_address.clone().ok(),
            via: config.host_interconnect_vpp().addr(),
            destinations: crate::vpp_host::destinations(params.cluster_pod_cidr, remotes.iter().map(|n| n.pod_subnet)),
            mtu: params.mtu,
        }));
        let host_side_error = std::sync::Arc::new(Mutex::new(params.host_address.clone().err()));
        tokio::spawn(keep_host_side(
            host_side.clone(),
            params.host_address.clone().err(),
            supervisor.status(),
            host_side_error.clone(),
        ));
        Ok(Self {
            host_side,
            host_side_error,
            status: supervisor.status(),
            supervisor: Mutex::new(Some(supervisor)),
            config,
            handover,
            params,
            desired: tx,
            view: Mutex::new(View { remote_nodes: remotes, render_error }),
        })
    }

    /// The node IP (first address of the uplink VPP holds): what this node registers.
    pub fn node_ip(&self) -> Ipv4Addr {
        self.handover.node_ip().expect("checked at start")
    }

    /// The cluster's live nodes changed: tunnels and routes follow. A set that cannot be
    /// rendered is refused as a whole (the previous desired state stays).
    pub fn set_registrations(&self, registrations: &[NodeRegistration]) {
        let remotes = remote_nodes(&self.params.node_name, self.params.pod_subnet, self.node_ip(), registrations);
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        match render_for(&self.config, &self.handover, &self.params, &remotes) {
            Ok(d) => {
                let names = |v: &[RemoteNode]| v.iter().map(|n| n.name.clone()).collect::<BTreeSet<_>>();
                if names(&view.remote_nodes) != names(&remotes) {
                    log::info!("VPP: tunnels to {} remote node(s): {:?}", remotes.len(), names(&remotes));
                }
                // The next pass (a desired change makes one) puts the routes in place.
                self.host_side.lock().unwrap_or_else(|e| e.into_inner()).destinations =
                    crate::vpp_host::destinations(self.params.cluster_pod_cidr, remotes.iter().map(|n| n.pod_subnet));
                view.remote_nodes = remotes;
                view.render_error = None;
                self.desired.send_if_modified(|cur| {
                    let changed = *cur != d;
                    *cur = d;
                    changed
                });
            }
            Err(e) => {
                log::error!("VPP: the cluster's nodes cannot be rendered, keeping the previous state: {e}");
                view.render_error = Some(e.to_string());
            }
        }
    }

    /// Ready when the API connection is up (CNI STATUS): pods can be wired without VPP,
    /// but nothing would leave the node.
    pub fn ready(&self) -> Result<(), String> {
        let s = self.status.borrow();
        if s.connected {
            return Ok(());
        }
        Err(format!(
            "not connected to VPP at {}{}",
            self.config.api_socket.display(),
            s.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        ))
    }

    pub fn report(&self) -> VppReport {
        let s = self.status.borrow().clone();
        let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        VppReport {
            api_socket: self.config.api_socket.display().to_string(),
            connected: s.connected,
            generation: s.generation,
            passes: s.passes,
            last_report: s.last,
            last_error: s.last_error,
            render_error: view.render_error.clone(),
            host_address: self.params.host_address.clone().ok(),
            host_address_error: self.host_side_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            desired: self.desired.borrow().clone(),
        }
    }

    pub fn node_report(&self) -> VppNodeReport {
        let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        VppNodeReport {
            node_ip: self.node_ip(),
            remote_nodes: view
                .remote_nodes
                .iter()
                .map(|n| {
                    let r = RemoteNodeReport {
                        id: n.id,
                        pod_subnet: n.pod_subnet.to_string(),
                        node_ip: n.node_ip,
                        tunnel: vxlan_name(n.id),
                    };
                    (n.name.clone(), r)
                })
                .collect(),
        }
    }

    /// Stops converging VPP. What VPP holds stays (it keeps forwarding while the agent is
    /// away); the next agent converges from what it finds.
    pub fn shutdown(&self) {
        drop(self.supervisor.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// Keeps the host's side of the tap (vpp_host.rs) in place after every change of the
/// supervisor's status (a pass, a reconnect after a VPP restart, which re-creates the tap),
/// until the supervisor stops. `no_address`: why the host has no pod address (reported
/// while everything else is in place).
async fn keep_host_side(
    want: std::sync::Arc<Mutex<crate::vpp_host::HostSide>>,
    no_address: Option<String>,
    mut status: watch::Receiver<VppStatus>,
    error: std::sync::Arc<Mutex<Option<String>>>,
) {
    use crate::vpp_host::{Ensured, ensure};
    let handle = match podnet::node_handle() {
        Ok(h) => h,
        Err(e) => {
            log::error!("VPP: the host's side of the tap cannot be kept: {e}");
            *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            return;
        }
    };
    let sysctl = |rel: &str, value: &str| {
        // The kernel takes the larger of `all` and the interface's: a node that has `all`
        // at it already needs no write (and a manifest without the writable /proc/sys/net
        // mount could not make one on an interface VPP re-creates).
        if rel.ends_with("/arp_announce")
            && let (Some(all), Ok(wanted)) =
                (crate::sysctl::get("net/ipv4/conf/all/arp_announce"), value.parse::<u32>())
            && all.trim().parse::<u32>().is_ok_and(|all| all >= wanted)
        {
            return Ok(());
        }
        crate::sysctl::set(rel, value).map_err(|e| e.to_string())
    };
    loop {
        let want = want.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let outcome = match ensure(&handle, &want, &sysctl).await {
            Ok(Ensured::Changed(what)) => {
                log::info!("VPP: the host's side of the tap: {}", what.join("; "));
                no_address.clone()
            }
            Ok(Ensured::Unchanged) => no_address.clone(),
            // VPP creates it; the next pass comes back here.
            Ok(Ensured::NoInterface) => no_address
                .clone()
                .or_else(|| Some(format!("{} is not there (VPP has not created its tap)", want.ifname))),
            Err(e) => Some(format!("{e:#}")),
        };
        {
            let mut last = error.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = &outcome
                && last.as_ref() != Some(e)
                && Some(e) != no_address.as_ref()
            {
                log::warn!("VPP: the host's side of the tap: {e}");
            }
            *last = outcome;
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

fn render_for(
    config: &VppConfig,
    handover: &UplinkHandover,
    p: &VppNodeParams,
    remotes: &[RemoteNode],
) -> Result<VppDesired, contiv_vpp_backend::RenderError> {
    render(&NodeInputs {
        config,
        // Remote nodes are filtered by name already; no registry ID is ours.
        node_id: u32::MAX,
        pod_subnet: p.pod_subnet,
        gateway: p.gateway,
        gateway_mac: p.gateway_mac,
        slowpath_ifname: &p.slowpath_ifname,
        mtu: p.mtu,
        uplink: handover,
        remote_nodes: remotes,
        cluster_pod_cidr: Some(p.cluster_pod_cidr),
        host_pod_address: p.host_address.clone().ok(),
    })
}

/// Deletes the af_xdp interface VPP holds on a slow-path port that was just re-created (its
/// socket is bound to the old, deleted device). Best effort: a VPP that cannot be reached
/// now holds nothing the supervisor will not replace.
async fn remove_stale_port(config: &VppConfig, slowpath_ifname: &str) {
    let name = af_xdp_name(slowpath_ifname);
    let mut opts = ClientOptions::new(&config.api_socket);
    opts.connect_timeout = Duration::from_secs(2);
    opts.request_timeout = Duration::from_secs(5);
    let Ok(client) = Client::connect(opts).await else { return };
    if let Ok(ifaces) = client.dump(&api::SwInterfaceDump::default()).await
        && let Some(stale) = ifaces.iter().find(|i| i.interface_name == name)
    {
        match client.request(&api::AfXdpDelete { sw_if_index: stale.sw_if_index }).await {
            Ok(_) => log::info!("VPP: removed {name}, bound to the previous slow-path port"),
            Err(e) => log::warn!("VPP: removing the stale {name}: {e}"),
        }
    }
    // Dropped, not closed: VPP frees a registration whose socket closes, and an orderly
    // sockclnt_delete would only make the client log a lost connection.
    drop(client);
}

/// The slow-path port in VPP mode: kept as it is when both ends exist (VPP's af_xdp socket
/// is bound to its vswitch end, and pods' traffic to VPP keeps flowing while the agent
/// restarts); created otherwise. Returns whether it was created anew.
pub async fn ensure_slow_port(node: &rtnetlink::Handle, host: &str, vswitch: &str) -> anyhow::Result<bool> {
    let fresh =
        podnet::link_by_name(node, host).await?.is_none() || podnet::link_by_name(node, vswitch).await?.is_none();
    match fresh {
        true => crate::slowpath::create_port(node, host, vswitch, None).await?,
        false => crate::slowpath::bring_up(node, host, vswitch).await?,
    }
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, id: u32, ip: Option<[u8; 4]>, cidr: &str) -> NodeRegistration {
        NodeRegistration {
            name: name.into(),
            id,
            addresses: vec![],
            pod_cidr: cidr.parse().unwrap(),
            uplink_ip: ip.map(Ipv4Addr::from),
        }
    }

    const OWN_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 11);

    fn own_subnet() -> Ipv4Net {
        "10.1.1.0/24".parse().unwrap()
    }

    #[test]
    fn registrations_become_remote_nodes_without_us_or_stale_records() {
        let regs = [
            reg("n1", 1, Some([192, 168, 100, 11]), "10.1.1.0/24"), // this node
            reg("n3", 3, Some([192, 168, 100, 13]), "10.1.3.0/24"),
            reg("n2", 2, Some([192, 168, 100, 12]), "10.1.2.0/24"),
            reg("n4", 4, None, "10.1.4.0/24"), // no underlay address
            reg("old-n1", 9, Some([192, 168, 100, 11]), "10.1.9.0/24"), // claims our address
            reg("n5", 5, Some([192, 168, 100, 15]), "10.1.1.0/25"), // overlaps our subnet
            reg("n6", 6, Some([192, 168, 100, 16]), "10.1.2.128/25"), // overlaps n2's
        ];
        let nodes = remote_nodes("n1", own_subnet(), OWN_IP, &regs);
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["n2", "n3"]);
        assert_eq!(nodes[0].node_ip, Ipv4Addr::new(192, 168, 100, 12));
        assert_eq!(nodes[0].pod_subnet.to_string(), "10.1.2.0/24");
        assert_eq!(nodes[1].id, 3);
    }

    #[test]
    fn the_bootstrap_runs_unless_it_would_remove_a_previous_agents_state() {
        let cfg = VppConfig::default();
        // Device types as VPP reports them (its device classes' names).
        let fresh = [("local0", "local"), ("uplink0", "dpdk")];
        assert_eq!(bootstrap_plan(&cfg, fresh), BootstrapPlan::Apply, "a VPP that just started");
        let bootstrapped = [("local0", "local"), ("uplink0", "dpdk"), ("tap0", "tap")];
        assert_eq!(bootstrap_plan(&cfg, bootstrapped), BootstrapPlan::Apply, "what a bootstrap left");
        let previous =
            [("uplink0", "dpdk"), ("tap0", "tap"), ("xdp-cslow1", "AF_XDP interface"), ("vxlan_tunnel2", "VXLAN")];
        assert_eq!(
            bootstrap_plan(&cfg, previous),
            BootstrapPlan::Skip { kept: vec!["xdp-cslow1".into(), "vxlan_tunnel2".into()] },
            "an agent restart: VPP keeps serving, the host has its network"
        );
        let no_tap = [("uplink0", "dpdk"), ("xdp-cslow1", "AF_XDP interface")];
        assert_eq!(
            bootstrap_plan(&cfg, no_tap),
            BootstrapPlan::ApplyRemoving { removed: vec!["xdp-cslow1".into()] },
            "no host interconnect: the host cannot reach the store without it"
        );
        // An af_xdp interface VPP knows by its device type, whatever its name.
        let renamed = [("uplink0", "dpdk"), ("port7", "AF_XDP interface")];
        assert_eq!(bootstrap_plan(&cfg, renamed), BootstrapPlan::ApplyRemoving { removed: vec!["port7".into()] });
    }

    fn params() -> VppNodeParams {
        VppNodeParams {
            node_name: "n1".into(),
            pod_subnet: own_subnet(),
            cluster_pod_cidr: "10.1.0.0/16".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 1, 1, 1),
            gateway_mac: [2, 0xfe, 0, 0, 0, 1],
            slowpath_ifname: "cslow1".into(),
            mtu: 1450,
            host_address: Ok(Ipv4Addr::new(10, 1, 1, 254)),
        }
    }

    #[test]
    fn the_desired_state_follows_the_registrations() {
        let cfg = VppConfig::default();
        let handover = UplinkHandover { addresses: vec!["192.168.100.11/24".parse().unwrap()], ..Default::default() };
        let regs = [reg("n2", 2, Some([192, 168, 100, 12]), "10.1.2.0/24")];
        let remotes = remote_nodes("n1", own_subnet(), OWN_IP, &regs);
        let d = render_for(&cfg, &handover, &params(), &remotes).unwrap();
        assert!(d.interfaces.contains_key("xdp-cslow1"), "the af_xdp interface on the slow-path port");
        assert!(d.interfaces.contains_key("vxlan_tunnel2"), "a tunnel per remote node, named by its ID");
        let routes: Vec<String> = d.routes.iter().map(|r| format!("{} {}", r.dst, r.interface)).collect();
        assert!(routes.contains(&"10.1.1.0/24 xdp-cslow1".to_owned()), "{routes:?}");
        assert!(routes.contains(&"10.1.2.0/24 vxlan_tunnel2".to_owned()), "{routes:?}");
        assert_eq!(d.nat.as_ref().unwrap().pool, BTreeSet::from([OWN_IP]), "pods leave with the node IP");
        let uplink_acl = &d.input_acls["uplink0"];
        assert_eq!(
            uplink_acl.rules.first().map(|r| (r.permit, r.src.to_string())),
            Some((false, "10.1.0.0/16".into())),
            "no plain packet from the wire claims to be a pod"
        );
        let alone = render_for(&cfg, &handover, &params(), &[]).unwrap();
        assert!(!alone.interfaces.contains_key("vxlan_tunnel2"), "a node that leaves loses its tunnel");
    }
}
