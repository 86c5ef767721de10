//! Every map the programs share, with the accessors the programs use. Names, limits and
//! value types come from `contiv-common`; the agent pins each map under its name.

use aya_ebpf::{
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SkStorage, XskMap, lpm_trie::Key,
    },
    macros::btf_map,
};
use contiv_common::{
    CtEntry, CtKey, DatapathConfig, FragHead, FragKey, Ipv4Key, MAX_CT, MAX_DEAD_BACKENDS, MAX_FRAGS, MAX_NODE_ADDRS,
    MAX_PODS, MAX_POLICY_ENTRIES, MAX_REMOTE_ROUTES, MAX_SLOWPATH_QUEUES, MAX_SOCK_REVNAT, MAX_SOCK_UDP_BACKEND,
    MAX_SVC_AFFINITY, MAX_SVC_BACKENDS, MAX_SVC_FRONTENDS, MAX_SVC_SOURCE_RANGES, MONITOR_RING_BYTES, MapName,
    MonitorBucket, MonitorEvent, NodeAddr, OverlayCounters, PodCounters, PodEndpoint, PolicyKey, PolicyPorts,
    RemoteRoute, SlowPortCounters, SockCounters, SockOrigin, SockRevNat, SockRevNatKey, SockUdpBackend, SvcAffinity,
    SvcAffinityKey, SvcBackend, SvcBackendKey, SvcCounters, SvcFrontend, SvcKey, SvcSlotKey, SvcSourceRange,
    TraceRecord, monitor_bucket,
};

const MAX_PODS_USIZE: usize = MAX_PODS as usize;

#[btf_map]
pub static PODS: HashMap<Ipv4Key, PodEndpoint, MAX_PODS_USIZE> = HashMap::new();

#[btf_map]
pub static POD_IFACES: HashMap<u32, PodEndpoint, MAX_PODS_USIZE> = HashMap::new();

#[btf_map]
pub static POD_COUNTERS: PerCpuHashMap<Ipv4Key, PodCounters, MAX_PODS_USIZE> = PerCpuHashMap::new();

#[btf_map]
pub static CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map]
pub static SLOWPATH_XSKS: XskMap<{ MAX_SLOWPATH_QUEUES as usize }> = XskMap::new();

/// `uplink = "vpp"`: VPP's af_xdp interface registers its sockets here itself. libbpf and
/// libxdp look the map up by this name in the program attached to the interface.
#[btf_map(name = "xsks_map")]
pub static VPP_XSKS: XskMap<{ MAX_SLOWPATH_QUEUES as usize }> = XskMap::new();

#[btf_map]
pub static SLOWPORT_COUNTERS: PerCpuArray<SlowPortCounters, 1> = PerCpuArray::new();

#[btf_map]
pub static REMOTE_ROUTES: LpmTrie<[u8; 4], RemoteRoute, { MAX_REMOTE_ROUTES as usize }> = LpmTrie::new();

#[btf_map]
pub static OVERLAY_COUNTERS: PerCpuArray<OverlayCounters, 1> = PerCpuArray::new();

#[btf_map]
pub static SVC_FRONTENDS: HashMap<SvcKey, SvcFrontend, { MAX_SVC_FRONTENDS as usize }> = HashMap::new();

#[btf_map]
pub static SVC_BACKENDS: HashMap<SvcBackendKey, SvcBackend, { MAX_SVC_BACKENDS as usize }> = HashMap::new();

/// Where each backend sits in its set, for affinity to find it after the ordinals moved.
#[btf_map]
pub static SVC_BACKEND_SLOTS: HashMap<SvcSlotKey, u32, { MAX_SVC_BACKENDS as usize }> = HashMap::new();

#[btf_map]
pub static SVC_AFFINITY: LruHashMap<SvcAffinityKey, SvcAffinity, { MAX_SVC_AFFINITY as usize }> = LruHashMap::new();

#[btf_map]
pub static SVC_SOURCE_RANGES: LpmTrie<SvcSourceRange, u8, { MAX_SVC_SOURCE_RANGES as usize }> = LpmTrie::new();

#[btf_map]
pub static SVC_COUNTERS: PerCpuHashMap<u32, SvcCounters, { MAX_SVC_FRONTENDS as usize }> = PerCpuHashMap::new();

#[btf_map]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNat, { MAX_SOCK_REVNAT as usize }> = LruHashMap::new();

/// Per connected UDP socket of the node that was balanced, by cookie: where it went (see
/// the agent's `sockdiag`). Allocated as used: it holds only live sockets.
#[btf_map]
pub static SOCK_UDP_BACKEND: HashMap<
    u64,
    SockUdpBackend,
    { MAX_SOCK_UDP_BACKEND as usize },
    { aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map]
pub static SOCK_COUNTERS: PerCpuArray<SockCounters, 1> = PerCpuArray::new();

/// Per connected socket the socket programs balanced: where it asked to go.
#[btf_map]
pub static SOCK_ORIGIN: SkStorage<SockOrigin> = SkStorage::new();

#[btf_map]
pub static NODE_NETNS: HashMap<u64, u8, { MAX_PODS as usize + 1 }> = HashMap::new();

#[btf_map]
pub static NODE_ADDRS: HashMap<Ipv4Key, NodeAddr, { MAX_NODE_ADDRS as usize }> = HashMap::new();

#[btf_map]
pub static CT: LruHashMap<CtKey, CtEntry, { MAX_CT as usize }> = LruHashMap::new();

#[btf_map]
pub static DEAD_BACKENDS: HashMap<SvcKey, u8, { MAX_DEAD_BACKENDS as usize }> = HashMap::new();

/// Cluster IPs of programmed services (their undefined ports are refused).
#[btf_map]
pub static SVC_CLUSTER_IPS: HashMap<Ipv4Key, u8, { MAX_SVC_FRONTENDS as usize }> = HashMap::new();

/// NetworkPolicy: (local pod, direction, peer prefix) -> what is allowed (see `policy.rs`).
#[btf_map]
pub static POLICY: LpmTrie<PolicyKey, PolicyPorts, { MAX_POLICY_ENTRIES as usize }> = LpmTrie::new();

/// Monitor events for the agent (see `monitor.rs`).
#[btf_map]
pub static MONITOR_EVENTS: RingBuf<MonitorEvent, { MONITOR_RING_BYTES as usize }> = RingBuf::new();

/// The monitor's per-CPU token buckets and counters, one per kind of event.
#[btf_map]
pub static MONITOR_RATE: PerCpuArray<MonitorBucket, { monitor_bucket::COUNT as usize }> = PerCpuArray::new();

/// What a traced run of `tc_from_pod` decided (see `trace.rs`).
#[btf_map]
pub static TRACE_STEPS: PerCpuArray<TraceRecord, 1> = PerCpuArray::new();

/// Fragmented datagrams in flight: the ports their first fragment carried (see `frag.rs`).
#[btf_map]
pub static FRAGS: LruHashMap<FragKey, FragHead, { MAX_FRAGS as usize }> = LruHashMap::new();

/// Written by the agent only (layout versions); declared here so the object carries it.
#[btf_map]
pub static SCHEMA: HashMap<MapName, u32, 64> = HashMap::new();

#[inline(always)]
pub fn config() -> Option<&'static DatapathConfig> {
    CONFIG.get(0)
}

/// A local pod by address (copied out).
#[inline(always)]
pub fn pod(ip: [u8; 4]) -> Option<PodEndpoint> {
    // SAFETY: read-only lookup, copied before anything else happens.
    unsafe { PODS.get(Ipv4Key::new(ip)) }.copied()
}

/// The pod attached to a host veth (copied out).
#[inline(always)]
pub fn pod_by_ifindex(ifindex: u32) -> Option<PodEndpoint> {
    // SAFETY: read-only lookup, copied.
    unsafe { POD_IFACES.get(ifindex) }.copied()
}

/// The node that owns `ip` (a pod subnet or a node address), longest prefix first.
#[inline(always)]
pub fn remote_route(ip: [u8; 4]) -> Option<RemoteRoute> {
    REMOTE_ROUTES.get(&Key::new(32, ip)).copied()
}

#[inline(always)]
pub fn pod_counters(ip: [u8; 4]) -> Option<&'static mut PodCounters> {
    // SAFETY: per-CPU value: nobody else writes this CPU's slot concurrently.
    POD_COUNTERS.get_ptr_mut(Ipv4Key::new(ip)).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn count_slowport(f: impl FnOnce(&mut SlowPortCounters)) {
    if let Some(p) = SLOWPORT_COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this CPU.
        f(unsafe { &mut *p });
    }
}

#[inline(always)]
pub fn count_overlay(f: impl FnOnce(&mut OverlayCounters)) {
    if let Some(p) = OVERLAY_COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this CPU.
        f(unsafe { &mut *p });
    }
}

#[inline(always)]
pub fn count_sock(f: impl FnOnce(&mut SockCounters)) {
    if let Some(p) = SOCK_COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this CPU.
        f(unsafe { &mut *p });
    }
}

/// A service port's counters on this CPU.
#[inline(always)]
pub fn count_svc(svc_id: u32, f: impl FnOnce(&mut SvcCounters)) {
    if SVC_COUNTERS.get_ptr_mut(svc_id).is_none() {
        // First event of this service port: its counters start at zero (the agent removes
        // them when the port goes).
        let _ = SVC_COUNTERS.insert(svc_id, SvcCounters::default(), 1 /* BPF_NOEXIST */);
    }
    if let Some(p) = SVC_COUNTERS.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot of this CPU.
        f(unsafe { &mut *p });
    }
}
