//! The node's wire in `kernel` uplink mode: finds the uplink (its address is the node's
//! underlay address, its MTU bounds the pods'), prepares the node's stack for routing pod
//! traffic, and creates the one flow-based VXLAN device the eBPF datapath encapsulates into.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkFlags},
        route::RouteAttribute,
    },
};

use crate::{
    config::{AgentConfig, OverlayConfig, VXLAN_OVERHEAD},
    podnet,
};

/// The node's uplink as found (or configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub ifname: String,
    pub ifindex: u32,
    pub mtu: u32,
    /// The node's underlay address.
    pub node_ip: Ipv4Addr,
}

/// The overlay device as created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub ifname: String,
    pub ifindex: u32,
    /// The device's MTU: the uplink's minus the encapsulation.
    pub mtu: u32,
}

/// Errors finding the uplink or building the overlay.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink interface {0} not found")]
    NoSuchInterface(String),
    #[error("uplink interface {0} has no IPv4 address (set nodeIP)")]
    NoAddress(String),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error(transparent)]
    PodNet(#[from] podnet::PodNetError),
    #[error(transparent)]
    Sysctl(#[from] crate::sysctl::SysctlError),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> UplinkError {
    let what = what.into();
    move |source| UplinkError::Netlink { what, source }
}

/// The uplink: `uplinkInterface` from the config, else the interface holding `nodeIP`, else
/// the interface of the default route; `None` when there is none (a single node: no
/// overlay, no masquerade).
pub async fn find(node: &Handle, config: &AgentConfig) -> Result<Option<Uplink>, UplinkError> {
    let Some(ifname) = uplink_name(node, config.uplink_interface.as_deref(), config.node_ip).await? else {
        return Ok(None);
    };
    let link =
        podnet::link_by_name(node, &ifname).await?.ok_or_else(|| UplinkError::NoSuchInterface(ifname.clone()))?;
    let mtu = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(1500);
    let node_ip = match config.node_ip {
        Some(ip) => ip,
        None => first_ipv4(node, link.header.index).await?.ok_or_else(|| UplinkError::NoAddress(ifname.clone()))?,
    };
    Ok(Some(Uplink { ifname, ifindex: link.header.index, mtu, node_ip }))
}

/// Whether the uplink still holds the node IP the agent started with (a DHCP change, an
/// address moved to a bridge: the routes with that source are gone, and other nodes still
/// send this node's pods' traffic there).
pub async fn holds_node_ip(node: &Handle, uplink: &Uplink) -> Result<bool, UplinkError> {
    let mut addrs = node.address().get().set_link_index_filter(uplink.ifindex).execute();
    while let Some(msg) = addrs.try_next().await.map_err(nl("listing addresses"))? {
        if msg.header.index == uplink.ifindex
            && msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == uplink.node_ip))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Every IPv4 address of the node, with the index of the interface that holds it and its
/// label (the interface's name, or an alias).
pub async fn node_addresses(node: &Handle) -> Result<Vec<(u32, Ipv4Addr, String)>, UplinkError> {
    let mut addrs = node.address().get().execute();
    let mut out = vec![];
    while let Some(msg) = addrs.try_next().await.map_err(nl("listing addresses"))? {
        let label = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Label(l) => Some(l.clone()),
            _ => None,
        });
        for a in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                out.push((msg.header.index, *ip, label.clone().unwrap_or_default()));
            }
        }
    }
    Ok(out)
}

/// The addresses that answer NodePorts (`takes`) but sit on another interface than the
/// uplink's (`held`: every address with its interface's index): clients outside reach
/// NodePorts only through the uplink, where `tc_from_uplink` runs. Loopback addresses are
/// left out (no client outside reaches them).
pub fn node_ports_off_uplink(
    held: &[(u32, Ipv4Addr, String)],
    takes: &std::collections::BTreeSet<Ipv4Addr>,
    uplink_ifindex: u32,
) -> Vec<(u32, Ipv4Addr, String)> {
    let mut off: Vec<(u32, Ipv4Addr, String)> = held
        .iter()
        .filter(|(i, ip, _)| *i != uplink_ifindex && !ip.is_loopback() && takes.contains(ip))
        .cloned()
        .collect();
    off.sort_unstable();
    off.dedup();
    off
}

/// The uplink's name. With `nodeIP` alone, the interface that holds it (a node with its
/// default route on one NIC and the cluster network on another, as kubelet's `--node-ip`
/// names): the overlay's packets carry that address as their source and leave through the
/// uplink, so they must leave where it lives. An address on loopback or on no interface
/// (routed to the node) leaves the choice to the default route.
async fn uplink_name(
    node: &Handle,
    configured: Option<&str>,
    node_ip: Option<Ipv4Addr>,
) -> Result<Option<String>, UplinkError> {
    if let Some(name) = configured {
        return Ok(Some(name.to_owned()));
    }
    if let Some(ip) = node_ip {
        let holder = node_addresses(node).await?.into_iter().find(|(_, a, _)| *a == ip).map(|(index, ..)| index);
        let link = match holder {
            Some(index) => {
                let mut links = node.link().get().match_index(index).execute();
                links.try_next().await.map_err(nl("looking up the interface holding nodeIP"))?
            }
            None => None,
        };
        match link {
            Some(l) if !l.header.flags.contains(LinkFlags::Loopback) => {
                if let Some(name) = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                }) {
                    return Ok(Some(name));
                }
            }
            Some(_) => log::info!("nodeIP {ip} is on loopback: the uplink is the default route's interface"),
            None => log::warn!("no interface holds nodeIP {ip}: the uplink is the default route's interface"),
        }
    }
    default_route_interface(node).await
}

async fn default_route_interface(node: &Handle) -> Result<Option<String>, UplinkError> {
    let mut routes = node.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    let mut oif = None;
    while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
        if r.header.destination_prefix_length == 0 && r.header.table == 254 {
            // A multipath (ECMP) default route names its interfaces in its next hops: the
            // first one's.
            oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
                _ => None,
            });
            if oif.is_some() {
                break;
            }
        }
    }
    let Some(index) = oif else { return Ok(None) };
    let mut links = node.link().get().match_index(index).execute();
    let link = links.try_next().await.map_err(nl("looking up the default route's interface"))?;
    Ok(link.and_then(|l| {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
    }))
}

async fn first_ipv4(node: &Handle, index: u32) -> Result<Option<Ipv4Addr>, UplinkError> {
    let mut addrs = node.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = addrs.try_next().await.map_err(nl("listing addresses"))? {
        for a in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                return Ok(Some(*ip));
            }
        }
    }
    Ok(None)
}

/// The node's stack routes pod traffic (to the outside, and replies back to pods); its
/// own sockets never pick a port the datapath owns as their ephemeral port.
pub fn enable_forwarding() -> Result<(), UplinkError> {
    crate::sysctl::set("net/ipv4/ip_forward", "1")?;
    if let Err(e) = crate::sysctl::reserve_ports(&crate::sysctl::DATAPATH_PORTS) {
        log::warn!("{e}: the node's own connections may take a NodePort or SNAT flow's port");
    }
    Ok(())
}

/// Creates (or re-creates, if its settings differ) the flow-based VXLAN device: collect_md,
/// no learning, NOARP (routes point at it without a gateway), MTU = uplink MTU - 50.
pub async fn ensure_overlay(node: &Handle, cfg: &OverlayConfig, uplink: &Uplink) -> Result<Overlay, UplinkError> {
    let mtu = uplink.mtu.saturating_sub(VXLAN_OVERHEAD);
    if let Some(existing) = podnet::link_by_name(node, &cfg.ifname).await? {
        // Reused across agent restarts: its links and routes stay in place. The port and
        // mode are checked; a device of another kind or port is replaced.
        if overlay_matches(&existing, cfg) {
            node.link()
                .set(LinkUnspec::new_with_index(existing.header.index).mtu(mtu).arp(false).up().build())
                .execute()
                .await
                .map_err(nl(format!("setting up {}", cfg.ifname)))?;
            return Ok(Overlay { ifname: cfg.ifname.clone(), ifindex: existing.header.index, mtu });
        }
        log::warn!("{} exists with other settings; re-creating it", cfg.ifname);
        podnet::delete_link(node, &cfg.ifname).await?;
    }
    node.link()
        .add(
            // VNI 0 on the device: a collect_md device receives every VNI (the kernel looks
            // flow-based devices up under VNI 0); each packet carries its VNI in its tunnel key.
            LinkVxlan::new(&cfg.ifname, 0).collect_metadata(true).learning(false).port(cfg.port).mtu(mtu).build(),
        )
        .execute()
        .await
        .map_err(nl(format!("creating the VXLAN device {} (port {})", cfg.ifname, cfg.port)))?;
    let _ = crate::sysctl::set(&format!("net/ipv6/conf/{}/disable_ipv6", cfg.ifname), "1");
    let link = podnet::link_by_name(node, &cfg.ifname)
        .await?
        .ok_or_else(|| UplinkError::NoSuchInterface(cfg.ifname.clone()))?;
    node.link()
        .set(LinkUnspec::new_with_index(link.header.index).arp(false).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {} up", cfg.ifname)))?;
    Ok(Overlay { ifname: cfg.ifname.clone(), ifindex: link.header.index, mtu })
}

fn overlay_matches(link: &rtnetlink::packet_route::link::LinkMessage, cfg: &OverlayConfig) -> bool {
    use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkInfo};
    let Some(infos) = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    }) else {
        return false;
    };
    infos.iter().any(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(v)) => {
            v.iter().any(|x| matches!(x, InfoVxlan::CollectMetadata(true)))
                && v.iter().any(|x| matches!(x, InfoVxlan::Port(p) if *p == cfg.port))
                && v.iter().any(|x| matches!(x, InfoVxlan::Id(0)))
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_ports_off_the_uplink_are_the_other_interfaces_addresses_that_take_them() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let at = |i: u32, s: &str, l: &str| (i, ip(s), l.to_owned());
        let held = [
            at(2, "192.168.100.11", "eth0"),
            at(3, "10.0.0.7", "eth1"),
            at(3, "10.0.0.8", "eth1"),
            at(1, "127.0.0.1", "lo"),
        ];
        let takes = [ip("192.168.100.11"), ip("10.0.0.7"), ip("127.0.0.1")].into();
        assert_eq!(node_ports_off_uplink(&held, &takes, 2), vec![at(3, "10.0.0.7", "eth1")]);
        assert!(node_ports_off_uplink(&held[..1], &takes, 2).is_empty());
    }

    use super::*;
    use crate::testnetns::{TestNetns, ip};

    /// Root: a network namespace with two NICs and a multipath default route through both.
    #[tokio::test]
    async fn the_uplink_is_the_named_one_else_the_node_ips_else_the_default_routes_first_hop() {
        let ns = TestNetns::new("ctu");
        for (dev, addr) in [("up0", "192.0.2.10/24"), ("up1", "198.51.100.10/24")] {
            let peer = format!("{dev}p");
            ip(&ns.0, &["link", "add", dev, "type", "veth", "peer", "name", &peer]);
            ip(&ns.0, &["link", "set", dev, "up"]);
            ip(&ns.0, &["link", "set", &peer, "up"]);
            ip(&ns.0, &["addr", "add", addr, "dev", dev]);
        }
        ip(
            &ns.0,
            &[
                "route",
                "add",
                "default",
                "nexthop",
                "via",
                "192.0.2.1",
                "dev",
                "up0",
                "nexthop",
                "via",
                "198.51.100.1",
                "dev",
                "up1",
            ],
        );
        let path = ns.path();
        let file = podnet::open_netns(&path).expect("the namespace");
        let handle = podnet::netns_handle(&file, &path).await.expect("netlink in the namespace");
        assert_eq!(default_route_interface(&handle).await.unwrap().as_deref(), Some("up0"));
        // `nodeIP` alone: the interface holding it, not the default route's.
        let on_up1 = Some(Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(uplink_name(&handle, None, on_up1).await.unwrap().as_deref(), Some("up1"));
        assert_eq!(uplink_name(&handle, Some("up0"), on_up1).await.unwrap().as_deref(), Some("up0"), "named wins");
        // On loopback or nowhere: the default route's.
        ip(&ns.0, &["addr", "add", "203.0.113.5/32", "dev", "lo"]);
        for elsewhere in [Ipv4Addr::new(203, 0, 113, 5), Ipv4Addr::new(203, 0, 113, 6)] {
            assert_eq!(uplink_name(&handle, None, Some(elsewhere)).await.unwrap().as_deref(), Some("up0"));
        }
    }
}
