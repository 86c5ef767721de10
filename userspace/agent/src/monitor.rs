//! The datapath event stream (`GET /monitor`, `netctl monitor`).
//!
//! The kernel writes an event for every counted drop (and, with `[monitor] flows`, every
//! allowed new flow) into the `MONITOR_EVENTS` ring buffer, within a per-CPU rate it
//! enforces itself (see `ebpf/contiv-ebpf/src/monitor.rs`). One reader task here drains it
//! whenever it has data (no polling), names the pods of each event once, and hands the
//! events to every connected client through a bounded broadcast channel:
//!
//! - events over the kernel's rate were never written; the reader reads the buckets'
//!   counters every second and tells clients `N events suppressed` (node-wide);
//! - events the ring buffer had no room for (the reader fell behind) are `lost`, likewise;
//! - a client that reads more slowly than events arrive loses the oldest ones and is told
//!   `lagged, N events lost`: no client can make the reader, the ring buffer or forwarding
//!   wait.
//!
//! With nobody connected the reader still drains the ring (so a new client never sees old
//! events) but names nothing and sends nothing.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use contiv_common::{MonitorEvent, drop_reason, hook, monitor_bucket, monitor_kind, verdict};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::{
    config::MonitorConfig,
    datapath::{MonitorCounters, MonitorMaps, sum_buckets},
};

/// Notices a slow client may fall behind by before it loses the oldest.
const CHANNEL_CAPACITY: usize = 4096;
/// Events drained from the ring buffer before the reader yields.
const BATCH: usize = 1024;
/// How often the buckets' counters are read (suppressed / lost notices, metrics).
const COUNTER_PERIOD: Duration = Duration::from_secs(1);
/// How old the pod directory may be before an unknown cluster address refreshes it.
const DIRECTORY_MIN_AGE: Duration = Duration::from_millis(500);
/// How old the pod directory may get at all while clients are connected.
const DIRECTORY_MAX_AGE: Duration = Duration::from_secs(5);
/// How long a batch waits for a refresh of the pod names before it goes out without it.
const DIRECTORY_WAIT: Duration = Duration::from_millis(100);

/// A pod an address belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName {
    /// `namespace/name`.
    pub id: String,
    /// Its host veth, when it runs on this node.
    pub interface: Option<String>,
}

/// Pod addresses -> pods: this node's attachments, and the cluster model's other pods.
pub type Directory = HashMap<Ipv4Addr, PodName>;

/// One datapath event as clients get it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EventReport {
    /// UTC, RFC 3339 with microseconds.
    pub time: String,
    /// `drop` or `flow`.
    pub kind: &'static str,
    /// `dropped`, or where an allowed flow goes (`local`, `overlay`, `host`, ...).
    pub verdict: &'static str,
    /// A drop's reason (the drop counters' names); empty for a flow.
    pub reason: &'static str,
    /// The program that saw the packet.
    pub hook: &'static str,
    /// The local pod the event is about (`namespace/name`), if any.
    pub pod: Option<String>,
    pub pod_ip: Option<Ipv4Addr>,
    pub interface: Option<String>,
    /// `TCP`, `UDP`, `ICMP`, `SCTP`, `ARP`, a number, or an ethertype (`0x86dd`).
    pub proto: String,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Ports (TCP/UDP/SCTP); ICMP type and code.
    pub sport: u16,
    pub dport: u16,
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
    /// TCP flags, e.g. `SYN` or `ACK|FIN`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tcp_flags: String,
    pub len: u32,
    /// A flow into the overlay: the node address it was tunnelled to.
    pub next_hop: Option<Ipv4Addr>,
}

/// What the stream carries: NDJSON lines, `type` saying which.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Notice {
    /// First line of every stream: where it comes from and its limits.
    #[serde(rename_all = "camelCase")]
    Hello {
        node: String,
        rate_per_cpu: u32,
        burst: u32,
        flows: bool,
        cpus: usize,
        filter: String,
    },
    Event(EventReport),
    /// Events over the kernel's rate since the last notice (node-wide), and in all.
    #[serde(rename_all = "camelCase")]
    Suppressed {
        kind: &'static str,
        count: u64,
        total: u64,
    },
    /// Events the ring buffer had no room for (the reader fell behind), node-wide.
    #[serde(rename_all = "camelCase")]
    Lost {
        kind: &'static str,
        count: u64,
        total: u64,
    },
    /// This client read too slowly: the oldest `count` notices were dropped for it.
    Lagged {
        count: u64,
    },
}

/// Which notices a client wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only events involving this address (as the pod concerned, source or destination).
    pub pod_ip: Option<Ipv4Addr>,
    /// Only drops (and drop-bucket suppressions).
    pub drops_only: bool,
}

impl Filter {
    pub fn matches(&self, n: &Notice) -> bool {
        match n {
            Notice::Event(e) => {
                (!self.drops_only || e.kind == "drop")
                    && self.pod_ip.is_none_or(|ip| e.pod_ip == Some(ip) || e.src == ip || e.dst == ip)
            }
            Notice::Suppressed { kind, .. } | Notice::Lost { kind, .. } => !self.drops_only || *kind == "drop",
            Notice::Hello { .. } | Notice::Lagged { .. } => true,
        }
    }
}

/// The monitor's shared half: the channel to the clients, and the counters last read.
#[derive(Debug)]
pub struct Monitor {
    config: MonitorConfig,
    tx: broadcast::Sender<Arc<Notice>>,
    closed: watch::Sender<bool>,
    clients: AtomicUsize,
    counters: Mutex<[MonitorCounters; monitor_bucket::COUNT as usize]>,
}

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("{0} monitor streams are open already ([monitor] maxClients)")]
    TooManyClients(u32),
    #[error("the agent is shutting down")]
    Closed,
}

/// Held by an open stream; counts it.
struct ClientSlot(Arc<Monitor>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Monitor {
    pub fn new(config: MonitorConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            tx: broadcast::channel(CHANNEL_CAPACITY).0,
            closed: watch::channel(false).0,
            clients: AtomicUsize::new(0),
            counters: Mutex::new(Default::default()),
        })
    }

    pub fn config(&self) -> MonitorConfig {
        self.config
    }

    /// The buckets' counters as last read (drops, flows).
    pub fn counters(&self) -> [MonitorCounters; monitor_bucket::COUNT as usize] {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Streams open now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Ends every stream (the agent is stopping).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// A client's stream of NDJSON lines: `hello` first, then what `filter` lets through,
    /// until the client goes away or the agent stops.
    pub fn subscribe(
        self: &Arc<Self>,
        filter: Filter,
        hello: Notice,
    ) -> Result<impl futures::Stream<Item = Result<String, std::convert::Infallible>> + Send + 'static, MonitorError>
    {
        if *self.closed.borrow() {
            return Err(MonitorError::Closed);
        }
        let max = self.config.max_clients;
        if self.clients.fetch_add(1, Ordering::Relaxed) >= max as usize {
            self.clients.fetch_sub(1, Ordering::Relaxed);
            return Err(MonitorError::TooManyClients(max));
        }
        let slot = ClientSlot(self.clone());
        let state = (self.tx.subscribe(), self.closed.subscribe(), filter, slot, Some(hello));
        Ok(futures::stream::unfold(state, |(mut rx, mut closed, filter, slot, mut first)| async move {
            if let Some(hello) = first.take() {
                return Some((Ok(line(&hello)), (rx, closed, filter, slot, first)));
            }
            loop {
                let next = tokio::select! {
                    _ = stopped(&mut closed) => return None,
                    r = rx.recv() => r,
                };
                let notice = match next {
                    Ok(n) if filter.matches(&n) => line(&n),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(count)) => line(&Notice::Lagged { count }),
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                return Some((Ok(notice), (rx, closed, filter, slot, first)));
            }
        }))
    }

    fn publish(&self, n: Notice) {
        // No receiver: nobody listens; nothing to do.
        let _ = self.tx.send(Arc::new(n));
    }

    fn listened(&self) -> bool {
        self.tx.receiver_count() > 0
    }
}

fn line(n: &Notice) -> String {
    let mut s = serde_json::to_string(n).unwrap_or_else(|e| format!("{{\"type\":\"error\",\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

/// Where the reader gets names from (the agent).
pub trait Names: Send + Sync + 'static {
    /// Every pod address this node knows: its own pods and the cluster's.
    fn directory(&self) -> impl std::future::Future<Output = Directory> + Send;
    /// Whether an address may belong to a pod (so an unknown one is worth a refresh).
    fn maybe_pod(&self, ip: Ipv4Addr) -> bool;
}

/// The reader: drains the ring buffer, publishes events and counter notices, until `stop`.
pub async fn run<N: Names>(monitor: Arc<Monitor>, maps: MonitorMaps, names: Arc<N>, mut stop: watch::Receiver<bool>) {
    let MonitorMaps { events, rate } = maps;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer,
    // and always returns that fd.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(fd) => fd,
        Err(e) => {
            log::error!(
                "monitor: cannot wait on the event ring buffer: {}; no events will be streamed",
                e.into_parts().1
            );
            stopped(&mut stop).await;
            monitor.close();
            return;
        }
    };
    let mut reader = Reader { names, directory: Directory::new(), refreshed: None, refreshing: None };
    let mut tick = tokio::time::interval(COUNTER_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = monitor.counters();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            guard = ring.readable_mut() => {
                let mut guard = match guard {
                    Ok(g) => g,
                    Err(e) => {
                        log::error!("monitor: waiting on the ring buffer: {e}");
                        tokio::time::sleep(COUNTER_PERIOD).await;
                        continue;
                    }
                };
                let mut batch = Vec::new();
                let ring = guard.get_inner_mut();
                while batch.len() < BATCH {
                    let Some(item) = ring.next() else { break };
                    if let Some(ev) = parse(&item) {
                        batch.push(ev);
                    }
                }
                if batch.len() < BATCH {
                    // Drained: wait for the kernel's next wake-up.
                    guard.clear_ready();
                }
                drop(guard);
                if monitor.listened() && !batch.is_empty() {
                    reader.publish(&monitor, &batch).await;
                }
            }
            _ = tick.tick() => {
                let now = sum_buckets(|i| {
                    rate.get(&i, 0)
                        .map(|v| v.iter().copied().collect())
                        .map_err(|source| crate::datapath::DatapathError::Map { name: "MONITOR_RATE", source })
                });
                let now = match now {
                    Ok(n) => n,
                    Err(e) => {
                        log::warn!("monitor: reading the rate buckets: {e}");
                        continue;
                    }
                };
                for (i, kind) in [(monitor_bucket::DROPS, "drop"), (monitor_bucket::FLOWS, "flow")] {
                    let (was, is) = (last[i as usize], now[i as usize]);
                    if is.suppressed > was.suppressed {
                        monitor.publish(Notice::Suppressed { kind, count: is.suppressed - was.suppressed, total: is.suppressed });
                    }
                    if is.lost > was.lost {
                        monitor.publish(Notice::Lost { kind, count: is.lost - was.lost, total: is.lost });
                    }
                }
                last = now;
                *monitor.counters.lock().unwrap_or_else(|p| p.into_inner()) = now;
            }
        }
    }
    monitor.close();
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// The reader's naming state.
struct Reader<N> {
    names: Arc<N>,
    directory: Directory,
    refreshed: Option<Instant>,
    /// A refresh under way: the directory takes the node's lock, which a long resync or an
    /// ADD storm holds; the reader keeps draining the ring with the names it has meanwhile.
    refreshing: Option<tokio::task::JoinHandle<Directory>>,
}

impl<N: Names> Reader<N> {
    async fn publish(&mut self, monitor: &Monitor, batch: &[MonitorEvent]) {
        if self.refreshing.as_ref().is_some_and(|t| t.is_finished())
            && let Some(Some(Ok(directory))) = self.refreshing.take().map(futures::FutureExt::now_or_never)
        {
            self.directory = directory;
            self.refreshed = Some(Instant::now());
        }
        let age = self.refreshed.map(|t| t.elapsed());
        let unknown = |ip: [u8; 4]| {
            let ip = Ipv4Addr::from(ip);
            !ip.is_unspecified() && !self.directory.contains_key(&ip) && self.names.maybe_pod(ip)
        };
        let stale = match age {
            None => true,
            Some(a) if a > DIRECTORY_MAX_AGE => true,
            Some(a) => {
                a > DIRECTORY_MIN_AGE && batch.iter().any(|e| unknown(e.pod) || unknown(e.src) || unknown(e.dst))
            }
        };
        if stale && self.refreshed.is_none() {
            // The first names: waited for.
            self.directory = self.names.directory().await;
            self.refreshed = Some(Instant::now());
        } else if stale {
            let names = self.names.clone();
            let task = self.refreshing.get_or_insert_with(|| tokio::spawn(async move { names.directory().await }));
            // Usually quick; under a long hold of the node's lock the batch goes out with the
            // names it has, and the refresh lands for a later one.
            if let Ok(done) = tokio::time::timeout(DIRECTORY_WAIT, task).await {
                self.refreshing = None;
                if let Ok(directory) = done {
                    self.directory = directory;
                    self.refreshed = Some(Instant::now());
                }
            }
        }
        let clock = Clock::now();
        for ev in batch {
            monitor.publish(Notice::Event(report(ev, &self.directory, &clock)));
        }
    }
}

fn parse(bytes: &[u8]) -> Option<MonitorEvent> {
    if bytes.len() < std::mem::size_of::<MonitorEvent>() {
        return None;
    }
    // SAFETY: MonitorEvent is plain integers (every bit pattern valid); the length was checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<MonitorEvent>()) })
}

/// CLOCK_MONOTONIC (the kernel's event times) against the wall clock, taken together.
struct Clock {
    monotonic_ns: u64,
    wall: SystemTime,
}

impl Clock {
    fn now() -> Self {
        Self { monotonic_ns: crate::proxy::monotonic_ns(), wall: SystemTime::now() }
    }

    fn wall(&self, ts_ns: u64) -> SystemTime {
        match self.monotonic_ns.checked_sub(ts_ns) {
            Some(ago) => self.wall - Duration::from_nanos(ago),
            None => self.wall + Duration::from_nanos(ts_ns - self.monotonic_ns),
        }
    }
}

/// An event with its pods named.
pub fn report(ev: &MonitorEvent, dir: &Directory, clock: &impl WallClock) -> EventReport {
    let pod_ip = (ev.pod != [0; 4]).then(|| Ipv4Addr::from(ev.pod));
    let pod = pod_ip.and_then(|ip| dir.get(&ip));
    let name = |ip: [u8; 4]| dir.get(&Ipv4Addr::from(ip)).map(|p| p.id.clone());
    let drop = ev.kind == monitor_kind::DROP;
    EventReport {
        time: rfc3339(clock.wall_time(ev.ts_ns)),
        kind: if drop { "drop" } else { "flow" },
        verdict: if drop { "dropped" } else { verdict::name(ev.reason) },
        reason: if drop { drop_reason::name(ev.reason) } else { "" },
        hook: hook::name(ev.hook),
        pod: pod.map(|p| p.id.clone()),
        pod_ip,
        interface: pod.and_then(|p| p.interface.clone()),
        proto: proto_name(ev.ethertype, ev.proto),
        src: Ipv4Addr::from(ev.src),
        dst: Ipv4Addr::from(ev.dst),
        sport: ev.sport,
        dport: ev.dport,
        src_pod: name(ev.src),
        dst_pod: name(ev.dst),
        tcp_flags: if ev.proto == 6 { tcp_flags(ev.tcp_flags) } else { String::new() },
        len: ev.len,
        next_hop: (ev.next_hop != [0; 4]).then(|| Ipv4Addr::from(ev.next_hop)),
    }
}

/// Turns kernel times into wall-clock times.
pub trait WallClock {
    fn wall_time(&self, monotonic_ns: u64) -> SystemTime;
}

impl WallClock for Clock {
    fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
        self.wall(monotonic_ns)
    }
}

fn proto_name(ethertype: u16, proto: u8) -> String {
    match (ethertype, proto) {
        (0x0806, _) => "ARP".into(),
        (0x0800, 1) => "ICMP".into(),
        (0x0800, 6) => "TCP".into(),
        (0x0800, 17) => "UDP".into(),
        (0x0800, 132) => "SCTP".into(),
        (0x0800, p) => p.to_string(),
        (e, _) => format!("{e:#06x}"),
    }
}

/// TCP flags by name, `|`-separated.
pub fn tcp_flags(f: u8) -> String {
    const NAMES: [(u8, &str); 6] = [(2, "SYN"), (16, "ACK"), (1, "FIN"), (4, "RST"), (8, "PSH"), (32, "URG")];
    NAMES.iter().filter(|(b, _)| f & b != 0).map(|(_, n)| *n).collect::<Vec<_>>().join("|")
}

/// `2026-12-01T10:11:12.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_micros())
}

/// Days since 1970-01-01 -> (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl WallClock for Fixed {
        fn wall_time(&self, monotonic_ns: u64) -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(1_764_583_872) + Duration::from_nanos(monotonic_ns)
        }
    }

    fn event(kind: u8, reason: u8) -> MonitorEvent {
        MonitorEvent {
            ts_ns: 1_500_000,
            pod: [10, 1, 1, 2],
            ifindex: 7,
            src: [10, 1, 1, 2],
            dst: [10, 1, 2, 3],
            sport: 40000,
            dport: 80,
            proto: 6,
            kind,
            reason,
            hook: hook::FROM_POD,
            len: 74,
            ethertype: 0x0800,
            tcp_flags: 2,
            ..Default::default()
        }
    }

    #[test]
    fn a_drop_event_names_its_pods_reason_and_time() {
        let mut dir = Directory::new();
        dir.insert(Ipv4Addr::new(10, 1, 1, 2), PodName { id: "x/a".into(), interface: Some("cv1".into()) });
        dir.insert(Ipv4Addr::new(10, 1, 2, 3), PodName { id: "y/b".into(), interface: None });
        let r = report(&event(monitor_kind::DROP, drop_reason::POLICY_EGRESS), &dir, &Fixed);
        assert_eq!(r.time, "2025-12-01T10:11:12.001500Z");
        assert_eq!((r.kind, r.verdict, r.reason, r.hook), ("drop", "dropped", "policy_egress", "tc_from_pod"));
        assert_eq!(r.pod.as_deref(), Some("x/a"));
        assert_eq!(r.interface.as_deref(), Some("cv1"));
        assert_eq!((r.src_pod.as_deref(), r.dst_pod.as_deref()), (Some("x/a"), Some("y/b")));
        assert_eq!((r.proto.as_str(), r.sport, r.dport, r.tcp_flags.as_str()), ("TCP", 40000, 80, "SYN"));
        let json = serde_json::to_value(Notice::Event(r)).unwrap();
        assert_eq!(json["type"], "event");
        assert_eq!(json["srcPod"], "x/a");
    }

    #[test]
    fn filters_by_pod_address_and_kind() {
        let dir = Directory::new();
        let drop = Notice::Event(report(&event(monitor_kind::DROP, drop_reason::SPOOFED_IP), &dir, &Fixed));
        let flow = Notice::Event(report(&event(monitor_kind::FLOW, verdict::TUNNEL), &dir, &Fixed));
        let as_dst = Filter { pod_ip: Some(Ipv4Addr::new(10, 1, 2, 3)), drops_only: false };
        let other = Filter { pod_ip: Some(Ipv4Addr::new(10, 1, 9, 9)), drops_only: false };
        let drops = Filter { pod_ip: None, drops_only: true };
        assert!(as_dst.matches(&drop) && as_dst.matches(&flow), "the destination's pod sees both");
        assert!(!other.matches(&drop), "another pod sees neither");
        assert!(drops.matches(&drop) && !drops.matches(&flow));
        let suppressed = |kind| Notice::Suppressed { kind, count: 3, total: 9 };
        assert!(drops.matches(&suppressed("drop")) && !drops.matches(&suppressed("flow")));
        assert!(other.matches(&suppressed("drop")), "rate notices are node-wide");
    }

    #[test]
    fn dates_are_gregorian() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000000Z");
        assert_eq!(tcp_flags(0x12), "SYN|ACK");
    }

    #[tokio::test]
    async fn a_slow_client_is_told_what_it_lost_and_a_full_house_is_refused() {
        use futures::StreamExt;
        let m = Monitor::new(MonitorConfig { max_clients: 1, ..Default::default() });
        let hello = Notice::Lagged { count: 0 };
        let mut s = Box::pin(m.subscribe(Filter::default(), hello.clone()).unwrap());
        assert!(matches!(m.subscribe(Filter::default(), hello.clone()), Err(MonitorError::TooManyClients(1))));
        assert!(s.next().await.unwrap().unwrap().contains("lagged"));
        for i in 0..CHANNEL_CAPACITY as u64 + 10 {
            m.publish(Notice::Suppressed { kind: "drop", count: 1, total: i });
        }
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(first, "{\"type\":\"lagged\",\"count\":10}\n");
        m.close();
        let mut rest = 0;
        while s.next().await.is_some() {
            rest += 1;
        }
        assert!(rest <= CHANNEL_CAPACITY, "the stream ends once the monitor closes");
        drop(s);
        assert_eq!(m.clients(), 0);
    }

    /// Pod names that take the node's lock, held for a while (a long resync).
    struct Held {
        open: tokio::sync::watch::Receiver<bool>,
        names: Directory,
    }
    impl Names for Held {
        async fn directory(&self) -> Directory {
            let _ = self.open.clone().wait_for(|o| *o).await;
            self.names.clone()
        }
        fn maybe_pod(&self, _: Ipv4Addr) -> bool {
            true
        }
    }

    /// A refresh of the names that waits on the node's lock does not stop the reader: the
    /// batch goes out with the names it has, and the refresh lands for a later one.
    #[tokio::test]
    async fn a_held_node_lock_does_not_stall_the_reader() {
        use futures::StreamExt;
        let m = Monitor::new(MonitorConfig::default());
        let mut s = Box::pin(m.subscribe(Filter::default(), Notice::Lagged { count: 0 }).unwrap());
        let _ = s.next().await;
        let (open, rx) = tokio::sync::watch::channel(true);
        let pod = PodName { id: "x/a".into(), interface: None };
        let names = Arc::new(Held { open: rx, names: [(Ipv4Addr::new(10, 1, 1, 2), pod)].into() });
        let mut reader = Reader { names, directory: Directory::new(), refreshed: None, refreshing: None };
        reader.publish(&m, &[event(monitor_kind::DROP, 1)]).await;
        assert!(s.next().await.unwrap().unwrap().contains("\"pod\":\"x/a\""), "the first names are waited for");
        // The names go stale and the lock is held: the batch still goes out, promptly.
        open.send_replace(false);
        reader.refreshed = Some(Instant::now() - DIRECTORY_MAX_AGE - Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(2), reader.publish(&m, &[event(monitor_kind::DROP, 1)]))
            .await
            .expect("published without waiting for the refresh");
        assert!(s.next().await.unwrap().unwrap().contains("\"pod\":\"x/a\""), "with the names it had");
        assert!(reader.refreshing.is_some(), "the refresh goes on");
        open.send_replace(true);
        tokio::time::sleep(Duration::from_millis(50)).await;
        reader.publish(&m, &[event(monitor_kind::DROP, 1)]).await;
        assert!(reader.refreshing.is_none() && reader.refreshed.unwrap().elapsed() < Duration::from_secs(1));
    }
}
