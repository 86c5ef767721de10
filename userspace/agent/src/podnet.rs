//! Pod interfaces over rtnetlink: a veth pair per attachment, host end in the node's
//! namespace, pod end moved into the pod's namespace, renamed to CNI_IFNAME and given
//! a /32 address, a scope-link route to the gateway, a default route via it and a
//! permanent neighbour entry for it.
//!
//! Work inside a pod's namespace happens on a short-lived thread that enters the
//! namespace (setns only affects that thread) with its own netlink socket; the
//! agent's threads never change namespace.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use futures::TryStreamExt;

use crate::bandwidth::Shaper;
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        link::{LinkAttribute, LinkMessage},
        neighbour::NeighbourState,
        route::RouteScope,
    },
};

/// Errors while wiring or unwiring a pod interface.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// The pod's network namespace could not be opened or entered.
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// The interface name asked for already exists in the pod.
    #[error("interface {0} already exists in the pod's namespace")]
    IfnameTaken(String),
    /// An interface expected to exist does not.
    #[error("interface {0} not found")]
    NotFound(String),
    /// The namespace worker thread failed.
    #[error("namespace worker: {0}")]
    Worker(String),
}

type Result<T, E = PodNetError> = std::result::Result<T, E>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> PodNetError {
    let what = what.into();
    move |source| PodNetError::Netlink { what, source }
}

/// What ADD needs to wire a pod.
#[derive(Debug, Clone)]
pub struct PodLinkSpec {
    pub netns: PathBuf,
    pub ifname: String,
    pub host_ifname: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub gateway_mac: [u8; 6],
    pub mtu: u32,
    /// Shapes what the pod sends (a `tbf` root qdisc on the pod's interface).
    pub egress_shaper: Option<Shaper>,
    /// Shapes what the pod receives (a `tbf` root qdisc on the host veth).
    pub ingress_shaper: Option<Shaper>,
}

/// The result of wiring a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

/// What the pod's side looks like now (for CHECK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSideView {
    pub mac: [u8; 6],
    pub up: bool,
    pub addresses: Vec<(Ipv4Addr, u8)>,
    pub has_default_route_via_gateway: bool,
}

/// Name of the host end of a pod's veth: stable for (container, ifname), <= 15 bytes.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("cv{}", &hex[..11])
}

/// Opens a netlink connection in the current thread's namespace.
fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| PodNetError::Worker(e.to_string()))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Runs `f` with a netlink handle opened inside the namespace at `netns`.
pub async fn in_netns<F, Fut, T>(netns: &Path, f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let ns_file = std::fs::File::open(netns).map_err(|source| PodNetError::Netns { path: netns.to_owned(), source })?;
    let path = netns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-worker".into())
        .spawn(move || {
            let run = || -> Result<T> {
                nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| PodNetError::Netns { path: path.clone(), source: std::io::Error::from(e) })?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| PodNetError::Worker(e.to_string()))?;
                rt.block_on(async move {
                    let handle = connect()?;
                    f(handle).await
                })
            };
            let _ = tx.send(run());
        })
        .map_err(|e| PodNetError::Worker(e.to_string()))?;
    rx.await.map_err(|_| PodNetError::Worker("namespace worker died".into()))?
}

/// Looks a link up by name; `None` if it does not exist.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.code.map(|c| c.get()) == Some(-libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("looking up {name}"))(e)),
    }
}

/// MAC address of a link message.
pub fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(addr) if addr.len() == 6 => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(addr);
            Some(mac)
        }
        _ => None,
    })
}

/// Creates the veth pair and configures both ends. On error, whatever was created is removed.
pub async fn create_pod_link(node: &Handle, spec: &PodLinkSpec) -> Result<PodLink> {
    // The pod's interface name must be free in its namespace before we build anything.
    let ifname = spec.ifname.clone();
    let taken = in_netns(&spec.netns, move |h| async move { Ok(link_by_name(&h, &ifname).await?.is_some()) }).await?;
    if taken {
        return Err(PodNetError::IfnameTaken(spec.ifname.clone()));
    }
    // A leftover host end from an earlier, interrupted attempt would block the name.
    delete_link(node, &spec.host_ifname).await?;
    let result = wire(node, spec).await;
    if result.is_err()
        && let Err(e) = delete_link(node, &spec.host_ifname).await
    {
        log::warn!("cleaning up {} after a failed ADD: {e}", spec.host_ifname);
    }
    result
}

async fn wire(node: &Handle, spec: &PodLinkSpec) -> Result<PodLink> {
    // Temporary peer name in the node namespace; renamed to CNI_IFNAME inside the pod.
    let peer_tmp = format!("cvp{}", &spec.host_ifname[2..]);
    node.link()
        .add(LinkVeth::new(&spec.host_ifname, &peer_tmp).mtu(spec.mtu).build())
        .execute()
        .await
        .map_err(nl(format!("creating veth {}", spec.host_ifname)))?;
    let host =
        link_by_name(node, &spec.host_ifname).await?.ok_or_else(|| PodNetError::NotFound(spec.host_ifname.clone()))?;
    let peer = link_by_name(node, &peer_tmp).await?.ok_or_else(|| PodNetError::NotFound(peer_tmp.clone()))?;
    let ns_file =
        std::fs::File::open(&spec.netns).map_err(|source| PodNetError::Netns { path: spec.netns.clone(), source })?;
    node.link()
        .set(LinkUnspec::new_with_index(peer.header.index).setns_by_fd(ns_file.as_raw_fd()).build())
        .execute()
        .await
        .map_err(nl("moving the pod end into its namespace"))?;
    drop(ns_file);

    let s = spec.clone();
    let pod_mac = in_netns(&spec.netns, move |h| async move { configure_pod_side(&h, &peer_tmp, &s).await }).await?;

    if let Some(shaper) = spec.ingress_shaper {
        set_tbf_root(node, host.header.index, shaper).await?;
    }
    node.link()
        .set(LinkUnspec::new_with_index(host.header.index).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {} up", spec.host_ifname)))?;
    Ok(PodLink { host_ifindex: host.header.index, host_mac: link_mac(&host).unwrap_or_default(), pod_mac })
}

async fn configure_pod_side(h: &Handle, tmp_name: &str, spec: &PodLinkSpec) -> Result<[u8; 6]> {
    let link = link_by_name(h, tmp_name).await?.ok_or_else(|| PodNetError::NotFound(tmp_name.to_owned()))?;
    let index = link.header.index;
    h.link()
        .set(LinkUnspec::new_with_index(index).name(spec.ifname.clone()).mtu(spec.mtu).build())
        .execute()
        .await
        .map_err(nl(format!("renaming the pod end to {}", spec.ifname)))?;
    if let Some(shaper) = spec.egress_shaper {
        set_tbf_root(h, index, shaper).await?;
    }
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {} up", spec.ifname)))?;
    h.address().add(index, IpAddr::V4(spec.ip), 32).execute().await.map_err(nl(format!("adding {}/32", spec.ip)))?;
    h.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(spec.gateway, 32)
                .output_interface(index)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("adding the route to gateway {}", spec.gateway)))?;
    h.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .gateway(spec.gateway)
                .output_interface(index)
                .build(),
        )
        .execute()
        .await
        .map_err(nl("adding the default route"))?;
    h.neighbours()
        .add(index, IpAddr::V4(spec.gateway))
        .link_layer_address(&spec.gateway_mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(nl("adding the gateway's neighbour entry"))?;
    let link = link_by_name(h, &spec.ifname).await?.ok_or_else(|| PodNetError::NotFound(spec.ifname.clone()))?;
    link_mac(&link).ok_or_else(|| PodNetError::NotFound(format!("MAC of {}", spec.ifname)))
}

/// Makes a `tbf` qdisc with these parameters the root qdisc of a link (create or replace).
pub async fn set_tbf_root(h: &Handle, index: u32, shaper: Shaper) -> Result<()> {
    use rtnetlink::packet_core::{
        DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    };
    use rtnetlink::packet_route::{
        RouteNetlinkMessage,
        tc::{TcAttribute, TcHandle, TcMessage, TcOption},
    };
    // linux/pkt_sched.h: TCA_TBF_PARMS = 1 (struct tc_tbf_qopt), TCA_TBF_RATE64 = 4,
    // TCA_TBF_BURST = 6 (bytes; the kernel derives the bucket from it and the rate).
    const TCA_TBF_PARMS: u16 = 1;
    const TCA_TBF_RATE64: u16 = 4;
    const TCA_TBF_BURST: u16 = 6;
    const TC_LINKLAYER_ETHERNET: u8 = 1;
    // struct tc_tbf_qopt { tc_ratespec rate, peakrate; u32 limit, buffer, mtu } in host order;
    // tc_ratespec { u8 cell_log, u8 linklayer, u16 overhead, i16 cell_align, u16 mpu, u32 rate }.
    let mut qopt = Vec::with_capacity(36);
    qopt.extend_from_slice(&[0, TC_LINKLAYER_ETHERNET]);
    qopt.extend_from_slice(&[0; 6]);
    qopt.extend_from_slice(&(shaper.rate_bytes_per_sec.min(u64::from(u32::MAX)) as u32).to_ne_bytes());
    qopt.extend_from_slice(&[0; 12]); // no peak rate
    qopt.extend_from_slice(&shaper.limit_bytes.to_ne_bytes());
    qopt.extend_from_slice(&[0; 4]); // buffer: from TCA_TBF_BURST
    qopt.extend_from_slice(&[0; 4]); // mtu
    let mut options = vec![
        TcOption::Other(DefaultNla::new(TCA_TBF_PARMS, qopt)),
        TcOption::Other(DefaultNla::new(TCA_TBF_BURST, shaper.burst_bytes.to_ne_bytes().to_vec())),
    ];
    if shaper.rate_bytes_per_sec > u64::from(u32::MAX) {
        options
            .push(TcOption::Other(DefaultNla::new(TCA_TBF_RATE64, shaper.rate_bytes_per_sec.to_ne_bytes().to_vec())));
    }
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = TcHandle::ROOT;
    msg.attributes.push(TcAttribute::Kind("tbf".into()));
    msg.attributes.push(TcAttribute::Options(options));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    let what = || format!("adding a tbf qdisc to ifindex {index}");
    let mut handle = h.clone();
    let mut responses = handle.request(req).map_err(nl(what()))?;
    while let Some(m) = futures::StreamExt::next(&mut responses).await {
        if let NetlinkPayload::Error(e) = m.payload
            && e.code.is_some()
        {
            return Err(PodNetError::Netlink { what: what(), source: rtnetlink::Error::NetlinkError(e) });
        }
    }
    Ok(())
}

/// Deletes a link in the node namespace; a link that is already gone is success.
pub async fn delete_link(node: &Handle, name: &str) -> Result<()> {
    let Some(link) = link_by_name(node, name).await? else {
        return Ok(());
    };
    match node.link().del(link.header.index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.code.map(|c| c.get()) == Some(-libc::ENODEV) => Ok(()),
        Err(e) => Err(nl(format!("deleting {name}"))(e)),
    }
}

/// Reads what the pod side looks like (for CHECK).
pub async fn view_pod_side(netns: &Path, ifname: &str, gateway: Ipv4Addr) -> Result<Option<PodSideView>> {
    let ifname = ifname.to_owned();
    in_netns(netns, move |h| async move {
        let Some(link) = link_by_name(&h, &ifname).await? else {
            return Ok(None);
        };
        let index = link.header.index;
        let up = link.header.flags.contains(rtnetlink::packet_route::link::LinkFlags::Up);
        let mut addresses = vec![];
        let mut addrs = h.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = addrs.try_next().await.map_err(nl("listing addresses"))? {
            for attr in &msg.attributes {
                if let rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(a)) = attr {
                    addresses.push((*a, msg.header.prefix_len));
                }
            }
        }
        let mut has_default = false;
        let mut routes = h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
        while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
            if r.header.destination_prefix_length != 0 {
                continue;
            }
            let via_gw = r.attributes.iter().any(|a| {
                matches!(a, rtnetlink::packet_route::route::RouteAttribute::Gateway(
                    rtnetlink::packet_route::route::RouteAddress::Inet(g)) if *g == gateway)
            });
            let on_if = r
                .attributes
                .iter()
                .any(|a| matches!(a, rtnetlink::packet_route::route::RouteAttribute::Oif(i) if *i == index));
            has_default |= via_gw && on_if;
        }
        Ok(Some(PodSideView {
            mac: link_mac(&link).unwrap_or_default(),
            up,
            addresses,
            has_default_route_via_gateway: has_default,
        }))
    })
    .await
}

/// A handle to the node namespace's netlink (the namespace the agent runs in).
pub fn node_handle() -> Result<Handle> {
    connect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifname_is_stable_short_and_distinct() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert!(a.len() <= 15 && a.starts_with("cv"), "{a}");
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert_ne!(a, host_ifname("abd", "eth0"));
    }
}
