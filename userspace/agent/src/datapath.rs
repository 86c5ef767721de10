//! The eBPF datapath as the agent drives it: loads the embedded object, pins every
//! map under one bpffs directory (reused across agent restarts, so existing pods keep
//! forwarding), attaches the TC programs to pod veths and the slow-path port, and
//! keeps the pod maps in step with the attachments.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, XskMap},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkOrder},
        tc::TcAttachOptions,
    },
};
use contiv_common::{DatapathConfig, Ipv4Key, PodCounters, PodEndpoint, SlowPortCounters, map_names, program_names};

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

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

/// Mounts bpffs on /sys/fs/bpf if nothing is mounted there yet.
pub fn ensure_bpffs() -> std::io::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    let stat = nix::sys::statfs::statfs(root).map_err(std::io::Error::from)?;
    if stat.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(std::io::Error::from)
}

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Links that live only as long as the agent (the slow-path port's).
    owned_links: Vec<FdLink>,
}

impl Datapath {
    /// Loads the programs; maps are created pinned in `pin_dir`, or reused if already there.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        ensure_bpffs().map_err(|source| DatapathError::PinDir { path: "/sys/fs/bpf".into(), source })?;
        std::fs::create_dir_all(pin_dir)
            .map_err(|source| DatapathError::PinDir { path: pin_dir.to_owned(), source })?;
        let names = [
            map_names::PODS,
            map_names::POD_IFACES,
            map_names::POD_COUNTERS,
            map_names::CONFIG,
            map_names::SLOWPATH_XSKS,
            map_names::SLOWPORT_COUNTERS,
        ];
        let mut loader = EbpfLoader::new();
        for name in names {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in [program_names::FROM_POD, program_names::FROM_VSWITCH] {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(prog_err(name))?;
            prog.load().map_err(prog_err(name))?;
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::TO_VSWITCH)
            .ok_or(DatapathError::Missing(program_names::TO_VSWITCH))?
            .try_into()
            .map_err(prog_err(program_names::TO_VSWITCH))?;
        xdp.load().map_err(prog_err(program_names::TO_VSWITCH))?;
        Ok(Self { ebpf, pin_dir: pin_dir.to_owned(), owned_links: Vec::new() })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Writes the node-wide configuration.
    pub fn set_config(&mut self, cfg: DatapathConfig) -> Result<()> {
        let mut map: Array<&mut MapData, DatapathConfig> = self
            .ebpf
            .map_mut(map_names::CONFIG)
            .ok_or(DatapathError::Missing(map_names::CONFIG))?
            .try_into()
            .map_err(map_err(map_names::CONFIG))?;
        map.set(0, cfg, 0).map_err(map_err(map_names::CONFIG))
    }

    /// Attaches `tc_from_pod` to the ingress of a pod's host veth (tcx). The link is
    /// pinned under `<pin_dir>/links/`, so it outlives the agent: pods keep forwarding
    /// while the agent restarts or is upgraded. A link a previous agent left is replaced
    /// make-before-break: the new program goes first, then the old link is released.
    pub fn attach_pod(&mut self, host_ifname: &str) -> Result<()> {
        let pin = self.link_pin_path(host_ifname);
        let old = aya::programs::links::PinnedLink::from_pin(&pin).ok();
        self.attach_tcx(program_names::FROM_POD, host_ifname, Some(&pin))?;
        if let Some(old) = old {
            // The new link is pinned at the same path already; only drop the old fd.
            drop(aya::programs::links::FdLink::from(old));
        }
        Ok(())
    }

    /// What an ADD needs to attach `tc_from_pod` to a new pod interface on its own (see
    /// [`crate::tcx`]): a new fd of the loaded program, and where the link is pinned.
    pub fn pod_attach_target(&self, host_ifname: &str) -> Result<(aya::programs::ProgramFd, PathBuf)> {
        let name = program_names::FROM_POD;
        let prog: &SchedClassifier =
            self.ebpf.program(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(prog_err(name))?;
        let fd = prog.fd().map_err(prog_err(name))?.try_clone().map_err(|e| prog_err(name)(e.into()))?;
        Ok((fd, self.link_pin_path(host_ifname)))
    }

    /// Forgets the pinned link of a pod interface (the kernel detached it when the
    /// interface was deleted; this removes the pin).
    pub fn forget_pod_link(&self, host_ifname: &str) {
        let _ = std::fs::remove_file(self.link_pin_path(host_ifname));
    }

    fn link_pin_path(&self, ifname: &str) -> PathBuf {
        self.pin_dir.join("links").join(ifname)
    }

    fn attach_tcx(&mut self, name: &'static str, ifname: &str, pin: Option<&Path>) -> Result<()> {
        let prog: &mut SchedClassifier =
            self.ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(prog_err(name))?;
        let link_id = prog
            .attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first()))
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
        self.attach_tcx(program_names::FROM_VSWITCH, host_ifname, None)?;
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(program_names::TO_VSWITCH)
            .ok_or(DatapathError::Missing(program_names::TO_VSWITCH))?
            .try_into()
            .map_err(prog_err(program_names::TO_VSWITCH))?;
        // Native (driver) mode on veth; the link lives as long as the agent serves the socket.
        xdp.attach(vswitch_ifname, XdpMode::Driver).map_err(prog_err(program_names::TO_VSWITCH))?;
        Ok(())
    }

    /// Adds or updates a pod in the forwarding maps; its counters start at zero if new.
    pub fn add_pod(&mut self, ep: PodEndpoint) -> Result<()> {
        let key = Ipv4Key::new(ep.ip);
        {
            let mut ifaces: HashMap<&mut MapData, u32, PodEndpoint> = self.typed(map_names::POD_IFACES)?;
            ifaces.insert(ep.host_ifindex, ep, 0).map_err(map_err(map_names::POD_IFACES))?;
        }
        {
            let mut pods: HashMap<&mut MapData, Ipv4Key, PodEndpoint> = self.typed(map_names::PODS)?;
            pods.insert(key, ep, 0).map_err(map_err(map_names::PODS))?;
        }
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Map {
            name: map_names::POD_COUNTERS,
            source: aya::maps::MapError::IoError(e),
        })?;
        let mut counters: PerCpuHashMap<&mut MapData, Ipv4Key, PodCounters> = self.typed(map_names::POD_COUNTERS)?;
        if counters.get(&key, 0).is_err() {
            let zero = aya::maps::PerCpuValues::try_from(vec![PodCounters::default(); nr_cpus]).map_err(|e| {
                DatapathError::Map { name: map_names::POD_COUNTERS, source: aya::maps::MapError::IoError(e) }
            })?;
            counters.insert(key, zero, 0).map_err(map_err(map_names::POD_COUNTERS))?;
        }
        Ok(())
    }

    /// Removes every map entry of a pod. Entries already gone are fine.
    pub fn remove_pod(&mut self, ip: Ipv4Addr, host_ifindex: u32) -> Result<()> {
        let key = Ipv4Key::new(ip.octets());
        {
            let mut pods: HashMap<&mut MapData, Ipv4Key, PodEndpoint> = self.typed(map_names::PODS)?;
            // Only remove the IP's entry if it still points at this pod's interface.
            if pods.get(&key, 0).ok().map(|e| e.host_ifindex) == Some(host_ifindex) {
                ignore_missing(pods.remove(&key)).map_err(map_err(map_names::PODS))?;
            }
        }
        {
            let mut ifaces: HashMap<&mut MapData, u32, PodEndpoint> = self.typed(map_names::POD_IFACES)?;
            ignore_missing(ifaces.remove(&host_ifindex)).map_err(map_err(map_names::POD_IFACES))?;
        }
        let mut counters: PerCpuHashMap<&mut MapData, Ipv4Key, PodCounters> = self.typed(map_names::POD_COUNTERS)?;
        ignore_missing(counters.remove(&key)).map_err(map_err(map_names::POD_COUNTERS))
    }

    /// A pod's counters summed over CPUs.
    pub fn pod_counters(&self, ip: Ipv4Addr) -> Result<Option<PodCounters>> {
        let map = self.ebpf.map(map_names::POD_COUNTERS).ok_or(DatapathError::Missing(map_names::POD_COUNTERS))?;
        let counters: PerCpuHashMap<&MapData, Ipv4Key, PodCounters> =
            map.try_into().map_err(map_err(map_names::POD_COUNTERS))?;
        match counters.get(&Ipv4Key::new(ip.octets()), 0) {
            Ok(values) => Ok(Some(sum_pod_counters(values.iter()))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::POD_COUNTERS)(e)),
        }
    }

    /// Slow-path port counters summed over CPUs.
    pub fn slowport_counters(&self) -> Result<SlowPortCounters> {
        let map =
            self.ebpf.map(map_names::SLOWPORT_COUNTERS).ok_or(DatapathError::Missing(map_names::SLOWPORT_COUNTERS))?;
        let arr: PerCpuArray<&MapData, SlowPortCounters> =
            map.try_into().map_err(map_err(map_names::SLOWPORT_COUNTERS))?;
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

    /// Every pod in the PODS map (for reconciling after a restart).
    pub fn pods_in_map(&self) -> Result<Vec<PodEndpoint>> {
        let map = self.ebpf.map(map_names::POD_IFACES).ok_or(DatapathError::Missing(map_names::POD_IFACES))?;
        let ifaces: HashMap<&MapData, u32, PodEndpoint> = map.try_into().map_err(map_err(map_names::POD_IFACES))?;
        ifaces.iter().map(|r| r.map(|(_, v)| v).map_err(map_err(map_names::POD_IFACES))).collect()
    }

    /// Registers an AF_XDP socket for a queue of the slow-path port.
    pub fn register_xsk(&mut self, queue: u32, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        let mut xsks: XskMap<&mut MapData> = self.typed(map_names::SLOWPATH_XSKS)?;
        xsks.set(queue, fd, 0).map_err(map_err(map_names::SLOWPATH_XSKS))
    }

    fn typed<'a, T>(&'a mut self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(map_err(name))
    }
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
    }
    s
}
