//! Attaching the pod programs (`tc_from_pod`, `tc_to_pod`) to a new pod interface without
//! holding the datapath.
//!
//! A tcx attach waits for an RCU grace period in the kernel (the device's program list is
//! swapped and the old one must drain), about 10 ms on a small VM. Through aya the attach
//! needs `&mut` of the whole loaded object, so every ADD would hold the datapath, and with it
//! every other ADD, across that wait. This module does the same two syscalls aya does
//! (`BPF_LINK_CREATE` with `BPF_TCX_INGRESS` or `_EGRESS`, first in the chain;
//! `BPF_OBJ_PIN`) on a program fd of its own, so an ADD attaches on a blocking thread while
//! it configures the pod side, and concurrent ADDs wait for their grace periods together.
//!
//! Restarts still go through [`crate::datapath::Datapath::attach_pod`], which replaces a
//! pinned link make-before-break.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::generated::{BPF_F_BEFORE, bpf_attach_type, bpf_attr, bpf_cmd};

/// The bpf(2) syscall.
fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a fully initialised bpf_attr that outlives the call; the kernel reads
    // (and for some commands writes) at most size_of::<bpf_attr>() bytes of it.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut bpf_attr, std::mem::size_of::<bpf_attr>())
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Attaches the program `prog` to the tcx ingress (or egress) of interface `ifindex`, before
/// any program already there, and returns the link.
pub fn attach_first(prog: BorrowedFd<'_>, ifindex: u32, egress: bool) -> io::Result<OwnedFd> {
    // SAFETY: all-zero is a valid bpf_attr (every field is a plain integer).
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // Writing union fields is safe; they are plain integers.
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.__bindgen_anon_2.target_ifindex = ifindex;
    attr.link_create.attach_type =
        if egress { bpf_attach_type::BPF_TCX_EGRESS } else { bpf_attach_type::BPF_TCX_INGRESS } as u32;
    // BPF_F_BEFORE with no relative program: in front of every program attached.
    attr.link_create.flags = BPF_F_BEFORE;
    let fd = sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other(format!("BPF_LINK_CREATE returned fd {fd}")))?;
    // SAFETY: the kernel just returned this new fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins a BPF object (here: a link) at `path` on bpffs.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The obj_pin view; `cpath` outlives the syscall.
    attr.__bindgen_anon_4.bpf_fd = fd.as_raw_fd() as u32;
    attr.__bindgen_anon_4.pathname = cpath.as_ptr() as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Attaches `prog` to `ifindex` and pins the link at `pin_path` (replacing a stale pin of an
/// interface that no longer exists). The pin keeps the link alive after the fd is closed.
pub fn attach_pinned(prog: BorrowedFd<'_>, ifindex: u32, egress: bool, pin_path: &Path) -> io::Result<()> {
    let link = attach_first(prog, ifindex, egress)?;
    if let Some(dir) = pin_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(pin_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // If pinning fails the link goes away with its fd: nothing stays attached.
    pin(std::os::fd::AsFd::as_fd(&link), pin_path)
}
