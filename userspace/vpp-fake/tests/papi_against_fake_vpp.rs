//! The real vpp_papi 2.4.2 (VPP's own Python client) against the fake VPP: it connects,
//! programs, dumps and reads back what our Rust client programmed. That it works at all
//! shows the fake speaks VPP's wire protocol; what it reads shows what VPP would hold.
//!
//! Needs the virtualenv `cargo xtask setup` creates (target/vpp-papi-venv); without it these
//! tests skip with one line, except under `cargo xtask test`, where they fail.

use contiv_vpp_binapi::{Client, ClientOptions, api};
use contiv_vpp_fake::{FULL_TABLE_SIZE, FakeOptions, FakeVpp, papi::Papi};
use serde_json::{Value, json};

fn start(dir: &tempfile::TempDir, tweak: impl FnOnce(&mut FakeOptions)) -> FakeVpp {
    let mut opts = FakeOptions::new(dir.path().join("api.sock"));
    tweak(&mut opts);
    FakeVpp::start(opts).expect("fake VPP")
}

/// Runs vpp_papi off the runtime's threads (the fake serves it meanwhile).
async fn drive(papi: &Papi, fake: &FakeVpp, calls: Value, events: bool) -> Value {
    let (papi, socket) = (papi.clone(), fake.socket().to_owned());
    tokio::task::spawn_blocking(move || papi.drive(&socket, calls, events, if events { 0.5 } else { 0.0 }))
        .await
        .expect("vpp_papi runner")
}

/// A path as vpp_papi wants it: every fixed array given in full.
fn papi_path(sw_if_index: u32, nh: &str) -> Value {
    json!({
        "sw_if_index": sw_if_index, "table_id": 0, "rpf_id": 0, "weight": 1, "preference": 0,
        "type": 0, "flags": 0, "proto": 0,
        "nh": {"address": {"ip4": nh}, "via_label": 0, "obj_id": 0, "classify_table_index": 4294967295u32},
        "n_labels": 0,
        "label_stack": vec![json!({"is_uniform": 0, "label": 0, "ttl": 0, "exp": 0}); 16],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpp_papi_connects_programs_and_dumps_the_fake() {
    let Some(papi) = Papi::for_test("vpp_papi_connects_programs_and_dumps_the_fake") else { return };
    let dir = tempfile::tempdir().unwrap();
    let fake = start(&dir, |o| o.full_table = true);
    // local0 = 0, the NIC = 1; papi creates loop0 = 2, xdp-cslow1 = 3, loop1 = 4.
    let calls = json!([
        {"call": "show_version"},
        {"call": "create_loopback_instance", "args": {}},
        {"call": "af_xdp_create_v3", "args": {"host_if": "cslow1", "name": "xdp-cslow1", "rxq_num": 1, "mode": 1}},
        {"call": "want_interface_events", "args": {"enable_disable": 1, "pid": 99}},
        {"call": "sw_interface_set_flags", "args": {"sw_if_index": 3, "flags": 1}},
        {"call": "sw_interface_add_del_address", "args": {"sw_if_index": 3, "is_add": true, "prefix": "10.1.1.1/24"}},
        {"call": "ip_route_add_del", "args": {"is_add": true, "route": {
            "table_id": 0, "prefix": "10.2.0.0/16", "n_paths": 1, "paths": [papi_path(1, "192.168.16.1")]}}},
        {"call": "sw_interface_dump", "args": {}},
        {"call": "ip_address_dump", "args": {"sw_if_index": 3, "is_ipv6": false}},
        {"call": "ip_route_dump", "args": {"table": {"table_id": 0, "is_ip6": false, "name": ""}}},
        {"call": "create_loopback_instance", "args": {}},
        {"call": "nat44_ed_plugin_enable_disable", "args": {"enable": true, "sessions": 1024}},
        {"call": "nat44_ed_add_del_output_interface", "args": {"is_add": true, "sw_if_index": 0}},
        {"call": "nat44_ed_add_del_output_interface", "args": {"is_add": true, "sw_if_index": 1}},
        {"call": "nat44_ed_add_del_output_interface", "args": {"is_add": true, "sw_if_index": 2}},
        {"call": "nat44_ed_add_del_output_interface", "args": {"is_add": true, "sw_if_index": 3}},
        {"call": "nat44_ed_add_del_output_interface", "args": {"is_add": true, "sw_if_index": 4}},
        {"call": "nat44_ed_output_interface_get", "args": {"cursor": 0}, "cursor_loop": true},
        {"call": "bridge_domain_add_del_v2", "args": {"bd_id": 7, "is_add": true}},
    ]);
    let out = drive(&papi, &fake, calls, true).await;
    assert_eq!(out["connected"], true);
    assert_eq!(out["table_size"], FULL_TABLE_SIZE, "vpp_papi read the whole table");
    let r = out["results"].as_array().unwrap();
    assert!(r.iter().all(|x| x.get("error").is_none()), "a call failed: {r:#?}");
    assert_eq!(r[0]["program"], "vpe");
    assert_eq!((r[1]["retval"].as_i64(), r[1]["sw_if_index"].as_u64()), (Some(0), Some(2)));
    assert_eq!((r[2]["retval"].as_i64(), r[2]["sw_if_index"].as_u64()), (Some(0), Some(3)));
    for i in [3, 4, 5, 6] {
        assert_eq!(r[i]["retval"], 0, "call {i}: {}", r[i]);
    }
    let names: Vec<&str> = r[7].as_array().unwrap().iter().map(|d| d["interface_name"].as_str().unwrap()).collect();
    assert_eq!(names, ["local0", "GigabitEthernet0/8/0", "loop0", "xdp-cslow1"]);
    assert_eq!(r[7][3]["interface_dev_type"], "AF_XDP interface");
    assert_eq!(r[7][3]["flags"], 3, "admin and link up");
    assert_eq!(r[8][0]["prefix"], "10.1.1.1/24");
    let route = |prefix: &str| r[9].as_array().unwrap().iter().find(|x| x["route"]["prefix"] == prefix).cloned();
    let added = route("10.2.0.0/16").expect("the route papi added");
    assert_eq!(added["route"]["paths"][0]["sw_if_index"], 1);
    let connected = route("10.1.1.0/24").expect("VPP's connected route for the address of an up interface");
    assert_eq!(connected["route"]["paths"][0]["sw_if_index"], 3);
    assert!(route("10.1.1.1/32").is_some(), "and its local route");
    // The getter took two calls (pages of 4) and returned all five interfaces.
    let got: Vec<u64> =
        r[17]["details"].as_array().unwrap().iter().map(|d| d["sw_if_index"].as_u64().unwrap()).collect();
    assert_eq!(got, [0, 1, 2, 3, 4]);
    assert_eq!(fake.state().requests["nat44_ed_output_interface_get"], 2);
    assert_eq!(r[18]["retval"], -9, "unimplemented messages answer -9");
    // The admin-up change reached vpp_papi's event callback as sw_interface_event.
    let events = out["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "sw_interface_event" && e["msg"]["sw_if_index"] == 3 && e["msg"]["pid"] == 99),
        "{events:#?}"
    );
    // What papi programmed is the fake's state.
    let s = fake.state();
    let xdp = s.interface_by_name("xdp-cslow1").unwrap();
    assert!(xdp.admin_up);
    assert_eq!(xdp.addresses, vec!["10.1.1.1/24".parse::<ipnet::IpNet>().unwrap()]);
    assert_eq!(s.routes.len(), 1);
    assert_eq!(fake.connections(), 0, "vpp_papi's sockclnt_delete closed its connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpp_papi_reads_back_what_the_rust_client_programmed() {
    let Some(papi) = Papi::for_test("vpp_papi_reads_back_what_the_rust_client_programmed") else { return };
    let dir = tempfile::tempdir().unwrap();
    let fake = start(&dir, |_| {});
    let c = Client::connect(ClientOptions::new(fake.socket())).await.unwrap();
    let tunnel = c
        .request(&api::VxlanAddDelTunnelV3 {
            is_add: true,
            instance: 7,
            src_address: "192.168.16.1".parse::<std::net::IpAddr>().unwrap().into(),
            dst_address: "192.168.16.2".parse::<std::net::IpAddr>().unwrap().into(),
            vni: 10,
            decap_next_index: u32::MAX,
            mcast_sw_if_index: u32::MAX,
            is_l3: true,
            ..Default::default()
        })
        .await
        .unwrap();
    c.request(&api::IpNeighborAddDel {
        is_add: true,
        neighbor: api::IpNeighbor {
            sw_if_index: 1,
            flags: api::IpNeighborFlags::IP_API_NEIGHBOR_FLAG_STATIC,
            mac_address: [2, 0, 0, 0, 0, 9],
            ip_address: "192.168.16.9".parse::<std::net::IpAddr>().unwrap().into(),
        },
    })
    .await
    .unwrap();
    c.request(&api::Nat44EdPluginEnableDisable { enable: true, ..Default::default() }).await.unwrap();
    c.request(&api::Nat44AddDelStaticMappingV2 {
        is_add: true,
        local_ip_address: [172, 30, 1, 2],
        external_ip_address: [192, 168, 16, 1],
        protocol: 6,
        local_port: 22,
        external_port: 22,
        external_sw_if_index: u32::MAX,
        tag: "host-ssh".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let rule = api::AclRule {
        is_permit: api::AclAction::ACL_ACTION_API_PERMIT,
        src_prefix: "10.1.0.0/16".parse::<ipnet::Ipv4Net>().unwrap().into(),
        dst_prefix: "0.0.0.0/0".parse::<ipnet::Ipv4Net>().unwrap().into(),
        proto: api::IpProto::IP_API_PROTO_TCP,
        dstport_or_icmpcode_first: 80,
        dstport_or_icmpcode_last: 80,
        srcport_or_icmptype_last: 65535,
        ..Default::default()
    };
    let acl = c
        .request(&api::AclAddReplace { acl_index: u32::MAX, tag: "web".into(), count: 1, r: vec![rule] })
        .await
        .unwrap();
    let calls = json!([
        {"call": "vxlan_tunnel_v2_dump", "args": {"sw_if_index": 4294967295u32}},
        {"call": "ip_neighbor_dump", "args": {"sw_if_index": 4294967295u32, "af": 0}},
        {"call": "nat44_static_mapping_dump", "args": {}},
        {"call": "acl_dump", "args": {"acl_index": 4294967295u32}},
    ]);
    let out = drive(&papi, &fake, calls, false).await;
    let r = out["results"].as_array().unwrap();
    let t = &r[0][0];
    assert_eq!(t["sw_if_index"], tunnel.sw_if_index);
    assert_eq!((t["src_address"].as_str(), t["dst_address"].as_str()), (Some("192.168.16.1"), Some("192.168.16.2")));
    assert_eq!((t["vni"].as_u64(), t["instance"].as_u64(), t["dst_port"].as_u64()), (Some(10), Some(7), Some(4789)));
    let n = &r[1][0]["neighbor"];
    assert_eq!(
        (n["ip_address"].as_str(), n["mac_address"].as_str()),
        (Some("192.168.16.9"), Some("02:00:00:00:00:09"))
    );
    let m = &r[2][0];
    assert_eq!(
        (m["local_ip_address"].as_str(), m["external_ip_address"].as_str()),
        (Some("172.30.1.2"), Some("192.168.16.1"))
    );
    assert_eq!((m["local_port"].as_u64(), m["tag"].as_str()), (Some(22), Some("host-ssh")));
    let a = &r[3][0];
    assert_eq!(
        (a["acl_index"].as_u64(), a["tag"].as_str(), a["count"].as_u64()),
        (Some(acl.acl_index as u64), Some("web"), Some(1))
    );
    assert_eq!(a["r"][0]["src_prefix"], "10.1.0.0/16");
    assert_eq!(a["r"][0]["dstport_or_icmpcode_first"], 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpp_papi_also_refuses_a_message_listed_with_another_crc() {
    let Some(papi) = Papi::for_test("vpp_papi_also_refuses_a_message_listed_with_another_crc") else { return };
    let dir = tempfile::tempdir().unwrap();
    let fake = start(&dir, |o| o.crc_overrides = vec![("sw_interface_dump".into(), 0x0bad_c0de)]);
    let calls = json!([{"call": "sw_interface_dump", "args": {}}, {"call": "show_version"}]);
    let out = drive(&papi, &fake, calls, false).await;
    assert_eq!(out["missing"], json!(["sw_interface_dump"]), "vpp_papi skips exactly that message");
    let err = out["results"][0]["error"].as_str().expect("calling it fails");
    assert!(err.contains("sw_interface_dump"), "{err}");
    assert_eq!(out["results"][1]["program"], "vpe");
    assert_eq!(fake.state().requests.get("sw_interface_dump"), None);
}
