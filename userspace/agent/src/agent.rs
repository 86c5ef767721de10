//! The node agent's core: the CNI operations (ADD, DEL, CHECK, STATUS, GC) on top of
//! the persistent node state, pod interfaces and the eBPF datapath.
//!
//! Two kinds of locks: one per attachment, held for a whole operation on it (the runtime
//! must not run two at once on one attachment; if it does, they queue), and one for the
//! node state and the datapath, held only for the short steps that change them (address
//! reservation, map entries, the durable record). The slow kernel work (veth creation,
//! pod-side netlink, the tcx attach's RCU grace period, link deletion) runs outside it, so
//! ADDs and DELs of different pods overlap. Every ADD step is undone if a later one fails:
//! no half-wired pod is left behind.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::fd::AsFd,
    path::PathBuf,
    sync::{Arc, Weak},
};

use contiv_cni_api::{codes, v1};
use contiv_common::{OverlayCounters, PodCounters};
use contiv_node_registry::NodeRegistration;
use contiv_vswitch::{BuiltinVswitch, GatewayConfig, PortCounters, VswitchCounters};
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::{
    apply::Applier,
    config::{self, AgentConfig, format_mac, parse_mac},
    datapath::Datapath,
    plan::{NodeParams, OverlayParams, Plan},
    podnet::{self, PodLinkSpec},
    slowpath::SlowPathBackend,
    state::{AttachmentKey, NodeState, PodAttachment},
    tcx,
    timing::phase,
    uplink::{Overlay, Uplink},
};

mod inspect;
mod netconf;
mod services;
pub use inspect::{MonitorTotals, ProgramReport, TraceError, TraceReport};
pub use services::{BackendReport, FrontendReport, ServicesReport};

/// CNI errors go back to the runtime in-band (code per the CNI spec).
pub use contiv_cni_api::CniError;

/// Code 100 for a failure of the agent's own machinery.
fn internal(msg: &str, err: impl std::fmt::Display) -> CniError {
    CniError::internal(msg, err.to_string())
}

/// What the agent holds behind its lock.
struct Inner {
    state: NodeState,
    datapath: Datapath,
    applier: Applier,
    node: rtnetlink::Handle,
    /// The live nodes of the cluster, as the store last said.
    registrations: Vec<NodeRegistration>,
    /// Other nodes' pod subnets, who holds each, and those given to another node since the
    /// last conntrack sweep: the old node's pods' flows go.
    departures: crate::proxy::Departures,
    /// Attachments whose interface disappeared while the agent was down: kept (the address
    /// stays reserved until the runtime's DEL) but out of the datapath.
    gone: std::collections::HashSet<AttachmentKey>,
    /// Attachments whose DEL is under way: out of every plan from its first step on, so a
    /// concurrent ADD or DEL does not put back what the DEL removed (routes to an interface
    /// that is being deleted, map entries of a departing pod).
    leaving: std::collections::HashSet<AttachmentKey>,
    /// Attachments whose ADD attaches its programs now: the egress program they get was
    /// chosen when the ADD began, and is set right when it ends (`sync_pod_egress` leaves
    /// them alone meanwhile).
    attaching: std::collections::HashSet<AttachmentKey>,
    /// Attachments this agent's start failed to give its programs: they run the previous
    /// agent's, on its maps. Retried at each resync; a map migration waits for them.
    not_reattached: std::collections::BTreeSet<AttachmentKey>,
    /// The service proxy's installed state.
    proxy: crate::proxy::Proxy,
    /// healthCheckNodePort servers.
    health: crate::healthcheck::HealthServers,
    /// The hostPort services of the attached pods, as last planned.
    host_ports: crate::hostports::HostPortServices,
    /// Pods get `tc_to_pod` on their egress (a UDP service has a backend answering through
    /// this node's stack): see `sync_pod_egress` in `agent/services.rs`.
    pod_egress: bool,
    /// The node's connected UDP sockets aborted because their backend left the service,
    /// since the agent started.
    udp_sockets_aborted: u64,
    /// SOCK_UDP_BACKEND notes whose socket the last sweep did not find: removed if the
    /// next sweep does not find it either.
    udp_notes_unseen: std::collections::BTreeSet<u64>,
    /// SOCK_COUNTERS' untracked sockets as last logged.
    udp_untracked_logged: u64,
}

/// How long an ADD waits for the cluster model (below contiv-cni's 60 s request timeout).
const MODEL_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Waits up to `wait` for the cluster model to be loaded (`synced` turning true); a CNI
/// "try again later" (code 11) if it is not.
async fn wait_for_model(
    mut synced: tokio::sync::watch::Receiver<bool>,
    wait: std::time::Duration,
) -> Result<(), CniError> {
    match tokio::time::timeout(wait, synced.wait_for(|loaded| *loaded)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(CniError::try_again_later(
            "the cluster model is not loaded yet",
            format!(
                "waited {}s for the store's pods, namespaces and policies: a pod wired now would start without its \
                 NetworkPolicy",
                wait.as_secs()
            ),
        )),
    }
}

/// In the state directory: contiv-ksr's marker was seen in the store (see
/// [`Agent::store_lost_its_data`]).
const KSR_SEEN_FILE: &str = "ksr-synced";
/// Who held each other node's pod subnet, as this agent last saw ([`crate::proxy::Departures`]).
const SUBNET_HOLDERS_FILE: &str = "subnet-holders.json";

/// Saves the subnets' holders; a failure is logged (a subnet that changes hands while the
/// agent is down is then not noticed at its next start).
fn save_holders(d: &crate::proxy::Departures, path: &std::path::Path) {
    if let Err(e) = d.save(path) {
        log::warn!("cannot save the pod subnets' holders to {}: {e}", path.display());
    }
}

/// The vswitch agent.
pub struct Agent {
    config: AgentConfig,
    /// The node's uplink and overlay (kernel uplink mode with an uplink).
    uplink: Option<Uplink>,
    overlay: Option<Overlay>,
    /// MTU of pod interfaces unless a network config overrides it.
    pod_mtu: u32,
    /// Node-wide plan inputs (fixed once the agent runs).
    params: NodeParams,
    inner: Mutex<Inner>,
    /// Who serves the slow-path port: the built-in vswitch or VPP (by `uplink`).
    slowpath: SlowPathBackend,
    /// Restarts of the built-in vswitch that failed in a row since it stopped serving (its
    /// slot is empty: [`Agent::heal_slowpath`] tries again every second).
    slowpath_restarts_failed: std::sync::atomic::AtomicU32,
    /// The cluster model (from the store), once the cluster watch runs: links each
    /// attachment to its Pod object.
    model: std::sync::OnceLock<Arc<std::sync::RwLock<contiv_cluster_watch::ClusterModel>>>,
    /// One lock per attachment with an operation in flight.
    attachment_locks: std::sync::Mutex<HashMap<AttachmentKey, Weak<Mutex<()>>>>,
    /// NetworkPolicy: whether the cluster model was loaded (until then what is installed
    /// stays, and STATUS says not ready so no pod starts unisolated), and what the last
    /// compilation could not represent.
    model_synced: std::sync::atomic::AtomicBool,
    /// The same, for ADDs waiting for it ([`wait_for_model`]).
    model_synced_signal: tokio::sync::watch::Sender<bool>,
    /// contiv-ksr's marker was seen in the store (persisted in the state directory).
    ksr_seen: std::sync::atomic::AtomicBool,
    /// The marker is gone now (logged once per loss).
    ksr_lost: std::sync::atomic::AtomicBool,
    /// The last apply of the node's plan failed somewhere: [`Agent::resync`] soon, not only
    /// at the next periodic one.
    apply_failed: std::sync::atomic::AtomicBool,
    policy_problems: std::sync::Mutex<Vec<String>>,
    /// What changed for the service plan since the service task last looked.
    service_changes: std::sync::Mutex<crate::services::ServiceChanges>,
    /// The proxy's health as its `/healthz` (port 10256) and healthCheckNodePorts report it.
    proxy_health: Arc<crate::proxyhealth::ProxyHealth>,
    /// Network programming latency and sync durations (crate::programming).
    programming: crate::programming::ProgrammingMetrics,
    /// Wakes the service task without a cluster change (a pod with hostPorts came or went).
    services_kick: tokio::sync::Notify,
    /// Services left out whose reason was logged already (logged once).
    skipped_logged: std::sync::Mutex<std::collections::BTreeSet<String>>,
    last_apply: std::sync::Mutex<Option<crate::proxy::ApplyStats>>,
    last_gc: std::sync::Mutex<Option<crate::proxy::GcStats>>,
    /// Conntrack entries the sweeps removed since the agent started.
    ct_expired_total: std::sync::atomic::AtomicU64,
    /// The datapath event stream's clients and counters (`GET /monitor`).
    monitor: Arc<crate::monitor::Monitor>,
    /// Writes RPS settings of pods' host ends (`podRps`); None if unavailable (logged).
    rps: Option<crate::rps::Rps>,
}

/// A pod as `contiv-agent pods` / the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    pub container_id: String,
    pub ifname: String,
    /// The Pod object (from `CNI_ARGS`); empty when the runtime passed none.
    pub pod_namespace: String,
    pub pod_name: String,
    /// The Pod object's labels, when the store has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub pod_mac: String,
    pub counters: Option<CountersReport>,
}

/// Per-pod counters in report form.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CountersReport {
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub slow_packets: u64,
    pub slow_bytes: u64,
    pub from_slow_packets: u64,
    pub drop_spoofed_ip: u64,
    pub drop_spoofed_mac: u64,
    pub drop_malformed: u64,
    pub drop_ttl_exceeded: u64,
    pub drop_no_slowpath: u64,
    /// Dropped by the service stage (no local endpoint under a Local policy, a source
    /// outside loadBalancerSourceRanges, a rewrite the kernel refused).
    pub drop_service: u64,
    pub tunnel_packets: u64,
    pub tunnel_bytes: u64,
    pub host_packets: u64,
    pub host_bytes: u64,
    pub from_tunnel_packets: u64,
    pub from_tunnel_bytes: u64,
    /// New flows into the pod its ingress rules denied.
    pub drop_policy_ingress: u64,
    /// New flows out of the pod its egress rules denied.
    pub drop_policy_egress: u64,
    /// Later fragments from the pod whose first fragment's flow this node did not pass.
    pub drop_fragment: u64,
    /// Packets for an address of the cluster's pod range that no node owns.
    pub drop_no_route: u64,
    /// Tunnel packets of the pod's own: UDP to the overlay's port anywhere but another
    /// pod, IPIP, SIT or GRE to a node's address.
    pub drop_overlay_port: u64,
}

/// What the node enforces (`/policies`), read back from the datapath maps.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    /// Whether the cluster model was loaded (until then the installed state stays as it is).
    pub model_loaded: bool,
    pub pods: Vec<PodPolicyReport>,
    /// What the last compilation could not represent (denied instead).
    pub problems: Vec<String>,
}

/// One pod's NetworkPolicy as its maps hold it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPolicyReport {
    pub pod_namespace: String,
    pub pod_name: String,
    pub ip: Ipv4Addr,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// Longest-prefix entries: a new flow from (ingress) or to (egress) a peer is allowed
    /// what its longest matching prefix lists; no match: denied.
    pub ingress: Vec<PeerAllowance>,
    pub egress: Vec<PeerAllowance>,
}

/// A POLICY entry: peers and what they may use (`any`, `TCP:80`, `UDP:1000-2000`, `none`).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAllowance {
    pub peer: String,
    pub allowed: Vec<String>,
}

/// The slow path's counters in report form.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlowPathReport {
    /// `builtin` or `vpp`.
    pub backend: &'static str,
    pub vswitch: Option<VswitchCounters>,
    pub port: Option<PortCounters>,
    pub programs: Option<SlowPortReport>,
    /// VPP mode: the API connection and the last reconcile pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vpp: Option<crate::vpp::VppReport>,
}

/// The node's wire as `/node` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node_name: String,
    pub pod_subnet: String,
    pub pod_mtu: u32,
    pub uplink: Option<String>,
    pub node_ip: Option<Ipv4Addr>,
    pub overlay: Option<String>,
    /// Other nodes' pod subnets and addresses, and the node each is tunnelled to.
    pub remote_routes: std::collections::BTreeMap<String, Ipv4Addr>,
    pub overlay_counters: Option<OverlayReport>,
    /// `kernel` or `vpp`.
    pub uplink_mode: &'static str,
    /// VPP mode: the node IP VPP holds and the tunnels it keeps to the other nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vpp: Option<crate::vpp::VppNodeReport>,
}

/// The overlay device's program counters.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlayReport {
    pub rx_delivered: u64,
    pub rx_to_host: u64,
    pub rx_spoofed: u64,
    pub rx_no_destination: u64,
    pub rx_malformed: u64,
    pub tx_host_encapsulated: u64,
    pub tx_no_route: u64,
    /// Later fragments whose first fragment's flow this node did not pass.
    pub rx_fragment: u64,
}

impl From<OverlayCounters> for OverlayReport {
    fn from(c: OverlayCounters) -> Self {
        Self {
            rx_delivered: c.rx_delivered,
            rx_to_host: c.rx_to_host,
            rx_spoofed: c.rx_spoofed,
            rx_no_destination: c.rx_no_destination,
            rx_malformed: c.rx_malformed,
            tx_host_encapsulated: c.tx_host_encapsulated,
            tx_no_route: c.tx_no_route,
            rx_fragment: c.rx_fragment,
        }
    }
}

/// Counters of the slow-path port's eBPF programs.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlowPortReport {
    pub to_vswitch_packets: u64,
    pub to_vswitch_no_socket: u64,
    pub from_vswitch_delivered: u64,
    pub from_vswitch_no_pod: u64,
}

impl From<PodCounters> for CountersReport {
    fn from(c: PodCounters) -> Self {
        Self {
            fwd_packets: c.fwd_packets,
            fwd_bytes: c.fwd_bytes,
            slow_packets: c.slow_packets,
            slow_bytes: c.slow_bytes,
            from_slow_packets: c.from_slow_packets,
            drop_spoofed_ip: c.drop_spoofed_ip,
            drop_spoofed_mac: c.drop_spoofed_mac,
            drop_malformed: c.drop_malformed,
            drop_ttl_exceeded: c.drop_ttl_exceeded,
            drop_no_slowpath: c.drop_no_slowpath,
            drop_service: c.drop_service,
            tunnel_packets: c.tunnel_packets,
            tunnel_bytes: c.tunnel_bytes,
            host_packets: c.host_packets,
            host_bytes: c.host_bytes,
            from_tunnel_packets: c.from_tunnel_packets,
            from_tunnel_bytes: c.from_tunnel_bytes,
            drop_policy_ingress: c.drop_policy_ingress,
            drop_policy_egress: c.drop_policy_egress,
            drop_fragment: c.drop_fragment,
            drop_no_route: c.drop_no_route,
            drop_overlay_port: c.drop_overlay_port,
        }
    }
}

impl Agent {
    /// Loads state and datapath, wires the slow-path port and the overlay, brings the
    /// dataplane in line with the pods that survived a restart and starts the vswitch.
    /// `registrations`: the cluster's live nodes as the store has them at start.
    pub async fn start(config: AgentConfig, registrations: Vec<NodeRegistration>) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let mut state =
            NodeState::open(&config.state_dir, config.pod_subnet, config.gateway).context("opening the node state")?;
        let node = podnet::node_handle().context("opening netlink")?;
        let vpp_mode = config.uplink == config::Uplink::Vpp;
        // VPP mode: VPP holds the NIC; the node IP and MTU are those of the uplink it takes over.
        let handover = match vpp_mode {
            true => Some(crate::vpp::uplink_handover(&config.vpp, crate::vpp::HANDOVER_WAIT).await?),
            false => None,
        };
        let uplink = match vpp_mode {
            true => None,
            false => crate::uplink::find(&node, &config).await.context("finding the uplink")?,
        };
        let pod_mtu = match &handover {
            Some(h) => config.pod_mtu(Some(h.mtu.unwrap_or(1500))),
            None => config.pod_mtu(uplink.as_ref().map(|u| u.mtu)),
        };
        let mut datapath = Datapath::load_with(
            &config.bpf_pin_dir,
            config.allow_private_bpffs,
            crate::datapath::MapSizes {
                conntrack: Some(config.services.conntrack_entries),
                fragments: Some(config.services.fragment_entries),
                udp_sockets: Some(config.services.connected_udp_sockets),
            },
        )
        .context("loading the eBPF datapath")?;
        // The node's own namespace: its sockets are the ones the service programs translate
        // (with its pods'), and no other node's in the same machine.
        let netns_cookie = podnet::own_netns_cookie().unwrap_or_else(|e| {
            log::warn!("the node namespace's cookie is unknown ({e}): host sockets are not load-balanced");
            0
        });

        let slow_host = config.slowpath_host_ifname.clone();
        let slow_vsw = config.slowpath_vswitch_ifname.clone();
        // VPP mode: the port outlives the agent (VPP's socket is bound to it), its programs are pinned.
        let fresh_vpp_port = match vpp_mode {
            true => {
                let fresh = crate::vpp::ensure_slow_port(&node, &slow_host, &slow_vsw).await?;
                datapath.attach_vpp_port(&slow_host, &slow_vsw, fresh).context("attaching the slow-path programs")?;
                fresh
            }
            false => false,
        };
        // Kernel mode: recreate it so its programs and the socket start clean, at the index
        // the pods' programs redirect slow-path frames to (the previous agent's CONFIG):
        // under a new one they would go to an interface that is gone until this agent's
        // first apply rewrites CONFIG (no resets for dead backends, no refusals meanwhile).
        if !vpp_mode {
            datapath.forget_vpp_port(&slow_host, &slow_vsw);
            let previous = datapath.config().ok().flatten().map(|c| c.slowport_ifindex).filter(|i| *i != 0);
            let at_previous = match previous {
                Some(index) => crate::slowpath::create_port(&node, &slow_host, &slow_vsw, Some(index))
                    .await
                    .inspect_err(|e| log::warn!("re-creating the slow-path port at index {index}: {e:#}; at another"))
                    .is_ok(),
                None => false,
            };
            if !at_previous {
                crate::slowpath::create_port(&node, &slow_host, &slow_vsw, None).await?;
            }
            datapath.attach_slow_port(&slow_host, &slow_vsw).context("attaching the slow-path programs")?;
        }
        let slow_host_index =
            podnet::link_by_name(&node, &slow_host).await?.context("slow-path port vanished")?.header.index;

        // The wire: the node routes pod traffic, and other nodes' pods are behind the overlay.
        let overlay = match &uplink {
            None if vpp_mode => None,
            Some(u) => {
                crate::uplink::enable_forwarding()?;
                let o = crate::uplink::ensure_overlay(&node, &config.overlay, u).await.context("the overlay device")?;
                log::info!(
                    "uplink {} ({}), node address {}, overlay {} (VNI {}, UDP {}, MTU {}), pod MTU {pod_mtu}",
                    u.ifname,
                    u.mtu,
                    u.node_ip,
                    o.ifname,
                    config.overlay.vni,
                    config.overlay.port,
                    o.mtu
                );
                if pod_mtu > o.mtu {
                    log::warn!(
                        "the pod MTU ({pod_mtu}, the file's mtu) is above the overlay's ({}): pods' full-size \
                         packets to other nodes need fragmenting or are refused; leave mtu unset to follow the uplink",
                        o.mtu
                    );
                }
                Some(o)
            }
            // With a cluster store this node may have peers it now cannot reach (nor they
            // its pods): said loudly, but not refused (a node of its own may use etcd too).
            None if !config.etcd_endpoints.is_empty() => {
                log::error!(
                    "no uplink (no default route and no uplinkInterface): running as a single node, without \
                     an overlay; if this node has peers, set uplinkInterface"
                );
                None
            }
            None => {
                log::info!("no uplink (no default route and no uplinkInterface): a single node, no overlay");
                None
            }
        };
        // VPP mode: the source of the host's traffic to other nodes' pods (vpp_host.rs).
        let host_address = match vpp_mode {
            true => Some(state.host_address().map_err(|e| {
                let e = format!("no address of the pod subnet for the host: {e}; it reaches only this node's pods");
                log::error!("{e}");
                e
            })),
            false => {
                // A node that left VPP mode gives the address back to its pods.
                if let Err(e) = state.forget_host_address() {
                    log::warn!("giving the host's pod address back to the pods: {e}");
                }
                None
            }
        };
        // Checked when the configuration was read.
        let node_ports = config.services.node_ports().unwrap_or_default();
        let params = NodeParams {
            host_pod_address: host_address.clone().and_then(Result::ok),
            node_name: config.node_name.clone(),
            gateway_ip: config.gateway,
            gateway_mac: config.gateway_mac,
            pod_subnet: config.pod_subnet,
            cluster_pod_cidr: config.pod_subnet_cidr,
            slowport_ifindex: slow_host_index,
            overlay: match (&uplink, &overlay) {
                (Some(u), Some(o)) => Some(OverlayParams {
                    ifindex: o.ifindex,
                    vni: config.overlay.vni,
                    node_ip: u.node_ip,
                    mtu: o.mtu,
                    port: config.overlay.port,
                    device_encap: config.overlay.datapath_encap_port().is_none(),
                }),
                _ => None,
            },
            masquerade_uplink: uplink.as_ref().filter(|_| config.masquerade).map(|u| u.ifname.clone()),
            vpp_uplink: vpp_mode,
            uplink_ifindex: uplink.as_ref().map_or(0, |u| u.ifindex),
            netns_cookie,
            monitor: config.monitor,
            loopback_node_ports: node_ports.takes_loopback(),
            udp_timeout_s: config.services.timeouts.udp,
        };
        let cluster_pod_cidr = params.cluster_pod_cidr;
        let service_params = crate::services::ServiceParams {
            node_name: config.node_name.clone(),
            proxy_name: config.services.proxy_name.clone(),
            node_ips: params.overlay.as_ref().map(|o| o.node_ip).into_iter().collect(),
            node_ports,
        };

        let slowpath = match handover {
            Some(handover) => {
                let params = crate::vpp::VppNodeParams {
                    node_name: config.node_name.clone(),
                    pod_subnet: config.pod_subnet,
                    cluster_pod_cidr: config.pod_subnet_cidr,
                    gateway: config.gateway,
                    gateway_mac: config.gateway_mac,
                    slowpath_ifname: slow_vsw.clone(),
                    mtu: pod_mtu,
                    host_address: host_address.clone().expect("VPP mode"),
                };
                let vpp =
                    crate::vpp::VppNode::start(config.vpp.clone(), handover, params, &registrations, fresh_vpp_port)
                        .await
                        .context("rendering what VPP must hold")?;
                SlowPathBackend::Vpp(Box::new(vpp))
            }
            None => {
                let gateway = GatewayConfig {
                    ip: config.gateway,
                    mac: config.gateway_mac,
                    path_mtu: overlay.as_ref().map(|o| o.mtu as u16),
                };
                let port = contiv_vswitch::spawn(&slow_vsw, 0, BuiltinVswitch::new(gateway))
                    .context("opening the AF_XDP socket of the slow-path port")?;
                datapath.register_xsk(0, std::os::fd::AsFd::as_fd(&port)).context("registering the AF_XDP socket")?;
                SlowPathBackend::Builtin(std::sync::Mutex::new(Some(port)))
            }
        };

        let applier = Applier::new(node.clone());
        let monitor = crate::monitor::Monitor::new(config.monitor);
        // The writer also runs with podRps off: the restart below turns RPS off on pods an
        // earlier configuration turned it on for.
        let rps = match crate::rps::Rps::start() {
            Ok(rps) => {
                if config.pod_rps {
                    log::info!("RPS on pod host ends over CPUs {}", rps.mask());
                }
                Some(rps)
            }
            Err(e) if config.pod_rps => {
                log::warn!("podRps is on but RPS cannot be set (same-node TCP may see reordering): {e}");
                None
            }
            Err(e) => {
                log::debug!("no RPS writer: {e}");
                None
            }
        };
        let proxy_health = Arc::new(crate::proxyhealth::ProxyHealth::new(std::time::Duration::from_secs(
            config.services.healthz_timeout.into(),
        )));
        let ksr_seen = config.state_dir.join(KSR_SEEN_FILE).exists();
        // A subnet another node holds now than when this agent last ran.
        let departures = {
            let path = config.state_dir.join(SUBNET_HOLDERS_FILE);
            let mut d = crate::proxy::Departures::load(&path);
            if d.update(&registrations, &params.node_name, crate::proxy::monotonic_ns()) {
                save_holders(&d, &path);
            }
            for (net, _) in d.list() {
                log::info!("pod subnet {net} changed hands while this agent was down: its old flows go");
            }
            d
        };
        let agent = Arc::new(Self {
            config,
            uplink,
            overlay,
            pod_mtu,
            params,
            inner: Mutex::new(Inner {
                state,
                datapath,
                applier,
                node,
                departures,
                registrations,
                gone: Default::default(),
                leaving: Default::default(),
                attaching: Default::default(),
                not_reattached: Default::default(),
                proxy: crate::proxy::Proxy::new(service_params, cluster_pod_cidr),
                health: crate::healthcheck::HealthServers::new(proxy_health.clone()),
                host_ports: Default::default(),
                pod_egress: false,
                udp_sockets_aborted: 0,
                udp_notes_unseen: Default::default(),
                udp_untracked_logged: 0,
            }),
            slowpath,
            slowpath_restarts_failed: Default::default(),
            model: std::sync::OnceLock::new(),
            attachment_locks: std::sync::Mutex::new(HashMap::new()),
            model_synced: std::sync::atomic::AtomicBool::new(false),
            model_synced_signal: tokio::sync::watch::Sender::new(false),
            apply_failed: std::sync::atomic::AtomicBool::new(false),
            ksr_seen: std::sync::atomic::AtomicBool::new(ksr_seen),
            ksr_lost: std::sync::atomic::AtomicBool::new(false),
            policy_problems: std::sync::Mutex::new(vec![]),
            service_changes: std::sync::Mutex::new(crate::services::ServiceChanges::everything()),
            proxy_health,
            programming: crate::programming::ProgrammingMetrics::new(std::time::SystemTime::now()),
            services_kick: tokio::sync::Notify::new(),
            skipped_logged: Default::default(),
            last_apply: Default::default(),
            last_gc: Default::default(),
            ct_expired_total: Default::default(),
            monitor,
            rps,
        });
        agent.reconcile().await.context("bringing the dataplane in line with the node's pods")?;
        {
            let mut inner = agent.inner.lock().await;
            agent.setup_services(&mut inner).context("setting up services")?;
            // Every program is this agent's now (pods, overlay, slow path, uplink, sockets):
            // maps of an older layout are retired, unless a pod still runs the old programs.
            Self::finish_migration_if_reattached(&mut inner);
        }
        Ok(agent)
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The service proxy's health (`/healthz` on port 10256).
    pub fn proxy_health(&self) -> &Arc<crate::proxyhealth::ProxyHealth> {
        &self.proxy_health
    }

    /// The service proxy's programming metrics.
    pub fn programming(&self) -> &crate::programming::ProgrammingMetrics {
        &self.programming
    }

    /// Hands the agent the cluster model the watch keeps (once).
    pub fn set_model(&self, model: Arc<std::sync::RwLock<contiv_cluster_watch::ClusterModel>>) {
        let _ = self.model.set(model);
    }

    /// The labels of an attachment's Pod object, if the store has it.
    fn pod_labels(&self, a: &PodAttachment) -> Option<std::collections::BTreeMap<String, String>> {
        if a.pod_name.is_empty() {
            return None;
        }
        let model = self.model.get()?.read().ok()?;
        let key = contiv_cluster_model::keys::ObjectRef::namespaced(
            contiv_cluster_model::keys::Kind::Pod,
            &a.pod_namespace,
            &a.pod_name,
        )
        .key();
        match model.get(&key)? {
            contiv_cluster_watch::Object::K8s(contiv_cluster_model::ClusterObject::Pod(p)) => Some(p.labels.clone()),
            _ => None,
        }
    }

    /// The node's underlay address (kernel uplink mode with an uplink; VPP mode: the
    /// address VPP holds on the NIC).
    pub fn node_ip(&self) -> Option<Ipv4Addr> {
        self.uplink.as_ref().map(|u| u.node_ip).or_else(|| self.slowpath.vpp().map(|v| v.node_ip()))
    }

    /// The node IP the agent found on its uplink and started with, if it has left the
    /// uplink (the agent must restart to take the new one: tunnel source, route sources and
    /// its registration all carry it). None while it is there, when `nodeIP` fixes it, and
    /// without an uplink.
    pub async fn node_ip_lost(&self) -> Option<String> {
        let uplink = self.uplink.as_ref().filter(|_| self.config.node_ip.is_none())?;
        let node = self.inner.lock().await.node.clone();
        match crate::uplink::holds_node_ip(&node, uplink).await {
            Ok(true) | Err(_) => None,
            Ok(false) => Some(format!("{} no longer holds the node IP {}", uplink.ifname, uplink.node_ip)),
        }
    }

    /// MTU pods get unless their network config says otherwise.
    pub fn pod_mtu(&self) -> u32 {
        self.pod_mtu
    }

    /// The plan for what the agent holds now; `leaving`: an attachment being removed.
    fn plan(&self, inner: &Inner) -> Plan {
        let attachments: Vec<&PodAttachment> = inner
            .state
            .attachments()
            .filter(|a| {
                let key = a.key();
                !inner.gone.contains(&key) && !inner.leaving.contains(&key)
            })
            .collect();
        let mut plan = crate::plan::plan(&self.params, attachments.iter().copied(), &inner.registrations);
        if let Some(compiled) = self.compile_policy(&attachments, &inner.registrations) {
            crate::plan::add_policy(&mut plan, compiled);
        }
        plan
    }

    /// NetworkPolicy for this node's pods, from the cluster model; `None` until the model
    /// was loaded.
    fn compile_policy(
        &self,
        attachments: &[&PodAttachment],
        registrations: &[NodeRegistration],
    ) -> Option<crate::policy::CompiledPolicy> {
        if !self.model_synced.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let model = self.model.get()?.read().ok()?;
        if self.store_lost_its_data(&model) {
            return None;
        }
        let local: Vec<crate::policy::LocalPod> = attachments
            .iter()
            .filter(|a| a.complete && a.host_ifindex != 0)
            .map(|a| crate::policy::LocalPod { ip: a.ip, namespace: &a.pod_namespace, name: &a.pod_name })
            .collect();
        let mut node_addresses = vec![self.params.gateway_ip];
        node_addresses.extend(self.params.host_pod_address);
        node_addresses.extend(self.params.overlay.as_ref().map(|o| o.node_ip));
        for r in registrations.iter().filter(|r| r.name == self.params.node_name) {
            node_addresses.extend(r.addresses.iter().filter_map(|a| a.address.parse::<Ipv4Addr>().ok()));
            node_addresses.extend(r.uplink_ip);
        }
        let inputs = crate::policy::inputs(model.pods(), model.namespaces(), model.policies(), &local, node_addresses);
        let compiled = crate::policy::compile(&inputs);
        if let Ok(mut last) = self.policy_problems.lock()
            && *last != compiled.problems
        {
            for p in &compiled.problems {
                log::error!("network policy: {p}");
            }
            *last = compiled.problems.clone();
        }
        Some(compiled)
    }

    /// The cluster model was (re)loaded: policy is known from now on.
    /// Whether the cluster model was listed once (its first resync).
    pub fn model_listed(&self) -> bool {
        self.model_synced.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn mark_model_synced(&self) {
        self.model_synced.store(true, std::sync::atomic::Ordering::Release);
        self.model_synced_signal.send_replace(true);
    }

    /// Pods, namespaces or policies changed: the dataplane follows (NetworkPolicy).
    pub async fn apply_model(&self) {
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        let plan = self.plan(inner);
        let applied = inner.applier.apply(&mut inner.datapath, &plan).await;
        if let Err(e) = self.applied(applied) {
            log::error!("applying cluster changes: {e}");
        }
    }

    /// Whether the model must not be taken for the cluster: contiv-ksr's marker was seen
    /// in the store (by this node, in any life) and is gone, so the store lost its data
    /// (wiped, restored from an old backup) until KSR fills it again. NetworkPolicy and
    /// services stay as installed meanwhile: the empty model would open every isolated pod
    /// and drop every service. A store KSR never filled (netctl alone) is taken as it is.
    pub(crate) fn store_lost_its_data(&self, model: &contiv_cluster_watch::ClusterModel) -> bool {
        use std::sync::atomic::Ordering;
        if model.ksr_marker() {
            if !self.ksr_seen.swap(true, Ordering::AcqRel)
                && let Err(e) = std::fs::write(self.config.state_dir.join(KSR_SEEN_FILE), b"")
            {
                log::warn!("recording that contiv-ksr synced the store: {e}");
            }
            if self.ksr_lost.swap(false, Ordering::AcqRel) {
                log::info!("contiv-ksr's marker is back: NetworkPolicy and services follow the store again");
            }
            return false;
        }
        if !self.ksr_seen.load(Ordering::Acquire) {
            return false;
        }
        if !self.ksr_lost.swap(true, Ordering::AcqRel) {
            log::error!(
                "contiv-ksr's marker {} is gone from the store: it lost its data (wiped, or restored from an old \
                 backup); NetworkPolicy and services stay as installed until contiv-ksr fills it again",
                contiv_cluster_model::keys::KSR_MARKER
            );
        }
        true
    }

    /// Notes whether an apply of the node's plan failed (a resync follows soon if so).
    fn applied(&self, r: Result<(), crate::apply::ApplyError>) -> Result<(), crate::apply::ApplyError> {
        self.apply_failed.store(r.is_err(), std::sync::atomic::Ordering::Release);
        r
    }

    /// Whether the last apply of the node's plan failed somewhere.
    pub fn apply_failed(&self) -> bool {
        self.apply_failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Brings maps, routes and programs in line with the persisted attachments after a
    /// restart (or an upgrade): pods whose ADD never finished are unwired; the plan is
    /// resynced against what the kernel holds (nothing right is touched); then every pod
    /// gets this agent's program, replaced make-before-break; then maps of an older layout
    /// are retired.
    async fn reconcile(&self) -> anyhow::Result<()> {
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        let attachments: Vec<PodAttachment> = inner.state.attachments().cloned().collect();
        let mut live = vec![];
        for a in attachments {
            if !a.complete {
                log::warn!("{}/{}: ADD did not finish before a restart; unwiring", a.container_id, a.ifname);
                let _ = podnet::delete_link(&inner.node, &a.host_ifname).await;
                inner.datapath.forget_pod_link(&a.host_ifname);
                let _ = inner.state.remove(&a.key());
                continue;
            }
            match podnet::link_by_name(&inner.node, &a.host_ifname).await {
                Ok(Some(link)) if link.header.index == a.host_ifindex => {
                    // Pods wired under another podRps setting follow this one.
                    self.steer_flows(&a.host_ifname).await;
                    live.push(a)
                }
                Ok(_) => {
                    // The interface went away while we were down (pod namespace deleted):
                    // keep the address reserved until the runtime's DEL, out of the datapath.
                    log::warn!("{}/{}: interface {} is gone", a.container_id, a.ifname, a.host_ifname);
                    inner.datapath.forget_pod_link(&a.host_ifname);
                    inner.gone.insert(a.key());
                }
                Err(e) => {
                    // Kept as live: its re-attach tells (a failed one is retried at each
                    // resync, and holds back a map-layout swap). Left out of every list,
                    // its old programs could outlive the maps they use.
                    log::error!("{}: looking it up: {e}; kept, its re-attach will tell", a.host_ifname);
                    live.push(a)
                }
            }
        }
        // An ADD cut short by a crash left an interface and a pinned link that no recorded
        // attachment names (its address was never handed out: the record precedes the reply).
        let names: std::collections::HashSet<String> =
            inner.state.attachments().map(|a| a.host_ifname.clone()).collect();
        match podnet::host_ends(&inner.node).await {
            Ok(found) => {
                for name in found.into_iter().filter(|n| !names.contains(n)) {
                    log::warn!("removing {name}: left by an ADD that did not finish");
                    if let Err(e) = podnet::delete_link(&inner.node, &name).await {
                        log::error!("{name}: {e}");
                    }
                }
            }
            Err(e) => log::error!("listing pod interfaces: {e}"),
        }
        if let Ok(pins) = std::fs::read_dir(inner.datapath.pin_dir().join("links")) {
            for pin in pins.flatten() {
                let pin = pin.file_name().to_string_lossy().into_owned();
                let name = pin.strip_suffix(crate::datapath::POD_EGRESS_PIN_SUFFIX).unwrap_or(&pin).to_owned();
                if podnet::is_host_ifname(&name) && !names.contains(&name) {
                    inner.datapath.forget_pod_link(&name);
                }
            }
        }
        // Map entries, routes and rules: resynced against what the kernel holds (entries
        // nobody owns go, entries that are right stay untouched).
        let plan = self.plan(inner);
        inner.applier.resync(&mut inner.datapath, &plan).await?;
        if let Some(o) = &self.overlay {
            inner.datapath.attach_overlay(&o.ifname)?;
        }
        // Pods keep the egress program a previous agent gave them until the first service
        // apply says whether it is still needed.
        inner.pod_egress = live.iter().any(|a| inner.datapath.pod_has_egress(&a.host_ifname));
        for a in &live {
            if let Err(e) = inner.datapath.attach_pod(&a.host_ifname, inner.pod_egress) {
                log::error!("{}/{}: re-attaching the datapath: {e}", a.container_id, a.ifname);
                inner.not_reattached.insert(a.key());
            }
        }
        log::info!("reconciled {} pod attachment(s)", inner.state.len());
        Ok(())
    }

    /// The cluster's live nodes changed: routes to other nodes' pods follow.
    pub async fn set_registrations(&self, registrations: Vec<NodeRegistration>) {
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        if let Some(vpp) = self.slowpath.vpp() {
            vpp.set_registrations(&registrations);
        }
        if inner.departures.update(&registrations, &self.params.node_name, crate::proxy::monotonic_ns()) {
            save_holders(&inner.departures, &self.config.state_dir.join(SUBNET_HOLDERS_FILE));
        }
        inner.registrations = registrations;
        let plan = self.plan(inner);
        let before = inner.applier.installed().remote_routes.len();
        let applied = inner.applier.apply(&mut inner.datapath, &plan).await;
        match self.applied(applied) {
            Ok(()) => {
                let after = inner.applier.installed().remote_routes.len();
                if before != after {
                    log::info!("overlay routes: {} remote prefixes (was {before})", after);
                }
            }
            Err(e) => log::error!("applying the cluster's nodes: {e}"),
        }
    }

    /// Retires the maps of an older layout or size once every pod runs this agent's
    /// programs: a pod still on the old programs keeps using the old maps, which the pins
    /// must keep naming until then (the new ones stay pinned aside meanwhile).
    fn finish_migration_if_reattached(inner: &mut Inner) {
        if inner.datapath.migration_pending() && !inner.not_reattached.is_empty() {
            log::warn!(
                "{} pod(s) still run the previous agent's programs: the maps of the previous layout stay in use",
                inner.not_reattached.len()
            );
            return;
        }
        if let Err(e) = inner.datapath.finish_migration() {
            log::error!("retiring the maps of the previous layout: {e}");
        }
    }

    /// Attaches this agent's programs to the pods a restart failed to re-attach (those
    /// still there), then finishes a map migration that waited for them.
    async fn retry_reattach(inner: &mut Inner) {
        let keys: Vec<AttachmentKey> = inner.not_reattached.iter().cloned().collect();
        for key in keys {
            // Gone, on its way out, or its interface vanished (its DEL is coming): nothing
            // of it runs the old programs any more.
            let a =
                inner.state.get(&key).cloned().filter(|_| !inner.gone.contains(&key) && !inner.leaving.contains(&key));
            let vanished = match &a {
                Some(a) => matches!(podnet::link_by_name(&inner.node, &a.host_ifname).await, Ok(None)),
                None => true,
            };
            let Some(a) = a.filter(|_| !vanished) else {
                inner.not_reattached.remove(&key);
                continue;
            };
            match inner.datapath.attach_pod(&a.host_ifname, inner.pod_egress) {
                Ok(()) => {
                    log::info!("{}/{}: re-attached the datapath", a.container_id, a.ifname);
                    inner.not_reattached.remove(&key);
                }
                Err(e) => log::error!("{}/{}: re-attaching the datapath: {e}", a.container_id, a.ifname),
            }
        }
        if inner.datapath.migration_pending() {
            Self::finish_migration_if_reattached(inner);
        }
    }

    /// Re-reads what the kernel holds and converges it (every `resyncSeconds`, and soon
    /// after an apply failed): repairs what someone else changed.
    pub async fn resync(&self) {
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        Self::retry_reattach(inner).await;
        let plan = self.plan(inner);
        let synced = inner.applier.resync(&mut inner.datapath, &plan).await;
        if let Err(e) = self.applied(synced) {
            log::error!("dataplane resync: {e}");
        }
    }

    /// The lock of one attachment (created on first use, dropped with its last holder).
    async fn lock_attachment(&self, key: &AttachmentKey) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.attachment_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.retain(|_, l| l.strong_count() > 0);
            match locks.get(key).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(Mutex::new(()));
                    locks.insert(key.clone(), Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }

    /// CNI ADD.
    pub async fn add(&self, req: &v1::CniRequest) -> Result<v1::AddReply, CniError> {
        // A pod wired before the cluster model is loaded would start without its
        // NetworkPolicy (isolation is computed from the model): runtimes speaking CNI 1.0
        // never ask STATUS, so ADD itself waits for the model, and then says try again.
        // The attachment's lock first: a runtime that gives up during the wait and sends DEL
        // gets it after this ADD, which it then undoes (taken after the wait, the DEL found
        // no record, and the ADD went on to wire a pod nobody would delete).
        let key = AttachmentKey::new(&req.container_id, &req.ifname);
        let _attachment_lock = self.lock_attachment(&key).instrument(phase("attachment_lock")).await;
        self.finish_pending_del_of(&key).await?;
        wait_for_model(self.model_synced_signal.subscribe(), MODEL_WAIT).instrument(phase("model")).await?;
        let netns = podnet::runtime_netns_path(&req.netns, self.config.host_proc_dir.as_deref());
        if !netns.exists() {
            return Err(CniError::new(
                codes::INVALID_ENV,
                "CNI_NETNS does not exist",
                format!("CNI_NETNS={}", req.netns),
            ));
        }
        let (mtu, dns, bandwidth) =
            netconf::overrides(&req.network_config, self.pod_mtu, self.config.max_pod_mtu(), &self.config.dns)?;
        let host_ifname = podnet::host_ifname(&req.container_id, &req.ifname);
        // Reserve an address (in memory; see crate::state) and take what the unlocked steps need.
        let (ip, node, targets) = {
            let mut inner = self.inner.lock().instrument(phase("lock")).await;
            // "If an interface of the requested name already exists in the container, the
            // CNI plugin MUST return with an error" (CNI spec, ADD): also for a repeated ADD,
            // which leaves the attachment as it is (a DEL undoes it).
            if let Some(existing) = inner.state.get(&key) {
                return Err(CniError::new(
                    codes::ATTACHMENT_EXISTS,
                    "attachment already exists",
                    format!(
                        "{}/{} is attached to {} with {}; DEL it first",
                        req.container_id, req.ifname, existing.netns, existing.ip
                    ),
                ));
            }
            let _reserve = phase("ipam_reserve").entered();
            let targets = inner
                .datapath
                .pod_attach_targets(&host_ifname, inner.pod_egress)
                .map_err(|e| internal("preparing the datapath attach", e))?;
            let ip = inner.state.reserve(&key).map_err(|e| {
                CniError::new(
                    codes::IPAM_EXHAUSTED,
                    "no free pod address",
                    format!("{e}: DEL or GC of a pod frees one"),
                )
            })?;
            inner.attaching.insert(key.clone());
            (ip, inner.node.clone(), targets)
        };
        let (pod_namespace, pod_name) = crate::state::pod_identity(&req.args);
        let attachment = PodAttachment {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns: req.netns.clone(),
            network_name: req.network_name.clone(),
            ip,
            host_ifname: host_ifname.clone(),
            host_ifindex: 0,
            host_mac: String::new(),
            pod_mac: String::new(),
            complete: true,
            mtu,
            dns,
            pod_namespace,
            pod_name,
            bandwidth,
            netns_cookie: 0,
        };
        let spec = PodLinkSpec {
            netns,
            ifname: req.ifname.clone(),
            host_ifname: host_ifname.clone(),
            ip,
            gateway: self.config.gateway,
            gateway_mac: self.config.gateway_mac,
            mtu,
            egress_shaper: bandwidth.and_then(|b| b.egress_shaper(mtu)),
            ingress_shaper: bandwidth.and_then(|b| b.ingress_shaper(mtu)),
        };
        match self.wire(&node, &spec, attachment, targets).await {
            Ok(attachment) => {
                log::info!("ADD {}/{} -> {ip} on {host_ifname}", req.container_id, req.ifname);
                self.host_ports_may_change(&attachment);
                Ok(phase("reply").in_scope(|| self.add_reply(&attachment)))
            }
            Err(e) => {
                log::warn!("ADD {}/{} failed: {} ({})", req.container_id, req.ifname, e.msg, e.details);
                Err(e)
            }
        }
    }

    /// Builds the pod's interfaces and datapath and records the attachment. Any failure
    /// undoes everything, including the address reservation.
    ///
    /// The tcx attach is the slow step: the kernel waits for an RCU grace period holding
    /// RTNL, so it goes last among the netlink work (anything needing RTNL would wait for
    /// it anyway) and overlaps only the map update and the fsync.
    async fn wire(
        &self,
        node: &rtnetlink::Handle,
        spec: &PodLinkSpec,
        mut attachment: PodAttachment,
        targets: crate::datapath::PodAttachTargets,
    ) -> Result<PodAttachment, CniError> {
        let pins: Vec<PathBuf> = targets.iter().map(|(_, _, pin)| pin.clone()).collect();
        let key = attachment.key();
        let veth = match podnet::create_veth(node, spec).await {
            Ok(v) => v,
            Err(e) => {
                let mut inner = self.inner.lock().await;
                inner.state.release(&key);
                inner.attaching.remove(&key);
                return Err(internal("wiring the pod interface", e));
            }
        };
        attachment.host_ifindex = veth.host_ifindex;
        attachment.host_mac = format_mac(&veth.host_mac);
        if self.config.pod_rps {
            self.steer_flows(&spec.host_ifname).instrument(phase("rps")).await;
        }
        attachment.netns_cookie = veth.netns_cookie;
        let configured = podnet::configure_pod_side(&veth, spec).instrument(phase("pod_side_config")).await;
        drop(veth);
        let (recorded, attached) = match configured {
            Err(e @ podnet::PodNetError::NotFirstNetwork(_)) => {
                (Err(CniError::internal("contiv-cni must be the pod's first network", e.to_string())), Ok(()))
            }
            Err(e) => (Err(internal("configuring the pod interface", e)), Ok(())),
            Ok(pod_mac) => {
                attachment.pod_mac = format_mac(&pod_mac);
                // The attach runs on a blocking thread while the maps are written and the
                // attachment is persisted (no RTNL needed there). Persisting first is safe:
                // a restarted agent attaches the program of every recorded pod.
                let attach = {
                    let (span, ifindex) = (phase("bpf_attach_pin"), attachment.host_ifindex);
                    tokio::task::spawn_blocking(move || {
                        span.in_scope(|| {
                            targets.iter().try_for_each(|(prog, egress, pin)| {
                                tcx::attach_pinned(prog.as_fd(), ifindex, *egress, pin)
                            })
                        })
                    })
                };
                let recorded = self.record(&attachment).await;
                let attached = match attach.await {
                    Ok(r) => r.map_err(|e| internal("attaching the pod program", e)),
                    Err(e) => Err(internal("attaching the pod program", e)),
                };
                (recorded, attached)
            }
        };
        let Err(e) = recorded.and(attached) else {
            // The services task may have turned the pods' egress program on or off since
            // the ADD chose its programs.
            let mut inner = self.inner.lock().await;
            inner.attaching.remove(&key);
            let want = inner.pod_egress;
            if inner.datapath.pod_has_egress(&spec.host_ifname) != want
                && let Err(e) = inner.datapath.set_pod_egress(&spec.host_ifname, want)
            {
                log::error!("{}: {} tc_to_pod: {e}", spec.host_ifname, if want { "attaching" } else { "detaching" });
            }
            return Ok(attachment);
        };
        // Undo: the interface (its deletion detaches the program and removes the pod end),
        // the pin, the map entries, the record or reservation.
        if let Err(err) = podnet::delete_link(node, &spec.host_ifname).await {
            log::error!("removing {} after a failed ADD: {err}", spec.host_ifname);
        }
        for pin in &pins {
            let _ = std::fs::remove_file(pin);
        }
        let mut guard = self.inner.lock().await;
        let inner = &mut *guard;
        inner.attaching.remove(&key);
        inner.state.release(&key);
        if inner.state.get(&key).is_some()
            && let Err(err) = inner.state.remove(&key)
        {
            log::error!("releasing {} after a failed ADD: {err}", attachment.ip);
        }
        // Whatever the failed ADD installed for the pod (map entries, routes) goes with it.
        let plan = self.plan(inner);
        let applied = inner.applier.apply(&mut inner.datapath, &plan).await;
        if let Err(err) = self.applied(applied) {
            log::error!("removing {} from the datapath after a failed ADD: {err}", attachment.ip);
        }
        inner.applier.forget_counters(&mut inner.datapath, attachment.ip);
        Err(e)
    }

    /// Wakes the service task when a pod with hostPorts was attached or is leaving: its
    /// hostPort services (crate::hostports) follow the attachments, not a cluster change.
    fn host_ports_may_change(&self, a: &PodAttachment) {
        if !self.config.services.enabled {
            return;
        }
        let Some(model) = self.model.get() else { return };
        let has_host_ports = model
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .pod(&a.pod_namespace, &a.pod_name)
            .is_some_and(|p| p.container_ports.iter().any(|c| c.host_port.is_some()));
        if has_host_ports {
            self.services_kick.notify_one();
        }
    }

    /// Returns when [`Self::host_ports_may_change`] asks the service task to run.
    pub async fn services_kicked(&self) {
        self.services_kick.notified().await;
    }

    /// Sets RPS on a pod's host end as `podRps` says (see crate::rps). A failure costs
    /// ordering, not connectivity: logged, and the ADD or restart goes on.
    async fn steer_flows(&self, host_ifname: &str) {
        let Some(rps) = self.rps.clone() else {
            return;
        };
        let (name, on) = (host_ifname.to_owned(), self.config.pod_rps);
        let result = tokio::task::spawn_blocking(move || rps.set(&name, on)).await.map_err(|e| e.to_string());
        if let Err(e) = result.and_then(|r| r) {
            log::warn!("RPS on {host_ifname}: {e}");
        }
    }

    fn add_reply(&self, a: &PodAttachment) -> v1::AddReply {
        let dns = &a.dns;
        v1::AddReply {
            error: None,
            interfaces: vec![
                v1::Interface {
                    name: a.host_ifname.clone(),
                    mac: a.host_mac.clone(),
                    mtu: a.mtu,
                    sandbox: String::new(),
                },
                v1::Interface { name: a.ifname.clone(), mac: a.pod_mac.clone(), mtu: a.mtu, sandbox: a.netns.clone() },
            ],
            ips: vec![v1::IpConfig {
                address: format!("{}/32", a.ip),
                gateway: self.config.gateway.to_string(),
                interface: 1,
            }],
            routes: vec![v1::Route { dst: "0.0.0.0/0".into(), gw: self.config.gateway.to_string() }],
            dns: Some(v1::Dns {
                nameservers: dns.nameservers.clone(),
                domain: dns.domain.clone(),
                search: dns.search.clone(),
                options: dns.options.clone(),
            }),
        }
    }

    /// Persists the attachment (the one durable write of an ADD) and brings the dataplane
    /// in line with it: its map entries, its /32 route and neighbour in the node.
    async fn record(&self, attachment: &PodAttachment) -> Result<(), CniError> {
        let mut guard = self.inner.lock().instrument(phase("lock")).await;
        let inner = &mut *guard;
        let persisted = phase("persist").in_scope(|| inner.state.put(attachment.clone()));
        persisted.map_err(|e| CniError::new(codes::IO_FAILURE, "persisting the attachment", e.to_string()))?;
        let plan = self.plan(inner);
        let applied = inner.applier.apply(&mut inner.datapath, &plan).instrument(phase("map_update")).await;
        match self.applied(applied) {
            Ok(()) => Ok(()),
            // Something else failed (another node's route, say): this pod is wired; the
            // resync that follows tries the rest again.
            Err(e) if inner.applier.pod_installed(&plan, attachment.ip, attachment.host_ifindex) => {
                log::error!("ADD {}: the pod is wired, but applying the node's plan failed: {e}", attachment.ip);
                Ok(())
            }
            Err(e) => Err(internal("programming the datapath", e)),
        }
    }

    /// CNI DEL: idempotent; an attachment, interface or namespace already gone is success.
    pub async fn del(&self, req: &v1::CniRequest) -> Result<(), CniError> {
        let key = AttachmentKey::new(&req.container_id, &req.ifname);
        let _attachment_lock = self.lock_attachment(&key).instrument(phase("attachment_lock")).await;
        self.del_locked(&key, req).await
    }

    /// DEL, the attachment's lock held.
    async fn del_locked(&self, key: &AttachmentKey, req: &v1::CniRequest) -> Result<(), CniError> {
        let Some(a) = self.inner.lock().instrument(phase("lock")).await.state.get(key).cloned() else {
            // No record: nothing of it is in the datapath, but an ADD whose rollback could
            // not delete its interface left it behind, under the name only this
            // attachment's host end has.
            let name = podnet::host_ifname(&req.container_id, &req.ifname);
            podnet::delete_link_off_runtime(&name)
                .await
                .map_err(|e| internal("deleting the interface an earlier ADD left", e))?;
            self.inner.lock().await.datapath.forget_pod_link(&name);
            return Ok(());
        };
        self.unwire(&a).await
    }

    /// Removes an attachment's map entries, interface and record. The caller holds the
    /// attachment's lock; the node lock is taken only around the map and state changes, so
    /// the interface deletion (several RCU grace periods in the kernel) overlaps other work.
    async fn unwire(&self, a: &PodAttachment) -> Result<(), CniError> {
        // Best effort on every step, then report the first failure (netavark's teardown rule).
        let mut first_err = None;
        let key = a.key();
        {
            let mut guard = self.inner.lock().instrument(phase("lock")).await;
            let inner = &mut *guard;
            inner.leaving.insert(key.clone());
            let plan = self.plan(inner);
            let removed = inner.applier.apply(&mut inner.datapath, &plan).instrument(phase("map_remove")).await;
            match self.applied(removed) {
                Ok(()) => {}
                // Its own entries are gone; what failed is someone else's (retried).
                Err(e) if inner.applier.pod_installed(&plan, a.ip, a.host_ifindex) => {
                    log::error!("DEL {}: the pod is unwired, but applying the node's plan failed: {e}", a.ip);
                }
                Err(e) => {
                    first_err.get_or_insert(internal("removing the pod from the datapath", e));
                }
            }
        }
        // Its hostPorts go with it (the service task takes it out of every plan while it
        // leaves).
        self.host_ports_may_change(a);
        let deleted = podnet::delete_link_off_runtime(&a.host_ifname).await;
        let link_gone = deleted.is_ok();
        if let Err(e) = deleted {
            first_err.get_or_insert(internal("deleting the pod interface", e));
        }
        let mut inner = self.inner.lock().instrument(phase("lock")).await;
        // Done either way: removed below, or (on a failure) back in the plan until the
        // runtime retries the DEL.
        inner.leaving.remove(&key);
        let inner = &mut *inner;
        // A pod whose interface is still there keeps its programs (their pins hold them on
        // it), counters and map entries (back in the plan) while it waits for the retry.
        if link_gone {
            inner.datapath.forget_pod_link(&a.host_ifname);
            inner.applier.forget_counters(&mut inner.datapath, a.ip);
        } else {
            let plan = self.plan(inner);
            let applied = inner.applier.apply(&mut inner.datapath, &plan).await;
            if let Err(e) = self.applied(applied) {
                log::error!("putting {} back in the datapath after a failed DEL: {e}", a.ip);
            }
        }
        if first_err.is_none() {
            match phase("persist").in_scope(|| inner.state.remove(&key)) {
                Ok(_) => {
                    inner.gone.remove(&key);
                }
                Err(e) => {
                    // The record stays until the runtime retries the DEL; with its interface
                    // gone it stays out of the plan (its route and entries would name a
                    // deleted interface, and every apply fail).
                    if link_gone {
                        inner.gone.insert(key.clone());
                    }
                    first_err.get_or_insert(CniError::new(codes::IO_FAILURE, "persisting the release", e.to_string()));
                }
            }
        }
        match first_err {
            None => {
                log::info!("DEL {}/{} released {}", a.container_id, a.ifname, a.ip);
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// A DEL of `key` that contiv-cni recorded while no agent answered came before this ADD
    /// of it (the runtime retried the ADD until the agent answered): carried out first, or
    /// the ADD would find the old attachment (code 102), and the next pass over the records
    /// would undo the new one. A DEL that fails fails the ADD as "try again later". Called
    /// with the attachment's lock held; a pass takes it before each record, and finds a
    /// record this consumed gone.
    async fn finish_pending_del_of(&self, key: &AttachmentKey) -> Result<(), CniError> {
        let dir = contiv_cni_api::pending_del::dir_for(&self.config.cni_socket);
        for (file, req) in contiv_cni_api::pending_del::recorded(&dir) {
            let Ok(req) = req else { continue };
            if AttachmentKey::new(&req.container_id, &req.ifname) != *key {
                continue;
            }
            if let Err(e) = self.del_locked(key, &req).await {
                return Err(CniError::try_again_later(
                    "a DEL of this attachment, recorded while no agent ran, failed",
                    format!("{}: {}", e.msg, e.details),
                ));
            }
            log::info!("DEL {}/{} recorded while no agent ran: done before its ADD", req.container_id, req.ifname);
            if let Err(e) = std::fs::remove_file(&file) {
                log::warn!("removing {}: {e}", file.display());
            }
        }
        Ok(())
    }

    /// The DELs contiv-cni recorded while no agent ran (`contiv_cni_api::pending_del`),
    /// carried out now: each file goes once its DEL succeeded (a failed one is tried again
    /// next time); a file that does not decode is logged and removed. Returns how many
    /// were done.
    pub async fn finish_pending_dels(&self, dir: &std::path::Path) -> usize {
        let mut done = 0;
        for (file, req) in contiv_cni_api::pending_del::recorded(dir) {
            let req = match req {
                Ok(req) => req,
                Err(e) => {
                    log::error!("{}: not a recorded DEL ({e}); removing it", file.display());
                    let _ = std::fs::remove_file(&file);
                    continue;
                }
            };
            // Under the attachment's lock, and only if no ADD of it consumed the record
            // meanwhile (it did the DEL before wiring anew: this one would undo that).
            let key = AttachmentKey::new(&req.container_id, &req.ifname);
            let _attachment_lock = self.lock_attachment(&key).await;
            if !file.exists() {
                continue;
            }
            match self.del_locked(&key, &req).await {
                Ok(()) => {
                    log::info!("DEL {}/{} recorded while no agent ran: done", req.container_id, req.ifname);
                    if let Err(e) = std::fs::remove_file(&file) {
                        log::warn!("removing {}: {e}", file.display());
                    }
                    done += 1;
                }
                Err(e) => log::warn!(
                    "DEL {}/{} recorded while no agent ran: {} ({}); trying again later",
                    req.container_id,
                    req.ifname,
                    e.msg,
                    e.details
                ),
            }
        }
        done
    }

    /// CNI CHECK: the attachment exists and the interfaces (up, MAC, MTU), address, routes,
    /// gateway neighbour entry, bandwidth shapers and maps are as ADD left them, in the
    /// namespace `CNI_NETNS` names; `prevResult` (if given) must name our address.
    pub async fn check(&self, req: &v1::CniRequest) -> Result<(), CniError> {
        let key = AttachmentKey::new(&req.container_id, &req.ifname);
        let a = {
            let inner = self.inner.lock().await;
            inner.state.get(&key).cloned().ok_or_else(|| {
                CniError::new(
                    codes::UNKNOWN_CONTAINER,
                    "no such attachment",
                    format!("{}/{}", req.container_id, req.ifname),
                )
            })?
        };
        let fail = |msg: &str| CniError::new(codes::INTERNAL, msg, format!("{}/{}", a.container_id, a.ifname));
        if !a.complete {
            return Err(fail("attachment is still being set up"));
        }
        if let Ok(conf) = serde_json::from_slice::<serde_json::Value>(&req.network_config)
            && let Some(prev) = conf.get("prevResult")
        {
            let want = format!("{}/32", a.ip);
            let listed = prev.get("ips").and_then(|ips| ips.as_array()).is_some_and(|ips| {
                ips.iter().any(|ip| ip.get("address").and_then(|x| x.as_str()) == Some(want.as_str()))
            });
            if !listed {
                return Err(fail("prevResult does not list the pod's address"));
            }
        }
        // The node's lock only for the map read: the netlink reads below wait on RTNL, which
        // another pod's ADD may hold (a tcx attach waits for an RCU grace period), and every
        // ADD and DEL step that needs the node's lock would wait behind this CHECK.
        let (node, counters) = {
            let inner = self.inner.lock().await;
            (inner.node.clone(), inner.datapath.pod_counters(a.ip).map_err(|e| internal("reading maps", e))?)
        };
        match podnet::link_by_name(&node, &a.host_ifname).await {
            Ok(Some(l)) if l.header.index == a.host_ifindex => {}
            _ => return Err(fail("host interface missing")),
        }
        let host_tbf_rate = podnet::root_tbf_rate(&node, a.host_ifindex)
            .await
            .map_err(|e| internal("reading the host interface's qdiscs", e))?;
        if counters.is_none() {
            return Err(fail("datapath entries missing"));
        }
        // The namespace the runtime names now (the spec's CNI_NETNS), which may be another
        // path to the pod's namespace than ADD's; the recorded one only if it names none.
        let netns = if req.netns.is_empty() { a.netns.as_str() } else { req.netns.as_str() };
        let netns = podnet::runtime_netns_path(netns, self.config.host_proc_dir.as_deref());
        let view = podnet::view_pod_side(&netns, &a.ifname, self.config.gateway)
            .await
            .map_err(|e| internal("inspecting the pod namespace", e))?
            .ok_or_else(|| fail("pod interface missing"))?;
        if Some(view.mac) != parse_mac(&a.pod_mac) {
            return Err(fail("pod interface MAC changed"));
        }
        if !view.up {
            return Err(fail("pod interface is down"));
        }
        // Lower is a later chained plugin's choice (`tuning`'s `mtu`), which the spec asks
        // CHECK to allow; higher than the path carries is broken.
        if a.mtu != 0 && view.mtu > a.mtu {
            return Err(fail(&format!("pod interface MTU is {}, above the {} ADD set", view.mtu, a.mtu)));
        }
        if !view.addresses.contains(&(a.ip, 32)) {
            return Err(fail("pod address missing"));
        }
        if !view.has_gateway_route {
            return Err(fail("route to the gateway missing"));
        }
        if !view.has_default_route_via_gateway {
            return Err(fail("default route via the gateway missing"));
        }
        if view.gateway_neighbour != Some((self.config.gateway_mac, true)) {
            return Err(fail("the gateway's permanent neighbour entry is missing or changed"));
        }
        // The `bandwidth` capability's shapers, as ADD set them (a qdisc someone else added
        // where ADD set none is theirs).
        let bandwidth = a.bandwidth.as_ref();
        let want_egress = bandwidth.and_then(|b| b.egress_shaper(a.mtu)).map(|s| s.rate_bytes_per_sec);
        if want_egress.is_some() && view.tbf_rate != want_egress {
            return Err(fail("the pod interface's egress shaper is missing or changed"));
        }
        let want_ingress = bandwidth.and_then(|b| b.ingress_shaper(a.mtu)).map(|s| s.rate_bytes_per_sec);
        if want_ingress.is_some() && host_tbf_rate != want_ingress {
            return Err(fail("the host interface's ingress shaper is missing or changed"));
        }
        Ok(())
    }

    /// CNI STATUS: ready when the datapath is loaded, the slow path is served (the vswitch
    /// runs, or the agent is connected to VPP) and the cluster model is loaded (a pod
    /// started before would miss its NetworkPolicy).
    pub fn status(&self) -> Result<(), CniError> {
        if !self.model_synced.load(std::sync::atomic::Ordering::Acquire) {
            return Err(CniError::new(codes::NOT_AVAILABLE, "the cluster model is not loaded yet", ""));
        }
        self.slowpath_serving().map_err(|e| CniError::new(codes::NOT_AVAILABLE, &e, ""))
    }

    /// Whether the slow path takes frames now (the vswitch's socket serves the port, or
    /// the agent is connected to VPP); what is wrong if not.
    pub fn slowpath_serving(&self) -> Result<(), String> {
        match &self.slowpath {
            SlowPathBackend::Builtin(port) => {
                let serving = port.lock().map(|p| p.as_ref().is_some_and(|p| p.is_serving())).unwrap_or(false);
                if serving { Ok(()) } else { Err("the vswitch is not serving the slow path".into()) }
            }
            SlowPathBackend::Vpp(vpp) => vpp.ready(),
        }
    }

    /// CNI STATUS: [`Self::status`], and not while every pod address is taken (the spec:
    /// an error "if those resources are exhausted and no new ADD requests can be
    /// serviced"). The agent itself stays ready (`/readyz`): its pods are fine.
    pub async fn cni_status(&self) -> Result<(), CniError> {
        self.status()?;
        let state = &self.inner.lock().await.state;
        if state.free_addresses() == 0 {
            let why = if state.len() >= contiv_common::MAX_PODS as usize {
                format!("the node holds {} pods, the most its datapath maps hold", state.len())
            } else {
                format!("every address of the node's pod subnet {} is taken", self.config.pod_subnet)
            };
            return Err(CniError::not_available("no free pod address", why));
        }
        Ok(())
    }

    /// CNI GC: unwires every attachment of this network that the runtime no longer lists.
    pub async fn gc(&self, req: &v1::GcRequest) -> Result<u32, CniError> {
        let valid: std::collections::HashSet<AttachmentKey> =
            req.valid_attachments.iter().map(|v| AttachmentKey::new(&v.container_id, &v.ifname)).collect();
        let stale: Vec<PodAttachment> = self
            .inner
            .lock()
            .await
            .state
            .attachments()
            .filter(|a| a.network_name == req.network_name && !valid.contains(&a.key()))
            .cloned()
            .collect();
        let mut removed = 0;
        let mut first_err = None;
        for a in &stale {
            let _attachment_lock = self.lock_attachment(&a.key()).await;
            // A DEL may have removed it meanwhile.
            if self.inner.lock().await.state.get(&a.key()) != Some(a) {
                continue;
            }
            match self.unwire(a).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        log::info!("GC of {}: removed {removed} stale attachment(s)", req.network_name);
        match first_err {
            None => Ok(removed),
            Some(e) => Err(e),
        }
    }

    /// Every pod with its counters.
    pub async fn pods(&self) -> Vec<PodReport> {
        let inner = self.inner.lock().await;
        inner
            .state
            .attachments()
            .map(|a| PodReport {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
                pod_namespace: a.pod_namespace.clone(),
                pod_name: a.pod_name.clone(),
                labels: self.pod_labels(a),
                ip: a.ip,
                host_ifname: a.host_ifname.clone(),
                host_ifindex: a.host_ifindex,
                pod_mac: a.pod_mac.clone(),
                counters: inner.datapath.pod_counters(a.ip).ok().flatten().map(Into::into),
            })
            .collect()
    }

    /// What the node enforces for its pods, from the maps (PODS isolation bits, POLICY).
    pub async fn policy_report(&self) -> Result<PolicyReport, crate::datapath::DatapathError> {
        use contiv_common::{pod_flags, policy_dir};
        let inner = self.inner.lock().await;
        let flags: HashMap<Ipv4Addr, u8> =
            inner.datapath.pods()?.into_iter().map(|e| (Ipv4Addr::from(e.ip), e.flags)).collect();
        let entries = inner.datapath.policy_entries()?;
        let pods = inner
            .state
            .attachments()
            .map(|a| {
                let f = flags.get(&a.ip).copied().unwrap_or(0);
                let list = |direction: u8| -> Vec<PeerAllowance> {
                    entries
                        .iter()
                        .filter(|(k, _)| k.pod == a.ip && k.direction == direction)
                        .map(|(k, v)| PeerAllowance {
                            peer: k.peer.to_string(),
                            allowed: crate::policy::PortSet::from_value(v).describe(),
                        })
                        .collect()
                };
                PodPolicyReport {
                    pod_namespace: a.pod_namespace.clone(),
                    pod_name: a.pod_name.clone(),
                    ip: a.ip,
                    ingress_isolated: f & pod_flags::INGRESS_ISOLATED != 0,
                    egress_isolated: f & pod_flags::EGRESS_ISOLATED != 0,
                    ingress: list(policy_dir::INGRESS),
                    egress: list(policy_dir::EGRESS),
                }
            })
            .collect();
        Ok(PolicyReport {
            model_loaded: self.model_synced.load(std::sync::atomic::Ordering::Acquire),
            pods,
            problems: self.policy_problems.lock().map(|p| p.clone()).unwrap_or_default(),
        })
    }

    /// The node's wire: uplink, overlay, the routes to other nodes, overlay counters.
    pub async fn node_report(&self) -> NodeReport {
        let inner = self.inner.lock().await;
        NodeReport {
            node_name: self.config.node_name.clone(),
            pod_subnet: self.config.pod_subnet.to_string(),
            pod_mtu: self.pod_mtu,
            uplink: self.uplink.as_ref().map(|u| u.ifname.clone()),
            node_ip: self.node_ip(),
            overlay: self.overlay.as_ref().map(|o| o.ifname.clone()),
            remote_routes: inner
                .applier
                .installed()
                .remote_routes
                .iter()
                .map(|(p, r)| (p.to_string(), Ipv4Addr::from(r.node_ip)))
                .collect(),
            overlay_counters: self
                .overlay
                .as_ref()
                .and_then(|_| inner.datapath.overlay_counters().ok())
                .map(Into::into),
            uplink_mode: self.config.uplink.as_str(),
            vpp: self.slowpath.vpp().map(|v| v.node_report()),
        }
    }

    /// Everything the slow path counts: the vswitch's verdicts, its AF_XDP port, and the
    /// slow-path port's programs.
    pub async fn slowpath_report(&self) -> SlowPathReport {
        let (vswitch, port) = match self.slowpath.builtin().map(|p| p.lock()) {
            Some(Ok(p)) => match p.as_ref() {
                Some(p) => (Some(p.backend_counters()), Some(p.counters())),
                None => (None, None),
            },
            _ => (None, None),
        };
        let programs = self.inner.lock().await.datapath.slowport_counters().ok().map(|c| SlowPortReport {
            to_vswitch_packets: c.to_vswitch_packets,
            to_vswitch_no_socket: c.to_vswitch_no_socket,
            from_vswitch_delivered: c.from_vswitch_delivered,
            from_vswitch_no_pod: c.from_vswitch_no_pod,
        });
        SlowPathReport {
            backend: self.slowpath.name(),
            vswitch,
            port,
            programs,
            vpp: self.slowpath.vpp().map(|v| v.report()),
        }
    }

    /// Restarts the vswitch if its port stopped serving (backend panic, interface trouble):
    /// a new AF_XDP socket on the slow-path port, registered in place of the old one.
    pub async fn heal_slowpath(&self) {
        use std::sync::atomic::Ordering;
        // VPP mode: the supervisor reconnects to VPP by itself.
        let Some(slot) = self.slowpath.builtin() else { return };
        let retrying = self.slowpath_restarts_failed.load(Ordering::SeqCst) > 0;
        let failed = match slot.lock() {
            Ok(mut p) => match p.as_ref() {
                Some(port) if !port.is_serving() => p.take(),
                Some(_) => return,
                // A restart that failed left the slot empty: try again.
                None if retrying => None,
                None => return,
            },
            Err(_) => return,
        };
        if let Some(port) = failed
            && let Err(e) = port.stop()
        {
            log::warn!("vswitch stopped serving: {e}; restarting it");
        }
        let ifname = self.config.slowpath_vswitch_ifname.clone();
        let gateway = GatewayConfig {
            ip: self.config.gateway,
            mac: self.config.gateway_mac,
            path_mtu: self.overlay.as_ref().map(|o| o.mtu as u16),
        };
        let started = match self.restore_slow_port().await {
            Ok(()) => contiv_vswitch::spawn(&ifname, 0, BuiltinVswitch::new(gateway)).map_err(|e| e.to_string()),
            Err(e) => Err(format!("{e:#}")),
        };
        let result = match started {
            Ok(port) => {
                // Registered, put in its slot and given the refusals under the node lock:
                // a services sync computes its refusals under that lock too, and hands them
                // to the port in the slot after it, so the latest set always lands.
                let mut inner = self.inner.lock().await;
                match inner.datapath.register_xsk(0, std::os::fd::AsFd::as_fd(&port)) {
                    Ok(()) => {
                        port.with_backend(|b| b.set_refusals(Arc::new(inner.proxy.refusals())));
                        if let Ok(mut p) = slot.lock() {
                            *p = Some(port);
                        }
                        Ok(())
                    }
                    Err(e) => Err(format!("registering its socket: {e}")),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.slowpath_restarts_failed.store(0, Ordering::SeqCst);
                log::info!("vswitch restarted on {ifname}");
            }
            Err(e) => {
                let n = self.slowpath_restarts_failed.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 || n.is_multiple_of(60) {
                    log::error!("restarting the vswitch on {ifname} (attempt {n}, retried every second): {e}");
                }
            }
        }
    }

    /// Re-creates the kernel-mode slow-path port if it vanished (deleted from outside, one
    /// end or both): the host end at its old interface index, which the datapath's config
    /// and its traces name, and both ends with their programs.
    async fn restore_slow_port(&self) -> anyhow::Result<()> {
        use anyhow::Context;
        let (host, vswitch) = (&self.config.slowpath_host_ifname, &self.config.slowpath_vswitch_ifname);
        let mut inner = self.inner.lock().await;
        let node = inner.node.clone();
        if crate::slowpath::port_intact(&node, host, vswitch, self.params.slowport_ifindex).await? {
            return Ok(());
        }
        log::warn!("the slow-path port {host} <-> {vswitch} vanished: re-creating it");
        let index = self.params.slowport_ifindex;
        let created = crate::slowpath::create_port(&node, host, vswitch, Some(index))
            .await
            .with_context(|| format!("re-creating the slow-path port with {host} at index {index}"));
        let attached = match created {
            Ok(()) => inner.datapath.attach_slow_port(host, vswitch).context("attaching the slow-path programs"),
            Err(e) => Err(e),
        };
        if attached.is_err() {
            // Half made (no programs, or down) it would pass for whole: the next try
            // starts from nothing.
            let _ = podnet::delete_link(&node, host).await;
            let _ = podnet::delete_link(&node, vswitch).await;
        }
        attached
    }

    /// Stops the vswitch. The pod datapath stays attached: pods keep talking while the
    /// agent is down or being upgraded.
    pub fn shutdown(&self) {
        self.slowpath_restarts_failed.store(0, std::sync::atomic::Ordering::SeqCst);
        match &self.slowpath {
            SlowPathBackend::Builtin(slot) => {
                if let Ok(mut p) = slot.lock()
                    && let Some(port) = p.take()
                    && let Err(e) = port.stop()
                {
                    log::warn!("stopping the vswitch: {e}");
                }
            }
            // What VPP holds stays: pods keep leaving the node through it while the agent is away.
            SlowPathBackend::Vpp(vpp) => vpp.shutdown(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn add_waits_for_the_cluster_model_then_says_try_again() {
        let wait = std::time::Duration::from_millis(300);
        // Never loaded: code 11 after the wait, not before.
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let started = std::time::Instant::now();
        let e = wait_for_model(rx, wait).await.expect_err("not loaded");
        assert_eq!(e.code, codes::TRY_AGAIN_LATER);
        assert!(e.msg.contains("not loaded") && started.elapsed() >= wait, "{e:?}");
        // Loaded while waiting: the ADD goes on.
        let (tx, rx) = tokio::sync::watch::channel(false);
        let waiter = tokio::spawn(wait_for_model(rx, std::time::Duration::from_secs(30)));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tx.send_replace(true);
        assert!(waiter.await.unwrap().is_ok());
        // Already loaded.
        let (_tx, rx) = tokio::sync::watch::channel(true);
        assert!(wait_for_model(rx, wait).await.is_ok());
    }
}
