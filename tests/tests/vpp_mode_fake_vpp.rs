//! The cluster in a box in `uplink = "vpp"` mode, against FAKE VPPs (no VPP can run here):
//! every node's agent programs its own `contiv-fake-vpp`, and VPP's own Python client
//! (vpp_papi 2.4.2) reads back what each fake holds. The fakes keep state and answer
//! ARP/ping for their af_xdp interface over a real AF_XDP socket, but forward nothing
//! between nodes, so these tests check what VPP is told and what stays on the eBPF fast
//! path, not cross-node traffic.
//!
//! - three nodes: each fake holds the af_xdp interface on the slow-path port (gateway address
//!   and MAC), the route of the local pod subnet through it, a VXLAN tunnel per other node
//!   that decapsulates to ip4-input, with a route through it via a next hop (an L3 tunnel
//!   cannot ARP) and an input ACL that lets in only that node's pods and the node itself,
//!   an input ACL on the uplink that drops plain packets from the cluster's pod range, the
//!   host interconnect and the node IP, NAT44-ED with the node IP; pods on one node talk on
//!   the fast path, reach their gateway through XDP -> AF_XDP -> (fake) VPP, and send
//!   cross-node traffic to VPP, not to a kernel overlay;
//! - a node leaving (agent killed, lease expired) and joining again;
//! - a fake VPP restarted mid-run: the agent reconnects and replays, pods keep talking, and
//!   the eBPF maps and links are untouched;
//! - an agent restart: VPP keeps serving the pods through the pinned slow-path port, and the
//!   restarted agent takes it over without re-creating VPP's interface;
//! - a node coming back with the store out of reach (as on a single-NIC node, whose network
//!   only VPP gives back): the agent programs the uplink and the host interconnect before
//!   it joins, and the full state follows the join without re-creating them;
//! - a fake VPP that lists a message the agent needs under another CRC;
//! - a remote backend's answer to a pod's ClusterIP flow, handed to the slow-path port as VPP
//!   delivers it (the fake cannot carry it across): translated back to the service address,
//!   an ICMP error about the flow too, and let through a pod isolated for ingress;
//! - a new flow VPP brings into a pod isolated for egress only: recorded, so the pod's
//!   answer leaves as a reply.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use contiv_tests::cluster::{BoxOptions, BoxPod, CLUSTER_POD_CIDR, CONTROL_IP, ClusterBox, enter, ip_in, send_frame};
use contiv_vpp_fake::papi::Papi;
use serde_json::{Value, json};

fn ping(b: &ClusterBox, from: &str, to: Ipv4Addr) -> bool {
    b.cmd(from, "ping")
        .args(["-c", "2", "-i", "0.2", "-W", "2", &to.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn papi(test: &str) -> Option<Papi> {
    Papi::for_test(test)
}

/// What a fake VPP holds, as vpp_papi decodes it.
#[derive(Debug)]
struct VppView {
    /// name -> (sw_if_index, dev type, MAC).
    interfaces: BTreeMap<String, (u64, String, String)>,
    /// prefix -> sw_if_index of each path.
    routes: BTreeMap<String, Vec<u64>>,
    /// prefix -> next hop of each path ("0.0.0.0" for none).
    next_hops: BTreeMap<String, Vec<String>>,
    /// (src, dst, vni, sw_if_index, decap_next_index).
    tunnels: Vec<(String, String, u64, u64, u64)>,
    /// Neighbours: (sw_if_index, address).
    neighbors: BTreeSet<(u64, String)>,
    /// The index of ip4-input among vxlan4-input's next nodes (vpp_papi's add_node_next
    /// returns the arc there, or adds it).
    ip4_input_arc: Option<u64>,
    nat_inside: BTreeSet<String>,
    nat_outside: BTreeSet<String>,
    nat_pool: BTreeSet<String>,
    /// ACLs by index: (tag, each rule as "permit <source prefix>" or "deny <source prefix>").
    acls: BTreeMap<u64, (String, Vec<String>)>,
    /// ACL lists by sw_if_index: (input ACLs, output ACLs).
    acl_lists: BTreeMap<u64, (Vec<u64>, Vec<u64>)>,
    /// Addresses of the af_xdp interface.
    xdp_addresses: Vec<String>,
    /// Requests vpp_papi could not make (the fake lists them with another CRC).
    missing: Vec<String>,
}

fn read_vpp(papi: &Papi, socket: &std::path::Path) -> VppView {
    let calls = json!([
        {"call": "sw_interface_dump", "args": {}},
        {"call": "ip_route_dump", "args": {"table": {"table_id": 0, "is_ip6": false, "name": ""}}},
        {"call": "vxlan_tunnel_v2_dump", "args": {"sw_if_index": 4294967295u32}},
        {"call": "nat44_interface_dump", "args": {}},
        {"call": "nat44_address_dump", "args": {}},
        {"call": "ip_neighbor_dump", "args": {"sw_if_index": 4294967295u32, "af": 0}},
        {"call": "add_node_next", "args": {"node_name": "vxlan4-input", "next_name": "ip4-input"}},
        {"call": "acl_dump", "args": {"acl_index": 4294967295u32}},
        {"call": "acl_interface_list_dump", "args": {"sw_if_index": 4294967295u32}},
    ]);
    let out = papi.drive(socket, calls, false, 0.0);
    let r = &out["results"];
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let mut interfaces = BTreeMap::new();
    let mut names = BTreeMap::new();
    for i in list(&r[0]) {
        let name = i["interface_name"].as_str().unwrap_or_default().to_owned();
        let sw = i["sw_if_index"].as_u64().unwrap_or(u64::MAX);
        names.insert(sw, name.clone());
        interfaces.insert(
            name,
            (sw, i["interface_dev_type"].as_str().unwrap_or_default().to_owned(), i["l2_address"].to_string()),
        );
    }
    let routes = list(&r[1])
        .iter()
        .map(|x| {
            let prefix = x["route"]["prefix"].as_str().unwrap_or_default().to_owned();
            let paths = list(&x["route"]["paths"]).iter().filter_map(|p| p["sw_if_index"].as_u64()).collect();
            (prefix, paths)
        })
        .collect();
    let next_hops = list(&r[1])
        .iter()
        .map(|x| {
            let prefix = x["route"]["prefix"].as_str().unwrap_or_default().to_owned();
            let hops = list(&x["route"]["paths"])
                .iter()
                .map(|p| p["nh"]["address"]["ip4"].as_str().unwrap_or_default().to_owned())
                .collect();
            (prefix, hops)
        })
        .collect();
    let tunnels = list(&r[2])
        .iter()
        .map(|t| {
            (
                t["src_address"].as_str().unwrap_or_default().to_owned(),
                t["dst_address"].as_str().unwrap_or_default().to_owned(),
                t["vni"].as_u64().unwrap_or_default(),
                t["sw_if_index"].as_u64().unwrap_or_default(),
                t["decap_next_index"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    let neighbors = list(&r[5])
        .iter()
        .map(|n| {
            (
                n["neighbor"]["sw_if_index"].as_u64().unwrap_or(u64::MAX),
                n["neighbor"]["ip_address"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let ip4_input_arc = r[6]["retval"].as_i64().filter(|rv| *rv == 0).and(r[6]["next_index"].as_u64());
    let (mut nat_inside, mut nat_outside) = (BTreeSet::new(), BTreeSet::new());
    for i in list(&r[3]) {
        let name = names.get(&i["sw_if_index"].as_u64().unwrap_or(u64::MAX)).cloned().unwrap_or_default();
        let flags = i["flags"].as_u64().unwrap_or_default();
        // NAT_IS_INSIDE = 0x20, NAT_IS_OUTSIDE = 0x10 (nat_types.api).
        if flags & 0x20 != 0 {
            nat_inside.insert(name.clone());
        }
        if flags & 0x10 != 0 {
            nat_outside.insert(name);
        }
    }
    let nat_pool = list(&r[4]).iter().filter_map(|a| a["ip_address"].as_str().map(str::to_owned)).collect();
    let acls = list(&r[7])
        .iter()
        .map(|a| {
            // ACL_ACTION_API_DENY is 0, ..._PERMIT 1.
            let sources = list(&a["r"])
                .iter()
                .map(|x| {
                    let action = if x["is_permit"].as_u64() == Some(0) { "deny" } else { "permit" };
                    format!("{action} {}", x["src_prefix"].as_str().unwrap_or_default())
                })
                .collect();
            (a["acl_index"].as_u64().unwrap_or(u64::MAX), (a["tag"].as_str().unwrap_or_default().to_owned(), sources))
        })
        .collect();
    let acl_lists = list(&r[8])
        .iter()
        .map(|l| {
            let all: Vec<u64> = list(&l["acls"]).iter().filter_map(Value::as_u64).collect();
            let n_input = (l["n_input"].as_u64().unwrap_or_default() as usize).min(all.len());
            (l["sw_if_index"].as_u64().unwrap_or(u64::MAX), (all[..n_input].to_vec(), all[n_input..].to_vec()))
        })
        .collect();
    let mut xdp_addresses = Vec::new();
    if let Some((sw, _, _)) = interfaces.get("xdp-cslow1") {
        let out = papi.drive(
            socket,
            json!([{"call": "ip_address_dump", "args": {"sw_if_index": sw, "is_ipv6": false}}]),
            false,
            0.0,
        );
        xdp_addresses =
            list(&out["results"][0]).iter().filter_map(|a| a["prefix"].as_str().map(str::to_owned)).collect();
    }
    let missing = list(&out["missing"]).iter().filter_map(|m| m.as_str().map(str::to_owned)).collect();
    VppView {
        interfaces,
        routes,
        next_hops,
        tunnels,
        neighbors,
        ip4_input_arc,
        nat_inside,
        nat_outside,
        nat_pool,
        acls,
        acl_lists,
        xdp_addresses,
        missing,
    }
}

/// A node as the others see it: name, node IP, pod subnet (from its agent).
#[derive(Debug, Clone)]
struct NodeFacts {
    name: String,
    ip: Ipv4Addr,
    subnet: String,
    gateway: String,
}

fn facts(b: &ClusterBox, node: &str) -> NodeFacts {
    let v = b.status_json(node, "/node").expect("/node");
    let subnet = v["podSubnet"].as_str().expect("podSubnet").to_owned();
    let (network, len) = subnet.split_once('/').expect("a prefix");
    let network: Ipv4Addr = network.parse().expect("an IPv4 network");
    NodeFacts {
        name: node.to_owned(),
        ip: b.node(node).ip,
        gateway: format!("{}/{len}", Ipv4Addr::from(u32::from(network) + 1)),
        subnet,
    }
}

/// Whether `view` is what `me` must hold with `others` in the cluster; Err says what differs.
fn check_programmed(view: &VppView, me: &NodeFacts, others: &[NodeFacts]) -> Result<(), String> {
    let (xdp_sw, dev, mac) = view.interfaces.get("xdp-cslow1").ok_or("no af_xdp interface xdp-cslow1")?;
    if dev != "AF_XDP interface" {
        return Err(format!("xdp-cslow1 is a {dev} interface"));
    }
    if !mac.contains("02:fe:00:00:00:01") {
        return Err(format!("xdp-cslow1 has MAC {mac}, not the gateway's"));
    }
    if view.xdp_addresses != [me.gateway.clone()] {
        return Err(format!("xdp-cslow1 has addresses {:?}, not the gateway {}", view.xdp_addresses, me.gateway));
    }
    if view.routes.get(&me.subnet) != Some(&vec![*xdp_sw]) {
        return Err(format!("route {} -> xdp-cslow1 missing: {:?}", me.subnet, view.routes));
    }
    if view.tunnels.len() != others.len() {
        return Err(format!("{} tunnels for {} other nodes: {:?}", view.tunnels.len(), others.len(), view.tunnels));
    }
    for o in others {
        let t = view
            .tunnels
            .iter()
            .find(|t| t.1 == o.ip.to_string())
            .ok_or_else(|| format!("no tunnel to {} ({})", o.name, o.ip))?;
        if t.0 != me.ip.to_string() || t.2 != 10 {
            return Err(format!("tunnel to {}: {t:?}", o.name));
        }
        if view.routes.get(&o.subnet) != Some(&vec![t.3]) {
            return Err(format!("route {} of {} is not through its tunnel: {:?}", o.subnet, o.name, view.routes));
        }
        // VPP decapsulates to ip4-input (~0 would be l2-input, where an L3 tunnel drops).
        if view.ip4_input_arc != Some(t.4) {
            return Err(format!(
                "tunnel to {} decapsulates to next node {}, not ip4-input {:?}",
                o.name, t.4, view.ip4_input_arc
            ));
        }
        // Through an L3 tunnel VPP cannot ARP: the route has a next hop (which VPP completes
        // without a neighbour; one on the tunnel would give it an Ethernet rewrite).
        let hop = o.gateway.split('/').next().unwrap_or_default().to_owned();
        if view.next_hops.get(&o.subnet) != Some(&vec![hop.clone()]) {
            return Err(format!("route {} of {} is not via {hop}: {:?}", o.subnet, o.name, view.next_hops));
        }
        if view.neighbors.iter().any(|(sw, _)| *sw == t.3) {
            return Err(format!("a neighbour on the tunnel to {}: {:?}", o.name, view.neighbors));
        }
        // The tunnel's only input ACL lets in that node's pods and the node itself.
        let tunnel = view.interfaces.iter().find(|(_, i)| i.0 == t.3).map(|(n, _)| n.as_str()).unwrap_or_default();
        let want =
            (format!("contiv-tunnel-{tunnel}"), vec![format!("permit {}", o.subnet), format!("permit {}/32", o.ip)]);
        match view.acl_lists.get(&t.3) {
            Some((input, output)) if input.len() == 1 && output.is_empty() => {
                if view.acls.get(&input[0]) != Some(&want) {
                    return Err(format!(
                        "ACL of the tunnel to {}: {:?}, not {want:?}",
                        o.name,
                        view.acls.get(&input[0])
                    ));
                }
            }
            other => return Err(format!("ACL lists of the tunnel to {}: {other:?}", o.name)),
        }
    }
    // The uplink's only input ACL drops plain packets from the cluster's pod range, the
    // host interconnect and the node IP, and lets the rest in.
    let (uplink_sw, _, _) = view.interfaces.get("uplink0").ok_or("no interface uplink0")?;
    let want = (
        "contiv-uplink".to_owned(),
        vec![
            format!("deny {CLUSTER_POD_CIDR}"),
            "deny 172.30.255.0/30".to_owned(),
            format!("deny {}/32", me.ip),
            "permit 0.0.0.0/0".to_owned(),
        ],
    );
    match view.acl_lists.get(uplink_sw) {
        Some((input, _)) if input.len() == 1 && view.acls.get(&input[0]) == Some(&want) => {}
        Some((input, _)) if input.len() == 1 => {
            return Err(format!("ACL of uplink0: {:?}, not {want:?}", view.acls.get(&input[0])));
        }
        other => return Err(format!("ACL lists of uplink0: {other:?}")),
    }
    let ours = view.acls.values().filter(|(tag, _)| tag.starts_with("contiv-")).count();
    if ours != others.len() + 1 {
        return Err(format!(
            "{ours} ACLs of the agent's for {} other nodes and the uplink: {:?}",
            others.len(),
            view.acls
        ));
    }
    // The pod subnets (VPP's own /32s in them aside: the gateway's local route, the
    // neighbours' routes, the subnet's network and broadcast drops).
    let stray: Vec<&String> = view.routes.keys().filter(|p| p.starts_with("10.1.") && !p.ends_with("/32")).collect();
    if stray.len() != 1 + others.len() {
        return Err(format!("pod subnet routes {stray:?} for {} other nodes", others.len()));
    }
    let inside: BTreeSet<String> = ["xdp-cslow1", "tap0"].map(String::from).into();
    if view.nat_inside != inside || view.nat_outside != BTreeSet::from(["uplink0".to_owned()]) {
        return Err(format!("NAT44 features: inside {:?}, outside {:?}", view.nat_inside, view.nat_outside));
    }
    if view.nat_pool != BTreeSet::from([me.ip.to_string()]) {
        return Err(format!("NAT44 pool {:?}, not the node IP {}", view.nat_pool, me.ip));
    }
    Ok(())
}

/// Polls the node's fake VPP with vpp_papi until it holds what it must (or panics).
fn wait_programmed(b: &ClusterBox, papi: &Papi, node: &str, others: &[&str], timeout: Duration) -> VppView {
    let me = facts(b, node);
    let others: Vec<NodeFacts> = others.iter().map(|o| facts(b, o)).collect();
    let deadline = Instant::now() + timeout;
    loop {
        let view = read_vpp(papi, &b.vpp_socket(node));
        match check_programmed(&view, &me, &others) {
            Ok(()) => return view,
            Err(why) if Instant::now() > deadline => {
                panic!(
                    "the fake VPP of {node} does not hold what it must: {why}\n{view:#?}\n{}",
                    b.agent_log(node).lines().rev().take(30).collect::<Vec<_>>().join("\n")
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

fn pod_counter(b: &ClusterBox, pod: &BoxPod, name: &str) -> u64 {
    let pods = b.status_json(&pod.node, "/pods").expect("/pods");
    pods.as_array()
        .unwrap()
        .iter()
        .find(|p| p["ip"] == pod.ip.to_string())
        .and_then(|p| p["counters"][name].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} for {} in {pods}", pod.ip))
}

/// Waits until `pod`'s node reports it in `/policies` as `want` says.
fn wait_for_policy(b: &ClusterBox, pod: &BoxPod, what: &str, want: impl Fn(&Value) -> bool) {
    b.wait_for(Duration::from_secs(15), what, || {
        b.status_json(&pod.node, "/policies").is_some_and(|p| {
            p["pods"].as_array().into_iter().flatten().any(|x| x["ip"] == pod.ip.to_string() && want(x))
        })
    });
}

fn slowport_counter(b: &ClusterBox, node: &str, name: &str) -> u64 {
    let v = b.status_json(node, "/vswitch").expect("/vswitch");
    v["programs"][name].as_u64().unwrap_or_else(|| panic!("no {name} in {v}"))
}

fn gateway_of(pod: &BoxPod) -> Ipv4Addr {
    let o = pod.ip.octets();
    Ipv4Addr::new(o[0], o[1], o[2], 1)
}

/// An address of `subnet` ("10.1.2.0/24"): its `n`th.
fn nth_of(subnet: &str, n: u32) -> Ipv4Addr {
    let network: Ipv4Addr = subnet.split_once('/').expect("a prefix").0.parse().expect("an IPv4 network");
    Ipv4Addr::from(u32::from(network) + n)
}

/// The host's address in `node`'s pod subnet (`/vswitch`), once it is in place: on the
/// Linux end of the tap (which the fake VPP makes, as VPP does), the source the node's
/// host gives its traffic to `remote_pod` (another node's), and routed by VPP to the tap.
fn wait_host_address(b: &ClusterBox, papi: &Papi, node: &str, remote_pod: Ipv4Addr) -> Ipv4Addr {
    let me = facts(b, node);
    let vswitch = b.status_json(node, "/vswitch").unwrap();
    let address: Ipv4Addr = vswitch["vpp"]["hostAddress"].as_str().expect("hostAddress").parse().unwrap();
    let (network, len) = me.subnet.split_once('/').unwrap();
    let last = u32::from(network.parse::<Ipv4Addr>().unwrap()) + (1u32 << (32 - len.parse::<u32>().unwrap())) - 2;
    assert_eq!(address, Ipv4Addr::from(last), "{node}: the highest host address of {}", me.subnet);
    let netns = b.node(node).netns.clone();
    let source = || {
        let out = Command::new("ip").args(["-n", &netns, "route", "get", &remote_pod.to_string()]).output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        out.split_whitespace().skip_while(|w| *w != "src").nth(1).unwrap_or_default().to_owned()
    };
    b.wait_for(Duration::from_secs(15), "the host's pod address on vpp1", || {
        source() == address.to_string()
            && b.status_json(node, "/vswitch").is_some_and(|v| v["vpp"]["hostAddressError"].is_null())
    });
    let addrs = ip_in(&netns, &["-4", "-o", "addr", "show", "dev", "vpp1"]);
    assert!(addrs.contains(&format!("{address}/32 scope link")) && addrs.contains("172.30.255.2/30"), "{addrs}");
    let view = read_vpp(papi, &b.vpp_socket(node));
    let tap = view.interfaces.get("tap0").expect("tap0").0;
    assert_eq!(view.routes.get(&format!("{address}/32")), Some(&vec![tap]), "{node}: VPP routes it to the host");
    address
}

#[test]
fn three_nodes_in_vpp_mode_program_their_own_fake_vpp_read_back_with_vpp_papi() {
    let Some(papi) = papi("three_nodes_in_vpp_mode_program_their_own_fake_vpp_read_back_with_vpp_papi") else {
        return;
    };
    let mut b = ClusterBox::up(BoxOptions::for_test_vpp(3));
    let a = b.add_pod("node-1", "default/a", &[], &[]);
    let c = b.add_pod("node-1", "default/c", &[], &[]);
    let far = b.add_pod("node-2", "default/far", &[], &[]);
    let nodes = ["node-1", "node-2", "node-3"];
    for n in nodes {
        let others: Vec<&str> = nodes.iter().copied().filter(|o| *o != n).collect();
        wait_programmed(&b, &papi, n, &others, Duration::from_secs(30));
        let vswitch = b.status_json(n, "/vswitch").unwrap();
        assert_eq!(vswitch["backend"], "vpp", "{vswitch}");
        assert_eq!(vswitch["vpp"]["connected"], true, "{vswitch}");
        assert_eq!(vswitch["vpp"]["lastReport"]["failed"], json!([]), "{vswitch}");
        assert_eq!(b.status_json(n, "/node").unwrap()["uplinkMode"], "vpp");
        // VPP owns the wire: no kernel overlay device, no masquerade rules on the node.
        let overlay = Command::new("ip").args(["-n", &b.node(n).netns, "link", "show", "cvx0"]).output().unwrap();
        assert!(!overlay.status.success(), "{n} has a kernel overlay device in VPP mode");
        let nft = b.cmd(n, "nft").args(["list", "table", "ip", "contiv"]).output().unwrap();
        assert!(!nft.status.success(), "{n} has masquerade rules in VPP mode");
        // The host's traffic to other nodes' pods leaves from its address in the pod subnet
        // (the tap's is the same on every node), which VPP routes back to the host.
        let remote_pod = if n == "node-2" { a.ip } else { far.ip };
        wait_host_address(&b, &papi, n, remote_pod);
    }

    // Local pod to pod stays on the fast path.
    let fwd = pod_counter(&b, &a, "fwdPackets");
    assert!(ping(&b, &a.id(), c.ip), "pod to pod on one node");
    assert!(pod_counter(&b, &a, "fwdPackets") >= fwd + 2, "redirected by tc_from_pod, not through VPP");

    // The gateway is VPP's af_xdp interface: the ping crosses XDP -> AF_XDP into the fake,
    // which answers with the address and MAC the agent programmed, back through the port.
    let to_vpp = slowport_counter(&b, "node-1", "toVswitchPackets");
    assert!(ping(&b, &a.id(), gateway_of(&a)), "the pod's gateway (VPP's af_xdp interface) answers");
    assert!(slowport_counter(&b, "node-1", "toVswitchPackets") >= to_vpp + 2, "frames reached VPP's socket");
    assert_eq!(slowport_counter(&b, "node-1", "toVswitchNoSocket"), 0, "VPP's socket sat in xsks_map all along");
    assert!(pod_counter(&b, &a, "fromSlowPackets") >= 2, "the replies came back through tc_from_vswitch");

    // Traffic leaving the node goes to VPP (which would tunnel it), not to the kernel.
    let slow = pod_counter(&b, &a, "slowPackets");
    let _ = ping(&b, &a.id(), far.ip); // the fake forwards nothing between nodes
    assert!(pod_counter(&b, &a, "slowPackets") >= slow + 2, "cross-node traffic handed to VPP");
    assert_eq!(pod_counter(&b, &a, "tunnelPackets"), 0, "nothing encapsulated by the kernel datapath");
    assert_eq!(pod_counter(&b, &a, "hostPackets"), 0, "nothing handed to the host stack");

    // A pod's own VXLAN (to VPP's tunnels' port) for another node is dropped at its edge:
    // VPP would take it for the tunnel's, its inner packet then passing as a pod's. UDP to
    // another port there goes to VPP.
    let (a_ip, node2) = (a.ip, b.node("node-2").ip);
    let (dropped, slow) = (pod_counter(&b, &a, "dropOverlayPort"), pod_counter(&b, &a, "slowPackets"));
    enter(&a.netns, move || {
        let s = UdpSocket::bind((a_ip, 0)).unwrap();
        for port in [4789, 4790] {
            s.send_to(b"vxlan?", (node2, port)).unwrap();
        }
    });
    b.wait_for(Duration::from_secs(5), "the pod's UDP to port 4790 handed to VPP", || {
        pod_counter(&b, &a, "slowPackets") > slow
    });
    assert_eq!(pod_counter(&b, &a, "dropOverlayPort"), dropped + 1, "the pod's VXLAN dropped, once");
}

#[test]
fn a_node_leaving_and_rejoining_updates_the_other_nodes_fake_vpps() {
    let Some(papi) = papi("a_node_leaving_and_rejoining_updates_the_other_nodes_fake_vpps") else { return };
    // A short lease (the default, 60 s, outlasts an agent upgrade).
    let mut opts = BoxOptions::for_test_vpp(3);
    opts.agent_config = "nodeLeaseSeconds = 5\n".into();
    let mut b = ClusterBox::up(opts);
    let all = ["node-1", "node-2", "node-3"];
    for n in all {
        let others: Vec<&str> = all.iter().copied().filter(|o| *o != n).collect();
        wait_programmed(&b, &papi, n, &others, Duration::from_secs(30));
    }
    let leaving = facts(&b, "node-3");
    // The agent goes away for good (killed): its registration expires with its lease.
    b.stop_agent("node-3", true);
    wait_programmed(&b, &papi, "node-1", &["node-2"], Duration::from_secs(60));
    wait_programmed(&b, &papi, "node-2", &["node-1"], Duration::from_secs(30));
    for n in ["node-1", "node-2"] {
        let view = read_vpp(&papi, &b.vpp_socket(n));
        assert!(!view.tunnels.iter().any(|t| t.1 == leaving.ip.to_string()), "{n} keeps a tunnel to node-3");
        assert!(!view.routes.contains_key(&leaving.subnet), "{n} keeps node-3's pod subnet");
    }
    // What node-3's own VPP holds stays while its agent is away (it keeps forwarding).
    let stays = read_vpp(&papi, &b.vpp_socket("node-3"));
    assert_eq!(stays.tunnels.len(), 2, "node-3's VPP still tunnels to the others: {stays:?}");

    b.start_agent("node-3");
    assert_eq!(facts(&b, "node-3").subnet, leaving.subnet, "the same pod subnet again");
    for n in all {
        let others: Vec<&str> = all.iter().copied().filter(|o| *o != n).collect();
        wait_programmed(&b, &papi, n, &others, Duration::from_secs(40));
    }
}

/// `bpftool -j` output as JSON.
fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool").arg("-j").args(args).output().expect("bpftool");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

#[test]
fn a_fake_vpp_restart_is_replayed_while_pods_keep_talking_and_ebpf_stays_untouched() {
    let Some(papi) = papi("a_fake_vpp_restart_is_replayed_while_pods_keep_talking_and_ebpf_stays_untouched") else {
        return;
    };
    let mut opts = BoxOptions::for_test_vpp(2);
    // netctl reaches the agents' status ports at the node addresses (for `trace`).
    opts.agent_config = "statusAddr = \"0.0.0.0:9192\"\n".into();
    let mut b = ClusterBox::up(opts);
    let a = b.add_pod("node-1", "default/a", &[], &[]);
    let c = b.add_pod("node-1", "default/c", &[], &[]);
    wait_programmed(&b, &papi, "node-1", &["node-2"], Duration::from_secs(30));
    assert!(ping(&b, &a.id(), gateway_of(&a)), "VPP answers before the restart");
    let before = b.status_json("node-1", "/vswitch").unwrap()["vpp"]["generation"].as_u64().unwrap();

    // The eBPF side as it is: the pod map's entries, the pods' and the port's pinned links.
    let pin_dir = b.node("node-1").pin_dir.clone();
    let pin = |name: &str| pin_dir.join(name).to_string_lossy().into_owned();
    let pods_map = bpftool(&["map", "dump", "pinned", &pin("PODS")]);
    let pod_ifnames: Vec<String> = b
        .status_json("node-1", "/pods")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["hostIfname"].as_str().unwrap().to_owned())
        .collect();
    let mut links = vec![pin("links/cslow1_xdp"), pin("links/cslow0_ingress")];
    links.extend(pod_ifnames.iter().map(|i| pin(&format!("links/{i}"))));
    let link_ids = |links: &[String]| -> Vec<u64> {
        links.iter().map(|l| bpftool(&["link", "show", "pinned", l])["id"].as_u64().unwrap()).collect()
    };
    let ids_before = link_ids(&links);
    let xsks_before = bpftool(&["map", "show", "pinned", &pin("xsks_map")])["id"].clone();

    // `netctl trace` of a packet for the slow path (the gateway is VPP's) notes only while
    // VPP is gone that a real one would be dropped at the port.
    let to_gateway = format!("{}/ICMP", gateway_of(&a));
    let trace_notes = |b: &ClusterBox| -> String {
        let out = b.netctl(&["trace", "--from", &a.id(), "--to", &to_gateway, "-o", "json"]);
        assert!(out.status.success(), "netctl trace: {}", String::from_utf8_lossy(&out.stderr));
        let t: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(t["outcome"], "slow_path", "{t}");
        t["notes"].to_string()
    };
    const DROPPED_AT_THE_PORT: &str = "would be dropped at the slow-path port";
    assert!(!trace_notes(&b).contains(DROPPED_AT_THE_PORT), "VPP serves the port");

    let remote = nth_of(&facts(&b, "node-2").subnet, 7);
    let host = wait_host_address(&b, &papi, "node-1", remote);

    // VPP crashes: what it held is gone, its socket leaves xsks_map with it, its tap too.
    b.stop_vpp("node-1", true);
    let netns = b.node("node-1").netns.clone();
    let vpp1 = || Command::new("ip").args(["-n", &netns, "link", "show", "vpp1"]).output().unwrap().status.success();
    b.wait_for(Duration::from_secs(5), "the tap gone with VPP", || !vpp1());
    assert!(ping(&b, &a.id(), c.ip), "pod to pod keeps working while VPP is down");
    assert!(!ping(&b, &a.id(), gateway_of(&a)), "VPP (the gateway) is really gone");
    b.wait_for(Duration::from_secs(10), "the agent notices", || {
        b.status_json("node-1", "/vswitch").is_some_and(|v| v["vpp"]["connected"] == false)
    });
    assert!(b.cni("node-1", "STATUS", "", "", "", "").exit_code != 0, "CNI STATUS says VPP is not there");
    let notes = trace_notes(&b);
    assert!(notes.contains(DROPPED_AT_THE_PORT) && notes.contains("to_vswitch_no_socket"), "{notes}");

    // VPP comes back empty: the agent reconnects and replays everything.
    b.start_vpp("node-1");
    wait_programmed(&b, &papi, "node-1", &["node-2"], Duration::from_secs(30));
    b.wait_for(Duration::from_secs(10), "a new connection converged", || {
        b.status_json("node-1", "/vswitch").is_some_and(|v| {
            v["vpp"]["generation"].as_u64().unwrap_or(0) > before
                && v["vpp"]["connected"] == true
                && v["vpp"]["lastReport"]["failed"] == json!([])
        })
    });
    assert!(ping(&b, &a.id(), gateway_of(&a)), "the new af_xdp socket landed in the same xsks_map");
    assert!(ping(&b, &a.id(), c.ip), "pod to pod after the restart");
    // The restarted VPP made its tap anew, without the host's pod address: put back.
    assert_eq!(wait_host_address(&b, &papi, "node-1", remote), host, "the same address");

    assert_eq!(bpftool(&["map", "dump", "pinned", &pin("PODS")]), pods_map, "PODS entries untouched");
    assert_eq!(link_ids(&links), ids_before, "the pods' and the port's links untouched");
    assert_eq!(bpftool(&["map", "show", "pinned", &pin("xsks_map")])["id"], xsks_before, "the same xsks_map");
}

#[test]
fn an_agent_restart_in_vpp_mode_keeps_the_fake_vpp_serving_the_pods() {
    let Some(papi) = papi("an_agent_restart_in_vpp_mode_keeps_the_fake_vpp_serving_the_pods") else { return };
    let mut b = ClusterBox::up(BoxOptions::for_test_vpp(2));
    let a = b.add_pod("node-1", "default/a", &[], &[]);
    let before = wait_programmed(&b, &papi, "node-1", &["node-2"], Duration::from_secs(30));
    let pin = b.node("node-1").pin_dir.join("links/cslow1_xdp").to_string_lossy().into_owned();
    let xdp_link = bpftool(&["link", "show", "pinned", &pin])["id"].clone();
    assert!(ping(&b, &a.id(), gateway_of(&a)));

    b.stop_agent("node-1", false);
    assert!(ping(&b, &a.id(), gateway_of(&a)), "VPP keeps answering the pod while its agent is away");
    b.start_agent("node-1");
    let after = wait_programmed(&b, &papi, "node-1", &["node-2"], Duration::from_secs(30));
    assert_eq!(
        after.interfaces["xdp-cslow1"].0, before.interfaces["xdp-cslow1"].0,
        "VPP's af_xdp interface was kept, not re-created"
    );
    assert_eq!(bpftool(&["link", "show", "pinned", &pin])["id"], xdp_link, "the XDP link was updated in place");
    assert!(ping(&b, &a.id(), gateway_of(&a)), "the socket is still registered after the restart");
    let log = b.agent_log("node-1");
    assert!(!log.contains("removed xdp-cslow1"), "the port was kept, so VPP's interface was not stale");
}

/// The uplink's addresses and the host tap `(sw_if_index, host_if_name, host_ip4_prefix)`,
/// as vpp_papi reads them from a fake VPP.
fn read_uplink_and_tap(
    papi: &Papi,
    socket: &std::path::Path,
    view: &VppView,
) -> (Vec<String>, Option<(u64, String, String)>) {
    let mut calls = vec![json!({"call": "sw_interface_tap_v2_dump", "args": {"sw_if_index": 4294967295u32}})];
    if let Some((sw, _, _)) = view.interfaces.get("uplink0") {
        calls.push(json!({"call": "ip_address_dump", "args": {"sw_if_index": sw, "is_ipv6": false}}));
    }
    let out = papi.drive(socket, Value::Array(calls), false, 0.0);
    let r = &out["results"];
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let tap = list(&r[0]).first().map(|t| {
        (
            t["sw_if_index"].as_u64().unwrap_or(u64::MAX),
            t["host_if_name"].as_str().unwrap_or_default().to_owned(),
            t["host_ip4_prefix"].as_str().unwrap_or_default().to_owned(),
        )
    });
    let addresses = list(&r[1]).iter().filter_map(|a| a["prefix"].as_str().map(str::to_owned)).collect();
    (addresses, tap)
}

/// Whether a fake VPP holds the bootstrap (uplink, host interconnect, NAT44) and nothing of
/// the pods; Err says what differs.
fn check_bootstrapped(
    view: &VppView,
    uplink_addresses: &[String],
    tap: &Option<(u64, String, String)>,
    node_ip: Ipv4Addr,
) -> Result<(), String> {
    let (uplink_sw, _, _) = view.interfaces.get("uplink0").ok_or("no uplink0")?;
    if uplink_addresses != [format!("{node_ip}/24")] {
        return Err(format!("uplink0 has addresses {uplink_addresses:?}"));
    }
    if view.routes.get("0.0.0.0/0") != Some(&vec![*uplink_sw]) {
        return Err(format!("no default route through uplink0: {:?}", view.routes));
    }
    let (tap_sw, host_if, host_ip) = tap.as_ref().ok_or("no host tap")?;
    if view.interfaces.get("tap0").map(|i| i.0) != Some(*tap_sw) || host_if != "vpp1" || host_ip != "172.30.255.2/30" {
        return Err(format!("the host tap is {tap:?}"));
    }
    if view.nat_inside != BTreeSet::from(["tap0".to_owned()])
        || view.nat_outside != BTreeSet::from(["uplink0".to_owned()])
        || view.nat_pool != BTreeSet::from([node_ip.to_string()])
    {
        return Err(format!(
            "NAT44: inside {:?}, outside {:?}, pool {:?}",
            view.nat_inside, view.nat_outside, view.nat_pool
        ));
    }
    Ok(())
}

/// contiv-stn took a single-NIC node's network, so the store is out of reach until VPP holds
/// the uplink and the host interconnect: the agent programs them before it joins the store
/// (the box's nodes keep their own NIC, so the store is made unreachable with a route), and
/// once the store answers the full state follows without re-creating what it set up.
#[test]
fn vpp_gets_the_uplink_and_host_interconnect_before_the_agent_joins_the_store() {
    let Some(papi) = papi("vpp_gets_the_uplink_and_host_interconnect_before_the_agent_joins_the_store") else {
        return;
    };
    let mut b = ClusterBox::up(BoxOptions::for_test_vpp(2));
    wait_programmed(&b, &papi, "node-2", &["node-1"], Duration::from_secs(30));
    // node-2 comes back from a reboot: its agent is gone, its VPP starts empty.
    b.stop_agent("node-2", false);
    b.stop_vpp("node-2", true);
    b.start_vpp("node-2");
    let node = b.node("node-2").clone();
    let socket = b.vpp_socket("node-2");
    let log_path = node.dir.join("agent.log");
    let log_from = std::fs::metadata(&log_path).map(|m| m.len() as usize).unwrap_or(0);
    let new_log = || String::from_utf8_lossy(&std::fs::read(&log_path).unwrap_or_default()[log_from..]).into_owned();
    let store = format!("{CONTROL_IP}/32");
    ip_in(&node.netns, &["route", "add", "unreachable", &store]);

    // While the agent starts (start_agent waits until it runs), VPP must get the bootstrap
    // while the agent still fails to reach the store; then the store comes back. (The CNI
    // socket is bound from the agent's first moment, so only VPP's full state, the af_xdp
    // port above all, tells that the agent joined.)
    let seen = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut failed_joins_then = None;
            let seen = loop {
                let view = read_vpp(&papi, &socket);
                let (uplink_addresses, tap) = read_uplink_and_tap(&papi, &socket, &view);
                let failed_joins = new_log().matches("store not reachable yet").count();
                let state = check_bootstrapped(&view, &uplink_addresses, &tap, node.ip).and_then(|()| {
                    if view.interfaces.contains_key("xdp-cslow1") {
                        Err("the agent joined the store while it was out of reach".to_owned())
                    } else {
                        Ok(())
                    }
                });
                match state {
                    // A join failed after VPP held it: the agent is still trying to join.
                    Ok(()) if failed_joins_then.is_some_and(|n| failed_joins > n) => break Ok((view, tap)),
                    Ok(()) => {
                        failed_joins_then.get_or_insert(failed_joins);
                    }
                    Err(why) if Instant::now() > deadline => {
                        break Err(format!(
                            "the fake VPP does not hold the bootstrap while the store is out of reach \
                             ({failed_joins} failed joins): {why}\n{view:#?}"
                        ));
                    }
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_millis(300));
            };
            ip_in(&node.netns, &["route", "del", "unreachable", &store]);
            seen
        });
        b.start_agent("node-2");
        watcher.join().expect("the watcher")
    });
    let (boot, boot_tap) = seen.unwrap_or_else(|e| panic!("{e}\n{}", new_log()));
    let log = new_log();
    assert!(log.contains("VPP bootstrap: applied"), "{log}");

    // The store answers: the full state follows (af_xdp port, pod subnet route, tunnel),
    // growing what the bootstrap set up without deleting and re-creating it.
    let full = wait_programmed(&b, &papi, "node-2", &["node-1"], Duration::from_secs(30));
    let (_, full_tap) = read_uplink_and_tap(&papi, &socket, &full);
    for name in ["uplink0", "tap0"] {
        assert_eq!(full.interfaces[name].0, boot.interfaces[name].0, "{name} has the same sw_if_index");
    }
    assert_eq!(full_tap, boot_tap, "the host tap is the same");
    assert_eq!(full.routes["0.0.0.0/0"], boot.routes["0.0.0.0/0"], "the default route stays");
    // The fake numbers interfaces in creation order and never reuses a number: contiguous
    // numbers after the bootstrap's mean nothing was created twice.
    let mut numbers: Vec<u64> = full.interfaces.values().map(|i| i.0).collect();
    numbers.sort();
    assert_eq!(numbers, (0..numbers.len() as u64).collect::<Vec<_>>(), "no interface re-created: {full:#?}");
    let log = new_log();
    assert!(log.contains("the bootstrap's supervisor takes over"), "one supervisor, handed over: {log}");
    assert!(!log.contains("VPP refused"), "{log}");
}

#[test]
fn a_crc_mismatch_in_the_fake_vpp_is_reported_naming_the_message_and_the_agent_keeps_running() {
    let Some(papi) = papi("a_crc_mismatch_in_the_fake_vpp_is_reported_naming_the_message_and_the_agent_keeps_running")
    else {
        return;
    };
    let opts = BoxOptions {
        fake_vpp: Some(vec!["--crc-override".into(), "af_xdp_create_v3=0xdeadbeef".into()]),
        ..BoxOptions::for_test(1)
    };
    let mut b = ClusterBox::up(opts);
    let mut last = Value::Null;
    b.wait_for(Duration::from_secs(20), "the agent reports the refused message", || {
        last = b.status_json("node-1", "/vswitch").unwrap_or_default();
        last["vpp"]["lastReport"]["failed"].as_array().is_some_and(|f| {
            f.iter().any(|x| {
                let error = x["error"].as_str().unwrap_or_default();
                x["what"] == "create interface xdp-cslow1"
                    && error.contains("af_xdp_create_v3")
                    && error.contains("CRC")
            })
        })
    });
    let failed = last["vpp"]["lastReport"]["failed"].as_array().unwrap();
    // The interface, and what needs it (its route, its NAT feature): nothing else.
    for f in failed {
        assert!(f.to_string().contains("xdp-cslow1"), "only what needs the af_xdp interface fails: {f}");
    }
    assert!(b.agent_log("node-1").contains("af_xdp_create_v3"), "the log names the message too");
    // Nothing was sent for it, the rest was applied, and the agent keeps serving.
    let view = read_vpp(&papi, &b.vpp_socket("node-1"));
    assert!(view.missing.contains(&"af_xdp_create_v3".to_owned()), "vpp_papi refuses it too: {:?}", view.missing);
    assert!(!view.interfaces.contains_key("xdp-cslow1"));
    assert!(view.interfaces.contains_key("tap0"), "the host interconnect was created: {view:?}");
    assert_eq!(view.nat_pool, BTreeSet::from([b.node("node-1").ip.to_string()]), "NAT44 was set up");
    let p = b.add_pod("node-1", "default/still", &[], &[]);
    let q = b.add_pod("node-1", "default/works", &[], &[]);
    assert!(ping(&b, &p.id(), q.ip), "pods are wired and talk while VPP refuses the message");
    assert_eq!(b.cni("node-1", "STATUS", "", "", "", "").exit_code, 0, "the agent is up and connected");
}

/// The MAC address of `ifname` in network namespace `ns`.
fn mac_of(ns: &str, ifname: &str) -> [u8; 6] {
    let links: Value = serde_json::from_str(&ip_in(ns, &["-j", "link", "show", "dev", ifname])).expect("ip -j link");
    let text = links[0]["address"].as_str().unwrap_or_else(|| panic!("no MAC for {ifname} in {ns}: {links}"));
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("MAC");
    }
    mac
}

/// The Internet checksum of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (no options) for `payload_len` bytes of `proto` from `src` to `dst`.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

/// A UDP datagram (its header and payload) with its checksum.
fn udp_datagram(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::new();
    u.extend_from_slice(&src.port().to_be_bytes());
    u.extend_from_slice(&dst.port().to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    pseudo.extend_from_slice(&u);
    let sum = match checksum(&pseudo) {
        0 => 0xffff,
        s => s,
    };
    u[6..8].copy_from_slice(&sum.to_be_bytes());
    u
}

/// An Ethernet frame carrying an IPv4 packet.
fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], ip_packet: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(ip_packet);
    f
}

/// A UDP answer `from` -> `to` as an IPv4 packet.
fn udp_packet(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp = udp_datagram(from, to, payload);
    let mut p = ipv4_header(*from.ip(), *to.ip(), 17, udp.len());
    p.extend_from_slice(&udp);
    p
}

/// "Port unreachable" from `from` about the datagram `quoted_src` -> `quoted_dst` (RFC 792:
/// its IPv4 header and first 8 bytes), as an IPv4 packet to `quoted_src`.
fn port_unreachable(from: Ipv4Addr, quoted_src: SocketAddrV4, quoted_dst: SocketAddrV4) -> Vec<u8> {
    let quoted = udp_packet(quoted_src, quoted_dst, b"question");
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[..28]);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut p = ipv4_header(from, *quoted_src.ip(), 1, icmp.len());
    p.extend_from_slice(&icmp);
    p
}

/// A pod's UDP flow to a ClusterIP whose backend is on another node leaves through VPP, and
/// VPP brings the backend's answer back through the slow-path port (`tc_from_vswitch`),
/// which gives it the service's address back as the overlay's program does in kernel mode:
/// a connected socket (every resolver's) drops an answer from the backend's own address.
/// The fake forwards nothing between nodes, so the test hands node-1's slow-path port the
/// frames VPP would deliver, on its vswitch end (`cslow1`).
#[test]
fn a_remote_backends_answer_through_the_fake_vpp_is_translated_back_to_the_service() {
    let mut b = ClusterBox::up(BoxOptions::for_test_vpp(2));
    let c = b.add_pod("node-1", "default/c", &[("app", "client")], &[]);
    let web = b.add_pod("node-2", "default/web", &[("app", "web")], &[]);
    b.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.0.53\n  clusterIPs: [10.96.0.53]\n  selector: {{app: web}}\n\
         \x20 ports: [{{name: dns, port: 53, targetPort: 5353, protocol: UDP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: dns-1, namespace: default, labels: {{kubernetes.io/service-name: dns}}}}\n\
         addressType: IPv4\nendpoints: [{{addresses: [{}], conditions: {{ready: true}}, nodeName: node-2}}]\n\
         ports: [{{name: dns, port: 5353, protocol: UDP}}]\n",
        web.ip
    ));
    b.wait_for(Duration::from_secs(15), "node-1 programs the service", || {
        b.status_json("node-1", "/services").is_some_and(|r| {
            r["frontends"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| f["frontend"] == "10.96.0.53:53" && f["backends"].as_array().is_some_and(|a| a.len() == 1))
        })
    });
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 53), 53);
    let backend = SocketAddrV4::new(web.ip, 5353);
    let node_ns = b.node("node-1").netns.clone();
    let (pod_mac, vpp_mac) = (mac_of(&c.netns, "eth0"), mac_of(&node_ns, "cslow1"));
    let deliver = |packet: Vec<u8>| send_frame(&node_ns, "cslow1", frame(pod_mac, vpp_mac, &packet));

    // A connected socket (a resolver's) and an unconnected one each ask the service once;
    // each datagram leaves for VPP DNAT'ed to the backend, which answers through VPP.
    let ask = |connect: bool| {
        enter(&c.netns, move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            if connect {
                s.connect(vip).expect("connect");
                s.send(b"question").expect("send");
            } else {
                s.send_to(b"question", vip).expect("send_to");
            }
            s
        })
    };
    let slow = pod_counter(&b, &c, "slowPackets");
    let (connected, unconnected) = (ask(true), ask(false));
    assert!(pod_counter(&b, &c, "slowPackets") >= slow + 2, "both questions were handed to VPP");
    for (s, what) in [(&connected, "connected"), (&unconnected, "unconnected")] {
        let port = s.local_addr().unwrap().port();
        deliver(udp_packet(backend, SocketAddrV4::new(c.ip, port), b"answer"));
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf).unwrap_or_else(|e| panic!("{what} socket: no answer ({e})"));
        assert_eq!(&buf[..n], b"answer");
        assert_eq!(from, SocketAddr::V4(vip), "the {what} socket's answer comes from the service");
    }

    // "Port unreachable" from the backend about a question: the connected socket reads
    // "connection refused", which it does only for an error quoting what it sent.
    let port = connected.local_addr().unwrap().port();
    connected.send(b"question").expect("send");
    deliver(port_unreachable(web.ip, SocketAddrV4::new(c.ip, port), backend));
    let mut buf = [0u8; 64];
    let err = connected.recv(&mut buf).expect_err("an error, not an answer");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    // Isolated for ingress with no rule: the answer is a reply, so it still comes in; a
    // datagram from the backend to a port the pod never sent from is a new flow, dropped.
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: default}\n\
         spec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Ingress]\n",
    );
    wait_for_policy(&b, &c, "c is isolated for ingress", |x| x["ingressIsolated"] == true);
    connected.send(b"question").expect("send");
    deliver(udp_packet(backend, SocketAddrV4::new(c.ip, port), b"answer"));
    let n = connected.recv(&mut buf).expect("the answer passes the pod's ingress isolation");
    assert_eq!(&buf[..n], b"answer");
    let stray = enter(&c.netns, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        s
    });
    let dropped = pod_counter(&b, &c, "dropPolicyIngress");
    deliver(udp_packet(backend, SocketAddrV4::new(c.ip, stray.local_addr().unwrap().port()), b"stray"));
    assert!(stray.recv(&mut buf).is_err(), "a new flow into an isolated pod is dropped");
    assert!(pod_counter(&b, &c, "dropPolicyIngress") > dropped, "and counted as the pod's ingress drop");
}

/// VPP brings a new flow from another node or the outside into a pod that is isolated for
/// egress only (deny all but DNS, a common pattern): the flow is recorded as it comes in,
/// so the pod's answer is a reply, which its egress rules do not judge, and it leaves for
/// VPP. The frames VPP would deliver are handed to the slow-path port, as above.
#[test]
fn a_pod_isolated_for_egress_only_answers_flows_vpp_brings_in() {
    let mut b = ClusterBox::up(BoxOptions::for_test_vpp(1));
    let s = b.add_pod("node-1", "default/s", &[("app", "server")], &[]);
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: dns-only, namespace: default}\n\
         spec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Egress]\n\
         \x20 egress: [{ports: [{port: 53, protocol: UDP}]}]\n",
    );
    wait_for_policy(&b, &s, "s is isolated for egress, not for ingress", |x| {
        x["egressIsolated"] == true && x["ingressIsolated"] == false
    });
    let node_ns = b.node("node-1").netns.clone();
    let (pod_mac, vpp_mac) = (mac_of(&s.netns, "eth0"), mac_of(&node_ns, "cslow1"));
    let server = enter(&s.netns, || {
        let u = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 7000)).expect("bind");
        u.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        u
    });
    let client = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 9), 40000);
    let (dropped, to_vpp) = (pod_counter(&b, &s, "dropPolicyEgress"), pod_counter(&b, &s, "slowPackets"));
    send_frame(
        &node_ns,
        "cslow1",
        frame(pod_mac, vpp_mac, &udp_packet(client, SocketAddrV4::new(s.ip, 7000), b"ping")),
    );
    let mut buf = [0u8; 64];
    let (n, from) = server.recv_from(&mut buf).expect("the new flow comes in");
    assert_eq!((&buf[..n], from), (&b"ping"[..], SocketAddr::V4(client)));
    server.send_to(b"pong", from).expect("send");
    b.wait_for(Duration::from_secs(5), "the answer is handed to VPP", || pod_counter(&b, &s, "slowPackets") > to_vpp);
    assert_eq!(pod_counter(&b, &s, "dropPolicyEgress"), dropped, "the answer is a reply, not a new egress flow");
    // A flow the pod opens itself is still judged by its egress rules.
    let before = pod_counter(&b, &s, "dropPolicyEgress");
    server.send_to(b"new", SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 9), 40001)).expect("send");
    b.wait_for(Duration::from_secs(5), "a new flow out is dropped", || {
        pod_counter(&b, &s, "dropPolicyEgress") > before
    });
}

/// The host's address in the pod subnet is one of the node's addresses: a pod isolated for
/// ingress admits what VPP delivers from it (the host's traffic through the tap, as from the
/// tap's address), and not from another address of the pod range that is no pod's.
#[test]
fn a_pod_isolated_for_ingress_admits_its_host_from_the_hosts_pod_address_through_vpp() {
    let mut b = ClusterBox::up(BoxOptions::for_test_vpp(1));
    let s = b.add_pod("node-1", "default/s", &[("app", "server")], &[]);
    b.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-in, namespace: default}\n\
         spec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n",
    );
    wait_for_policy(&b, &s, "s is isolated for ingress", |x| x["ingressIsolated"] == true);
    let host: Ipv4Addr = b.status_json("node-1", "/vswitch").unwrap()["vpp"]["hostAddress"]
        .as_str()
        .expect("hostAddress")
        .parse()
        .unwrap();
    let node_ns = b.node("node-1").netns.clone();
    let (pod_mac, vpp_mac) = (mac_of(&s.netns, "eth0"), mac_of(&node_ns, "cslow1"));
    let server = enter(&s.netns, || {
        let u = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 7000)).expect("bind");
        u.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        u
    });
    let from_vpp = |src: Ipv4Addr| {
        let client = SocketAddrV4::new(src, 40000);
        send_frame(
            &node_ns,
            "cslow1",
            frame(pod_mac, vpp_mac, &udp_packet(client, SocketAddrV4::new(s.ip, 7000), b"hi")),
        );
        client
    };
    let mut buf = [0u8; 64];
    for src in [Ipv4Addr::new(172, 30, 255, 2), host] {
        let client = from_vpp(src);
        let (n, from) = server.recv_from(&mut buf).unwrap_or_else(|e| panic!("from {src}: {e}"));
        assert_eq!((&buf[..n], from), (&b"hi"[..], SocketAddr::V4(client)));
    }
    // Another address of the pod range, no pod's and not the host's: dropped.
    let dropped = pod_counter(&b, &s, "dropPolicyIngress");
    from_vpp(Ipv4Addr::from(u32::from(host) - 1));
    assert!(server.recv_from(&mut buf).is_err(), "a pod-range address that is not the host's came in");
    assert_eq!(pod_counter(&b, &s, "dropPolicyIngress"), dropped + 1);
}
