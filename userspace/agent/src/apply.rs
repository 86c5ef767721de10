//! Plan -> kernel: installs the difference between a [`Plan`] and what is installed.
//!
//! The applier remembers what it installed (`installed`), so an update (a pod added, a node
//! joining) writes only the entries that changed. [`Applier::resync`] first reads back what
//! the kernel really holds (map contents, the routes of protocol [`RTPROT_CONTIV`]) and
//! then converges, so a restarted agent or a damaged table gets repaired without touching
//! entries that are already right (live traffic never sees them disappear).
//!
//! Order matters for make-before-break: new map entries are written before host routes
//! point at them, and stale routes go before stale map entries. NetworkPolicy likewise:
//! a pod's POLICY entries are written before the isolation bit that makes the datapath
//! read them, and removed after it is cleared.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    process::Stdio,
};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        neighbour::NeighbourState,
        route::{RouteAttribute, RouteMetric, RouteProtocol, RouteScope},
    },
};

use crate::{
    datapath::{Datapath, DatapathError},
    plan::{HostRoute, Masquerade, Plan},
    policy::PolicyEntryKey,
};

/// The routing protocol number marking the agent's kernel routes (`ip route show proto 84`).
pub const RTPROT_CONTIV: u8 = 84;
/// The nftables table holding the agent's rules.
pub const NFT_TABLE: &str = "contiv";

/// What could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("datapath maps: {0}")]
    Maps(#[from] DatapathError),
    #[error("kernel routes: {0}")]
    Routes(String),
    #[error("masquerade rules: {0}")]
    Masquerade(String),
    #[error("{first} (and {more} more failures)")]
    Several { first: Box<ApplyError>, more: usize },
}

/// The failures of one apply: the first, and how many more.
#[derive(Default)]
struct Failures {
    first: Option<ApplyError>,
    more: usize,
}

impl Failures {
    fn note(&mut self, e: impl Into<ApplyError>) {
        if self.first.is_none() {
            self.first = Some(e.into());
        } else {
            self.more += 1;
        }
    }

    fn into_result(self) -> Result<(), ApplyError> {
        match self.first {
            None => Ok(()),
            Some(first) if self.more == 0 => Err(first),
            Some(first) => Err(ApplyError::Several { first: Box::new(first), more: self.more }),
        }
    }
}

/// Installs plans; remembers what it installed.
pub struct Applier {
    installed: Plan,
    node: Handle,
}

impl Applier {
    pub fn new(node: Handle) -> Self {
        Self { installed: Plan { masquerade: None, ..Default::default() }, node }
    }

    /// What was last installed.
    pub fn installed(&self) -> &Plan {
        &self.installed
    }

    /// Reads back what the kernel holds, then converges it to `plan`.
    pub async fn resync(&mut self, datapath: &mut Datapath, plan: &Plan) -> Result<(), ApplyError> {
        self.installed.pods = datapath.pods()?.into_iter().map(|e| (Ipv4Addr::from(e.ip), e)).collect();
        self.installed.pod_ifaces = datapath.pods_in_map()?.into_iter().map(|e| (e.host_ifindex, e)).collect();
        self.installed.remote_routes = datapath.remote_routes()?;
        self.installed.policy = Some(datapath.policy_entries()?);
        self.installed.config = datapath.config()?.unwrap_or_default();
        self.installed.host_routes = self.kernel_routes().await?;
        // Neighbour entries cannot be told apart from others; replacing them all is idempotent.
        self.installed.host_neighbours.clear();
        // Rules are rewritten as a whole, atomically.
        self.installed.masquerade = None;
        self.installed.netns = datapath.node_netns()?;
        let stale_counters: Vec<Ipv4Addr> =
            datapath.counter_keys()?.into_iter().filter(|ip| !plan.pods.contains_key(ip)).collect();
        let result = self.apply(datapath, plan).await;
        for ip in stale_counters {
            let _ = datapath.remove_counters(ip);
        }
        if plan.masquerade.is_none() {
            remove_nft_table().map_err(ApplyError::Masquerade)?;
        }
        result
    }

    /// Installs what differs between `plan` and what was installed. An entry that fails is
    /// left out of what was installed (the next apply tries it again) and the rest goes on:
    /// one entry that cannot be written (a route the kernel refuses, a full map) must not
    /// hold back every other pod's and node's entries, nor the removals. Returns the first
    /// failure (and how many more there were).
    pub async fn apply(&mut self, datapath: &mut Datapath, plan: &Plan) -> Result<(), ApplyError> {
        // Policy not known yet (the cluster model is loading): keep what is installed,
        // isolation bits included.
        let preserved;
        let plan = match &plan.policy {
            Some(_) => plan,
            None => {
                let mut p = plan.clone();
                p.policy = self.installed.policy.clone();
                keep_isolation(&mut p.pods, &self.installed.pods);
                keep_isolation(&mut p.pod_ifaces, &self.installed.pod_ifaces);
                preserved = p;
                &preserved
            }
        };
        let mut failed = Failures::default();
        let empty = BTreeMap::new();
        let want_policy = plan.policy.as_ref().unwrap_or(&empty);
        // 1. Node-wide configuration and the entries traffic will be sent to.
        if self.installed.config != plan.config {
            match datapath.set_config(plan.config) {
                Ok(()) => self.installed.config = plan.config,
                Err(e) => failed.note(e),
            }
        }
        // Allow entries before the isolation bits that make the datapath read them (an
        // allow entry that failed leaves its pod more isolated, never less).
        // A refused entry leaves its addresses to the entries covering it, which may allow
        // more (an `except` under its block). So a pod's entries are written longest prefix
        // first, one covering a refused entry is not written, and those installed go: its
        // addresses, and the rest of what the covering entries held, are denied until an
        // apply writes them all (a full map refuses only broader entries after that).
        let installed_policy = self.installed.policy.get_or_insert_with(BTreeMap::new);
        let mut writes = changed(installed_policy, want_policy);
        writes.sort_by_key(|(k, _)| (k.pod, k.direction, std::cmp::Reverse(k.peer.prefix_len()), k.peer));
        let mut refused: Vec<PolicyEntryKey> = vec![];
        let covers_refused = |k: &PolicyEntryKey, refused: &[PolicyEntryKey]| {
            refused.iter().any(|r| r.pod == k.pod && r.direction == k.direction && k.peer.contains(&r.peer))
        };
        for (key, value) in writes {
            if covers_refused(&key, &refused) {
                refused.push(key);
                continue;
            }
            match datapath.put_policy(&key, value) {
                Ok(()) => {
                    installed_policy.insert(key, value);
                }
                Err(e) => {
                    refused.push(key);
                    failed.note(e);
                }
            }
        }
        let covering: Vec<PolicyEntryKey> =
            installed_policy.keys().filter(|k| covers_refused(k, &refused)).copied().collect();
        for key in covering {
            match datapath.delete_policy(&key) {
                Ok(()) => {
                    installed_policy.remove(&key);
                }
                Err(e) => failed.note(e),
            }
        }
        for (ip, ep) in changed(&self.installed.pods, &plan.pods) {
            match datapath.put_pod(ip, ep) {
                Ok(()) => {
                    self.installed.pods.insert(ip, ep);
                }
                Err(e) => failed.note(e),
            }
        }
        for (ifindex, ep) in changed(&self.installed.pod_ifaces, &plan.pod_ifaces) {
            match datapath.put_pod_iface(ifindex, ep) {
                Ok(()) => {
                    self.installed.pod_ifaces.insert(ifindex, ep);
                }
                Err(e) => failed.note(e),
            }
        }
        for (cookie, kind) in changed(&self.installed.netns, &plan.netns) {
            match datapath.put_node_netns(cookie, kind) {
                Ok(()) => {
                    self.installed.netns.insert(cookie, kind);
                }
                Err(e) => failed.note(e),
            }
        }
        for (prefix, route) in changed(&self.installed.remote_routes, &plan.remote_routes) {
            match datapath.put_remote_route(prefix, route) {
                Ok(()) => {
                    self.installed.remote_routes.insert(prefix, route);
                }
                Err(e) => failed.note(e),
            }
        }
        // 2. Kernel routes and neighbours pointing at them.
        for ((ifindex, ip), mac) in changed(&self.installed.host_neighbours, &plan.host_neighbours) {
            match self.put_neighbour(ifindex, ip, mac).await {
                Ok(true) => {
                    self.installed.host_neighbours.insert((ifindex, ip), mac);
                }
                Ok(false) => {}
                Err(e) => failed.note(e),
            }
        }
        for (dst, route) in changed(&self.installed.host_routes, &plan.host_routes) {
            match self.put_route(dst, route).await {
                Ok(true) => {
                    self.installed.host_routes.insert(dst, route);
                }
                Ok(false) => {}
                Err(e) => failed.note(e),
            }
        }
        // 3. What is gone: routes first, then the entries they led to.
        for dst in removed(&self.installed.host_routes, &plan.host_routes) {
            match self.delete_route(dst, self.installed.host_routes[&dst]).await {
                Ok(()) => {
                    self.installed.host_routes.remove(&dst);
                }
                Err(e) => failed.note(e),
            }
        }
        for key in removed(&self.installed.host_neighbours, &plan.host_neighbours) {
            // The neighbour of a deleted pod went with its veth; others are removed here.
            self.delete_neighbour(key.0, key.1).await;
            self.installed.host_neighbours.remove(&key);
        }
        for prefix in removed(&self.installed.remote_routes, &plan.remote_routes) {
            match datapath.delete_remote_route(prefix) {
                Ok(()) => {
                    self.installed.remote_routes.remove(&prefix);
                }
                Err(e) => failed.note(e),
            }
        }
        for cookie in removed(&self.installed.netns, &plan.netns) {
            match datapath.delete_node_netns(cookie) {
                Ok(()) => {
                    self.installed.netns.remove(&cookie);
                }
                Err(e) => failed.note(e),
            }
        }
        for ifindex in removed(&self.installed.pod_ifaces, &plan.pod_ifaces) {
            match datapath.delete_pod_iface(ifindex) {
                Ok(()) => {
                    self.installed.pod_ifaces.remove(&ifindex);
                }
                Err(e) => failed.note(e),
            }
        }
        for ip in removed(&self.installed.pods, &plan.pods) {
            match datapath.delete_pod(ip) {
                Ok(()) => {
                    self.installed.pods.remove(&ip);
                }
                Err(e) => failed.note(e),
            }
        }
        // Entries nothing reads any more (their pods' isolation bits are gone already).
        let installed_policy = self.installed.policy.get_or_insert_with(BTreeMap::new);
        for key in removed(installed_policy, want_policy) {
            match datapath.delete_policy(&key) {
                Ok(()) => {
                    installed_policy.remove(&key);
                }
                Err(e) => failed.note(e),
            }
        }
        // Counters follow the pods: new pods start at zero, departed pods' counters go.
        for ip in plan.pods.keys() {
            if let Err(e) = datapath.ensure_counters(*ip) {
                failed.note(e);
            }
        }
        // 4. Masquerade rules (one atomic nft transaction).
        if self.installed.masquerade != plan.masquerade {
            let done = match &plan.masquerade {
                Some(m) => install_nft_masquerade(m),
                None => remove_nft_table(),
            };
            match done {
                Ok(()) => self.installed.masquerade = plan.masquerade.clone(),
                Err(e) => failed.note(ApplyError::Masquerade(e)),
            }
        }
        failed.into_result()
    }

    /// Whether `plan`'s entries of the pod with this address and host interface are what
    /// is installed (an apply that failed elsewhere still wired this pod).
    pub fn pod_installed(&self, plan: &Plan, ip: Ipv4Addr, host_ifindex: u32) -> bool {
        let route = Ipv4Net::from(ip);
        self.installed.pods.get(&ip) == plan.pods.get(&ip)
            && self.installed.pod_ifaces.get(&host_ifindex) == plan.pod_ifaces.get(&host_ifindex)
            && self.installed.host_routes.get(&route) == plan.host_routes.get(&route)
            && self.installed.host_neighbours.get(&(host_ifindex, ip)) == plan.host_neighbours.get(&(host_ifindex, ip))
    }

    /// Removes a departed pod's counters (called when its attachment is gone).
    pub fn forget_counters(&self, datapath: &mut Datapath, ip: Ipv4Addr) {
        if !self.installed.pods.contains_key(&ip) {
            let _ = datapath.remove_counters(ip);
        }
    }

    async fn kernel_routes(&self) -> Result<BTreeMap<Ipv4Net, HostRoute>, ApplyError> {
        let mut out = BTreeMap::new();
        let mut routes = self.node.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
        while let Some(r) = routes.try_next().await.map_err(|e| ApplyError::Routes(e.to_string()))? {
            if r.header.protocol != RouteProtocol::Other(RTPROT_CONTIV) {
                continue;
            }
            let mut dst = None;
            let mut route = HostRoute { ifindex: 0, src: None, mtu: 0 };
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(rtnetlink::packet_route::route::RouteAddress::Inet(d)) => {
                        dst = Ipv4Net::new(*d, r.header.destination_prefix_length).ok();
                    }
                    RouteAttribute::Oif(i) => route.ifindex = *i,
                    RouteAttribute::PrefSource(rtnetlink::packet_route::route::RouteAddress::Inet(s)) => {
                        route.src = Some(*s)
                    }
                    RouteAttribute::Metrics(ms) => {
                        for m in ms {
                            if let RouteMetric::Mtu(v) = m {
                                route.mtu = *v;
                            }
                        }
                    }
                    _ => {}
                }
            }
            if let Some(dst) = dst {
                out.insert(dst, route);
            }
        }
        Ok(out)
    }

    fn route_message(dst: Ipv4Net, route: HostRoute) -> rtnetlink::packet_route::route::RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(route.ifindex)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Other(RTPROT_CONTIV));
        if let Some(src) = route.src {
            b = b.pref_source(src);
        }
        let mut msg = b.build();
        if route.mtu != 0 {
            msg.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(route.mtu)]));
        }
        msg
    }

    /// Installs a route; false if its interface no longer exists (a pod deleted under us,
    /// whose route went with it): not installed, and not an error for this apply, which
    /// would otherwise fail every later apply at the same step.
    async fn put_route(&self, dst: Ipv4Net, route: HostRoute) -> Result<bool, ApplyError> {
        match self.node.route().add(Self::route_message(dst, route)).replace().execute().await {
            Ok(()) => Ok(true),
            Err(e) if crate::podnet::is_errno(&e, &[libc::ENODEV]) => {
                log::debug!("route {dst}: interface #{} is gone; not installed", route.ifindex);
                Ok(false)
            }
            Err(e) => Err(ApplyError::Routes(format!("route {dst} dev #{}: {e}", route.ifindex))),
        }
    }

    async fn delete_route(&self, dst: Ipv4Net, route: HostRoute) -> Result<(), ApplyError> {
        match self.node.route().del(Self::route_message(dst, route)).execute().await {
            Ok(()) => Ok(()),
            // Gone already (its device was deleted with a pod).
            Err(e) if crate::podnet::is_errno(&e, &[libc::ESRCH, libc::ENODEV]) => Ok(()),
            Err(e) => Err(ApplyError::Routes(format!("deleting route {dst}: {e}"))),
        }
    }

    async fn delete_neighbour(&self, ifindex: u32, ip: Ipv4Addr) {
        use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
        let mut msg = NeighbourMessage::default();
        msg.header.ifindex = ifindex;
        msg.header.family = rtnetlink::packet_route::AddressFamily::Inet;
        msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        // Already gone (with its device) is fine.
        let _ = self.node.neighbours().del(msg).execute().await;
    }

    /// Installs a neighbour entry; false if its interface no longer exists (as put_route).
    async fn put_neighbour(&self, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> Result<bool, ApplyError> {
        let put = self
            .node
            .neighbours()
            .add(ifindex, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await;
        match put {
            Ok(()) => Ok(true),
            Err(e) if crate::podnet::is_errno(&e, &[libc::ENODEV]) => {
                log::debug!("neighbour {ip}: interface #{ifindex} is gone; not installed");
                Ok(false)
            }
            Err(e) => Err(ApplyError::Routes(format!("neighbour {ip} dev #{ifindex}: {e}"))),
        }
    }
}

/// Carries the installed isolation bits over into `want` (policy not known yet).
fn keep_isolation<K: Ord>(
    want: &mut BTreeMap<K, contiv_common::PodEndpoint>,
    have: &BTreeMap<K, contiv_common::PodEndpoint>,
) {
    use contiv_common::pod_flags::ISOLATION;
    for (k, ep) in want.iter_mut() {
        if let Some(old) = have.get(k) {
            ep.flags = (ep.flags & !ISOLATION) | (old.flags & ISOLATION);
        }
    }
}

/// Entries of `want` that `have` lacks or holds with another value.
fn changed<K: Ord + Copy, V: PartialEq + Copy>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Vec<(K, V)> {
    want.iter().filter(|(k, v)| have.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect()
}

/// Keys of `have` that `want` lacks.
fn removed<K: Ord + Copy, V>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Vec<K> {
    let want: BTreeSet<&K> = want.keys().collect();
    have.keys().filter(|k| !want.contains(k)).copied().collect()
}

/// The nftables rules for `m`: masquerade what pods send out of the uplink to addresses
/// outside the cluster's pod range (replies are de-NATed by conntrack). TCP and UDP from an
/// unprivileged port leave from a port below 61000, where the node's own sockets take
/// theirs: the ports above are the datapath's, which SNATs NodePort flows to backends on
/// other nodes or outside the cluster to them, and reads their answers before netfilter
/// does (a pod's port up there, its own or one the datapath gave a flow whose reply
/// addresses were taken, is remapped). Nor in the NodePort range (30000-32767, Kubernetes'
/// default): the uplink would take an answer to such a port for a new NodePort flow, so a
/// pod's port there, or one above, leaves from the node's ephemeral range, and a lower one
/// stays lower (a clash is remapped within its own range). Privileged ports stay
/// privileged, as the masquerade keeps them.
pub fn nft_masquerade_script(m: &Masquerade) -> String {
    let matched = format!(
        "ip saddr {cidr} ip daddr != {cidr} oifname \"{uplink}\"",
        cidr = m.cluster_pod_cidr,
        uplink = m.uplink
    );
    format!(
        "table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\ntable ip {NFT_TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    {matched} meta l4proto {{ tcp, udp }} th sport 1024-29999 masquerade to :1024-29999\n    {matched} meta l4proto {{ tcp, udp }} th sport 30000-65535 masquerade to :32768-60999\n    {matched} masquerade\n  }}\n}}\n"
    )
}

fn nft(script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft (Debian package nftables): {e}"))?;
    child.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("nft failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn install_nft_masquerade(m: &Masquerade) -> Result<(), String> {
    nft(&nft_masquerade_script(m))
}

fn remove_nft_table() -> Result<(), String> {
    if !nft_installed() {
        // Without nft there can be no table of ours to remove.
        return Ok(());
    }
    // Creating it first makes the delete succeed whether or not it existed.
    nft(&format!("table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"))
}

fn nft_installed() -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("nft").is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_helpers_find_changed_and_removed_entries() {
        let have: BTreeMap<u32, u32> = [(1, 10), (2, 20), (3, 30)].into();
        let want: BTreeMap<u32, u32> = [(2, 20), (3, 31), (4, 40)].into();
        assert_eq!(changed(&have, &want), vec![(3, 31), (4, 40)]);
        assert_eq!(removed(&have, &want), vec![1]);
    }

    #[test]
    fn masquerade_rule_excludes_the_cluster_and_names_the_uplink() {
        let s = nft_masquerade_script(&Masquerade {
            cluster_pod_cidr: "10.1.0.0/16".parse().unwrap(),
            uplink: "eth0".into(),
        });
        let matched = "ip saddr 10.1.0.0/16 ip daddr != 10.1.0.0/16 oifname \"eth0\"";
        assert!(
            s.contains(&format!(
                "{matched} meta l4proto {{ tcp, udp }} th sport 1024-29999 masquerade to :1024-29999\n"
            )),
            "low unprivileged ports stay below the NodePort range: {s}"
        );
        assert!(
            s.contains(&format!(
                "{matched} meta l4proto {{ tcp, udp }} th sport 30000-65535 masquerade to :32768-60999\n"
            )),
            "the others leave from the ephemeral range: neither NodePorts nor the datapath's SNAT ports: {s}"
        );
        assert!(s.contains(&format!("{matched} masquerade\n")), "{s}");
        assert!(s.starts_with("table ip contiv\ndelete table ip contiv\n"), "replaced atomically: {s}");
    }

    /// An entry the POLICY map refuses takes the entries covering it along (root only): its
    /// addresses are denied, not left to a broader allow.
    #[tokio::test]
    async fn a_refused_policy_entry_takes_its_covering_entries_along() {
        use crate::{
            datapath::{MapSizes, TestPins},
            policy::PortSet,
        };
        use contiv_common::{map_names, policy_dir};
        let Some(dir) = TestPins::for_datapath("policy-refused") else { return };
        let load = || Datapath::load_with(&dir.0, true, MapSizes::default()).expect("loading the datapath");
        let mut first = load();
        first.finish_migration().unwrap();
        drop(first);
        // A POLICY map with room for two entries, pinned where the agent's is.
        let pin = dir.0.join(map_names::POLICY);
        std::fs::remove_file(&pin).unwrap();
        let key = (4 + std::mem::size_of::<contiv_common::PolicyKey>()).to_string();
        let value = std::mem::size_of::<contiv_common::PolicyPorts>().to_string();
        let status = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&pin)
            .args(["type", "lpm_trie", "key", &key, "value", &value, "entries", "2", "name", "POLICY", "flags", "1"])
            .status()
            .expect("running bpftool");
        assert!(status.success(), "bpftool map create");
        let mut datapath = load();

        let pod = Ipv4Addr::new(10, 1, 1, 10);
        let entry = |peer: &str| PolicyEntryKey { pod, direction: policy_dir::INGRESS, peer: peer.parse().unwrap() };
        let mut web = PortSet::default();
        web.add(6, 80, 80);
        let web = web.to_value().unwrap();
        let none = PortSet::default().to_value().unwrap();
        let (conn, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(conn);
        let mut applier = Applier::new(handle);
        let keys = |m: &BTreeMap<PolicyEntryKey, contiv_common::PolicyPorts>| m.keys().copied().collect::<Vec<_>>();
        // Two entries fit: the longest prefixes go first, and 0.0.0.0/0, which would
        // answer for what is left out, is not written.
        let want =
            BTreeMap::from([(entry("0.0.0.0/0"), web), (entry("10.1.2.0/24"), none), (entry("10.9.0.0/16"), none)]);
        let err = applier.apply(&mut datapath, &Plan { policy: Some(want), ..Default::default() }).await;
        let err = err.expect_err("the map is full");
        assert!(err.to_string().contains(map_names::POLICY), "{err}");
        let left = datapath.policy_entries().unwrap();
        assert_eq!(keys(&left), vec![entry("10.1.2.0/24"), entry("10.9.0.0/16")], "0.0.0.0/0 left out");
        assert_eq!(applier.installed().policy.as_ref().unwrap(), &left, "what is installed is known");

        // A covering entry already written goes when an entry under it is refused.
        let empty = Plan { policy: Some(BTreeMap::new()), ..Default::default() };
        applier.apply(&mut datapath, &empty).await.unwrap();
        let only = BTreeMap::from([(entry("0.0.0.0/0"), web)]);
        applier.apply(&mut datapath, &Plan { policy: Some(only), ..Default::default() }).await.unwrap();
        assert_eq!(keys(&datapath.policy_entries().unwrap()), vec![entry("0.0.0.0/0")]);
        // Another pod's entry (a lower address: written first) takes the last room.
        let other = PolicyEntryKey { pod: Ipv4Addr::new(10, 1, 1, 9), ..entry("0.0.0.0/0") };
        let want = BTreeMap::from([(entry("0.0.0.0/0"), web), (entry("10.1.2.0/24"), none), (other, web)]);
        let err = applier.apply(&mut datapath, &Plan { policy: Some(want), ..Default::default() }).await;
        assert!(err.is_err(), "the map is full");
        let left = datapath.policy_entries().unwrap();
        assert!(!left.contains_key(&entry("0.0.0.0/0")), "0.0.0.0/0 went: {left:?}");
        assert_eq!(applier.installed().policy.as_ref().unwrap(), &left, "what is installed is known");
    }
}
