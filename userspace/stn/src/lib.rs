//! contiv-stn ("steal the NIC") for single-NIC nodes in `uplink = "vpp"` mode.
//!
//! VPP takes the node's only NIC through DPDK, so the host must let go of it first. This
//! crate records the NIC's addresses and routes (the default route included), writes them
//! to a state file, removes them from the host, and puts everything back on exit. The
//! state file is written (atomically) *before* anything is removed, so after a crash the
//! next start restores from it first. The same file is the handover to the agent: its
//! `handover` object holds the IPv4 addresses, routes and MTU VPP must take over.
//!
//! Records keep the kernel's own netlink messages (hex) next to a readable form, so a
//! restore re-adds exactly what was there (metric, protocol, scope, source, flags).

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::{
    Handle, LinkUnspec,
    packet_core::{Emitable, Parseable},
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressFlags, AddressMessage},
        link::{LinkAttribute, LinkFlags},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
    },
};
use serde::{Deserialize, Serialize};

pub mod pci;

/// The state file's format version.
pub const STATE_VERSION: u32 = 1;
/// Default state file (tmpfs: a reboot starts clean, as the kernel's config does).
pub const DEFAULT_STATE_FILE: &str = "/run/contiv/stn.json";
/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// Errors of contiv-stn.
#[derive(Debug, thiserror::Error)]
pub enum StnError {
    /// The interface does not exist.
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    /// The NIC could not be given back to its kernel driver (DPDK's driver still holds it).
    #[error("giving PCI device {pci} back to {driver}: {reason}")]
    Rebind {
        /// The device.
        pci: String,
        /// Its kernel driver.
        driver: String,
        /// What failed.
        reason: String,
    },
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// The state file could not be read or written.
    #[error("state file {path}: {source}")]
    StateFile {
        /// The file.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state file is not valid.
    #[error("state file {path} is not valid: {reason}")]
    BadState {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Part of the record could not be given back (everything else was).
    #[error("giving {interface} back: {count} of {total} failed: {list}", count = .failures.len(), list = .failures.join("; "))]
    Restore {
        /// The interface.
        interface: String,
        /// How many records (link state, addresses, routes) were replayed.
        total: usize,
        /// What failed, and why (the last error, for routes tried in several passes).
        failures: Vec<String>,
    },
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> StnError {
    let what = what.into();
    move |source| StnError::Netlink { what, source }
}

/// A route handed to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRoute {
    /// Destination (0.0.0.0/0 for the default route).
    pub dst: Ipv4Net,
    /// Gateway; None for a link route.
    pub gateway: Option<Ipv4Addr>,
}

/// What the agent gives VPP for the NIC (the same shape as the VPP backend's `UplinkHandover`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// IPv4 addresses; the first is the node IP.
    pub addresses: Vec<Ipv4Net>,
    /// IPv4 routes through the NIC.
    pub routes: Vec<HandoverRoute>,
    /// MTU.
    pub mtu: Option<u32>,
}

/// A recorded address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAddress {
    /// `address/prefix`.
    pub address: IpNet,
    /// The kernel's RTM_NEWADDR body, hex.
    pub netlink: String,
}

/// A recorded route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRoute {
    /// Destination.
    pub dst: IpNet,
    /// Gateway.
    pub gateway: Option<IpAddr>,
    /// Routing table.
    pub table: u32,
    /// Metric.
    pub metric: Option<u32>,
    /// The kernel's RTM_NEWROUTE body, hex.
    pub netlink: String,
}

/// Everything contiv-stn took from the NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StnState {
    /// Format version.
    pub version: u32,
    /// The NIC's name.
    pub interface: String,
    /// Its index when taken.
    pub ifindex: u32,
    /// MAC address.
    pub mac: Option<String>,
    /// MTU.
    pub mtu: Option<u32>,
    /// PCI address (what `[vpp] uplinkPci` wants), None for virtual devices.
    pub pci_address: Option<String>,
    /// The kernel driver it had (`ixgbe`, `virtio-pci`): where it goes back from DPDK's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Whether the link was up.
    pub link_up: bool,
    /// For the agent: what VPP must take over.
    pub handover: Handover,
    /// Addresses to give back.
    pub addresses: Vec<SavedAddress>,
    /// Routes to give back.
    pub routes: Vec<SavedRoute>,
    /// The process that took the NIC.
    pub pid: u32,
    /// The take finished: the NIC is off the host (what `contiv-stn show`, the sidecar's
    /// startup probe, waits for before VPP starts: DPDK skips a NIC whose link is up).
    #[serde(default)]
    pub taken: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn emit<T: Emitable>(m: &T) -> String {
    let mut buf = vec![0u8; m.buffer_len()];
    m.emit(&mut buf);
    hex(&buf)
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Whether a route goes out of interface `ifindex`: its output interface, or one of its
/// next hops (a multipath route: ECMP default routes through two gateways of the NIC). The
/// kernel drops such a route when the NIC's addresses go, so it is recorded with the others.
fn route_uses(r: &RouteMessage, ifindex: u32) -> bool {
    r.attributes.iter().any(|a| match a {
        RouteAttribute::Oif(i) => *i == ifindex,
        RouteAttribute::MultiPath(hops) => hops.iter().any(|h| h.interface_index == ifindex),
        _ => false,
    })
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn route_dst(r: &RouteMessage) -> Option<IpNet> {
    let len = r.header.destination_prefix_length;
    let addr = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => route_addr(d),
        _ => None,
    });
    let addr = addr.unwrap_or(match r.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    IpNet::new(addr, len).ok()
}

/// Whether the host has an IPv4 default route in its main table now (through any
/// interface): once contiv-stn took the NIC's, VPP's host interconnect gives one back.
pub async fn host_has_default_route(h: &rtnetlink::Handle) -> Result<bool, StnError> {
    let mut query = RouteMessage::default();
    query.header.address_family = AddressFamily::Inet;
    let all: Vec<RouteMessage> =
        h.route().get(query).execute().try_collect().await.map_err(nl("listing the host's routes".to_string()))?;
    Ok(all.iter().any(|r| r.header.destination_prefix_length == 0 && route_table(r) == 254))
}

/// Whether the taken NIC had an IPv4 default route (what [`host_has_default_route`] waits
/// to see come back through VPP).
pub fn had_default_route(state: &StnState) -> bool {
    state.routes.iter().any(|r| matches!(r.dst, IpNet::V4(n) if n.prefix_len() == 0))
}

/// The route's gateway; for a multipath route, its first next hop's (what VPP is handed).
fn route_gateway(r: &RouteMessage) -> Option<IpAddr> {
    let gateway = |attributes: &[RouteAttribute]| {
        attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(g) => route_addr(g),
            _ => None,
        })
    };
    gateway(&r.attributes).or_else(|| {
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::MultiPath(hops) => hops.iter().find_map(|h| gateway(&h.attributes)),
            _ => None,
        })
    })
}

fn address_of(a: &AddressMessage) -> Option<IpNet> {
    let ip = a
        .attributes
        .iter()
        .find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })?;
    IpNet::new(ip, a.header.prefix_len).ok()
}

/// The NIC's index, MAC, MTU and up flag.
async fn link_info(h: &Handle, ifname: &str) -> Result<(u32, Option<String>, Option<u32>, bool), StnError> {
    let mut links = h.link().get().match_name(ifname.to_owned()).execute();
    let link = match links.try_next().await {
        Ok(Some(l)) => l,
        Ok(None) => return Err(StnError::NoSuchInterface(ifname.to_owned())),
        Err(rtnetlink::Error::NetlinkError(e)) if e.code.map(|c| c.get()) == Some(-libc::ENODEV) => {
            return Err(StnError::NoSuchInterface(ifname.to_owned()));
        }
        Err(e) => return Err(nl(format!("looking up {ifname}"))(e)),
    };
    let mut mac = None;
    let mut mtu = None;
    for a in &link.attributes {
        match a {
            LinkAttribute::Address(m) if m.len() == 6 => {
                mac = Some(m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"));
            }
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            _ => {}
        }
    }
    Ok((link.header.index, mac, mtu, link.header.flags.contains(LinkFlags::Up)))
}

/// Drivers through which DPDK holds a NIC (no host interface while bound to one).
pub const DPDK_DRIVERS: [&str; 3] = ["vfio-pci", "uio_pci_generic", "igb_uio"];

/// The DPDK driver that holds the NIC `state` records, if it does: the state is for
/// `interface`, the host has no interface of that name, and its PCI function is bound to
/// one of [`DPDK_DRIVERS`]. Then VPP has (or will take) the NIC, and a start of contiv-stn
/// after a crash must keep the record rather than give the NIC back under a running VPP
/// (vfio-pci's unbind waits for VPP to let go; a uio driver's does not, and the kernel
/// driver would reset the NIC under it).
pub async fn held_by_dpdk(h: &Handle, state: &StnState, interface: &str) -> Option<String> {
    if state.interface != interface || !matches!(link_info(h, interface).await, Err(StnError::NoSuchInterface(_))) {
        return None;
    }
    let driver = pci::bound_driver(&pci::pci_root(), state.pci_address.as_deref()?)?;
    DPDK_DRIVERS.contains(&driver.as_str()).then_some(driver)
}

/// The PCI address behind a network interface, from sysfs (None for virtual devices).
pub fn pci_address(ifname: &str) -> Option<String> {
    pci::pci_function(Path::new("/sys"), ifname).map(|(address, _)| address)
}

fn address_flags(a: &AddressMessage) -> AddressFlags {
    a.attributes
        .iter()
        .find_map(|x| match x {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(a.header.flags.bits())))
}

/// Whether the kernel itself installs `r` again when the addresses `addresses` come back, so
/// that it must not be recorded (replaying it would only race the kernel's own).
///
/// Only `proto kernel` routes qualify, and only the exact connected route the kernel makes
/// for one of the addresses (`fib_add_ifaddr` / `addrconf_prefix_route`): destination the
/// address's subnet, no gateway, unicast, main table, metric the address's `metric`
/// (IFA_RT_PRIORITY) or the kernel's default (0 for IPv4, 256 for IPv6), and an address
/// the kernel makes a prefix route for: not `noprefixroute`, and for IPv4 not a secondary
/// and not a /32. Any other `proto kernel` route was put there by someone else under the
/// kernel's name (NetworkManager adds the subnet route of its `noprefixroute` addresses as
/// `proto kernel metric 100`), or has a metric or table the kernel would not give it; the
/// kernel will not make it again, so it is recorded. Keeping one too many is harmless (the
/// restore replaces, an existing route is fine); dropping one loses it.
fn kernel_makes_it_again(r: &RouteMessage, addresses: &[AddressMessage]) -> bool {
    if r.header.protocol != RouteProtocol::Kernel
        || r.header.kind != RouteType::Unicast
        || route_table(r) != RT_TABLE_MAIN
        || r.attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Via(_) | RouteAttribute::MultiPath(_)))
    {
        return false;
    }
    let Some(dst) = route_dst(r) else { return false };
    let metric = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    addresses.iter().any(|a| {
        let Some(net) = address_of(a) else { return false };
        let flags = address_flags(a);
        let (makes_one, default_metric) = match net {
            IpNet::V4(v4) => (!flags.contains(AddressFlags::Secondary) && v4.prefix_len() < 32, 0),
            IpNet::V6(_) => (true, 256),
        };
        let address_metric = a
            .attributes
            .iter()
            .find_map(|x| match x {
                AddressAttribute::RoutePriority(p) => Some(*p),
                _ => None,
            })
            .unwrap_or(default_metric);
        makes_one && !flags.contains(AddressFlags::Noprefixroute) && net.trunc() == dst && metric == address_metric
    })
}

/// Records the NIC's configuration (nothing is changed).
pub async fn record(h: &Handle, ifname: &str) -> Result<StnState, StnError> {
    let (ifindex, mac, mtu, link_up) = link_info(h, ifname).await?;
    let mut addresses = Vec::new();
    let mut msgs: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(ifindex)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing addresses of {ifname}")))?;
    msgs.retain(|m| m.header.index == ifindex);
    for m in &msgs {
        let Some(address) = address_of(m) else { continue };
        // The kernel makes the IPv6 link-local address itself.
        if let IpNet::V6(v6) = address
            && v6.addr().segments()[0] & 0xffc0 == 0xfe80
        {
            continue;
        }
        let mut clean = m.clone();
        clean.attributes.retain(|a| !matches!(a, AddressAttribute::CacheInfo(_)));
        addresses.push(SavedAddress { address, netlink: emit(&clean) });
    }
    let mut routes = Vec::new();
    let mut handed_over = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut query = RouteMessage::default();
        query.header.address_family = family;
        let all: Vec<RouteMessage> =
            h.route().get(query).execute().try_collect().await.map_err(nl(format!("listing routes of {ifname}")))?;
        for r in all {
            let table = route_table(&r);
            // Routes through the NIC, except the kernel's own: the local table, and the
            // connected routes the kernel makes again when their address comes back.
            if !route_uses(&r, ifindex) || table == 255 || kernel_makes_it_again(&r, &msgs) {
                continue;
            }
            let Some(dst) = route_dst(&r) else { continue };
            if let IpNet::V6(v6) = dst
                && (v6.addr().segments()[0] & 0xff00 == 0xff00 || v6.addr().segments()[0] & 0xffc0 == 0xfe80)
            {
                continue;
            }
            let metric = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Priority(p) => Some(*p),
                _ => None,
            });
            let mut clean = r.clone();
            clean.attributes.retain(|a| !matches!(a, RouteAttribute::CacheInfo(_) | RouteAttribute::Expires(_)));
            routes.push(SavedRoute { dst, gateway: route_gateway(&r), table, metric, netlink: emit(&clean) });
            // A `proto kernel` route kept here is a connected route (an address's subnet,
            // e.g. NetworkManager's for a `noprefixroute` address): VPP makes that one
            // itself from the address, so it is not handed over.
            handed_over.push(r.header.protocol != RouteProtocol::Kernel);
        }
    }
    // The handover: IPv4 in the main table, primary address first as the kernel lists it.
    let handover = Handover {
        addresses: addresses
            .iter()
            .filter_map(|a| match a.address {
                IpNet::V4(n) => Some(n),
                IpNet::V6(_) => None,
            })
            .collect(),
        routes: routes
            .iter()
            .zip(&handed_over)
            .filter(|(r, handed)| **handed && r.table == RT_TABLE_MAIN)
            .map(|(r, _)| r)
            .filter_map(|r| match (r.dst, r.gateway) {
                (IpNet::V4(dst), Some(IpAddr::V4(gw))) => Some(HandoverRoute { dst, gateway: Some(gw) }),
                (IpNet::V4(dst), None) => Some(HandoverRoute { dst, gateway: None }),
                _ => None,
            })
            .collect(),
        mtu,
    };
    // The PCI function and its driver (for a virtio NIC, the `virtio-pci` function above
    // the interface's `virtio0`): what DPDK takes, and gives back.
    let function = pci::pci_function(Path::new("/sys"), ifname);
    Ok(StnState {
        version: STATE_VERSION,
        interface: ifname.to_owned(),
        ifindex,
        mac,
        mtu,
        pci_address: function.as_ref().map(|(address, _)| address.clone()),
        driver: function.and_then(|(_, driver)| driver),
        link_up,
        handover,
        addresses,
        routes,
        pid: std::process::id(),
        taken: false,
    })
}

fn is_errno(e: &rtnetlink::Error, errnos: &[i32]) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| errnos.contains(&-c.get())))
}

fn parse_route(s: &SavedRoute) -> Option<RouteMessage> {
    RouteMessage::parse(unhex(&s.netlink)?.as_slice()).ok()
}

fn parse_address(s: &SavedAddress) -> Option<AddressMessage> {
    AddressMessage::parse(unhex(&s.netlink)?.as_slice()).ok()
}

/// Checks that every record of a state file can be replayed.
pub fn validate(state: &StnState, path: &Path) -> Result<(), StnError> {
    let bad = |reason: String| Err(StnError::BadState { path: path.to_owned(), reason });
    if state.version != STATE_VERSION {
        return bad(format!("version {} (this contiv-stn reads {STATE_VERSION})", state.version));
    }
    if let Some(a) = state.addresses.iter().find(|a| parse_address(a).is_none()) {
        return bad(format!("address {} has an unreadable netlink record", a.address));
    }
    if let Some(r) = state.routes.iter().find(|r| parse_route(r).is_none()) {
        return bad(format!("route {} has an unreadable netlink record", r.dst));
    }
    Ok(())
}

/// Removes the recorded routes and addresses from the NIC. Entries already gone are fine.
pub async fn take(h: &Handle, state: &StnState) -> Result<(), StnError> {
    for r in &state.routes {
        let msg = parse_route(r).ok_or_else(|| StnError::BadState {
            path: PathBuf::new(),
            reason: format!("route {} unreadable", r.dst),
        })?;
        match h.route().del(msg).execute().await {
            Ok(()) => {}
            Err(e) if is_errno(&e, &[libc::ESRCH, libc::ENOENT]) => {}
            Err(e) => return Err(nl(format!("removing route {}", r.dst))(e)),
        }
    }
    for a in &state.addresses {
        let msg = parse_address(a).ok_or_else(|| StnError::BadState {
            path: PathBuf::new(),
            reason: format!("address {} unreadable", a.address),
        })?;
        match h.address().del(msg).execute().await {
            Ok(()) => {}
            Err(e) if is_errno(&e, &[libc::EADDRNOTAVAIL, libc::ENOENT, libc::ESRCH]) => {}
            Err(e) => return Err(nl(format!("removing address {}", a.address))(e)),
        }
    }
    // Down, so that DPDK may take the device: VPP skips a PCI device whose host interface is
    // up. (`restore` brings it up again.)
    let (ifindex, _, _, up) = link_info(h, &state.interface).await?;
    if up {
        h.link()
            .set(LinkUnspec::new_with_index(ifindex).down().build())
            .execute()
            .await
            .map_err(nl(format!("setting {} down", state.interface)))?;
    }
    Ok(())
}

/// The NIC's interface again after DPDK had it: the PCI device goes back to its kernel
/// driver, whose interface is given the recorded name if udev has not.
async fn bring_back_netdev(h: &Handle, state: &StnState, pci: &str, driver: &str) -> Result<(), StnError> {
    let rebind_err = |reason: String| StnError::Rebind { pci: pci.to_owned(), driver: driver.to_owned(), reason };
    let (root, p, d) = (pci::pci_root(), pci.to_owned(), driver.to_owned());
    let name = tokio::task::spawn_blocking(move || {
        pci::rebind(&root, &p, &d)?;
        Ok::<_, std::io::Error>(pci::netdev_of(&root, &p, std::time::Duration::from_secs(10)))
    })
    .await
    .map_err(|e| rebind_err(e.to_string()))?
    .map_err(|e| rebind_err(e.to_string()))?
    .ok_or_else(|| rebind_err("no network interface appeared within 10 s".to_owned()))?;
    if name != state.interface {
        let (ifindex, ..) = link_info(h, &name).await?;
        h.link()
            .set(LinkUnspec::new_with_index(ifindex).down().name(state.interface.clone()).build())
            .execute()
            .await
            .map_err(nl(format!("renaming {name} to {}", state.interface)))?;
    }
    Ok(())
}

/// Whether a route goes through a gateway (so the kernel wants that gateway reachable
/// through another route when it is added).
fn has_gateway(r: &RouteMessage) -> bool {
    r.attributes.iter().any(|a| {
        matches!(
            a,
            RouteAttribute::Gateway(_)
                | RouteAttribute::Via(_)
                | RouteAttribute::MultiPath(_)
                | RouteAttribute::NhId(_)
        )
    })
}

/// Adds every item with `add`, in order; what fails is tried again in further passes for as
/// long as a pass adds something (an item may need one that comes after it). Returns what
/// still fails, with the error of its last attempt.
async fn replay_in_passes<T, E, F, Fut>(mut pending: Vec<T>, mut add: F) -> Vec<(T, E)>
where
    F: FnMut(&T) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    loop {
        let tried = pending.len();
        let mut failed = Vec::new();
        for item in pending {
            if let Err(e) = add(&item).await {
                failed.push((item, e));
            }
        }
        if failed.is_empty() || failed.len() == tried {
            return failed;
        }
        pending = failed.into_iter().map(|(item, _)| item).collect();
    }
}

/// Puts the recorded addresses and routes back (replacing what is there; idempotent). The
/// interface is found by name; its index may have changed since.
///
/// Addresses go first, then routes without a gateway (link and on-link routes: the kernel
/// lists `default via 10.128.0.1` before the `10.128.0.1 scope link` route that makes the
/// gateway reachable, and refuses it with ENETUNREACH on its own), then gateway routes;
/// routes that fail are retried in passes while a pass makes progress. A failure does not
/// stop the rest: everything that can come back does, and what could not is reported
/// together in one [`StnError::Restore`].
pub async fn restore(h: &Handle, state: &StnState) -> Result<(), StnError> {
    let found = match link_info(h, &state.interface).await {
        // DPDK's driver may still hold the device (VPP exited): back to the kernel's first.
        Err(StnError::NoSuchInterface(_)) if state.pci_address.is_some() && state.driver.is_some() => {
            let (pci, driver) =
                (state.pci_address.as_deref().unwrap_or_default(), state.driver.as_deref().unwrap_or_default());
            bring_back_netdev(h, state, pci, driver).await?;
            link_info(h, &state.interface).await
        }
        other => other,
    };
    let (ifindex, mac, mtu, up) = found?;
    let mut failures = Vec::new();
    let mut total = state.addresses.len() + state.routes.len();
    // A driver bound anew starts from its defaults: the MTU and MAC the NIC had come back
    // (the link is still down here if it was rebound).
    if let Some(want) = state.mtu
        && mtu != Some(want)
    {
        total += 1;
        if let Err(e) = h.link().set(LinkUnspec::new_with_index(ifindex).mtu(want).build()).execute().await {
            failures.push(format!("setting MTU {want}: {e}"));
        }
    }
    if let Some(want) = &state.mac
        && mac.as_ref() != Some(want)
        && let Some(bytes) = want.split(':').map(|b| u8::from_str_radix(b, 16).ok()).collect::<Option<Vec<u8>>>()
    {
        total += 1;
        if let Err(e) = h.link().set(LinkUnspec::new_with_index(ifindex).address(bytes).build()).execute().await {
            failures.push(format!("setting MAC {want}: {e}"));
        }
    }
    if state.link_up && !up {
        total += 1;
        if let Err(e) = h.link().set(LinkUnspec::new_with_index(ifindex).up().build()).execute().await {
            failures.push(format!("setting the link up: {e}"));
        }
    }
    for a in &state.addresses {
        let Some(mut msg) = parse_address(a) else {
            failures.push(format!("address {}: unreadable record", a.address));
            continue;
        };
        msg.header.index = ifindex;
        let ip = a.address.addr();
        let mut req = h.address().add(ifindex, ip, a.address.prefix_len()).replace();
        *req.message_mut() = msg;
        match req.execute().await {
            Ok(()) => {}
            Err(e) if is_errno(&e, &[libc::EEXIST]) => {}
            Err(e) => failures.push(format!("address {}: {e}", a.address)),
        }
    }
    let mut routes = Vec::new();
    for r in &state.routes {
        let Some(mut msg) = parse_route(r) else {
            failures.push(format!("route {}: unreadable record", r.dst));
            continue;
        };
        for attr in &mut msg.attributes {
            if let RouteAttribute::Oif(i) = attr {
                *i = ifindex;
            }
        }
        routes.push((r, msg));
    }
    // Stable: the recorded order is kept within each group.
    routes.sort_by_key(|(_, msg)| has_gateway(msg));
    let failed = replay_in_passes(routes, |(_, msg): &(&SavedRoute, RouteMessage)| {
        let req = h.route().add(msg.clone()).replace();
        async move {
            match req.execute().await {
                Err(e) if !is_errno(&e, &[libc::EEXIST]) => Err(e),
                _ => Ok(()),
            }
        }
    })
    .await;
    for ((r, _), e) in failed {
        let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        failures.push(format!("route {}{via}: {e}", r.dst));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(StnError::Restore { interface: state.interface.clone(), total, failures })
    }
}

/// Writes the state file atomically (temporary file, fsync, rename, fsync of the directory).
pub fn write_state(path: &Path, state: &StnState) -> Result<(), StnError> {
    let err = |source| StnError::StateFile { path: path.to_owned(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("stn")));
    let text = serde_json::to_vec_pretty(state).expect("state serialises");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a state file; `Ok(None)` if there is none.
pub fn read_state(path: &Path) -> Result<Option<StnState>, StnError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let state: StnState = serde_json::from_slice(&bytes)
                .map_err(|e| StnError::BadState { path: path.to_owned(), reason: e.to_string() })?;
            validate(&state, path)?;
            Ok(Some(state))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StnError::StateFile { path: path.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StnState {
        StnState {
            version: STATE_VERSION,
            interface: "eth0".into(),
            ifindex: 2,
            mac: Some("52:54:00:12:34:56".into()),
            mtu: Some(1500),
            pci_address: Some("0000:00:08.0".into()),
            driver: Some("virtio-pci".into()),
            link_up: true,
            handover: Handover {
                addresses: vec!["192.168.16.1/24".parse().unwrap()],
                routes: vec![HandoverRoute {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gateway: Some([192, 168, 16, 254].into()),
                }],
                mtu: Some(1500),
            },
            addresses: vec![],
            routes: vec![],
            pid: 1,
            taken: true,
        }
    }

    fn route(dst: &str, protocol: RouteProtocol, metric: Option<u32>) -> RouteMessage {
        let net: IpNet = dst.parse().unwrap();
        let mut r = RouteMessage::default();
        r.header.address_family = if net.addr().is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        r.header.destination_prefix_length = net.prefix_len();
        r.header.table = 254;
        r.header.protocol = protocol;
        r.header.kind = RouteType::Unicast;
        r.attributes.push(RouteAttribute::Destination(match net.addr() {
            IpAddr::V4(a) => RouteAddress::Inet(a),
            IpAddr::V6(a) => RouteAddress::Inet6(a),
        }));
        r.attributes.extend(metric.map(RouteAttribute::Priority));
        r
    }

    fn address(a: &str, flags: AddressFlags, metric: Option<u32>) -> AddressMessage {
        let net: IpNet = a.parse().unwrap();
        let mut m = AddressMessage::default();
        m.header.family = if net.addr().is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        m.header.prefix_len = net.prefix_len();
        m.attributes.push(AddressAttribute::Local(net.addr()));
        m.attributes.push(AddressAttribute::Flags(flags));
        m.attributes.extend(metric.map(AddressAttribute::RoutePriority));
        m
    }

    #[test]
    fn only_the_connected_routes_the_kernel_makes_again_are_left_out_of_the_record() {
        use RouteProtocol::{Dhcp, Kernel};
        let none = AddressFlags::empty();
        let plain = [address("192.168.60.2/24", none, None), address("2001:db8:60::2/64", none, None)];
        assert!(kernel_makes_it_again(&route("192.168.60.0/24", Kernel, None), &plain));
        assert!(kernel_makes_it_again(&route("2001:db8:60::/64", Kernel, Some(256)), &plain));
        // Not the kernel's, or not what the kernel would install.
        assert!(!kernel_makes_it_again(&route("192.168.60.0/24", Dhcp, None), &plain));
        assert!(!kernel_makes_it_again(&route("192.168.60.0/24", Kernel, Some(600)), &plain));
        assert!(!kernel_makes_it_again(&route("2001:db8:60::/64", Kernel, Some(100)), &plain));
        assert!(!kernel_makes_it_again(&route("192.168.61.0/24", Kernel, None), &plain), "no such address");
        let mut other_table = route("192.168.60.0/24", Kernel, None);
        other_table.header.table = 100;
        assert!(!kernel_makes_it_again(&other_table, &plain));
        // NetworkManager: noprefixroute addresses, their subnet route as `proto kernel metric 100`.
        let nm = [
            address("192.168.50.2/24", AddressFlags::Noprefixroute, None),
            address("2001:db8:50::2/64", AddressFlags::Noprefixroute, None),
        ];
        assert!(!kernel_makes_it_again(&route("192.168.50.0/24", Kernel, Some(100)), &nm));
        assert!(!kernel_makes_it_again(&route("192.168.50.0/24", Kernel, None), &nm));
        assert!(!kernel_makes_it_again(&route("2001:db8:50::/64", Kernel, Some(100)), &nm));
        // `ip addr add ... metric 50`: the kernel's route has that metric.
        let metric = [address("10.1.0.2/16", none, Some(50))];
        assert!(kernel_makes_it_again(&route("10.1.0.0/16", Kernel, Some(50)), &metric));
        assert!(!kernel_makes_it_again(&route("10.1.0.0/16", Kernel, None), &metric));
        // No prefix route for an IPv4 secondary or a /32.
        assert!(!kernel_makes_it_again(
            &route("192.168.70.0/24", Kernel, None),
            &[address("192.168.70.3/24", AddressFlags::Secondary, None)]
        ));
        assert!(!kernel_makes_it_again(&route("10.128.0.5/32", Kernel, None), &[address("10.128.0.5/32", none, None)]));
    }

    #[test]
    fn failures_are_retried_in_passes_while_they_make_progress() {
        use std::cell::RefCell;
        // "default" needs "gw" (listed after it); "c" needs "default"; "broken" never works.
        let added = RefCell::new(Vec::<&str>::new());
        let tries = RefCell::new(0);
        let failed = futures::executor::block_on(replay_in_passes(vec!["c", "default", "broken", "gw"], |item| {
            *tries.borrow_mut() += 1;
            let needs = match *item {
                "default" => Some("gw"),
                "c" => Some("default"),
                "broken" => Some("nothing"),
                _ => None,
            };
            let ok = needs.is_none_or(|n| added.borrow().contains(&n));
            if ok {
                added.borrow_mut().push(item);
            }
            let item = *item;
            async move { if ok { Ok(()) } else { Err(format!("{item} unreachable")) } }
        }));
        assert_eq!(*added.borrow(), ["gw", "default", "c"]);
        assert_eq!(failed, [("broken", "broken unreachable".to_string())]);
        // 4 tries, then 3 (gw came), 2 (default came), 1 (c came), and no progress: stop.
        assert_eq!(*tries.borrow(), 4 + 3 + 2 + 1);
    }

    #[test]
    fn the_state_file_round_trips_and_is_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/stn.json");
        assert_eq!(read_state(&path).unwrap(), None);
        write_state(&path, &sample()).unwrap();
        let mut second = sample();
        second.pid = 2;
        write_state(&path, &second).unwrap();
        assert_eq!(read_state(&path).unwrap(), Some(second));
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["handover"]["addresses"][0], "192.168.16.1/24");
        assert_eq!(v["handover"]["routes"][0]["gateway"], "192.168.16.254");
    }

    #[test]
    fn a_damaged_state_file_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stn.json");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(read_state(&path), Err(StnError::BadState { .. })));
        let mut s = sample();
        s.routes.push(SavedRoute {
            dst: "10.0.0.0/8".parse().unwrap(),
            gateway: None,
            table: 254,
            metric: None,
            netlink: "zz".into(),
        });
        std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
        let err = read_state(&path).unwrap_err().to_string();
        assert!(err.contains("10.0.0.0/8"), "{err}");
        s.routes.clear();
        s.version = 99;
        std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
        assert!(read_state(&path).unwrap_err().to_string().contains("version 99"));
    }
}
