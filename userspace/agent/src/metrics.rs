//! The agent's Prometheus metrics (prometheus-client, OpenMetrics text on `/metrics`):
//!
//! - per-pod datapath counters, labelled `namespace`, `pod` (the Pod object from CNI_ARGS)
//!   and `interface`: `contiv_pod_forwarded_packets_total`, `..._slowpath_packets_total`,
//!   `contiv_pod_dropped_packets_total{reason}`, ...;
//! - per service port (`namespace`, `service`, `port`, `protocol`):
//!   `contiv_service_connections_total` (connections and flows given a backend),
//!   `contiv_service_no_endpoint_rejects_total`, `contiv_service_source_denied_total`, `contiv_service_snat_exhausted_total`,
//!   `contiv_service_backends` (gauge, the Cluster set); `contiv_service_udp_sockets_aborted_total` (the node's connected UDP sockets aborted
//!   because their backend left the service), `contiv_service_udp_sockets_untracked_total`
//!   (those balanced while the table of them was full, which cannot be);
//!   the proxy health server's answers, `contiv_proxy_healthz_total{code}` and `contiv_proxy_livez_total{code}`;
//!   network programming latency, `contiv_network_programming_duration_seconds` (histogram),
//!   `contiv_service_sync_duration_seconds` and `contiv_service_sync_failures_total`
//!   (crate::programming);
//! - the conntrack table (NetworkPolicy's too: with services on or off):
//!   `contiv_conntrack_entries` (as the last sweep left it, every 10 s) and
//!   `contiv_conntrack_expired_total`;
//! - slow-path verdicts by reason: `contiv_slowpath_verdicts_total{verdict, reason}`
//!   (`reply`: arp, icmp_echo; `drop`: every `DropReason`), the AF_XDP port's counters and
//!   the slow-path port programs' counters;
//! - the monitor's events by kind (`drop`, `flow`): `contiv_monitor_events_total`
//!   (streamed), `contiv_monitor_events_suppressed_total` (over the rate: not emitted),
//!   `contiv_monitor_events_lost_total` (the ring buffer was full);
//! - latency histograms: `contiv_cni_request_duration_seconds{command, code}` (code 0 is
//!   success, else the CNI error code) and `contiv_store_request_duration_seconds{op,
//!   outcome}` (see `contiv_store::metrics`).
//!
//! Counters that live in the datapath are read at scrape time (a collector over a snapshot
//! of the agent's reports), never copied into a second set of counters.
//!
//! Every series has a label set of its own (OpenMetrics): rows that share one are summed.
//! A pod can have two attachments for a moment (a StatefulSet pod recreated before its old
//! sandbox's DEL): its series are their sum. Service ports the plan does not name (the maps
//! read before the cluster model is listed, after a restart) are left out until it does,
//! rather than reported under empty names or a port id that will not be seen again.

use std::{collections::HashMap, hash::Hash, time::Duration};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::{
    agent::{CountersReport, MonitorTotals, PodReport, ServicesReport, SlowPathReport},
    conntrack::ConntrackFill,
};

/// Labels of one CNI request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CniLabels {
    /// ADD, DEL, CHECK, STATUS or GC.
    pub command: &'static str,
    /// 0 on success, else the CNI error code returned.
    pub code: u32,
}

type CniFamily = Family<CniLabels, Histogram, fn() -> Histogram>;

/// 0.5 ms .. ~16 s: a STATUS up to an ADD waiting for the node lock.
fn cni_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
}

/// The agent's metrics; share it as `Arc<AgentMetrics>`.
#[derive(Debug)]
pub struct AgentMetrics {
    cni: CniFamily,
    store: contiv_store::metrics::StoreMetrics,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            cni: Family::new_with_constructor(cni_buckets as fn() -> Histogram),
            store: contiv_store::metrics::StoreMetrics::new(),
        }
    }
}

impl AgentMetrics {
    /// Empty metrics.
    pub fn new() -> Self {
        Self::default()
    }

    /// The store latency histograms (wrap the store with `instrument`).
    pub fn store(&self) -> &contiv_store::metrics::StoreMetrics {
        &self.store
    }

    /// Records one CNI request.
    pub fn observe_cni(&self, command: &'static str, code: u32, took: Duration) {
        self.cni.get_or_create(&CniLabels { command, code }).observe(took.as_secs_f64());
    }

    /// The OpenMetrics text for this scrape: the histograms, and the datapath and slow-path
    /// counters from `pods` and `slowpath` (read just now from the maps and the vswitch);
    /// `services` when services are on; `conntrack` either way.
    pub fn render(
        &self,
        pods: Vec<PodReport>,
        slowpath: SlowPathReport,
        services: Option<ServicesReport>,
        programming: Option<&crate::programming::ProgrammingMetrics>,
        monitor: Option<MonitorTotals>,
        conntrack: ConntrackFill,
    ) -> String {
        let mut registry = Registry::default();
        registry.register_with_unit(
            "contiv_cni_request_duration",
            "Latency of CNI requests served by the agent, by command and CNI result code",
            Unit::Seconds,
            self.cni.clone(),
        );
        self.store.register(&mut registry);
        if let Some(p) = programming {
            p.register(&mut registry);
        }
        registry.register_collector(Box::new(Snapshot { pods, slowpath, services, monitor, conntrack }));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            log::error!("encoding metrics: {e}");
        }
        out
    }
}

/// What one scrape reports from the datapath and the slow path.
#[derive(Debug)]
struct Snapshot {
    pods: Vec<PodReport>,
    slowpath: SlowPathReport,
    services: Option<ServicesReport>,
    monitor: Option<MonitorTotals>,
    conntrack: ConntrackFill,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    service: String,
    port: String,
    protocol: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
    interface: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PodReasonLabels {
    namespace: String,
    pod: String,
    interface: String,
    reason: &'static str,
}

fn pod_labels(p: &PodReport) -> PodLabels {
    // A runtime outside Kubernetes passes no Pod: name the attachment by its container.
    let pod = if p.pod_name.is_empty() { p.container_id.clone() } else { p.pod_name.clone() };
    PodLabels { namespace: p.pod_namespace.clone(), pod, interface: p.ifname.clone() }
}

type PodCounter = (&'static str, &'static str, fn(&CountersReport) -> u64);

const POD_COUNTERS: [PodCounter; 11] = [
    ("contiv_pod_forwarded_packets", "Frames from the pod forwarded by the fast path", |c| c.fwd_packets),
    ("contiv_pod_forwarded_bytes", "Bytes from the pod forwarded by the fast path", |c| c.fwd_bytes),
    ("contiv_pod_slowpath_packets", "Frames from the pod steered to the slow path", |c| c.slow_packets),
    ("contiv_pod_slowpath_bytes", "Bytes from the pod steered to the slow path", |c| c.slow_bytes),
    ("contiv_pod_from_slowpath_packets", "Frames the slow path delivered to the pod", |c| c.from_slow_packets),
    ("contiv_pod_tunnel_packets", "Frames from the pod encapsulated to another node", |c| c.tunnel_packets),
    ("contiv_pod_tunnel_bytes", "Bytes from the pod encapsulated to another node", |c| c.tunnel_bytes),
    ("contiv_pod_host_packets", "Frames from the pod handed to the node's stack (host, outside)", |c| c.host_packets),
    ("contiv_pod_host_bytes", "Bytes from the pod handed to the node's stack (host, outside)", |c| c.host_bytes),
    ("contiv_pod_from_tunnel_packets", "Frames from other nodes delivered to the pod", |c| c.from_tunnel_packets),
    ("contiv_pod_from_tunnel_bytes", "Bytes from other nodes delivered to the pod", |c| c.from_tunnel_bytes),
];

/// A drop reason and how to read its counter.
type PodDrop = (&'static str, fn(&CountersReport) -> u64);

const POD_DROPS: [PodDrop; 11] = [
    ("spoofed_ip", |c| c.drop_spoofed_ip),
    ("spoofed_mac", |c| c.drop_spoofed_mac),
    ("malformed", |c| c.drop_malformed),
    ("ttl_exceeded", |c| c.drop_ttl_exceeded),
    ("no_slowpath", |c| c.drop_no_slowpath),
    // NetworkPolicy: new flows into the pod (ingress) or out of it (egress) its rules deny.
    ("policy_ingress", |c| c.drop_policy_ingress),
    ("policy_egress", |c| c.drop_policy_egress),
    ("service", |c| c.drop_service),
    // A later fragment whose first fragment's flow this node did not pass.
    ("fragment", |c| c.drop_fragment),
    ("no_route", |c| c.drop_no_route),
    ("overlay_port", |c| c.drop_overlay_port),
];

/// One counter without labels.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// Rows that share a label set summed into one, in the order the label sets first appear:
/// a series must not repeat (see the module docs).
fn merged<S: Eq + Hash + Clone>(rows: impl IntoIterator<Item = (S, u64)>) -> Vec<(S, u64)> {
    let mut at: HashMap<S, usize> = HashMap::new();
    let mut out: Vec<(S, u64)> = vec![];
    for (labels, v) in rows {
        match at.get(&labels) {
            Some(&i) => out[i].1 = out[i].1.saturating_add(v),
            None => {
                at.insert(labels.clone(), out.len());
                out.push((labels, v));
            }
        }
    }
    out
}

fn counter_family<S: EncodeLabelSet + Eq + Hash + Clone>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (S, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in merged(rows) {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge_family<S: EncodeLabelSet + Eq + Hash + Clone>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (S, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in merged(rows) {
        ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counted: Vec<(PodLabels, &CountersReport)> =
            self.pods.iter().filter_map(|p| p.counters.as_ref().map(|c| (pod_labels(p), c))).collect();
        for (name, help, get) in POD_COUNTERS {
            counter_family(&mut encoder, name, help, counted.iter().map(|(l, c)| (l.clone(), get(c))))?;
        }
        counter_family(
            &mut encoder,
            "contiv_pod_dropped_packets",
            "Frames of the pod dropped by the fast path, by reason (policy_ingress: frames to the pod)",
            counted.iter().flat_map(|(l, c)| {
                POD_DROPS.iter().map(move |(reason, get)| {
                    (
                        PodReasonLabels {
                            namespace: l.namespace.clone(),
                            pod: l.pod.clone(),
                            interface: l.interface.clone(),
                            reason,
                        },
                        get(c),
                    )
                })
            }),
        )?;
        let pods = ConstGauge::new(self.pods.len() as i64);
        pods.encode(encoder.encode_descriptor(
            "contiv_pods",
            "Pod attachments on this node",
            None,
            pods.metric_type(),
        )?)?;

        if let Some(v) = &self.slowpath.vswitch {
            let mut rows = vec![
                ([("verdict", "reply"), ("reason", "arp")], v.arp_replies),
                ([("verdict", "reply"), ("reason", "icmp_echo")], v.icmp_echo_replies),
                ([("verdict", "reply"), ("reason", "frag_needed")], v.frag_needed_sent),
                ([("verdict", "reply"), ("reason", "tcp_reset")], v.tcp_resets_sent),
                ([("verdict", "reply"), ("reason", "port_unreachable")], v.port_unreachable_sent),
            ];
            rows.extend(
                contiv_vswitch::DropReason::ALL
                    .iter()
                    .map(|r| ([("verdict", "drop"), ("reason", r.as_str())], v.drops.get(*r))),
            );
            counter_family(&mut encoder, "contiv_slowpath_verdicts", "Slow-path verdicts on frames, by reason", rows)?;
        }
        if let Some(p) = &self.slowpath.port {
            counter_family(
                &mut encoder,
                "contiv_slowpath_port_frames",
                "Frames through the vswitch's AF_XDP socket, by direction",
                [([("direction", "rx")], p.rx_frames), ([("direction", "tx")], p.tx_frames)],
            )?;
            counter_family(
                &mut encoder,
                "contiv_slowpath_port_dropped_frames",
                "Frames the AF_XDP port dropped, by reason",
                [
                    ([("reason", "tx_no_frame")], p.tx_dropped_no_frame),
                    ([("reason", "tx_too_big")], p.tx_dropped_too_big),
                    ([("reason", "tx_ring_full")], p.tx_dropped_ring_full),
                    ([("reason", "kernel_rx_dropped")], p.kernel_rx_dropped),
                    ([("reason", "kernel_rx_ring_full")], p.kernel_rx_ring_full),
                    ([("reason", "kernel_rx_fill_ring_empty")], p.kernel_rx_fill_ring_empty),
                    ([("reason", "kernel_tx_invalid_descs")], p.kernel_tx_invalid_descs),
                ],
            )?;
        }
        if let Some(svc) = &self.services {
            // Counters are per service port: one row per port, whatever its frontends. A port
            // the plan does not name yet (an agent restarted before the model is listed) is
            // left out: under empty names every such port would be one series, and its id
            // would name a series that goes when the plan comes.
            let mut seen = std::collections::BTreeSet::new();
            let ports: Vec<_> =
                svc.frontends.iter().filter(|f| !f.service.is_empty() && seen.insert(f.service_id)).collect();
            let labels = |f: &crate::agent::FrontendReport| ServiceLabels {
                namespace: f.namespace.clone(),
                service: f.service.clone(),
                port: f.port_name.clone(),
                protocol: f.protocol,
            };
            counter_family(
                &mut encoder,
                "contiv_service_connections",
                "Connections (sockets) and flows (packets) given a backend, per service port",
                ports.iter().map(|f| (labels(f), f.connections)),
            )?;
            counter_family(
                &mut encoder,
                "contiv_service_no_endpoint_rejects",
                "Connections refused or dropped for want of an endpoint, per service port",
                ports.iter().map(|f| (labels(f), f.no_endpoint_rejects)),
            )?;
            counter_family(
                &mut encoder,
                "contiv_service_source_denied",
                "Packets dropped by loadBalancerSourceRanges, per service port",
                ports.iter().map(|f| (labels(f), f.source_denied)),
            )?;
            counter_family(
                &mut encoder,
                "contiv_service_snat_exhausted",
                "New flows from outside to a backend on another node dropped: no free source port on the node's address, per service port",
                ports.iter().map(|f| (labels(f), f.snat_exhausted)),
            )?;
            gauge_family(
                &mut encoder,
                "contiv_service_backends",
                "Backends programmed (Cluster set)",
                ports.iter().map(|f| (labels(f), f.backends.len() as u64)),
            )?;
            let h = &svc.proxy_health;
            counter_family(
                &mut encoder,
                "contiv_proxy_healthz",
                "Answers of the proxy's /healthz (port 10256), by HTTP status",
                [([("code", "200")], h.healthz_200), ([("code", "503")], h.healthz_503)],
            )?;
            counter_family(
                &mut encoder,
                "contiv_proxy_livez",
                "Answers of the proxy's /livez, by HTTP status",
                [([("code", "200")], h.livez_200), ([("code", "503")], h.livez_503)],
            )?;
            counter(
                &mut encoder,
                "contiv_service_udp_sockets_aborted",
                "The node's connected UDP sockets aborted because the backend they were balanced to left the service",
                svc.udp_sockets_aborted_total,
            )?;
            counter(
                &mut encoder,
                "contiv_service_udp_sockets_untracked",
                "The node's connected UDP sockets balanced to a service while the table of them was full \
                 ([services] connectedUdpSockets): never aborted when their backend leaves",
                svc.udp_sockets_untracked_total,
            )?;
        }
        // The conntrack table serves NetworkPolicy as well as services, and is swept either way.
        if let Some(gc) = &self.conntrack.last_gc {
            let ct = ConstGauge::new(i64::try_from(gc.remaining).unwrap_or(i64::MAX));
            ct.encode(encoder.encode_descriptor(
                "contiv_conntrack_entries",
                "Entries in the conntrack map (one per direction of a flow), as the agent's last sweep (every 10 s) \
                 left it",
                None,
                ct.metric_type(),
            )?)?;
        }
        counter(
            &mut encoder,
            "contiv_conntrack_expired",
            "Conntrack entries removed by the agent's sweeps, idle past their timeout",
            self.conntrack.expired_total,
        )?;
        if let Some(p) = &self.slowpath.programs {
            counter_family(
                &mut encoder,
                "contiv_slowpath_program_packets",
                "Frames handled by the slow-path port's eBPF programs, by outcome",
                [
                    ([("outcome", "to_vswitch")], p.to_vswitch_packets),
                    ([("outcome", "to_vswitch_no_socket")], p.to_vswitch_no_socket),
                    ([("outcome", "from_vswitch_delivered")], p.from_vswitch_delivered),
                    ([("outcome", "from_vswitch_no_pod")], p.from_vswitch_no_pod),
                ],
            )?;
        }
        if let Some(m) = &self.monitor {
            for (name, help, get) in [
                (
                    "contiv_monitor_events",
                    "Datapath events written for the monitor, by kind",
                    (|c| c.emitted) as fn(&crate::datapath::MonitorCounters) -> u64,
                ),
                (
                    "contiv_monitor_events_suppressed",
                    "Datapath events not emitted because they exceeded the monitor's rate (the packets were \
                     handled and counted as usual), by kind",
                    |c| c.suppressed,
                ),
                (
                    "contiv_monitor_events_lost",
                    "Datapath events the monitor's ring buffer had no room for, by kind",
                    |c| c.lost,
                ),
            ] {
                counter_family(&mut encoder, name, help, m.iter().map(|(kind, c)| ([("kind", *kind)], get(c))))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::agent::{BackendReport, FrontendReport, SlowPortReport};

    fn pod(ns: &str, name: &str, fwd: u64) -> PodReport {
        PodReport {
            container_id: "c0ffee".into(),
            ifname: "eth0".into(),
            pod_namespace: ns.into(),
            pod_name: name.into(),
            labels: None,
            ip: Ipv4Addr::new(10, 1, 1, 2),
            host_ifname: "cv1".into(),
            host_ifindex: 7,
            pod_mac: "02:00:00:00:00:02".into(),
            counters: Some(CountersReport { fwd_packets: fwd, drop_spoofed_ip: 3, ..CountersReport::default() }),
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    fn no_slowpath() -> SlowPathReport {
        SlowPathReport { backend: "builtin", vpp: None, vswitch: None, port: None, programs: None }
    }

    fn frontend(id: u32, ns: &str, svc: &str, frontend: &str, connections: u64) -> FrontendReport {
        FrontendReport {
            namespace: ns.into(),
            service: svc.into(),
            port_name: String::new(),
            protocol: "TCP",
            frontend: frontend.into(),
            kind: "ClusterIP",
            flags: vec![],
            service_id: id,
            backends: vec![BackendReport { address: "10.1.2.3:8080".into(), local: false }],
            local_backends: vec![],
            connections,
            no_endpoint_rejects: 0,
            source_denied: 0,
            snat_exhausted: 0,
        }
    }

    /// The series of a scrape (name and labels of each sample), checked to be unique.
    fn unique_series(text: &str) -> Vec<&str> {
        let series: Vec<&str> =
            text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s)).collect();
        let mut seen = std::collections::BTreeSet::new();
        for s in &series {
            assert!(seen.insert(*s), "series {s} repeated in\n{text}");
        }
        series
    }

    #[test]
    fn a_pod_with_two_attachments_and_unplanned_service_ports_repeat_no_series() {
        // A StatefulSet pod recreated before its old sandbox's DEL: two attachments, one
        // name. And two service ports the plan does not name yet (after a restart), beside
        // one it does, with two frontends (ClusterIP and NodePort).
        let mut old = pod("shop", "web-0", 42);
        old.container_id = "old".into();
        let services = ServicesReport {
            enabled: true,
            frontends: vec![
                frontend(1, "shop", "web", "10.96.0.1:80", 5),
                frontend(1, "shop", "web", "*:30080", 5),
                frontend(7, "", "", "10.96.0.7:80", 2),
                frontend(8, "", "", "10.96.0.8:80", 3),
            ],
            ..Default::default()
        };
        let text = AgentMetrics::new().render(
            vec![old, pod("shop", "web-0", 8)],
            no_slowpath(),
            Some(services),
            None,
            None,
            ConntrackFill::default(),
        );
        let series = unique_series(&text);
        let l = lines(&text);
        for want in [
            "contiv_pod_forwarded_packets_total{namespace=\"shop\",pod=\"web-0\",interface=\"eth0\"} 50",
            "contiv_pod_dropped_packets_total{namespace=\"shop\",pod=\"web-0\",interface=\"eth0\",reason=\"spoofed_ip\"} 6",
            "contiv_pods 2",
            "contiv_service_connections_total{namespace=\"shop\",service=\"web\",port=\"\",protocol=\"TCP\"} 5",
            "contiv_service_backends{namespace=\"shop\",service=\"web\",port=\"\",protocol=\"TCP\"} 1",
        ] {
            assert!(l.contains(&want), "missing {want:?} in\n{text}");
        }
        assert!(!series.iter().any(|s| s.contains("service=\"\"")), "unnamed service ports left out:\n{text}");
    }

    #[test]
    fn conntrack_is_reported_with_services_off_as_the_last_sweep_left_it() {
        let sweep = crate::proxy::GcStats { scanned: 12, expired: 2, took_us: 5, remaining: 10, remaining_udp: 4 };
        let fill = ConntrackFill { last_gc: Some(sweep), expired_total: 17 };
        let text = AgentMetrics::new().render(vec![], no_slowpath(), None, None, None, fill);
        let l = lines(&text);
        for want in ["contiv_conntrack_entries 10", "contiv_conntrack_expired_total 17"] {
            assert!(l.contains(&want), "missing {want:?} in\n{text}");
        }
        assert!(text.contains("as the agent's last sweep"), "{text}");
        assert!(!text.contains("contiv_service_"), "services off: no service series\n{text}");
        // Before the first sweep the fill is unknown: not reported as 0.
        let text = AgentMetrics::new().render(vec![], no_slowpath(), None, None, None, ConntrackFill::default());
        assert!(!text.contains("contiv_conntrack_entries"), "{text}");
        assert!(lines(&text).contains(&"contiv_conntrack_expired_total 0"), "{text}");
    }

    #[test]
    fn pods_are_labelled_by_namespace_and_name_and_histograms_count_requests() {
        let m = AgentMetrics::new();
        m.observe_cni("ADD", 0, Duration::from_millis(3));
        m.observe_cni("ADD", 0, Duration::from_millis(5));
        m.observe_cni("DEL", 7, Duration::from_millis(1));
        let mut vswitch = contiv_vswitch::VswitchCounters { arp_replies: 4, ..Default::default() };
        vswitch.drops.fragment = 2;
        let slow = SlowPathReport {
            backend: "builtin",
            vpp: None,
            vswitch: Some(vswitch),
            port: None,
            programs: Some(SlowPortReport {
                to_vswitch_packets: 9,
                to_vswitch_no_socket: 0,
                from_vswitch_delivered: 8,
                from_vswitch_no_pod: 1,
            }),
        };
        let start = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let programming = crate::programming::ProgrammingMetrics::new(start);
        programming.programmed(&[start + Duration::from_secs(1)], start + Duration::from_secs(3));
        let monitor =
            MonitorTotals::from([("drop", crate::datapath::MonitorCounters { emitted: 5, suppressed: 7, lost: 0 })]);
        let text = m.render(
            vec![pod("shop", "web-0", 42), pod("", "", 1)],
            slow,
            None,
            Some(&programming),
            Some(monitor),
            ConntrackFill::default(),
        );
        assert!(text.contains("contiv_monitor_events_suppressed_total{kind=\"drop\"} 7"), "{text}");
        let l = lines(&text);
        for want in [
            "contiv_pod_forwarded_packets_total{namespace=\"shop\",pod=\"web-0\",interface=\"eth0\"} 42",
            "contiv_pod_forwarded_packets_total{namespace=\"\",pod=\"c0ffee\",interface=\"eth0\"} 1",
            "contiv_pod_dropped_packets_total{namespace=\"shop\",pod=\"web-0\",interface=\"eth0\",reason=\"spoofed_ip\"} 3",
            "contiv_pods 2",
            "contiv_slowpath_verdicts_total{verdict=\"reply\",reason=\"arp\"} 4",
            "contiv_slowpath_verdicts_total{verdict=\"drop\",reason=\"fragment\"} 2",
            "contiv_slowpath_program_packets_total{outcome=\"from_vswitch_no_pod\"} 1",
            "contiv_cni_request_duration_seconds_count{command=\"ADD\",code=\"0\"} 2",
            "contiv_cni_request_duration_seconds_count{command=\"DEL\",code=\"7\"} 1",
            "# TYPE contiv_cni_request_duration_seconds histogram",
            "contiv_network_programming_duration_seconds_count 1",
            "contiv_network_programming_duration_seconds_sum 2.0",
            "# EOF",
        ] {
            assert!(l.contains(&want), "missing {want:?} in\n{text}");
        }
    }
}
