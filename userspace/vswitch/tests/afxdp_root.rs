//! Privileged tests (root): a real AF_XDP port on a veth in a throwaway
//! network namespace, fed by an XDP program redirecting into an XSKMAP.
//!
//! Frames are injected on the host end of the slow-path veth with a raw
//! AF_PACKET socket; they cross the veth, are redirected by XDP into the port's
//! socket, answered by the built-in vswitch, transmitted on the vswitch end and
//! captured again on the host end.

mod support;

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use contiv_vswitch::packet::internet_checksum;
use contiv_vswitch::{AfXdpPort, BuiltinVswitch, GatewayConfig, PortConfig, PortError, RunningPort, spawn};
use support::{HOST_END, PacketSocket, RedirectToXsk, SlowPortNetns, VSWITCH_END, ifindex, wait_until, xdp_attached};

const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const GW_MAC: [u8; 6] = [0x02, 0xfe, 0x00, 0x00, 0x00, 0x01];
const POD_IP: [u8; 4] = [10, 1, 0, 7];
const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x01, 0x00, 0x07];
const WAIT: Duration = Duration::from_secs(5);

fn vswitch() -> BuiltinVswitch {
    BuiltinVswitch::new(GatewayConfig { ip: GW_IP, mac: GW_MAC, path_mtu: None })
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    [
        &[0xff; 6][..],
        &POD_MAC,
        &[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01],
        &POD_MAC,
        &POD_IP,
        &[0; 6],
        &target,
    ]
    .concat()
}

fn echo_request(dst: [u8; 4], id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&POD_IP);
    ip.extend_from_slice(&dst);
    let c = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    [&GW_MAC[..], &POD_MAC, &[0x08, 0x00], &ip, &icmp].concat()
}

fn is_arp_reply(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
}

fn is_echo_reply(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[34] == 0
}

/// Sends an ARP request and an ICMP echo for the gateway, plus a frame for an
/// unknown destination, through `port`, asserting the replies and counters.
fn exchange_and_check(port: &RunningPort<BuiltinVswitch>) {
    let host = PacketSocket::bind(HOST_END);

    host.send(&arp_request(GW_IP.octets()));
    let reply = host.recv_matching(WAIT, is_arp_reply).expect("an ARP reply on the host end of the slow-path port");
    let expected: Vec<u8> = [
        &POD_MAC[..],
        &GW_MAC,
        &[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x02],
        &GW_MAC,
        &GW_IP.octets(),
        &POD_MAC,
        &POD_IP,
    ]
    .concat();
    assert_eq!(reply, expected, "exact ARP reply bytes");

    let payload: Vec<u8> = (0..48u8).collect();
    host.send(&echo_request(GW_IP.octets(), 0x4242, 3, &payload));
    let reply =
        host.recv_matching(WAIT, is_echo_reply).expect("an ICMP echo reply on the host end of the slow-path port");
    assert_eq!(&reply[0..6], &POD_MAC);
    assert_eq!(&reply[6..12], &GW_MAC);
    assert_eq!(&reply[26..30], &GW_IP.octets(), "source: the gateway");
    assert_eq!(&reply[30..34], &POD_IP, "destination: the pod");
    assert_eq!(reply[22], 64, "TTL");
    assert_eq!(internet_checksum(&reply[14..34]), 0, "IPv4 header checksum");
    assert_eq!(internet_checksum(&reply[34..]), 0, "ICMP checksum");
    assert_eq!(&reply[38..40], &0x4242u16.to_be_bytes(), "ICMP id");
    assert_eq!(&reply[40..42], &3u16.to_be_bytes(), "ICMP seq");
    assert_eq!(&reply[42..], &payload[..], "ICMP payload");

    host.send(&echo_request([10, 1, 0, 99], 1, 1, b"lost"));
    assert!(
        wait_until(WAIT, || port.backend_counters().drops.unknown_destination >= 1),
        "the unknown destination is counted: {:?}",
        port.backend_counters()
    );

    // The port updates its own counters right after the batch.
    assert!(wait_until(WAIT, || port.counters().backend_drops >= 1));
    let vs = port.backend_counters();
    assert_eq!(vs.arp_replies, 1, "{vs:?}");
    assert_eq!(vs.icmp_echo_replies, 1, "{vs:?}");
    let pc = port.counters();
    assert!(pc.rx_frames >= 3, "{pc:?}");
    assert_eq!(pc.tx_frames, 2, "{pc:?}");
    assert_eq!(pc.tx_bytes, (42 + 14 + 20 + 8 + 48) as u64, "{pc:?}");
    assert!(pc.backend_drops >= 1, "{pc:?}");
    assert_eq!(pc.tx_dropped_no_frame + pc.tx_dropped_too_big + pc.tx_dropped_ring_full, 0, "{pc:?}");
    assert!(port.is_serving());
}

#[test]
fn afxdp_port_answers_arp_and_ping_root() {
    require_root!("afxdp_port_answers_arp_and_ping_root");
    let ns = SlowPortNetns::new("arp");
    ns.run(|| {
        let xdp = RedirectToXsk::attach(ifindex(VSWITCH_END)).expect("attach the XDP program");
        assert!(xdp_attached(VSWITCH_END), "the probe sees an attached program");
        let port = spawn(VSWITCH_END, 0, vswitch()).expect("AF_XDP port on the vswitch end");
        xdp.register(port.queue(), port.as_raw_fd()).expect("register the socket in the XSKMAP");
        assert!(port.need_wakeup(), "XDP_USE_NEED_WAKEUP works on veth in copy mode");
        exchange_and_check(&port);
        port.stop().expect("the port stops cleanly");
    });
}

/// The datapath's own object, built by `cargo xtask build-ebpf`.
fn contiv_ebpf_object() -> PathBuf {
    if let Some(p) = std::env::var_os("CONTIV_EBPF_OBJECT") {
        return p.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../ebpf/contiv-ebpf/target/bpfel-unknown-none/release/contiv-ebpf")
}

#[test]
fn afxdp_port_behind_contiv_xdp_program_root() {
    require_root!("afxdp_port_behind_contiv_xdp_program_root");
    use aya::maps::{PerCpuArray, XskMap};
    use aya::programs::{Xdp, XdpMode};
    use contiv_common::{SlowPortCounters, map_names, program_names};

    let object = contiv_ebpf_object();
    if !object.exists() {
        // The eBPF side is built by its own toolchain; without it this test
        // has nothing to load. The hand-assembled program test above covers
        // the port itself.
        eprintln!("skipped: {} not built (cargo xtask build-ebpf)", object.display());
        return;
    }
    let ns = SlowPortNetns::new("obj");
    ns.run(|| {
        let mut ebpf = aya::Ebpf::load_file(&object).unwrap_or_else(|e| panic!("load {}: {e}", object.display()));
        let prog: &mut Xdp = ebpf
            .program_mut(program_names::TO_VSWITCH)
            .expect("program xdp_to_vswitch")
            .try_into()
            .expect("an XDP program");
        prog.load().expect("load xdp_to_vswitch");
        prog.attach(VSWITCH_END, XdpMode::Default).expect("attach xdp_to_vswitch");
        let port = spawn(VSWITCH_END, 0, vswitch()).expect("AF_XDP port on the vswitch end");
        let mut xsks =
            XskMap::try_from(ebpf.map_mut(map_names::SLOWPATH_XSKS).expect("map SLOWPATH_XSKS")).expect("an XSKMAP");
        xsks.set(port.queue(), port.as_raw_fd(), 0).expect("register the socket in SLOWPATH_XSKS");
        exchange_and_check(&port);

        // The frames really went through the datapath's program.
        let counters: PerCpuArray<_, SlowPortCounters> =
            PerCpuArray::try_from(ebpf.map(map_names::SLOWPORT_COUNTERS).expect("map SLOWPORT_COUNTERS"))
                .expect("a per-CPU array");
        let per_cpu = counters.get(&0, 0).expect("read SLOWPORT_COUNTERS");
        let to_vswitch: u64 = per_cpu.iter().map(|c| c.to_vswitch_packets).sum();
        let no_socket: u64 = per_cpu.iter().map(|c| c.to_vswitch_no_socket).sum();
        assert!(to_vswitch >= 3, "to_vswitch_packets = {to_vswitch}");
        assert_eq!(no_socket, 0, "to_vswitch_no_socket");
        port.stop().expect("the port stops cleanly");
    });
}

#[test]
fn stopped_port_releases_its_queue_root() {
    require_root!("stopped_port_releases_its_queue_root");
    let ns = SlowPortNetns::new("stop");
    ns.run(|| {
        let port = AfXdpPort::open(PortConfig::new(VSWITCH_END, 0)).expect("first socket");
        // libxdp did not attach its default program: the agent attaches ours.
        assert!(!xdp_attached(VSWITCH_END), "no XDP program attached");
        // A second socket on the same queue is refused while the first lives
        // (after retrying for BUSY_RETRY).
        match AfXdpPort::open(PortConfig::new(VSWITCH_END, 0)) {
            Err(e) if e.is_queue_busy() => {}
            other => panic!("expected EBUSY, got {other:?}"),
        }
        let running = port.run(vswitch()).expect("run");
        let started = std::time::Instant::now();
        running.stop().expect("stop");
        assert!(started.elapsed() < Duration::from_secs(2), "stop waits at most about one poll interval");
        // Closed by stop(): the queue can be bound again right away (open
        // waits out the kernel's deferred release of the queue).
        let again = spawn(VSWITCH_END, 0, vswitch()).expect("bind again after stop");
        drop(again);
        let _third = AfXdpPort::open(PortConfig::new(VSWITCH_END, 0)).expect("bind after drop");
    });
}

#[test]
fn gateway_change_applies_to_a_running_port_root() {
    require_root!("gateway_change_applies_to_a_running_port_root");
    let ns = SlowPortNetns::new("gw");
    ns.run(|| {
        let xdp = RedirectToXsk::attach(ifindex(VSWITCH_END)).expect("attach the XDP program");
        let port = spawn(VSWITCH_END, 0, vswitch()).expect("AF_XDP port");
        xdp.register(0, port.as_raw_fd()).expect("register");
        let new_gw = Ipv4Addr::new(10, 1, 0, 254);
        port.with_backend(|vs| vs.set_gateway(GatewayConfig { ip: new_gw, mac: GW_MAC, path_mtu: None }));
        let host = PacketSocket::bind(HOST_END);
        host.send(&arp_request(new_gw.octets()));
        let reply = host.recv_matching(WAIT, is_arp_reply).expect("ARP reply for the new gateway");
        assert_eq!(&reply[28..32], &new_gw.octets());
        assert_eq!(port.backend_counters().arp_replies, 1);
    });
}

/// Sends `frame` on the host end and waits until the port has received
/// `expected_rx` frames in total.
fn send_and_wait_rx<B>(host: &PacketSocket, port: &RunningPort<B>, frame: &[u8], expected_rx: u64) {
    host.send(frame);
    assert!(
        wait_until(WAIT, || port.counters().rx_frames >= expected_rx),
        "the port received frame {expected_rx}: {:?}",
        port.counters()
    );
}

#[test]
fn small_umem_recycles_rx_and_tx_frames_root() {
    require_root!("small_umem_recycles_rx_and_tx_frames_root");
    let ns = SlowPortNetns::new("small");
    ns.run(|| {
        let xdp = RedirectToXsk::attach(ifindex(VSWITCH_END)).expect("attach the XDP program");
        let config = PortConfig {
            frame_count: 4, // two receive and two transmit frames
            ..PortConfig::new(VSWITCH_END, 0)
        };
        let port = AfXdpPort::open(config).expect("AF_XDP port").run(vswitch()).expect("run");
        xdp.register(0, port.as_raw_fd()).expect("register");
        let host = PacketSocket::bind(HOST_END);
        for seq in 0..30u16 {
            host.send(&echo_request(GW_IP.octets(), 7, seq, b"recycle"));
            host.recv_matching(WAIT, |f| is_echo_reply(f) && f[40..42] == seq.to_be_bytes())
                .unwrap_or_else(|| panic!("echo reply {seq}: {:?}", port.counters()));
        }
        // The port updates its counters right after the batch's sendto().
        assert!(wait_until(WAIT, || port.counters().rx_frames == 30));
        let pc = port.counters();
        assert_eq!(pc.tx_frames, 30, "{pc:?}");
        assert_eq!(pc.tx_dropped_no_frame, 0, "{pc:?}");
        assert_eq!(port.backend_counters().icmp_echo_replies, 30);
    });
}

/// Emits one oversized frame (if asked), then `copies` copies of each
/// received frame with the gateway MAC as source and a sequence number in the
/// last two bytes.
struct Burst {
    oversized: bool,
    copies: usize,
    counters: contiv_vswitch::VswitchCounters,
}

impl Burst {
    fn new(oversized: bool, copies: usize) -> Self {
        Self { oversized, copies, counters: Default::default() }
    }
}

fn is_burst_copy(f: &[u8]) -> bool {
    f[6..12] == GW_MAC
}

impl contiv_vswitch::SlowPath for Burst {
    fn handle(&mut self, frame: &[u8], tx: &mut dyn FnMut(&[u8])) -> contiv_vswitch::Verdict {
        if self.oversized {
            tx(&vec![0u8; 8192]);
        }
        let mut copy = frame.to_vec();
        copy[6..12].copy_from_slice(&GW_MAC);
        for i in 0..self.copies {
            let n = copy.len();
            copy[n - 2..].copy_from_slice(&(i as u16).to_be_bytes());
            tx(&copy);
        }
        let verdict = contiv_vswitch::Verdict::Replied(contiv_vswitch::ReplyKind::Arp);
        self.counters.record(frame.len(), verdict);
        verdict
    }

    fn counters(&self) -> contiv_vswitch::VswitchCounters {
        self.counters
    }
}

#[test]
fn tx_overflow_is_counted_and_not_fatal_root() {
    require_root!("tx_overflow_is_counted_and_not_fatal_root");
    let ns = SlowPortNetns::new("burst");
    ns.run(|| {
        let xdp = RedirectToXsk::attach(ifindex(VSWITCH_END)).expect("attach the XDP program");
        let config = PortConfig { frame_count: 4, ..PortConfig::new(VSWITCH_END, 0) };
        let port = AfXdpPort::open(config).expect("port").run(Burst::new(true, 5)).expect("run");
        xdp.register(0, port.as_raw_fd()).expect("register");
        let host = PacketSocket::bind(HOST_END);
        send_and_wait_rx(&host, &port, &arp_request([10, 9, 9, 9]), 1);
        let pc = port.counters();
        assert_eq!(pc.tx_dropped_too_big, 1, "{pc:?}");
        assert_eq!(pc.tx_frames, 2, "only two transmit frames exist: {pc:?}");
        assert_eq!(pc.tx_dropped_no_frame, 3, "{pc:?}");
        // Once the kernel completed them, the frames serve the next burst.
        std::thread::sleep(Duration::from_millis(100));
        send_and_wait_rx(&host, &port, &arp_request([10, 9, 9, 8]), 2);
        let pc = port.counters();
        assert_eq!(pc.tx_frames, 4, "{pc:?}");
        assert!(port.is_serving());
        assert_eq!(port.backend_counters().rx_frames, 2);
    });
}

/// A backend that panics on the first frame.
struct Panics;

impl contiv_vswitch::SlowPath for Panics {
    fn handle(&mut self, _: &[u8], _: &mut dyn FnMut(&[u8])) -> contiv_vswitch::Verdict {
        panic!("backend bug");
    }

    fn counters(&self) -> contiv_vswitch::VswitchCounters {
        Default::default()
    }
}

#[test]
fn backend_panic_is_reported_and_keeps_the_socket_root() {
    require_root!("backend_panic_is_reported_and_keeps_the_socket_root");
    let ns = SlowPortNetns::new("panic");
    ns.run(|| {
        let xdp = RedirectToXsk::attach(ifindex(VSWITCH_END)).expect("attach the XDP program");
        let port = spawn(VSWITCH_END, 0, Panics).expect("port");
        xdp.register(0, port.as_raw_fd()).expect("register");
        assert!(port.is_serving());
        PacketSocket::bind(HOST_END).send(&arp_request(GW_IP.octets()));
        assert!(wait_until(WAIT, || !port.is_serving()), "the failure is reported");
        // The socket is still open: the registered fd stays valid.
        xdp.register(0, port.as_raw_fd()).expect("the socket can still be registered");
        match port.stop() {
            Err(PortError::Failed { reason, .. }) => {
                assert!(reason.contains("backend bug"), "{reason}")
            }
            other => panic!("expected the failure, got {other:?}"),
        }
    });
}

#[test]
fn tx_burst_beyond_one_sendto_batch_is_fully_sent_root() {
    require_root!("tx_burst_beyond_one_sendto_batch_is_fully_sent_root");
    // The kernel transmits at most 32 frames per sendto() in copy mode.
    const COPIES: usize = 200;
    let ns = SlowPortNetns::new("big");
    ns.run(|| {
        let xdp = RedirectToXsk::attach(ifindex(VSWITCH_END)).expect("attach the XDP program");
        // A long poll interval: frames left on the tx ring would wait for it.
        let config = PortConfig { poll_interval: Duration::from_secs(2), ..PortConfig::new(VSWITCH_END, 0) };
        let port = AfXdpPort::open(config).expect("port").run(Burst::new(false, COPIES)).expect("run");
        xdp.register(0, port.as_raw_fd()).expect("register");
        let host = PacketSocket::bind(HOST_END);
        host.send(&arp_request([10, 9, 9, 9]));
        let started = std::time::Instant::now();
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < COPIES {
            let Some(f) = host.recv_matching(Duration::from_secs(2), is_burst_copy) else {
                break;
            };
            seen.insert(u16::from_be_bytes([f[f.len() - 2], f[f.len() - 1]]));
        }
        assert_eq!(seen.len(), COPIES, "all copies arrive without further traffic: {:?}", port.counters());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "sent at once, not one poll interval per sendto batch: {:?}",
            started.elapsed()
        );
        assert_eq!(port.counters().tx_frames, COPIES as u64);
    });
}

#[test]
fn removed_interface_is_reported_root() {
    require_root!("removed_interface_is_reported_root");
    let ns = SlowPortNetns::new("gone");
    let port = ns.run(|| spawn(VSWITCH_END, 0, vswitch()).expect("port"));
    assert!(port.is_serving());
    let out =
        std::process::Command::new("ip").args(["-n", &ns.name, "link", "del", HOST_END]).output().expect("ip link del");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_until(WAIT, || !port.is_serving()), "the port notices its interface is gone");
    match port.stop() {
        Err(PortError::Failed { reason, .. }) => assert!(reason.contains("down"), "{reason}"),
        other => panic!("expected a failure, got {other:?}"),
    }
}
