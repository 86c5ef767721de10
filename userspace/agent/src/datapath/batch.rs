//! Whole-map reads and multi-key deletes in batches (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_DELETE_BATCH`, Linux 5.6+), which aya does not offer.
//!
//! Reading a hash map one entry at a time costs two syscalls an entry (next key, then the
//! value): a full conntrack table (262,144 entries by default) took most of a second that
//! way, every sweep. A batch read copies thousands of entries per syscall.
//!
//! Both functions return `Ok(None)` where the kernel or the map type has no batch
//! operations, so callers can fall back to the one-at-a-time path.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Kernel-internal "operation not supported" (what a map without batch ops answers).
const ENOTSUPP: i32 = 524;

/// Entries asked for per lookup call; grown when one hash bucket holds more, up to
/// MAX_CHUNK (a bucket that long would be a broken map).
const CHUNK: usize = 4096;
const MAX_CHUNK: usize = 1 << 20;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid batch attribute whose pointers reference live buffers of
    // the sizes its `count` and the map's key and value sizes imply (checked by callers).
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<BatchAttr>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP))
}

/// Every entry of a (non-per-CPU) hash map whose keys are `K` and values `V` (the caller
/// checked the sizes against the map's). `Ok(None)`: no batch operations here.
pub fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Option<Vec<(K, V)>>> {
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    // The position token: a bucket index for hash maps; sized generously.
    let mut token = [0u64; 4];
    let mut next = [0u64; 4];
    let mut first = true;
    loop {
        // SAFETY: K and V are Pod (any bit pattern is valid); the kernel fills up to `chunk`.
        keys.resize_with(chunk, || unsafe { std::mem::zeroed() });
        values.resize_with(chunk, || unsafe { std::mem::zeroed() });
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(chunk);
        match r {
            Ok(()) => {}
            // The end of the map (with the last entries, if any).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
                return Ok(Some(out));
            }
            // One bucket holds more than a chunk: ask again with room for it.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 && chunk < MAX_CHUNK => {
                chunk *= 2;
                continue;
            }
            Err(e) if first && unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        if n == 0 {
            return Err(io::Error::other("a batch lookup returned no entries and did not end"));
        }
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        token = next;
        first = false;
    }
}

/// Deletes `keys` from a hash map whose keys are `K`; keys already gone are skipped.
/// How many were deleted; `Ok(None)`: no batch operations here.
pub fn delete_all<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<Option<usize>> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let take = rest.len().min(u32::MAX as usize);
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: take as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // The kernel stops at the first key it cannot delete and says how many it did.
        let done = (attr.count as usize).min(take);
        deleted += done;
        match r {
            Ok(()) => rest = &rest[take..],
            // Gone already (expired by the datapath's LRU, or removed by another sweep).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[(done + 1).min(rest.len())..],
            Err(e) if deleted == 0 && unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(deleted))
}
