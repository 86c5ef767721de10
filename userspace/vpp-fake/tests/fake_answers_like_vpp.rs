//! Where real VPP is stricter or does more than a naive fake would, the fake does what VPP
//! does, so that the backend's tests see what the agent will meet: NAT44-ED's running
//! config answers 0 whether the plugin is on or off and its configuration is refused while
//! it is off; the FIB holds VPP's own routes (connected, local, a /32 per neighbour) beside
//! the API's; a VXLAN tunnel decapsulates to `l2-input` unless given another graph arc,
//! which `add_node_next` hands out; an attached route through an L3 tunnel cannot resolve,
//! one with a next hop needs no neighbour; a tunnel's input ACLs decide on its decapsulated
//! packets, first match wins, no match drops.

use std::net::{IpAddr, Ipv4Addr};

use contiv_vpp_binapi::{Client, ClientOptions, Error, api};
use contiv_vpp_fake::{
    FakeOptions, FakeVpp,
    state::{Forwarding, Packet4, VxlanRx, fib_source},
};

fn fake(dir: &tempfile::TempDir) -> FakeVpp {
    FakeVpp::start(FakeOptions::new(dir.path().join("api.sock"))).expect("fake VPP")
}

async fn client(fake: &FakeVpp) -> Client {
    Client::connect(ClientOptions::new(fake.socket())).await.expect("connect")
}

fn retval<T>(r: Result<T, Error>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(Error::Retval { retval, .. }) => retval,
        Err(e) => panic!("{e}"),
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[tokio::test]
async fn nat44_ed_answers_its_running_config_whether_enabled_or_not_and_refuses_config_while_off() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let c = client(&fake).await;
    let running = c.request(&api::Nat44ShowRunningConfig::default()).await.expect("retval 0 while disabled");
    assert_eq!(running.sessions, 0, "a disabled plugin runs with a zeroed configuration");
    assert_eq!(running.flags, api::Nat44ConfigFlags::NAT44_IS_ENDPOINT_DEPENDENT);

    // Configuration while disabled: VNET_API_ERROR_UNSUPPORTED.
    let feature =
        api::Nat44InterfaceAddDelFeature { is_add: true, flags: api::NatConfigFlags::NAT_IS_INSIDE, sw_if_index: 1 };
    let pool = api::Nat44AddDelAddressRange {
        first_ip_address: [192, 168, 16, 1],
        last_ip_address: [192, 168, 16, 1],
        is_add: true,
        ..Default::default()
    };
    let identity = api::Nat44AddDelIdentityMapping {
        is_add: true,
        ip_address: [192, 168, 16, 1],
        protocol: 17,
        port: 4789,
        sw_if_index: u32::MAX,
        ..Default::default()
    };
    let mapping = api::Nat44AddDelStaticMappingV2 {
        is_add: true,
        local_ip_address: [172, 30, 255, 2],
        external_ip_address: [192, 168, 16, 1],
        protocol: 6,
        local_port: 22,
        external_port: 22,
        external_sw_if_index: u32::MAX,
        ..Default::default()
    };
    assert_eq!(retval(c.request(&feature).await), -126);
    assert_eq!(retval(c.request(&pool).await), -126);
    assert_eq!(retval(c.request(&api::Nat44AddDelAddressRange { is_add: false, ..pool.clone() }).await), -6);
    assert_eq!(retval(c.request(&identity).await), -126);
    assert_eq!(retval(c.request(&mapping).await), -126);
    assert_eq!(retval(c.request(&api::Nat44EdAddDelOutputInterface { is_add: true, sw_if_index: 1 }).await), -126);
    assert_eq!(
        retval(c.request(&api::Nat44EdPluginEnableDisable { enable: false, ..Default::default() }).await),
        -169,
        "FEATURE_ALREADY_DISABLED"
    );

    let enable = api::Nat44EdPluginEnableDisable { enable: true, sessions: 4096, ..Default::default() };
    assert_eq!(retval(c.request(&enable).await), 0);
    let running = c.request(&api::Nat44ShowRunningConfig::default()).await.unwrap();
    assert_eq!(running.sessions, 4096);
    assert_eq!(running.translation_buckets, 2048, "nat_calc_bihash_buckets(4096)");
    assert_eq!(running.timeouts.udp, 300);
    assert_eq!(retval(c.request(&enable).await), -170, "FEATURE_ALREADY_ENABLED");
    let other = api::Nat44EdPluginEnableDisable { sessions: 8192, ..enable.clone() };
    assert_eq!(retval(c.request(&other).await), -170, "other parameters need a disable first");
    for r in [
        retval(c.request(&feature).await),
        retval(c.request(&pool).await),
        retval(c.request(&identity).await),
        retval(c.request(&mapping).await),
    ] {
        assert_eq!(r, 0);
    }
    assert_eq!(retval(c.request(&api::Nat44EdPluginEnableDisable { enable: false, ..Default::default() }).await), 0);
    let s = fake.state();
    assert!(s.nat.enabled.is_none() && s.nat.interfaces.is_empty() && s.nat.addresses.is_empty());
    assert!(s.nat.static_mappings.is_empty() && s.nat.identity_mappings.is_empty(), "a disable drops everything");
    let running = c.request(&api::Nat44ShowRunningConfig::default()).await.unwrap();
    assert_eq!(running.sessions, 0);

    // Enabled with VPP's default: sessions = 63 * 1024.
    let default = api::Nat44EdPluginEnableDisable { enable: true, ..Default::default() };
    assert_eq!(retval(c.request(&default).await), 0);
    assert_eq!(c.request(&api::Nat44ShowRunningConfig::default()).await.unwrap().sessions, 64512);
    let tracking = api::Nat44EdPluginEnableDisable {
        flags: api::Nat44ConfigFlags::NAT44_IS_CONNECTION_TRACKING,
        ..default.clone()
    };
    assert_eq!(retval(c.request(&tracking).await), -126);
}

#[tokio::test]
async fn the_fib_holds_vpps_own_routes_which_the_api_cannot_delete() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let c = client(&fake).await;
    let nic = 1;
    let address = |is_add| api::SwInterfaceAddDelAddress {
        sw_if_index: nic,
        is_add,
        del_all: false,
        prefix: "192.168.16.1/24".parse::<ipnet::Ipv4Net>().unwrap().into(),
    };
    c.request(&address(true)).await.unwrap();
    assert!(!fake.state().ip4_fib().contains_key(&"192.168.16.0/24".parse().unwrap()), "not while admin down");
    c.request(&api::SwInterfaceSetFlags { sw_if_index: nic, flags: api::IfStatusFlags::IF_STATUS_API_FLAG_ADMIN_UP })
        .await
        .unwrap();
    c.request(&api::IpNeighborAddDel {
        is_add: true,
        neighbor: api::IpNeighbor {
            sw_if_index: nic,
            flags: api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_NONE, // as ARP learns it
            mac_address: [2, 0, 0, 0, 0, 0xfe],
            ip_address: ip("192.168.16.254").into(),
        },
    })
    .await
    .unwrap();
    let dumped = c.dump(&api::IpRouteV2Dump::default()).await.unwrap();
    let view: Vec<(String, u8, api::FibPathType, u32, Ipv4Addr)> = dumped
        .iter()
        .filter(|r| r.route.prefix.to_net().unwrap().to_string().starts_with("192.168.16."))
        .map(|r| {
            let p = &r.route.paths[0];
            (
                r.route.prefix.to_net().unwrap().to_string(),
                r.route.src,
                p.r#type,
                p.sw_if_index,
                Ipv4Addr::from(p.nh.address.ip4()),
            )
        })
        .collect();
    use api::FibPathType as T;
    assert_eq!(
        view,
        [
            ("192.168.16.0/24".into(), fib_source::INTERFACE, T::FIB_API_PATH_TYPE_NORMAL, nic, ip("0.0.0.0")),
            ("192.168.16.0/32".into(), fib_source::INTERFACE, T::FIB_API_PATH_TYPE_DROP, u32::MAX, ip("0.0.0.0")),
            ("192.168.16.1/32".into(), fib_source::INTERFACE, T::FIB_API_PATH_TYPE_LOCAL, nic, ip("192.168.16.1")),
            ("192.168.16.254/32".into(), fib_source::ADJ, T::FIB_API_PATH_TYPE_NORMAL, nic, ip("192.168.16.254")),
            ("192.168.16.255/32".into(), fib_source::INTERFACE, T::FIB_API_PATH_TYPE_DROP, u32::MAX, ip("0.0.0.0")),
        ]
    );
    // The v1 dump shows the same entries (without their source).
    let v1 = c.dump(&api::IpRouteDump::default()).await.unwrap();
    assert_eq!(v1.len(), dumped.len());

    // Deleting them through the API removes the API's source only: VPP answers 0 and the
    // entries stay.
    for prefix in ["192.168.16.254/32", "192.168.16.0/24", "192.168.16.1/32"] {
        let net: ipnet::Ipv4Net = prefix.parse().unwrap();
        let del = api::IpRouteAddDel {
            is_add: false,
            is_multipath: false,
            route: api::IpRoute { prefix: net.into(), ..Default::default() },
        };
        assert_eq!(retval(c.request(&del).await), 0, "{prefix}");
    }
    assert_eq!(c.dump(&api::IpRouteV2Dump::default()).await.unwrap(), dumped, "nothing was deleted");

    // A route added through the API on a neighbour's /32 wins over the ADJ source; one on
    // a connected prefix is hidden behind the interface source.
    for (prefix, nh) in [("192.168.16.254/32", "192.168.16.254"), ("192.168.16.0/24", "0.0.0.0")] {
        let net: ipnet::Ipv4Net = prefix.parse().unwrap();
        let path = api::FibPath {
            sw_if_index: nic,
            weight: 1,
            nh: api::FibPathNh { address: api::AddressUnion::from_ipv4(ip(nh)), ..Default::default() },
            ..Default::default()
        };
        let add = api::IpRouteAddDel {
            is_add: true,
            is_multipath: false,
            route: api::IpRoute { prefix: net.into(), n_paths: 1, paths: vec![path], ..Default::default() },
        };
        c.request(&add).await.unwrap();
    }
    let fib = fake.state().ip4_fib();
    assert_eq!(fib[&"192.168.16.254/32".parse().unwrap()].0, fib_source::API);
    assert_eq!(fib[&"192.168.16.0/24".parse().unwrap()].0, fib_source::INTERFACE);
    // Filtered by source, as fib_table_walk_w_src does: entries whose best source it is.
    let api_only = c
        .dump(&api::IpRouteV2Dump { src: fib_source::API, ..Default::default() })
        .await
        .unwrap()
        .iter()
        .map(|r| r.route.prefix.to_net().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(api_only, ["192.168.16.254/32"]);

    // A neighbour added without a FIB entry adds none; removing the address removes its routes.
    c.request(&api::IpNeighborAddDel {
        is_add: true,
        neighbor: api::IpNeighbor {
            sw_if_index: nic,
            flags: api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_NO_FIB_ENTRY,
            mac_address: [2, 0, 0, 0, 0, 0xfd],
            ip_address: ip("192.168.16.253").into(),
        },
    })
    .await
    .unwrap();
    c.request(&address(false)).await.unwrap();
    let fib = fake.state().ip4_fib();
    assert!(!fib.contains_key(&"192.168.16.253/32".parse().unwrap()));
    assert!(!fib.contains_key(&"192.168.16.1/32".parse().unwrap()));
    assert_eq!(
        fib[&"192.168.16.0/24".parse().unwrap()].0,
        fib_source::API,
        "with the interface source gone, the API's route shows"
    );
}

fn tunnel(instance: u32, decap_next_index: u32) -> api::VxlanAddDelTunnelV3 {
    api::VxlanAddDelTunnelV3 {
        is_add: true,
        instance,
        src_address: "192.168.16.1".parse::<IpAddr>().unwrap().into(),
        dst_address: format!("192.168.16.{}", instance + 1).parse::<IpAddr>().unwrap().into(),
        mcast_sw_if_index: u32::MAX,
        decap_next_index,
        vni: 10,
        is_l3: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn an_l3_tunnel_needs_an_ip4_input_arc_to_decapsulate_and_a_next_hop_to_send() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let c = client(&fake).await;

    // ~0 is l2-input (index 1) through the API, L3 tunnel or not: decapsulated packets drop.
    let plain = c.request(&tunnel(2, u32::MAX)).await.unwrap().sw_if_index;
    let dumped = c.dump(&api::VxlanTunnelV2Dump { sw_if_index: plain }).await.unwrap();
    assert_eq!(dumped[0].decap_next_index, 1);
    assert_eq!(fake.state().vxlan_decap_next(plain), Some("l2-input"));

    // add_node_next hands out the arc to ip4-input, the same one every time.
    let arc = api::AddNodeNext { node_name: "vxlan4-input".into(), next_name: "ip4-input".into() };
    let next = c.request(&arc).await.unwrap().next_index;
    assert_eq!(next, 2, "after error-drop and l2-input");
    assert_eq!(c.request(&arc).await.unwrap().next_index, next);
    let bad = api::AddNodeNext { node_name: "vxlan4-inptu".into(), ..arc.clone() };
    assert_eq!(retval(c.request(&bad).await), -63, "NO_SUCH_NODE");
    let bad = api::AddNodeNext { next_name: "ip4-inptu".into(), ..arc.clone() };
    assert_eq!(retval(c.request(&bad).await), -64, "NO_SUCH_NODE2");
    assert_eq!(retval(c.request(&tunnel(4, 7)).await), -76, "INVALID_DECAP_NEXT");
    let l3 = c.request(&tunnel(3, next)).await.unwrap().sw_if_index;
    assert_eq!(fake.state().vxlan_decap_next(l3), Some("ip4-input"));

    // Sending: an attached route through the tunnel needs ARP (a glean adjacency), which an
    // L3 tunnel cannot do; with a next hop the adjacency is complete at once (the tunnel's
    // interface class has no link-layer header to resolve); a neighbour entry for the next
    // hop would give it an Ethernet rewrite.
    c.request(&api::SwInterfaceSetFlags { sw_if_index: l3, flags: api::IfStatusFlags::IF_STATUS_API_FLAG_ADMIN_UP })
        .await
        .unwrap();
    let route = |prefix: &str, sw_if_index: u32, nh: &str| {
        let net: ipnet::Ipv4Net = prefix.parse().unwrap();
        api::IpRouteAddDel {
            is_add: true,
            is_multipath: false,
            route: api::IpRoute {
                prefix: net.into(),
                n_paths: 1,
                paths: vec![api::FibPath {
                    sw_if_index,
                    weight: 1,
                    nh: api::FibPathNh { address: api::AddressUnion::from_ipv4(ip(nh)), ..Default::default() },
                    ..Default::default()
                }],
                ..Default::default()
            },
        }
    };
    let remote_pod = ip("10.1.3.5");
    c.request(&route("10.1.3.0/24", l3, "0.0.0.0")).await.unwrap();
    assert_eq!(
        fake.state().ip4_lookup(0, remote_pod),
        Forwarding::Arp { sw_if_index: l3, next_hop: IpAddr::V4(remote_pod), possible: false }
    );
    assert!(!fake.state().ip4_lookup(0, remote_pod).delivers());
    c.request(&route("10.1.3.0/24", l3, "10.1.3.1")).await.unwrap();
    assert_eq!(
        fake.state().ip4_lookup(0, remote_pod),
        Forwarding::Complete { sw_if_index: l3, next_hop: IpAddr::V4(ip("10.1.3.1")) }
    );
    assert!(fake.state().ip4_lookup(0, remote_pod).delivers());
    let neighbor = |sw_if_index: u32, nh: &str| api::IpNeighborAddDel {
        is_add: true,
        neighbor: api::IpNeighbor {
            sw_if_index,
            flags: api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_STATIC,
            mac_address: [2, 0xfe, 0, 0, 0, 3],
            ip_address: ip(nh).into(),
        },
    };
    c.request(&neighbor(l3, "10.1.3.1")).await.unwrap();
    assert_eq!(
        fake.state().ip4_lookup(0, remote_pod),
        Forwarding::EthernetRewriteOnTunnel { sw_if_index: l3, next_hop: IpAddr::V4(ip("10.1.3.1")) }
    );
    assert!(!fake.state().ip4_lookup(0, remote_pod).delivers());

    // On an Ethernet interface a next hop is resolved by ARP until VPP knows its MAC.
    let nic = 1;
    c.request(&api::SwInterfaceSetFlags { sw_if_index: nic, flags: api::IfStatusFlags::IF_STATUS_API_FLAG_ADMIN_UP })
        .await
        .unwrap();
    c.request(&route("10.2.0.0/16", nic, "192.168.16.254")).await.unwrap();
    let gw = IpAddr::V4(ip("192.168.16.254"));
    assert_eq!(
        fake.state().ip4_lookup(0, ip("10.2.0.1")),
        Forwarding::Arp { sw_if_index: nic, next_hop: gw, possible: true }
    );
    c.request(&neighbor(nic, "192.168.16.254")).await.unwrap();
    assert_eq!(fake.state().ip4_lookup(0, ip("10.2.0.1")), Forwarding::Complete { sw_if_index: nic, next_hop: gw });
    fake.restart();
    assert_eq!(fake.state().nodes["vxlan4-input"], ["error-drop", "l2-input"], "a restart forgets the arc");
}

/// What the ACL plugin does with a tunnel's decapsulated packets: nothing without input
/// ACLs; with them, the first matching rule of the ACLs in order decides, and no match is
/// a drop. VPP lists every interface's ACLs, empty lists included, refuses to delete a
/// listed ACL and empties a deleted interface's lists.
#[tokio::test]
async fn a_tunnels_input_acls_decide_on_its_decapsulated_packets_first_match_wins() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let c = client(&fake).await;
    let next = c
        .request(&api::AddNodeNext { node_name: "vxlan4-input".into(), next_name: "ip4-input".into() })
        .await
        .unwrap()
        .next_index;
    let t = c.request(&tunnel(2, next)).await.unwrap().sw_if_index;
    let (remote, local) = (ip("192.168.16.3"), ip("192.168.16.1"));
    let rx = |vni: u32, from: Ipv4Addr, inner: Packet4| fake.state().vxlan4_rx(from, local, vni, inner);
    let udp = |src: &str, port: u16| Packet4::udp(ip(src), 40000, ip("10.1.1.7"), port);
    let passes = |r: VxlanRx| matches!(r, VxlanRx::Forward { sw_if_index, .. } if sw_if_index == t);
    assert!(passes(rx(10, remote, udp("203.0.113.5", 53))), "no ACL: anything passes");
    assert_eq!(rx(11, remote, udp("10.1.3.7", 53)), VxlanRx::NoTunnel, "another VNI");
    assert_eq!(rx(10, ip("192.168.16.9"), udp("10.1.3.7", 53)), VxlanRx::NoTunnel, "another far end");

    let rule = |permit: bool, src: &str, proto: u8, dport: u16| api::AclRule {
        is_permit: if permit { api::AclAction::ACL_ACTION_API_PERMIT } else { api::AclAction::ACL_ACTION_API_DENY },
        src_prefix: src.parse::<ipnet::Ipv4Net>().unwrap().into(),
        dst_prefix: ipnet::Ipv4Net::default().into(),
        proto: api::IpProto(proto),
        srcport_or_icmptype_last: u16::MAX,
        dstport_or_icmpcode_first: dport,
        dstport_or_icmpcode_last: if proto == 0 { u16::MAX } else { dport },
        ..Default::default()
    };
    let add = |tag: &str, r: Vec<api::AclRule>| api::AclAddReplace {
        acl_index: u32::MAX,
        tag: tag.into(),
        count: r.len() as u32,
        r,
    };
    let pods = c
        .request(&add("pods", vec![rule(false, "10.1.3.66/32", 17, 53), rule(true, "10.1.3.0/24", 0, 0)]))
        .await
        .unwrap()
        .acl_index;
    let node = c.request(&add("node", vec![rule(true, "192.168.16.3/32", 0, 0)])).await.unwrap().acl_index;
    let list = api::AclInterfaceSetAclList { sw_if_index: t, count: 2, n_input: 2, acls: vec![pods, node] };
    c.request(&list).await.unwrap();

    assert!(passes(rx(10, remote, udp("10.1.3.7", 53))));
    assert_eq!(rx(10, remote, udp("10.1.3.66", 53)), VxlanRx::Denied { sw_if_index: t, acl_index: Some(pods) });
    assert!(passes(rx(10, remote, udp("10.1.3.66", 54))), "the deny names port 53 only");
    assert!(passes(rx(10, remote, Packet4::icmp(remote, ip("10.1.1.7"), 11, 0))), "the second ACL");
    assert_eq!(rx(10, remote, udp("10.1.4.7", 53)), VxlanRx::Denied { sw_if_index: t, acl_index: None });

    let lists = c.dump(&api::AclInterfaceListDump { sw_if_index: u32::MAX }).await.unwrap();
    assert_eq!(lists.len(), fake.state().interfaces.len(), "every interface: {lists:?}");
    let of_tunnel = lists.iter().find(|l| l.sw_if_index == t).unwrap();
    assert_eq!((of_tunnel.n_input, of_tunnel.acls.clone()), (2, vec![pods, node]));
    assert!(lists.iter().filter(|l| l.sw_if_index != t).all(|l| l.count == 0 && l.acls.is_empty()));

    assert_eq!(retval(c.request(&api::AclDel { acl_index: pods }).await), -142, "ACL_IN_USE_INBOUND");
    c.request(&api::VxlanAddDelTunnelV3 { is_add: false, ..tunnel(2, next) }).await.unwrap();
    assert!(fake.state().acl_bindings.is_empty(), "the tunnel's lists went with it");
    c.request(&api::AclDel { acl_index: pods }).await.unwrap();
}

/// The ACL plugin validates every rule's prefixes before it creates or replaces an ACL
/// (acl_add_list, ip_prefix_decode2): a source or destination with bits set past its
/// length is refused (-57 INVALID_SRC_ADDRESS, -58 INVALID_DST_ADDRESS) and nothing
/// changes; the same prefix without them is taken.
#[tokio::test]
async fn an_acl_rule_whose_prefix_has_host_bits_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir);
    let c = client(&fake).await;
    let rule = |src: &str, dst: &str| api::AclRule {
        is_permit: api::AclAction::ACL_ACTION_API_PERMIT,
        src_prefix: src.parse::<ipnet::Ipv4Net>().unwrap().into(),
        dst_prefix: dst.parse::<ipnet::Ipv4Net>().unwrap().into(),
        srcport_or_icmptype_last: u16::MAX,
        dstport_or_icmpcode_last: u16::MAX,
        ..Default::default()
    };
    let add = |acl_index: u32, r: Vec<api::AclRule>| api::AclAddReplace {
        acl_index,
        tag: "t".into(),
        count: r.len() as u32,
        r,
    };
    let good = rule("10.1.2.0/24", "0.0.0.0/0");
    let index = c.request(&add(u32::MAX, vec![good.clone()])).await.unwrap().acl_index;
    for (what, rules, want) in [
        ("a source with host bits", vec![good.clone(), rule("10.1.2.7/24", "0.0.0.0/0")], -57),
        ("a destination with host bits", vec![rule("10.1.2.0/24", "10.9.0.1/16")], -58),
    ] {
        assert_eq!(retval(c.request(&add(u32::MAX, rules.clone())).await), want, "create with {what}");
        assert_eq!(retval(c.request(&add(index, rules)).await), want, "replace with {what}");
    }
    let s = fake.state();
    assert_eq!(s.acls.len(), 1, "nothing created: {:?}", s.acls);
    assert_eq!(s.acls[&index].rules, [good], "nothing replaced");
}
