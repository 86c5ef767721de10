//! The service half of the datapath: the uplink's and the cgroup root's programs, and the
//! service, node, conntrack and counter maps as the applier and the agent's tasks use them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{CgroupAttachMode, Program, TcAttachType, links::FdLink},
};
use contiv_common::{
    CtEntry, CtKey, Ipv4Key, NodeAddr, SockCounters, SockRevNat, SockRevNatKey, SockUdpBackend, SvcBackend,
    SvcBackendKey, SvcCounters, SvcFrontend, SvcKey, SvcSlotKey, SvcSourceRange, map_names, program_names, revnat_kind,
};
use ipnet::Ipv4Net;

use super::{Datapath, DatapathError, Result, ignore_missing, map_err, prog_err};

/// The socket programs, attached at the cgroup2 root: the `sock_addr` ones, then
/// `sock_release` (a `cgroup_sock` program).
pub const SOCK_PROGRAMS: [&str; 8] = [
    program_names::SOCK_CONNECT4,
    program_names::SOCK_SENDMSG4,
    program_names::SOCK_RECVMSG4,
    program_names::SOCK_GETPEERNAME4,
    program_names::SOCK_CONNECT6,
    program_names::SOCK_RECVMSG6,
    program_names::SOCK_GETPEERNAME6,
    program_names::SOCK_RELEASE,
];

/// The root of the host's cgroup2 hierarchy (where socket programs see every process):
/// the cgroup2 mount whose root is `/`, /sys/fs/cgroup preferred.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split(' ').next()?;
            let mut f = pre.split(' ');
            let root = f.nth(3)?;
            let mount_point = f.next()?;
            (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(mount_point))
        })
        .collect();
    found.sort_by_key(|p| p != Path::new("/sys/fs/cgroup"));
    found.into_iter().next()
}

fn io_err(name: &'static str, e: impl std::fmt::Display) -> DatapathError {
    prog_err(name)(aya::programs::ProgramError::IOError(std::io::Error::other(e.to_string())))
}

impl Datapath {
    // === programs ===

    /// Attaches `tc_from_uplink` to the uplink's ingress and `tc_to_uplink` to its egress
    /// (pinned, replaced make-before-break): clients outside the cluster reach NodePorts,
    /// externalIPs and load-balancer IPs through them, including backends that are this
    /// node's own stack (hostNetwork pods), whose answers leave by the egress.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<()> {
        let links = self.pin_dir.join("links");
        let ingress = links.join(format!("{ifname}_ingress"));
        self.replace_pinned_tcx(program_names::FROM_UPLINK, ifname, TcAttachType::Ingress, &ingress)?;
        let egress = links.join(format!("{ifname}_egress"));
        self.replace_pinned_tcx(program_names::TO_UPLINK, ifname, TcAttachType::Egress, &egress)
    }

    /// Attaches the socket programs at `cgroup` (the cgroup2 root), pinned as links under
    /// `links/cgroup_<program>`. A link a previous agent left is handed the new program in
    /// one step (`BPF_LINK_UPDATE`): every socket call meets exactly one of the two. Side by
    /// side, the new `sock_connect4` would run after the old one had translated a connect()
    /// and forget the service the old one recorded for it (the socket would then show its
    /// backend to getpeername() and not be aborted when that backend leaves). Only if the
    /// kernel refuses the update is the new program attached beside the old link, which is
    /// then released.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<()> {
        use std::os::fd::AsFd as _;
        self.stage_migrated()?;
        let dir = self.pin_dir.join("links");
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
        let cgroup_dir =
            std::fs::File::open(cgroup).map_err(|source| DatapathError::PinDir { path: cgroup.to_owned(), source })?;
        for name in SOCK_PROGRAMS {
            let pin = dir.join(format!("cgroup_{name}"));
            let prog = self.ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?;
            if let Ok(old) = obj_get(&pin) {
                let fd = match &*prog {
                    Program::CgroupSockAddr(p) => p.fd(),
                    Program::CgroupSock(p) => p.fd(),
                    _ => return Err(prog_err(name)(aya::programs::ProgramError::UnexpectedProgramType)),
                }
                .map_err(prog_err(name))?;
                match link_update(old.as_fd(), fd.as_fd()) {
                    // The pinned link runs this program now; nothing else changes.
                    Ok(()) => continue,
                    Err(e) => {
                        log::warn!("socket program {name}: the pinned link did not take it ({e}); attaching beside it")
                    }
                }
            }
            let old = aya::programs::links::PinnedLink::from_pin(&pin).ok();
            // Link-based cgroup attachments always run side by side (flags must be 0).
            let mode = CgroupAttachMode::Single;
            let link: FdLink = match prog {
                Program::CgroupSockAddr(p) => {
                    let id = p.attach(&cgroup_dir, mode).map_err(prog_err(name))?;
                    p.take_link(id).map_err(prog_err(name))?.try_into()
                }
                Program::CgroupSock(p) => {
                    let id = p.attach(&cgroup_dir, mode).map_err(prog_err(name))?;
                    p.take_link(id).map_err(prog_err(name))?.try_into()
                }
                _ => return Err(prog_err(name)(aya::programs::ProgramError::UnexpectedProgramType)),
            }
            .map_err(|e| io_err(name, e))?;
            let _ = std::fs::remove_file(&pin);
            let pinned = link.pin(&pin).map_err(|e| io_err(name, e))?;
            drop(pinned);
            if let Some(old) = old {
                drop(FdLink::from(old));
            }
        }
        Ok(())
    }

    /// Releases the socket programs' links (services are off on this node).
    pub fn detach_sockets(&self) {
        for name in SOCK_PROGRAMS {
            let _ = std::fs::remove_file(self.pin_dir.join("links").join(format!("cgroup_{name}")));
        }
    }

    // === plain hash maps ===

    fn put<K: Pod, V: Pod>(&mut self, name: &'static str, k: K, v: V) -> Result<()> {
        let mut m: HashMap<&mut MapData, K, V> = self.typed(name)?;
        m.insert(k, v, 0).map_err(map_err(name))
    }

    fn delete<K: Pod, V: Pod>(&mut self, name: &'static str, k: K) -> Result<()> {
        let mut m: HashMap<&mut MapData, K, V> = self.typed(name)?;
        ignore_missing(m.remove(&k)).map_err(map_err(name))
    }

    fn entries<K: Pod, V: Pod>(&self, name: &'static str) -> Result<Vec<(K, V)>> {
        entries_in(self.ebpf.map(name).ok_or(DatapathError::Missing(name))?, name)
    }

    pub fn svc_frontends(&self) -> Result<BTreeMap<SvcKey, SvcFrontend>> {
        Ok(self.entries(map_names::SVC_FRONTENDS)?.into_iter().collect())
    }

    pub fn put_svc_frontend(&mut self, k: SvcKey, v: SvcFrontend) -> Result<()> {
        self.put(map_names::SVC_FRONTENDS, k, v)
    }

    pub fn delete_svc_frontend(&mut self, k: SvcKey) -> Result<()> {
        self.delete::<SvcKey, SvcFrontend>(map_names::SVC_FRONTENDS, k)
    }

    pub fn svc_backends(&self) -> Result<BTreeMap<SvcBackendKey, SvcBackend>> {
        Ok(self.entries(map_names::SVC_BACKENDS)?.into_iter().collect())
    }

    pub fn put_svc_backend(&mut self, k: SvcBackendKey, v: SvcBackend) -> Result<()> {
        self.put(map_names::SVC_BACKENDS, k, v)
    }

    pub fn delete_svc_backend(&mut self, k: SvcBackendKey) -> Result<()> {
        self.delete::<SvcBackendKey, SvcBackend>(map_names::SVC_BACKENDS, k)
    }

    /// SVC_BACKEND_SLOTS: each backend's ordinal, for session affinity.
    pub fn svc_backend_slots(&self) -> Result<BTreeMap<SvcSlotKey, u32>> {
        Ok(self.entries(map_names::SVC_BACKEND_SLOTS)?.into_iter().collect())
    }

    pub fn put_svc_backend_slot(&mut self, k: SvcSlotKey, ordinal: u32) -> Result<()> {
        self.put(map_names::SVC_BACKEND_SLOTS, k, ordinal)
    }

    pub fn delete_svc_backend_slot(&mut self, k: SvcSlotKey) -> Result<()> {
        self.delete::<SvcSlotKey, u32>(map_names::SVC_BACKEND_SLOTS, k)
    }

    pub fn node_addrs(&self) -> Result<BTreeMap<Ipv4Addr, NodeAddr>> {
        Ok(self
            .entries::<Ipv4Key, NodeAddr>(map_names::NODE_ADDRS)?
            .into_iter()
            .map(|(k, v)| (Ipv4Addr::from(k.addr), v))
            .collect())
    }

    pub fn put_node_addr(&mut self, ip: Ipv4Addr, v: NodeAddr) -> Result<()> {
        self.put(map_names::NODE_ADDRS, Ipv4Key::new(ip.octets()), v)
    }

    pub fn delete_node_addr(&mut self, ip: Ipv4Addr) -> Result<()> {
        self.delete::<Ipv4Key, NodeAddr>(map_names::NODE_ADDRS, Ipv4Key::new(ip.octets()))
    }

    /// SVC_CLUSTER_IPS: the cluster IPs of programmed services.
    pub fn cluster_ips(&self) -> Result<BTreeSet<Ipv4Addr>> {
        Ok(self
            .entries::<Ipv4Key, u8>(map_names::SVC_CLUSTER_IPS)?
            .into_iter()
            .map(|(k, _)| Ipv4Addr::from(k.addr))
            .collect())
    }

    pub fn put_cluster_ip(&mut self, ip: Ipv4Addr) -> Result<()> {
        self.put(map_names::SVC_CLUSTER_IPS, Ipv4Key::new(ip.octets()), 1u8)
    }

    pub fn delete_cluster_ip(&mut self, ip: Ipv4Addr) -> Result<()> {
        self.delete::<Ipv4Key, u8>(map_names::SVC_CLUSTER_IPS, Ipv4Key::new(ip.octets()))
    }

    /// NODE_NETNS: network-namespace cookie -> 1 (a pod's) or 2 (the node's).
    pub fn node_netns(&self) -> Result<BTreeMap<u64, u8>> {
        Ok(self.entries(map_names::NODE_NETNS)?.into_iter().collect())
    }

    pub fn put_node_netns(&mut self, cookie: u64, kind: u8) -> Result<()> {
        self.put(map_names::NODE_NETNS, cookie, kind)
    }

    pub fn delete_node_netns(&mut self, cookie: u64) -> Result<()> {
        self.delete::<u64, u8>(map_names::NODE_NETNS, cookie)
    }

    /// DEAD_BACKENDS: removed backends whose address no pod holds any more.
    pub fn dead_backends(&self) -> Result<BTreeSet<SvcKey>> {
        Ok(self.entries::<SvcKey, u8>(map_names::DEAD_BACKENDS)?.into_iter().map(|(k, _)| k).collect())
    }

    pub fn put_dead_backend(&mut self, k: SvcKey) -> Result<()> {
        self.put(map_names::DEAD_BACKENDS, k, 1u8)
    }

    pub fn delete_dead_backend(&mut self, k: SvcKey) -> Result<()> {
        self.delete::<SvcKey, u8>(map_names::DEAD_BACKENDS, k)
    }

    // === source ranges (LPM: service id, then the client prefix) ===

    fn range_key(id: u32, net: Ipv4Net) -> Key<SvcSourceRange> {
        Key::new(
            32 + u32::from(net.prefix_len()),
            SvcSourceRange { svc_id_be: id.to_be_bytes(), ip: net.network().octets() },
        )
    }

    pub fn source_ranges(&self) -> Result<BTreeSet<(u32, Ipv4Net)>> {
        let m: LpmTrie<&MapData, SvcSourceRange, u8> = self.typed_ref(map_names::SVC_SOURCE_RANGES)?;
        let mut out = BTreeSet::new();
        for (k, _) in m.iter().filter_map(|r| r.ok()) {
            let d = k.data();
            let len = k.prefix_len().saturating_sub(32) as u8;
            if let Ok(net) = Ipv4Net::new(Ipv4Addr::from(d.ip), len) {
                out.insert((u32::from_be_bytes(d.svc_id_be), net));
            }
        }
        Ok(out)
    }

    pub fn put_source_range(&mut self, id: u32, net: Ipv4Net) -> Result<()> {
        let mut m: LpmTrie<&mut MapData, SvcSourceRange, u8> = self.typed(map_names::SVC_SOURCE_RANGES)?;
        m.insert(&Self::range_key(id, net), 1, 0).map_err(map_err(map_names::SVC_SOURCE_RANGES))
    }

    pub fn delete_source_range(&mut self, id: u32, net: Ipv4Net) -> Result<()> {
        let mut m: LpmTrie<&mut MapData, SvcSourceRange, u8> = self.typed(map_names::SVC_SOURCE_RANGES)?;
        ignore_missing(m.remove(&Self::range_key(id, net))).map_err(map_err(map_names::SVC_SOURCE_RANGES))
    }

    // === counters ===

    /// Per service port, summed over CPUs.
    pub fn svc_counters(&self) -> Result<BTreeMap<u32, SvcCounters>> {
        let m: PerCpuHashMap<&MapData, u32, SvcCounters> = self.typed_ref(map_names::SVC_COUNTERS)?;
        let mut out = BTreeMap::new();
        for (id, values) in m.iter().filter_map(|r| r.ok()) {
            let mut s = SvcCounters::default();
            for v in values.iter() {
                s.connections += v.connections;
                s.no_backend += v.no_backend;
                s.source_denied += v.source_denied;
                s.snat_exhausted += v.snat_exhausted;
            }
            out.insert(id, s);
        }
        Ok(out)
    }

    pub fn remove_svc_counters(&mut self, id: u32) -> Result<()> {
        let mut m: PerCpuHashMap<&mut MapData, u32, SvcCounters> = self.typed(map_names::SVC_COUNTERS)?;
        ignore_missing(m.remove(&id)).map_err(map_err(map_names::SVC_COUNTERS))
    }

    /// SOCK_UDP_BACKEND: the service port and backend the connected UDP socket `cookie`
    /// was balanced to, if it was.
    pub fn sock_udp_backend(&self, cookie: u64) -> Result<Option<SockUdpBackend>> {
        let m: HashMap<&MapData, u64, SockUdpBackend> = self.typed_ref(map_names::SOCK_UDP_BACKEND)?;
        match m.get(&cookie, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::SOCK_UDP_BACKEND)(e)),
        }
    }

    /// SOCK_UDP_BACKEND's cookies: the sockets noted.
    pub fn sock_udp_cookies(&self) -> Result<Vec<u64>> {
        Ok(self.entries::<u64, SockUdpBackend>(map_names::SOCK_UDP_BACKEND)?.into_iter().map(|(k, _)| k).collect())
    }

    /// Removes the notes of these sockets (those already gone are skipped).
    pub fn forget_udp_sockets(&mut self, cookies: &[u64]) -> Result<()> {
        for c in cookies {
            self.delete::<u64, SockUdpBackend>(map_names::SOCK_UDP_BACKEND, *c)?;
        }
        Ok(())
    }

    /// After an upgrade from an agent that noted connected UDP sockets in SOCK_REVNAT, by
    /// cookie and the backend they were balanced to (before SOCK_UDP_BACKEND): notes them in
    /// SOCK_UDP_BACKEND, so that they are aborted like any other when that backend leaves.
    /// `socks`: the node's connected UDP sockets (cookie, peer). A socket is adopted when
    /// SOCK_REVNAT holds its cookie with its peer as the backend and it has no note yet;
    /// how many were.
    pub fn adopt_legacy_udp_notes(&mut self, socks: &[(u64, Ipv4Addr, u16)]) -> Result<usize> {
        let name = map_names::SOCK_REVNAT;
        let revnat: HashMap<&MapData, SockRevNatKey, SockRevNat> = self.typed_ref(name)?;
        let found: Vec<(u64, SockUdpBackend)> = socks
            .iter()
            .filter_map(|&(cookie, ip, port)| {
                let k = SockRevNatKey { cookie, ip: ip.octets(), port, kind: revnat_kind::REVERSE };
                let v = revnat.get(&k, 0).ok()?;
                Some((
                    cookie,
                    SockUdpBackend { backend_ip: ip.octets(), backend_port: port, _pad: 0, svc_id: v.svc_id },
                ))
            })
            .collect();
        let name = map_names::SOCK_UDP_BACKEND;
        let mut notes: HashMap<&mut MapData, u64, SockUdpBackend> = self.typed(name)?;
        let mut adopted = 0;
        for (cookie, note) in &found {
            match notes.insert(cookie, note, BPF_NOEXIST) {
                Ok(()) => adopted += 1,
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(adopted)
    }

    /// SOCK_COUNTERS, summed over the CPUs.
    pub fn sock_counters(&self) -> Result<SockCounters> {
        let arr: PerCpuArray<&MapData, SockCounters> = self.typed_ref(map_names::SOCK_COUNTERS)?;
        let values = arr.get(&0, 0).map_err(map_err(map_names::SOCK_COUNTERS))?;
        Ok(SockCounters { udp_untracked: values.iter().map(|v| v.udp_untracked).sum() })
    }

    // === conntrack ===

    /// Every conntrack entry (both directions of every flow).
    pub fn ct_entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        self.entries(map_names::CT)
    }

    /// Deletes these conntrack entries (those already gone are skipped); how many went.
    pub fn ct_delete_all(&mut self, keys: &[CtKey]) -> Result<usize> {
        ct_delete_in(self.ebpf.map_mut(map_names::CT).ok_or(DatapathError::Missing(map_names::CT))?, keys)
    }

    /// Resizing: fills this agent's (not yet pinned) conntrack map from the one pinned at
    /// `old_pin`, keeping the flows that fit `capacity` (see [`crate::proxy::flows_that_fit`]).
    /// Returns the entries copied and those left out.
    pub(super) fn copy_flows(&mut self, old_pin: &Path, capacity: u32) -> Result<(usize, usize)> {
        let old = CtTable::open_at(old_pin)?;
        // An LRU table's free entries sit partly in per-CPU lists: a table filled to the
        // brim from one CPU can evict while another CPU's list still holds free entries.
        let per_cpu_reserve = 128 * self.nr_cpus;
        let capacity = capacity as usize;
        let budget = capacity.saturating_sub(per_cpu_reserve).max(capacity / 2);
        // The catch-up after the switch copies only what was stamped after this.
        self.ct_copied_at_ns = crate::proxy::monotonic_ns();
        let (keep, dropped) = crate::proxy::flows_that_fit(old.entries()?, budget);
        let mut new: HashMap<&mut MapData, CtKey, CtEntry> = self.typed(map_names::CT)?;
        for (k, e) in &keep {
            new.insert(k, e, 0).map_err(map_err(map_names::CT))?;
        }
        Ok((keep.len(), dropped))
    }

    /// Resizing, once every program uses the new conntrack map: copies the entries the
    /// old programs stamped in the map at `old_pin` since [`Self::copy_flows`] read it
    /// (new flows, and old ones the first copy left out that turned out live), unless the
    /// new map holds the key already. How many were copied.
    pub(super) fn copy_new_flows(&mut self, old_pin: &Path) -> Result<usize> {
        // The datapath's clock is the coarse one, up to a tick behind.
        let since = self.ct_copied_at_ns.saturating_sub(COARSE_CLOCK_SLACK_NS);
        let old = CtTable::open_at(old_pin)?.entries()?;
        let mut new: HashMap<&mut MapData, CtKey, CtEntry> = self.typed(map_names::CT)?;
        let mut n = 0;
        for (k, e) in old.iter().filter(|(_, e)| e.last_seen_ns >= since) {
            // Copied already, or written by the new programs since (newer): kept.
            match new.insert(k, e, BPF_NOEXIST) {
                Ok(()) => n += 1,
                Err(aya::maps::MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(map_err(map_names::CT)(e)),
            }
        }
        Ok(n)
    }

    /// Pins of the datapath's own that are not maps (for tests and inspection).
    pub fn link_pins(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.pin_dir.join("links")).into_iter().flatten().flatten().map(|e| e.path()).collect()
    }
}

/// `bpf_map_update_elem` flag: only create.
const BPF_NOEXIST: u64 = 1;

/// More than a tick at any HZ: how far the datapath's conntrack stamps may lag
/// CLOCK_MONOTONIC.
const COARSE_CLOCK_SLACK_NS: u64 = 50_000_000;

// === conntrack on a handle of its own ===

/// The pinned conntrack map on a handle of its own, for work that should not wait for (or
/// hold up) the agent's datapath lock: the periodic sweep, the `/services` entry count.
/// Every operation is a map syscall, so it races nothing but the datapath itself, as the
/// locked path did too.
pub struct CtTable {
    map: Map,
}

impl CtTable {
    /// Opens `<pin_dir>/CT`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::open_at(&pin_dir.join(map_names::CT))
    }

    /// Opens the conntrack map pinned at `pin`.
    pub(crate) fn open_at(pin: &Path) -> Result<Self> {
        let data = MapData::from_pin(pin).map_err(map_err(map_names::CT))?;
        Ok(Self { map: Map::LruHashMap(data) })
    }

    /// Every entry (both directions of every flow).
    pub fn entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        entries_in(&self.map, map_names::CT)
    }

    /// The entry under `k`, if any (a look from user space: it does not count as a use
    /// for the LRU).
    pub fn get(&self, k: &CtKey) -> Result<Option<CtEntry>> {
        let typed: HashMap<&MapData, CtKey, CtEntry> = (&self.map).try_into().map_err(map_err(map_names::CT))?;
        match typed.get(k, 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::CT)(e)),
        }
    }

    /// Deletes these entries (those already gone are skipped); how many went.
    pub fn delete_all(&mut self, keys: &[CtKey]) -> Result<usize> {
        ct_delete_in(&mut self.map, keys)
    }
}

/// A plain (not per-CPU) hash map's descriptor, for the batch calls.
fn hash_fd(map: &Map) -> Option<std::os::fd::BorrowedFd<'_>> {
    use std::os::fd::AsFd as _;
    match map {
        Map::LruHashMap(d) | Map::HashMap(d) => Some(d.fd().as_fd()),
        _ => None,
    }
}

fn batch_err(name: &'static str, call: &'static str) -> impl FnOnce(std::io::Error) -> DatapathError {
    move |io_error| DatapathError::Map {
        name,
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    }
}

/// Every entry of a hash map: batched where the kernel can (a few syscalls for the whole
/// table), else one entry at a time. The typed view checks the map's key and value sizes
/// first.
fn entries_in<K: Pod, V: Pod>(map: &Map, name: &'static str) -> Result<Vec<(K, V)>> {
    let typed: HashMap<&MapData, K, V> = map.try_into().map_err(map_err(name))?;
    if let Some(fd) = hash_fd(map)
        && let Some(all) = super::batch::lookup_all::<K, V>(fd).map_err(batch_err(name, "bpf_map_lookup_batch"))?
    {
        return Ok(all);
    }
    // An entry deleted while iterating is skipped, not an error.
    Ok(typed.iter().filter_map(|r| r.ok()).collect())
}

fn ct_delete_in(map: &mut Map, keys: &[CtKey]) -> Result<usize> {
    let _checked: HashMap<&MapData, CtKey, CtEntry> = (&*map).try_into().map_err(map_err(map_names::CT))?;
    if let Some(fd) = hash_fd(map)
        && let Some(n) = super::batch::delete_all(fd, keys).map_err(batch_err(map_names::CT, "bpf_map_delete_batch"))?
    {
        return Ok(n);
    }
    let mut typed: HashMap<&mut MapData, CtKey, CtEntry> = map.try_into().map_err(map_err(map_names::CT))?;
    let mut n = 0;
    for k in keys {
        match typed.remove(k) {
            Ok(()) => n += 1,
            other => ignore_missing(other).map_err(map_err(map_names::CT))?,
        }
    }
    Ok(n)
}

/// `BPF_OBJ_GET`: the object pinned at `path` (aya opens a pinned link only as its own
/// type, which lends no descriptor).
fn obj_get(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    /// The `obj_get` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        /// Explicit: the kernel refuses an attribute whose bytes past its fields are not zero.
        _pad: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let attr = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    // SAFETY: the attribute and the path it points to are valid for the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &attr as *const ObjGet, std::mem::size_of::<ObjGet>() as u32)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just opened for us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: `link` runs `prog` from now on, atomically (aya keeps its own call
/// private).
fn link_update(link: std::os::fd::BorrowedFd<'_>, prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    /// The `link_update` member of `union bpf_attr`.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let attr =
        LinkUpdate { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, flags: 0, old_prog_fd: 0 };
    // SAFETY: the attribute is valid for the size passed; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdate,
            std::mem::size_of::<LinkUpdate>() as u32,
        )
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// The batched conntrack reads and deletes against the one-at-a-time path, on a real
/// kernel map (root only).
#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use aya::EbpfLoader;

    use super::*;

    fn key(i: u32) -> CtKey {
        let b = i.to_be_bytes();
        CtKey { src: [10, 1, b[2], b[3]], dst: [10, 96, b[1], 1], sport: 40_000, dport: 80, proto: 6, _pad: [0; 3] }
    }

    #[test]
    fn batched_conntrack_reads_and_deletes_match_one_at_a_time() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating BPF maps needs root");
            return;
        }
        const N: u32 = 50_000;
        // Fresh maps, pinned nowhere.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::CT, 65_536)
            .load(super::super::EBPF_OBJECT)
            .expect("the object");
        let map = ebpf.map_mut(map_names::CT).expect("CT");
        {
            let mut typed: HashMap<&mut MapData, CtKey, CtEntry> = map.try_into().unwrap();
            for i in 0..N {
                typed
                    .insert(key(i), CtEntry { last_seen_ns: u64::from(i), nat_port: i as u16, ..Default::default() }, 0)
                    .unwrap();
            }
        }
        let t = std::time::Instant::now();
        let batched = entries_in::<CtKey, CtEntry>(map, map_names::CT).unwrap();
        let batched_took = t.elapsed();
        let t = std::time::Instant::now();
        let typed: HashMap<&MapData, CtKey, CtEntry> = (&*map).try_into().unwrap();
        let single: Vec<(CtKey, CtEntry)> = typed.iter().map(|r| r.unwrap()).collect();
        let single_took = t.elapsed();
        eprintln!("{N} entries: batched {batched_took:?}, one at a time {single_took:?}");
        assert_eq!(batched.len(), N as usize, "every entry, once");
        let a: BTreeSet<(CtKey, u64, u16)> = batched.iter().map(|(k, e)| (*k, e.last_seen_ns, e.nat_port)).collect();
        let b: BTreeSet<(CtKey, u64, u16)> = single.iter().map(|(k, e)| (*k, e.last_seen_ns, e.nat_port)).collect();
        assert_eq!(a.len(), N as usize, "no entry twice");
        assert_eq!(a, b, "the batched read returns what the one-at-a-time read does");

        // Every third key, with keys that are not there in between: those are skipped.
        let mut doomed: Vec<CtKey> = (0..N).step_by(3).map(key).collect();
        let want = doomed.len();
        doomed.insert(1, key(N + 1));
        doomed.push(key(N + 2));
        doomed.insert(want / 2, key(N + 3));
        assert_eq!(ct_delete_in(map, &doomed).unwrap(), want);
        let left = entries_in::<CtKey, CtEntry>(map, map_names::CT).unwrap();
        assert_eq!(left.len(), N as usize - want);
        let gone: BTreeSet<CtKey> = doomed.iter().copied().collect();
        assert!(left.iter().all(|(k, _)| !gone.contains(k)), "a deleted key is still there");
        // Deleting them again deletes nothing and is no error.
        assert_eq!(ct_delete_in(map, &doomed).unwrap(), 0);
    }
}

/// Pinned service maps across an agent restart, through the real load path: resized to a
/// changed size with their entries, and the connected UDP sockets an agent from before
/// SOCK_UDP_BACKEND noted elsewhere adopted (root only; pins in a directory of its own).
#[cfg(test)]
mod resize {
    use std::collections::BTreeSet;

    use contiv_common::{FragHead, FragKey};

    use super::*;

    use crate::datapath::{MapSizes, TestPins};

    fn flow(i: u32) -> [(CtKey, CtEntry); 2] {
        let b = i.to_be_bytes();
        let (c, s) = ([10, 1, b[2], b[3]], [10, 2, b[2], b[3]]);
        let seen = CtEntry { last_seen_ns: 1_000 + u64::from(i), ..Default::default() };
        [
            (CtKey { src: c, dst: s, sport: 40_000, dport: 80, proto: 6, _pad: [0; 3] }, seen),
            (CtKey { src: s, dst: c, sport: 80, dport: 40_000, proto: 6, _pad: [0; 3] }, seen),
        ]
    }

    fn pinned(dir: &Path) -> (u32, u32, BTreeSet<CtKey>) {
        let pin = dir.join(map_names::CT);
        let info = aya::maps::MapInfo::from_pin(&pin).unwrap();
        let keys = CtTable::open(dir).unwrap().entries().unwrap().into_iter().map(|(k, _)| k).collect();
        (info.id(), info.max_entries(), keys)
    }

    fn put(dir: &Path, entries: impl IntoIterator<Item = (CtKey, CtEntry)>) {
        let data = MapData::from_pin(dir.join(map_names::CT)).unwrap();
        let mut map = Map::LruHashMap(data);
        let mut typed: HashMap<&mut MapData, CtKey, CtEntry> = (&mut map).try_into().unwrap();
        for (k, e) in entries {
            typed.insert(k, e, 0).unwrap();
        }
    }

    #[test]
    fn a_changed_conntrack_size_resizes_the_pinned_table_and_keeps_its_flows() {
        let Some(dir) = TestPins::for_datapath("ct-resize") else { return };
        let load = |entries: u32| {
            let sizes = MapSizes { conntrack: Some(entries), ..Default::default() };
            Datapath::load_with(&dir.0, true, sizes).expect("loading the datapath")
        };

        // Created at 2048 entries; 100 flows recorded.
        let mut dp = load(2048);
        dp.finish_migration().unwrap();
        drop(dp);
        put(&dir.0, (0..100).flat_map(flow));
        let (id, size, keys) = pinned(&dir.0);
        assert_eq!((size, keys.len()), (2048, 200));

        // Restarted with 4096: until the switch the old table is pinned and the old programs
        // still record flows in it; afterwards the pin holds the new size and every flow.
        let mut dp = load(4096);
        assert_eq!(pinned(&dir.0).0, id, "the old table stays pinned until every program switched");
        // Stamped now, as the datapath stamps it.
        let now = crate::proxy::monotonic_ns();
        put(&dir.0, flow(100).map(|(k, e)| (k, CtEntry { last_seen_ns: now, ..e })));
        dp.finish_migration().unwrap();
        let (new_id, size, keys) = pinned(&dir.0);
        assert_ne!(new_id, id);
        assert_eq!(size, 4096);
        let want: BTreeSet<CtKey> = (0..=100).flat_map(flow).map(|(k, _)| k).collect();
        assert_eq!(keys, want, "every flow, also the one recorded during the switch");
        drop(dp);

        // The same size again: the table is reused as it is.
        let mut dp = load(4096);
        dp.finish_migration().unwrap();
        assert_eq!(pinned(&dir.0).0, new_id, "an unchanged size keeps the pinned table");
        drop(dp);

        // Shrunk below its flows: whole flows, the most recently seen, fill what fits
        // (less a reserve for the LRU's per-CPU free lists), and nothing is evicted.
        put(&dir.0, (101..2000).flat_map(flow));
        let mut dp = load(1024);
        dp.finish_migration().unwrap();
        let (_, size, keys) = pinned(&dir.0);
        assert_eq!(size, 1024);
        let budget = (1024usize.saturating_sub(128 * dp.nr_cpus).max(512)) / 2 * 2;
        assert_eq!(keys.len(), budget, "as many entries as the budget holds");
        // Flow 100, stamped during the switch above, is the most recent of all.
        let newest: BTreeSet<CtKey> =
            (2001 - budget as u32 / 2..2000).chain([100]).flat_map(flow).map(|(k, _)| k).collect();
        assert_eq!(keys, newest, "the most recently seen flows, both directions of each");
    }

    /// The datapath loaded with `sizes` (a small conntrack table), its migration finished.
    fn loaded(dir: &Path, sizes: MapSizes) -> Datapath {
        let sizes = MapSizes { conntrack: Some(1024), ..sizes };
        let mut dp = Datapath::load_with(dir, true, sizes).expect("loading the datapath");
        dp.finish_migration().unwrap();
        dp
    }

    fn pinned_size(dir: &Path, name: &str) -> u32 {
        aya::maps::MapInfo::from_pin(dir.join(name)).unwrap().max_entries()
    }

    #[test]
    fn a_fragment_map_pinned_with_another_size_is_resized_with_its_entries() {
        let Some(dir) = TestPins::for_datapath("resize") else { return };
        let load = |fragments| loaded(&dir.0, MapSizes { fragments, ..Default::default() });
        let size = || pinned_size(&dir.0, map_names::FRAGS);
        drop(load(None));
        assert_eq!(size(), contiv_common::MAX_FRAGS, "the default size");
        // A datagram in flight, as the programs record its first fragment.
        let key = FragKey { src: [10, 1, 0, 7], dst: [10, 1, 1, 9], id: 4242, proto: 17, _pad: 0 };
        let head = FragHead { sport: 40000, dport: 53 };
        {
            let data = MapData::from_pin(dir.0.join(map_names::FRAGS)).unwrap();
            let mut m: HashMap<MapData, FragKey, FragHead> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
            m.insert(key, head, 0).unwrap();
        }
        // Configured larger: the pin holds a map of the new size, with the datagram.
        let dp = load(Some(16384));
        assert_eq!(size(), 16384, "resized");
        let data = MapData::from_pin(dir.0.join(map_names::FRAGS)).unwrap();
        let m: HashMap<MapData, FragKey, FragHead> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
        assert_eq!(m.get(&key, 0).ok(), Some(head), "the datagram in flight came along");
        drop(dp);
        // The same size again: the pinned map is kept as it is.
        drop(load(Some(16384)));
        assert_eq!(size(), 16384);
    }

    #[test]
    fn a_udp_socket_map_pinned_with_another_size_is_resized_with_as_many_notes_as_fit() {
        let Some(dir) = TestPins::for_datapath("udp-resize") else { return };
        let load = |udp_sockets| loaded(&dir.0, MapSizes { udp_sockets, ..Default::default() });
        let size = || pinned_size(&dir.0, map_names::SOCK_UDP_BACKEND);
        let note = |i: u32| SockUdpBackend { backend_ip: [10, 1, 0, i as u8], backend_port: 53, _pad: 0, svc_id: i };
        drop(load(None));
        assert_eq!(size(), contiv_common::MAX_SOCK_UDP_BACKEND, "the default size");
        {
            let data = MapData::from_pin(dir.0.join(map_names::SOCK_UDP_BACKEND)).unwrap();
            let mut m: HashMap<MapData, u64, SockUdpBackend> = HashMap::try_from(Map::HashMap(data)).unwrap();
            for i in 0..20 {
                m.insert(1000 + u64::from(i), note(i), 0).unwrap();
            }
        }
        // Larger: every note comes along.
        let dp = load(Some(64));
        assert_eq!(size(), 64, "resized");
        let cookies: BTreeSet<u64> = dp.sock_udp_cookies().unwrap().into_iter().collect();
        assert_eq!(cookies, (1000..1020).collect());
        assert_eq!(dp.sock_udp_backend(1007).unwrap(), Some(note(7)));
        drop(dp);
        // Smaller than its notes: as many as fit, each with its own backend.
        let dp = load(Some(16));
        assert_eq!(size(), 16, "resized");
        let cookies = dp.sock_udp_cookies().unwrap();
        assert_eq!(cookies.len(), 16, "as many notes as fit");
        for c in cookies {
            assert_eq!(dp.sock_udp_backend(c).unwrap(), Some(note((c - 1000) as u32)));
        }
        assert_eq!(dp.sock_counters().unwrap(), SockCounters::default(), "nothing counted by a resize");
    }

    #[test]
    fn connected_udp_sockets_an_agent_before_sock_udp_backend_noted_are_adopted() {
        let Some(dir) = TestPins::for_datapath("legacy-udp") else { return };
        let load = || loaded(&dir.0, MapSizes::default());
        let mut dp = load();
        assert!(dp.created_here(map_names::SOCK_UDP_BACKEND) && dp.created_here(map_names::SOCK_REVNAT), "a new node");
        // What an agent from before SOCK_UDP_BACKEND left: SOCK_REVNAT notes (cookie,
        // backend) -> (frontend, service) of two connected sockets, and no SOCK_UDP_BACKEND.
        {
            let mut revnat: HashMap<&mut MapData, SockRevNatKey, SockRevNat> =
                dp.typed(map_names::SOCK_REVNAT).unwrap();
            for (cookie, backend) in [(7u64, [10, 1, 1, 5]), (8, [10, 1, 1, 6])] {
                let k = SockRevNatKey { cookie, ip: backend, port: 53, kind: revnat_kind::REVERSE };
                revnat.insert(k, SockRevNat { ip: [10, 96, 0, 10], port: 53, stamp: 0, svc_id: 3 }, 0).unwrap();
            }
        }
        drop(dp);
        std::fs::remove_file(dir.0.join(map_names::SOCK_UDP_BACKEND)).unwrap();

        let mut dp = load();
        assert!(dp.created_here(map_names::SOCK_UDP_BACKEND) && !dp.created_here(map_names::SOCK_REVNAT));
        // The node's connected UDP sockets: 7 still on the backend it was balanced to, 8
        // connected elsewhere since, 10 never balanced.
        let lo = |d| Ipv4Addr::new(10, 1, 1, d);
        let socks = [(7, lo(5), 53), (8, lo(7), 53), (10, lo(5), 53)];
        assert_eq!(dp.adopt_legacy_udp_notes(&socks).unwrap(), 1);
        let note = SockUdpBackend { backend_ip: [10, 1, 1, 5], backend_port: 53, _pad: 0, svc_id: 3 };
        assert_eq!(dp.sock_udp_backend(7).unwrap(), Some(note));
        assert_eq!(dp.sock_udp_cookies().unwrap(), [7]);
        // A note is never overwritten: adopting again changes nothing.
        assert_eq!(dp.adopt_legacy_udp_notes(&socks).unwrap(), 0);
        assert_eq!(dp.sock_udp_backend(7).unwrap(), Some(note));
    }
}
