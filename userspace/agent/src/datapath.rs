//! The eBPF datapath as the agent drives it: loads the embedded object, pins every map
//! under one bpffs directory (reused across agent restarts, so existing pods keep
//! forwarding), attaches the TC programs, and offers the map operations the plan applier
//! ([`crate::apply`]) needs.
//!
//! # Map layouts and upgrades
//! Every pinned map has a layout version (`contiv_common::schema`), recorded in the pinned
//! `SCHEMA` map (maps pinned before it existed are version 1). At load, a pinned map of the
//! current version is reused as it is; one of another version is left in place for the
//! programs still using it, and a new map is created beside it and filled from the old
//! one (converted where the layout changed, rebuilt where the agent rewrites it anyway).
//! Once every program runs the new code ([`Datapath::finish_migration`]), the new map
//! takes the old one's pin. Programs are replaced per interface make-before-break, so
//! established flows keep forwarding through an upgrade. Until then the new map is pinned
//! aside under a name that says its layout and size (`CT_v1_n131072`): an agent killed in
//! the middle is followed by one that resumes the migration with what the new programs
//! recorded, and the version is recorded before the atomic rename onto the old pin, so no
//! pin is ever read as a layout it does not hold.
//!
//! # bpffs
//! The pins must live in the host's bpffs, or they die with the agent's mount namespace and
//! a restart stops pod traffic ([`check_bpffs`]).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, XskMap, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkOrder},
        tc::TcAttachOptions,
    },
};
use contiv_common::{
    DatapathConfig, FragHead, FragKey, Ipv4Key, MapName, OverlayCounters, PodCounters, PodEndpoint, PolicyKey,
    PolicyPorts, RemoteRoute, SlowPortCounters, SockUdpBackend, SvcCounters, map_names, program_names, schema,
};
use ipnet::Ipv4Net;

mod batch;
mod inspect;
mod services;
pub use inspect::{MonitorCounters, MonitorMaps, TraceRun, sum_buckets, tcx_ingress_programs};
pub use services::{CtTable, SOCK_PROGRAMS, cgroup2_root};

/// The compiled eBPF object, built by build.rs from ebpf/contiv-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/contiv-ebpf"));

/// Errors from the datapath layer.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// bpffs or the pin directory could not be prepared.
    #[error("preparing {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// /sys/fs/bpf is not the host's bpffs.
    #[error("{0}")]
    PrivateBpffs(String),
    /// The kernel is older than the datapath needs.
    #[error("{0}")]
    Kernel(String),
    /// Loading the object or creating/reusing pinned maps failed.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// Something expected in the object is missing.
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// The oldest kernel the datapath runs on: tcx links (6.6); the socket programs' errno
/// (`bpf_set_retval`) needs 5.18.
pub const MIN_KERNEL: (u32, u32) = (6, 6);

/// Whether a kernel of this release (`uname -r`) runs the datapath. A release that does not
/// read as "MAJOR.MINOR..." is let through: loading then says what is missing.
pub fn kernel_supported(release: &str) -> std::result::Result<(), String> {
    let mut parts = release.split(['.', '-']);
    let number = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
    let (Some(major), Some(minor)) = (number(parts.next()), number(parts.next())) else {
        return Ok(());
    };
    if (major, minor) < MIN_KERNEL {
        return Err(format!(
            "kernel {release} is too old: the datapath needs Linux >= {}.{} (tcx links)",
            MIN_KERNEL.0, MIN_KERNEL.1
        ));
    }
    Ok(())
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

const BPFFS: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Whether any other process shares this process's mount namespace. A namespace nobody
/// else is in dies with the agent, and so does any bpffs mounted only in it.
fn mount_namespace_shared() -> bool {
    let Ok(mine) = std::fs::read_link("/proc/self/ns/mnt") else { return true };
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()) && n != me))
        .any(|e| std::fs::read_link(e.path().join("ns/mnt")).is_ok_and(|ns| ns == mine))
}

/// Whether the mount at `path` propagates to or from other mount namespaces (its
/// mountinfo line carries `shared:` or `master:`).
fn mount_propagates(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let path = path.to_string_lossy();
    // The last mount on the path is the visible one.
    info.lines().rfind(|l| l.split(' ').nth(4) == Some(path.as_ref())).is_some_and(|l| {
        let optional = l.split(" - ").next().unwrap_or("");
        optional.contains("shared:") || optional.contains("master:")
    })
}

/// Mounts bpffs on /sys/fs/bpf unless one is mounted there: the DaemonSet's privileged init
/// container does this with /sys/fs/bpf mounted from the host (mount propagation
/// Bidirectional), so the mount lands on the host.
pub fn mount_bpffs() -> std::io::Result<()> {
    let root = Path::new(BPFFS);
    if is_bpffs(root) {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(std::io::Error::from)
}

/// Makes sure the pins land in a bpffs that outlives the agent (the host's). Mounts bpffs
/// on /sys/fs/bpf when nothing is mounted there and the agent's mount namespace is shared
/// with other processes (the host's); refuses, unless `allow_private`, when the agent is
/// alone in its mount namespace (e.g. started by `ip netns exec`) and /sys/fs/bpf is either
/// not mounted or a bpffs that propagates nowhere: pins there die with the agent, and a
/// restart would stop every pod's traffic.
pub fn check_bpffs(allow_private: bool) -> Result<()> {
    let root = Path::new(BPFFS);
    let how = "mount bpffs on the host (`mount -t bpf bpf /sys/fs/bpf`) and run the agent in the host's \
               mount namespace (`nsenter --net=...` rather than `ip netns exec`, which gives the agent a mount \
               namespace of its own), or in a DaemonSet with /sys/fs/bpf mounted from the host \
               (mountPropagation: Bidirectional or HostToContainer); or set allowPrivateBpffs = true to \
               accept that pod traffic stops whenever the agent does";
    let refuse = |what: &str| -> Result<()> {
        if allow_private {
            log::warn!("{what}; continuing because allowPrivateBpffs is set");
            return Ok(());
        }
        Err(DatapathError::PrivateBpffs(format!("{what}: {how}")))
    };
    let alone = !mount_namespace_shared();
    if is_bpffs(root) {
        if alone && !mount_propagates(root) {
            return refuse(
                "/sys/fs/bpf is a bpffs private to the agent's own mount namespace; pinned maps and links would \
                 die with the agent",
            );
        }
        return Ok(());
    }
    if alone {
        return refuse(
            "/sys/fs/bpf is not mounted, and a bpffs mounted in the agent's own mount namespace would die with \
             the agent",
        );
    }
    nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| DatapathError::PinDir { path: root.into(), source: e.into() })
}

/// Where one pod's tcx link is pinned: `tc_from_pod` on the host veth's ingress,
/// `tc_to_pod` on its egress.
fn pod_link_pin(pin_dir: &Path, host_ifname: &str, dir: TcAttachType) -> PathBuf {
    let links = pin_dir.join("links");
    match dir {
        TcAttachType::Egress => links.join(format!("{host_ifname}{POD_EGRESS_PIN_SUFFIX}")),
        _ => links.join(host_ifname),
    }
}

/// What a pod's egress link pin adds to its interface name.
pub const POD_EGRESS_PIN_SUFFIX: &str = "_egress";

/// The programs of one pod interface: (program, direction). The egress one only while the
/// node needs it (see `Proxy::udp_answers_via_stack`): a tcx attach costs an ADD an RCU grace period.
const POD_PROGRAMS: [(&str, TcAttachType); 2] =
    [(program_names::FROM_POD, TcAttachType::Ingress), (program_names::TO_POD, TcAttachType::Egress)];

/// The programs a pod interface carries: `tc_from_pod`, and `tc_to_pod` if `egress`.
fn pod_programs(egress: bool) -> impl Iterator<Item = (&'static str, TcAttachType)> {
    POD_PROGRAMS.into_iter().take(if egress { 2 } else { 1 })
}

/// What an ADD attaches to a new pod interface on its own (see [`crate::tcx`]): per
/// program, a new fd of it, whether it goes on the egress, and where its link is pinned.
pub type PodAttachTargets = Vec<(aya::programs::ProgramFd, bool, PathBuf)>;

/// Every program the agent attaches.
fn programs_to_load() -> impl Iterator<Item = &'static str> {
    let tc = [
        program_names::FROM_POD,
        program_names::FROM_VSWITCH,
        program_names::FROM_OVERLAY,
        program_names::TO_OVERLAY,
        program_names::FROM_UPLINK,
        program_names::TO_UPLINK,
        program_names::TO_POD,
    ];
    let xdp = [program_names::TO_VSWITCH, program_names::TO_VPP];
    tc.into_iter().chain(SOCK_PROGRAMS).chain(xdp)
}

/// Loads (verifies) one program of the object, of any type the object has.
fn load_program(prog: &mut aya::programs::Program) -> std::result::Result<(), aya::programs::ProgramError> {
    use aya::programs::Program;
    match prog {
        Program::SchedClassifier(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::Xdp(p) => p.load(),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    }
}

/// Loads (verifies) every program, each on a thread of its own. Verification is most of
/// an agent's start, and `tc_from_pod` alone takes about 0.8 s of the 1.0 s all of them
/// take one after the other here; so the others verify beside it. The kernel verifies a
/// privileged caller's programs in parallel.
fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    let wanted: Vec<_> = programs_to_load().collect();
    if let Some(name) = wanted.iter().find(|name| ebpf.program(name).is_none()) {
        return Err(DatapathError::Missing(name));
    }
    std::thread::scope(|scope| {
        let loads: Vec<_> = ebpf
            .programs_mut()
            .filter_map(|(name, prog)| wanted.iter().find(|n| **n == name).map(|&n| (n, prog)))
            .map(|(name, prog)| (name, scope.spawn(move || load_program(prog))))
            .collect();
        // Every thread is joined before the first error is returned.
        let results: Vec<_> = loads.into_iter().map(|(name, t)| (name, t.join())).collect();
        results.into_iter().try_for_each(|(name, r)| match r {
            Ok(r) => r.map_err(prog_err(name)),
            Err(panic) => std::panic::resume_unwind(panic),
        })
    })
}

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Links that live only as long as the agent (the slow-path port's).
    owned_links: Vec<FdLink>,
    /// The slow-path port's XDP link (kernel mode), replaced when the port is re-created.
    slow_xdp: Option<aya::programs::xdp::XdpLinkId>,
    /// Maps created beside an older-layout pinned map; pinned by `finish_migration`.
    migrated: Vec<&'static str>,
    /// Maps that had no pin when this agent loaded: new on this node.
    created: Vec<&'static str>,
    /// Resizing the conntrack map: when the first copy read the old one (CLOCK_MONOTONIC ns).
    ct_copied_at_ns: u64,
    /// The sizes this agent loaded its maps with (they name the staged maps).
    sizes: MapSizes,
    /// The layout each migrated map's pin held at load (put back in SCHEMA if the finish
    /// fails to swap the pins).
    migrated_from: BTreeMap<&'static str, u32>,
    /// Whether the migrated maps are pinned aside (done at the first attach: from then on
    /// programs record into them, and an agent killed later resumes from them).
    staged: bool,
    nr_cpus: usize,
}

impl Datapath {
    /// Loads the programs; maps are created pinned in `pin_dir`, reused if pinned there with
    /// the current layout, migrated if pinned with an older one.
    pub fn load(pin_dir: &Path, allow_private_bpffs: bool) -> Result<Self> {
        Self::load_with(pin_dir, allow_private_bpffs, MapSizes::default())
    }

    /// [`Datapath::load`] with the sizes configured for the maps that have one. A pinned
    /// map of another size is resized the way a layout change is migrated: a new map beside
    /// it, filled with its entries, pinned in its place once every program uses the new one.
    pub fn load_with(pin_dir: &Path, allow_private_bpffs: bool, sizes: MapSizes) -> Result<Self> {
        if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
            kernel_supported(release.trim()).map_err(DatapathError::Kernel)?;
        }
        check_bpffs(allow_private_bpffs)?;
        std::fs::create_dir_all(pin_dir)
            .map_err(|source| DatapathError::PinDir { path: pin_dir.to_owned(), source })?;
        let stored = read_schema(pin_dir);
        let pins: Vec<PathBuf> = schema::LAYOUTS.iter().map(|(name, _)| pin_dir.join(name)).collect();
        let mut loader = EbpfLoader::new();
        for (name, n) in sizes.configured() {
            loader.map_max_entries(name, n);
        }
        let (mut migrated, mut created, mut resumed) = (vec![], vec![], vec![]);
        let stagings: Vec<PathBuf> = schema::LAYOUTS
            .iter()
            .map(|(name, version)| pin_dir.join(staging_pin_name(name, *version, sizes.of(name))))
            .collect();

        for (((name, version), pin), staging) in schema::LAYOUTS.iter().zip(&pins).zip(&stagings) {
            complete_killed_finish(pin_dir, name, *version, &stored);
            remove_stale_staging(pin_dir, name, staging);
            if staging.exists() {
                // An agent of this layout was killed in the middle of this migration: its
                // programs may already be recording into the map it staged, which is the
                // newest state; the old map stays pinned for the catch-up at the finish.
                log::info!("map {name}: resuming the migration an earlier agent began");
                migrated.push(*name);
                resumed.push(*name);
                loader.map_pin_path(name, staging);
                continue;
            }
            let pinned_version = pin.exists().then(|| stored.get(*name).copied().unwrap_or(1));
            match pinned_version {
                Some(v) if v != *version => {
                    log::info!("map {name}: pinned with layout v{v}, this agent uses v{version}; migrating");
                    migrated.push(*name);
                }
                Some(_) if needs_resize(name, pin, sizes.of(name)) => {
                    migrated.push(*name);
                }
                None => {
                    created.push(*name);
                    loader.map_pin_path(name, pin);
                }
                Some(_) => {
                    loader.map_pin_path(name, pin);
                }
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        load_programs(&mut ebpf)?;
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| DatapathError::Map { name: "nr_cpus", source: aya::maps::MapError::IoError(e) })?;
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            owned_links: Vec::new(),
            slow_xdp: None,
            migrated,
            created,
            ct_copied_at_ns: 0,
            sizes,
            migrated_from: BTreeMap::new(),
            staged: false,
            nr_cpus,
        };
        for name in dp.migrated.clone() {
            dp.migrated_from.insert(name, stored.get(name).copied().unwrap_or(1));
            if resumed.contains(&name) {
                continue;
            }
            dp.migrate_entries(name, stored.get(name).copied().unwrap_or(1))?;
        }
        if resumed.contains(&map_names::CT) {
            // The catch-up at the finish copies what the old programs recorded after the
            // first copy: nothing the staged table has seen is older than that copy.
            let staged = dp.pin_dir.join(staging_pin_name(
                map_names::CT,
                schema::layout(map_names::CT),
                sizes.of(map_names::CT),
            ));
            dp.ct_copied_at_ns =
                CtTable::open_at(&staged)?.entries()?.iter().map(|(_, e)| e.last_seen_ns).max().unwrap_or(0);
        }
        dp.staged = resumed.len() == dp.migrated.len();
        Ok(dp)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Whether map `name` had no pin when this agent loaded: it is new on this node (a
    /// fresh node, or an upgrade from an agent that did not have it).
    pub fn created_here(&self, name: &str) -> bool {
        self.created.contains(&name)
    }

    /// Fills a freshly created map from the older-layout map pinned under its name.
    fn migrate_entries(&mut self, name: &'static str, from_version: u32) -> Result<()> {
        let pin = self.pin_dir.join(name);
        match (name, from_version) {
            // Counters appended at the end; the old counts are kept, the new ones start at 0.
            // POD_COUNTERS v1: 11 counters, v2: 20.
            (map_names::POD_COUNTERS, 1) => self.migrate_counters::<Ipv4Key, PodCounters, 11>(name)?,
            (map_names::POD_COUNTERS, 2) => self.migrate_counters::<Ipv4Key, PodCounters, 20>(name)?,
            // v3: 21.
            (map_names::POD_COUNTERS, 3) => self.migrate_counters::<Ipv4Key, PodCounters, 21>(name)?,
            // SVC_COUNTERS v1: 3 counters.
            (map_names::SVC_COUNTERS, 1) => self.migrate_counters::<u32, SvcCounters, 3>(name)?,
            // OVERLAY_COUNTERS v1: 7 counters.
            (map_names::OVERLAY_COUNTERS, 1) => self.migrate_overlay_counters::<7>()?,
            // Same layout, another size (`conntrackEntries` changed): the flows move over.
            (map_names::CT, v) if v == schema::layout(map_names::CT) => {
                let capacity = match self.ebpf.map(name) {
                    Some(Map::LruHashMap(data)) => data.info().map_err(map_err(name))?.max_entries(),
                    _ => return Err(DatapathError::Missing(name)),
                };
                let (copied, dropped) = self.copy_flows(&pin, capacity)?;
                if dropped > 0 {
                    log::warn!(
                        "map {name}: {dropped} of {} entries left out (the least recently used flows): \
                         they do not fit {capacity} entries",
                        copied + dropped,
                    );
                }
                log::info!("map {name}: {copied} entries copied into the resized map");
            }
            // Same layout, another size (`fragmentEntries` changed): the datagrams in flight
            // move over, as many as fit (an LRU map drops the least recently used).
            (map_names::FRAGS, v) if v == schema::layout(map_names::FRAGS) => {
                let (copied, _) = self.copy_resized::<FragKey, FragHead>(name, &pin, Map::LruHashMap)?;
                log::info!("map {name}: {copied} entries copied into the resized map");
            }
            // Same layout, another size (`connectedUdpSockets` changed): the live sockets'
            // notes move over, as many as fit (the others keep their backends). A socket
            // that closes before the programs switch leaves its copied note behind; the
            // agent's sweep of notes without a socket removes it.
            (map_names::SOCK_UDP_BACKEND, v) if v == schema::layout(map_names::SOCK_UDP_BACKEND) => {
                let (copied, found) = self.copy_resized::<u64, SockUdpBackend>(name, &pin, Map::HashMap)?;
                if copied < found {
                    log::warn!(
                        "map {name}: {} of {found} connected UDP sockets left out (they do not fit): they keep \
                         their backends",
                        found - copied,
                    );
                }
                log::info!("map {name}: {copied} entries copied into the resized map");
            }
            // The agent rewrites these at start (configuration, its own sockets); rebuilt.
            // (VPP_XSKS: VPP registers its socket again when it re-creates its interface.)
            (map_names::CONFIG | map_names::SLOWPATH_XSKS | map_names::VPP_XSKS, _) => {}
            // Transient: events in flight, rate buckets (they refill), trace records.
            (map_names::MONITOR_EVENTS | map_names::MONITOR_RATE | map_names::TRACE_STEPS, _) => {}
            _ => log::warn!("map {name}: no migration from layout v{from_version}; rebuilt empty"),
        }
        Ok(())
    }

    /// Copies the entries of the hash map pinned at `pin` (`kind`: its variant) into this
    /// agent's map `name`, of the same layout and another size, until one does not fit:
    /// how many it copied, and how many it found.
    fn copy_resized<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        pin: &Path,
        kind: fn(MapData) -> Map,
    ) -> Result<(usize, usize)> {
        let old = MapData::from_pin(pin).map_err(map_err(name))?;
        let old: HashMap<MapData, K, V> = HashMap::try_from(kind(old)).map_err(map_err(name))?;
        let entries: Vec<(K, V)> = old.iter().filter_map(|e| e.ok()).collect();
        let mut new: HashMap<&mut MapData, K, V> = self.typed(name)?;
        let copied = entries.iter().take_while(|(k, v)| new.insert(k, v, 0).is_ok()).count();
        Ok((copied, entries.len()))
    }

    /// A per-CPU hash of counters (POD_COUNTERS by pod, SVC_COUNTERS by service port) from
    /// a layout of `N` counters: each key's per-CPU counts, widened into `V`.
    fn migrate_counters<K: aya::Pod, V: aya::Pod + Default, const N: usize>(
        &mut self,
        name: &'static str,
    ) -> Result<()> {
        let old = MapData::from_pin(self.pin_dir.join(name)).map_err(map_err(name))?;
        let old: PerCpuHashMap<MapData, K, [u64; N]> =
            PerCpuHashMap::try_from(Map::PerCpuHashMap(old)).map_err(map_err(name))?;
        let entries: Vec<(K, PerCpuValues<[u64; N]>)> = old.iter().filter_map(|e| e.ok()).collect();
        let mut new: PerCpuHashMap<&mut MapData, K, V> = self.typed(name)?;
        for (key, values) in &entries {
            let values = per_cpu(name, values.iter().map(widen).collect())?;
            new.insert(key, values, 0).map_err(map_err(name))?;
        }
        log::info!("map {name}: migrated {} entries from a layout of {N} counters", entries.len());
        Ok(())
    }

    /// OVERLAY_COUNTERS (one per-CPU entry) from a layout of `N` counters, widened.
    fn migrate_overlay_counters<const N: usize>(&mut self) -> Result<()> {
        let name = map_names::OVERLAY_COUNTERS;
        let old = MapData::from_pin(self.pin_dir.join(name)).map_err(map_err(name))?;
        let old: PerCpuArray<MapData, [u64; N]> =
            PerCpuArray::try_from(Map::PerCpuArray(old)).map_err(map_err(name))?;
        let values = old.get(&0, 0).map_err(map_err(name))?;
        let values = per_cpu(name, values.iter().map(widen).collect())?;
        let mut new: PerCpuArray<&mut MapData, OverlayCounters> = self.typed(name)?;
        new.set(0, values, 0).map_err(map_err(name))?;
        log::info!("map {name}: migrated from a layout of {N} counters");
        Ok(())
    }

    /// Pins the migrated maps aside under names that say their layout and size, before the
    /// first program that uses them is attached: an agent killed from then on is followed
    /// by one that resumes from what they recorded; one killed before, by one that migrates
    /// afresh from the old maps (their programs kept recording there).
    fn stage_migrated(&mut self) -> Result<()> {
        if self.staged {
            return Ok(());
        }
        for name in self.migrated.clone() {
            let staging = self.pin_dir.join(staging_pin_name(name, schema::layout(name), self.sizes.of(name)));
            if staging.exists() {
                continue; // resumed: loaded from there
            }
            let map = self.ebpf.map(name).ok_or(DatapathError::Missing(name))?;
            map.pin(&staging)
                .map_err(|e| DatapathError::PinDir { path: staging.clone(), source: std::io::Error::other(e) })?;
        }
        self.staged = true;
        Ok(())
    }

    /// Where this agent's conntrack table is pinned: aside while a resize waits for its
    /// finish (the sweep and the inspection must read the table the programs write).
    pub fn ct_pin(&self) -> PathBuf {
        let name = map_names::CT;
        if self.staged && self.migrated.contains(&name) {
            self.pin_dir.join(staging_pin_name(name, schema::layout(name), self.sizes.of(name)))
        } else {
            self.pin_dir.join(name)
        }
    }

    /// Whether maps of an older layout or size are still pinned beside this agent's (until
    /// [`Self::finish_migration`]).
    pub fn migration_pending(&self) -> bool {
        !self.migrated.is_empty()
    }

    /// Called once every program runs this agent's code: migrated maps take the old maps'
    /// pins, and the layout versions are recorded.
    ///
    /// Each map's version is recorded before its staged map is renamed over the old pin
    /// (one atomic step): an agent killed in between finds the staged map and resumes,
    /// whatever the record says, and no pin ever holds a layout other than the one recorded
    /// for it once no staged map is left.
    pub fn finish_migration(&mut self) -> Result<()> {
        self.stage_migrated()?;
        // One finished map at a time: a failure leaves the rest for the next call.
        while let Some(&name) = self.migrated.first() {
            let pin = self.pin_dir.join(name);
            let staging = self.pin_dir.join(staging_pin_name(name, schema::layout(name), self.sizes.of(name)));
            if name == map_names::CT && std::fs::exists(&pin).unwrap_or(false) {
                // Flows the old programs recorded after the first copy, until they were
                // replaced (entries already copied are left as they are).
                match self.copy_new_flows(&pin) {
                    Ok(n) => log::info!("map {name}: {n} entries recorded during the switch copied"),
                    Err(e) => log::warn!("map {name}: copying the entries recorded during the switch: {e}"),
                }
            }
            let from = self.migrated_from.get(name).copied();
            let mut schema_map: HashMap<&mut MapData, MapName, u32> = self.typed(map_names::SCHEMA)?;
            schema_map.insert(MapName::new(name), schema::layout(name), 0).map_err(map_err(map_names::SCHEMA))?;
            if let Err(source) = std::fs::rename(&staging, &pin) {
                // The pin still holds the old layout: SCHEMA says so again.
                if let Some(from) = from {
                    let _ = schema_map.insert(MapName::new(name), from, 0);
                }
                return Err(DatapathError::PinDir { path: staging.clone(), source });
            }
            log::info!("map {name}: migration finished, new layout pinned");
            self.migrated.remove(0);
        }
        let mut schema_map: HashMap<&mut MapData, MapName, u32> = self.typed(map_names::SCHEMA)?;
        for (name, version) in schema::LAYOUTS {
            schema_map.insert(MapName::new(name), *version, 0).map_err(map_err(map_names::SCHEMA))?;
        }
        Ok(())
    }

    // === programs ===

    /// Attaches `tc_from_pod` to the ingress of a pod's host veth, and `tc_to_pod` to its
    /// egress if `egress` (tcx). The links are pinned under `<pin_dir>/links/`, so they
    /// outlive the agent: pods keep forwarding while the agent restarts or is upgraded. A
    /// link a previous agent left is replaced make-before-break: the new program goes
    /// first, then the old link is released.
    pub fn attach_pod(&mut self, host_ifname: &str, egress: bool) -> Result<()> {
        for (name, dir) in pod_programs(egress) {
            let pin = pod_link_pin(&self.pin_dir, host_ifname, dir);
            self.replace_pinned_tcx(name, host_ifname, dir, &pin)?;
        }
        Ok(())
    }

    /// Whether a pod interface has `tc_to_pod` on its egress (its link pinned).
    pub fn pod_has_egress(&self, host_ifname: &str) -> bool {
        pod_link_pin(&self.pin_dir, host_ifname, TcAttachType::Egress).exists()
    }

    /// Attaches `tc_to_pod` to a pod's host veth egress (replacing one pinned there), or
    /// detaches it: unpinned, the link loses its last reference.
    pub fn set_pod_egress(&mut self, host_ifname: &str, on: bool) -> Result<()> {
        let pin = pod_link_pin(&self.pin_dir, host_ifname, TcAttachType::Egress);
        if on {
            return self.replace_pinned_tcx(program_names::TO_POD, host_ifname, TcAttachType::Egress, &pin);
        }
        match std::fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::PinDir { path: pin, source }),
        }
    }

    /// Forgets the pinned links of a pod interface (the kernel detached them when the
    /// interface was deleted; this removes the pins).
    pub fn forget_pod_link(&self, host_ifname: &str) {
        for (_, dir) in POD_PROGRAMS {
            let _ = std::fs::remove_file(pod_link_pin(&self.pin_dir, host_ifname, dir));
        }
    }

    /// Attaches the overlay device's programs (pinned, replaced make-before-break).
    pub fn attach_overlay(&mut self, ifname: &str) -> Result<()> {
        let links = self.pin_dir.join("links");
        self.replace_pinned_tcx(
            program_names::FROM_OVERLAY,
            ifname,
            TcAttachType::Ingress,
            &links.join(format!("{ifname}_ingress")),
        )?;
        self.replace_pinned_tcx(
            program_names::TO_OVERLAY,
            ifname,
            TcAttachType::Egress,
            &links.join(format!("{ifname}_egress")),
        )
    }

    fn replace_pinned_tcx(&mut self, name: &'static str, ifname: &str, dir: TcAttachType, pin: &Path) -> Result<()> {
        let old = aya::programs::links::PinnedLink::from_pin(pin).ok();
        self.attach_tcx(name, ifname, dir, Some(pin))?;
        if let Some(old) = old {
            // The new link is pinned at the same path already; only drop the old fd.
            drop(aya::programs::links::FdLink::from(old));
        }
        Ok(())
    }

    /// What an ADD needs to attach the pod programs to a new pod interface on its own
    /// (`tc_to_pod` only if `egress`).
    pub fn pod_attach_targets(&self, host_ifname: &str, egress: bool) -> Result<PodAttachTargets> {
        let mut targets = vec![];
        for (name, dir) in pod_programs(egress) {
            let prog: &SchedClassifier =
                self.ebpf.program(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(prog_err(name))?;
            let fd = prog.fd().map_err(prog_err(name))?.try_clone().map_err(|e| prog_err(name)(e.into()))?;
            targets.push((fd, dir == TcAttachType::Egress, pod_link_pin(&self.pin_dir, host_ifname, dir)));
        }
        Ok(targets)
    }

    fn attach_tcx(&mut self, name: &'static str, ifname: &str, dir: TcAttachType, pin: Option<&Path>) -> Result<()> {
        self.stage_migrated()?;
        let prog: &mut SchedClassifier =
            self.ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(prog_err(name))?;
        let link_id = prog
            .attach_with_options(ifname, dir, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .map_err(prog_err(name))?;
        let link = prog.take_link(link_id).map_err(prog_err(name))?;
        let link: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| {
            prog_err(name)(aya::programs::ProgramError::IOError(std::io::Error::other(e.to_string())))
        })?;
        match pin {
            Some(pin) => {
                let dir = pin.parent().expect("pin path has a parent");
                std::fs::create_dir_all(dir)
                    .map_err(|source| DatapathError::PinDir { path: dir.to_owned(), source })?;
                // Replacing: unlink the old pin name first (the old link's fd is held by the caller).
                let _ = std::fs::remove_file(pin);
                let pinned = link.pin(pin).map_err(|e| DatapathError::PinDir {
                    path: pin.to_owned(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                drop(pinned); // the pin keeps the link alive
            }
            // Lives as long as this process: kept in `links` until the agent exits.
            None => self.owned_links.push(link),
        }
        Ok(())
    }

    /// Wires the slow-path port: XDP into AF_XDP on the vswitch end, TC delivery on the host end.
    pub fn attach_slow_port(&mut self, host_ifname: &str, vswitch_ifname: &str) -> Result<()> {
        // A port re-created after it vanished: the old links (of devices gone) are let go.
        self.owned_links.clear();
        self.attach_tcx(program_names::FROM_VSWITCH, host_ifname, TcAttachType::Ingress, None)?;
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(program_names::TO_VSWITCH)
            .ok_or(DatapathError::Missing(program_names::TO_VSWITCH))?
            .try_into()
            .map_err(prog_err(program_names::TO_VSWITCH))?;
        if let Some(old) = self.slow_xdp.take() {
            let _ = xdp.detach(old);
        }
        // Native (driver) mode on veth; the link lives as long as the agent serves the socket.
        let link = xdp.attach(vswitch_ifname, XdpMode::Driver).map_err(prog_err(program_names::TO_VSWITCH))?;
        self.slow_xdp = Some(link);
        Ok(())
    }

    /// Wires the slow-path port for `uplink = "vpp"`: `xdp_to_vpp` on the vswitch end (VPP's
    /// af_xdp interface registers its socket in that program's `xsks_map`) and
    /// `tc_from_vswitch` on the host end. Both links are pinned, so VPP keeps receiving and
    /// delivering while the agent restarts; a restarted agent replaces them make-before-break
    /// (the XDP link is updated in place, the tcx link is replaced). `fresh_port`: the port
    /// was just created, so pins of an earlier port are stale and dropped first.
    pub fn attach_vpp_port(&mut self, host_ifname: &str, vswitch_ifname: &str, fresh_port: bool) -> Result<()> {
        use aya::programs::links::PinnedLink;
        let (tc_pin, xdp_pin) = self.vpp_port_pins(host_ifname, vswitch_ifname);
        if fresh_port {
            self.forget_vpp_port(host_ifname, vswitch_ifname);
        }
        self.replace_pinned_tcx(program_names::FROM_VSWITCH, host_ifname, TcAttachType::Ingress, &tc_pin)?;
        let name = program_names::TO_VPP;
        let xdp: &mut Xdp =
            self.ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(prog_err(name))?;
        let old = PinnedLink::from_pin(&xdp_pin)
            .ok()
            .and_then(|p| aya::programs::xdp::XdpLink::try_from(FdLink::from(p)).ok());
        let link_id = match old {
            // The same link keeps the interface: the program is swapped atomically.
            Some(link) => xdp.attach_to_link(link).map_err(prog_err(name))?,
            None => xdp.attach(vswitch_ifname, XdpMode::Driver).map_err(prog_err(name))?,
        };
        let link: FdLink = xdp.take_link(link_id).map_err(prog_err(name))?.try_into().map_err(
            |e: aya::programs::links::LinkError| {
                prog_err(name)(aya::programs::ProgramError::IOError(std::io::Error::other(e.to_string())))
            },
        )?;
        let dir = xdp_pin.parent().expect("pin path has a parent");
        std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir { path: dir.to_owned(), source })?;
        let _ = std::fs::remove_file(&xdp_pin);
        let pinned = link.pin(&xdp_pin).map_err(|e| DatapathError::PinDir {
            path: xdp_pin.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        drop(pinned); // the pin keeps the link alive
        Ok(())
    }

    /// Drops the pinned links of a VPP-mode slow-path port (its device is being re-created,
    /// or the node runs the kernel uplink now).
    pub fn forget_vpp_port(&self, host_ifname: &str, vswitch_ifname: &str) {
        let (tc_pin, xdp_pin) = self.vpp_port_pins(host_ifname, vswitch_ifname);
        let _ = std::fs::remove_file(tc_pin);
        let _ = std::fs::remove_file(xdp_pin);
    }

    fn vpp_port_pins(&self, host_ifname: &str, vswitch_ifname: &str) -> (PathBuf, PathBuf) {
        let links = self.pin_dir.join("links");
        (links.join(format!("{host_ifname}_ingress")), links.join(format!("{vswitch_ifname}_xdp")))
    }

    /// Registers an AF_XDP socket for a queue of the slow-path port.
    pub fn register_xsk(&mut self, queue: u32, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        let mut xsks: XskMap<&mut MapData> = self.typed(map_names::SLOWPATH_XSKS)?;
        xsks.set(queue, fd, 0).map_err(map_err(map_names::SLOWPATH_XSKS))
    }

    // === maps, as the plan applier writes them ===

    pub fn set_config(&mut self, cfg: DatapathConfig) -> Result<()> {
        let mut map: Array<&mut MapData, DatapathConfig> = self.typed(map_names::CONFIG)?;
        map.set(0, cfg, 0).map_err(map_err(map_names::CONFIG))
    }

    pub fn config(&self) -> Result<Option<DatapathConfig>> {
        let map: Array<&MapData, DatapathConfig> = self.typed_ref(map_names::CONFIG)?;
        Ok(map.get(&0, 0).ok().filter(|c| *c != DatapathConfig::default()))
    }

    pub fn put_pod(&mut self, ip: Ipv4Addr, ep: PodEndpoint) -> Result<()> {
        let mut pods: HashMap<&mut MapData, Ipv4Key, PodEndpoint> = self.typed(map_names::PODS)?;
        pods.insert(Ipv4Key::new(ip.octets()), ep, 0).map_err(map_err(map_names::PODS))
    }

    pub fn delete_pod(&mut self, ip: Ipv4Addr) -> Result<()> {
        let mut pods: HashMap<&mut MapData, Ipv4Key, PodEndpoint> = self.typed(map_names::PODS)?;
        ignore_missing(pods.remove(&Ipv4Key::new(ip.octets()))).map_err(map_err(map_names::PODS))
    }

    pub fn put_pod_iface(&mut self, ifindex: u32, ep: PodEndpoint) -> Result<()> {
        let mut ifaces: HashMap<&mut MapData, u32, PodEndpoint> = self.typed(map_names::POD_IFACES)?;
        ifaces.insert(ifindex, ep, 0).map_err(map_err(map_names::POD_IFACES))
    }

    pub fn delete_pod_iface(&mut self, ifindex: u32) -> Result<()> {
        let mut ifaces: HashMap<&mut MapData, u32, PodEndpoint> = self.typed(map_names::POD_IFACES)?;
        ignore_missing(ifaces.remove(&ifindex)).map_err(map_err(map_names::POD_IFACES))
    }

    /// Every entry of PODS.
    pub fn pods(&self) -> Result<Vec<PodEndpoint>> {
        let pods: HashMap<&MapData, Ipv4Key, PodEndpoint> = self.typed_ref(map_names::PODS)?;
        pods.iter().map(|r| r.map(|(_, v)| v).map_err(map_err(map_names::PODS))).collect()
    }

    /// Every entry of POD_IFACES.
    pub fn pods_in_map(&self) -> Result<Vec<PodEndpoint>> {
        let ifaces: HashMap<&MapData, u32, PodEndpoint> = self.typed_ref(map_names::POD_IFACES)?;
        ifaces.iter().map(|r| r.map(|(_, v)| v).map_err(map_err(map_names::POD_IFACES))).collect()
    }

    pub fn put_remote_route(&mut self, prefix: Ipv4Net, route: RemoteRoute) -> Result<()> {
        let mut routes: LpmTrie<&mut MapData, [u8; 4], RemoteRoute> = self.typed(map_names::REMOTE_ROUTES)?;
        routes
            .insert(&Key::new(u32::from(prefix.prefix_len()), prefix.network().octets()), route, 0)
            .map_err(map_err(map_names::REMOTE_ROUTES))
    }

    pub fn delete_remote_route(&mut self, prefix: Ipv4Net) -> Result<()> {
        let mut routes: LpmTrie<&mut MapData, [u8; 4], RemoteRoute> = self.typed(map_names::REMOTE_ROUTES)?;
        ignore_missing(routes.remove(&Key::new(u32::from(prefix.prefix_len()), prefix.network().octets())))
            .map_err(map_err(map_names::REMOTE_ROUTES))
    }

    pub fn remote_routes(&self) -> Result<BTreeMap<Ipv4Net, RemoteRoute>> {
        let routes: LpmTrie<&MapData, [u8; 4], RemoteRoute> = self.typed_ref(map_names::REMOTE_ROUTES)?;
        let mut out = BTreeMap::new();
        for entry in routes.iter() {
            let (key, route) = entry.map_err(map_err(map_names::REMOTE_ROUTES))?;
            if let Ok(net) = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8) {
                out.insert(net, route);
            }
        }
        Ok(out)
    }

    // === NetworkPolicy (POLICY) ===

    fn policy_key(key: &crate::policy::PolicyEntryKey) -> Key<PolicyKey> {
        Key::new(
            PolicyKey::FIXED_BITS + u32::from(key.peer.prefix_len()),
            PolicyKey {
                pod: key.pod.octets(),
                direction: key.direction,
                _pad: [0; 3],
                peer: key.peer.network().octets(),
            },
        )
    }

    pub fn put_policy(&mut self, key: &crate::policy::PolicyEntryKey, value: PolicyPorts) -> Result<()> {
        let mut map: LpmTrie<&mut MapData, PolicyKey, PolicyPorts> = self.typed(map_names::POLICY)?;
        map.insert(&Self::policy_key(key), value, 0).map_err(map_err(map_names::POLICY))
    }

    pub fn delete_policy(&mut self, key: &crate::policy::PolicyEntryKey) -> Result<()> {
        let mut map: LpmTrie<&mut MapData, PolicyKey, PolicyPorts> = self.typed(map_names::POLICY)?;
        ignore_missing(map.remove(&Self::policy_key(key))).map_err(map_err(map_names::POLICY))
    }

    /// Every entry of POLICY.
    pub fn policy_entries(&self) -> Result<BTreeMap<crate::policy::PolicyEntryKey, PolicyPorts>> {
        let map: LpmTrie<&MapData, PolicyKey, PolicyPorts> = self.typed_ref(map_names::POLICY)?;
        let mut out = BTreeMap::new();
        for entry in map.iter() {
            let (key, value) = entry.map_err(map_err(map_names::POLICY))?;
            let k = key.data();
            let len = key.prefix_len().saturating_sub(PolicyKey::FIXED_BITS).min(32) as u8;
            if let Ok(peer) = Ipv4Net::new(Ipv4Addr::from(k.peer), len) {
                let pod = Ipv4Addr::from(k.pod);
                out.insert(crate::policy::PolicyEntryKey { pod, direction: k.direction, peer }, value);
            }
        }
        Ok(out)
    }

    /// Creates a pod's counters at zero unless they exist.
    pub fn ensure_counters(&mut self, ip: Ipv4Addr) -> Result<()> {
        let nr_cpus = self.nr_cpus;
        let key = Ipv4Key::new(ip.octets());
        let mut counters: PerCpuHashMap<&mut MapData, Ipv4Key, PodCounters> = self.typed(map_names::POD_COUNTERS)?;
        if counters.get(&key, 0).is_err() {
            let zero = PerCpuValues::try_from(vec![PodCounters::default(); nr_cpus]).map_err(|e| {
                DatapathError::Map { name: map_names::POD_COUNTERS, source: aya::maps::MapError::IoError(e) }
            })?;
            counters.insert(key, zero, 0).map_err(map_err(map_names::POD_COUNTERS))?;
        }
        Ok(())
    }

    pub fn remove_counters(&mut self, ip: Ipv4Addr) -> Result<()> {
        let mut counters: PerCpuHashMap<&mut MapData, Ipv4Key, PodCounters> = self.typed(map_names::POD_COUNTERS)?;
        ignore_missing(counters.remove(&Ipv4Key::new(ip.octets()))).map_err(map_err(map_names::POD_COUNTERS))
    }

    /// The pods that have counters.
    pub fn counter_keys(&self) -> Result<Vec<Ipv4Addr>> {
        let counters: PerCpuHashMap<&MapData, Ipv4Key, PodCounters> = self.typed_ref(map_names::POD_COUNTERS)?;
        counters.keys().map(|k| k.map(|k| Ipv4Addr::from(k.addr)).map_err(map_err(map_names::POD_COUNTERS))).collect()
    }

    /// A pod's counters summed over CPUs.
    pub fn pod_counters(&self, ip: Ipv4Addr) -> Result<Option<PodCounters>> {
        let counters: PerCpuHashMap<&MapData, Ipv4Key, PodCounters> = self.typed_ref(map_names::POD_COUNTERS)?;
        match counters.get(&Ipv4Key::new(ip.octets()), 0) {
            Ok(values) => Ok(Some(sum_pod_counters(values.iter()))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::POD_COUNTERS)(e)),
        }
    }

    /// Slow-path port counters summed over CPUs.
    pub fn slowport_counters(&self) -> Result<SlowPortCounters> {
        let arr: PerCpuArray<&MapData, SlowPortCounters> = self.typed_ref(map_names::SLOWPORT_COUNTERS)?;
        let values = arr.get(&0, 0).map_err(map_err(map_names::SLOWPORT_COUNTERS))?;
        let mut sum = SlowPortCounters::default();
        for v in values.iter() {
            sum.to_vswitch_packets += v.to_vswitch_packets;
            sum.to_vswitch_no_socket += v.to_vswitch_no_socket;
            sum.from_vswitch_delivered += v.from_vswitch_delivered;
            sum.from_vswitch_no_pod += v.from_vswitch_no_pod;
        }
        Ok(sum)
    }

    /// Overlay device counters summed over CPUs.
    pub fn overlay_counters(&self) -> Result<OverlayCounters> {
        let arr: PerCpuArray<&MapData, OverlayCounters> = self.typed_ref(map_names::OVERLAY_COUNTERS)?;
        let values = arr.get(&0, 0).map_err(map_err(map_names::OVERLAY_COUNTERS))?;
        let mut s = OverlayCounters::default();
        for v in values.iter() {
            s.rx_delivered += v.rx_delivered;
            s.rx_to_host += v.rx_to_host;
            s.rx_spoofed += v.rx_spoofed;
            s.rx_no_destination += v.rx_no_destination;
            s.rx_malformed += v.rx_malformed;
            s.tx_host_encapsulated += v.tx_host_encapsulated;
            s.tx_no_route += v.tx_no_route;
            s.rx_fragment += v.rx_fragment;
        }
        Ok(s)
    }

    fn typed<'a, T>(&'a mut self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(map_err(name))
    }

    fn typed_ref<'a, T>(&'a self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        self.ebpf.map(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(map_err(name))
    }
}

/// The sizes the agent's configuration gives maps (`None`: the object's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapSizes {
    /// CT (`[services] conntrackEntries`).
    pub conntrack: Option<u32>,
    /// FRAGS (`[services] fragmentEntries`).
    pub fragments: Option<u32>,
    /// SOCK_UDP_BACKEND (`[services] connectedUdpSockets`).
    pub udp_sockets: Option<u32>,
}

impl MapSizes {
    fn of(&self, name: &str) -> Option<u32> {
        match name {
            map_names::CT => self.conntrack,
            map_names::FRAGS => self.fragments,
            map_names::SOCK_UDP_BACKEND => self.udp_sockets,
            _ => None,
        }
    }

    fn configured(&self) -> impl Iterator<Item = (&'static str, u32)> {
        [map_names::CT, map_names::FRAGS, map_names::SOCK_UDP_BACKEND]
            .into_iter()
            .filter_map(|name| Some((name, self.of(name)?)))
    }
}

/// Whether the map `name` pinned at `pin` has another size than the configured one
/// (logged: it is resized).
fn needs_resize(name: &str, pin: &Path, configured: Option<u32>) -> bool {
    let (Some(want), Ok(info)) = (configured, aya::maps::MapInfo::from_pin(pin)) else {
        return false;
    };
    let pinned = info.max_entries();
    if pinned != want {
        log::info!("map {name}: pinned with {pinned} entries, configured for {want}; resizing");
    }
    pinned != want
}

/// The pin name of map `name` created for `version` (and `size`, if configured) while the
/// map pinned under `name` is still in use: `CT_v1_n65536`. bpffs refuses dots in names.
fn staging_pin_name(name: &str, version: u32, size: Option<u32>) -> String {
    match size {
        Some(n) => format!("{name}_v{version}_n{n}"),
        None => format!("{name}_v{version}"),
    }
}

/// Whether `file` is the pin name of a staged map `name` of any version and size.
fn is_staging_pin_of(file: &str, name: &str) -> bool {
    let Some(rest) = file.strip_prefix(name).and_then(|r| r.strip_prefix("_v")) else { return false };
    let (version, size) = rest.split_once("_n").map_or((rest, None), |(v, n)| (v, Some(n)));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(version) && size.is_none_or(digits)
}

/// The layout version in the name of a staged map of `name` (`CT_v1_n65536`: 1).
fn staging_version(file: &str, name: &str) -> Option<u32> {
    if !is_staging_pin_of(file, name) {
        return None;
    }
    let rest = &file[name.len() + 2..];
    rest.split('_').next()?.parse().ok()
}

/// An agent killed in its finish between recording a map's new version in SCHEMA and
/// renaming the map it staged onto the old pin left SCHEMA naming the staged map's layout
/// while the pin still holds the previous one: the rename is done here (whatever this
/// agent's layout), so the pin holds what SCHEMA says.
fn complete_killed_finish(pin_dir: &Path, name: &str, ours: u32, stored: &BTreeMap<String, u32>) {
    let Some(&recorded) = stored.get(name) else { return };
    if recorded == ours {
        return; // the resume path takes a staged map of this agent's layout
    }
    let Ok(entries) = std::fs::read_dir(pin_dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if staging_version(&file, name) == Some(recorded) {
            match std::fs::rename(entry.path(), pin_dir.join(name)) {
                Ok(()) => log::warn!("map {name}: finished the swap to layout v{recorded} a killed agent began"),
                Err(e) => log::warn!("map {name}: finishing the swap to layout v{recorded}: {e}"),
            }
            return;
        }
    }
}

/// Removes the staged maps of `name` an agent of another layout or size left (killed
/// mid-migration, then replaced by this one): their programs are being replaced, and the
/// map pinned under `name` is where this agent's migration starts from.
fn remove_stale_staging(pin_dir: &Path, name: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(pin_dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if is_staging_pin_of(&file, name) && entry.path() != keep {
            log::warn!("map {name}: removing {file}, staged by an agent of another layout or size that did not finish");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The layout versions recorded in a pinned SCHEMA map (empty if there is none).
fn read_schema(pin_dir: &Path) -> BTreeMap<String, u32> {
    let Ok(data) = MapData::from_pin(pin_dir.join(map_names::SCHEMA)) else {
        return BTreeMap::new();
    };
    let Ok(map) = HashMap::<MapData, MapName, u32>::try_from(Map::HashMap(data)) else {
        log::warn!("the pinned SCHEMA map has an unexpected layout; treating every map as layout v1");
        return BTreeMap::new();
    };
    map.iter()
        .filter_map(|e| e.ok())
        .map(|(k, v)| {
            let end = k.name.iter().position(|b| *b == 0).unwrap_or(k.name.len());
            (String::from_utf8_lossy(&k.name[..end]).into_owned(), v)
        })
        .collect()
}

/// A counters value of an older layout, a prefix of the current one (every field a u64,
/// later layouts only append): the old counts kept, the appended ones 0.
fn widen<T: aya::Pod + Default, const N: usize>(old: &[u64; N]) -> T {
    const { assert!(N * 8 <= size_of::<T>()) };
    let mut new = T::default();
    // SAFETY: `T` is plain old data at least N * 8 bytes long (asserted above), and the
    // two values do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(old.as_ptr().cast::<u8>(), (&raw mut new).cast::<u8>(), N * 8) };
    new
}

fn per_cpu<T: aya::Pod>(name: &'static str, values: Vec<T>) -> Result<PerCpuValues<T>> {
    PerCpuValues::try_from(values).map_err(|e| DatapathError::Map { name, source: aya::maps::MapError::IoError(e) })
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Sums per-CPU counter values.
pub fn sum_pod_counters<'a>(values: impl Iterator<Item = &'a PodCounters>) -> PodCounters {
    let mut s = PodCounters::default();
    for v in values {
        s.fwd_packets += v.fwd_packets;
        s.fwd_bytes += v.fwd_bytes;
        s.slow_packets += v.slow_packets;
        s.slow_bytes += v.slow_bytes;
        s.from_slow_packets += v.from_slow_packets;
        s.from_slow_bytes += v.from_slow_bytes;
        s.drop_spoofed_ip += v.drop_spoofed_ip;
        s.drop_spoofed_mac += v.drop_spoofed_mac;
        s.drop_malformed += v.drop_malformed;
        s.drop_ttl_exceeded += v.drop_ttl_exceeded;
        s.drop_no_slowpath += v.drop_no_slowpath;
        s.tunnel_packets += v.tunnel_packets;
        s.tunnel_bytes += v.tunnel_bytes;
        s.host_packets += v.host_packets;
        s.host_bytes += v.host_bytes;
        s.from_tunnel_packets += v.from_tunnel_packets;
        s.from_tunnel_bytes += v.from_tunnel_bytes;
        s.drop_service += v.drop_service;
        s.drop_policy_ingress += v.drop_policy_ingress;
        s.drop_policy_egress += v.drop_policy_egress;
        s.drop_fragment += v.drop_fragment;
        s.drop_no_route += v.drop_no_route;
        s.drop_overlay_port += v.drop_overlay_port;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_older_than_tcx_are_refused_by_name() {
        let err = kernel_supported("5.15.0-91-generic").unwrap_err();
        assert!(err.contains("5.15.0-91-generic") && err.contains(">= 6.6"), "{err}");
        assert!(kernel_supported("6.1.0-28-amd64").is_err(), "Debian 12's stock kernel");
        for ok in ["6.6.0", "6.18.44-fc-v1272", "7.0", "6.12.5+deb13-amd64"] {
            assert_eq!(kernel_supported(ok), Ok(()), "{ok}");
        }
        assert_eq!(kernel_supported("unusual"), Ok(()), "loading decides");
    }

    #[test]
    fn older_counter_layouts_keep_their_values_in_the_current_one() {
        let v1: [u64; 11] = core::array::from_fn(|i| i as u64 + 1);
        let c: PodCounters = widen(&v1);
        assert_eq!(c.fwd_packets, 1);
        assert_eq!(c.drop_no_slowpath, 11);
        assert_eq!(c.tunnel_packets, 0);
        // v1's value was exactly eleven u64s, the prefix of the later layouts.
        assert_eq!(std::mem::size_of::<[u64; 11]>(), std::mem::offset_of!(PodCounters, tunnel_packets));
        let v2: [u64; 20] = core::array::from_fn(|i| i as u64 + 1);
        let c: PodCounters = widen(&v2);
        assert_eq!((c.tunnel_packets, c.drop_policy_egress, c.drop_fragment), (12, 20, 0));
        assert_eq!(std::mem::size_of::<[u64; 20]>(), std::mem::offset_of!(PodCounters, drop_fragment));
        let v3: [u64; 21] = core::array::from_fn(|i| i as u64 + 1);
        let c: PodCounters = widen(&v3);
        assert_eq!((c.drop_fragment, c.drop_no_route, c.drop_overlay_port), (21, 0, 0));
        assert_eq!(std::mem::size_of::<[u64; 21]>(), std::mem::offset_of!(PodCounters, drop_no_route));
        let o1: [u64; 7] = core::array::from_fn(|i| i as u64 + 1);
        let o: OverlayCounters = widen(&o1);
        assert_eq!((o.rx_delivered, o.tx_no_route, o.rx_fragment), (1, 7, 0));
        assert_eq!(std::mem::size_of::<[u64; 7]>(), std::mem::offset_of!(OverlayCounters, rx_fragment));
    }
}

/// The kernel's verifier accepts every program, with room to spare (root only).
#[cfg(test)]
mod verifier {
    use super::*;

    #[test]
    fn every_program_loads_well_within_the_verifier_limit() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading BPF programs needs root");
            return;
        }
        // Fresh maps, pinned nowhere: only the programs matter here.
        let mut ebpf = EbpfLoader::new().map_max_entries(map_names::CT, 1024).load(EBPF_OBJECT).expect("the object");
        let mut report = vec![];
        for (name, prog) in ebpf.programs_mut() {
            let loaded = load_program(prog);
            let insns = loaded.and_then(|()| prog.info()).map(|i| i.verified_instruction_count().unwrap_or(0));
            report.push((name.to_owned(), insns.map_err(|e| format!("{e:?}"))));
        }
        let mut failed = vec![];
        for (name, r) in &report {
            match r {
                // The limit is 1,000,000; verification time (the agent's start) grows with it.
                Ok(insns) if *insns < 500_000 => eprintln!("{name}: {insns} instructions verified"),
                Ok(insns) => failed.push(format!("{name} needs {insns} verified instructions")),
                Err(e) => {
                    eprintln!("{name}: {e}");
                    failed.push(format!("{name}: {}", &e[e.len().saturating_sub(1500)..]));
                }
            }
        }
        assert!(failed.is_empty(), "{}", failed.join("\n\n"));
        assert!(report.iter().any(|(n, _)| n == program_names::FROM_POD));
    }
}

/// A test's own pin directory (`/sys/fs/bpf/contiv-test-TAG-PID`), removed when the test
/// ends, also on failure.
#[cfg(test)]
pub(crate) struct TestPins(pub PathBuf);

#[cfg(test)]
impl TestPins {
    pub fn new(tag: &str) -> Self {
        Self(PathBuf::from(format!("/sys/fs/bpf/contiv-test-{tag}-{}", std::process::id())))
    }

    /// The pin directory of a test that loads the datapath, or `None` (the test is skipped,
    /// and says so) when not running as root.
    pub fn for_datapath(tag: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading the datapath needs root");
            return None;
        }
        Some(Self::new(tag))
    }
}

#[cfg(test)]
impl Drop for TestPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Counter maps pinned in an older layout are migrated with their counts (root only).
#[cfg(test)]
mod counter_migration {
    use std::process::Command;

    use super::*;

    /// Pins, under `name`, an empty map of `kind` with a value of `counters` u64s, as an
    /// agent of that layout created it.
    fn pin_old(dir: &Path, name: &str, kind: &str, key: usize, counters: usize, entries: u32) {
        let pin = dir.join(name);
        std::fs::remove_file(&pin).unwrap();
        let (key, value, entries) = (key.to_string(), (counters * 8).to_string(), entries.to_string());
        let status = Command::new("bpftool")
            .args(["map", "create"])
            .arg(&pin)
            .args(["type", kind, "key", &key, "value", &value, "entries", &entries, "name", name])
            .status()
            .expect("running bpftool");
        assert!(status.success(), "bpftool map create {name}");
    }

    /// An agent killed in the middle of a layout migration (after its programs began
    /// recording into the new map, or between recording the new version and swapping the
    /// pin) is followed by one that resumes it with what was recorded.
    #[test]
    fn a_migration_cut_short_by_a_kill_resumes_with_what_the_new_map_recorded() {
        let Some(dir) = TestPins::for_datapath("migration-kill") else { return };
        let load = || Datapath::load_with(&dir.0, true, MapSizes::default()).expect("loading the datapath");
        let mut dp = load();
        dp.finish_migration().unwrap();
        drop(dp);
        pin_old(&dir.0, map_names::POD_COUNTERS, "percpu_hash", 4, 20, 4096);
        let nr_cpus = aya::util::nr_cpus().unwrap();
        let pod = Ipv4Key { addr: [10, 1, 0, 9] };
        {
            let data = MapData::from_pin(dir.0.join(map_names::POD_COUNTERS)).unwrap();
            let mut m: PerCpuHashMap<MapData, Ipv4Key, [u64; 20]> =
                PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).unwrap();
            m.insert(pod, PerCpuValues::try_from(vec![[1u64; 20]; nr_cpus]).unwrap(), 0).unwrap();
            let data = MapData::from_pin(dir.0.join(map_names::SCHEMA)).unwrap();
            let mut schema: HashMap<MapData, MapName, u32> = HashMap::try_from(Map::HashMap(data)).unwrap();
            schema.insert(MapName::new(map_names::POD_COUNTERS), 2, 0).unwrap();
        }
        // What an agent of some other layout staged and never finished.
        let stale = dir.0.join("POD_COUNTERS_v9");
        let status = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&stale)
            .args(["type", "hash", "key", "4", "value", "4", "entries", "4", "name", "stale"])
            .status()
            .unwrap();
        assert!(status.success());

        // The migrating agent's programs count 1000 forwarded packets in the new map; it is
        // killed before the finish.
        let mut dp = load();
        assert!(dp.migration_pending());
        assert!(!stale.exists(), "a stale staged map is removed");
        let staged = dir.0.join(format!("{}_v{}", map_names::POD_COUNTERS, schema::layout(map_names::POD_COUNTERS)));
        assert!(!staged.exists(), "before any program uses it, the new map is the agent's alone");
        dp.stage_migrated().unwrap(); // the first attach
        assert!(staged.exists(), "the new map is pinned aside once programs use it");
        {
            let mut m: PerCpuHashMap<&mut MapData, Ipv4Key, PodCounters> = dp.typed(map_names::POD_COUNTERS).unwrap();
            let mut c: PodCounters = m.get(&pod, 0).unwrap().iter().next().copied().unwrap();
            c.fwd_packets = 1000;
            m.insert(pod, per_cpu(map_names::POD_COUNTERS, vec![c; nr_cpus]).unwrap(), 0).unwrap();
        }
        drop(dp);
        let fwd = |dp: &Datapath| dp.pod_counters(Ipv4Addr::new(10, 1, 0, 9)).unwrap().unwrap().fwd_packets;

        // The next agent resumes: what the new map recorded is there.
        let dp = load();
        assert_eq!(fwd(&dp), 1000 * nr_cpus as u64, "the staged map is resumed, not migrated again");
        drop(dp);

        // Killed again between recording the new version and swapping the pin.
        {
            let data = MapData::from_pin(dir.0.join(map_names::SCHEMA)).unwrap();
            let mut schema: HashMap<MapData, MapName, u32> = HashMap::try_from(Map::HashMap(data)).unwrap();
            schema.insert(MapName::new(map_names::POD_COUNTERS), schema::layout(map_names::POD_COUNTERS), 0).unwrap();
        }
        let mut dp = load();
        assert_eq!(fwd(&dp), 1000 * nr_cpus as u64);
        dp.finish_migration().unwrap();
        assert!(!dp.migration_pending());
        assert!(!staged.exists(), "the staged map took the pin");
        let pinned = aya::maps::MapInfo::from_pin(dir.0.join(map_names::POD_COUNTERS)).unwrap();
        assert_eq!(pinned.value_size() as usize, size_of::<PodCounters>(), "the pin holds the new layout");
        drop(dp);
        let dp = load();
        assert!(!dp.migration_pending());
        assert_eq!(fwd(&dp), 1000 * nr_cpus as u64);
    }

    /// An agent of an older layout killed between recording its version in SCHEMA and
    /// swapping its staged map onto the pin: whatever agent comes next finishes the swap,
    /// so the pin holds the layout SCHEMA names (read as that layout, it would not load).
    #[test]
    fn a_swap_a_killed_agent_began_is_finished_by_the_next() {
        let Some(dir) = TestPins::for_datapath("killed-swap") else { return };
        let load = || Datapath::load_with(&dir.0, true, MapSizes::default()).expect("loading the datapath");
        let mut dp = load();
        dp.finish_migration().unwrap();
        drop(dp);
        // The pin: v1 (11 counters). Staged beside it by a v2 agent: 20 counters. SCHEMA: 2.
        pin_old(&dir.0, map_names::POD_COUNTERS, "percpu_hash", 4, 11, 4096);
        let staged = dir.0.join(format!("{}_v2", map_names::POD_COUNTERS));
        let status = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&staged)
            .args(["type", "percpu_hash", "key", "4", "value", "160", "entries", "4096", "name", "staged"])
            .status()
            .unwrap();
        assert!(status.success());
        let nr_cpus = aya::util::nr_cpus().unwrap();
        let pod = Ipv4Key { addr: [10, 1, 0, 8] };
        {
            let data = MapData::from_pin(&staged).unwrap();
            let mut m: PerCpuHashMap<MapData, Ipv4Key, [u64; 20]> =
                PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).unwrap();
            m.insert(pod, PerCpuValues::try_from(vec![[5u64; 20]; nr_cpus]).unwrap(), 0).unwrap();
            let data = MapData::from_pin(dir.0.join(map_names::SCHEMA)).unwrap();
            let mut schema: HashMap<MapData, MapName, u32> = HashMap::try_from(Map::HashMap(data)).unwrap();
            schema.insert(MapName::new(map_names::POD_COUNTERS), 2, 0).unwrap();
        }
        let mut dp = load();
        assert!(!staged.exists(), "the swap was finished");
        let c = dp.pod_counters(Ipv4Addr::new(10, 1, 0, 8)).unwrap().expect("the staged map's counts");
        assert_eq!(c.fwd_packets, 5 * nr_cpus as u64, "migrated from the v2 map: {c:?}");
        dp.finish_migration().unwrap();
        assert_eq!(read_schema(&dir.0).get(map_names::POD_COUNTERS), Some(&schema::layout(map_names::POD_COUNTERS)));
    }

    #[test]
    fn staged_pin_names_are_recognised_per_map() {
        assert!(is_staging_pin_of("CT_v1_n65536", "CT"));
        assert!(is_staging_pin_of("POD_COUNTERS_v3", "POD_COUNTERS"));
        assert!(!is_staging_pin_of("POD_COUNTERS_v3", "POD"));
        assert!(!is_staging_pin_of("CT_v1_n", "CT"));
        assert!(!is_staging_pin_of("CT_vx", "CT"));
        assert!(!is_staging_pin_of("CT", "CT"));
        assert_eq!(staging_pin_name("CT", 1, Some(4096)), "CT_v1_n4096");
        assert_eq!(staging_version("CT_v3_n4096", "CT"), Some(3));
        assert_eq!(staging_version("POD_COUNTERS_v2", "POD_COUNTERS"), Some(2));
        assert_eq!(staging_version("POD_COUNTERS_v2", "POD"), None);
    }

    #[test]
    fn counters_pinned_in_older_layouts_keep_their_counts() {
        let Some(dir) = TestPins::for_datapath("counters") else { return };
        let load = || {
            Datapath::load_with(&dir.0, true, MapSizes { conntrack: Some(1024), ..Default::default() })
                .expect("loading the datapath")
        };
        let mut dp = load();
        dp.finish_migration().unwrap();
        drop(dp);

        // An agent of the layouts before: POD_COUNTERS v2 (20 counters), OVERLAY_COUNTERS
        // v1 (7), SVC_COUNTERS v1 (3), with counts on every CPU.
        pin_old(&dir.0, map_names::POD_COUNTERS, "percpu_hash", 4, 20, 4096);
        pin_old(&dir.0, map_names::OVERLAY_COUNTERS, "percpu_array", 4, 7, 1);
        pin_old(&dir.0, map_names::SVC_COUNTERS, "percpu_hash", 4, 3, contiv_common::MAX_SVC_FRONTENDS);
        let nr_cpus = aya::util::nr_cpus().unwrap();
        let pod = Ipv4Key { addr: [10, 1, 0, 7] };
        {
            let data = MapData::from_pin(dir.0.join(map_names::POD_COUNTERS)).unwrap();
            let mut m: PerCpuHashMap<MapData, Ipv4Key, [u64; 20]> =
                PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).unwrap();
            let v: [u64; 20] = core::array::from_fn(|i| i as u64 + 1);
            m.insert(pod, PerCpuValues::try_from(vec![v; nr_cpus]).unwrap(), 0).unwrap();
            let data = MapData::from_pin(dir.0.join(map_names::OVERLAY_COUNTERS)).unwrap();
            let mut m: PerCpuArray<MapData, [u64; 7]> = PerCpuArray::try_from(Map::PerCpuArray(data)).unwrap();
            let v: [u64; 7] = core::array::from_fn(|i| i as u64 + 100);
            m.set(0, PerCpuValues::try_from(vec![v; nr_cpus]).unwrap(), 0).unwrap();
            let data = MapData::from_pin(dir.0.join(map_names::SVC_COUNTERS)).unwrap();
            let mut m: PerCpuHashMap<MapData, u32, [u64; 3]> =
                PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).unwrap();
            m.insert(42, PerCpuValues::try_from(vec![[7, 8, 9]; nr_cpus]).unwrap(), 0).unwrap();
            let data = MapData::from_pin(dir.0.join(map_names::SCHEMA)).unwrap();
            let mut schema: HashMap<MapData, MapName, u32> = HashMap::try_from(Map::HashMap(data)).unwrap();
            schema.insert(MapName::new(map_names::POD_COUNTERS), 2, 0).unwrap();
            schema.insert(MapName::new(map_names::OVERLAY_COUNTERS), 1, 0).unwrap();
            schema.insert(MapName::new(map_names::SVC_COUNTERS), 1, 0).unwrap();
        }

        // This agent migrates both, and the pins take the new maps.
        let mut dp = load();
        dp.finish_migration().unwrap();
        let n = nr_cpus as u64;
        let c = dp.pod_counters(Ipv4Addr::new(10, 1, 0, 7)).unwrap().expect("the pod's counters came along");
        assert_eq!((c.fwd_packets, c.drop_policy_egress, c.drop_fragment), (n, 20 * n, 0), "{c:?}");
        let o = dp.overlay_counters().unwrap();
        assert_eq!((o.rx_delivered, o.tx_no_route, o.rx_fragment), (100 * n, 106 * n, 0), "{o:?}");
        let s = dp.svc_counters().unwrap().remove(&42).expect("the service port's counters came along");
        assert_eq!((s.connections, s.no_backend, s.source_denied, s.snat_exhausted), (7 * n, 8 * n, 9 * n, 0), "{s:?}");
        let stored = read_schema(&dir.0);
        assert_eq!(stored.get(map_names::POD_COUNTERS), Some(&schema::layout(map_names::POD_COUNTERS)));
        assert_eq!(stored.get(map_names::OVERLAY_COUNTERS), Some(&schema::layout(map_names::OVERLAY_COUNTERS)));
        assert_eq!(stored.get(map_names::SVC_COUNTERS), Some(&schema::layout(map_names::SVC_COUNTERS)));
        let pinned = aya::maps::MapInfo::from_pin(dir.0.join(map_names::POD_COUNTERS)).unwrap();
        assert_eq!(pinned.value_size() as usize, size_of::<PodCounters>(), "the pin holds the new layout");
    }
}
