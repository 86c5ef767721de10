//! Pod interfaces over rtnetlink: a veth pair per attachment, host end in the node's
//! namespace, pod end created directly inside the pod's namespace under CNI_IFNAME (so it
//! is never moved: moving a device between namespaces waits for an RCU grace period) and
//! given a /32 address, a scope-link route to the gateway, a default route via it and a
//! permanent neighbour entry for it.
//!
//! For a pod's namespace the agent opens a netlink socket inside it: a short-lived thread
//! enters the namespace (setns only affects that thread), creates the socket and exits; the
//! socket stays bound to that namespace and is used from the agent's runtime like the
//! node's. The agent's own threads never change namespace.

use std::{
    fs::File,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use tracing::Instrument;

use crate::{bandwidth::Shaper, timing::phase};
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
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
    /// The pod's namespace routes already what the pod's network must: it has another
    /// network (a second attachment through Multus).
    #[error("the pod's namespace already has {0}; a second network through Multus is not supported")]
    NotFirstNetwork(String),
    /// The namespace worker thread failed.
    #[error("namespace worker: {0}")]
    Worker(String),
    /// A netlink request on a socket of its own (not the async connection) failed.
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: std::io::Error,
    },
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

/// What the pod's side looks like now (for CHECK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSideView {
    pub mac: [u8; 6],
    pub up: bool,
    pub mtu: u32,
    pub addresses: Vec<(Ipv4Addr, u8)>,
    pub has_default_route_via_gateway: bool,
    /// The scope-link /32 route to the gateway on the pod's interface.
    pub has_gateway_route: bool,
    /// The gateway's neighbour entry on the pod's interface: its MAC, and whether it is
    /// permanent.
    pub gateway_neighbour: Option<([u8; 6], bool)>,
    /// The rate (bytes/s) of the interface's root `tbf` qdisc, if it has one.
    pub tbf_rate: Option<u64>,
}

/// Name of the host end of a pod's veth: stable for (container, ifname), <= 15 bytes.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("cv{}", &hex[..11])
}

/// Whether `name` has the form [`host_ifname`] gives host ends (`cv` + 11 hex digits).
pub fn is_host_ifname(name: &str) -> bool {
    name.len() == 13 && name.starts_with("cv") && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Names of the links in the node namespace that look like pod host ends.
pub async fn host_ends(node: &Handle) -> Result<Vec<String>> {
    let mut links = node.link().get().execute();
    let mut names = vec![];
    while let Some(link) = links.try_next().await.map_err(nl("listing links"))? {
        for attr in &link.attributes {
            if let LinkAttribute::IfName(name) = attr
                && is_host_ifname(name)
            {
                names.push(name.clone());
            }
        }
    }
    Ok(names)
}

/// Opens a netlink connection in the current thread's namespace.
fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| PodNetError::Worker(e.to_string()))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Where the agent opens a runtime's CNI_NETNS. A runtime that names the namespace by its
/// process (`/proc/<pid>/...`, cri-dockerd) gives a PID of the host's PID namespace; an agent
/// in a PID namespace of its own finds that process under `host_proc` (the host's procfs,
/// mounted there), not under its own `/proc`, where the number names another process or
/// none. Every other path (`/var/run/netns/...`) is taken as it is.
pub fn runtime_netns_path(netns: &str, host_proc: Option<&Path>) -> PathBuf {
    let path = Path::new(netns);
    if let Some(host_proc) = host_proc
        && let Ok(rest) = path.strip_prefix("/proc")
        && let Some(std::path::Component::Normal(pid)) = rest.components().next()
        && pid.to_str().is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && rest.components().all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return host_proc.join(rest);
    }
    path.to_owned()
}

/// Opens the network namespace at `netns` (a runtime's CNI_NETNS).
pub fn open_netns(netns: &Path) -> Result<File> {
    File::open(netns).map_err(|source| PodNetError::Netns { path: netns.to_owned(), source })
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the network namespace's cookie, as eBPF's
/// `bpf_get_netns_cookie` sees it.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace a socket lives in.
pub fn socket_netns_cookie(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cookie of the calling thread's network namespace (the agent's: the node's).
pub fn own_netns_cookie() -> std::io::Result<u64> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket_netns_cookie(std::os::fd::AsFd::as_fd(&s))
}

/// A netlink handle whose socket lives in the namespace `ns` (opened from `path`), served
/// by the calling runtime. The connection closes when the last handle clone is dropped.
pub async fn netns_handle(ns: &File, path: &Path) -> Result<Handle> {
    Ok(netns_handle_and_cookie(ns, path).await?.0)
}

/// [`netns_handle`], and the namespace's cookie (0 if the kernel cannot tell it).
pub async fn netns_handle_and_cookie(ns: &File, path: &Path) -> Result<(Handle, u64)> {
    let ns = ns.try_clone().map_err(|source| PodNetError::Netns { path: path.to_owned(), source })?;
    let owned_path = path.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-socket".into())
        .spawn(move || {
            let open = || -> Result<(OwnedFd, u64)> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| PodNetError::Netns { path: owned_path.clone(), source: std::io::Error::from(e) })?;
                let socket = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)
                    .map_err(|e| PodNetError::Worker(format!("netlink socket in {}: {e}", owned_path.display())))?;
                // SAFETY: into_raw_fd hands over the socket's only fd.
                let fd = unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) };
                let cookie = socket_netns_cookie(std::os::fd::AsFd::as_fd(&fd)).unwrap_or(0);
                Ok((fd, cookie))
            };
            // The thread ends here: its namespace switch dies with it.
            let _ = tx.send(open());
        })
        .map_err(|e| PodNetError::Worker(e.to_string()))?;
    let (fd, cookie) = rx.await.map_err(|_| PodNetError::Worker("namespace socket thread died".into()))??;
    // SAFETY: the fd is a netlink socket we own; TokioSocket takes it over (and registers it
    // with this runtime's reactor).
    let socket = unsafe { rtnetlink::sys::TokioSocket::from_raw_fd(fd.into_raw_fd()) };
    let (conn, handle, _) = rtnetlink::from_socket(socket);
    tokio::spawn(conn);
    Ok((handle, cookie))
}

/// Runs `f` with a netlink handle opened inside the namespace at `netns`.
pub async fn in_netns<F, Fut, T>(netns: &Path, f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let ns = open_netns(netns)?;
    let handle = netns_handle(&ns, netns).await?;
    f(handle).await
}

/// Whether a netlink request failed with one of `errnos` (as libc names them, positive).
pub fn is_errno(e: &rtnetlink::Error, errnos: &[i32]) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| errnos.contains(&-c.get())))
}

/// Looks a link up by name; `None` if it does not exist.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if is_errno(&e, &[libc::ENODEV]) => Ok(None),
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

/// A pod's veth pair right after creation: both ends exist, the host end is up, nothing
/// is configured inside the pod yet.
pub struct PodVeth {
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    /// The pod namespace's cookie (services act on its sockets; 0: unknown).
    pub netns_cookie: u64,
    /// netlink inside the pod's namespace.
    pod: Handle,
}

/// Creates the veth pair: the host end in the node namespace, the pod end directly in the
/// pod's namespace under its final name, the host end up. Fails if the pod already has an interface
/// of that name. On error nothing is left behind.
pub async fn create_veth(node: &Handle, spec: &PodLinkSpec) -> Result<PodVeth> {
    let ns = phase("netns_open").in_scope(|| open_netns(&spec.netns))?;
    let (pod, netns_cookie) = netns_handle_and_cookie(&ns, &spec.netns).instrument(phase("netns_socket")).await?;
    // The pod's interface name must be free in its namespace before we build anything.
    let taken = link_by_name(&pod, &spec.ifname).instrument(phase("pod_ifname_check")).await?.is_some();
    if taken {
        return Err(PodNetError::IfnameTaken(spec.ifname.clone()));
    }
    // A leftover host end from an earlier, interrupted attempt would block the name.
    delete_link(node, &spec.host_ifname).instrument(phase("leftover_delete")).await?;
    // The pod end cannot be brought up in the same request (the kernel opens it before the
    // pair is linked and refuses); configure_pod_side does it first thing.
    let peer = LinkUnspec::new_with_name(&spec.ifname).mtu(spec.mtu).setns_by_fd(ns.as_raw_fd()).build();
    let veth = LinkVeth::new(&spec.host_ifname, &spec.ifname)
        .mtu(spec.mtu)
        .up()
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    node.link().add(veth).execute().instrument(phase("veth_create")).await.map_err(nl(format!(
        "creating veth {} (peer {} in {})",
        spec.host_ifname,
        spec.ifname,
        spec.netns.display()
    )))?;
    drop(ns);
    let host = async {
        link_by_name(node, &spec.host_ifname).await?.ok_or_else(|| PodNetError::NotFound(spec.host_ifname.clone()))
    }
    .instrument(phase("host_lookup"))
    .await;
    // What the pod receives is shaped on the host end (the fast path hands such a pod's
    // traffic to the host end's egress).
    let host = match (host, spec.ingress_shaper) {
        (Ok(host), Some(shaper)) => set_tbf_root(node, host.header.index, shaper).await.map(|()| host),
        (host, _) => host,
    };
    match host {
        Ok(host) => Ok(PodVeth {
            host_ifindex: host.header.index,
            host_mac: link_mac(&host).unwrap_or_default(),
            netns_cookie,
            pod,
        }),
        Err(e) => {
            if let Err(del) = delete_link(node, &spec.host_ifname).await {
                log::warn!("cleaning up {} after a failed ADD: {del}", spec.host_ifname);
            }
            Err(e)
        }
    }
}

/// Configures the pod end (up, address, routes, gateway neighbour) and returns its MAC. The
/// requests are sent back to back and their answers awaited together; the kernel handles a
/// socket's requests in order. The caller removes the pair if this fails.
pub async fn configure_pod_side(veth: &PodVeth, spec: &PodLinkSpec) -> Result<[u8; 6]> {
    let h = &veth.pod;
    let link = link_by_name(h, &spec.ifname).await?.ok_or_else(|| PodNetError::NotFound(spec.ifname.clone()))?;
    let index = link.header.index;
    if let Some(route) = taken_route(h, spec.gateway).await? {
        return Err(PodNetError::NotFirstNetwork(route));
    }
    let pod_mac = link_mac(&link).ok_or_else(|| PodNetError::NotFound(format!("MAC of {}", spec.ifname)))?;
    let up = h.link().set(LinkUnspec::new_with_index(index).up().build()).execute();
    let address = h.address().add(index, IpAddr::V4(spec.ip), 32).execute();
    let gateway_route = h
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(spec.gateway, 32)
                .output_interface(index)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute();
    let default_route = h
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .gateway(spec.gateway)
                .output_interface(index)
                .build(),
        )
        .execute();
    let neighbour = h
        .neighbours()
        .add(index, IpAddr::V4(spec.gateway))
        .link_layer_address(&spec.gateway_mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute();
    // join polls in argument order, so the requests go out in this order.
    let (u, a, g, d, n) = futures::join!(up, address, gateway_route, default_route, neighbour);
    u.map_err(nl(format!("bringing {} up", spec.ifname)))?;
    a.map_err(nl(format!("adding {}/32", spec.ip)))?;
    g.map_err(nl(format!("adding the route to gateway {}", spec.gateway)))?;
    d.map_err(nl("adding the default route"))?;
    n.map_err(nl("adding the gateway's neighbour entry"))?;
    // What the pod sends is shaped on its own interface.
    if let Some(shaper) = spec.egress_shaper {
        set_tbf_root(h, index, shaper).await?;
    }
    Ok(pod_mac)
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
        Err(e) if is_errno(&e, &[libc::ENODEV]) => Ok(()),
        Err(e) => Err(nl(format!("deleting {name}"))(e)),
    }
}

/// [`delete_link_blocking`] on a blocking thread, timed as the `link_delete` phase.
pub async fn delete_link_off_runtime(name: &str) -> Result<()> {
    let (span, name) = (phase("link_delete"), name.to_owned());
    tokio::task::spawn_blocking(move || span.in_scope(|| delete_link_blocking(&name)))
        .await
        .unwrap_or_else(|e| Err(PodNetError::Worker(e.to_string())))
}

/// Deletes a link of the agent's own (node) namespace by name, on a netlink socket of its
/// own, blocking; meant for `spawn_blocking`. The kernel handles RTM_DELLINK inside the
/// sendmsg(2) call, including the wait until the device is released (tens of ms of grace
/// periods): on the shared async connection one deletion would hold up every other request
/// and a runtime thread. A link already gone is success.
pub fn delete_link_blocking(name: &str) -> Result<()> {
    use rtnetlink::{
        packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload},
        packet_route::RouteNetlinkMessage,
        sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
    };
    let what = || format!("deleting {name}");
    let kernel = |source: std::io::Error| PodNetError::Kernel { what: what(), source };
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(kernel)?;
    socket.bind_auto().map_err(kernel)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = 1;
    let link = LinkUnspec::new_with_name(name).build();
    let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)));
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send_to(&buf, &SocketAddr::new(0, 0), 0).map_err(kernel)?;
    let mut reply = Vec::with_capacity(8192);
    socket.recv(&mut reply, 0).map_err(kernel)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| kernel(std::io::Error::other(e.to_string())))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code.map(|c| c.get()) {
            None => Ok(()),
            Some(code) if code == -libc::ENODEV => Ok(()),
            Some(code) => Err(kernel(std::io::Error::from_raw_os_error(-code))),
        },
        other => Err(kernel(std::io::Error::other(format!("unexpected answer {other:?}")))),
    }
}

/// A route of the main table that the pod's network would add and that another network
/// of the pod holds already (a default route, or one to the gateway): described, if any.
async fn taken_route(h: &Handle, gateway: Ipv4Addr) -> Result<Option<String>> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    const RT_TABLE_MAIN: u8 = 254;
    let mut routes = h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(r) = routes.try_next().await.map_err(nl("listing the pod's routes"))? {
        let table = r.attributes.iter().find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None });
        if table.unwrap_or(u32::from(r.header.table)) != u32::from(RT_TABLE_MAIN) {
            continue;
        }
        let via = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(format!(" via {g}")),
            _ => None,
        });
        let dev = r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
        let describe = |what: String| {
            format!(
                "{what}{}{}",
                via.clone().unwrap_or_default(),
                dev.map(|i| format!(" (ifindex {i})")).unwrap_or_default()
            )
        };
        match r.header.destination_prefix_length {
            0 => return Ok(Some(describe("a default route".into()))),
            32 if r
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d)) if *d == gateway)) =>
            {
                return Ok(Some(describe(format!("a route to the gateway {gateway}"))));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Reads what the pod side looks like (for CHECK).
pub async fn view_pod_side(netns: &Path, ifname: &str, gateway: Ipv4Addr) -> Result<Option<PodSideView>> {
    use rtnetlink::packet_route::{
        link::LinkFlags,
        neighbour::{NeighbourAddress, NeighbourAttribute},
        route::{RouteAddress, RouteAttribute},
    };
    let ifname = ifname.to_owned();
    in_netns(netns, move |h| async move {
        let Some(link) = link_by_name(&h, &ifname).await? else {
            return Ok(None);
        };
        let index = link.header.index;
        let up = link.header.flags.contains(LinkFlags::Up);
        let mtu = link.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None });
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
        let mut has_gateway_route = false;
        let mut routes = h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
        while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
            let on_if = r.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index));
            if !on_if {
                continue;
            }
            match r.header.destination_prefix_length {
                0 => {
                    has_default |= r
                        .attributes
                        .iter()
                        .any(|a| matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == gateway));
                }
                32 => {
                    has_gateway_route |= r.header.scope == RouteScope::Link
                        && r.attributes
                            .iter()
                            .any(|a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d)) if *d == gateway));
                }
                _ => {}
            }
        }
        let mut gateway_neighbour = None;
        let mut neighbours = h.neighbours().get().execute();
        while let Some(n) = neighbours.try_next().await.map_err(nl("listing neighbours"))? {
            let is_gateway = n
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == gateway));
            if n.header.ifindex != index || !is_gateway {
                continue;
            }
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
                _ => None,
            });
            if let Some(mac) = mac {
                gateway_neighbour = Some((mac, n.header.state == NeighbourState::Permanent));
            }
        }
        let tbf_rate = root_tbf_rate(&h, index).await?;
        Ok(Some(PodSideView {
            mac: link_mac(&link).unwrap_or_default(),
            up,
            mtu: mtu.unwrap_or_default(),
            addresses,
            has_default_route_via_gateway: has_default,
            has_gateway_route,
            gateway_neighbour,
            tbf_rate,
        }))
    })
    .await
}

/// The rate (bytes/s) of a link's root qdisc if it is a `tbf` (as [`set_tbf_root`] makes).
pub async fn root_tbf_rate(h: &Handle, index: u32) -> Result<Option<u64>> {
    use rtnetlink::packet_core::Nla;
    use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcOption};
    const TCA_TBF_PARMS: u16 = 1;
    const TCA_TBF_RATE64: u16 = 4;
    let mut qdiscs = h.qdisc().get().index(index as i32).execute();
    let mut found = None;
    while let Some(q) = qdiscs.try_next().await.map_err(nl("listing qdiscs"))? {
        if q.header.index != index as i32 || q.header.parent != TcHandle::ROOT {
            continue;
        }
        if !q.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == "tbf")) {
            continue;
        }
        // netlink-packet-route keeps a tbf's TCA_OPTIONS as one opaque attribute: walk the
        // nested attributes (u16 length, u16 type, value, padded to 4) by hand.
        let mut rate = None;
        let mut rate64 = None;
        for a in &q.attributes {
            let TcAttribute::Options(options) = a else { continue };
            for o in options {
                let TcOption::Other(nla) = o else { continue };
                let mut value = vec![0u8; nla.value_len()];
                nla.emit_value(&mut value);
                let mut at = 0;
                while at + 4 <= value.len() {
                    let len = usize::from(u16::from_ne_bytes([value[at], value[at + 1]]));
                    let kind = u16::from_ne_bytes([value[at + 2], value[at + 3]]) & 0x3fff;
                    if len < 4 || at + len > value.len() {
                        break;
                    }
                    let payload = &value[at + 4..at + len];
                    match kind {
                        // struct tc_tbf_qopt: the rate's u32 follows 8 bytes of tc_ratespec.
                        TCA_TBF_PARMS if payload.len() >= 12 => {
                            rate = payload[8..12].try_into().ok().map(|b| u64::from(u32::from_ne_bytes(b)));
                        }
                        TCA_TBF_RATE64 if payload.len() >= 8 => {
                            rate64 = payload[..8].try_into().ok().map(u64::from_ne_bytes);
                        }
                        _ => {}
                    }
                    at += len.next_multiple_of(4);
                }
            }
        }
        found = rate64.or(rate).or(Some(0));
    }
    Ok(found)
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
        assert!(is_host_ifname(&a), "{a}");
        assert!(!is_host_ifname("cslow0") && !is_host_ifname("cvzzzzzzzzzzz") && !is_host_ifname("eth0"));
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert!(a.len() <= 15 && a.starts_with("cv"), "{a}");
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert_ne!(a, host_ifname("abd", "eth0"));
    }

    /// A process's namespace is looked up in the host's procfs; anything else is left alone.
    #[test]
    fn a_namespace_named_by_process_is_opened_in_the_hosts_procfs() {
        let host = Some(Path::new("/hostproc"));
        assert_eq!(runtime_netns_path("/proc/4242/ns/net", host), Path::new("/hostproc/4242/ns/net"));
        assert_eq!(
            runtime_netns_path("/proc/4242/task/4243/ns/net", host),
            Path::new("/hostproc/4242/task/4243/ns/net")
        );
        for as_is in
            ["/var/run/netns/cni-1", "/run/netns/x", "/proc/self/ns/net", "/proc/1/../self/ns/net", "/procx/1/ns/net"]
        {
            assert_eq!(runtime_netns_path(as_is, host), Path::new(as_is), "{as_is}");
        }
        assert_eq!(runtime_netns_path("/proc/4242/ns/net", None), Path::new("/proc/4242/ns/net"));
    }
}
