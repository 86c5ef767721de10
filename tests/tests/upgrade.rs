//! Upgrading a running node from the previous release (root): the previous release's agent
//! (built from git history by `cargo xtask test`, path in CONTIV_PREVIOUS_AGENT) wires pods
//! and pins its maps in the previous layout; this release's agent takes over the same pins
//! and state, migrates the maps whose layout changed make-before-break, and an established
//! TCP flow between the pods never stops.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use contiv_tests::{Node, NodeOptions, counter};

#[test]
fn upgrade_from_the_previous_map_layout_keeps_an_established_flow() {
    let Some(previous) = std::env::var_os("CONTIV_PREVIOUS_AGENT") else {
        eprintln!("skipped: CONTIV_PREVIOUS_AGENT is not set; `cargo xtask test` builds the previous release's agent");
        return;
    };
    let mut node = Node::start(NodeOptions { agent_binary: Some(previous.into()), ..Default::default() });
    let a = node.add_pod();
    let b = node.add_pod();
    // The previous release's layout: no SCHEMA map, 16-byte CONFIG.
    assert!(!node.pin_dir.join("SCHEMA").exists(), "the previous release predates SCHEMA");
    let config = node.dump_map("CONFIG");
    assert!(config[0]["value"].get("vni").is_none(), "previous CONFIG layout: {config:?}");

    // An established flow from a to b.
    let b_ip = b.ip;
    let listener = b.ns.enter(move || TcpListener::bind((b_ip, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r, st) = (received.clone(), stop.clone());
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buf = [0u8; 65536];
        while !st.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => return Err("connection closed".to_string()),
                Ok(n) => {
                    r.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    });
    let mut stream = a.ns.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap());
    let st = stop.clone();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x33u8; 8192];
        while !st.load(Ordering::Relaxed) {
            stream.write_all(&chunk).map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok::<_, String>(stream)
    });
    let progress = |what: &str| {
        let before = received.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while received.load(Ordering::Relaxed) < before + 100_000 {
            assert!(Instant::now() < deadline, "the flow stalled {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    progress("under the previous release");
    let fwd_before = counter(&node.pod_counters(a.ip).unwrap(), "fwd_packets");

    // The upgrade: the previous agent stops, this release's starts on the same pins and state.
    node.stop_agent();
    progress("between the agents");
    node.agent_binary = contiv_tests::bin("contiv-agent");
    node.start_agent();
    progress("after the upgrade");

    // The maps have this release's layout now, the counters came along.
    let schema = node.dump_map("SCHEMA");
    assert!(!schema.is_empty(), "layout versions recorded");
    let config = node.dump_map("CONFIG");
    assert!(config[0]["value"].get("vni").is_some(), "CONFIG in the new layout: {config:?}");
    let c = node.pod_counters(a.ip).expect("counters survived the migration");
    assert!(counter(&c, "fwd_packets") >= fwd_before, "counts kept: {c:?}");
    assert!(c.contains_key("tunnel_packets"), "POD_COUNTERS in the new layout: {c:?}");

    // New pods and old ones talk under the new release.
    let fresh = node.add_pod();
    assert!(contiv_tests::ping(&fresh.ns, a.ip, 2), "a new pod reaches an upgraded one");

    stop.store(true, Ordering::Relaxed);
    let stream = writer.join().unwrap();
    assert!(stream.is_ok(), "the sender saw no error: {:?}", stream.err());
    assert_eq!(reader.join().unwrap(), Ok(()), "the receiver saw no error");
    drop(stream);
}
