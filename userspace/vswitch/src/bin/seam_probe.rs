//! Benchmark probe for `cargo xtask bench vpp` (the XDP -> AF_XDP seam). Runs inside a
//! network namespace holding a veth pair: frames are blasted into the peer end with an
//! AF_PACKET socket and measured where they land on the slow-path end, either
//!
//! - `afxdp`: the datapath's own `xdp_to_vswitch` (from the eBPF object) redirecting into an
//!   AF_XDP socket served by the built-in vswitch ([`contiv_vswitch::AfXdpPort`]), counting
//!   frames the vswitch received, or
//! - `xdp-drop`: a two-instruction XDP program returning XDP_DROP on the same veth, counting
//!   the kernel's `rx_queue_0_xdp_drops`.
//!
//! The sender is pinned to CPU 0, the vswitch's port thread to CPU 1. Prints one JSON object.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use contiv_vswitch::{AfXdpPort, BuiltinVswitch, GatewayConfig, PortConfig, packet::internet_checksum};

struct Args {
    object: String,
    ifname: String,
    peer: String,
    mode: String,
    frame_size: usize,
    seconds: f64,
}

fn parse_args() -> Args {
    let mut a = Args {
        object: String::new(),
        ifname: "cslow1".into(),
        peer: "gen0".into(),
        mode: "afxdp".into(),
        frame_size: 64,
        seconds: 3.0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value")).clone();
        match k.as_str() {
            "--object" => a.object = v,
            "--ifname" => a.ifname = v,
            "--peer" => a.peer = v,
            "--mode" => a.mode = v,
            "--frame-size" => a.frame_size = v.parse().expect("--frame-size"),
            "--seconds" => a.seconds = v.parse().expect("--seconds"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).expect("ifname");
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

/// An Ethernet + IPv4 + UDP frame of `size` bytes to an address nothing serves.
fn frame(size: usize) -> Vec<u8> {
    let size = size.max(60);
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&[0x02, 0xfe, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x0a, 0x58, 0x0a, 0x01, 0x00, 0x07]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (size - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 1, 0, 7]);
    ip[16..20].copy_from_slice(&[10, 99, 0, 1]);
    let c = internet_checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&4000u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

/// A raw packet socket sending on `ifname`, bypassing the qdisc.
fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: valid option buffer. PACKET_QDISC_BYPASS = 20.
    unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, 20, (&one as *const libc::c_int).cast(), 4);
    }
    // SAFETY: zeroed sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex(ifname) as i32;
    // SAFETY: sll is a valid sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

/// Sends `frame` in batches of 64 (sendmmsg) until `stop`; counts frames handed to the kernel.
fn blast(fd: RawFd, frame: Vec<u8>, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    pin_to_cpu(0);
    const BATCH: usize = 64;
    let mut iov = libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() };
    // SAFETY: mmsghdr is plain data; zeroed is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs point at `iov`, which points at `frame`; both outlive the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// `ethtool -S` counter of the slow-path end.
fn ethtool_stat(ifname: &str, name: &str) -> u64 {
    let out = Command::new("ethtool").args(["-S", ifname]).output().expect("ethtool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}:")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in ethtool -S {ifname}"))
}

// === the XDP_DROP baseline program (raw bpf(2), no toolchain needed) ===

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<RawFd> {
    // SAFETY: attr is a valid union bpf_attr buffer; pointers in it point at live buffers.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc as RawFd) }
}

/// Loads `r0 = XDP_DROP; exit` and attaches it (bpf link, native mode) to `ifindex`.
fn attach_xdp_drop(ifindex: u32) -> (OwnedFd, OwnedFd) {
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = CString::new("GPL").expect("license");
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&6u32.to_ne_bytes()); // BPF_PROG_TYPE_XDP
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: the kernel returned a new fd.
    let prog = unsafe { OwnedFd::from_raw_fd(bpf(5, &mut attr).expect("BPF_PROG_LOAD")) };
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&37u32.to_ne_bytes()); // BPF_XDP
    // SAFETY: the kernel returned a new fd.
    let link = unsafe { OwnedFd::from_raw_fd(bpf(28, &mut attr).expect("BPF_LINK_CREATE")) };
    (prog, link)
}

fn main() {
    let args = parse_args();
    // The port thread inherits this affinity; the sender moves itself to CPU 0.
    pin_to_cpu(1);
    let frame = frame(args.frame_size);
    let frame_len = frame.len();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sock = packet_socket(&args.peer);

    let mut keep_ebpf = None;
    let mut keep_drop = None;
    let mut port = None;
    let counter: Box<dyn Fn() -> u64> = match args.mode.as_str() {
        "afxdp" => {
            use aya::{
                maps::XskMap,
                programs::{Xdp, XdpMode},
            };
            use contiv_common::{map_names, program_names};
            let mut ebpf = aya::Ebpf::load_file(&args.object).unwrap_or_else(|e| panic!("load {}: {e}", args.object));
            let prog: &mut Xdp =
                ebpf.program_mut(program_names::TO_VSWITCH).expect("xdp_to_vswitch").try_into().expect("XDP");
            prog.load().expect("load xdp_to_vswitch");
            prog.attach(&args.ifname, XdpMode::Driver).expect("attach xdp_to_vswitch (native)");
            let cfg = PortConfig { frame_count: 4096, ..PortConfig::new(args.ifname.clone(), 0) };
            let gw = GatewayConfig {
                ip: std::net::Ipv4Addr::new(10, 1, 0, 1),
                mac: [0x02, 0xfe, 0, 0, 0, 1],
                path_mtu: None,
            };
            let p = Arc::new(AfXdpPort::open(cfg).expect("AF_XDP port").run(BuiltinVswitch::new(gw)).expect("run"));
            let mut xsks =
                XskMap::try_from(ebpf.map_mut(map_names::SLOWPATH_XSKS).expect("SLOWPATH_XSKS")).expect("XSKMAP");
            xsks.set(p.queue(), p.as_raw_fd(), 0).expect("register the socket");
            keep_ebpf = Some(ebpf);
            port = Some(Arc::clone(&p));
            Box::new(move || p.counters().rx_frames)
        }
        "xdp-drop" => {
            keep_drop = Some(attach_xdp_drop(ifindex(&args.ifname)));
            let ifname = args.ifname.clone();
            Box::new(move || ethtool_stat(&ifname, "rx_queue_0_xdp_drops"))
        }
        other => panic!("unknown mode {other}"),
    };

    let sender = {
        let (stop, sent, fd, frame) = (Arc::clone(&stop), Arc::clone(&sent), sock.as_raw_fd(), frame.clone());
        std::thread::spawn(move || blast(fd, frame, stop, sent))
    };
    // Warm up, then measure over the window.
    std::thread::sleep(Duration::from_millis(500));
    let (c0, s0, t0) = (counter(), sent.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    let (c1, s1, secs) = (counter(), sent.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    let delivered = c1 - c0;
    let pps = delivered as f64 / secs;
    let mut out = serde_json::json!({
        "mode": args.mode,
        "frame_size": frame_len,
        "seconds": secs,
        "sent": s1 - s0,
        "delivered": delivered,
        "pps": pps,
        "gbps": pps * frame_len as f64 * 8.0 / 1e9,
    });
    if let Some(p) = &port {
        out["port"] = serde_json::to_value(p.counters()).expect("counters");
        out["need_wakeup"] = p.need_wakeup().into();
    }
    println!("{out}");
    drop(port);
    drop(keep_ebpf);
    drop(keep_drop);
}
