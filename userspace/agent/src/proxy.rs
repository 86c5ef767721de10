//! The service proxy's runtime: installs a [`ServicePlan`] into the maps as a diff,
//! resyncs from what the maps hold after a restart, follows removed backends (refusals for
//! the ones whose pod is gone, conntrack cleanup for UDP), and expires conntrack entries.
//!
//! Map write order keeps every lookup the datapath makes consistent: new and changed
//! backends before the frontends that count them (and before the slots that say where they
//! are), removed frontends before the backends they led to (and stale slots before those).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use contiv_common::{
    CtEntry, CtKey, NodeAddr, SvcBackend, SvcBackendKey, SvcFrontend, SvcKey, SvcSlotKey, ct_flags, ct_tcp,
};
use contiv_node_registry::NodeRegistration;
use ipnet::Ipv4Net;

use crate::{
    config::CtTimeouts,
    datapath::{CtTable, Datapath, DatapathError},
    services::{
        IPPROTO_TCP, IPPROTO_UDP, PlanDelta, ServiceChanges, ServiceParams, ServicePlan, ServicePlanner, ServiceSource,
    },
};

/// How long a removed backend whose pod is gone is refused (TCP RST / ICMP) rather than
/// left to time out.
pub const DEAD_BACKEND_TTL: Duration = Duration::from_secs(60);

/// How soon an apply that stopped at a map error is tried again.
pub const APPLY_RETRY: Duration = Duration::from_secs(1);

const IPPROTO_ICMP: u8 = 1;

/// What the maps hold (as installed by this agent, or read back after a restart).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Installed {
    pub frontends: BTreeMap<SvcKey, SvcFrontend>,
    pub backends: BTreeMap<SvcBackendKey, SvcBackend>,
    pub slots: BTreeMap<SvcSlotKey, u32>,
    pub source_ranges: BTreeSet<(u32, Ipv4Net)>,
    pub node_addrs: BTreeMap<Ipv4Addr, NodeAddr>,
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    pub dead: BTreeSet<SvcKey>,
}

/// What one apply changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyStats {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    pub dead_backends: usize,
    pub conntrack_flushed: usize,
}

/// The proxy's state across applies.
#[derive(Debug)]
pub struct Proxy {
    installed: Installed,
    /// The plan, kept up to date one service at a time.
    planner: ServicePlanner,
    /// The next apply compares every entry with what is installed: after a resync (the
    /// maps may hold what no plan has), and after an apply that stopped at an error.
    full: bool,
    /// The last apply stopped at an error.
    failed: bool,
    /// Backends that left a plan, and when (refused while their pod is gone, for
    /// [`DEAD_BACKEND_TTL`]).
    removed: BTreeMap<(Ipv4Addr, u16, u8), Instant>,
    /// Conntrack flows to forget once the maps are written; kept until a flush succeeds,
    /// so an apply that stops at an error still forgets them on its retry.
    flush: Flush,
    /// See [`Proxy::udp_answers_via_stack`].
    udp_answers_via_stack: bool,
    /// The cluster's pod range (`podSubnetCIDR`): what the node masquerades pods' traffic
    /// out of, so a backend beyond it answers them through the node's stack.
    cluster_pod_cidr: Ipv4Net,
    /// (service port id, backend ip, port) that left UDP service ports in the applies since
    /// [`Proxy::take_udp_left`] was last called.
    udp_left: BTreeSet<(u32, [u8; 4], u16)>,
    /// Service port ids whose counters go once an apply succeeds.
    counters_gone: BTreeSet<u32>,
    /// The maps were read back and no apply has succeeded since: the first one also
    /// finds the backends that left while no agent ran.
    resynced: bool,
    /// The DEAD_BACKENDS map's size: the most recently removed dead backends it holds.
    dead_backends_max: usize,
    /// Every backend found dead by the last apply, in the map or beyond its size (whose
    /// flows were flushed when found).
    dead_seen: BTreeSet<SvcKey>,
    pub applies: u64,
}

/// Which conntrack flows an apply forgets.
#[derive(Debug, Default)]
struct Flush {
    /// (service port id, backend ip, port): UDP flows the service balanced to a backend
    /// that has left it (kube-proxy's stale UDP entries). The next datagram of a client
    /// that keeps its source port picks a current backend; other services' flows to the
    /// same backend stay.
    svc_udp: BTreeSet<(u32, [u8; 4], u16)>,
    /// (ip, port, protocol): every flow to a backend whose pod is gone.
    backends: BTreeSet<(Ipv4Addr, u16, u8)>,
    /// (address, port) of UDP frontends that start answering (new, or with backends again):
    /// a client's datagrams there before were a plain flow, routed on untranslated, and
    /// conntrack, looked up before the frontends, would keep them so for as long as the
    /// client keeps its source port (kube-proxy deletes these entries too).
    udp_frontends: BTreeSet<([u8; 4], u16)>,
}

impl Flush {
    fn is_empty(&self) -> bool {
        self.svc_udp.is_empty() && self.backends.is_empty() && self.udp_frontends.is_empty()
    }
}

/// The map writes that bring what is installed to the plan, in the order they are made.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Writes {
    pub backends: Vec<(SvcBackendKey, SvcBackend)>,
    pub slots: Vec<(SvcSlotKey, u32)>,
    pub node_addrs: Vec<(Ipv4Addr, NodeAddr)>,
    pub source_ranges: Vec<(u32, Ipv4Net)>,
    pub frontends: Vec<(SvcKey, SvcFrontend)>,
    pub cluster_ips: Vec<Ipv4Addr>,
    pub frontends_removed: Vec<SvcKey>,
    pub cluster_ips_removed: Vec<Ipv4Addr>,
    pub source_ranges_removed: Vec<(u32, Ipv4Net)>,
    pub slots_removed: Vec<SvcSlotKey>,
    pub backends_removed: Vec<SvcBackendKey>,
    pub node_addrs_removed: Vec<Ipv4Addr>,
}

/// Puts and deletes of the keys in `keys` (every key of both sides when `None`).
fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    keys: Option<&BTreeSet<K>>,
) -> (Vec<(K, V)>, Vec<K>) {
    match keys {
        None => (changed(have, want), removed(have, want)),
        Some(keys) => {
            let mut put = vec![];
            let mut del = vec![];
            for k in keys {
                match (want.get(k), have.get(k)) {
                    (Some(w), h) if h != Some(w) => put.push((*k, *w)),
                    (None, Some(_)) => del.push(*k),
                    _ => {}
                }
            }
            (put, del)
        }
    }
}

/// What to write so that the maps hold `plan`, given that only the entries `delta` names
/// may differ from `installed` (any entry when `full`).
pub fn writes(installed: &Installed, plan: &ServicePlan, delta: &PlanDelta, full: bool) -> Writes {
    let full = full || delta.full;
    let (backends, backends_removed) = diff(&installed.backends, &plan.backends, (!full).then_some(&delta.backends));
    let (slots, slots_removed) = diff(&installed.slots, &plan.slots, (!full).then_some(&delta.slots));
    let (frontends, frontends_removed) =
        diff(&installed.frontends, &plan.frontends, (!full).then_some(&delta.frontends));
    let (node_addrs, node_addrs_removed) =
        if full || delta.node_addrs { diff(&installed.node_addrs, &plan.node_addrs, None) } else { (vec![], vec![]) };
    let (source_ranges, source_ranges_removed) =
        set_diff(&installed.source_ranges, &plan.source_ranges, (!full).then_some(&delta.source_ranges));
    let (have_ips, want_ips) = (&installed.cluster_ips, &plan.cluster_ips);
    let (cluster_ips, cluster_ips_removed) = if full {
        (
            want_ips.keys().filter(|ip| !have_ips.contains(ip)).copied().collect(),
            have_ips.iter().filter(|ip| !want_ips.contains_key(ip)).copied().collect(),
        )
    } else {
        let ips = &delta.cluster_ips;
        (
            ips.iter().filter(|ip| want_ips.contains_key(ip) && !have_ips.contains(ip)).copied().collect(),
            ips.iter().filter(|ip| !want_ips.contains_key(ip) && have_ips.contains(ip)).copied().collect(),
        )
    };
    Writes {
        backends,
        slots,
        node_addrs,
        source_ranges,
        frontends,
        cluster_ips,
        frontends_removed,
        cluster_ips_removed,
        source_ranges_removed,
        slots_removed,
        backends_removed,
        node_addrs_removed,
    }
}

/// Additions and removals of the members in `keys` (every member of both sides when `None`).
fn set_diff<K: Ord + Copy>(have: &BTreeSet<K>, want: &BTreeSet<K>, keys: Option<&BTreeSet<K>>) -> (Vec<K>, Vec<K>) {
    match keys {
        None => (want.difference(have).copied().collect(), have.difference(want).copied().collect()),
        Some(keys) => (
            keys.iter().filter(|k| want.contains(k) && !have.contains(k)).copied().collect(),
            keys.iter().filter(|k| !want.contains(k) && have.contains(k)).copied().collect(),
        ),
    }
}

fn changed<K: Ord + Copy, V: PartialEq + Copy>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Vec<(K, V)> {
    want.iter().filter(|(k, v)| have.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect()
}

fn removed<K: Ord + Copy, V>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Vec<K> {
    have.keys().filter(|k| !want.contains_key(k)).copied().collect()
}

fn svc_key(ip: Ipv4Addr, port: u16, proto: u8) -> SvcKey {
    SvcKey { ip: ip.octets(), port, proto, _pad: 0 }
}

/// The other direction's key of a conntrack entry.
pub fn ct_pair(k: &CtKey, e: &CtEntry) -> CtKey {
    let mut p = CtKey { src: k.dst, dst: k.src, sport: k.dport, dport: k.sport, proto: k.proto, _pad: [0; 3] };
    // Original direction: the reply comes from the backend to the (SNAT'ed) client. A flow
    // may have either rewrite alone (a pod's flow that took another source port because
    // its reply's addresses were taken has SNAT only).
    if e.flags & ct_flags::DNAT != 0 {
        p.src = e.nat_ip;
        p.sport = e.nat_port;
    }
    if e.flags & ct_flags::SNAT != 0 {
        p.dst = e.nat2_ip;
        p.dport = e.nat2_port;
    }
    // Reply direction: the original went from the client to the frontend.
    if e.flags & ct_flags::REV_DNAT != 0 {
        p.dst = e.nat_ip;
        p.dport = e.nat_port;
    }
    if e.flags & ct_flags::REV_SNAT != 0 {
        p.src = e.nat2_ip;
        p.sport = e.nat2_port;
    }
    p
}

/// Where a TCP flow stands, from the flags its two directions have seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TcpState {
    /// The handshake has not completed (both directions have not acknowledged).
    Opening,
    Established,
    /// A FIN where only one direction can be seen (the other is carried by the node's stack,
    /// or its entry was evicted): a half-close or a close, which cannot be told apart. It
    /// lives [`FIN_WAIT`], netfilter's `fin_wait` and `time_wait`.
    Finishing,
    /// Reset, or finished in both directions.
    Closing,
}

/// How long a [`TcpState::Finishing`] flow lives idle (at least `tcpClosing`).
pub const FIN_WAIT: Duration = Duration::from_secs(120);

/// How long a flow the datapath SNAT'ed to a port of its own lives after a FIN each way
/// (netfilter's `time_wait`, at least `tcpClosing`): the backend may hold the connection
/// in TIME_WAIT for 60 s, and its port, once the entries go, is free for another client;
/// a new SYN on that 4-tuple would meet the old connection.
pub const SNAT_TIME_WAIT: Duration = Duration::from_secs(120);

/// The state of a TCP flow from its entry and its other direction's.
///
/// A FIN closes one direction only: a client that has sent all it has (`shutdown(SHUT_WR)`)
/// may wait long for the answer, which must still find the flow, so a half-closed flow stays
/// established. Closing takes a reset, or a FIN each way.
///
/// A direction that has seen no flag is one whose packets the datapath never looks up: the
/// node's stack carries them (a flow it delivered, `VIA_HOST`, whose client reaches the pod
/// through it; the answers of a pod's masqueraded connection out). The flow is then told by
/// the other direction alone, as is a flow whose other entry was evicted (the LRU table
/// evicts first the direction the datapath never looks up): an ACK there means the
/// handshake completed, a FIN that it is finishing.
///
/// Not so for a flow from outside the cluster that a frontend translated (its reply entry
/// is `FROM_UPLINK`): the datapath looks up every answer of those (from a pod, another
/// node, the wire, or the node's stack to the uplink), so a reply entry that saw no flag
/// means the backend never answered. Such a flow is opening (or closing, on a reset), as
/// netfilter keeps a flow that saw no reply on its short timeouts: a stray ACK from
/// outside to an externalIP would otherwise hold two entries for the established time.
pub fn tcp_state(e: &CtEntry, pair: Option<&CtEntry>) -> TcpState {
    let (one_sided, silent) = match pair {
        None => (Some(e), None),
        Some(p) if p.tcp_flags == 0 => (Some(e), Some(p)),
        Some(p) if e.tcp_flags == 0 => (Some(p), Some(e)),
        _ => (None, None),
    };
    if let Some(x) = one_sided {
        let unanswered = silent.is_some_and(|s| s.flags & ct_flags::FROM_UPLINK != 0);
        return if x.tcp_flags & ct_tcp::RST != 0 {
            TcpState::Closing
        } else if unanswered {
            TcpState::Opening
        } else if x.tcp_flags & ct_tcp::FIN != 0 {
            TcpState::Finishing
        } else if x.tcp_flags & ct_tcp::ACK != 0 {
            TcpState::Established
        } else {
            TcpState::Opening
        };
    }
    let flags = e.tcp_flags | pair.map_or(0, |p| p.tcp_flags);
    let finished = |x: &CtEntry| x.tcp_flags & ct_tcp::FIN != 0;
    if flags & ct_tcp::RST != 0 || (finished(e) && pair.is_some_and(finished)) {
        TcpState::Closing
    } else if e.tcp_flags & ct_tcp::ACK != 0 && pair.is_some_and(|p| p.tcp_flags & ct_tcp::ACK != 0) {
        TcpState::Established
    } else {
        TcpState::Opening
    }
}

/// How long an idle entry lives.
pub fn ct_timeout(k: &CtKey, e: &CtEntry, pair: Option<&CtEntry>, t: &CtTimeouts) -> Duration {
    let secs = match k.proto {
        IPPROTO_TCP => match tcp_state(e, pair) {
            TcpState::Closing => {
                let snat = |x: &CtEntry| x.flags & (ct_flags::SNAT | ct_flags::REV_SNAT) != 0;
                let reset = (e.tcp_flags | pair.map_or(0, |p| p.tcp_flags)) & ct_tcp::RST != 0;
                if !reset && (snat(e) || pair.is_some_and(snat)) {
                    (SNAT_TIME_WAIT.as_secs() as u32).max(t.tcp_closing)
                } else {
                    t.tcp_closing
                }
            }
            TcpState::Finishing => {
                (FIN_WAIT.as_secs() as u32).clamp(t.tcp_closing, t.tcp_established.max(t.tcp_closing))
            }
            TcpState::Established => t.tcp_established,
            TcpState::Opening => t.tcp_syn,
        },
        IPPROTO_UDP => t.udp,
        IPPROTO_ICMP => t.icmp,
        _ => t.udp,
    };
    Duration::from_secs(u64::from(secs))
}

/// What a conntrack sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GcStats {
    pub scanned: usize,
    pub expired: usize,
    /// How long the sweep took (read, decide, delete), in microseconds.
    pub took_us: u64,
    /// The table's fill as the sweep left it (entries read less those it removed), and of
    /// them UDP: what `/services` and `/metrics` report, without reading the table again.
    pub remaining: usize,
    pub remaining_udp: usize,
}

impl Proxy {
    pub fn new(params: ServiceParams, cluster_pod_cidr: Ipv4Net) -> Self {
        Proxy {
            cluster_pod_cidr,
            installed: Installed::default(),
            planner: ServicePlanner::new(params),
            full: true,
            failed: false,
            removed: BTreeMap::new(),
            flush: Flush::default(),
            udp_left: BTreeSet::new(),
            counters_gone: BTreeSet::new(),
            resynced: false,
            udp_answers_via_stack: false,
            dead_backends_max: contiv_common::MAX_DEAD_BACKENDS as usize,
            dead_seen: BTreeSet::new(),
            applies: 0,
        }
    }

    pub fn plan(&self) -> &ServicePlan {
        self.planner.plan()
    }

    /// Whether a plan was made once (the first is always of everything).
    pub fn planned(&self) -> bool {
        self.planner.planned()
    }

    pub fn params(&self) -> &ServiceParams {
        self.planner.params()
    }

    pub fn installed(&self) -> &Installed {
        &self.installed
    }

    /// Reads back what the maps hold (after a restart): the next apply then writes only
    /// what differs, and live entries are never removed and re-added.
    pub fn resync(&mut self, dp: &Datapath) -> Result<(), DatapathError> {
        self.installed = Installed {
            frontends: dp.svc_frontends()?,
            backends: dp.svc_backends()?,
            slots: dp.svc_backend_slots()?,
            source_ranges: dp.source_ranges()?,
            node_addrs: dp.node_addrs()?,
            cluster_ips: dp.cluster_ips()?,
            dead: dp.dead_backends()?,
        };
        // The refusals in force stay, for a whole DEAD_BACKEND_TTL from now (when their
        // backends left is not recorded).
        let now = Instant::now();
        for k in &self.installed.dead {
            self.removed.insert((Ipv4Addr::from(k.ip), k.port, k.proto), now);
        }
        self.full = true;
        self.resynced = true;
        Ok(())
    }

    /// Brings the plan up to date after `changes` (no map is written yet).
    pub fn update(&mut self, src: &impl ServiceSource, changes: &ServiceChanges) -> PlanDelta {
        self.planner.update(src, changes)
    }

    /// Whether [`Proxy::apply`] of `delta` needs the addresses pods hold: only while some
    /// removed backend may be refused (after a restart, any the maps hold may be), or a
    /// flush of a dead one's flows is pending.
    pub fn needs_live_ips(&self, delta: &PlanDelta) -> bool {
        self.resynced || !self.removed.is_empty() || !self.flush.backends.is_empty() || !delta.endpoints_gone.is_empty()
    }

    /// Installs what `delta` (from [`Proxy::update`]) changed. `live_ips`: addresses pods
    /// hold now (cluster-wide); a removed backend is refused only when its address is in
    /// none of them (empty is fine when [`Proxy::needs_live_ips`] says so). Stops at the
    /// first map error; the next apply then compares every entry.
    pub fn apply(
        &mut self,
        dp: &mut Datapath,
        delta: &PlanDelta,
        live_ips: &BTreeSet<Ipv4Addr>,
        now: Instant,
    ) -> Result<ApplyStats, DatapathError> {
        let full = self.full;
        self.full = true;
        self.failed = true;
        let stats = self.apply_inner(dp, delta, full, live_ips, now)?;
        self.full = false;
        self.failed = false;
        Ok(stats)
    }

    fn apply_inner(
        &mut self,
        dp: &mut Datapath,
        delta: &PlanDelta,
        full: bool,
        live_ips: &BTreeSet<Ipv4Addr>,
        now: Instant,
    ) -> Result<ApplyStats, DatapathError> {
        let mut stats = ApplyStats::default();
        // Backends that left since the last plan; after a restart also those the maps
        // hold and the plan does not (they left while no agent ran).
        for e in &delta.endpoints_gone {
            self.removed.insert(*e, now);
        }
        if self.resynced {
            for e in left_meanwhile(&self.installed, self.planner.plan()) {
                self.removed.entry(e).or_insert(now);
            }
            // Service ports deleted while no agent ran: their counters go with them.
            let planned: BTreeSet<u32> = self.planner.plan().frontends.values().map(|f| f.svc_id).collect();
            self.counters_gone
                .extend(self.installed.frontends.values().map(|f| f.svc_id).filter(|id| !planned.contains(id)));
        }
        self.counters_gone.extend(delta.ids_gone.iter().copied());
        for e in &delta.endpoints_added {
            self.removed.remove(e);
        }
        self.removed.retain(|_, t| now.duration_since(*t) < DEAD_BACKEND_TTL);
        // Only a pod's address can be known dead (its pod gone): an endpoint elsewhere (a
        // Service without selector fronting a database, a hostNetwork pod's node) may still
        // serve direct clients, which a refusal would cut off.
        let mut newest: Vec<(Instant, SvcKey)> = self
            .removed
            .iter()
            .filter(|((ip, _, _), _)| self.cluster_pod_cidr.contains(ip) && !live_ips.contains(ip))
            .map(|((ip, port, proto), t)| (*t, svc_key(*ip, *port, *proto)))
            .collect();
        let all_dead: BTreeSet<SvcKey> = newest.iter().map(|(_, k)| *k).collect();
        // The map holds the most recently removed ones when more are dead than it holds
        // (those older are only not refused at once: their connections time out).
        newest.sort_unstable_by(|a, b| b.cmp(a));
        let dead: BTreeSet<SvcKey> = newest.into_iter().take(self.dead_backends_max).map(|(_, k)| k).collect();

        let w = writes(&self.installed, self.planner.plan(), delta, full);
        self.note_udp_backends_left(&w.slots_removed);
        self.flush.svc_udp.extend(delta.udp_serving_gone.iter().copied());
        // Every flow to a backend found dead now (its pod gone, now or since it left), in
        // the map or not: kept here until a flush succeeds.
        let found: Vec<SvcKey> = all_dead
            .iter()
            .filter(|k| !self.installed.dead.contains(k) && !self.dead_seen.contains(k))
            .copied()
            .collect();
        self.flush.backends.extend(found.iter().map(|k| (Ipv4Addr::from(k.ip), k.port, k.proto)));
        self.dead_seen = all_dead;
        let backing_may_change = full
            || !(w.backends.is_empty()
                && w.backends_removed.is_empty()
                && w.frontends.is_empty()
                && w.frontends_removed.is_empty()
                && w.node_addrs.is_empty()
                && w.node_addrs_removed.is_empty());
        for (k, _) in w.frontends.iter().filter(|(k, v)| k.proto == IPPROTO_UDP && v.count > 0) {
            if self.installed.frontends.get(k).is_some_and(|old| old.count > 0) {
                continue;
            }
            match k.ip {
                // A NodePort answers at every node address.
                [0, 0, 0, 0] => self
                    .flush
                    .udp_frontends
                    .extend(self.planner.plan().node_addrs.keys().map(|ip| (ip.octets(), k.port))),
                ip => {
                    self.flush.udp_frontends.insert((ip, k.port));
                }
            }
        }
        // 1. Backends, then the frontends that count them.
        for (k, v) in w.backends {
            dp.put_svc_backend(k, v)?;
            self.installed.backends.insert(k, v);
            stats.backends_written += 1;
        }
        for (k, ordinal) in w.slots {
            dp.put_svc_backend_slot(k, ordinal)?;
            self.installed.slots.insert(k, ordinal);
        }
        for (ip, v) in w.node_addrs {
            dp.put_node_addr(ip, v)?;
            self.installed.node_addrs.insert(ip, v);
        }
        for (id, net) in w.source_ranges {
            dp.put_source_range(id, net)?;
            self.installed.source_ranges.insert((id, net));
        }
        for (k, v) in w.frontends {
            dp.put_svc_frontend(k, v)?;
            self.installed.frontends.insert(k, v);
            stats.frontends_written += 1;
        }
        // A cluster IP refuses its undefined ports once its frontends are in, and stops
        // before they go.
        for ip in w.cluster_ips {
            dp.put_cluster_ip(ip)?;
            self.installed.cluster_ips.insert(ip);
        }
        for ip in w.cluster_ips_removed {
            dp.delete_cluster_ip(ip)?;
            self.installed.cluster_ips.remove(&ip);
        }
        // 2. What is gone: frontends first.
        for k in w.frontends_removed {
            dp.delete_svc_frontend(k)?;
            self.installed.frontends.remove(&k);
            stats.frontends_removed += 1;
        }
        for (id, net) in w.source_ranges_removed {
            dp.delete_source_range(id, net)?;
            self.installed.source_ranges.remove(&(id, net));
        }
        for k in w.slots_removed {
            dp.delete_svc_backend_slot(k)?;
            self.installed.slots.remove(&k);
        }
        for k in w.backends_removed {
            dp.delete_svc_backend(k)?;
            self.installed.backends.remove(&k);
            stats.backends_removed += 1;
        }
        for ip in w.node_addrs_removed {
            dp.delete_node_addr(ip)?;
            self.installed.node_addrs.remove(&ip);
        }
        // 3. Removed backends: refused while their pod is gone; their UDP flows (and every
        // flow to a gone pod) are forgotten, so the client's next datagram picks a
        // surviving backend.
        // Those no longer dead first, making room.
        for k in self.installed.dead.difference(&dead).copied().collect::<Vec<_>>() {
            dp.delete_dead_backend(k)?;
            self.installed.dead.remove(&k);
        }
        for k in dead.difference(&self.installed.dead).copied().collect::<Vec<_>>() {
            dp.put_dead_backend(k)?;
            self.installed.dead.insert(k);
        }
        stats.dead_backends = dead.len();
        if backing_may_change || delta.node_addrs {
            self.udp_answers_via_stack = udp_answers_via_stack(self.planner.plan(), self.cluster_pod_cidr);
        }
        // A backend found dead by an apply that failed may have a new pod by now (its
        // address given out again): that pod's flows stay.
        self.flush.backends.retain(|(ip, _, _)| !live_ips.contains(ip));
        if !self.flush.is_empty() {
            stats.conntrack_flushed = flush_flows(dp, &self.flush)?;
            self.udp_left.append(&mut self.flush.svc_udp);
            self.flush = Flush::default();
        }
        for id in std::mem::take(&mut self.counters_gone) {
            let _ = dp.remove_svc_counters(id);
        }
        self.resynced = false;
        self.applies += 1;
        Ok(stats)
    }

    /// The (service port id, backend ip, port) pairs that left UDP service ports since the
    /// last call: the node's connected sockets balanced to them are the agent's to abort
    /// ([`crate::sockdiag`]).
    pub fn take_udp_left(&mut self) -> BTreeSet<(u32, [u8; 4], u16)> {
        std::mem::take(&mut self.udp_left)
    }

    /// Whether a UDP service port has a backend whose answers reach local pods through this
    /// node's stack: this node's own address (a hostNetwork pod), or an address outside the
    /// cluster (the endpoint of a Service without a selector, an external database), which
    /// the stack's masquerade answers for. Pods' UDP is balanced per packet; those answers
    /// only `tc_to_pod` translates back.
    pub fn udp_answers_via_stack(&self) -> bool {
        self.udp_answers_via_stack
    }

    /// Notes the backends that leave a UDP service port with the slots `removed` (the
    /// backend is in neither of the port's sets any more), before the maps are written:
    /// the installed frontends still say which ports are UDP, also for a service that goes.
    /// One that still serves the port (terminating while others are ready, or left out by
    /// topology) keeps its flows until it stops ([`PlanDelta::udp_serving_gone`]), as
    /// kube-proxy keeps them.
    fn note_udp_backends_left(&mut self, removed: &[SvcSlotKey]) {
        if removed.is_empty() {
            return;
        }
        let udp = udp_port_ids(&self.installed.frontends);
        let plan = self.planner.plan();
        for k in removed.iter().filter(|k| udp.contains(&k.svc_id)) {
            let other_set = SvcSlotKey { local_set: k.local_set ^ 1, ..*k };
            if !plan.slots.contains_key(&other_set) && !plan.udp_serving.contains(&(k.svc_id, k.ip, k.port)) {
                self.flush.svc_udp.insert((k.svc_id, k.ip, k.port));
            }
        }
    }

    /// The destinations the slow path refuses now: frontends without endpoints, dead backends.
    pub fn refusals(&self) -> contiv_vswitch::Refusals {
        let plan = self.planner.plan();
        let mut r = contiv_vswitch::Refusals::default();
        r.exact.extend(plan.refusals.exact.iter().copied());
        r.cluster_ips.extend(plan.cluster_ips.keys().copied());
        r.exact.extend(self.installed.dead.iter().map(|k| (Ipv4Addr::from(k.ip), k.port, k.proto)));
        r.node_ports.extend(plan.refusals.node_ports.iter().copied());
        r.node_addrs.extend(plan.node_addrs.iter().filter(|(_, a)| a.no_node_ports == 0).map(|(ip, _)| *ip));
        r
    }

    /// When the next apply is due without a cluster change: when dead-backend entries
    /// expire, or soon after an apply that stopped at an error (it is retried, comparing
    /// every entry, until one succeeds).
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        let expiry = self.removed.values().min().map(|t| *t + DEAD_BACKEND_TTL);
        let retry = self.failed.then_some(now + APPLY_RETRY);
        expiry.into_iter().chain(retry).min()
    }
}

/// The backends `installed` holds that no service of `plan` uses: after a restart, those
/// that left while no agent ran.
fn left_meanwhile(installed: &Installed, plan: &ServicePlan) -> Vec<(Ipv4Addr, u16, u8)> {
    let protos: BTreeMap<u32, u8> = installed.frontends.iter().map(|(k, f)| (f.svc_id, k.proto)).collect();
    let mut gone: Vec<(Ipv4Addr, u16, u8)> = installed
        .backends
        .iter()
        .filter_map(|(k, b)| protos.get(&k.svc_id).map(|p| (Ipv4Addr::from(b.ip), b.port, *p)))
        .filter(|e| !plan.endpoints.contains(e))
        .collect();
    gone.sort_unstable();
    gone.dedup();
    gone
}

/// The ids of the UDP service ports among `frontends`.
fn udp_port_ids(frontends: &BTreeMap<SvcKey, SvcFrontend>) -> BTreeSet<u32> {
    frontends.iter().filter(|(k, _)| k.proto == IPPROTO_UDP).map(|(_, f)| f.svc_id).collect()
}

/// See [`Proxy::udp_answers_via_stack`]: outside the cluster is what the node masquerades
/// pods' traffic to, beyond `cluster_pod_cidr` and at no node address.
fn udp_answers_via_stack(plan: &ServicePlan, cluster_pod_cidr: Ipv4Net) -> bool {
    let udp = udp_port_ids(&plan.frontends);
    plan.backends.iter().filter(|(k, _)| udp.contains(&k.svc_id)).any(|(_, b)| {
        let ip = Ipv4Addr::from(b.ip);
        match plan.node_addrs.get(&ip) {
            Some(a) => a.local != 0,
            None => !cluster_pod_cidr.contains(&ip),
        }
    })
}

/// Removes both directions of every flow `f` names: a UDP flow a service NAT'ed to a
/// backend that left it; any flow to a backend whose pod is gone, NAT'ed to it by the
/// packet path or addressed to it already (a socket balanced at connect(), tracked by
/// policy without a rewrite), whose next packet then meets the dead-backend refusal; a
/// plain UDP flow to a frontend that starts answering, whose next datagram is balanced.
fn flush_flows(dp: &mut Datapath, f: &Flush) -> Result<usize, DatapathError> {
    let mut n = 0;
    let mut doomed = vec![];
    for (k, e) in dp.ct_entries()? {
        let dnat = e.flags & ct_flags::DNAT != 0;
        let left = dnat && k.proto == IPPROTO_UDP && f.svc_udp.contains(&(e.svc_id, e.nat_ip, e.nat_port));
        let nat = dnat && f.backends.contains(&(Ipv4Addr::from(e.nat_ip), e.nat_port, k.proto));
        // An original direction without DNAT: a plain flow, or one that took another source port.
        let plain = (e.flags == 0 || e.flags == ct_flags::SNAT)
            && f.backends.contains(&(Ipv4Addr::from(k.dst), k.dport, k.proto));
        let before_frontend =
            k.proto == IPPROTO_UDP && e.flags & ct_flags::NAT == 0 && f.udp_frontends.contains(&(k.dst, k.dport));
        if left || nat || plain || before_frontend {
            doomed.push(ct_pair(&k, &e));
            doomed.push(k);
            n += 1;
        }
    }
    dp.ct_delete_all(&doomed)?;
    Ok(n)
}

/// One flow of a conntrack snapshot: an entry and, when the table holds it, its other
/// direction's.
#[derive(Clone, Copy)]
pub(crate) struct Flow {
    pub key: CtKey,
    pub entry: CtEntry,
    pub pair: Option<(CtKey, CtEntry)>,
}

impl Flow {
    /// When either direction last saw a packet.
    pub fn last_seen_ns(&self) -> u64 {
        self.entry.last_seen_ns.max(self.pair.map_or(0, |(_, p)| p.last_seen_ns))
    }

    fn entries(self) -> impl Iterator<Item = (CtKey, CtEntry)> {
        std::iter::once((self.key, self.entry)).chain(self.pair)
    }
}

/// A snapshot grouped into flows: every entry in exactly one, led by the first of its
/// pair in key order.
pub(crate) fn flows_of(entries: Vec<(CtKey, CtEntry)>) -> Vec<Flow> {
    let entries: BTreeMap<CtKey, CtEntry> = entries.into_iter().collect();
    let mut seen = BTreeSet::new();
    let mut flows = vec![];
    for (k, e) in &entries {
        if !seen.insert(*k) {
            continue;
        }
        // Its pair only if that entry names this one back: a one-way flow's entry, its
        // reply's evicted, and another flow's reply entry can name the same key.
        let pk = ct_pair(k, e);
        let pair = entries.get(&pk).filter(|p| ct_pair(&pk, p) == *k && seen.insert(pk)).map(|p| (pk, *p));
        flows.push(Flow { key: *k, entry: *e, pair });
    }
    flows
}

/// The keys of every flow idle past its timeout (both directions together), from a
/// snapshot of the table. `now_ns`: CLOCK_MONOTONIC, the clock the datapath stamps entries
/// with.
pub(crate) fn expired_flows(
    entries: Vec<(CtKey, CtEntry)>,
    timeouts: &CtTimeouts,
    now_ns: u64,
    released: Option<&Released>,
) -> Vec<Flow> {
    flows_of(entries)
        .into_iter()
        .filter(|f| {
            let idle = Duration::from_nanos(now_ns.saturating_sub(f.last_seen_ns()));
            idle > ct_timeout(&f.key, &f.entry, f.pair.as_ref().map(|(_, p)| p), timeouts)
                || released.is_some_and(|r| r.names(f))
        })
        .collect()
}

/// The addresses of this node's pod subnet that no pod holds (their pods deleted), as of
/// a moment: their flows go at the next sweep, whatever their timeouts, for a later pod
/// given the address would inherit them (a half-closed TCP flow lives for hours, and an
/// established flow passes NetworkPolicy unchecked). A flow that saw a packet since that
/// moment is left to its timeout: it may be a new pod's on the address.
///
/// Likewise the pod subnets of nodes that left the cluster and that another node was
/// given since ([`Departures`]), each as of the moment that showed: the new node's pods get
/// the old pods' addresses.
#[derive(Debug, Clone)]
pub struct Released {
    pub subnet: Ipv4Net,
    /// Pods' addresses, and the gateway's.
    pub held: BTreeSet<Ipv4Addr>,
    pub as_of_ns: u64,
    /// Other nodes' pod subnets, each with the moment (CLOCK_MONOTONIC) another node was
    /// seen holding it.
    pub departed: Vec<(Ipv4Net, u64)>,
}

impl Released {
    fn names(&self, f: &Flow) -> bool {
        let own = |a: [u8; 4]| {
            let ip = Ipv4Addr::from(a);
            self.subnet.contains(&ip) && !self.held.contains(&ip)
        };
        (f.last_seen_ns() < self.as_of_ns && f.entries().any(|(k, _)| own(k.src) || own(k.dst)))
            || self.departed.iter().any(|(net, at)| departed_from(f, *net, *at))
    }
}

/// Whether flow `f` names an address of `net`, another node's since `at`, and the old pod
/// there sent nothing in it since: the entries of its direction (their key's source in
/// `net`) last saw a packet before `at` (without such an entry, the flow's last packet). A
/// local pod still retransmitting to the old pod refreshes its own direction only.
fn departed_from(f: &Flow, net: Ipv4Net, at: u64) -> bool {
    let inside = |a: [u8; 4]| net.contains(&Ipv4Addr::from(a));
    if !f.entries().any(|(k, _)| inside(k.src) || inside(k.dst)) {
        return false;
    }
    let mut sent_from = f.entries().filter(|(k, _)| inside(k.src)).map(|(_, e)| e.last_seen_ns).peekable();
    if sent_from.peek().is_none() {
        return f.last_seen_ns() < at;
    }
    sent_from.all(|seen| seen < at)
}

/// Pod subnets of other nodes that another node was given since (the registry releases a
/// departed node's subnet once its Node object is gone, and gives it to the next new
/// node), each as of the registration change that showed it, kept until a conntrack sweep
/// has removed the flows of the old node's pods ([`Released`]). A node whose registration
/// lapsed (an agent restart, a partition from the store) keeps its subnet: nothing is
/// recorded then, and its pods' flows stay.
///
/// The holders outlive the agent ([`Self::load`], [`Self::save`]): a subnet that changed
/// hands while this agent was down (the conntrack table, pinned, kept its flows) departs
/// as of the start that finds it, so the old pods' flows go at the first sweep. A flow of
/// the new node's pods that sent nothing between that start and the sweep goes with them
/// (no record tells it apart); one in use stays. Until a departure is swept, the saved
/// holder of its subnet is the old one: an agent that stops before the sweep (a crash, a
/// failed start, a rollout) finds the departure again at its next start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Departures {
    /// Who held each subnet other nodes registered, as last seen.
    holders: BTreeMap<Ipv4Net, String>,
    departed: Vec<(Ipv4Net, u64)>,
    /// The holder before the change, of each subnet with a departure not yet swept.
    previous: BTreeMap<Ipv4Net, String>,
}

/// What [`Departures::save`] writes: `{"version": 1, "holders": {"10.1.2.0/24": "node-2"}}`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HoldersFile {
    version: u32,
    holders: BTreeMap<Ipv4Net, String>,
}

const HOLDERS_VERSION: u32 = 1;

impl Departures {
    /// The holders an earlier agent saved at `path`, with nothing departed yet. A missing
    /// file is no holders; an unreadable or malformed one is logged and taken as none (the
    /// agent then learns holders afresh, as on a first start).
    pub fn load(path: &std::path::Path) -> Self {
        let read = match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::default(),
            Err(e) => Err(e.to_string()),
            Ok(bytes) => serde_json::from_slice::<HoldersFile>(&bytes).map_err(|e| e.to_string()).and_then(|f| {
                if f.version == HOLDERS_VERSION {
                    Ok(f.holders)
                } else {
                    Err(format!("version {} (this agent reads {HOLDERS_VERSION})", f.version))
                }
            }),
        };
        match read {
            Ok(holders) => Self { holders, ..Self::default() },
            Err(e) => {
                log::warn!("ignoring the pod subnets' last holders at {}: {e}", path.display());
                Self::default()
            }
        }
    }

    /// Writes the holders to `path`, the old holder for a subnet whose departure is not
    /// swept yet (replaced durably: a crash leaves the old file or the new one).
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let mut holders = self.holders.clone();
        holders.extend(self.previous.iter().map(|(net, name)| (*net, name.clone())));
        let file = HoldersFile { version: HOLDERS_VERSION, holders };
        crate::state::replace_durably(path, &serde_json::to_vec_pretty(&file).expect("holders serialize"))
    }

    /// The registrations are `regs` as of `now_ns`: an IPv4 pod subnet of a node other than
    /// `me` that another node held before is recorded as departed. True if a holder changed
    /// or appeared (the holders are worth saving).
    pub fn update(&mut self, regs: &[NodeRegistration], me: &str, now_ns: u64) -> bool {
        let mut changed = false;
        for r in regs.iter().filter(|r| r.name != me) {
            let ipnet::IpNet::V4(net) = r.pod_cidr else { continue };
            let before = self.holders.insert(net, r.name.clone());
            changed |= before.as_ref() != Some(&r.name);
            if let Some(before) = before
                && before != r.name
            {
                self.departed.retain(|(n, _)| *n != net);
                self.departed.push((net, now_ns));
                // The holder to save is the one before the first change not yet swept,
                // unless the subnet went back to it (A, B, A): then B's pods' flows are
                // the ones to go, and the file must name B for a restart to see it.
                if self.previous.get(&net).is_none_or(|p| *p == r.name) {
                    self.previous.insert(net, before);
                }
            }
        }
        changed
    }

    /// The departed subnets, each with the moment another node was seen holding it.
    pub fn list(&self) -> Vec<(Ipv4Net, u64)> {
        self.departed.clone()
    }

    /// A sweep with `swept` (an earlier [`Self::list`]) succeeded: those are done. True if
    /// the holders to save changed (a subnet has no departure left).
    pub fn swept(&mut self, swept: &[(Ipv4Net, u64)]) -> bool {
        self.departed.retain(|d| !swept.contains(d));
        let before = self.previous.len();
        self.previous.retain(|net, _| self.departed.iter().any(|(n, _)| n == net));
        self.previous.len() != before
    }
}

/// The flows of a conntrack table that a table of `budget` entries keeps when it is
/// resized: whole flows (both directions together), the most recently seen first. Returns
/// them oldest first (the order to insert them in, so that anything a full LRU table
/// still evicts is the oldest) and how many entries were left out.
pub fn flows_that_fit(entries: Vec<(CtKey, CtEntry)>, budget: usize) -> (Vec<(CtKey, CtEntry)>, usize) {
    let total = entries.len();
    let mut flows = flows_of(entries);
    // Newest first, then keep whole flows while they fit.
    flows.sort_by_key(|f| std::cmp::Reverse(f.last_seen_ns()));
    let mut kept = vec![];
    for flow in flows {
        let n = if flow.pair.is_some() { 2 } else { 1 };
        if kept.len() + n <= budget {
            kept.extend(flow.entries());
        }
    }
    kept.reverse();
    let dropped = total - kept.len();
    (kept, dropped)
}

/// One conntrack sweep: removes flows idle past their timeout. On the table's own handle,
/// so it holds no lock of the agent's while it reads a table of up to hundreds of
/// thousands of entries.
pub fn gc_conntrack(
    table: &mut CtTable,
    timeouts: &CtTimeouts,
    now_ns: u64,
    released: Option<&Released>,
) -> Result<GcStats, DatapathError> {
    let started = Instant::now();
    let entries = table.entries()?;
    let scanned = entries.len();
    let udp = entries.iter().filter(|(k, _)| k.proto == IPPROTO_UDP).count();
    let (expired, expired_udp) = sweep(table, entries, timeouts, now_ns, released)?;
    Ok(GcStats {
        scanned,
        expired,
        took_us: started.elapsed().as_micros() as u64,
        remaining: scanned.saturating_sub(expired),
        remaining_udp: udp.saturating_sub(expired_udp),
    })
}

/// Deletes the flows of `snapshot` (the table as read) idle past their timeout, and those
/// of `released` addresses; how many
/// entries went, and how many of those it meant to delete were UDP. A packet may have
/// refreshed a flow since the table was read (a flow idle past its timeout, resuming): a
/// doomed flow's entries are read again, and the flow is kept if either changed.
fn sweep(
    table: &mut CtTable,
    snapshot: Vec<(CtKey, CtEntry)>,
    timeouts: &CtTimeouts,
    now_ns: u64,
    released: Option<&Released>,
) -> Result<(usize, usize), DatapathError> {
    let mut doomed = vec![];
    for flow in expired_flows(snapshot, timeouts, now_ns, released) {
        let mut unchanged = true;
        for (k, e) in flow.entries() {
            unchanged &= table.get(&k)?.is_none_or(|now| now.last_seen_ns == e.last_seen_ns);
        }
        if unchanged {
            doomed.extend(flow.entries().map(|(k, _)| k));
        }
    }
    let went = table.delete_all(&doomed)?;
    let udp = doomed.iter().filter(|k| k.proto == IPPROTO_UDP).count();
    Ok((went, udp.min(went)))
}

/// CLOCK_MONOTONIC in nanoseconds (bpf_ktime_get_ns's clock).
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::fixtures;
    use contiv_cluster_model::{EndpointSlice, PortRef, Protocol, Service};

    fn key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> CtKey {
        CtKey { src, dst, sport, dport, proto: IPPROTO_TCP, _pad: [0; 3] }
    }

    #[test]
    fn pair_keys_of_dnat_and_snat_entries_meet() {
        // Client 10.1.1.5:40000 -> service 10.96.0.10:80, DNAT'ed to 10.1.2.7:8080, SNAT'ed to 192.168.100.11:61000.
        let fwd_k = key([10, 1, 1, 5], [10, 96, 0, 10], 40000, 80);
        let fwd = CtEntry {
            nat_ip: [10, 1, 2, 7],
            nat_port: 8080,
            nat2_ip: [192, 168, 100, 11],
            nat2_port: 61000,
            flags: ct_flags::DNAT | ct_flags::SNAT,
            ..Default::default()
        };
        let rev_k = key([10, 1, 2, 7], [192, 168, 100, 11], 8080, 61000);
        let rev = CtEntry {
            nat_ip: [10, 96, 0, 10],
            nat_port: 80,
            nat2_ip: [10, 1, 1, 5],
            nat2_port: 40000,
            flags: ct_flags::REV_DNAT | ct_flags::REV_SNAT,
            ..Default::default()
        };
        assert_eq!(ct_pair(&fwd_k, &fwd), rev_k);
        assert_eq!(ct_pair(&rev_k, &rev), fwd_k);
        // Plain (policy) entries pair with the reversed tuple.
        let plain = CtEntry::default();
        assert_eq!(ct_pair(&fwd_k, &plain), key([10, 96, 0, 10], [10, 1, 1, 5], 80, 40000));
        // A pod's flow to 10.1.2.7:53 that took source port 61234 (another flow's replies
        // come from 10.1.2.7:53 to its port 40000): SNAT alone.
        let fwd_k = key([10, 1, 1, 5], [10, 1, 2, 7], 40000, 53);
        let fwd = CtEntry { nat2_ip: [10, 1, 1, 5], nat2_port: 61234, flags: ct_flags::SNAT, ..Default::default() };
        let rev_k = key([10, 1, 2, 7], [10, 1, 1, 5], 53, 61234);
        let rev = CtEntry { nat2_ip: [10, 1, 1, 5], nat2_port: 40000, flags: ct_flags::REV_SNAT, ..Default::default() };
        assert_eq!(ct_pair(&fwd_k, &fwd), rev_k);
        assert_eq!(ct_pair(&rev_k, &rev), fwd_k);
    }

    #[test]
    fn a_resized_table_keeps_whole_flows_most_recent_first() {
        let seen = |t: u64| CtEntry { last_seen_ns: t, ..Default::default() };
        let (a, b) = ([10, 1, 1, 2], [10, 1, 1, 3]);
        // Flow i: both directions, last seen at i (one direction older), and one entry
        // whose other direction is gone.
        let mut entries = vec![];
        for i in 1..=5u16 {
            entries.push((key(a, b, 1000 + i, 80), seen(u64::from(i))));
            entries.push((key(b, a, 80, 1000 + i), seen(0)));
        }
        entries.push((key(a, b, 2000, 80), seen(9)));
        let all = entries.len();
        let (kept, dropped) = flows_that_fit(entries.clone(), 100);
        assert_eq!((kept.len(), dropped), (all, 0), "everything fits");

        // Room for 5 entries: the lone newest entry and the two newest flows.
        let (kept, dropped) = flows_that_fit(entries, 5);
        assert_eq!((kept.len(), dropped), (5, all - 5));
        let ports: BTreeSet<u16> = kept.iter().map(|(k, _)| if k.sport == 80 { k.dport } else { k.sport }).collect();
        assert_eq!(ports, BTreeSet::from([1004, 1005, 2000]));
        for (k, e) in &kept {
            if k.sport != 2000 {
                assert!(kept.iter().any(|(p, _)| *p == ct_pair(k, e)), "both directions of {k:?}");
            }
        }
        // Oldest first: what a full LRU table would still evict is the oldest.
        let newest = |kept: &[(CtKey, CtEntry)], i: usize| kept[i].1.last_seen_ns;
        assert_eq!(newest(&kept, kept.len() - 1), 9);
        assert!(newest(&kept, 0) <= 4);
    }

    #[test]
    fn udp_answers_come_through_the_stack_from_this_node_and_from_outside_the_cluster() {
        let mut plan = ServicePlan::default();
        plan.node_addrs.insert(Ipv4Addr::new(192, 168, 100, 11), NodeAddr { local: 1, ..Default::default() });
        plan.node_addrs.insert(Ipv4Addr::new(192, 168, 100, 12), NodeAddr::default());
        let udp = SvcKey { ip: [10, 96, 0, 10], port: 53, proto: IPPROTO_UDP, _pad: 0 };
        plan.frontends.insert(udp, SvcFrontend { svc_id: 1, ..Default::default() });
        plan.frontends
            .insert(SvcKey { port: 80, proto: IPPROTO_TCP, ..udp }, SvcFrontend { svc_id: 2, ..Default::default() });
        let backed_by = |svc_id: u32, ip: [u8; 4]| {
            let mut p = plan.clone();
            p.backends.insert(SvcBackendKey { svc_id, ordinal: 0 }, SvcBackend { ip, port: 53, local: 0, _pad: 0 });
            udp_answers_via_stack(&p, "10.1.0.0/16".parse().unwrap())
        };
        assert!(!backed_by(1, [10, 1, 2, 5]), "a pod");
        assert!(!backed_by(1, [192, 168, 100, 12]), "another node's address: answers come by the overlay");
        assert!(backed_by(1, [192, 168, 100, 11]), "this node's own address");
        assert!(backed_by(1, [203, 0, 113, 10]), "outside the cluster");
        assert!(!backed_by(2, [203, 0, 113, 10]), "TCP, balanced at connect()");
    }

    #[test]
    fn timeouts_follow_the_tcp_state_of_both_directions() {
        let t = CtTimeouts::default();
        let k = key([1, 1, 1, 1], [2, 2, 2, 2], 1, 2);
        let syn = CtEntry { tcp_flags: ct_tcp::SYN, ..Default::default() };
        let synack = CtEntry { tcp_flags: ct_tcp::SYN | ct_tcp::ACK, ..Default::default() };
        let ack = CtEntry { tcp_flags: ct_tcp::SYN | ct_tcp::ACK, ..Default::default() };
        let fin = CtEntry { tcp_flags: ct_tcp::ACK | ct_tcp::FIN, ..Default::default() };
        let rst = CtEntry { tcp_flags: ct_tcp::ACK | ct_tcp::RST, ..Default::default() };
        assert_eq!(ct_timeout(&k, &syn, None, &t), Duration::from_secs(60));
        assert_eq!(ct_timeout(&k, &ack, Some(&synack), &t), Duration::from_secs(21600));
        // Half-closed: the other side may still answer, long after.
        assert_eq!(ct_timeout(&k, &ack, Some(&fin), &t), Duration::from_secs(21600));
        assert_eq!(ct_timeout(&k, &fin, Some(&ack), &t), Duration::from_secs(21600));
        // Finished both ways, or reset by either side.
        assert_eq!(ct_timeout(&k, &fin, Some(&fin), &t), Duration::from_secs(10));
        assert_eq!(ct_timeout(&k, &ack, Some(&rst), &t), Duration::from_secs(10));
        // SNAT'ed to a port of the node's: the port waits out the backend's TIME_WAIT
        // after a FIN each way, not after a reset (no TIME_WAIT then).
        let snat = |x: &CtEntry, f: u16| CtEntry { flags: f, ..*x };
        let (fwd, rev) = (ct_flags::DNAT | ct_flags::SNAT, ct_flags::REV_DNAT | ct_flags::REV_SNAT);
        assert_eq!(ct_timeout(&k, &snat(&fin, fwd), Some(&snat(&fin, rev)), &t), SNAT_TIME_WAIT);
        assert_eq!(ct_timeout(&k, &snat(&fin, rev), Some(&snat(&fin, fwd)), &t), SNAT_TIME_WAIT);
        assert_eq!(ct_timeout(&k, &snat(&ack, fwd), Some(&snat(&rst, rev)), &t), Duration::from_secs(10));
        // The other direction evicted: told by this one alone.
        assert_eq!(ct_timeout(&k, &fin, None, &t), FIN_WAIT, "a half-close or a close");
        assert_eq!(ct_timeout(&k, &ack, None, &t), Duration::from_secs(21600), "established");
        // Delivered by the node's stack: the pod's direction alone tells.
        let pod_side = |tcp_flags: u8| CtEntry { flags: ct_flags::VIA_HOST, tcp_flags, ..Default::default() };
        let client_side = CtEntry::default();
        assert_eq!(tcp_state(&client_side, Some(&pod_side(ct_tcp::SYN))), TcpState::Opening);
        assert_eq!(tcp_state(&client_side, Some(&pod_side(ct_tcp::SYN | ct_tcp::ACK))), TcpState::Established);
        assert_eq!(tcp_state(&pod_side(ct_tcp::SYN | ct_tcp::ACK), Some(&client_side)), TcpState::Established);
        assert_eq!(tcp_state(&client_side, Some(&pod_side(ct_tcp::ACK | ct_tcp::FIN))), TcpState::Finishing);
        assert_eq!(tcp_state(&client_side, Some(&pod_side(ct_tcp::ACK | ct_tcp::RST))), TcpState::Closing);
        // A pod's connection out, masqueraded: its answers reach it through the stack.
        let out = |tcp_flags: u8| CtEntry { tcp_flags, ..Default::default() };
        assert_eq!(tcp_state(&out(ct_tcp::SYN), Some(&out(0))), TcpState::Opening, "no answer yet");
        assert_eq!(tcp_state(&out(ct_tcp::SYN | ct_tcp::ACK), Some(&out(0))), TcpState::Established);
        assert_eq!(tcp_state(&out(ct_tcp::ACK | ct_tcp::FIN), Some(&out(0))), TcpState::Finishing);
        assert_eq!(tcp_state(&out(ct_tcp::SYN | ct_tcp::ACK), None), TcpState::Established, "the other entry evicted");
        assert_eq!(tcp_state(&out(ct_tcp::SYN), None), TcpState::Opening, "the other entry evicted");
        // From outside, translated (the reply entry FROM_UPLINK): the datapath sees every
        // answer, so a reply entry that saw nothing is a flow the backend never answered,
        // whatever the client sent (a stray ACK opens such a flow): the SYN timeout.
        let answer = |tcp_flags: u8| CtEntry {
            flags: ct_flags::REV_DNAT | ct_flags::FROM_UPLINK,
            tcp_flags,
            ..Default::default()
        };
        let client = |tcp_flags: u8| CtEntry { flags: ct_flags::DNAT, tcp_flags, ..Default::default() };
        assert_eq!(tcp_state(&client(ct_tcp::ACK), Some(&answer(0))), TcpState::Opening, "a stray ACK");
        assert_eq!(tcp_state(&answer(0), Some(&client(ct_tcp::ACK))), TcpState::Opening, "a stray ACK");
        assert_eq!(ct_timeout(&k, &client(ct_tcp::ACK), Some(&answer(0)), &t), Duration::from_secs(60));
        assert_eq!(ct_timeout(&k, &answer(0), Some(&client(ct_tcp::ACK | ct_tcp::FIN)), &t), Duration::from_secs(60));
        assert_eq!(tcp_state(&client(ct_tcp::ACK | ct_tcp::RST), Some(&answer(0))), TcpState::Closing);
        let answered = tcp_state(&client(ct_tcp::SYN | ct_tcp::ACK), Some(&answer(ct_tcp::SYN | ct_tcp::ACK)));
        assert_eq!(answered, TcpState::Established, "answered");
        assert_eq!(
            tcp_state(&client(ct_tcp::SYN | ct_tcp::ACK), None),
            TcpState::Established,
            "the reply entry evicted"
        );
        // Finishing lives FIN_WAIT, within the configured closing and established times.
        let short = CtTimeouts { tcp_established: 30, ..t };
        assert_eq!(ct_timeout(&k, &out(ct_tcp::FIN), Some(&out(0)), &t), FIN_WAIT);
        assert_eq!(ct_timeout(&k, &out(ct_tcp::FIN), Some(&out(0)), &short), Duration::from_secs(30));
        let long = CtTimeouts { tcp_closing: 300, ..t };
        assert_eq!(ct_timeout(&k, &out(ct_tcp::FIN), Some(&out(0)), &long), Duration::from_secs(300));
        let udp = CtKey { proto: IPPROTO_UDP, ..k };
        assert_eq!(ct_timeout(&udp, &CtEntry::default(), None, &t), Duration::from_secs(60));
    }

    #[test]
    fn a_failed_apply_is_due_again_soon_and_dead_backends_when_they_expire() {
        let params = ServiceParams {
            node_name: "n1".into(),
            proxy_name: None,
            node_ips: vec![],
            node_ports: Default::default(),
        };
        let mut p = Proxy::new(params, "10.1.0.0/16".parse().unwrap());
        let now = Instant::now();
        assert_eq!(p.next_due(now), None, "nothing to wait for");
        p.failed = true;
        assert_eq!(p.next_due(now), Some(now + APPLY_RETRY));
        p.removed.insert((Ipv4Addr::new(10, 1, 1, 2), 80, IPPROTO_TCP), now);
        assert_eq!(p.next_due(now), Some(now + APPLY_RETRY), "the sooner of the two");
        p.failed = false;
        assert_eq!(p.next_due(now), Some(now + DEAD_BACKEND_TTL));
    }

    /// A proxy on a real datapath (root), applying clusters of services and slices.
    struct Rig {
        dir: crate::datapath::TestPins,
        dp: Datapath,
        proxy: Proxy,
    }

    impl Rig {
        fn new(tag: &str) -> Option<Self> {
            let dir = crate::datapath::TestPins::for_datapath(tag)?;
            let dp = Self::load(&dir);
            let mut proxy = Proxy::new(fixtures::params(), "10.1.0.0/16".parse().unwrap());
            proxy.resync(&dp).unwrap();
            Some(Rig { dir, dp, proxy })
        }

        fn load(dir: &crate::datapath::TestPins) -> Datapath {
            let sizes = crate::datapath::MapSizes { conntrack: Some(1024), ..Default::default() };
            let mut dp = Datapath::load_with(&dir.0, true, sizes).expect("loading the datapath");
            dp.finish_migration().unwrap();
            dp
        }

        /// The agent restarted: the maps read back into a new proxy.
        fn restart(&mut self) {
            self.dp = Self::load(&self.dir);
            self.proxy = Proxy::new(fixtures::params(), "10.1.0.0/16".parse().unwrap());
            self.proxy.resync(&self.dp).unwrap();
        }

        /// Plans and applies `service` with `slices`, pods holding `live`.
        fn apply(&mut self, service: &Service, slices: &[EndpointSlice], live: &[&str]) {
            let s = vec![service];
            let sl: Vec<&EndpointSlice> = slices.iter().collect();
            let src = crate::services::Indexed::new(crate::services::ServiceInputs {
                services: &s,
                slices: &sl,
                nodes: &[],
                registrations: &[],
            });
            let changes = ServiceChanges {
                services: BTreeSet::from([(service.namespace.clone(), service.name.clone())]),
                ..Default::default()
            };
            let delta = self.proxy.update(&src, &changes);
            let live: BTreeSet<Ipv4Addr> = live.iter().map(|ip| ip.parse().unwrap()).collect();
            self.proxy.apply(&mut self.dp, &delta, &live, Instant::now()).unwrap();
        }

        /// Records a flow from a client pod's port to `backend`, balanced by `svc_id`.
        fn flow(&mut self, proto: u8, sport: u16, backend: ([u8; 4], u16), svc_id: u32) {
            let client = [10, 1, 1, 9];
            let fwd_k = CtKey { src: client, dst: [10, 96, 0, 53], sport, dport: 53, proto, _pad: [0; 3] };
            let fwd = CtEntry {
                nat_ip: backend.0,
                nat_port: backend.1,
                nat2_ip: client,
                nat2_port: sport,
                flags: ct_flags::DNAT,
                svc_id,
                last_seen_ns: monotonic_ns(),
                ..Default::default()
            };
            let rev_k = ct_pair(&fwd_k, &fwd);
            let rev = CtEntry { nat_ip: fwd_k.dst, nat_port: 53, flags: ct_flags::REV_DNAT, ..fwd };
            let data = aya::maps::MapData::from_pin(self.dir.0.join(contiv_common::map_names::CT)).unwrap();
            let mut map = aya::maps::Map::LruHashMap(data);
            let mut ct: aya::maps::HashMap<&mut aya::maps::MapData, CtKey, CtEntry> = (&mut map).try_into().unwrap();
            ct.insert(fwd_k, fwd, 0).unwrap();
            ct.insert(rev_k, rev, 0).unwrap();
        }

        /// Records a plain flow (no rewrite) from a client pod's `sport` to `dst`, both ways.
        fn plain_flow(&mut self, proto: u8, sport: u16, dst: ([u8; 4], u16)) {
            let client = [10, 1, 1, 9];
            let fwd_k = CtKey { src: client, dst: dst.0, sport, dport: dst.1, proto, _pad: [0; 3] };
            let e = CtEntry { last_seen_ns: monotonic_ns(), ..Default::default() };
            let data = aya::maps::MapData::from_pin(self.dir.0.join(contiv_common::map_names::CT)).unwrap();
            let mut map = aya::maps::Map::LruHashMap(data);
            let mut ct: aya::maps::HashMap<&mut aya::maps::MapData, CtKey, CtEntry> = (&mut map).try_into().unwrap();
            ct.insert(fwd_k, e, 0).unwrap();
            ct.insert(ct_pair(&fwd_k, &e), e, 0).unwrap();
        }

        /// The backends the recorded flows go to.
        fn flows_to(&self) -> BTreeSet<(Ipv4Addr, u16)> {
            let entries = self.dp.ct_entries().unwrap();
            entries
                .iter()
                .filter(|(_, e)| e.flags & ct_flags::DNAT != 0)
                .map(|(_, e)| (e.nat_ip.into(), e.nat_port))
                .collect()
        }

        fn dead(&self) -> BTreeSet<(Ipv4Addr, u16)> {
            self.dp.dead_backends().unwrap().iter().map(|k| (k.ip.into(), k.port)).collect()
        }
    }

    fn dns_service(proto: Protocol) -> Service {
        let mut s = fixtures::svc("dns", "10.96.0.53", vec![fixtures::port("dns", proto, 53, PortRef::Number(53))]);
        s.namespace = "default".into();
        s
    }

    fn dns_slice(proto: Protocol, endpoints: Vec<contiv_cluster_model::Endpoint>) -> EndpointSlice {
        fixtures::slice("dns-a", "dns", vec![("dns", proto, 53)], endpoints)
    }

    /// The two backends of the tests below, and b's address as flows name it.
    const A: &str = "10.1.2.2";
    const B: &str = "10.1.2.3";
    const B_IP: [u8; 4] = [10, 1, 2, 3];

    fn ready(ip: &str) -> contiv_cluster_model::Endpoint {
        fixtures::ep(ip, "n2", true, true, false)
    }

    /// A rig with service "dns" (`proto`) on A and B, both pods live, and a client's flow
    /// to B from port 40000: the rig, the service and its port id.
    fn rig_with_a_flow_to_b(tag: &str, proto: Protocol) -> Option<(Rig, Service, u32)> {
        let mut rig = Rig::new(tag)?;
        let svc = dns_service(proto);
        rig.apply(&svc, &[dns_slice(proto, vec![ready(A), ready(B)])], &[A, B]);
        let id = rig.proxy.plan().frontends.values().next().unwrap().svc_id;
        let number = if proto == Protocol::Udp { IPPROTO_UDP } else { IPPROTO_TCP };
        rig.flow(number, 40000, (B_IP, 53), id);
        Some((rig, svc, id))
    }

    #[test]
    fn the_sweep_keeps_a_flow_a_packet_refreshed_after_the_table_was_read() {
        let Some(mut rig) = Rig::new("proxy-gc-refresh") else { return };
        rig.flow(IPPROTO_UDP, 40000, (B_IP, 53), 0);
        rig.flow(IPPROTO_UDP, 40001, (B_IP, 53), 0);
        let mut table = CtTable::open(&rig.dir.0).unwrap();
        let snapshot = table.entries().unwrap();
        assert_eq!(snapshot.len(), 4);
        // A packet of the first flow passes between the read and the delete.
        rig.flow(IPPROTO_UDP, 40000, (B_IP, 53), 0);
        let hour_later = monotonic_ns() + 3_600_000_000_000;
        let went = sweep(&mut table, snapshot, &CtTimeouts::default(), hour_later, None).unwrap();
        assert_eq!(went, (2, 2), "the other flow's two (UDP) entries went, and were counted");
        let client_port = |k: &CtKey| if k.sport == 53 { k.dport } else { k.sport };
        let left: BTreeSet<u16> = rig.dp.ct_entries().unwrap().iter().map(|(k, _)| client_port(k)).collect();
        assert_eq!(left, BTreeSet::from([40000]), "the refreshed flow stays, both ways");
        assert_eq!(rig.dp.ct_entries().unwrap().len(), 2);
    }

    /// An established TCP entry last seen at `at`.
    fn seen(at: u64) -> CtEntry {
        CtEntry { tcp_flags: ct_tcp::SYN | ct_tcp::ACK, last_seen_ns: at, ..Default::default() }
    }

    /// Both entries of an established TCP flow `src:sport` -> `dst:80`, last seen at `at`.
    fn flow(src: [u8; 4], dst: [u8; 4], sport: u16, at: u64) -> [(CtKey, CtEntry); 2] {
        let k = key(src, dst, sport, 80);
        [(k, seen(at)), (ct_pair(&k, &seen(at)), seen(at))]
    }

    /// The client ports of the flows a sweep at `now` removes, with `released`.
    fn doomed_ports(entries: Vec<(CtKey, CtEntry)>, now: u64, released: &Released) -> BTreeSet<u16> {
        expired_flows(entries, &CtTimeouts::default(), now, Some(released))
            .into_iter()
            .map(|f| f.key.sport.max(f.key.dport))
            .collect()
    }

    /// A deleted pod's flows go at the next sweep, not at their timeouts: a later pod given
    /// its address would inherit them (an established flow passes policy unchecked).
    #[test]
    fn the_flows_of_an_address_no_pod_holds_go_at_the_next_sweep() {
        let s = 1_000_000_000u64;
        let now = 100_000 * s;
        let (gone, live, elsewhere) = ([10, 1, 1, 7], [10, 1, 1, 8], [10, 1, 2, 9]);
        let entries: Vec<(CtKey, CtEntry)> = [
            flow(gone, elsewhere, 40000, now - s),          // from the deleted pod
            flow(elsewhere, gone, 40001, now - s),          // to it
            flow(live, elsewhere, 40002, now - s),          // a live pod's
            flow(gone, elsewhere, 40003, now + s),          // seen since: perhaps a new pod's
            flow([10, 1, 1, 1], elsewhere, 40004, now - s), // the gateway's
        ]
        .concat();
        let released = Released {
            subnet: "10.1.1.0/24".parse().unwrap(),
            held: [Ipv4Addr::from(live), Ipv4Addr::new(10, 1, 1, 1)].into(),
            as_of_ns: now,
            departed: vec![],
        };
        assert_eq!(doomed_ports(entries.clone(), now, &released), BTreeSet::from([40000, 40001]));
        assert!(expired_flows(entries, &CtTimeouts::default(), now, None).is_empty(), "none is past its timeout");
    }

    /// The flows of a departed node's pods go at the next sweep once another node holds
    /// its subnet: that node's pods would inherit them. A flow whose far side sent since
    /// is left to its timeout (perhaps the new node's pod already); one only the local
    /// side kept sending in goes.
    #[test]
    fn the_flows_of_a_departed_nodes_pods_go_at_the_next_sweep() {
        let s = 1_000_000_000u64;
        let now = 100_000 * s;
        let (local, departed, staying) = ([10, 1, 1, 7], [10, 1, 2, 9], [10, 1, 3, 9]);
        let left_at = now - 10 * s;
        // A local pod still retransmitting to the departed pod: only its own direction is
        // refreshed.
        let retransmits = key(local, departed, 40004, 80);
        let entries: Vec<(CtKey, CtEntry)> = [
            flow(local, departed, 40000, now - 20 * s), // to the departed node's pod
            flow(departed, local, 40001, now - 20 * s), // from it
            flow(local, departed, 40002, now - s),      // both ways since: the new node's pod
            flow(local, staying, 40003, now - 20 * s),  // another node's pod
            [(retransmits, seen(now - s)), (ct_pair(&retransmits, &seen(0)), seen(now - 20 * s))],
        ]
        .concat();
        let released = Released {
            subnet: "10.1.1.0/24".parse().unwrap(),
            held: [Ipv4Addr::from(local)].into(),
            as_of_ns: now,
            departed: vec![("10.1.2.0/24".parse().unwrap(), left_at)],
        };
        assert_eq!(doomed_ports(entries, now, &released), BTreeSet::from([40000, 40001, 40004]));
    }

    /// A registration of node `name` with pod subnet `cidr`.
    fn reg(name: &str, cidr: &str) -> NodeRegistration {
        NodeRegistration {
            name: name.into(),
            id: 1,
            addresses: vec![],
            pod_cidr: cidr.parse().unwrap(),
            uplink_ip: None,
        }
    }

    #[test]
    fn a_subnet_departs_when_another_node_registers_it() {
        let (me, a, b) = (reg("me", "10.1.1.0/24"), reg("a", "10.1.2.0/24"), reg("b", "10.1.3.0/24"));
        let net = |c: &str| c.parse::<Ipv4Net>().unwrap();
        let mut d = Departures::default();
        d.update(&[me.clone(), a.clone(), b.clone()], "me", 1);
        // a's registration lapses (an agent restart, a partition) and comes back: its
        // subnet is still its own, its pods' flows stay.
        d.update(&[me.clone(), b.clone()], "me", 2);
        d.update(&[me.clone(), a.clone(), b.clone()], "me", 3);
        assert_eq!(d.list(), vec![], "a lapse is no departure");
        // a is gone for good, and c is given its subnet: a's pods' flows go.
        let c = reg("c", "10.1.2.0/24");
        d.update(&[me.clone(), b.clone()], "me", 4);
        d.update(&[me.clone(), b.clone(), c.clone()], "me", 5);
        assert_eq!(d.list(), vec![(net("10.1.2.0/24"), 5)]);
        d.update(&[me.clone(), b.clone(), c.clone()], "me", 6);
        assert_eq!(d.list(), vec![(net("10.1.2.0/24"), 5)], "recorded once");
        let listed = d.list();
        // This node's own subnet given to another name is not another node's departure.
        d.update(&[reg("other", "10.1.1.0/24"), b.clone(), c.clone()], "me", 7);
        assert_eq!(d.list(), listed);
        // A sweep that listed it done, the subnet changes hands again meanwhile: the later
        // departure stays.
        d.update(&[me.clone(), b.clone(), reg("e", "10.1.2.0/24")], "me", 8);
        d.swept(&listed);
        assert_eq!(d.list(), vec![(net("10.1.2.0/24"), 8)]);
        let listed = d.list();
        d.swept(&listed);
        assert_eq!(d.list(), vec![]);
    }

    /// A subnet that changed hands while the agent was down departs at the next start; one
    /// that did not, or a file that cannot be read, departs nothing.
    #[test]
    fn subnet_holders_outlive_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet-holders.json");
        assert_eq!(Departures::load(&path), Departures::default(), "no file: no holders");
        let (me, a, b) = (reg("me", "10.1.1.0/24"), reg("a", "10.1.2.0/24"), reg("b", "10.1.3.0/24"));
        let mut d = Departures::default();
        assert!(d.update(&[me.clone(), a.clone(), b.clone()], "me", 1), "new holders are worth saving");
        assert!(!d.update(&[me.clone(), a.clone(), b.clone()], "me", 2), "the same holders are not");
        d.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"10.1.2.0/24\": \"a\""), "{text}");
        // The agent stops; a leaves, c is given its subnet; the agent starts again.
        let mut d = Departures::load(&path);
        assert_eq!(d.list(), vec![], "nothing departed before the registrations are seen");
        let c = reg("c", "10.1.2.0/24");
        assert!(d.update(&[me.clone(), b.clone(), c.clone()], "me", 10));
        assert_eq!(d.list(), vec![("10.1.2.0/24".parse().unwrap(), 10)]);
        // The agent stops before its first sweep: the file still names a, so the next
        // start finds the departure again.
        assert!(!d.update(&[me.clone(), b.clone(), c.clone()], "me", 10));
        d.save(&path).unwrap();
        let mut again = Departures::load(&path);
        again.update(&[me.clone(), b.clone(), c.clone()], "me", 20);
        assert_eq!(again.list(), vec![("10.1.2.0/24".parse().unwrap(), 20)], "found again after a stop");
        // Once swept, c is saved as the holder: the start after that sees nothing.
        assert!(again.swept(&again.list()));
        again.save(&path).unwrap();
        let mut later = Departures::load(&path);
        later.update(&[me.clone(), b.clone(), c.clone()], "me", 30);
        assert_eq!(later.list(), vec![]);
        // a, then c, then a again before a sweep: the file names c, so a restart sees it.
        let mut back = Departures::default();
        back.update(&[me.clone(), a.clone(), b.clone()], "me", 1);
        back.update(&[me.clone(), b.clone(), c.clone()], "me", 2);
        back.update(&[me.clone(), a.clone(), b.clone()], "me", 3);
        back.save(&path).unwrap();
        let mut after = Departures::load(&path);
        after.update(&[me.clone(), a.clone(), b.clone()], "me", 4);
        assert_eq!(after.list(), vec![("10.1.2.0/24".parse().unwrap(), 4)], "back to a: c's flows go");
        // Without the file (a first start, or a lost one), the same start sees no departure.
        let mut fresh = Departures::default();
        fresh.update(&[me.clone(), b.clone(), c.clone()], "me", 10);
        assert_eq!(fresh.list(), vec![]);
        // A malformed file, or one of another version, is taken as none.
        for bad in [&b"{not json"[..], br#"{"version": 2, "holders": {"10.1.2.0/24": "a"}}"#] {
            std::fs::write(&path, bad).unwrap();
            let mut d = Departures::load(&path);
            assert_eq!(d, Departures::default(), "{}", String::from_utf8_lossy(bad));
            d.update(&[me.clone(), c.clone()], "me", 11);
            assert_eq!(d.list(), vec![]);
        }
    }

    #[test]
    fn a_one_way_flows_entry_does_not_take_another_flows_reply_entry_as_its_pair() {
        let udp = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| CtKey {
            src,
            dst,
            sport,
            dport,
            proto: IPPROTO_UDP,
            _pad: [0; 3],
        };
        let s = 1_000_000_000u64;
        let now = 100_000 * s;
        let (client, backend, vip) = ([10, 1, 1, 5], [10, 1, 2, 7], [10, 96, 0, 10]);
        // A datagram straight to the backend long ago, its reply entry evicted since.
        let plain = (udp(client, backend, 40000, 53), CtEntry { last_seen_ns: now - 600 * s, ..Default::default() });
        // The same socket's service flow to that backend, answered a second ago.
        let fwd = CtEntry {
            last_seen_ns: now - 600 * s,
            flags: ct_flags::DNAT,
            nat_ip: backend,
            nat_port: 53,
            nat2_ip: client,
            nat2_port: 40000,
            ..Default::default()
        };
        let rev = CtEntry {
            last_seen_ns: now - s,
            flags: ct_flags::REV_DNAT,
            nat_ip: vip,
            nat_port: 53,
            nat2_ip: client,
            nat2_port: 40000,
            ..Default::default()
        };
        let entries = vec![plain, (udp(client, vip, 40000, 53), fwd), (udp(backend, client, 53, 40000), rev)];
        let doomed: Vec<CtKey> = expired_flows(entries, &CtTimeouts::default(), now, None)
            .into_iter()
            .flat_map(|f| f.entries().map(|(k, _)| k))
            .collect();
        assert_eq!(doomed, vec![plain.0], "the service flow lives on its answer, both ways");
    }

    /// A client's datagrams to a service address before its frontend answered were a plain
    /// flow, routed on untranslated; conntrack is looked up first, so a client keeping its
    /// source port would never be balanced. The flow goes when the frontend starts to
    /// answer: first programmed, or given backends again.
    #[test]
    fn plain_udp_flows_to_a_frontend_go_when_it_starts_to_answer() {
        let Some(mut rig) = Rig::new("proxy-udp-new-frontend") else { return };
        let vip = [10, 96, 0, 53];
        rig.plain_flow(IPPROTO_UDP, 40000, (vip, 53));
        rig.plain_flow(IPPROTO_TCP, 40001, (vip, 53));
        rig.plain_flow(IPPROTO_UDP, 40002, ([10, 96, 0, 54], 53));
        rig.plain_flow(IPPROTO_UDP, 40003, (vip, 54));
        let plain_ports = |rig: &Rig| -> BTreeSet<u16> {
            let entries = rig.dp.ct_entries().unwrap();
            entries.iter().filter(|(_, e)| e.flags & ct_flags::NAT == 0).map(|(k, _)| k.sport.max(k.dport)).collect()
        };
        let svc = dns_service(Protocol::Udp);
        rig.apply(&svc, &[dns_slice(Protocol::Udp, vec![ready(A)])], &[A]);
        assert_eq!(plain_ports(&rig), BTreeSet::from([40001, 40002, 40003]), "only the UDP flow to 10.96.0.53:53 went");
        assert_eq!(rig.dp.ct_entries().unwrap().len(), 6, "both of its directions");
        // Without backends the frontend refuses; a client's plain flow from then on (its
        // datagrams refused) goes again once a backend is back.
        rig.apply(&svc, &[dns_slice(Protocol::Udp, vec![])], &[A]);
        rig.plain_flow(IPPROTO_UDP, 40004, (vip, 53));
        rig.apply(&svc, &[dns_slice(Protocol::Udp, vec![ready(A)])], &[A]);
        assert!(!plain_ports(&rig).contains(&40004), "{:?}", plain_ports(&rig));
        // A frontend that keeps answering leaves a later plain flow alone (none is made then).
        rig.plain_flow(IPPROTO_UDP, 40005, (vip, 53));
        rig.apply(&svc, &[dns_slice(Protocol::Udp, vec![ready(A), ready(B)])], &[A, B]);
        assert!(plain_ports(&rig).contains(&40005));
    }

    #[test]
    fn an_endpoint_outside_the_pod_network_is_never_refused_as_dead() {
        let Some((mut rig, svc, _)) = rig_with_a_flow_to_b("proxy-outside-dead", Protocol::Tcp) else { return };
        let outside = "192.0.2.10";
        rig.apply(&svc, &[dns_slice(Protocol::Tcp, vec![ready(A), ready(outside)])], &[A, B]);
        rig.apply(&svc, &[dns_slice(Protocol::Tcp, vec![ready(A)])], &[A, B]);
        assert!(rig.dead().is_empty(), "no pod of ours, so no refusal of its direct clients: {:?}", rig.dead());
    }

    #[test]
    fn a_udp_backend_keeps_its_flows_while_it_serves_and_loses_them_when_it_stops() {
        let Some((mut rig, svc, id)) = rig_with_a_flow_to_b("proxy-udp-serving", Protocol::Udp) else { return };
        let (a, b) = (A, B);
        // b terminates while a is ready: out of the set, still serving its flows.
        let draining = fixtures::ep(b, "n2", false, true, true);
        rig.apply(&svc, &[dns_slice(Protocol::Udp, vec![ready(a), draining])], &[a, b]);
        assert_eq!(rig.flows_to(), BTreeSet::from([(b.parse().unwrap(), 53)]), "kept while it serves");
        assert!(rig.proxy.take_udp_left().is_empty(), "no socket of the node is aborted");
        // It stops serving: its flows go, and the node's sockets balanced to it.
        let stopped = fixtures::ep(b, "n2", false, false, true);
        rig.apply(&svc, &[dns_slice(Protocol::Udp, vec![ready(a), stopped])], &[a, b]);
        assert!(rig.flows_to().is_empty(), "forgotten once it stops serving");
        assert_eq!(rig.proxy.take_udp_left(), BTreeSet::from([(id, B_IP, 53)]));
    }

    #[test]
    fn a_removed_backend_is_refused_once_its_pod_goes_and_after_a_restart() {
        let Some((mut rig, svc, _)) = rig_with_a_flow_to_b("proxy-dead", Protocol::Tcp) else { return };
        let (a, b) = (A, B);
        // b leaves the service while its pod lives: its connections go on.
        let only_a = [dns_slice(Protocol::Tcp, vec![ready(a)])];
        rig.apply(&svc, &only_a, &[a, b]);
        assert!(rig.dead().is_empty() && rig.flows_to().len() == 1, "its pod still answers");
        // Its pod goes later: refused, and its connection forgotten (it would hang).
        rig.apply(&svc, &only_a, &[a]);
        let b_key = (b.parse().unwrap(), 53);
        assert_eq!(rig.dead(), BTreeSet::from([b_key]));
        assert!(rig.flows_to().is_empty(), "the connection to the gone pod is forgotten");
        // An agent restart keeps the refusal.
        rig.restart();
        rig.apply(&svc, &only_a, &[a]);
        assert_eq!(rig.dead(), BTreeSet::from([b_key]), "the refusal outlives a restart");
    }

    #[test]
    fn counters_of_a_service_deleted_while_no_agent_ran_go_at_the_first_apply() {
        let Some((mut rig, dns, id)) = rig_with_a_flow_to_b("proxy-counters-gone", Protocol::Tcp) else { return };
        let pin = rig.dir.0.join(contiv_common::map_names::SVC_COUNTERS);
        {
            let data = aya::maps::MapData::from_pin(&pin).unwrap();
            let mut m: aya::maps::PerCpuHashMap<aya::maps::MapData, u32, contiv_common::SvcCounters> =
                aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data)).unwrap();
            let one = contiv_common::SvcCounters { connections: 1, ..Default::default() };
            let n = aya::util::nr_cpus().unwrap();
            m.insert(id, aya::maps::PerCpuValues::try_from(vec![one; n]).unwrap(), 0).unwrap();
        }
        assert!(rig.dp.svc_counters().unwrap().contains_key(&id));
        // dns is deleted while the agent is down; the restarted one plans another service.
        rig.restart();
        let mut other = dns_service(Protocol::Udp);
        other.name = "other".into();
        let slice = fixtures::slice("other-a", "other", vec![("dns", Protocol::Udp, 53)], vec![ready(A)]);
        rig.apply(&other, &[slice], &[A, B]);
        assert!(!rig.dp.svc_counters().unwrap().contains_key(&id), "dns's counters went");
        assert!(rig.dp.svc_frontends().unwrap().values().all(|f| f.svc_id != id), "{dns:?}'s frontends too");
    }

    #[test]
    fn more_dead_backends_than_the_map_holds_keep_the_newest_and_the_apply_goes_on() {
        let Some((mut rig, svc, _)) = rig_with_a_flow_to_b("proxy-dead-full", Protocol::Tcp) else { return };
        rig.proxy.dead_backends_max = 1;
        let (a, b, c, d) = (A, B, "10.1.2.4", "10.1.2.5");
        rig.apply(&svc, &[dns_slice(Protocol::Tcp, vec![ready(a), ready(b), ready(c), ready(d)])], &[a, b, c, d]);
        // b's pod goes, then c's: the map holds one, the later.
        rig.apply(&svc, &[dns_slice(Protocol::Tcp, vec![ready(a), ready(c), ready(d)])], &[a, c, d]);
        assert_eq!(rig.dead(), BTreeSet::from([(b.parse().unwrap(), 53)]));
        assert!(rig.flows_to().is_empty(), "b's flow is forgotten");
        // c's and d's pods go at once, each with a flow: one fits in the map, both flows go.
        let id = rig.proxy.plan().frontends.values().next().unwrap().svc_id;
        rig.flow(IPPROTO_TCP, 40002, ([10, 1, 2, 4], 53), id);
        rig.flow(IPPROTO_TCP, 40003, ([10, 1, 2, 5], 53), id);
        std::thread::sleep(Duration::from_millis(2));
        rig.apply(&svc, &[dns_slice(Protocol::Tcp, vec![ready(a)])], &[a]);
        assert_eq!(rig.dead().len(), 1, "{:?}", rig.dead());
        assert!(!rig.dead().contains(&(b.parse().unwrap(), 53)), "the newest, b's place taken");
        assert!(!rig.proxy.failed, "the apply went through");
        assert!(rig.flows_to().is_empty(), "the flows to both are forgotten");
    }

    #[test]
    fn a_pending_flush_spares_an_address_a_new_pod_holds_by_then() {
        let Some((mut rig, svc, _)) = rig_with_a_flow_to_b("proxy-reused", Protocol::Tcp) else { return };
        // An apply found B dead and failed before its flush; by the retry B's address
        // belongs to a new pod, whose flow to port 53 is this one.
        rig.proxy.flush.backends.insert((B.parse().unwrap(), 53, IPPROTO_TCP));
        assert!(rig.proxy.needs_live_ips(&PlanDelta::default()), "the retry asks who holds B");
        rig.apply(&svc, &[dns_slice(Protocol::Tcp, vec![ready(A), ready(B)])], &[A, B]);
        assert_eq!(rig.flows_to(), BTreeSet::from([(B.parse().unwrap(), 53)]), "the new pod's flow stays");
    }

    #[test]
    fn a_backend_that_left_while_no_agent_ran_is_refused_and_forgotten() {
        let Some((mut rig, svc, id)) = rig_with_a_flow_to_b("proxy-left-meanwhile", Protocol::Tcp) else { return };
        let (a, b) = (A, B);
        rig.flow(IPPROTO_TCP, 40001, ([10, 1, 2, 2], 53), id);
        // b and its pod went while the agent was down.
        rig.restart();
        rig.apply(&svc, &[dns_slice(Protocol::Tcp, vec![ready(a)])], &[a]);
        assert_eq!(rig.dead(), BTreeSet::from([(b.parse().unwrap(), 53)]));
        assert_eq!(rig.flows_to(), BTreeSet::from([(a.parse().unwrap(), 53)]), "only a's connection stays");
    }

    #[test]
    fn a_sweep_takes_both_directions_of_an_idle_flow_and_keeps_a_live_one() {
        let t = CtTimeouts::default();
        let s = 1_000_000_000u64;
        let now = 100_000 * s;
        let seen = |ago: u64, tcp_flags: u8| CtEntry { last_seen_ns: now - ago * s, tcp_flags, ..Default::default() };
        let (a, b) = ([10, 1, 1, 2], [10, 1, 1, 3]);
        let closed = ct_tcp::ACK | ct_tcp::RST;
        let entries = vec![
            // Closed 20 s ago (both sides): past tcp_closing (10 s).
            (key(a, b, 40_000, 80), seen(20, closed)),
            (key(b, a, 80, 40_000), seen(20, closed)),
            // Established; the reply direction idle for an hour, the original seen now:
            // the flow lives.
            (key(a, b, 40_001, 80), seen(3600, ct_tcp::ACK)),
            (key(b, a, 80, 40_001), seen(1, ct_tcp::ACK)),
            // A SYN without an answer for two minutes: past tcp_syn (60 s), alone.
            (key(a, b, 40_002, 80), seen(120, ct_tcp::SYN)),
        ];
        let doomed: BTreeSet<CtKey> =
            expired_flows(entries, &t, now, None).into_iter().flat_map(|f| f.entries().map(|(k, _)| k)).collect();
        let want: BTreeSet<CtKey> =
            [key(a, b, 40_000, 80), key(b, a, 80, 40_000), key(a, b, 40_002, 80)].into_iter().collect();
        assert_eq!(doomed, want);
    }
}
