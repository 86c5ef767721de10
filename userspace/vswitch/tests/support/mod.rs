//! Test support for the privileged AF_XDP tests: a throwaway network
//! namespace holding a slow-path veth pair, a minimal XDP program that
//! redirects into an XSKMAP, and a raw AF_PACKET socket on the host end.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Host end of the slow-path port (frames to/from pods).
pub const HOST_END: &str = "cslow0";
/// vswitch end of the slow-path port (XDP + AF_XDP socket).
pub const VSWITCH_END: &str = "cslow1";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True when the test may run: it needs root (network namespaces, XDP, AF_XDP). Otherwise
/// prints one line saying why it is skipped (`cargo xtask test` runs these as root).
pub fn have_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped {test}: needs root (network namespaces, AF_XDP); `cargo xtask test` runs it as root");
    }
    root
}

/// Returns from the test early (skipped) unless it runs as root.
#[macro_export]
macro_rules! require_root {
    ($test:expr) => {
        if !support::have_root($test) {
            return;
        }
    };
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(out.status.success(), "ip {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A uniquely named network namespace with the slow-path veth pair inside,
/// both ends up. Deleted on drop (also when the test fails).
pub struct SlowPortNetns {
    pub name: String,
}

impl SlowPortNetns {
    pub fn new(tag: &str) -> Self {
        let name = format!("cvsw-{tag}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        // No IPv6 autoconfiguration noise (router solicitations, MLD) on the veths.
        let _ = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sysctl", "-qw"])
            .arg("net.ipv6.conf.default.disable_ipv6=1")
            .status();
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ip(&["-n", &ns.name, "link", "add", HOST_END, "type", "veth", "peer", "name", VSWITCH_END]);
        ip(&["-n", &ns.name, "link", "set", HOST_END, "up"]);
        ip(&["-n", &ns.name, "link", "set", VSWITCH_END, "up"]);
        ns
    }

    /// Runs `f` on a helper thread that has entered the namespace; threads
    /// `f` spawns inherit it. Panics in `f` are propagated.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: plain syscall on a valid namespace fd; it only changes
                // this (helper) thread's network namespace.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for SlowPortNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

pub fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).expect("ifname");
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "if_nametoindex({name}): {}", std::io::Error::last_os_error());
    idx
}

/// Whether an XDP program is attached to `ifname` (current namespace).
pub fn xdp_attached(ifname: &str) -> bool {
    let out = Command::new("ip").args(["link", "show", ifname]).output().expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(ifname), "ip link show {ifname}: {text}");
    text.contains("prog/xdp")
}

// === raw XDP redirect program ===

/// A hand-assembled XDP program doing what the datapath's `xdp_to_vswitch`
/// does: `bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS)`, with its
/// own XSKMAP. Needs no BPF toolchain. Detached when dropped (link fd).
pub struct RedirectToXsk {
    map: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

/// A zeroed `union bpf_attr` with helpers to write fields at offsets.
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn call(&mut self, cmd: libc::c_long) -> std::io::Result<libc::c_long> {
        // SAFETY: the attr buffer is valid for its size; pointers inside it
        // point to live buffers owned by the caller.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_mut_ptr(), self.0.len() as u32) };
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

impl RedirectToXsk {
    /// Loads the program and attaches it (native mode) to `ifindex`.
    pub fn attach(ifindex: u32) -> std::io::Result<Self> {
        let map = owned(Attr::new().u32(0, BPF_MAP_TYPE_XSKMAP).u32(4, 4).u32(8, 4).u32(12, 4).call(BPF_MAP_CREATE)?);
        let map_fd = map.as_raw_fd();
        let prog: Vec<u8> = [
            insn(0x61, 2, 1, 16, 0),     // r2 = ctx->rx_queue_index
            insn(0x18, 1, 1, 0, map_fd), // r1 = &xsks (ld_imm64, pseudo map fd)
            insn(0, 0, 0, 0, 0),
            insn(0xb7, 3, 0, 0, 2),  // r3 = XDP_PASS (action when no socket)
            insn(0x85, 0, 0, 0, 51), // call bpf_redirect_map
            insn(0x95, 0, 0, 0, 0),  // exit
        ]
        .concat();
        let license = CString::new("GPL").expect("license");
        let mut log = vec![0u8; 4096];
        let prog_fd = Attr::new()
            .u32(0, BPF_PROG_TYPE_XDP)
            .u32(4, (prog.len() / 8) as u32)
            .u64(8, prog.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, 1)
            .u32(28, log.len() as u32)
            .u64(32, log.as_mut_ptr() as u64)
            .call(BPF_PROG_LOAD)
            .map_err(|e| {
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                std::io::Error::new(e.kind(), format!("{e}: {}", String::from_utf8_lossy(&log[..end])))
            })?;
        let prog = owned(prog_fd);
        let link =
            owned(Attr::new().u32(0, prog.as_raw_fd() as u32).u32(4, ifindex).u32(8, BPF_XDP).call(BPF_LINK_CREATE)?);
        Ok(Self { map, _prog: prog, _link: link })
    }

    /// Puts an AF_XDP socket into the XSKMAP under `queue`.
    pub fn register(&self, queue: u32, xsk_fd: RawFd) -> std::io::Result<()> {
        let key = queue;
        let value = xsk_fd as u32;
        Attr::new()
            .u32(0, self.map.as_raw_fd() as u32)
            .u64(8, &key as *const u32 as u64)
            .u64(16, &value as *const u32 as u64)
            .u64(24, 0)
            .call(BPF_MAP_UPDATE_ELEM)
            .map(|_| ())
    }
}

// === raw AF_PACKET socket ===

/// A raw packet socket bound to one interface: sends whole Ethernet frames and
/// receives every frame seen on the interface.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    pub fn bind(ifname: &str) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: fresh fd from socket().
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex(ifname) as i32;
        // SAFETY: sll is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: tv is a valid timeval.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        Self { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: frame is a valid buffer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    }

    /// Waits up to `timeout` for a frame for which `want` is true.
    pub fn recv_matching(&self, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            // SAFETY: buf is a valid writable buffer.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && want(&buf[..n as usize]) {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
