//! `uplink = "vpp"`: the host's address in the pod subnet, on the host's side of the tap.
//!
//! The host reaches VPP through the tap whose Linux end (`vpp1`) has the host interconnect
//! address, 172.30.255.2 by default, the same on every node. Traffic from the host to
//! another node's pods leaves VPP through a tunnel untranslated (NAT44 translates only
//! what leaves through the uplink), so with that source the answer would go to the
//! answering node's own host, and the tunnel's input ACL there drops it anyway. So the
//! host gets an address of its node's pod subnet that no pod holds
//! ([`crate::state::NodeState::host_address`]) and sends its traffic to the cluster's pods
//! from it, as Calico's nodes do from their tunnel address: the peer's tunnel ACL admits
//! it (it is of this node's pod subnet), the peer's pods answer it through the tunnel
//! like any pod of this node, and VPP routes it to the host through the tap (the backend's
//! `NodeInputs::host_pod_address`).
//!
//! On the host, [`ensure`] keeps:
//! - the address as a /32 of scope link on the tap's Linux end: the kernel picks a
//!   link-scope address of another interface for no route of its own, so the host's
//!   traffic to its own pods (their /32 routes) and to the outside keeps its addresses.
//!   The agent owns the /32 link-scope addresses there (VPP gives the tap the
//!   interconnect's /30) and removes any other;
//! - routes to the cluster's pod range, and to other nodes' pod subnets outside it, via
//!   VPP's end of the interconnect with that address as their preferred source, of
//!   protocol [`RTPROT_CONTIV_HOST`] (the apply loop owns the routes of `RTPROT_CONTIV` and
//!   would remove them). The node's own pods keep their more specific routes to their veths;
//! - `arp_announce = 2` on the tap's Linux end: the host's ARP requests for VPP's end then
//!   name the interconnect address as their sender, not the address of the packet that
//!   waits for the answer; VPP answers only a sender on the interface's own subnet.
//!
//! VPP creates the tap, and a VPP restart re-creates it without them: the agent calls
//! [`ensure`] after every reconcile pass. Without an address (none was left in the pod
//! subnet), [`ensure`] removes what an earlier agent put there.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressScope},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol},
    },
};

use crate::podnet;

/// The route protocol of the host's routes to the cluster's pods (`ip route` shows it as
/// `proto 85`).
pub const RTPROT_CONTIV_HOST: u8 = 85;

/// What the host's side must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSide {
    /// The tap's Linux end (`[vpp] hostIfName`).
    pub ifname: String,
    /// The host's address in the pod subnet; None: nothing of ours stays.
    pub address: Option<Ipv4Addr>,
    /// VPP's end of the host interconnect.
    pub via: Ipv4Addr,
    /// Where the host's traffic leaves from the address ([`destinations`]).
    pub destinations: Vec<Ipv4Net>,
    /// The routes' MTU: the pods' (what fits in VPP's tunnels), not the tap's 1500.
    pub mtu: u32,
}

/// The cluster's pod range and the other nodes' pod subnets outside it.
pub fn destinations(cluster_pod_cidr: Ipv4Net, remote_subnets: impl IntoIterator<Item = Ipv4Net>) -> Vec<Ipv4Net> {
    let cluster = cluster_pod_cidr.trunc();
    let mut out = vec![cluster];
    out.extend(remote_subnets.into_iter().map(|s| s.trunc()).filter(|s| !cluster.contains(s)));
    out.sort();
    out.dedup();
    out
}

/// What one [`ensure`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The tap is not there (VPP has not created it yet).
    NoInterface,
    /// Everything was in place.
    Unchanged,
    /// What was changed.
    Changed(Vec<String>),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> anyhow::Error {
    let what = what.into();
    move |e| anyhow::anyhow!("{what}: {e}")
}

/// Puts the host's address, its routes and `arp_announce` on the tap's Linux end, and
/// removes our stale ones (another /32 of scope link there, another route of our
/// protocol). `sysctl` sets a sysctl (`net/ipv4/...`, relative to `/proc/sys`) in the
/// namespace of `h`.
pub async fn ensure(
    h: &Handle,
    want: &HostSide,
    sysctl: &(dyn Fn(&str, &str) -> Result<(), String> + Sync),
) -> anyhow::Result<Ensured> {
    let Some(link) = podnet::link_by_name(h, &want.ifname).await? else {
        return Ok(Ensured::NoInterface);
    };
    let index = link.header.index;
    let mut changed = Vec::new();

    if want.address.is_some() {
        sysctl(&format!("net/ipv4/conf/{}/arp_announce", want.ifname), "2").map_err(anyhow::Error::msg)?;
    }

    // The address: the /32s of scope link there are ours.
    let mut have = false;
    let mut stale = Vec::new();
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = addrs.try_next().await.map_err(nl(format!("listing the addresses of {}", want.ifname)))? {
        let Some(addr) = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(a)) => Some(*a),
            _ => None,
        }) else {
            continue;
        };
        if msg.header.prefix_len != 32 || msg.header.scope != AddressScope::Link {
            continue;
        }
        if want.address == Some(addr) {
            have = true;
        } else {
            stale.push((addr, msg));
        }
    }
    for (addr, msg) in stale {
        let what = format!("{addr}/32 from {}", want.ifname);
        h.address().del(msg).execute().await.map_err(nl(format!("removing {what}")))?;
        changed.push(format!("removed {what}"));
    }
    if let Some(address) = want.address
        && !have
    {
        let mut add = h.address().add(index, IpAddr::V4(address), 32).replace();
        add.message_mut().header.scope = AddressScope::Link;
        add.execute().await.map_err(nl(format!("adding {address}/32 to {}", want.ifname)))?;
        changed.push(format!("address {address}/32 scope link on {}", want.ifname));
    }

    // The routes (read after the addresses: removing an address takes its routes along).
    let wanted: Vec<RouteMessage> = match want.address {
        Some(src) => want.destinations.iter().map(|d| route_message(index, *d, want, src)).collect(),
        None => Vec::new(),
    };
    let mut ours = Vec::new();
    let mut routes = h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
        if r.header.protocol == RouteProtocol::Other(RTPROT_CONTIV_HOST) {
            ours.push(r);
        }
    }
    for r in ours.iter().filter(|r| !wanted.iter().any(|w| same_route(r, w))) {
        let what = format!("route to {}", route_dst(r));
        match h.route().del(r.clone()).execute().await {
            Ok(()) => changed.push(format!("removed {what}")),
            Err(e) if podnet::is_errno(&e, &[libc::ESRCH]) => {}
            Err(e) => return Err(nl(format!("removing {what}"))(e)),
        }
    }
    for w in wanted.into_iter().filter(|w| !ours.iter().any(|r| same_route(r, w))) {
        let what = format!("route to {} via {} dev {} src {:?}", route_dst(&w), want.via, want.ifname, want.address);
        h.route().add(w).replace().execute().await.map_err(nl(format!("adding the {what}")))?;
        changed.push(what);
    }
    Ok(if changed.is_empty() { Ensured::Unchanged } else { Ensured::Changed(changed) })
}

fn route_dst(r: &RouteMessage) -> String {
    let dst = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
        _ => None,
    });
    format!("{}/{}", dst.unwrap_or(Ipv4Addr::UNSPECIFIED), r.header.destination_prefix_length)
}

fn route_message(index: u32, dst: Ipv4Net, want: &HostSide, src: Ipv4Addr) -> RouteMessage {
    let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .gateway(want.via)
        .output_interface(index)
        .pref_source(src)
        .protocol(RouteProtocol::Other(RTPROT_CONTIV_HOST))
        .build();
    msg.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(want.mtu)]));
    msg
}

/// Same destination, gateway, interface, preferred source and MTU (the kernel adds
/// attributes of its own, such as the table).
fn same_route(have: &RouteMessage, want: &RouteMessage) -> bool {
    let key = |m: &RouteMessage| {
        let mut k: Vec<String> = m
            .attributes
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    RouteAttribute::Destination(RouteAddress::Inet(_))
                        | RouteAttribute::Gateway(RouteAddress::Inet(_))
                        | RouteAttribute::Oif(_)
                        | RouteAttribute::PrefSource(RouteAddress::Inet(_))
                        | RouteAttribute::Metrics(_)
                )
            })
            .map(|a| format!("{a:?}"))
            .collect();
        k.sort();
        (m.header.address_family == AddressFamily::Inet, m.header.destination_prefix_length, k)
    };
    key(have) == key(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testnetns::{TestNetns, ip};

    /// A stand-in for the tap VPP creates: a veth end with the interconnect address.
    fn tap(ns: &str) {
        ip(ns, &["link", "add", "vpp1", "type", "veth", "peer", "name", "vpp1p"]);
        for dev in ["vpp1", "vpp1p"] {
            ip(ns, &["link", "set", dev, "up"]);
        }
        ip(ns, &["addr", "add", "172.30.255.2/30", "dev", "vpp1"]);
    }

    /// What is not ours on the host: its default route via VPP, an address of global scope
    /// in the pod range, a route of another protocol (all go with the tap).
    fn others(ns: &str) {
        ip(ns, &["route", "add", "default", "via", "172.30.255.1"]);
        ip(ns, &["addr", "add", "10.1.9.9/32", "dev", "vpp1"]);
        ip(ns, &["route", "add", "10.1.8.0/24", "via", "172.30.255.1", "proto", "static"]);
    }

    /// Sets sysctls in the namespace `ns` (a thread that entered it opens the file: a net
    /// sysctl acts on the namespace of whoever opens it).
    fn sysctl_in(ns: &str) -> impl Fn(&str, &str) -> Result<(), String> + Sync {
        let path = format!("/run/netns/{ns}");
        move |rel: &str, value: &str| {
            let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            std::thread::scope(|s| {
                s.spawn(|| {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
                    crate::sysctl::set_in(std::path::Path::new("/proc/sys"), rel, value).map_err(|e| e.to_string())
                })
                .join()
                .expect("sysctl thread")
            })
        }
    }

    /// Root: the address, routes and `arp_announce` are put in place once, kept, put back
    /// after the tap is re-created (a VPP restart), and follow a new address and new
    /// destinations; only our addresses and routes are removed, and all of them once there
    /// is no address. The host's traffic to its own pods and to the outside keeps its
    /// source, to other nodes' pods it takes the address.
    #[tokio::test]
    async fn the_hosts_pod_address_and_routes_are_kept_on_the_tap() {
        let ns = TestNetns::new("cvh");
        let path = ns.path();
        let file = podnet::open_netns(&path).expect("the namespace");
        let h = podnet::netns_handle(&file, &path).await.expect("netlink in the namespace");
        let sysctl = sysctl_in(&ns.0);
        let cluster: Ipv4Net = "10.1.0.0/16".parse().unwrap();
        let mut want = HostSide {
            ifname: "vpp1".into(),
            address: Some(Ipv4Addr::new(10, 1, 1, 254)),
            via: Ipv4Addr::new(172, 30, 255, 1),
            destinations: destinations(cluster, ["10.1.2.0/24".parse().unwrap()]),
            mtu: 1450,
        };
        assert_eq!(want.destinations, [cluster], "a remote subnet inside the range needs no route of its own");
        assert_eq!(ensure(&h, &want, &sysctl).await.unwrap(), Ensured::NoInterface, "before VPP made its tap");

        tap(&ns.0);
        // A local pod's route, as the apply loop installs it.
        ip(&ns.0, &["link", "add", "cv0", "type", "veth", "peer", "name", "cv0p"]);
        ip(&ns.0, &["link", "set", "cv0", "up"]);
        ip(&ns.0, &["route", "add", "10.1.1.5/32", "dev", "cv0", "scope", "link"]);
        others(&ns.0);
        let first = ensure(&h, &want, &sysctl).await.unwrap();
        assert!(matches!(&first, Ensured::Changed(c) if c.len() == 2), "{first:?}");
        assert_eq!(ensure(&h, &want, &sysctl).await.unwrap(), Ensured::Unchanged, "a second pass changes nothing");
        let source = |dst: &str| {
            let out = ip(&ns.0, &["route", "get", dst]);
            out.split_whitespace().skip_while(|w| *w != "src").nth(1).unwrap_or_default().to_owned()
        };
        assert_eq!(source("10.1.2.7"), "10.1.1.254", "another node's pod");
        assert_eq!(source("10.1.1.5"), "172.30.255.2", "a pod of this node");
        assert_eq!(source("192.0.2.9"), "172.30.255.2", "the outside");
        let routes = ip(&ns.0, &["route", "show", "proto", "85"]);
        assert!(routes.contains("10.1.0.0/16 via 172.30.255.1 dev vpp1") && routes.contains("mtu 1450"), "{routes}");
        let announce = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0, "cat", "/proc/sys/net/ipv4/conf/vpp1/arp_announce"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&announce.stdout).trim(), "2");

        // A VPP restart re-creates the tap without them.
        ip(&ns.0, &["link", "del", "vpp1"]);
        tap(&ns.0);
        others(&ns.0);
        assert!(matches!(ensure(&h, &want, &sysctl).await.unwrap(), Ensured::Changed(c) if c.len() == 2));
        assert_eq!(source("10.1.2.7"), "10.1.1.254");

        // A new address (another pod subnet) and a node whose subnet is outside the range.
        want.address = Some(Ipv4Addr::new(10, 1, 7, 254));
        want.destinations = destinations(cluster, ["10.9.3.0/24".parse().unwrap()]);
        let changed = ensure(&h, &want, &sysctl).await.unwrap();
        assert!(matches!(&changed, Ensured::Changed(c) if c[0] == "removed 10.1.1.254/32 from vpp1"), "{changed:?}");
        assert_eq!(source("10.1.2.7"), "10.1.7.254");
        assert_eq!(source("10.9.3.7"), "10.1.7.254", "a pod subnet outside the range");
        let addrs = ip(&ns.0, &["-4", "-o", "addr", "show", "dev", "vpp1"]);
        assert!(!addrs.contains("10.1.1.254") && addrs.contains("10.1.7.254/32 scope link"), "{addrs}");
        assert_eq!(ip(&ns.0, &["route", "show", "proto", "85"]).lines().count(), 2);
        assert_eq!(ensure(&h, &want, &sysctl).await.unwrap(), Ensured::Unchanged);

        // No address any more: ours go, the rest stays.
        want.address = None;
        assert!(matches!(ensure(&h, &want, &sysctl).await.unwrap(), Ensured::Changed(_)));
        assert_eq!(ip(&ns.0, &["route", "show", "proto", "85"]), "");
        let addrs = ip(&ns.0, &["-4", "-o", "addr", "show", "dev", "vpp1"]);
        assert!(!addrs.contains("10.1.7.254") && addrs.contains("10.1.9.9/32") && addrs.contains("172.30.255.2/30"));
        assert!(ip(&ns.0, &["route", "show", "proto", "static"]).contains("10.1.8.0/24"));
        assert_eq!(source("10.1.2.7"), "172.30.255.2");
    }
}
