//! `FakeOptions::af_xdp` (`contiv-fake-vpp --af-xdp`): the fake's af_xdp interfaces get a
//! real AF_XDP socket on their Linux interface, registered the way VPP's af_xdp plugin
//! registers its own when no `prog` is given (its libbpf/libxdp `xsk_socket__create`): in
//! the map named `xsks_map` (u32 key, u32 value) of the XDP program already attached to the
//! interface, under the socket's queue. Without such a program the create fails the way
//! VPP's does when the socket cannot be set up (`VNET_API_ERROR_SYSCALL_ERROR_2`).
//!
//! Behind the socket the fake answers ARP requests and ICMP echo for the interface's first
//! IPv4 address with the interface's MAC, while the interface is up (VPP answers for its own
//! addresses the same way); it forwards nothing else (it is a fake) and counts it dropped.
//! The socket closes when the interface is deleted, on a simulated restart, and with the
//! process, which takes it out of the map as the kernel does for VPP's.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::AsFd,
    process::Command,
    sync::{Arc, Mutex},
};

use aya::maps::{Map, MapData, MapInfo, XskMap};
use contiv_vswitch::{
    AfXdpPort, BuiltinVswitch, GatewayConfig, PortConfig, RunningPort, SlowPath, Verdict, VswitchCounters,
};
use ipnet::IpNet;

use crate::state::{FakeState, InterfaceKind};

/// VPP's answer when the AF_XDP socket cannot be created (`VNET_API_ERROR_SYSCALL_ERROR_2`).
pub const SYSCALL_ERROR_2: i32 = -12;

/// The name libbpf and libxdp look up in the attached program.
pub const XSKS_MAP: &str = "xsks_map";

/// What the interface answers for: its first IPv4 address and MAC, while it is up.
type View = Arc<Mutex<Option<GatewayConfig>>>;

/// The frames-in / frames-out side of a fake af_xdp interface.
struct FakeInterface {
    view: View,
    current: Option<GatewayConfig>,
    answer: BuiltinVswitch,
    dropped: VswitchCounters,
}

impl SlowPath for FakeInterface {
    fn handle(&mut self, frame: &[u8], tx: &mut dyn FnMut(&[u8])) -> Verdict {
        let view = *self.view.lock().unwrap_or_else(|e| e.into_inner());
        if view != self.current {
            self.current = view;
            if let Some(g) = view {
                self.answer.set_gateway(g);
            }
        }
        if self.current.is_none() {
            let v = Verdict::Dropped(contiv_vswitch::DropReason::UnknownDestination);
            self.dropped.record(frame.len(), v);
            return v;
        }
        self.answer.handle(frame, tx)
    }

    fn counters(&self) -> VswitchCounters {
        let mut c = self.answer.counters();
        c.rx_frames += self.dropped.rx_frames;
        c.rx_bytes += self.dropped.rx_bytes;
        c.drops.unknown_destination += self.dropped.drops.unknown_destination;
        c
    }
}

struct Port {
    running: RunningPort<FakeInterface>,
    view: View,
}

/// The AF_XDP sockets of the fake's af_xdp interfaces, by sw_if_index.
#[derive(Default)]
pub struct XdpPorts {
    ports: Mutex<BTreeMap<u32, Vec<Port>>>,
}

/// Sockets opened for an interface not yet numbered.
pub struct Opened(Vec<Port>);

impl XdpPorts {
    /// Opens one socket per queue on `host_if` and registers each in the attached program's
    /// `xsks_map`, as VPP's af_xdp plugin does. Nothing is left open on failure.
    pub fn open(&self, host_if: &str, rxq_num: u16) -> Result<Opened, String> {
        let map_id = attached_xsks_map(host_if)?;
        let data = MapData::from_id(map_id).map_err(|e| format!("opening map {map_id}: {e}"))?;
        let mut xsks: XskMap<MapData> =
            XskMap::try_from(Map::XskMap(data)).map_err(|e| format!("{XSKS_MAP} is not an XSK map: {e}"))?;
        let mut ports = Vec::new();
        for queue in 0..u32::from(rxq_num) {
            let view: View = Arc::new(Mutex::new(None));
            let backend = FakeInterface {
                view: Arc::clone(&view),
                current: None,
                answer: BuiltinVswitch::new(GatewayConfig { ip: Ipv4Addr::UNSPECIFIED, mac: [0; 6], path_mtu: None }),
                dropped: VswitchCounters::default(),
            };
            let running = AfXdpPort::open(PortConfig::new(host_if, queue))
                .and_then(|p| p.run(backend))
                .map_err(|e| format!("AF_XDP socket on {host_if} queue {queue}: {e}"))?;
            xsks.set(queue, running.as_fd(), 0)
                .map_err(|e| format!("registering the socket of queue {queue} in {XSKS_MAP}: {e}"))?;
            log::info!("fake VPP: AF_XDP socket on {host_if} queue {queue} registered in {XSKS_MAP} (map {map_id})");
            ports.push(Port { running, view });
        }
        Ok(Opened(ports))
    }

    /// Keeps the sockets of interface `sw_if_index`.
    pub fn adopt(&self, sw_if_index: u32, opened: Opened) {
        self.ports.lock().unwrap_or_else(|e| e.into_inner()).insert(sw_if_index, opened.0);
    }

    /// Follows the state: interfaces' addresses, MAC and admin state become what the
    /// sockets answer for; sockets of deleted interfaces are closed. Call without holding
    /// the state lock.
    pub fn sync(&self, state: &Mutex<FakeState>) {
        let mut gone = Vec::new();
        {
            let s = state.lock().unwrap_or_else(|e| e.into_inner());
            let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<u32> = ports.keys().copied().collect();
            for sw in keys {
                let iface = s.interfaces.get(&sw).filter(|i| matches!(i.kind, InterfaceKind::AfXdp(_)));
                let Some(iface) = iface else {
                    gone.extend(ports.remove(&sw).unwrap_or_default());
                    continue;
                };
                let ip = iface.addresses.iter().find_map(|a| match a {
                    IpNet::V4(v4) => Some(v4.addr()),
                    IpNet::V6(_) => None,
                });
                let view = match (iface.admin_up, ip) {
                    (true, Some(ip)) => Some(GatewayConfig { ip, mac: iface.mac, path_mtu: None }),
                    _ => None,
                };
                for p in ports.get(&sw).into_iter().flatten() {
                    *p.view.lock().unwrap_or_else(|e| e.into_inner()) = view;
                }
            }
        }
        for p in gone {
            let ifname = p.running.ifname().to_owned();
            if let Err(e) = p.running.stop() {
                log::warn!("fake VPP: closing the AF_XDP socket on {ifname}: {e}");
            }
        }
    }

    /// Frames received by every socket (answered or not), by sw_if_index.
    pub fn counters(&self) -> BTreeMap<u32, VswitchCounters> {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports
            .iter()
            .map(|(sw, ps)| {
                let mut total = VswitchCounters::default();
                for p in ps {
                    let c = p.running.backend_counters();
                    total.rx_frames += c.rx_frames;
                    total.rx_bytes += c.rx_bytes;
                    total.arp_replies += c.arp_replies;
                    total.icmp_echo_replies += c.icmp_echo_replies;
                }
                (*sw, total)
            })
            .collect()
    }
}

/// The `xsks_map` of the XDP program attached to `ifname`, found as libbpf/libxdp find it:
/// the interface's XDP program, then its maps by name, key and value size.
fn attached_xsks_map(ifname: &str) -> Result<u32, String> {
    let prog_id = attached_xdp_program(ifname)?;
    let prog = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .ok_or_else(|| format!("XDP program {prog_id} on {ifname} vanished"))?;
    let map_ids = prog.map_ids().map_err(|e| format!("maps of XDP program {prog_id}: {e}"))?.unwrap_or_default();
    for id in map_ids {
        let Ok(info) = MapInfo::from_id(id) else { continue };
        if info.name_as_str() == Some(XSKS_MAP) && info.key_size() == 4 && info.value_size() == 4 {
            return Ok(id);
        }
    }
    Err(format!(
        "the XDP program on {ifname} (id {prog_id}) has no map named {XSKS_MAP} (VPP's af_xdp would fail the same way)"
    ))
}

/// The id of the XDP program attached to `ifname` (in this process's network namespace).
fn attached_xdp_program(ifname: &str) -> Result<u32, String> {
    let out = Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", ifname])
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if !out.status.success() {
        return Err(format!("no interface {ifname}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("parsing `ip -j link`: {e}"))?;
    let xdp = &links[0]["xdp"];
    xdp["prog"]["id"]
        .as_u64()
        .or_else(|| xdp["attached"].as_array().and_then(|a| a.first()).and_then(|p| p["prog"]["id"].as_u64()))
        .map(|id| id as u32)
        .ok_or_else(|| format!("no XDP program is attached to {ifname} (a real VPP would load libxdp's default one)"))
}
