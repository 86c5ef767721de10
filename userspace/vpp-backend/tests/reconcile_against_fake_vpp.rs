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
    state::{Forwarding, fib_source},
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
    let cfg = VppConfig::default();
    let remotes: Vec<RemoteNode> = nodes.iter().map(|n| node(*n)).collect();
    render(&NodeInputs {
        config: &cfg,
        node_id: id,
        pod_subnet: node(id).pod_subnet,
        gateway: Ipv4Addr::new(10, 1, id as u8, 1),
        gateway_mac: GATEWAY_MAC,
        slowpath_ifname: "cslow1",
        mtu: 1450,
        uplink: up,
        remote_nodes: &remotes,
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
    }
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
    let after = fake.state().requests;
    let writes: Vec<_> = after
        .iter()
        .filter(|(name, n)| {
            !name.ends_with("_dump")
                && **name != "control_ping"
                && !name.starts_with("nat44_show")
                && before.get(*name) != Some(n)
        })
        .collect();
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
            "make vxlan_tunnel3 unnumbered to uplink0",
            "set vxlan_tunnel3 up",
            "add route 10.1.3.0/24 via 10.1.3.1 dev vxlan_tunnel3",
        ],
        "a join adds exactly the tunnel and its route"
    );

    let left = rec.reconcile(&desired(1, &[1, 3])).await.unwrap();
    assert!(left.converged(), "{:#?}", left.failed);
    assert_node_state(&fake, 1, &[1, 3]);
    assert_eq!(left.applied, ["delete route 10.1.2.0/24", "delete interface vxlan_tunnel2"], "route before tunnel");
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
