//! The AF_XDP slow-path port: one AF_XDP socket on the vswitch end of the
//! slow-path veth, served by a [`SlowPath`] backend on a thread of its own.
//!
//! # Frame flow
//! The datapath's XDP program on the vswitch end of the slow-path port
//! redirects every frame into the socket registered in its XSKMAP. This port
//! receives them, passes each to the backend and transmits the backend's
//! replies on the same socket; they leave the vswitch end of the veth and the
//! datapath's TC program on the host end delivers them to the pods.
//!
//! # UMEM
//! The UMEM is split in two fixed halves: receive frames live in the fill
//! ring / rx ring cycle (a received frame goes back to the fill ring as soon as
//! the backend has seen it), transmit frames in a free list / tx ring /
//! completion ring cycle (a frame is reused once the kernel completed it).
//! Replies are copied from the backend's buffer into a free transmit frame.
//!
//! # Program loading
//! The socket is created with libxdp's "inhibit program load" flag: libxdp
//! does not attach its default XDP program. The agent attaches the datapath's
//! own program and registers [`RunningPort::as_raw_fd`] (or
//! [`AfXdpPort::as_raw_fd`]) in the XSKMAP under the port's queue index, e.g.
//! `xsk_map.set(queue, port.as_raw_fd(), 0)` with aya's `XskMap`.

use std::ffi::CString;
use std::io::Write;
use std::num::NonZeroU32;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use xsk_rs::config::{BindFlags, LibxdpFlags, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use crate::backend::{SlowPath, Verdict, VswitchCounters};

/// How to open an [`AfXdpPort`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// The interface to bind to: the vswitch end of the slow-path port.
    pub ifname: String,
    /// The rx queue to bind to (the key of the socket in the XSKMAP).
    pub queue: u32,
    /// UMEM frames (4 KiB each); half receive, half transmit. At least 2.
    pub frame_count: u32,
    /// Ask for `XDP_USE_NEED_WAKEUP`; falls back to binding without it if the
    /// kernel refuses.
    pub need_wakeup: bool,
    /// How long the port thread waits for frames before checking whether it
    /// was asked to stop (bounds the stop latency).
    pub poll_interval: Duration,
}

impl PortConfig {
    /// Defaults for the slow path: 1024 frames, need-wakeup, 100 ms poll.
    pub fn new(ifname: impl Into<String>, queue: u32) -> Self {
        Self {
            ifname: ifname.into(),
            queue,
            frame_count: 1024,
            need_wakeup: true,
            poll_interval: Duration::from_millis(100),
        }
    }
}

/// Errors opening or running an AF_XDP port.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The configuration cannot work (reason given).
    #[error("invalid AF_XDP port configuration: {0}")]
    InvalidConfig(String),
    /// The interface does not exist in the calling thread's network namespace.
    #[error("interface {ifname:?} not found")]
    NoSuchInterface {
        /// The interface name asked for.
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    /// The UMEM could not be created (memory, RLIMIT_MEMLOCK, ...).
    #[error("creating the UMEM failed")]
    Umem(#[source] xsk_rs::umem::UmemCreateError),
    /// The AF_XDP socket could not be created or bound.
    #[error("creating the AF_XDP socket on {ifname} queue {queue} failed")]
    Socket {
        /// The interface.
        ifname: String,
        /// The queue.
        queue: u32,
        #[source]
        source: xsk_rs::socket::SocketCreateError,
    },
    /// The kernel did not take the initial receive frames in the fill ring.
    #[error("the fill ring accepted {accepted} of {wanted} receive frames")]
    FillRing {
        /// Frames offered.
        wanted: usize,
        /// Frames the ring took.
        accepted: usize,
    },
    /// The port thread could not be started.
    #[error("spawning the port thread failed")]
    Thread(#[source] std::io::Error),
    /// The port thread stopped serving frames (poll failure or backend panic).
    #[error("the AF_XDP port on {ifname} stopped: {reason}")]
    Failed {
        /// The interface.
        ifname: String,
        /// What went wrong.
        reason: String,
    },
}

/// How long [`AfXdpPort::open`] retries while the queue is still held by a
/// socket that was just closed.
pub const BUSY_RETRY: Duration = Duration::from_secs(1);

/// The OS error behind a socket creation failure, if any.
fn os_error(e: &xsk_rs::socket::SocketCreateError) -> Option<i32> {
    use std::error::Error as _;
    e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).and_then(std::io::Error::raw_os_error)
}

impl PortError {
    /// The queue is bound by another AF_XDP socket (EBUSY).
    pub fn is_queue_busy(&self) -> bool {
        matches!(self, PortError::Socket { source, .. } if os_error(source) == Some(libc::EBUSY))
    }
}

/// Counters of the port itself (the backend keeps its own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortCounters {
    /// Frames received from the socket and handed to the backend.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames the backend emitted that were queued for transmission.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Emitted frames dropped: every transmit frame was in flight.
    pub tx_dropped_no_frame: u64,
    /// Emitted frames dropped: larger than a UMEM frame.
    pub tx_dropped_too_big: u64,
    /// Emitted frames dropped: the tx ring was full.
    pub tx_dropped_ring_full: u64,
    /// Frames the backend consumed without replying.
    pub backend_drops: u64,
    /// Kernel: frames dropped for reasons other than a full ring or empty fill ring.
    pub kernel_rx_dropped: u64,
    /// Kernel: frames dropped because the rx ring was full.
    pub kernel_rx_ring_full: u64,
    /// Kernel: times the fill ring was empty when a frame arrived.
    pub kernel_rx_fill_ring_empty: u64,
    /// Kernel: invalid descriptors seen on the tx ring.
    pub kernel_tx_invalid_descs: u64,
}

/// An AF_XDP socket bound (copy mode) to one queue of an interface, with its
/// UMEM and rings, not yet serving frames. Register [`AfXdpPort::as_raw_fd`]
/// in the XSKMAP, then [`AfXdpPort::run`] it (or register after running: the
/// running port exposes the same fd).
pub struct AfXdpPort {
    config: PortConfig,
    need_wakeup: bool,
    tx_ring_size: u32,
    fd: RawFd,
    umem: Umem,
    fill: FillQueue,
    comp: CompQueue,
    tx: TxQueue,
    rx: RxQueue,
    rx_frames: Vec<FrameDesc>,
    tx_frames: Vec<FrameDesc>,
}

impl std::fmt::Debug for AfXdpPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfXdpPort")
            .field("config", &self.config)
            .field("need_wakeup", &self.need_wakeup)
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

impl AfXdpPort {
    /// Creates the UMEM and the socket, bound in copy mode to
    /// `config.ifname` / `config.queue` in the calling thread's network
    /// namespace, and fills the fill ring. Does not load any XDP program.
    ///
    /// The kernel frees a queue's buffer pool shortly (an RCU grace period)
    /// after the previous socket on it was closed; while it is still busy the
    /// bind is retried for up to [`BUSY_RETRY`].
    pub fn open(config: PortConfig) -> Result<Self, PortError> {
        let started = std::time::Instant::now();
        loop {
            match Self::open_once(&config) {
                Err(e) if e.is_queue_busy() && started.elapsed() < BUSY_RETRY => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                result => return result,
            }
        }
    }

    fn open_once(config: &PortConfig) -> Result<Self, PortError> {
        let config = config.clone();
        if config.frame_count < 2 {
            return Err(PortError::InvalidConfig(format!(
                "frame_count must be at least 2, got {}",
                config.frame_count
            )));
        }
        let c_ifname = CString::new(config.ifname.as_bytes())
            .map_err(|_| PortError::InvalidConfig(format!("interface name {:?} has a NUL byte", config.ifname)))?;
        // SAFETY: c_ifname is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(c_ifname.as_ptr()) } == 0 {
            return Err(PortError::NoSuchInterface {
                ifname: config.ifname.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        let frame_count = NonZeroU32::new(config.frame_count)
            .ok_or_else(|| PortError::InvalidConfig("frame_count must not be zero".to_string()))?;
        let (umem, mut frames) = Umem::new(UmemConfig::default(), frame_count, false).map_err(PortError::Umem)?;
        let iface = xsk_rs::config::Interface::new(c_ifname);

        let tx_ring_size = SocketConfig::default().tx_queue_size().get();
        let bind = |flags: BindFlags| {
            let socket_config = SocketConfig::builder()
                .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
                .bind_flags(flags)
                .build();
            // SAFETY: the UMEM is fresh and used by this socket only; no other
            // socket of ours is bound to this interface and queue (the kernel
            // refuses a second bind with EBUSY).
            unsafe { Socket::new(socket_config, &umem, &iface, config.queue) }
        };
        let (result, need_wakeup) = if config.need_wakeup {
            match bind(BindFlags::XDP_COPY | BindFlags::XDP_USE_NEED_WAKEUP) {
                Ok(s) => (Ok(s), true),
                Err(e) if os_error(&e) == Some(libc::EBUSY) => (Err(e), false),
                Err(e) => {
                    log::warn!(
                        "binding {} queue {} with need-wakeup failed ({e}), retrying without",
                        config.ifname,
                        config.queue
                    );
                    (bind(BindFlags::XDP_COPY), false)
                }
            }
        } else {
            (bind(BindFlags::XDP_COPY), false)
        };
        let (tx, rx, fill_comp) = result.map_err(|source| PortError::Socket {
            ifname: config.ifname.clone(),
            queue: config.queue,
            source,
        })?;
        let Some((mut fill, comp)) = fill_comp else {
            return Err(PortError::InvalidConfig("the UMEM is shared with another socket".to_string()));
        };
        let fd = rx.fd().as_raw_fd();

        let tx_frames = frames.split_off(frames.len() / 2);
        let rx_frames = frames;
        // SAFETY: the receive frames belong to this UMEM and are not in use.
        let accepted = unsafe { fill.produce(&rx_frames) };
        if accepted != rx_frames.len() {
            return Err(PortError::FillRing { wanted: rx_frames.len(), accepted });
        }
        Ok(Self { config, need_wakeup, tx_ring_size, fd, umem, fill, comp, tx, rx, rx_frames, tx_frames })
    }

    /// Whether the socket was bound with `XDP_USE_NEED_WAKEUP`.
    pub fn need_wakeup(&self) -> bool {
        self.need_wakeup
    }

    /// Starts serving frames with `backend` on a dedicated thread.
    pub fn run<B>(self, backend: B) -> Result<RunningPort<B>, PortError>
    where
        B: SlowPath + Send + 'static,
    {
        let shared =
            Arc::new(Shared { stop: AtomicBool::new(false), stats: PortStats::default(), failure: Mutex::new(None) });
        let backend = Arc::new(Mutex::new(backend));
        let ifname = self.config.ifname.clone();
        let queue = self.config.queue;
        let fd = self.fd;
        let need_wakeup = self.need_wakeup;
        let thread = {
            let shared = Arc::clone(&shared);
            let backend = Arc::clone(&backend);
            std::thread::Builder::new()
                .name(format!("afxdp-{ifname}"))
                .spawn(move || serve(self, backend, shared))
                .map_err(PortError::Thread)?
        };
        Ok(RunningPort { ifname, queue, fd, need_wakeup, shared, backend, thread: Some(thread) })
    }
}

impl AsRawFd for AfXdpPort {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl AsFd for AfXdpPort {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the socket (and so the fd) lives as long as self.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

/// Opens an AF_XDP port on `ifname` / `queue` with default settings and runs
/// `backend` behind it. Register [`RunningPort::as_raw_fd`] in the XSKMAP
/// afterwards so frames start to flow.
pub fn spawn<B>(ifname: &str, queue: u32, backend: B) -> Result<RunningPort<B>, PortError>
where
    B: SlowPath + Send + 'static,
{
    AfXdpPort::open(PortConfig::new(ifname, queue))?.run(backend)
}

/// A port serving frames on its own thread. Stops (and closes the socket,
/// which also removes it from any XSKMAP) on [`RunningPort::stop`] or drop.
pub struct RunningPort<B> {
    ifname: String,
    queue: u32,
    fd: RawFd,
    need_wakeup: bool,
    shared: Arc<Shared>,
    backend: Arc<Mutex<B>>,
    thread: Option<JoinHandle<()>>,
}

impl<B> std::fmt::Debug for RunningPort<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningPort")
            .field("ifname", &self.ifname)
            .field("queue", &self.queue)
            .field("fd", &self.fd)
            .field("need_wakeup", &self.need_wakeup)
            .finish_non_exhaustive()
    }
}

impl<B: SlowPath> RunningPort<B> {
    /// The backend's counters.
    pub fn backend_counters(&self) -> VswitchCounters {
        self.lock_backend().counters()
    }
}

impl<B> RunningPort<B> {
    /// The interface the socket is bound to.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The queue the socket is bound to (its key in the XSKMAP).
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// Whether the socket was bound with `XDP_USE_NEED_WAKEUP`.
    pub fn need_wakeup(&self) -> bool {
        self.need_wakeup
    }

    /// Runs `f` on the backend, between two batches of frames (e.g. to change
    /// its configuration or read its counters).
    pub fn with_backend<R>(&self, f: impl FnOnce(&mut B) -> R) -> R {
        f(&mut self.lock_backend())
    }

    /// The port's own counters, including the kernel's socket statistics.
    pub fn counters(&self) -> PortCounters {
        let s = &self.shared.stats;
        let mut c = PortCounters {
            rx_frames: s.rx_frames.load(Ordering::Relaxed),
            rx_bytes: s.rx_bytes.load(Ordering::Relaxed),
            tx_frames: s.tx_frames.load(Ordering::Relaxed),
            tx_bytes: s.tx_bytes.load(Ordering::Relaxed),
            tx_dropped_no_frame: s.tx_dropped_no_frame.load(Ordering::Relaxed),
            tx_dropped_too_big: s.tx_dropped_too_big.load(Ordering::Relaxed),
            tx_dropped_ring_full: s.tx_dropped_ring_full.load(Ordering::Relaxed),
            backend_drops: s.backend_drops.load(Ordering::Relaxed),
            ..PortCounters::default()
        };
        if let Some(k) = kernel_stats(self.fd) {
            c.kernel_rx_dropped = k.rx_dropped;
            c.kernel_rx_ring_full = k.rx_ring_full;
            c.kernel_rx_fill_ring_empty = k.rx_fill_ring_empty_descs;
            c.kernel_tx_invalid_descs = k.tx_invalid_descs;
        }
        c
    }

    /// Whether the port thread is still serving frames (false after a poll
    /// failure or a backend panic; the socket stays open until stop/drop).
    pub fn is_serving(&self) -> bool {
        lock(&self.shared.failure).is_none()
    }

    /// Stops the thread and closes the socket. Returns the failure that made
    /// the thread stop serving early, if any.
    pub fn stop(mut self) -> Result<(), PortError> {
        self.shutdown();
        match lock(&self.shared.failure).take() {
            None => Ok(()),
            Some(reason) => Err(PortError::Failed { ifname: self.ifname.clone(), reason }),
        }
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The thread catches backend panics itself; a join error is
            // therefore only possible for a bug in the loop.
            if thread.join().is_err() {
                log::error!("the AF_XDP port thread of {} panicked", self.ifname);
            }
        }
    }

    fn lock_backend(&self) -> MutexGuard<'_, B> {
        lock(&self.backend)
    }
}

impl<B> AsRawFd for RunningPort<B> {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl<B> AsFd for RunningPort<B> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the port thread keeps the socket open until self is
        // stopped or dropped, even after a failure.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

impl<B> Drop for RunningPort<B> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Locks a mutex, ignoring poisoning (a backend panic is recorded separately).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// === impl port thread ===

struct Shared {
    stop: AtomicBool,
    stats: PortStats,
    failure: Mutex<Option<String>>,
}

#[derive(Default)]
struct PortStats {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped_no_frame: AtomicU64,
    tx_dropped_too_big: AtomicU64,
    tx_dropped_ring_full: AtomicU64,
    backend_drops: AtomicU64,
}

impl PortStats {
    fn add(counter: &AtomicU64, n: u64) {
        if n != 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Frames taken from the rx ring per batch.
const RX_BATCH: usize = 64;

/// The port thread: serves frames until asked to stop. On failure it records
/// why and keeps the socket open (so the fd the agent registered stays
/// valid) until stopped.
fn serve<B: SlowPath>(mut port: AfXdpPort, backend: Arc<Mutex<B>>, shared: Arc<Shared>) {
    // `port` stays outside the unwind boundary: even after a backend panic the
    // socket remains open, so the fd the agent registered is never reused.
    let result = catch_unwind(AssertUnwindSafe(|| port.serve_loop(&backend, &shared)));
    let failure = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("the socket failed: {e}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Some(format!("the backend panicked: {msg}"))
        }
    };
    if let Some(reason) = failure {
        log::error!("AF_XDP port on {} stopped serving: {reason}", port.config.ifname);
        *lock(&shared.failure) = Some(reason);
        while !shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(port);
}

impl AfXdpPort {
    fn serve_loop<B: SlowPath>(&mut self, backend: &Mutex<B>, shared: &Shared) -> std::io::Result<()> {
        let stats = &shared.stats;
        let timeout_ms = i32::try_from(self.config.poll_interval.as_millis()).unwrap_or(i32::MAX);
        let tx_total = self.tx_frames.len();
        let mut free_tx = std::mem::take(&mut self.tx_frames);
        let mut received = vec![FrameDesc::default(); RX_BATCH];
        let mut completed = vec![FrameDesc::default(); tx_total];
        let mut outgoing: Vec<FrameDesc> = Vec::with_capacity(tx_total);
        // Receive frames not yet given back to the fill ring.
        let mut refill: Vec<FrameDesc> = Vec::with_capacity(self.rx_frames.len());
        // Frames submitted on the tx ring that the kernel has not taken yet.
        let mut tx_pending = false;

        while !shared.stop.load(Ordering::Relaxed) {
            // Reclaim transmit frames the kernel is done with.
            reclaim(&mut self.comp, &mut completed, &mut free_tx);

            // Give received frames back to the kernel.
            if !refill.is_empty() {
                // SAFETY: these frames were consumed from the rx ring and the
                // backend no longer reads them.
                let n = unsafe { self.fill.produce(&refill) };
                refill.drain(..n);
            }

            if tx_pending {
                // The kernel stopped short of the end of the tx ring last time.
                tx_pending = self.flush_tx()?;
            }
            let wait_ms = if tx_pending { 1 } else { timeout_ms };
            if !self.rx.poll(wait_ms)? {
                // Idle: notice a socket the kernel unbound (its interface
                // went away), which poll() does not report.
                socket_error(self.fd)?;
                continue;
            }
            // SAFETY: the descriptors are written by the kernel for this UMEM.
            let n = unsafe { self.rx.consume(&mut received) };
            if n == 0 {
                if self.need_wakeup && self.fill.needs_wakeup() {
                    self.fill.wakeup(self.rx.fd_mut(), 0)?;
                }
                continue;
            }

            let umem = &self.umem;
            let comp = &mut self.comp;
            let mut rx_bytes = 0u64;
            let (mut no_frame, mut too_big, mut drops) = (0u64, 0u64, 0u64);
            {
                let mut backend = lock(backend);
                for desc in &received[..n] {
                    // SAFETY: the kernel handed this frame to us; nothing else
                    // writes it until it is back in the fill ring.
                    let data = unsafe { umem.data(desc) };
                    let frame = data.contents();
                    rx_bytes += frame.len() as u64;
                    let mut emit = |out: &[u8]| {
                        if free_tx.is_empty() {
                            // Every transmit frame is in flight: take back
                            // those the kernel completed meanwhile.
                            reclaim(comp, &mut completed, &mut free_tx);
                        }
                        let Some(mut d) = free_tx.pop() else {
                            no_frame += 1;
                            return;
                        };
                        // SAFETY: `d` is a free transmit frame of this UMEM,
                        // owned by us until it is submitted to the tx ring.
                        let mut buf = unsafe { umem.data_mut(&mut d) };
                        let mut cursor = buf.cursor();
                        cursor.set_pos(0);
                        if out.len() > cursor.buf_len() || cursor.write_all(out).is_err() {
                            too_big += 1;
                            free_tx.push(d);
                            return;
                        }
                        outgoing.push(d);
                    };
                    if let Verdict::Dropped(_) = backend.handle(frame, &mut emit) {
                        drops += 1;
                    }
                }
            }
            refill.extend_from_slice(&received[..n]);
            // SAFETY: as above; the backend is done with these frames.
            let given = unsafe { self.fill.produce(&refill) };
            refill.drain(..given);

            let (mut ring_full, mut tx_frames, mut tx_bytes) = (0u64, 0u64, 0u64);
            if !outgoing.is_empty() {
                // SAFETY: the outgoing frames hold complete frames written above.
                let sent = unsafe { self.tx.produce(&outgoing) };
                for d in &outgoing[..sent] {
                    tx_frames += 1;
                    tx_bytes += d.lengths().data() as u64;
                }
                // Not submitted (ring full): back to the free list; the
                // length is reset before the next use.
                ring_full = (outgoing.len() - sent) as u64;
                free_tx.extend(outgoing.drain(sent..));
                outgoing.clear();
            }
            // Counted before the kick: once the kernel transmits, a reader
            // of the counters (a peer that saw the frames) must see them.
            PortStats::add(&stats.rx_frames, n as u64);
            PortStats::add(&stats.rx_bytes, rx_bytes);
            PortStats::add(&stats.tx_frames, tx_frames);
            PortStats::add(&stats.tx_bytes, tx_bytes);
            PortStats::add(&stats.tx_dropped_no_frame, no_frame);
            PortStats::add(&stats.tx_dropped_too_big, too_big);
            PortStats::add(&stats.tx_dropped_ring_full, ring_full);
            PortStats::add(&stats.backend_drops, drops);
            if tx_frames > 0 || tx_pending {
                tx_pending = self.flush_tx()?;
            }
        }
        Ok(())
    }
}

impl AfXdpPort {
    /// Makes the kernel transmit what is on the tx ring. In copy mode every
    /// sendto() transmits a bounded batch (32 frames), so kick again while
    /// the kernel makes progress. Returns whether frames are still left on
    /// the ring (the kernel could not take them now, e.g. no memory).
    ///
    /// The socket is always bound in copy mode, where the kernel only
    /// transmits on sendto()/poll(): the need-wakeup flag of the tx ring is
    /// therefore not consulted.
    fn flush_tx(&mut self) -> std::io::Result<bool> {
        let mut free = self.tx.nb_free_exact();
        while free < self.tx_ring_size {
            self.tx.wakeup()?;
            let now = self.tx.nb_free_exact();
            if now == free {
                return Ok(true);
            }
            free = now;
        }
        Ok(false)
    }
}

/// Moves the transmit frames the kernel completed back to the free list.
fn reclaim(comp: &mut CompQueue, scratch: &mut [FrameDesc], free_tx: &mut Vec<FrameDesc>) {
    // SAFETY: the completion ring only returns descriptors of our UMEM that
    // we submitted on the tx ring; the kernel no longer reads them.
    let n = unsafe { comp.consume(scratch) };
    free_tx.extend_from_slice(&scratch[..n]);
}

/// Fails with the socket's pending error (SO_ERROR), e.g. ENETDOWN after its
/// interface was unregistered.
fn socket_error(fd: RawFd) -> std::io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` is a writable c_int of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut libc::c_int).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if err != 0 {
        return Err(std::io::Error::from_raw_os_error(err));
    }
    Ok(())
}

// === kernel statistics ===

/// `struct xdp_statistics` from linux/if_xdp.h.
#[repr(C)]
#[derive(Default)]
struct XdpStatistics {
    rx_dropped: u64,
    rx_invalid_descs: u64,
    tx_invalid_descs: u64,
    rx_ring_full: u64,
    rx_fill_ring_empty_descs: u64,
    tx_ring_empty_descs: u64,
}

const SOL_XDP: libc::c_int = 283;
const XDP_STATISTICS: libc::c_int = 7;

/// Reads the kernel's statistics of an AF_XDP socket (None if it fails).
fn kernel_stats(fd: RawFd) -> Option<XdpStatistics> {
    let mut stats = XdpStatistics::default();
    let mut len = std::mem::size_of::<XdpStatistics>() as libc::socklen_t;
    // SAFETY: `stats` is a writable buffer of `len` bytes.
    let rc =
        unsafe { libc::getsockopt(fd, SOL_XDP, XDP_STATISTICS, (&mut stats as *mut XdpStatistics).cast(), &mut len) };
    (rc == 0).then_some(stats)
}

impl<B: SlowPath + ?Sized> SlowPath for Box<B> {
    fn handle(&mut self, frame: &[u8], tx: &mut dyn FnMut(&[u8])) -> Verdict {
        (**self).handle(frame, tx)
    }

    fn counters(&self) -> VswitchCounters {
        (**self).counters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BuiltinVswitch, GatewayConfig};

    #[test]
    fn open_on_a_missing_interface_names_it() {
        let err = AfXdpPort::open(PortConfig::new("nosuchif0vsw", 0)).expect_err("no interface");
        match &err {
            PortError::NoSuchInterface { ifname, .. } => assert_eq!(ifname, "nosuchif0vsw"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("nosuchif0vsw"));
        assert!(!err.is_queue_busy());
    }

    #[test]
    fn open_rejects_bad_configs_before_touching_the_kernel() {
        let too_few = PortConfig { frame_count: 1, ..PortConfig::new("lo", 0) };
        assert!(matches!(AfXdpPort::open(too_few), Err(PortError::InvalidConfig(_))));
        let nul = PortConfig::new("lo\0x", 0);
        assert!(matches!(AfXdpPort::open(nul), Err(PortError::InvalidConfig(_))));
        let gw = GatewayConfig { ip: std::net::Ipv4Addr::new(10, 0, 0, 1), mac: [2, 0, 0, 0, 0, 1], path_mtu: None };
        assert!(spawn("nosuchif0vsw", 0, BuiltinVswitch::new(gw)).is_err());
    }

    #[test]
    fn running_ports_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<RunningPort<BuiltinVswitch>>();
        send_sync::<RunningPort<Box<dyn SlowPath + Send>>>();
        fn send<T: Send>() {}
        send::<AfXdpPort>();
    }

    #[test]
    fn default_config_splits_a_reasonable_umem() {
        let c = PortConfig::new("cslow1", 3);
        assert_eq!((c.ifname.as_str(), c.queue), ("cslow1", 3));
        assert!(c.frame_count >= 2 && c.need_wakeup);
        assert!(c.poll_interval <= Duration::from_millis(500));
    }
}
