//! The operator tools' side of the agent: the monitor's reader and pod names, and traces
//! (`GET /monitor`, `GET /trace`; `netctl monitor`, `netctl trace`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use contiv_common::{program_names, trace_step};
use serde::Serialize;

use super::Agent;
use crate::{
    config::parse_mac,
    datapath::DatapathError,
    monitor::{Directory, Filter, Monitor, Notice, PodName},
    trace::{self, Outcome, PacketReport, StepReport, TraceRequest},
};

/// Why a trace could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The pod does not run on this node (or has no interface yet).
    #[error("no pod {pod} is attached on node {node}{hint}")]
    NotHere { pod: String, node: String, hint: String },
    /// The datapath refused the run or a map read.
    #[error("running the trace: {0}")]
    Datapath(#[from] DatapathError),
    /// An arrival was asked of a node without the overlay (VPP mode, or a single node).
    #[error("node {0} has no overlay device: traffic from other nodes does not arrive through tc_from_overlay here")]
    NoOverlay(String),
    /// The frame to trace is not one.
    #[error("the packet to trace: {0}")]
    BadPacket(String),
}

/// What `GET /trace` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceReport {
    pub node: String,
    /// This node's underlay address (the sender of a packet it forwards to another node).
    pub node_ip: Option<Ipv4Addr>,
    /// The sending pod (`namespace/name`), its address; the interface the packet arrives
    /// on (the pod's veth, or the overlay device for a packet from another node).
    pub from: String,
    pub pod_ip: Ipv4Addr,
    pub interface: String,
    pub ifindex: u32,
    /// The destination as asked (`IP:PORT/PROTO`; for an arrival, the packet).
    pub to: String,
    /// The packet made up and run through the program.
    pub packet: PacketReport,
    pub program: ProgramReport,
    pub steps: Vec<StepReport>,
    /// The program's return code and its name.
    pub return_code: u32,
    pub action: &'static str,
    pub outcome: Outcome,
    pub drop_reason: Option<&'static str>,
    /// One sentence.
    pub verdict: String,
    /// The packet as the program left it (translated, TTL decremented, MACs rewritten).
    pub packet_out: Option<PacketReport>,
    /// Forwarded to another node: the frame it sends there (hex, for that node's
    /// `/trace/arrival`), and the node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_out_hex: Option<String>,
    pub next_node: Option<String>,
    pub next_node_ip: Option<Ipv4Addr>,
    pub notes: Vec<String>,
}

/// Which program ran.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramReport {
    pub name: &'static str,
    pub id: u32,
    /// Whether that very program is attached to the interface now.
    pub attached: bool,
}

static TRACE_NONCE: AtomicU32 = AtomicU32::new(1);

impl Agent {
    /// The monitor (its channel, settings and counters).
    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }

    /// Starts the monitor's reader; it runs until `stop`. `None` (logged) if the
    /// datapath's monitor maps cannot be had.
    pub async fn spawn_monitor(
        self: &Arc<Self>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let maps = match self.inner.lock().await.datapath.monitor_maps() {
            Ok(m) => m,
            Err(e) => {
                log::error!("monitor: {e}; `netctl monitor` will show no events");
                return None;
            }
        };
        Some(tokio::spawn(crate::monitor::run(self.monitor.clone(), maps, self.clone(), stop)))
    }

    /// Every pod address this node can name: its attachments (with their interfaces) and
    /// the pods of the cluster model.
    pub async fn pod_directory(&self) -> Directory {
        let mut dir = Directory::new();
        if let Some(model) = self.model.get()
            && let Ok(m) = model.read()
        {
            for p in m.pods() {
                for ip in &p.ips {
                    if let IpAddr::V4(v4) = ip {
                        dir.insert(*v4, PodName { id: format!("{}/{}", p.namespace, p.name), interface: None });
                    }
                }
            }
        }
        let inner = self.inner.lock().await;
        for a in inner.state.attachments() {
            let id = if a.pod_name.is_empty() {
                a.container_id.clone()
            } else {
                format!("{}/{}", a.pod_namespace, a.pod_name)
            };
            dir.insert(a.ip, PodName { id, interface: Some(a.host_ifname.clone()) });
        }
        dir
    }

    /// A client's filter: `pod` (`namespace/name`) must run on this node.
    pub async fn monitor_filter(&self, pod: Option<&str>, drops_only: bool) -> Result<Filter, String> {
        let Some(pod) = pod.filter(|p| !p.is_empty()) else {
            return Ok(Filter { pod_ip: None, drops_only });
        };
        let Some((ns, name)) = pod.split_once('/') else {
            return Err(format!("pod {pod:?}: expected NAMESPACE/NAME"));
        };
        let inner = self.inner.lock().await;
        let ip = inner.state.attachments().find(|a| a.pod_namespace == ns && a.pod_name == name).map(|a| a.ip);
        match ip {
            Some(ip) => Ok(Filter { pod_ip: Some(ip), drops_only }),
            None => {
                Err(format!("no pod {pod} is attached on node {}{}", self.config.node_name, self.pod_hint(ns, name)))
            }
        }
    }

    /// The first line of a monitor stream.
    pub fn monitor_hello(&self, filter: &str) -> Notice {
        let m = self.monitor.config();
        Notice::Hello {
            node: self.config.node_name.clone(),
            rate_per_cpu: m.rate,
            burst: m.burst,
            flows: m.flows,
            // The rate buckets are per possible CPU, whatever the agent's own allowance.
            cpus: aya::util::nr_cpus().map_or(1, |n| n),
            filter: filter.to_owned(),
        }
    }

    /// ` (it runs on node N)` when the cluster model knows where the pod is.
    fn pod_hint(&self, ns: &str, name: &str) -> String {
        let Some(model) = self.model.get() else { return String::new() };
        let Ok(m) = model.read() else { return String::new() };
        m.pods()
            .find(|p| p.namespace == ns && p.name == name)
            .and_then(|p| p.node_name.clone())
            .map(|n| format!(" (it runs on node {n})"))
            .unwrap_or_default()
    }

    /// Runs the pod's `tc_from_pod` on a packet to `req.to` in trace mode and explains
    /// what it did. Changes no state.
    pub async fn trace(&self, req: &TraceRequest) -> Result<TraceReport, TraceError> {
        let directory = self.pod_directory().await;
        let pod_id = format!("{}/{}", req.namespace, req.name);
        let nonce = next_nonce();
        let mut guard = self.inner.lock().await;
        let Some(a) = guard
            .state
            .attachments()
            .find(|a| a.complete && a.host_ifindex != 0 && a.pod_namespace == req.namespace && a.pod_name == req.name)
            .cloned()
        else {
            return Err(TraceError::NotHere {
                pod: pod_id,
                node: self.config.node_name.clone(),
                hint: self.pod_hint(&req.namespace, &req.name),
            });
        };
        let src = req.from_ip.unwrap_or(a.ip);
        // An ephemeral port (or ICMP identifier) of the trace's own, never 0.
        let sport = 32768 + (nonce % 28_000) as u16;
        let packet = trace::build_packet(
            parse_mac(&a.pod_mac).unwrap_or_default(),
            self.config.gateway_mac,
            src,
            sport,
            &req.to,
        );
        // The run and every map read below happen under the node lock: one trace at a time,
        // and the maps do not change under it.
        let run = guard.datapath.trace_from_pod(a.host_ifindex, &packet, nonce)?;
        let inner = &*guard;
        let ran = Ran { program: program_names::FROM_POD, interface: &a.host_ifname, ifindex: a.host_ifindex };
        let mut report = self.explain(inner, &directory, ran, &packet, run, a.ip)?;
        drop(guard);
        report.from = pod_id;
        report.to = req.to.to_string();
        if report.steps.iter().any(|s| s.stage == "service" && s.result == "frontend")
            && req.to.proto == trace::IPPROTO_TCP
        {
            report.notes.insert(
                0,
                "a pod's TCP connection to a service is balanced at connect() by the socket programs (same maps, \
                 same choice), so its packets leave the pod already translated; shown is what this program does \
                 with a packet that reaches it untranslated"
                    .into(),
            );
        }
        Ok(report)
    }

    /// The second hop of a trace: runs this node's `tc_from_overlay` in trace mode on the
    /// inner frame another node's trace sent it (`packet`, from the node `sender`) and
    /// explains what it did. Changes no state.
    pub async fn trace_arrival(&self, packet: &[u8], sender: Ipv4Addr) -> Result<TraceReport, TraceError> {
        let Some(overlay) = &self.overlay else {
            return Err(TraceError::NoOverlay(self.config.node_name.clone()));
        };
        let Some(inner_src) = PacketReport::parse(packet).map(|p| p.src) else {
            return Err(TraceError::BadPacket("not an Ethernet frame with an IPv4 header".into()));
        };
        let directory = self.pod_directory().await;
        let mut guard = self.inner.lock().await;
        let run = guard.datapath.trace_from_overlay(overlay.ifindex, packet, sender.octets(), next_nonce())?;
        let inner = &*guard;
        let ran = Ran { program: program_names::FROM_OVERLAY, interface: &overlay.ifname, ifindex: overlay.ifindex };
        let mut report = self.explain(inner, &directory, ran, packet, run, inner_src)?;
        drop(guard);
        report.from = directory.get(&inner_src).map_or_else(|| inner_src.to_string(), |p| p.id.clone());
        report.to = report.packet.summary();
        Ok(report)
    }

    /// A trace run in words: every step with its names, the outcome, notes.
    fn explain(
        &self,
        inner: &super::Inner,
        directory: &Directory,
        ran: Ran<'_>,
        packet: &[u8],
        run: crate::datapath::TraceRun,
        sender: Ipv4Addr,
    ) -> Result<TraceReport, TraceError> {
        let attached = crate::datapath::tcx_ingress_programs(ran.interface)
            .map(|ids| ids.contains(&run.program_id))
            .unwrap_or(false);
        let mut names = trace::Names {
            slow_path: if self.slowpath.vpp().is_some() { "VPP" } else { "vswitch" },
            ..Default::default()
        };
        names.pods = directory.iter().map(|(ip, p)| (*ip, p.id.clone())).collect();
        for b in inner.state.attachments() {
            names.interfaces.insert(b.host_ifindex, b.host_ifname.clone());
        }
        if let Some(o) = &self.overlay {
            names.interfaces.insert(o.ifindex, o.ifname.clone());
        }
        if let Some(u) = &self.uplink {
            names.interfaces.insert(u.ifindex, u.ifname.clone());
        }
        names.interfaces.insert(self.params.slowport_ifindex, self.config.slowpath_host_ifname.clone());
        for r in &inner.registrations {
            if let Some(ip) = r.uplink_ip {
                names.nodes.insert(ip, r.name.clone());
            }
        }
        for (id, p) in &inner.proxy.plan().ports {
            let port = if p.port_name.is_empty() { String::new() } else { format!(":{}", p.port_name) };
            names.services.insert(*id, format!("service {}/{}{port} ({})", p.namespace, p.name, p.protocol));
        }
        // Which POLICY entry decided each check: the longest prefix of that pod and direction
        // holding the peer, as the trie's lookup found it.
        let checks: Vec<_> = run.steps.iter().filter_map(trace::policy_step_key).collect();
        if !checks.is_empty() {
            let entries = inner.datapath.policy_entries()?;
            for key @ (pod, direction, peer) in checks {
                let best = entries
                    .iter()
                    .filter(|(k, _)| k.pod == pod && k.direction == direction && k.peer.contains(&peer))
                    .max_by_key(|(k, _)| k.peer.prefix_len());
                if let Some((k, v)) = best {
                    names.policy.insert(key, (k.peer, crate::policy::PortSet::from_value(v).describe()));
                }
            }
        }

        let steps: Vec<StepReport> = run.steps.iter().map(|s| trace::describe(s, &names, sender)).collect();
        let (outcome, drop_reason, verdict) = trace::conclude(&run.steps, run.return_code, &names);
        let mut notes = vec![];
        if run.steps.iter().any(|s| s.code == trace_step::SVC_BACKEND && s.arg & 2 == 0)
            && run.steps.iter().any(|s| s.code == trace_step::SVC_FRONTEND && s.arg > 1)
        {
            notes.push("the backend is chosen at random per new flow: another run may show another one".into());
        }
        let next_node = run
            .steps
            .iter()
            .rev()
            .find(|s| s.code == trace_step::VERDICT && s.arg == u16::from(contiv_common::verdict::TUNNEL))
            .map(|s| Ipv4Addr::from(s.ip));
        // A pod's packet for another node leaves with the outer headers the program built:
        // the report shows the packet inside, which the next node's trace takes.
        let encapsulated = next_node
            .and(self.config.overlay.datapath_encap_port())
            .and_then(|port| trace::vxlan_inner(&run.packet_out, port));
        if let Some((_, vni)) = encapsulated {
            notes.push(format!(
                "the program built the outer IPv4/UDP/VXLAN headers (VNI {vni}); the packet out shown is the \
                 one inside them"
            ));
        }
        let packet_out = encapsulated.map_or(&run.packet_out[..], |(inner, _)| inner);
        if let Some(ip) = next_node {
            notes.push(format!(
                "the packet goes on to {}, whose tc_from_overlay decides what happens there (the receiver's \
                 ingress rules among it): netctl trace follows it (GET /trace/arrival on that node)",
                names.nodes.get(&ip).map_or_else(|| format!("node {ip}"), |n| format!("node {n}"))
            ));
        }
        let to_slow_path = run
            .steps
            .iter()
            .any(|s| s.code == trace_step::VERDICT && s.arg == u16::from(contiv_common::verdict::SLOW_PATH));
        if to_slow_path && let Err(why) = self.slowpath_serving() {
            notes.push(format!(
                "{why} now: a real packet would be dropped at the slow-path port (to_vswitch_no_socket in /vswitch) \
                 until it is back"
            ));
        }
        if !attached {
            notes.push(format!(
                "the program attached to {} is not this agent's {} (id {}): the agent may be re-attaching it",
                ran.interface, ran.program, run.program_id
            ));
        }
        notes.push("nothing was written: no conntrack or affinity entry, no counter, no monitor event".into());
        let packet_in = PacketReport::parse(packet)
            .ok_or_else(|| TraceError::BadPacket("not an Ethernet frame with an IPv4 header".into()))?;
        Ok(TraceReport {
            node: self.config.node_name.clone(),
            node_ip: self.node_ip(),
            from: String::new(),
            pod_ip: sender,
            interface: ran.interface.to_owned(),
            ifindex: ran.ifindex,
            to: String::new(),
            packet: packet_in,
            program: ProgramReport { name: ran.program, id: run.program_id, attached },
            steps,
            return_code: run.return_code,
            action: trace::action(run.return_code),
            outcome,
            drop_reason,
            verdict,
            packet_out: PacketReport::parse(packet_out),
            packet_out_hex: (outcome == Outcome::Forwarded).then(|| trace::hex(packet_out)),
            next_node: next_node.and_then(|ip| names.nodes.get(&ip).cloned()),
            next_node_ip: next_node,
            notes,
        })
    }
}

/// Which program a trace ran, and on which interface.
struct Ran<'a> {
    program: &'static str,
    interface: &'a str,
    ifindex: u32,
}

/// A nonce no earlier run of this agent used (never 0, the value of a record never written).
fn next_nonce() -> u32 {
    loop {
        let n = TRACE_NONCE.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() << 20);
        if n != 0 {
            return n;
        }
    }
}

impl crate::monitor::Names for Agent {
    async fn directory(&self) -> Directory {
        self.pod_directory().await
    }

    fn maybe_pod(&self, ip: Ipv4Addr) -> bool {
        self.config.pod_subnet_cidr.contains(&ip)
    }
}

/// Monitor counters in report form (for `/node` and metrics).
pub type MonitorTotals = BTreeMap<&'static str, crate::datapath::MonitorCounters>;

impl Agent {
    /// The monitor's counters by kind, as last read.
    pub fn monitor_totals(&self) -> MonitorTotals {
        let c = self.monitor.counters();
        BTreeMap::from([
            ("drop", c[contiv_common::monitor_bucket::DROPS as usize]),
            ("flow", c[contiv_common::monitor_bucket::FLOWS as usize]),
        ])
    }
}
