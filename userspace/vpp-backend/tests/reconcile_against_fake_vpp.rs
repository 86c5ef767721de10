//! The VPP backend against the fake VPP (no VPP can run here): a node converges, nodes join
//! and leave, drift is repaired, a VPP restart mid-run is replayed, three nodes each with
//! their own fake form a consistent mesh. vpp_papi (VPP's own Python client) reads back what
//! was programmed, so the check does not rely on our decoder alone.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use contiv_vpp_backend::{
    NodeInputs, ReconcileReport, Reconciler, RemoteNode, SupervisorOptions, UplinkHandover, UplinkRoute, VppConfig,
    VppDesired, VppSupervisor, render,
};
use contiv_vpp_binapi::{Client, ClientOptions, api};
use contiv_vpp_fake::{
    FakeOptions, FakeVpp,
    papi::Papi,
    state::{FakeState, Forwarding, Ip4Rx, Packet4, VxlanRx, fib_source},
};
use ipnet::{IpNet, Ipv4Net};
use serde_json::{Value, json};
use tokio::sync::watch;

const GATEWAY_MAC: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 1];

fn node(id: u32) -> RemoteNode {
    RemoteNode {
        id,
        name: format!("node{id}"),
        pod_subnet: format!("10.1.{id}.0/24").parse().unwrap(),
        node_ip: Ipv4Addr::new(192, 168, 16, id as u8),
    }
}

fn uplink(id: u32) -> UplinkHandover {
    UplinkHandover {
        addresses: vec![format!("192.168.16.{id}/24").parse().unwrap()],
        routes: vec![UplinkRoute {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(192, 168, 16, 254)),
        }],
        mtu: Some(1500),
    }
}

/// What node `id` must hold in VPP when the cluster has `nodes`.
fn desired(id: u32, nodes: &[u32]) -> VppDesired {
    desired_with_uplink(id, nodes, &uplink(id))
}

/// [`desired`], with the NIC's configuration `up` handed over.
fn desired_with_uplink(id: u32, nodes: &[u32], up: &UplinkHandover) -> VppDesired {
    let remotes: Vec<RemoteNode> = nodes.iter().map(|n| node(*n)).collect();
    desired_with_remotes(id, &remotes, up)
}

/// What node `id` must hold in VPP with `remotes` as the cluster's nodes.
fn desired_with_remotes(id: u32, remotes: &[RemoteNode], up: &UplinkHandover) -> VppDesired {
    desired_with_range(id, remotes, up, Some("10.1.0.0/16".parse().unwrap()))
}

/// [`desired_with_remotes`], with `cluster_pod_cidr` as the cluster's pod range.
fn desired_with_range(
    id: u32,
    remotes: &[RemoteNode],
    up: &UplinkHandover,
    cluster_pod_cidr: Option<Ipv4Net>,
) -> VppDesired {
    let cfg = VppConfig::default();
    render(&NodeInputs {
        config: &cfg,
        node_id: id,
        pod_subnet: node(id).pod_subnet,
        gateway: Ipv4Addr::new(10, 1, id as u8, 1),
        gateway_mac: GATEWAY_MAC,
        slowpath_ifname: "cslow1",
        mtu: 1450,
        uplink: up,
        remote_nodes: remotes,
        cluster_pod_cidr,
        host_pod_address: Some(Ipv4Addr::new(10, 1, id as u8, 254)),
    })
    .expect("render")
}

fn fake(dir: &tempfile::TempDir) -> FakeVpp {
    let mut opts = FakeOptions::new(dir.path().join("api.sock"));
    opts.nics = vec![("uplink0".into(), [0x52, 0x54, 0, 0, 0, 1])];
    FakeVpp::start(opts).expect("fake VPP")
}

async fn client(fake: &FakeVpp) -> Client {
    Client::connect(ClientOptions::new(fake.socket())).await.expect("connect")
}

/// A fake VPP that node 1 of a two-node cluster has been reconciled into once: the fake,
/// the reconciler and what it was given.
async fn reconciled(dir: &tempfile::TempDir) -> (FakeVpp, Reconciler, VppDesired) {
    let fake = fake(dir);
    let rec = Reconciler::new(client(&fake).await);
    let d = desired(1, &[1, 2]);
    rec.reconcile(&d).await.unwrap();
    (fake, rec, d)
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// What node `to`'s VPP does with a VXLAN packet from node `from` (VNI 10) whose inner
/// packet goes from `inner_src` to a pod of node `to`.
fn vxlan_from(s: &FakeState, from: u32, to: u32, inner_src: Ipv4Addr) -> VxlanRx {
    let node_ip = |n: u32| Ipv4Addr::new(192, 168, 16, n as u8);
    let pod = Ipv4Addr::new(10, 1, to as u8, 7);
    s.vxlan4_rx(node_ip(from), node_ip(to), 10, Packet4::udp(inner_src, 40000, pod, 8080))
}

/// What node `to`'s VPP does with a plain UDP packet from `src` to one of its pods,
/// received from the wire on its uplink.
fn plain_on_uplink(s: &FakeState, to: u32, src: Ipv4Addr) -> Ip4Rx {
    let uplink = s.interface_by_name("uplink0").unwrap().sw_if_index;
    s.ip4_rx(uplink, Packet4::udp(src, 40000, Ipv4Addr::new(10, 1, to as u8, 7), 8080))
}

/// Whether `rx` is a packet decapsulated on `sw_if_index` and delivered.
fn forwarded(rx: &VxlanRx, sw_if_index: u32) -> bool {
    matches!(rx, VxlanRx::Forward { sw_if_index: sw, forwarding } if *sw == sw_if_index && forwarding.delivers())
}

/// The ACLs of the fake tagged as the reconciler's, by tag.
fn our_acls(s: &FakeState) -> std::collections::BTreeMap<String, u32> {
    s.acls.iter().filter(|(_, a)| a.tag.starts_with("contiv-")).map(|(i, a)| (a.tag.clone(), *i)).collect()
}

/// The requests of `after` that change something and were not in `before`.
fn writes_between(
    before: &std::collections::BTreeMap<&'static str, u64>,
    after: &std::collections::BTreeMap<&'static str, u64>,
) -> Vec<(&'static str, u64)> {
    after
        .iter()
        .filter(|(name, n)| {
            !name.ends_with("_dump")
                && **name != "control_ping"
                && !name.starts_with("nat44_show")
                && before.get(*name) != Some(n)
        })
        .map(|(name, n)| (*name, *n))
        .collect()
}

/// Checks that the fake holds what node `id` must hold with `nodes` in the cluster.
fn assert_node_state(fake: &FakeVpp, id: u32, nodes: &[u32]) {
    let s = fake.state();
    let names: BTreeSet<&str> = s.interfaces.values().map(|i| i.name.as_str()).collect();
    let mut want: BTreeSet<String> =
        ["local0", "uplink0", "tap0", "xdp-cslow1"].iter().map(|s| s.to_string()).collect();
    for n in nodes.iter().filter(|n| **n != id) {
        want.insert(format!("vxlan_tunnel{n}"));
    }
    assert_eq!(names, want.iter().map(String::as_str).collect(), "interfaces of node {id}");
    let xdp = s.interface_by_name("xdp-cslow1").unwrap();
    assert!(xdp.admin_up);
    assert_eq!(xdp.mac, GATEWAY_MAC);
    assert_eq!(xdp.addresses, vec![net(&format!("10.1.{id}.1/24"))]);
    assert!(matches!(&xdp.kind, contiv_vpp_fake::state::InterfaceKind::AfXdp(c) if c.host_if == "cslow1"));
    let up = s.interface_by_name("uplink0").unwrap();
    assert!(up.admin_up);
    assert_eq!(up.addresses, vec![net(&format!("192.168.16.{id}/24"))]);
    let routes = s.ip4_routes();
    let mut want_routes = vec![
        (net("0.0.0.0/0"), vec![(Some("192.168.16.254".parse().unwrap()), up.sw_if_index)]),
        (net(&format!("10.1.{id}.0/24")), vec![(None, xdp.sw_if_index)]),
        (
            net(&format!("10.1.{id}.254/32")),
            vec![(Some(ip("172.30.255.2").into()), s.interface_by_name("tap0").unwrap().sw_if_index)],
        ),
    ];
    for n in nodes.iter().filter(|n| **n != id) {
        let t = s.interface_by_name(&format!("vxlan_tunnel{n}")).unwrap();
        assert!(t.admin_up);
        assert_eq!(t.unnumbered_to, Some(up.sw_if_index), "tunnel borrows the uplink's address");
        match &t.kind {
            contiv_vpp_fake::state::InterfaceKind::Vxlan(v) => {
                assert_eq!(v.src_address.to_ipv4(), Some(Ipv4Addr::new(192, 168, 16, id as u8)));
                assert_eq!(v.dst_address.to_ipv4(), Some(Ipv4Addr::new(192, 168, 16, *n as u8)));
                assert_eq!((v.vni, v.instance, v.is_l3), (10, *n, true));
            }
            other => panic!("{other:?}"),
        }
        let hop = Ipv4Addr::new(10, 1, *n as u8, 1);
        want_routes.push((net(&format!("10.1.{n}.0/24")), vec![(Some(IpAddr::V4(hop)), t.sw_if_index)]));
        // What VPP would do with the tunnel's traffic: decapsulated packets go to
        // ip4-input (not l2-input, where an L3 tunnel drops them), and packets to the
        // remote pods leave through a complete adjacency (not a glean: no ARP on an L3
        // tunnel; and no neighbour entry, which would give it an Ethernet rewrite).
        assert_eq!(s.vxlan_decap_next(t.sw_if_index), Some("ip4-input"), "vxlan_tunnel{n} decapsulates to IP");
        let remote_pod = Ipv4Addr::new(10, 1, *n as u8, 7);
        assert_eq!(
            s.ip4_lookup(0, remote_pod),
            Forwarding::Complete { sw_if_index: t.sw_if_index, next_hop: IpAddr::V4(hop) },
            "node {id} sends to {remote_pod} into vxlan_tunnel{n}"
        );
        assert!(!s.neighbors.keys().any(|(sw, _)| *sw == t.sw_if_index), "no neighbour on vxlan_tunnel{n}");
        // The tunnel's only input ACL lets in the pods of its node and the node itself,
        // nothing else: not another node's pods, not any other address.
        let (input, output) = s.acl_bindings.get(&t.sw_if_index).cloned().unwrap_or_default();
        assert!(input.len() == 1 && output.is_empty(), "one input ACL on vxlan_tunnel{n}: {input:?} {output:?}");
        assert_eq!(s.acls[&input[0]].tag, format!("contiv-tunnel-vxlan_tunnel{n}"));
        for src in [Ipv4Addr::new(10, 1, *n as u8, 9), Ipv4Addr::new(192, 168, 16, *n as u8)] {
            let rx = vxlan_from(&s, *n, id, src);
            assert!(forwarded(&rx, t.sw_if_index), "{src} through vxlan_tunnel{n}: {rx:?}");
        }
        // A remote pod's answer to the host's address in the pod subnet goes to the host.
        let host_address = Ipv4Addr::new(10, 1, id as u8, 254);
        let answer = Packet4::udp(Ipv4Addr::new(10, 1, *n as u8, 9), 8080, host_address, 40000);
        let rx = s.vxlan4_rx(Ipv4Addr::new(192, 168, 16, *n as u8), Ipv4Addr::new(192, 168, 16, id as u8), 10, answer);
        let tap = s.interface_by_name("tap0").unwrap().sw_if_index;
        let to_host = Forwarding::Complete { sw_if_index: tap, next_hop: IpAddr::V4(ip("172.30.255.2")) };
        assert_eq!(rx, VxlanRx::Forward { sw_if_index: t.sw_if_index, forwarding: to_host }, "{host_address}");
        let others = nodes.iter().filter(|m| *m != n).map(|m| Ipv4Addr::new(10, 1, *m as u8, 9));
        for src in others.chain([ip("10.9.0.1"), ip("192.168.16.200"), ip("8.8.8.8")]) {
            let rx = vxlan_from(&s, *n, id, src);
            assert_eq!(rx, VxlanRx::Denied { sw_if_index: t.sw_if_index, acl_index: None }, "{src} via node {n}");
        }
    }
    // The uplink's only input ACL lets in what does not claim to be a pod, the host's end
    // of the interconnect or the node itself (its output list is not the reconciler's).
    let (input, _) = s.acl_bindings.get(&up.sw_if_index).cloned().unwrap_or_default();
    assert!(input.len() == 1, "one input ACL on uplink0: {input:?}");
    assert_eq!(s.acls[&input[0]].tag, "contiv-uplink");
    for src in nodes.iter().map(|n| Ipv4Addr::new(10, 1, *n as u8, 9)).chain([ip("172.30.255.2")]) {
        let rx = plain_on_uplink(&s, id, src);
        assert_eq!(rx, Ip4Rx::Denied { acl_index: Some(input[0]) }, "{src} plain on uplink0");
    }
    assert!(matches!(plain_on_uplink(&s, id, ip("203.0.113.5")), Ip4Rx::Forward(f) if f.delivers()));
    assert_eq!(our_acls(&s).len(), nodes.len(), "one ACL per other node and the uplink's: {:?}", s.acls);
    want_routes.sort();
    assert_eq!(routes.into_iter().collect::<Vec<_>>(), want_routes, "routes of node {id}");
    assert!(s.ip4_lookup(0, Ipv4Addr::new(10, 1, id as u8, 7)).delivers(), "to a local pod through the port");
    let nat = &s.nat;
    assert!(nat.enabled.is_some(), "NAT44-ED enabled");
    let tap = s.interface_by_name("tap0").unwrap();
    assert_eq!(nat.interfaces.get(&xdp.sw_if_index), Some(&32), "pods are NAT inside");
    assert_eq!(nat.interfaces.get(&tap.sw_if_index), Some(&32), "the host is NAT inside");
    assert_eq!(nat.interfaces.get(&up.sw_if_index), Some(&16), "the uplink is NAT outside");
    for (i, bits) in [(xdp, 32), (tap, 32), (up, 16)] {
        assert_eq!(nat.active.get(&i.sw_if_index), Some(&bits), "NAT translates on {}, not only records it", i.name);
    }
    assert_eq!(nat.addresses.keys().copied().collect::<Vec<_>>(), vec![Ipv4Addr::new(192, 168, 16, id as u8)]);
    assert_eq!(nat.identity_mappings.len(), 1);
    assert_eq!(nat.identity_mappings[0].port, 4789);
    assert_eq!(nat.static_mappings.len(), 2);
    let static_neighbors =
        s.neighbors.values().filter(|n| n.flags.contains(api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_STATIC)).count();
    assert_eq!(static_neighbors, 1, "the host end of the interconnect");
}

/// An answer to an ARP request VPP sent: a neighbour VPP learned (not static).
fn learn_neighbor(fake: &FakeVpp, interface: &str, ip: Ipv4Addr) {
    fake.with_state(|s| {
        let sw = s.interface_by_name(interface).unwrap().sw_if_index;
        s.neighbors.insert(
            (sw, IpAddr::V4(ip)),
            contiv_vpp_fake::state::Neighbor {
                mac: [0x52, 0x54, 0, 0, 0, 0xfe],
                flags: api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_NONE,
            },
        );
    });
}

/// The first pass converges a fresh VPP; once VPP learned the default gateway by ARP, a
/// second pass finds nothing to change and sends nothing but dumps.
async fn converges_then_changes_nothing(fake: &FakeVpp) -> ReconcileReport {
    let rec = Reconciler::new(client(fake).await);
    let d = desired(1, &[1, 2, 3]);
    let first = rec.reconcile(&d).await.unwrap();
    assert!(first.converged(), "{:#?}", first.failed);
    assert!(first.applied.len() > 20, "{:#?}", first.applied);
    assert_node_state(fake, 1, &[1, 2, 3]);
    // VPP holds its own routes beside the reconciler's: the connected and local routes of
    // the addresses, and a /32 for every neighbour, the static one and the learned one.
    learn_neighbor(fake, "uplink0", Ipv4Addr::new(192, 168, 16, 254));
    let fib = fake.state().ip4_fib();
    for (prefix, src) in [
        ("10.1.1.1/32", fib_source::INTERFACE),
        ("192.168.16.0/24", fib_source::INTERFACE),
        ("172.30.255.2/32", fib_source::ADJ),
        ("192.168.16.254/32", fib_source::ADJ),
    ] {
        assert_eq!(fib.get(&net(prefix)).map(|e| e.0), Some(src), "{prefix} in {fib:#?}");
    }
    let before = fake.state().requests;
    let second = rec.reconcile(&d).await.unwrap();
    assert_eq!(second, ReconcileReport { generation: first.generation, ..Default::default() }, "nothing to do");
    let writes = writes_between(&before, &fake.state().requests);
    assert!(writes.is_empty(), "a converged pass sends no changes: {writes:?}");
    assert_eq!(fake.state().ip4_fib(), fib, "VPP's own routes are left alone");
    first
}

#[tokio::test]
async fn a_node_converges_and_a_second_pass_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let first = converges_then_changes_nothing(&fake).await;
    // NAT44-ED was enabled although VPP answers its running config with 0 while disabled.
    assert!(first.applied.iter().any(|a| a == "enable NAT44-ED"), "{:#?}", first.applied);
    assert_eq!(fake.state().requests.get("ip_route_v2_dump"), Some(&2), "route sources read from VPP");

    // vpp_papi reads back the same configuration.
    let Some(papi) = Papi::for_test("a_node_converges_and_a_second_pass_changes_nothing (vpp_papi part)") else {
        return;
    };
    let out = papi_dump(&papi, &fake).await;
    let r = out["results"].as_array().unwrap();
    let ifaces: BTreeSet<&str> =
        r[0].as_array().unwrap().iter().map(|i| i["interface_name"].as_str().unwrap()).collect();
    assert_eq!(ifaces, BTreeSet::from(["local0", "uplink0", "tap0", "xdp-cslow1", "vxlan_tunnel2", "vxlan_tunnel3"]));
    let routes: BTreeSet<&str> =
        r[1].as_array().unwrap().iter().map(|x| x["route"]["prefix"].as_str().unwrap()).collect();
    for prefix in ["0.0.0.0/0", "10.1.1.0/24", "10.1.2.0/24", "10.1.3.0/24", "10.1.1.1/32", "192.168.16.254/32"] {
        assert!(routes.contains(prefix), "{prefix} in {routes:?}");
    }
    let via = r[1].as_array().unwrap().iter().find(|x| x["route"]["prefix"] == "10.1.2.0/24").unwrap();
    assert_eq!(via["route"]["paths"][0]["nh"]["address"]["ip4"], "10.1.2.1", "{via}");
    let tunnels: BTreeSet<&str> = r[2].as_array().unwrap().iter().map(|t| t["dst_address"].as_str().unwrap()).collect();
    assert_eq!(tunnels, BTreeSet::from(["192.168.16.2", "192.168.16.3"]));
    assert_eq!(r[3].as_array().unwrap().len(), 3, "three NAT interface features");
    assert_eq!(r[4][0]["ip_address"], "192.168.16.1", "NAT pool is the node IP");
    assert_eq!(r[5][0]["host_if_name"], "vpp1");
}

#[tokio::test]
async fn without_ip_route_v2_dump_vpps_own_routes_are_recognised_by_address_and_neighbour() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FakeOptions::new(dir.path().join("api.sock"));
    opts.nics = vec![("uplink0".into(), [0x52, 0x54, 0, 0, 0, 1])];
    opts.crc_overrides = vec![("ip_route_v2_dump".into(), 0xdead_beef)]; // a VPP without it
    let fake = FakeVpp::start(opts).unwrap();
    converges_then_changes_nothing(&fake).await;
    let requests = fake.state().requests;
    assert_eq!(requests.get("ip_route_v2_dump"), None);
    assert_eq!(requests.get("ip_route_dump"), Some(&2));
}

#[tokio::test]
async fn nat44_ed_is_enabled_once_and_enabled_again_only_to_change_its_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let rec = Reconciler::new(client(&fake).await);
    let c = rec.client();
    // Someone enabled NAT44-ED with other sessions and configured a pool address.
    c.request(&api::Nat44EdPluginEnableDisable { enable: true, sessions: 1000, ..Default::default() }).await.unwrap();
    c.request(&api::Nat44AddDelAddressRange {
        first_ip_address: [10, 9, 9, 9],
        last_ip_address: [10, 9, 9, 9],
        is_add: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut d = desired(1, &[1, 2]);
    d.nat.as_mut().unwrap().sessions = 4096;
    let report = rec.reconcile(&d).await.unwrap();
    assert!(report.converged(), "{:#?}", report.failed);
    let nat_changes: Vec<&str> = report
        .applied
        .iter()
        .map(String::as_str)
        .filter(|a| a.contains("NAT44-ED") || a.contains("10.9.9.9"))
        .collect();
    assert_eq!(
        nat_changes,
        [
            "delete NAT pool address 10.9.9.9",
            "disable NAT44-ED (it runs with 1000 sessions, VRFs 0/0; 4096 sessions, VRFs 0/0 wanted)",
            "enable NAT44-ED"
        ]
    );
    assert_node_state(&fake, 1, &[1, 2]);
    assert_eq!(fake.state().nat.enabled.as_ref().unwrap().sessions, 4096);
    let again = rec.reconcile(&d).await.unwrap();
    assert_eq!(again.applied, Vec::<String>::new());

    // Asking for VPP's default (0) takes whatever it runs with: no disable.
    let mut d = desired(1, &[1, 2]);
    d.nat.as_mut().unwrap().sessions = 0;
    let report = rec.reconcile(&d).await.unwrap();
    assert_eq!(report, ReconcileReport { generation: report.generation, ..Default::default() });
}

#[tokio::test]
async fn tunnels_that_decapsulate_to_l2_input_are_created_again() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, rec, d) = reconciled(&dir).await;
    let old_sw = fake.state().interface_by_name("vxlan_tunnel2").unwrap().sw_if_index;
    // What an older agent left: a tunnel created with decap_next_index ~0 (l2-input).
    fake.with_state(|s| {
        let sw = s.interface_by_name("vxlan_tunnel2").unwrap().sw_if_index;
        match &mut s.interfaces.get_mut(&sw).unwrap().kind {
            contiv_vpp_fake::state::InterfaceKind::Vxlan(t) => t.decap_next_index = 1,
            k => panic!("{k:?}"),
        }
        assert_eq!(s.vxlan_decap_next(sw), Some("l2-input"));
    });
    let report = rec.reconcile(&d).await.unwrap();
    assert!(report.converged(), "{:#?}", report.failed);
    assert!(report.applied.contains(&"delete interface vxlan_tunnel2".to_owned()), "{:#?}", report.applied);
    assert!(report.applied.contains(&"create interface vxlan_tunnel2".to_owned()), "{:#?}", report.applied);
    // VPP hands the freed index to the new tunnel: the route through the old one, deleted
    // before, is added again in the same pass, though the dump showed it at this index.
    assert_eq!(fake.state().interface_by_name("vxlan_tunnel2").unwrap().sw_if_index, old_sw, "index reused");
    assert_node_state(&fake, 1, &[1, 2]);
    assert_eq!(fake.state().requests["add_node_next"], 1, "the arc is asked for once per connection");
}

/// The host had two default routes through the NIC (DHCP's and a static one, other
/// metrics): VPP gets the first, and a converged pass sends nothing.
#[tokio::test]
async fn two_handed_over_routes_to_one_destination_do_not_take_turns() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let rec = Reconciler::new(client(&fake).await);
    let mut up = uplink(1);
    up.routes.push(UplinkRoute { dst: "0.0.0.0/0".parse().unwrap(), gateway: Some(Ipv4Addr::new(192, 168, 16, 253)) });
    let d = desired_with_uplink(1, &[1, 2], &up);
    assert!(rec.reconcile(&d).await.unwrap().converged());
    for pass in 0..2 {
        let r = rec.reconcile(&d).await.unwrap();
        assert!(r.converged() && r.applied.is_empty(), "pass {pass}: {r:#?}");
    }
    assert_node_state(&fake, 1, &[1, 2]);
}

/// The agent deletes VPP's af_xdp interface on a slow-path port it had to create anew (the
/// old socket is bound to a deleted device). NAT44-ED keeps its inside record of the
/// deleted interface, and the new interface gets the same index: the record must not be
/// taken for the new interface's feature, or pods' traffic leaves untranslated for good.
#[tokio::test]
async fn an_interface_deleted_behind_the_reconcilers_back_gets_its_nat_role_back() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, rec, d) = reconciled(&dir).await;
    assert_node_state(&fake, 1, &[1, 2]);
    let old_sw = fake.state().interface_by_name("xdp-cslow1").unwrap().sw_if_index;
    let other = client(&fake).await;
    other.request(&api::AfXdpDelete { sw_if_index: old_sw }).await.expect("af_xdp_delete");
    assert_eq!(fake.state().nat.interfaces.get(&old_sw), Some(&32), "VPP keeps the record");
    let report = rec.reconcile(&d).await.unwrap();
    assert!(report.converged(), "{:#?}", report.failed);
    assert_eq!(fake.state().interface_by_name("xdp-cslow1").unwrap().sw_if_index, old_sw, "index reused");
    assert_node_state(&fake, 1, &[1, 2]);
    let again = rec.reconcile(&d).await.unwrap();
    assert!(again.converged() && again.applied.is_empty(), "{again:#?}");
}

async fn papi_dump(papi: &Papi, fake: &FakeVpp) -> Value {
    let calls = json!([
        {"call": "sw_interface_dump", "args": {}},
        {"call": "ip_route_dump", "args": {"table": {"table_id": 0, "is_ip6": false, "name": ""}}},
        {"call": "vxlan_tunnel_v2_dump", "args": {"sw_if_index": 4294967295u32}},
        {"call": "nat44_interface_dump", "args": {}},
        {"call": "nat44_address_dump", "args": {}},
        {"call": "sw_interface_tap_v2_dump", "args": {}},
    ]);
    let (papi, socket) = (papi.clone(), fake.socket().to_owned());
    tokio::task::spawn_blocking(move || papi.drive(&socket, calls, false, 0.0)).await.unwrap()
}

#[tokio::test]
async fn remote_nodes_joining_and_leaving_add_and_remove_tunnels_and_routes() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let rec = Reconciler::new(client(&fake).await);
    rec.reconcile(&desired(1, &[1, 2])).await.unwrap();
    assert_node_state(&fake, 1, &[1, 2]);

    let joined = rec.reconcile(&desired(1, &[1, 2, 3])).await.unwrap();
    assert!(joined.converged(), "{:#?}", joined.failed);
    assert_node_state(&fake, 1, &[1, 2, 3]);
    assert_eq!(
        joined.applied,
        [
            "create interface vxlan_tunnel3",
            "create ACL contiv-tunnel-vxlan_tunnel3 for vxlan_tunnel3",
            "bind ACL contiv-tunnel-vxlan_tunnel3 to vxlan_tunnel3",
            "make vxlan_tunnel3 unnumbered to uplink0",
            "set vxlan_tunnel3 up",
            "add route 10.1.3.0/24 via 10.1.3.1 dev vxlan_tunnel3",
        ],
        "a join adds exactly the tunnel, its ACL (bound before the tunnel opens) and its route"
    );

    let left = rec.reconcile(&desired(1, &[1, 3])).await.unwrap();
    assert!(left.converged(), "{:#?}", left.failed);
    assert_node_state(&fake, 1, &[1, 3]);
    assert_eq!(
        left.applied,
        ["delete route 10.1.2.0/24", "delete interface vxlan_tunnel2", "delete ACL contiv-tunnel-vxlan_tunnel2"],
        "route before tunnel, tunnel before its ACL"
    );
}

/// The fake's `acl_add_replace` with `tag` and one permit of `src`; the ACL's index.
async fn add_acl(c: &Client, tag: &str, src: &str) -> u32 {
    let rule = api::AclRule {
        is_permit: api::AclAction::ACL_ACTION_API_PERMIT,
        src_prefix: src.parse::<Ipv4Net>().unwrap().into(),
        dst_prefix: Ipv4Net::default().into(),
        srcport_or_icmptype_last: u16::MAX,
        dstport_or_icmpcode_last: u16::MAX,
        ..Default::default()
    };
    let msg = api::AclAddReplace { acl_index: u32::MAX, tag: tag.into(), count: 1, r: vec![rule] };
    c.request(&msg).await.unwrap().acl_index
}

/// Decapsulated packets reach the pods through the af_xdp port, where the node's eBPF can
/// no longer tell the tunnel they came through: each tunnel's input ACL must let in what
/// its node may send (its pods, the node itself) and nothing else.
#[tokio::test]
async fn a_tunnel_lets_in_only_its_own_nodes_pods_and_the_node_itself() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let rec = Reconciler::new(client(&fake).await);
    let d = desired(1, &[1, 2, 3]);
    let first = rec.reconcile(&d).await.unwrap();
    assert!(first.converged(), "{:#?}", first.failed);
    let s = fake.state();
    let a = s.interface_by_name("vxlan_tunnel2").unwrap().sw_if_index;
    let b = s.interface_by_name("vxlan_tunnel3").unwrap().sw_if_index;
    // From node 2 (A): its pods, and its node IP (an ICMP error its VPP sends from the
    // uplink address its tunnels borrow).
    assert!(forwarded(&vxlan_from(&s, 2, 1, ip("10.1.2.7")), a));
    let ttl_exceeded = Packet4::icmp(ip("192.168.16.2"), ip("10.1.1.7"), 11, 0);
    let rx = s.vxlan4_rx(ip("192.168.16.2"), ip("192.168.16.1"), 10, ttl_exceeded);
    assert!(forwarded(&rx, a), "{rx:?}");
    // Through A's tunnel, B's pods, B's node IP, this node's own pods or any other address
    // are dropped; B's pods through B's tunnel pass.
    for src in ["10.1.3.7", "192.168.16.3", "10.1.1.9", "10.1.20.7", "203.0.113.5"].map(ip) {
        let rx = vxlan_from(&s, 2, 1, src);
        assert_eq!(rx, VxlanRx::Denied { sw_if_index: a, acl_index: None }, "{src} through A's tunnel");
    }
    assert!(forwarded(&vxlan_from(&s, 3, 1, ip("10.1.3.7")), b));
    // A node the cluster does not have gets nowhere (no tunnel).
    assert_eq!(vxlan_from(&s, 9, 1, ip("10.1.2.7")), VxlanRx::NoTunnel);
    let acls: Vec<String> = our_acls(&s).into_keys().collect();
    assert_eq!(acls, ["contiv-tunnel-vxlan_tunnel2", "contiv-tunnel-vxlan_tunnel3", "contiv-uplink"]);

    // A second pass sends no change, ACLs included.
    let before = fake.state().requests;
    let again = rec.reconcile(&d).await.unwrap();
    assert!(again.converged() && again.applied.is_empty(), "{again:#?}");
    let writes = writes_between(&before, &fake.state().requests);
    assert!(writes.is_empty(), "a converged pass sends no changes: {writes:?}");
    assert!(before["acl_dump"] < fake.state().requests["acl_dump"], "ACLs are read every pass");
}

/// No plain packet from the wire comes from a pod (pods' own traffic leaves NAT'ed to the
/// node IP, or inside VXLAN), from the host's end of the interconnect or from the node
/// itself; VPP would route one to a local pod, whose eBPF judges it by that source alone
/// (and admits the pods' gateway and the node's addresses): the uplink's input ACL drops
/// them and lets the rest through, VXLAN from other nodes and answers to the node IP
/// included. Without the cluster's pod range the ACL goes.
#[tokio::test]
async fn the_uplink_drops_plain_packets_that_claim_a_pod_or_the_node_and_lets_the_rest_in() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let rec = Reconciler::new(client(&fake).await);
    let d = desired(1, &[1, 2, 3]);
    let first = rec.reconcile(&d).await.unwrap();
    assert!(first.converged(), "{:#?}", first.failed);
    // Bound before the uplink gets its address.
    let position = |what: &str| first.applied.iter().position(|a| a.starts_with(what));
    assert!(position("bind ACL contiv-uplink to uplink0") < position("add address 192.168.16.1/24 to uplink0"));
    let s = fake.state();
    let up = s.interface_by_name("uplink0").unwrap().sw_if_index;
    let acl = our_acls(&s)["contiv-uplink"];
    assert_eq!(s.acl_bindings[&up], (vec![acl], vec![]));
    // A remote node's pod, a local pod, the local pods' gateway (which every isolated pod
    // admits), the host's and VPP's ends of the interconnect, the node IP: dropped.
    for src in ["10.1.2.7", "10.1.3.7", "10.1.1.9", "10.1.1.1", "172.30.255.2", "172.30.255.1", "192.168.16.1"] {
        let rx = plain_on_uplink(&s, 1, ip(src));
        assert_eq!(rx, Ip4Rx::Denied { acl_index: Some(acl) }, "{src} plain on uplink0");
    }
    // From outside, or from another node's address: to the pod through the af_xdp port.
    let xdp = s.interface_by_name("xdp-cslow1").unwrap().sw_if_index;
    for src in ["203.0.113.5", "192.168.16.2", "10.2.0.1"] {
        let rx = plain_on_uplink(&s, 1, ip(src));
        assert!(
            matches!(&rx, Ip4Rx::Forward(f @ Forwarding::Arp { sw_if_index, .. }) if *sw_if_index == xdp && f.delivers()),
            "{src}: {rx:?}"
        );
    }
    // VXLAN from a node, an answer to the node IP (NAT44-ED's out2in runs after the ACL):
    // for VPP itself.
    for p in [
        Packet4::udp(ip("192.168.16.2"), 51000, ip("192.168.16.1"), 4789),
        Packet4::udp(ip("8.8.8.8"), 53, ip("192.168.16.1"), 1025),
    ] {
        assert_eq!(s.ip4_rx(up, p), Ip4Rx::Forward(Forwarding::Local { sw_if_index: up }), "{p:?}");
    }

    // A second pass sends no change.
    let before = fake.state().requests;
    let again = rec.reconcile(&d).await.unwrap();
    assert!(again.converged() && again.applied.is_empty(), "{again:#?}");
    let writes = writes_between(&before, &fake.state().requests);
    assert!(writes.is_empty(), "a converged pass sends no changes: {writes:?}");

    // Without the cluster's pod range the uplink's ACL is taken off and deleted; the
    // tunnels keep theirs.
    let without = desired_with_range(1, &[node(1), node(2), node(3)], &uplink(1), None);
    let report = rec.reconcile(&without).await.unwrap();
    assert!(report.converged(), "{:#?}", report.failed);
    assert_eq!(report.applied, ["take stale ACLs off uplink0", "delete ACL contiv-uplink"]);
    let s = fake.state();
    assert_eq!(s.acl_bindings.get(&up).cloned().unwrap_or_default(), (vec![], vec![]));
    assert!(!s.acls.contains_key(&acl));
    assert_eq!(our_acls(&s).len(), 2, "the tunnels' ACLs stay: {:?}", s.acls);
    assert!(matches!(plain_on_uplink(&s, 1, ip("10.1.2.7")), Ip4Rx::Forward(_)), "what the ACL dropped passes");
    let again = rec.reconcile(&without).await.unwrap();
    assert!(again.converged() && again.applied.is_empty(), "{again:#?}");
}

/// A node leaving takes its ACL with it; a node whose pod subnet or node IP changed keeps
/// its ACL (same index, new rules), bound to its tunnel throughout.
#[tokio::test]
async fn a_leaving_node_takes_its_acl_and_a_changed_node_keeps_its_acl_with_new_rules() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let rec = Reconciler::new(client(&fake).await);
    rec.reconcile(&desired(1, &[1, 2, 3])).await.unwrap();
    let index = our_acls(&fake.state())["contiv-tunnel-vxlan_tunnel3"];

    // Node 2 leaves; node 3 comes back with another pod subnet.
    let moved = RemoteNode { pod_subnet: "10.1.33.0/24".parse().unwrap(), ..node(3) };
    let report = rec.reconcile(&desired_with_remotes(1, &[node(1), moved.clone()], &uplink(1))).await.unwrap();
    assert!(report.converged(), "{:#?}", report.failed);
    let acl_changes: Vec<&str> = report.applied.iter().map(String::as_str).filter(|a| a.contains("ACL")).collect();
    assert_eq!(
        acl_changes,
        [
            "replace the rules of ACL contiv-tunnel-vxlan_tunnel3 for vxlan_tunnel3",
            "delete ACL contiv-tunnel-vxlan_tunnel2"
        ],
        "{:#?}",
        report.applied
    );
    let s = fake.state();
    assert_eq!(our_acls(&s)["contiv-tunnel-vxlan_tunnel3"], index);
    assert!(!our_acls(&s).contains_key("contiv-tunnel-vxlan_tunnel2"), "{:?}", s.acls);
    let t = s.interface_by_name("vxlan_tunnel3").unwrap().sw_if_index;
    assert_eq!(s.acl_bindings[&t], (vec![index], vec![]), "replaced in place, still bound");
    assert!(forwarded(&vxlan_from(&s, 3, 1, ip("10.1.33.7")), t), "the new subnet passes");
    assert!(matches!(vxlan_from(&s, 3, 1, ip("10.1.3.7")), VxlanRx::Denied { .. }), "the old one no more");

    // Node 3's node IP changes: its tunnel is created again (VPP hands it the freed index),
    // its ACL keeps its index and is bound to the new tunnel before it opens.
    let renumbered = RemoteNode { node_ip: ip("192.168.16.33"), ..moved };
    let report = rec.reconcile(&desired_with_remotes(1, &[node(1), renumbered], &uplink(1))).await.unwrap();
    assert!(report.converged(), "{:#?}", report.failed);
    let position = |what: &str| report.applied.iter().position(|a| a.starts_with(what));
    assert!(position("delete interface vxlan_tunnel3") < position("create interface vxlan_tunnel3"));
    assert!(position("create interface vxlan_tunnel3") < position("replace the rules of ACL"));
    assert!(position("replace the rules of ACL") < position("bind ACL contiv-tunnel-vxlan_tunnel3"));
    assert!(position("bind ACL contiv-tunnel-vxlan_tunnel3") < position("set vxlan_tunnel3 up"));
    let s = fake.state();
    let new_t = s.interface_by_name("vxlan_tunnel3").unwrap().sw_if_index;
    assert_eq!(new_t, t, "index reused");
    assert_eq!(our_acls(&s)["contiv-tunnel-vxlan_tunnel3"], index);
    assert_eq!(s.acl_bindings[&new_t], (vec![index], vec![]));
    let from_new_ip = Packet4::udp(ip("192.168.16.33"), 40000, ip("10.1.1.7"), 8080);
    assert!(forwarded(&s.vxlan4_rx(ip("192.168.16.33"), ip("192.168.16.1"), 10, from_new_ip), new_t));
    assert!(matches!(vxlan_from(&s, 3, 1, ip("10.1.33.7")), VxlanRx::NoTunnel), "the old node IP has no tunnel");
}

/// After an agent restart the reconciler finds its ACLs by tag: one it had created for a
/// tunnel is taken again, the ones nothing wants (even listed on an interface) are
/// deleted, and ACLs tagged otherwise are left alone.
#[tokio::test]
async fn stale_acls_with_our_tag_are_deleted_and_foreign_ones_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let rec = Reconciler::new(client(&fake).await);
    let c = rec.client();
    let ours = add_acl(c, "contiv-tunnel-vxlan_tunnel2", "10.1.2.0/24").await;
    let duplicate = add_acl(c, "contiv-tunnel-vxlan_tunnel2", "10.1.2.0/24").await;
    let gone = add_acl(c, "contiv-tunnel-vxlan_tunnel9", "10.1.9.0/24").await;
    let foreign = add_acl(c, "operator-allow-mgmt", "10.200.0.0/16").await;
    let uplink_sw = fake.state().interface_by_name("uplink0").unwrap().sw_if_index;
    let list = api::AclInterfaceSetAclList { sw_if_index: uplink_sw, count: 2, n_input: 1, acls: vec![gone, foreign] };
    c.request(&list).await.unwrap();

    let report = rec.reconcile(&desired(1, &[1, 2])).await.unwrap();
    assert!(report.converged(), "{:#?}", report.failed);
    let mut acl_changes: Vec<&str> = report.applied.iter().map(String::as_str).filter(|a| a.contains("ACL")).collect();
    acl_changes.sort();
    assert_eq!(
        acl_changes,
        [
            "bind ACL contiv-tunnel-vxlan_tunnel2 to vxlan_tunnel2",
            "bind ACL contiv-uplink to uplink0",
            "create ACL contiv-uplink for uplink0",
            "delete ACL contiv-tunnel-vxlan_tunnel2",
            "delete ACL contiv-tunnel-vxlan_tunnel9",
            "replace the rules of ACL contiv-tunnel-vxlan_tunnel2 for vxlan_tunnel2",
        ],
        "the existing ACL is taken (its rules brought up to date), not created again; the uplink's \
         list loses the stale ACL as its own is bound"
    );
    assert_node_state(&fake, 1, &[1, 2]);
    let s = fake.state();
    let tunnel = s.interface_by_name("vxlan_tunnel2").unwrap().sw_if_index;
    assert_eq!(s.acl_bindings[&tunnel], (vec![ours], vec![]));
    assert!(!s.acls.contains_key(&duplicate) && !s.acls.contains_key(&gone), "{:?}", s.acls);
    assert_eq!(s.acls[&foreign].tag, "operator-allow-mgmt");
    let uplink_acl = our_acls(&s)["contiv-uplink"];
    assert_eq!(s.acl_bindings[&uplink_sw], (vec![uplink_acl], vec![foreign]), "the foreign ACL stays where it was");
    let again = rec.reconcile(&desired(1, &[1, 2])).await.unwrap();
    assert!(again.converged() && again.applied.is_empty(), "{again:#?}");
}

/// A tunnel whose ACL VPP refuses is created but not opened: better no traffic from that
/// node than traffic from anywhere through its tunnel. The uplink opens all the same: it
/// carries the node's own traffic.
#[tokio::test]
async fn a_tunnel_without_its_acl_stays_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FakeOptions::new(dir.path().join("api.sock"));
    opts.nics = vec![("uplink0".into(), [0x52, 0x54, 0, 0, 0, 1])];
    opts.crc_overrides = vec![("acl_add_replace".into(), 0xdead_beef)];
    let fake = FakeVpp::start(opts).unwrap();
    let rec = Reconciler::new(client(&fake).await);
    let report = rec.reconcile(&desired(1, &[1, 2])).await.unwrap();
    let failed: Vec<&str> = report.failed.iter().map(|f| f.what.as_str()).collect();
    assert_eq!(
        failed,
        [
            "create ACL contiv-uplink for uplink0",
            "create ACL contiv-tunnel-vxlan_tunnel2 for vxlan_tunnel2",
            "open vxlan_tunnel2 (address, unnumbered source, admin up)"
        ],
        "{:#?}",
        report.failed
    );
    let s = fake.state();
    let t = s.interface_by_name("vxlan_tunnel2").unwrap();
    assert!(!t.admin_up && t.unnumbered_to.is_none(), "{t:?}");
    assert!(s.interface_by_name("xdp-cslow1").is_some_and(|i| i.admin_up), "the rest is set up");
    let up = s.interface_by_name("uplink0").unwrap();
    assert!(up.admin_up && up.addresses == [net("192.168.16.1/24")], "the uplink is not held back: {up:?}");
}

/// A tunnel already open when its ACL cannot be bound (an agent without ACLs ran before)
/// is not cut: it stays open, keeps its unnumbered source even when another lender is
/// wanted (the new one would be held back), and is reported as open without its ACL.
#[tokio::test]
async fn an_open_tunnel_without_its_acl_stays_open_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FakeOptions::new(dir.path().join("api.sock"));
    opts.nics = vec![("uplink0".into(), [0x52, 0x54, 0, 0, 0, 1])];
    opts.crc_overrides = vec![("acl_add_replace".into(), 0xdead_beef)];
    let fake = FakeVpp::start(opts).unwrap();
    let rec = Reconciler::new(client(&fake).await);
    let mut before_acls = desired(1, &[1, 2]);
    before_acls.input_acls.clear();
    let first = rec.reconcile(&before_acls).await.unwrap();
    assert!(first.converged(), "{:#?}", first.failed);
    let up = fake.state().interface_by_name("uplink0").unwrap().sw_if_index;
    let open = |fake: &FakeVpp| {
        let s = fake.state();
        let t = s.interface_by_name("vxlan_tunnel2").unwrap();
        t.admin_up && t.unnumbered_to == Some(up)
    };
    assert!(open(&fake));

    let mut d = desired(1, &[1, 2]);
    let report = rec.reconcile(&d).await.unwrap();
    let failed: Vec<&str> = report.failed.iter().map(|f| f.what.as_str()).collect();
    assert_eq!(
        failed,
        [
            "create ACL contiv-uplink for uplink0",
            "create ACL contiv-tunnel-vxlan_tunnel2 for vxlan_tunnel2",
            "vxlan_tunnel2 open without its input ACL"
        ],
        "{:#?}",
        report.failed
    );
    assert!(open(&fake), "not cut");

    d.interfaces.get_mut("vxlan_tunnel2").unwrap().unnumbered_to = Some("tap0".into());
    let report = rec.reconcile(&d).await.unwrap();
    let failed: Vec<&str> = report.failed.iter().map(|f| f.what.as_str()).collect();
    assert_eq!(
        failed,
        [
            "create ACL contiv-uplink for uplink0",
            "create ACL contiv-tunnel-vxlan_tunnel2 for vxlan_tunnel2",
            "make vxlan_tunnel2 unnumbered to tap0",
            "vxlan_tunnel2 open without its input ACL"
        ],
        "{:#?}",
        report.failed
    );
    assert!(!report.applied.iter().any(|a| a.contains("unnumbered")), "{:#?}", report.applied);
    assert!(open(&fake), "the tunnel keeps the source it has");
}

#[tokio::test]
async fn drift_in_vpp_is_repaired_and_foreign_objects_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, rec, d) = reconciled(&dir).await;
    // Someone took the port down, removed a route, added a stray route through a tunnel, a
    // static neighbour on it (which would give the tunnel's adjacency an Ethernet rewrite)
    // and a loopback of their own with a route.
    fake.with_state(|s| {
        let xdp = s.interface_by_name("xdp-cslow1").unwrap().sw_if_index;
        s.interfaces.get_mut(&xdp).unwrap().admin_up = false;
        s.routes.retain(|(_, p), _| *p != net("10.1.2.0/24"));
    });
    let c = rec.client();
    let lo = c.request(&contiv_vpp_binapi::api::CreateLoopbackInstance::default()).await.unwrap();
    let tunnel = fake.state().interface_by_name("vxlan_tunnel2").unwrap().sw_if_index;
    for (prefix, sw) in [("10.99.0.0/16", tunnel), ("10.77.0.0/16", lo.sw_if_index)] {
        let dst: Ipv4Net = prefix.parse().unwrap();
        let msg = contiv_vpp_binapi::api::IpRouteAddDel {
            is_add: true,
            is_multipath: false,
            route: contiv_vpp_binapi::api::IpRoute {
                prefix: dst.into(),
                n_paths: 1,
                paths: vec![contiv_vpp_binapi::api::FibPath { sw_if_index: sw, ..Default::default() }],
                ..Default::default()
            },
        };
        c.request(&msg).await.unwrap();
    }
    c.request(&api::IpNeighborAddDel {
        is_add: true,
        neighbor: api::IpNeighbor {
            sw_if_index: tunnel,
            flags: api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_STATIC,
            mac_address: [2, 0xfe, 0, 0, 0, 2],
            ip_address: Ipv4Addr::new(10, 1, 2, 1).into(),
        },
    })
    .await
    .unwrap();
    let repair = rec.reconcile(&d).await.unwrap();
    assert!(repair.converged(), "{:#?}", repair.failed);
    let mut applied = repair.applied.clone();
    applied.sort();
    assert_eq!(
        applied,
        [
            "add route 10.1.2.0/24 via 10.1.2.1 dev vxlan_tunnel2",
            "delete neighbour 10.1.2.1 on vxlan_tunnel2",
            "delete route 10.99.0.0/16",
            "set xdp-cslow1 up"
        ]
    );
    let s = fake.state();
    let to_remote = s.ip4_lookup(0, Ipv4Addr::new(10, 1, 2, 7));
    assert_eq!(
        to_remote,
        Forwarding::Complete { sw_if_index: tunnel, next_hop: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 1)) }
    );
    assert!(s.ip4_routes().contains_key(&net("10.77.0.0/16")), "a route through someone else's loopback stays");
    assert!(s.interface_by_name("loop0").is_some());
}

#[tokio::test]
async fn an_af_xdp_interface_is_known_by_vpps_device_type_whatever_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let rec = Reconciler::new(client(&fake).await);
    // Left by someone's earlier configuration under another name: VPP reports its device
    // class, "AF_XDP interface".
    let stale = rec
        .client()
        .request(&api::AfXdpCreateV3 {
            host_if: "cslow9".into(),
            name: "port9".into(),
            rxq_num: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let dev_type = rec.client().dump(&api::SwInterfaceDump { sw_if_index: stale.sw_if_index, ..Default::default() });
    assert_eq!(dev_type.await.unwrap()[0].interface_dev_type, contiv_vpp_backend::AF_XDP_DEV_TYPE);
    let report = rec.reconcile(&desired(1, &[1, 2])).await.unwrap();
    assert!(report.converged(), "{:#?}", report.failed);
    assert!(report.applied.contains(&"delete interface port9".to_owned()), "{:#?}", report.applied);
    assert_node_state(&fake, 1, &[1, 2]);
}

#[tokio::test]
async fn changes_vpp_refuses_are_reported_and_the_rest_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = FakeOptions::new(dir.path().join("api.sock"));
    opts.nics = vec![("GigabitEthernet0/8/0".into(), [0x52, 0x54, 0, 0, 0, 1])]; // not the configured uplink0
    let fake = FakeVpp::start(opts).unwrap();
    let rec = Reconciler::new(client(&fake).await);
    let report = rec.reconcile(&desired(1, &[1, 2])).await.unwrap();
    assert!(!report.converged());
    assert!(
        report.failed.iter().any(|f| f.what == "configure interface uplink0" && f.error.contains("startup.conf")),
        "{:#?}",
        report.failed
    );
    let s = fake.state();
    assert!(s.interface_by_name("xdp-cslow1").is_some_and(|i| i.admin_up), "the pod side is still set up");
    assert!(s.ip4_routes().contains_key(&net("10.1.1.0/24")));
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fast() -> SupervisorOptions {
    SupervisorOptions {
        resync_interval: Duration::from_secs(60),
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    }
}

#[tokio::test]
async fn a_vpp_restart_mid_run_is_noticed_reconnected_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let (tx, rx) = watch::channel(desired(1, &[1, 2, 3]));
    let sup = VppSupervisor::spawn(Client::new(ClientOptions::new(fake.socket())), rx, fast());
    let status = sup.status();
    wait_for("first convergence", || status.borrow().last.as_ref().is_some_and(|r| r.converged())).await;
    assert_node_state(&fake, 1, &[1, 2, 3]);
    assert_eq!(status.borrow().generation, 1);

    // VPP restarts and takes a while to come back: everything it held is gone.
    fake.restart_with_downtime(Duration::from_millis(300)).await.unwrap();
    wait_for("reconnect and replay", || {
        let s = status.borrow();
        s.generation >= 2 && s.last.as_ref().is_some_and(|r| r.generation >= 2 && r.converged())
    })
    .await;
    assert_node_state(&fake, 1, &[1, 2, 3]);
    assert!(fake.handshakes() >= 2);

    // The desired state keeps flowing after the restart.
    tx.send(desired(1, &[1, 3])).unwrap();
    wait_for("node 2 leaving", || fake.state().interface_by_name("vxlan_tunnel2").is_none()).await;
    wait_for("convergence", || status.borrow().last.as_ref().is_some_and(|r| r.converged())).await;
    assert_node_state(&fake, 1, &[1, 3]);
    sup.stop().await;
}

#[tokio::test]
async fn three_nodes_each_with_their_own_vpp_form_a_consistent_mesh() {
    let nodes = [1u32, 2, 3];
    let dirs: Vec<_> = nodes.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let fakes: Vec<FakeVpp> = dirs.iter().map(fake).collect();
    let mut sups = Vec::new();
    let mut txs = Vec::new();
    for (id, f) in nodes.iter().zip(&fakes) {
        let (tx, rx) = watch::channel(desired(*id, &[1, 2]));
        sups.push(VppSupervisor::spawn(Client::new(ClientOptions::new(f.socket())), rx, fast()));
        txs.push(tx);
    }
    // Node 3 joins the registry: every node learns about it.
    for (id, tx) in nodes.iter().zip(&txs) {
        tx.send(desired(*id, &nodes)).unwrap();
    }
    for (id, f) in nodes.iter().zip(&fakes) {
        wait_for(&format!("node {id}"), || {
            let s = f.state();
            nodes.iter().filter(|n| *n != id).all(|n| s.interface_by_name(&format!("vxlan_tunnel{n}")).is_some())
                && s.nat.enabled.is_some()
        })
        .await;
    }
    for (sup, (id, f)) in sups.iter().zip(nodes.iter().zip(&fakes)) {
        let status = sup.status();
        wait_for("convergence", || status.borrow().last.as_ref().is_some_and(|r| r.converged())).await;
        assert_node_state(f, *id, &nodes);
    }
    // Every tunnel's far end is the node IP the other node's VPP holds on its uplink, and
    // the route through it is that node's pod subnet (read with vpp_papi).
    let papi = Papi::for_test("three_nodes_each_with_their_own_vpp_form_a_consistent_mesh (vpp_papi part)");
    for (id, f) in nodes.iter().zip(&fakes) {
        let s = f.state();
        for other in nodes.iter().filter(|n| *n != id) {
            let o = fakes[(*other - 1) as usize].state();
            let their_ip = o.interface_by_name("uplink0").unwrap().addresses[0].addr();
            match &s.interface_by_name(&format!("vxlan_tunnel{other}")).unwrap().kind {
                contiv_vpp_fake::state::InterfaceKind::Vxlan(v) => {
                    assert_eq!(v.dst_address.to_ip(), Some(their_ip))
                }
                k => panic!("{k:?}"),
            }
        }
        if let Some(papi) = &papi {
            let out = papi_dump(papi, f).await;
            let dsts: BTreeSet<String> = out["results"][2]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["dst_address"].as_str().unwrap().to_owned())
                .collect();
            let want: BTreeSet<String> = nodes.iter().filter(|n| *n != id).map(|n| format!("192.168.16.{n}")).collect();
            assert_eq!(dsts, want, "node {id} tunnels (vpp_papi)");
        }
    }
    for s in sups {
        s.stop().await;
    }
}
