//! The Rust client against the fake VPP: handshake, requests, pipelining, dumps, cursors,
//! events, CRC refusal, reconnect after a (fake) VPP restart.

use std::time::Duration;

use contiv_vpp_binapi::{Client, ClientOptions, Error, api, errno};
use contiv_vpp_fake::{FULL_TABLE_SIZE, FakeOptions, FakeVpp};

fn fake(dir: &tempfile::TempDir, tweak: impl FnOnce(&mut FakeOptions)) -> FakeVpp {
    let mut opts = FakeOptions::new(dir.path().join("api.sock"));
    tweak(&mut opts);
    FakeVpp::start(opts).expect("fake VPP")
}

async fn client(fake: &FakeVpp) -> Client {
    let mut opts = ClientOptions::new(fake.socket());
    opts.request_timeout = Duration::from_secs(5);
    Client::connect(opts).await.expect("connect")
}

fn route(prefix: &str, sw_if_index: u32) -> api::IpRouteAddDel {
    let net: ipnet::Ipv4Net = prefix.parse().unwrap();
    api::IpRouteAddDel {
        is_add: true,
        is_multipath: false,
        route: api::IpRoute {
            prefix: net.into(),
            n_paths: 1,
            paths: vec![api::FibPath { sw_if_index, weight: 1, ..Default::default() }],
            ..Default::default()
        },
    }
}

#[tokio::test]
async fn handshake_gets_the_whole_table_and_a_socket_handle() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir, |o| o.full_table = true);
    let c = client(&fake).await;
    assert_eq!(c.table_len(), Some(FULL_TABLE_SIZE));
    assert_eq!(c.client_index().unwrap() & 0x8000_0000, 0x8000_0000, "socket handle has bit 31 set");
    let v = c.request(&api::ShowVersion::default()).await.unwrap();
    assert_eq!(v.program, "vpe");
    assert!(v.version.contains("fake"));
    c.close().await.expect("sockclnt_delete answered with response 1");
    assert!(!c.is_connected());
}

#[tokio::test]
async fn dumps_end_at_control_ping_and_list_what_was_created() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir, |_| {});
    let c = client(&fake).await;
    let r = c
        .request(&api::AfXdpCreateV3 { host_if: "cslow1".into(), name: "xdp-cslow1".into(), ..Default::default() })
        .await
        .unwrap();
    let ifaces = c.dump(&api::SwInterfaceDump::default()).await.unwrap();
    let names: Vec<&str> = ifaces.iter().map(|i| i.interface_name.as_str()).collect();
    assert_eq!(names, ["local0", "GigabitEthernet0/8/0", "xdp-cslow1"]);
    assert_eq!(ifaces[2].sw_if_index, r.sw_if_index);
    assert_eq!(ifaces[2].interface_dev_type, "AF_XDP interface", "af_xdp's device class name");
    let filtered = c
        .dump(&api::SwInterfaceDump { name_filter_valid: true, name_filter: "xdp".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(filtered.len(), 1);
    let routes: Vec<String> = c
        .dump(&api::IpRouteDump::default())
        .await
        .unwrap()
        .iter()
        .map(|r| r.route.prefix.to_net().unwrap().to_string())
        .collect();
    assert_eq!(
        routes,
        ["0.0.0.0/0", "0.0.0.0/32", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32"],
        "a fresh table holds VPP's special drops only"
    );
}

#[tokio::test]
async fn many_requests_in_flight_each_get_their_own_reply() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir, |_| {});
    let c = client(&fake).await;
    // Even requests route via the NIC (1), odd ones via an interface that does not exist:
    // every future must see the outcome of its own request.
    let futures = (0..2000u32).map(|i| {
        let c = c.clone();
        async move {
            let sw = if i % 2 == 0 { 1 } else { 77 };
            let prefix = format!("10.{}.{}.0/24", i / 256, i % 256);
            (i, c.request(&route(&prefix, sw)).await)
        }
    });
    let results = futures::future::join_all(futures).await;
    for (i, r) in results {
        if i % 2 == 0 {
            r.unwrap_or_else(|e| panic!("request {i}: {e}"));
        } else {
            assert!(matches!(r, Err(Error::Retval { retval: errno::INVALID_SW_IF_INDEX, .. })), "request {i}: {r:?}");
        }
    }
    assert_eq!(fake.state().routes.len(), 1000);
    let dumped = c.dump(&api::IpRouteDump::default()).await.unwrap();
    assert_eq!(dumped.len(), 1000 + 5, "and the table's five special drops");
}

#[tokio::test]
async fn a_message_listed_with_another_crc_is_refused_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir, |o| o.crc_overrides = vec![("sw_interface_dump".into(), 0xdead_beef)]);
    let c = client(&fake).await;
    let err = c.dump(&api::SwInterfaceDump::default()).await.unwrap_err();
    match &err {
        Error::CrcMismatch { name, ours, server } => {
            assert_eq!(*name, "sw_interface_dump");
            assert_eq!(*ours, 0xaa61_0c27);
            assert_eq!(server, "sw_interface_dump_deadbeef");
        }
        other => panic!("expected a CRC mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("sw_interface_dump"), "{err}");
    assert!(c.supports::<api::SwInterfaceDump>().is_err());
    assert_eq!(fake.state().requests.get("sw_interface_dump"), None, "nothing was sent");
    // The rest of the API still works on the same connection.
    c.request(&api::ShowVersion::default()).await.unwrap();
}

#[tokio::test]
async fn getters_follow_the_cursor_through_eagain() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir, |o| o.details_page = 4);
    let c = client(&fake).await;
    c.request(&api::Nat44EdPluginEnableDisable { enable: true, ..Default::default() }).await.unwrap();
    let mut want = Vec::new();
    for _ in 0..10 {
        let l = c.request(&api::CreateLoopbackInstance::default()).await.unwrap();
        c.request(&api::Nat44EdAddDelOutputInterface { is_add: true, sw_if_index: l.sw_if_index }).await.unwrap();
        want.push(l.sw_if_index);
    }
    let (reply, details) = c.get(&api::Nat44EdOutputInterfaceGet::default()).await.unwrap();
    assert_eq!(reply.retval, 0);
    assert_eq!(details.iter().map(|d| d.sw_if_index).collect::<Vec<_>>(), want);
    assert_eq!(fake.state().requests["nat44_ed_output_interface_get"], 3, "pages of 4: 4 + 4 + 2");
}

#[tokio::test]
async fn interface_events_reach_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir, |_| {});
    let watcher = client(&fake).await;
    let mut events = watcher.events();
    watcher.request(&api::WantInterfaceEvents { enable_disable: 1, pid: 4242 }).await.unwrap();
    let actor = client(&fake).await;
    let l = actor.request(&api::CreateLoopbackInstance::default()).await.unwrap();
    actor
        .request(&api::SwInterfaceSetFlags {
            sw_if_index: l.sw_if_index,
            flags: api::IfStatusFlags::IF_STATUS_API_FLAG_ADMIN_UP,
        })
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.expect("an event").unwrap();
    let ev: api::SwInterfaceEvent = ev.decode().expect("sw_interface_event").unwrap();
    assert_eq!((ev.pid, ev.sw_if_index, ev.deleted), (4242, l.sw_if_index, false));
    assert!(ev.flags.contains(api::IfStatusFlags::IF_STATUS_API_FLAG_ADMIN_UP));
    actor.request(&api::DeleteLoopback { sw_if_index: l.sw_if_index }).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.expect("an event").unwrap();
    assert!(ev.decode::<api::SwInterfaceEvent>().unwrap().unwrap().deleted);
}

#[tokio::test]
async fn a_vpp_restart_fails_pending_work_and_reconnect_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir, |_| {});
    let c = client(&fake).await;
    c.request(&api::CreateLoopbackInstance::default()).await.unwrap();
    let generation = c.state().generation;
    fake.restart();
    tokio::time::timeout(Duration::from_secs(5), c.disconnected()).await.expect("loss noticed");
    assert!(!c.state().connected);
    assert!(matches!(c.request(&api::ShowVersion::default()).await, Err(Error::Disconnected)));
    c.reconnect().await.unwrap();
    assert_eq!(c.state(), contiv_vpp_binapi::ConnectionState { connected: true, generation: generation + 1 });
    let ifaces = c.dump(&api::SwInterfaceDump::default()).await.unwrap();
    assert_eq!(ifaces.len(), 2, "the loopback died with the old VPP");
}

#[tokio::test]
async fn unimplemented_requests_get_minus_nine_and_bad_input_is_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir, |_| {});
    let c = client(&fake).await;
    let err = c.request(&api::BridgeDomainAddDelV2 { bd_id: 1, ..Default::default() }).await.unwrap_err();
    assert!(
        matches!(err, Error::Retval { retval: errno::UNIMPLEMENTED, message: "bridge_domain_add_del_v2" }),
        "{err}"
    );
    let too_long = "x".repeat(64);
    let err = c.request(&api::AfXdpCreateV3 { host_if: too_long, ..Default::default() }).await.unwrap_err();
    assert!(matches!(err, Error::Encode { .. }), "{err}");
    assert!(err.to_string().contains("af_xdp_create_v3.host_if"), "{err}");
    assert_eq!(fake.state().requests.get("af_xdp_create_v3"), None);
    c.request(&api::ShowVersion::default()).await.expect("the connection is still good");
}

#[tokio::test]
async fn get_api_json_hands_out_every_module_like_vpp() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake(&dir, |_| {});
    let c = client(&fake).await;
    let r = c.request(&api::GetApiJson::default()).await.unwrap();
    let modules: serde_json::Value = serde_json::from_str(&r.json).expect("a JSON array");
    let names: Vec<&str> = modules.as_array().unwrap().iter().filter_map(|m| m["module"].as_str()).collect();
    assert!(names.contains(&"memclnt") && names.contains(&"nat44_ed"), "{names:?}");
}
