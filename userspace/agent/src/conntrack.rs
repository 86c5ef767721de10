//! The conntrack table as an operator reads it (`GET /conntrack`, `netctl get conntrack`):
//! its entries grouped into flows (both directions together), each told from the side that
//! opened it, with the pods its addresses belong to, the service that translated it, its
//! TCP state, how long it has been idle and when the agent's sweep will remove it.
//!
//! The table keeps a translated flow's direction: the original entry carries the rewrite
//! (`DNAT`, `SNAT`), the reply's the rewrite back, and replies the node's stack or the
//! uplink must carry back are marked on the reply entry. An untranslated flow (policy
//! tracking, or a connection the socket programs balanced at `connect()`, which the packet
//! path sees already addressed to its backend) has two plain entries, and the table does
//! not say which side opened it: it is shown with the side of the higher port as the client
//! and `directed` false. An ICMP echo's entries do say it: the request's key and the
//! reply's differ (see `sides`).

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    time::Duration,
};

use contiv_common::{CtEntry, CtKey, ct_flags};
use serde::Serialize;

use crate::{
    config::CtTimeouts,
    monitor::Directory,
    proxy::{Flow, TcpState, ct_timeout, flows_of, tcp_state},
    services::IPPROTO_TCP,
    trace::{IPPROTO_ICMP, proto_name},
};

/// Flows shown when the request names no limit.
pub const DEFAULT_LIMIT: usize = 200;

/// The most flows one request is shown (`?limit=0`, "all", and larger limits get this
/// many): a full table is millions of flows, whose JSON would be gigabytes.
pub const MAX_LIMIT: usize = 100_000;

/// The table's fill as the agent's last sweep left it, and what the sweeps removed: what
/// `/services` and `/metrics` report without reading the table themselves (a full one is
/// 16 Mi entries, ~800 MB read). The sweep runs every 10 s, with services on or off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackFill {
    /// The last sweep (its `remaining`, `remaining_udp`); none before the first.
    pub last_gc: Option<crate::proxy::GcStats>,
    /// Entries the sweeps removed since the agent started.
    pub expired_total: u64,
}

/// Which flows to show. Every condition given must hold.
#[derive(Debug, Clone, Default)]
pub struct CtFilter {
    /// One of these addresses is in the flow (client, server, backend or source NAT): a
    /// pod's.
    pub addresses: Option<BTreeSet<Ipv4Addr>>,
    /// A service of these ids translated it.
    pub svc_ids: Option<BTreeSet<u32>>,
    /// Either one of these addresses is in it or a service of these ids translated it: a
    /// namespace's pods and services.
    pub addresses_or_svc_ids: Option<(BTreeSet<Ipv4Addr>, BTreeSet<u32>)>,
    /// At most this many flows, the most recently seen (0: all; a query never asks for
    /// more than [`MAX_LIMIT`]).
    pub limit: usize,
}

/// One flow.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FlowReport {
    pub protocol: &'static str,
    /// Who opened it, as its first packet showed it (`IP:PORT`; ICMP echo: `IP id N`).
    pub client: String,
    pub client_pod: Option<String>,
    /// What its first packet was addressed to: a service frontend, or the peer itself.
    pub server: String,
    pub server_pod: Option<String>,
    /// Where a service sent it (its destination rewritten on the packet path).
    pub backend: Option<String>,
    pub backend_pod: Option<String>,
    /// What the client's source was rewritten to (a NodePort to another node's backend, a
    /// hairpin).
    pub source_nat: Option<String>,
    /// `namespace/name` (`:port` for a named port) of the service that translated it.
    pub service: Option<String>,
    /// False for an untranslated flow, whose opener the table does not record (the side
    /// of the higher port is shown as the client).
    pub directed: bool,
    /// TCP only.
    pub state: Option<TcpState>,
    pub idle_seconds: u64,
    /// When the agent's sweep removes it, if it stays idle.
    pub expires_in_seconds: u64,
    /// Entries it has in the table: 2, or 1 when the other direction's was evicted.
    pub entries: u8,
    /// `fromUplink`: its client came through the uplink, and replies leave by it;
    /// `viaHost`: the node's stack delivered it, and replies go back through that stack.
    pub flags: Vec<&'static str>,
}

/// `GET /conntrack`.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackReport {
    pub node: String,
    /// Entries in the table (two a flow) and its size (`[services] conntrackEntries`).
    pub entries: usize,
    pub max: u32,
    /// Flows in the table, and how many of them the filter matched.
    pub flows_total: usize,
    pub matched: usize,
    /// The filter as asked (`pod=x/a`, ...), empty for none.
    pub filter: String,
    /// The most flows shown: the limit asked, 0 ("all") and anything larger being
    /// [`MAX_LIMIT`].
    pub limit: usize,
    /// The matching flows, most recently seen first, at most the limit asked.
    pub flows: Vec<FlowReport>,
}

/// Why `GET /conntrack` has no report.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The query names a pod or service this node does not know, or is malformed.
    #[error("{0}")]
    Query(String),
    /// The table could not be read.
    #[error("reading the conntrack table: {0}")]
    Read(String),
}

/// `GET /conntrack` parameters.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ConntrackQuery {
    /// `namespace/name`: flows with that pod's address in them (any node's pod).
    pub pod: Option<String>,
    /// `namespace/name`: flows that service translated on the packet path.
    pub service: Option<String>,
    /// Flows of that namespace's pods or services.
    pub namespace: Option<String>,
    /// At most this many flows, the most recently seen ([`DEFAULT_LIMIT`]; 0: all, up to
    /// [`MAX_LIMIT`], as is any larger limit).
    pub limit: Option<usize>,
}

impl ConntrackQuery {
    /// The filter this asks for, given the pods and the programmed service ports
    /// (id -> `namespace`, `name`) the node knows; an error names a pod or service it does
    /// not know.
    pub fn filter(&self, pods: &Directory, ports: &[(u32, &str, &str)]) -> Result<CtFilter, String> {
        let given = |o: &Option<String>| o.clone().filter(|v| !v.is_empty());
        let split = |what: &str, v: &str| -> Result<(String, String), String> {
            v.split_once('/')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
                .ok_or_else(|| format!("{what} {v:?}: expected NAMESPACE/NAME"))
        };
        let mut f = CtFilter { limit: self.limit(), ..Default::default() };
        if let Some(pod) = given(&self.pod) {
            split("pod", &pod)?;
            let ips: BTreeSet<Ipv4Addr> = pods.iter().filter(|(_, p)| p.id == pod).map(|(ip, _)| *ip).collect();
            if ips.is_empty() {
                return Err(format!("no pod {pod} with an IPv4 address is known here"));
            }
            f.addresses = Some(ips);
        }
        if let Some(svc) = given(&self.service) {
            let (ns, name) = split("service", &svc)?;
            let ids: BTreeSet<u32> =
                ports.iter().filter(|(_, n, s)| *n == ns && *s == name).map(|(id, _, _)| *id).collect();
            if ids.is_empty() {
                return Err(format!("service {svc} is not programmed here"));
            }
            f.svc_ids = Some(ids);
        }
        if let Some(ns) = given(&self.namespace) {
            let prefix = format!("{ns}/");
            let ips = pods.iter().filter(|(_, p)| p.id.starts_with(&prefix)).map(|(ip, _)| *ip).collect();
            let ids = ports.iter().filter(|(_, n, _)| *n == ns).map(|(id, _, _)| *id).collect();
            f.addresses_or_svc_ids = Some((ips, ids));
        }
        Ok(f)
    }

    /// The most flows to show: the limit asked ([`DEFAULT_LIMIT`] if none), "all" (0) and
    /// anything larger capped at [`MAX_LIMIT`].
    pub fn limit(&self) -> usize {
        match self.limit.unwrap_or(DEFAULT_LIMIT) {
            0 => MAX_LIMIT,
            n => n.min(MAX_LIMIT),
        }
    }

    /// The filter as asked, for the report's heading (`pod=x/a,limit=200`).
    pub fn describe(&self) -> String {
        [("pod", &self.pod), ("service", &self.service), ("namespace", &self.namespace)]
            .into_iter()
            .filter_map(|(k, v)| v.as_deref().filter(|v| !v.is_empty()).map(|v| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Who is who in a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sides {
    client: ([u8; 4], u16),
    server: ([u8; 4], u16),
    backend: Option<([u8; 4], u16)>,
    source_nat: Option<([u8; 4], u16)>,
    svc_id: Option<u32>,
    directed: bool,
}

impl Sides {
    fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        [Some(self.client), Some(self.server), self.backend, self.source_nat]
            .into_iter()
            .flatten()
            .map(|(ip, _)| ip.into())
    }
}

/// Tells a flow's sides from its entries (see the module docs).
fn sides(f: &Flow) -> Sides {
    let entries = [Some((f.key, f.entry)), f.pair];
    let with = |bits: u16| entries.iter().flatten().find(|(_, e)| e.flags & bits != 0).copied();
    let has = |e: &CtEntry, bit: u16| e.flags & bit != 0;
    if let Some((k, e)) = with(ct_flags::DNAT | ct_flags::SNAT) {
        return Sides {
            client: (k.src, k.sport),
            server: (k.dst, k.dport),
            backend: has(&e, ct_flags::DNAT).then_some((e.nat_ip, e.nat_port)),
            source_nat: has(&e, ct_flags::SNAT).then_some((e.nat2_ip, e.nat2_port)),
            svc_id: has(&e, ct_flags::DNAT).then_some(e.svc_id),
            directed: true,
        };
    }
    if let Some((k, e)) = with(ct_flags::REV_DNAT | ct_flags::REV_SNAT) {
        // Only the reply's entry is left: it holds the rewrites backwards.
        let rev_dnat = has(&e, ct_flags::REV_DNAT);
        let rev_snat = has(&e, ct_flags::REV_SNAT);
        return Sides {
            client: if rev_snat { (e.nat2_ip, e.nat2_port) } else { (k.dst, k.dport) },
            server: if rev_dnat { (e.nat_ip, e.nat_port) } else { (k.src, k.sport) },
            backend: rev_dnat.then_some((k.src, k.sport)),
            source_nat: rev_snat.then_some((k.dst, k.dport)),
            svc_id: rev_dnat.then_some(e.svc_id),
            directed: true,
        };
    }
    let plain = |k: &CtKey, directed| Sides {
        client: (k.src, k.sport),
        server: (k.dst, k.dport),
        backend: None,
        source_nat: None,
        svc_id: None,
        directed,
    };
    if f.key.proto == IPPROTO_ICMP {
        // An echo: its request's key is `(id, id + 1)`, its reply's `(id + 1, id)` (the
        // datapath's `policy::echo_ports`), so either entry tells who asked. Both sides
        // are shown with the identifier.
        let k = f.key;
        let request = k.dport == k.sport.wrapping_add(1);
        let (client, server) =
            if request { ((k.src, k.sport), (k.dst, k.sport)) } else { ((k.dst, k.dport), (k.src, k.dport)) };
        return Sides { client, server, backend: None, source_nat: None, svc_id: None, directed: true };
    }
    if let Some((k, _)) = with(ct_flags::FROM_UPLINK | ct_flags::VIA_HOST) {
        // Marks are set on the reply's entry.
        let mut s = plain(&k, true);
        std::mem::swap(&mut s.client, &mut s.server);
        return s;
    }
    let k = f.key;
    let mut s = plain(&k, false);
    if k.dport > k.sport {
        std::mem::swap(&mut s.client, &mut s.server);
    }
    s
}

fn endpoint((ip, port): ([u8; 4], u16), proto: u8) -> String {
    if proto == IPPROTO_ICMP {
        format!("{} id {port}", Ipv4Addr::from(ip))
    } else {
        format!("{}:{port}", Ipv4Addr::from(ip))
    }
}

/// The flows of a table snapshot that `filter` matches, most recently seen first, at most
/// `filter.limit`; and how many flows there are and how many matched. `now_ns`:
/// CLOCK_MONOTONIC, the datapath's clock; `services`: service ids -> names; `pods`:
/// addresses -> pods.
pub fn flows_report(
    entries: Vec<(CtKey, CtEntry)>,
    now_ns: u64,
    timeouts: &CtTimeouts,
    services: &HashMap<u32, String>,
    pods: &Directory,
    filter: &CtFilter,
) -> (Vec<FlowReport>, usize, usize) {
    let flows = flows_of(entries);
    let total = flows.len();
    let mut matched: Vec<(Flow, Sides)> = flows
        .into_iter()
        .map(|f| {
            let s = sides(&f);
            (f, s)
        })
        .filter(|(_, s)| {
            let has_addr = |set: &BTreeSet<Ipv4Addr>| s.addresses().any(|a| set.contains(&a));
            let has_svc = |set: &BTreeSet<u32>| s.svc_id.is_some_and(|id| set.contains(&id));
            filter.addresses.as_ref().is_none_or(has_addr)
                && filter.svc_ids.as_ref().is_none_or(has_svc)
                && filter.addresses_or_svc_ids.as_ref().is_none_or(|(a, ids)| has_addr(a) || has_svc(ids))
        })
        .collect();
    let n_matched = matched.len();
    matched.sort_by_key(|(f, _)| std::cmp::Reverse(f.last_seen_ns()));
    if filter.limit > 0 {
        matched.truncate(filter.limit);
    }
    let pod = |ip: [u8; 4]| pods.get(&Ipv4Addr::from(ip)).map(|p| p.id.clone());
    let reports = matched
        .into_iter()
        .map(|(f, s)| {
            let proto = f.key.proto;
            let pair = f.pair.as_ref().map(|(_, e)| e);
            let idle = Duration::from_nanos(now_ns.saturating_sub(f.last_seen_ns()));
            let timeout = ct_timeout(&f.key, &f.entry, pair, timeouts);
            let marks = f.entry.flags | pair.map_or(0, |e| e.flags);
            FlowReport {
                protocol: proto_name(proto),
                client: endpoint(s.client, proto),
                client_pod: pod(s.client.0),
                server: endpoint(s.server, proto),
                server_pod: pod(s.server.0),
                backend: s.backend.map(|b| endpoint(b, proto)),
                backend_pod: s.backend.and_then(|b| pod(b.0)),
                source_nat: s.source_nat.map(|n| endpoint(n, proto)),
                service: s.svc_id.map(|id| services.get(&id).cloned().unwrap_or_else(|| format!("(service id {id})"))),
                directed: s.directed,
                state: (proto == IPPROTO_TCP).then(|| tcp_state(&f.entry, pair)),
                idle_seconds: idle.as_secs(),
                expires_in_seconds: timeout.saturating_sub(idle).as_secs(),
                entries: if f.pair.is_some() { 2 } else { 1 },
                flags: [(ct_flags::FROM_UPLINK, "fromUplink"), (ct_flags::VIA_HOST, "viaHost")]
                    .into_iter()
                    .filter(|(bit, _)| marks & bit != 0)
                    .map(|(_, name)| name)
                    .collect(),
            }
        })
        .collect();
    (reports, total, n_matched)
}

#[cfg(test)]
mod tests {
    use contiv_common::ct_tcp;

    use super::*;
    use crate::{monitor::PodName, services::IPPROTO_UDP};

    const SEC: u64 = 1_000_000_000;

    fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> CtKey {
        CtKey { src, dst, sport, dport, proto, _pad: [0; 3] }
    }

    fn names() -> (HashMap<u32, String>, Directory) {
        let services = HashMap::from([(7, "x/web:http".to_owned())]);
        let mut pods = Directory::new();
        for (ip, id) in [([10, 1, 1, 2], "x/a"), ([10, 1, 1, 3], "x/b"), ([10, 1, 2, 4], "y/c")] {
            pods.insert(Ipv4Addr::from(ip), PodName { id: id.into(), interface: None });
        }
        (services, pods)
    }

    /// A pod's TCP flow to a ClusterIP DNAT'ed on the packet path, established; a NodePort
    /// flow from outside, SNAT'ed to a backend on another node, whose original entry was
    /// evicted; a plain UDP flow; a flow the node's stack delivered.
    fn table(now: u64) -> Vec<(CtKey, CtEntry)> {
        let both = ct_tcp::SYN | ct_tcp::ACK;
        let dnat = key([10, 1, 1, 2], 40000, [10, 96, 0, 10], 80, IPPROTO_TCP);
        let dnat_e = CtEntry {
            last_seen_ns: now - 3 * SEC,
            nat_ip: [10, 1, 1, 3],
            nat_port: 8080,
            flags: ct_flags::DNAT,
            tcp_flags: both,
            svc_id: 7,
            ..Default::default()
        };
        let dnat_rev = key([10, 1, 1, 3], 8080, [10, 1, 1, 2], 40000, IPPROTO_TCP);
        let dnat_rev_e = CtEntry {
            last_seen_ns: now - 2 * SEC,
            nat_ip: [10, 96, 0, 10],
            nat_port: 80,
            flags: ct_flags::REV_DNAT,
            tcp_flags: both,
            svc_id: 7,
            ..Default::default()
        };
        // 203.0.113.9:5555 -> 192.168.1.1:30080 => 10.1.2.4:8080, SNAT'ed to 192.168.1.1:61000: only the reply left.
        let np_rev = key([10, 1, 2, 4], 8080, [192, 168, 1, 1], 61000, IPPROTO_TCP);
        let np_rev_e = CtEntry {
            last_seen_ns: now - 50 * SEC,
            nat_ip: [192, 168, 1, 1],
            nat_port: 30080,
            nat2_ip: [203, 0, 113, 9],
            nat2_port: 5555,
            flags: ct_flags::REV_DNAT | ct_flags::REV_SNAT | ct_flags::FROM_UPLINK,
            tcp_flags: ct_tcp::SYN,
            svc_id: 7,
            ..Default::default()
        };
        // Plain UDP 10.1.1.2:53 <-> 10.1.2.4:35000, listed from the side of the lower port.
        let udp = key([10, 1, 1, 2], 53, [10, 1, 2, 4], 35000, IPPROTO_UDP);
        let udp_e = CtEntry { last_seen_ns: now - 10 * SEC, ..Default::default() };
        let udp_rev = key([10, 1, 2, 4], 35000, [10, 1, 1, 2], 53, IPPROTO_UDP);
        // The stack delivered 192.168.1.7:44000 -> 10.1.1.3:9000 (a hostPort): reply marked.
        // Only the pod's direction passes the datapath's lookups: the client's entry keeps
        // no flags, the pod's has answered and finished.
        let host = key([192, 168, 1, 7], 44000, [10, 1, 1, 3], 9000, IPPROTO_TCP);
        let host_e = CtEntry { last_seen_ns: now - 20 * SEC, ..Default::default() };
        let host_rev = key([10, 1, 1, 3], 9000, [192, 168, 1, 7], 44000, IPPROTO_TCP);
        let host_rev_e = CtEntry { flags: ct_flags::VIA_HOST, tcp_flags: both | ct_tcp::FIN, ..host_e };
        vec![
            (dnat, dnat_e),
            (dnat_rev, dnat_rev_e),
            (np_rev, np_rev_e),
            (udp, udp_e),
            (udp_rev, udp_e),
            (host, host_e),
            (host_rev, host_rev_e),
        ]
    }

    fn report(filter: &CtFilter) -> (Vec<FlowReport>, usize, usize) {
        let now = 1000 * SEC;
        let (services, pods) = names();
        flows_report(table(now), now, &CtTimeouts::default(), &services, &pods, filter)
    }

    #[test]
    fn flows_are_told_from_the_side_that_opened_them_most_recent_first() {
        let (flows, total, matched) = report(&CtFilter::default());
        assert_eq!((total, matched, flows.len()), (4, 4, 4));

        let f = &flows[0];
        assert_eq!((f.client.as_str(), f.client_pod.as_deref()), ("10.1.1.2:40000", Some("x/a")));
        assert_eq!((f.server.as_str(), f.server_pod.as_deref()), ("10.96.0.10:80", None));
        assert_eq!((f.backend.as_deref(), f.backend_pod.as_deref()), (Some("10.1.1.3:8080"), Some("x/b")));
        assert_eq!((f.service.as_deref(), f.source_nat.as_deref()), (Some("x/web:http"), None));
        assert_eq!((f.state, f.idle_seconds, f.entries, f.directed), (Some(TcpState::Established), 2, 2, true));
        assert_eq!(f.expires_in_seconds, 21600 - 2);

        let f = &flows[1];
        assert_eq!(f.protocol, "UDP");
        assert!(!f.directed);
        assert_eq!(
            (f.client.as_str(), f.server.as_str()),
            ("10.1.2.4:35000", "10.1.1.2:53"),
            "higher port as the client"
        );
        assert_eq!((f.state, f.expires_in_seconds), (None, 60 - 10));

        let f = &flows[2];
        assert_eq!((f.client.as_str(), f.server.as_str()), ("192.168.1.7:44000", "10.1.1.3:9000"));
        assert_eq!((f.directed, f.flags.as_slice(), f.state), (true, &["viaHost"][..], Some(TcpState::Finishing)));
        assert_eq!(f.expires_in_seconds, 100, "finishing (a FIN seen one way only): 120 s, idle 20 s");

        let f = &flows[3];
        assert_eq!((f.client.as_str(), f.server.as_str()), ("203.0.113.9:5555", "192.168.1.1:30080"));
        assert_eq!((f.backend.as_deref(), f.backend_pod.as_deref()), (Some("10.1.2.4:8080"), Some("y/c")));
        assert_eq!(f.source_nat.as_deref(), Some("192.168.1.1:61000"));
        assert_eq!((f.entries, f.flags.as_slice(), f.state), (1, &["fromUplink"][..], Some(TcpState::Opening)));
        assert_eq!(f.expires_in_seconds, 10, "opening: 60 s, idle 50 s");
    }

    #[test]
    fn an_echo_is_told_from_the_side_that_asked_by_either_entry() {
        let now = 1000 * SEC;
        let (services, pods) = names();
        let e = |ago: u64| CtEntry { last_seen_ns: now - ago * SEC, ..Default::default() };
        // 10.1.1.2 pings 10.1.2.4 with identifier 0x4242: request (id, id + 1), reply
        // (id + 1, id). 10.1.1.3 pinged 10.1.1.2 with 0xffff (the request's entry wraps),
        // and only the reply's entry is left.
        let table = vec![
            (key([10, 1, 1, 2], 0x4242, [10, 1, 2, 4], 0x4243, IPPROTO_ICMP), e(1)),
            (key([10, 1, 2, 4], 0x4243, [10, 1, 1, 2], 0x4242, IPPROTO_ICMP), e(1)),
            (key([10, 1, 1, 2], 0, [10, 1, 1, 3], 0xffff, IPPROTO_ICMP), e(5)),
        ];
        let (flows, total, _) =
            flows_report(table, now, &CtTimeouts::default(), &services, &pods, &CtFilter::default());
        assert_eq!((total, flows.len()), (2, 2));
        let shown = |f: &FlowReport| (f.client.clone(), f.server.clone(), f.directed, f.entries);
        assert_eq!(shown(&flows[0]), ("10.1.1.2 id 16962".into(), "10.1.2.4 id 16962".into(), true, 2));
        assert_eq!(shown(&flows[1]), ("10.1.1.3 id 65535".into(), "10.1.1.2 id 65535".into(), true, 1));
    }

    #[test]
    fn a_query_names_pods_and_services_the_node_knows() {
        let (_, pods) = names();
        let ports = [(7, "x", "web"), (8, "x", "web"), (9, "y", "db")];
        let q = |pod: &str, service: &str, namespace: &str| ConntrackQuery {
            pod: Some(pod.into()),
            service: Some(service.into()),
            namespace: Some(namespace.into()),
            limit: None,
        };
        let f = q("x/a", "x/web", "y").filter(&pods, &ports).unwrap();
        assert_eq!(f.addresses, Some(BTreeSet::from([Ipv4Addr::new(10, 1, 1, 2)])));
        assert_eq!(f.svc_ids, Some(BTreeSet::from([7, 8])), "every port of the service");
        assert_eq!(f.addresses_or_svc_ids, Some((BTreeSet::from([Ipv4Addr::new(10, 1, 2, 4)]), BTreeSet::from([9]))));
        assert_eq!(f.limit, DEFAULT_LIMIT);
        assert_eq!(q("x/a", "x/web", "y").describe(), "pod=x/a,service=x/web,namespace=y");

        let none = q("", "", "").filter(&pods, &ports).unwrap();
        assert!(none.addresses.is_none() && none.svc_ids.is_none() && none.addresses_or_svc_ids.is_none());
        assert_eq!(q("", "", "").describe(), "");

        assert_eq!(
            q("x/zz", "", "").filter(&pods, &ports).unwrap_err(),
            "no pod x/zz with an IPv4 address is known here"
        );
        assert_eq!(q("", "x/db", "").filter(&pods, &ports).unwrap_err(), "service x/db is not programmed here");
        assert_eq!(q("a", "", "").filter(&pods, &ports).unwrap_err(), "pod \"a\": expected NAMESPACE/NAME");
    }

    #[test]
    fn filters_match_a_pod_anywhere_in_a_flow_a_service_and_a_namespace() {
        let pod_c = CtFilter { addresses: Some(BTreeSet::from([Ipv4Addr::new(10, 1, 2, 4)])), ..Default::default() };
        let (flows, total, matched) = report(&pod_c);
        assert_eq!((total, matched), (4, 2));
        assert!(
            flows.iter().all(|f| f.client_pod.as_deref() == Some("y/c") || f.backend_pod.as_deref() == Some("y/c"))
        );

        let web = CtFilter { svc_ids: Some(BTreeSet::from([7])), ..Default::default() };
        let (flows, _, matched) = report(&web);
        assert_eq!(matched, 2);
        assert!(flows.iter().all(|f| f.service.as_deref() == Some("x/web:http")));

        // Namespace x: its pods (10.1.1.2, 10.1.1.3) or its service.
        let x = CtFilter {
            addresses_or_svc_ids: Some((
                BTreeSet::from([Ipv4Addr::new(10, 1, 1, 2), Ipv4Addr::new(10, 1, 1, 3)]),
                BTreeSet::from([7]),
            )),
            ..Default::default()
        };
        assert_eq!(report(&x).2, 4);
        let only_pods = CtFilter {
            addresses_or_svc_ids: Some((BTreeSet::from([Ipv4Addr::new(10, 1, 2, 4)]), BTreeSet::new())),
            ..Default::default()
        };
        assert_eq!(report(&only_pods).2, 2);

        // Both conditions must hold; a limit keeps the most recent.
        let both = CtFilter { limit: 1, ..pod_c.clone() };
        let both = CtFilter { svc_ids: Some(BTreeSet::from([7])), ..both };
        let (flows, _, matched) = report(&both);
        assert_eq!((matched, flows.len()), (1, 1));
        assert_eq!(flows[0].client, "203.0.113.9:5555");
        let (flows, _, matched) = report(&CtFilter { limit: 2, ..Default::default() });
        assert_eq!((matched, flows.len(), flows[0].client.as_str()), (4, 2, "10.1.1.2:40000"));
    }

    #[test]
    fn all_flows_and_any_larger_limit_are_capped() {
        let (_, pods) = names();
        let limit = |limit| ConntrackQuery { limit, ..Default::default() }.filter(&pods, &[]).unwrap().limit;
        // netctl sends no limit by default, `--limit 0` for all.
        assert_eq!(limit(None), DEFAULT_LIMIT);
        assert_eq!(limit(Some(0)), MAX_LIMIT, "0 (all) is not unbounded");
        assert_eq!(limit(Some(MAX_LIMIT + 1)), MAX_LIMIT);
        assert_eq!(limit(Some(usize::MAX)), MAX_LIMIT);
        assert_eq!(limit(Some(5)), 5);
    }
}
