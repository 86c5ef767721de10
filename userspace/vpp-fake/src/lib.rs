//! **A fake FD.io VPP, for tests only.** It speaks VPP's binary API on a unix socket exactly
//! as VPP's socket server does (framing, `sockclnt_create` handshake with the full message
//! table, context echo, dumps closed by the client's `control_ping`, `*_get` cursors with
//! EAGAIN, `sw_interface_event`s) and keeps the state a client programs: interfaces
//! (af_xdp, tap, VXLAN, loopback, and DPDK NICs present from "boot"), addresses, FIB
//! tables and routes (with those VPP adds by itself: connected, local, a /32 per neighbour),
//! neighbours, NAT44-ED, ACLs and the graph arcs `add_node_next` adds, answering as VPP does
//! where VPP is strict (see `tests/fake_answers_like_vpp.rs`). It forwards no packets;
//! [`state::FakeState::ip4_lookup`] tells where VPP would send one.
//!
//! With [`FakeOptions::af_xdp`] its af_xdp interfaces also get a real AF_XDP socket,
//! registered like VPP's in the attached XDP program's `xsks_map` ([`xdp`]), so the node
//! datapath's XDP -> AF_XDP seam can be exercised end to end.
//!
//! The real vpp_papi client connects to it in the tests, which is what shows that it
//! speaks the real protocol. [`FakeVpp::restart`] drops every connection and forgets all
//! state, as a VPP restart does.

mod api_json;
mod handlers;
pub mod host_tap;
pub mod papi;
pub mod state;
pub mod table;
pub mod xdp;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use contiv_vpp_binapi::{api, message, wire};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    sync::mpsc,
    task::JoinHandle,
};

pub use state::FakeState;
pub use table::{FULL_TABLE_SIZE, ServerTable};

const SOCKCLNT_CREATE_ID: u16 = 15;

/// How the fake VPP is set up.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// Where to listen.
    pub socket: PathBuf,
    /// Pad the message table to [`FULL_TABLE_SIZE`] entries with synthetic names (a real
    /// VPP build lists about that many; the shipped files have 476 messages).
    pub full_table: bool,
    /// Messages listed under another CRC: `(name, crc)`.
    pub crc_overrides: Vec<(String, u32)>,
    /// DPDK NICs present from boot (as startup.conf's `dpdk { dev ... { name ... } }` makes
    /// them): `(interface name, MAC)`.
    pub nics: Vec<(String, [u8; 6])>,
    /// Details per call of a `*_get` before it answers EAGAIN.
    pub details_page: usize,
    /// `vpe_pid` in `control_ping_reply`.
    pub vpe_pid: u32,
    /// af_xdp interfaces get a real AF_XDP socket on their Linux interface (root, and the
    /// interface must carry an XDP program with an `xsks_map`; see [`xdp`]).
    pub af_xdp: bool,
    /// Taps get their Linux end in the fake's network namespace (root; see [`host_tap`]).
    pub host_taps: bool,
}

impl FakeOptions {
    /// Defaults: shipped messages only, one NIC `GigabitEthernet0/8/0`, pages of 4 details.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            full_table: false,
            crc_overrides: Vec::new(),
            nics: vec![("GigabitEthernet0/8/0".into(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x56])],
            details_page: 4,
            vpe_pid: std::process::id(),
            af_xdp: false,
            host_taps: false,
        }
    }
}

struct ConnEntry {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    tasks: Vec<tokio::task::AbortHandle>,
}

struct Inner {
    opts: FakeOptions,
    table: ServerTable,
    state: Mutex<FakeState>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_conn: AtomicU64,
    handshakes: AtomicU64,
    listener: Mutex<Option<JoinHandle<()>>>,
    xdp: Option<xdp::XdpPorts>,
    host_taps: Option<host_tap::HostTaps>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets the AF_XDP sockets and the taps' Linux ends follow the state (never while the
    /// state lock is held).
    fn sync_xdp(&self) {
        if let Some(x) = &self.xdp {
            x.sync(&self.state);
        }
        if let Some(t) = &self.host_taps {
            t.sync(&self.state);
        }
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnEntry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn listen(self: &Arc<Self>) -> std::io::Result<()> {
        let _ = std::fs::remove_file(&self.opts.socket);
        let listener = UnixListener::bind(&self.opts.socket)?;
        let inner = Arc::clone(self);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let conn_id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = mpsc::unbounded_channel();
                let (read, write) = stream.into_split();
                let writer = tokio::spawn(write_loop(write, rx));
                let reader = tokio::spawn(serve(Arc::clone(&inner), read, tx.clone(), conn_id));
                inner
                    .conns()
                    .insert(conn_id, ConnEntry { tx, tasks: vec![reader.abort_handle(), writer.abort_handle()] });
            }
        });
        *self.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(())
    }

    fn stop_listening(&self) {
        if let Some(t) = self.listener.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.opts.socket);
    }

    fn drop_connections(&self) {
        let conns: Vec<ConnEntry> = self.conns().drain().map(|(_, c)| c).collect();
        for c in conns {
            for t in c.tasks {
                t.abort();
            }
        }
    }
}

/// A running fake VPP. Stops (and removes its socket) when dropped.
pub struct FakeVpp {
    inner: Arc<Inner>,
}

impl FakeVpp {
    /// Starts listening on `opts.socket` (a stale socket file is replaced). Must be called
    /// inside a tokio runtime.
    pub fn start(opts: FakeOptions) -> std::io::Result<Self> {
        let table = ServerTable::new(&opts.crc_overrides, opts.full_table.then_some(FULL_TABLE_SIZE));
        let state = FakeState::boot(&opts.nics);
        let (opts_af_xdp, opts_host_taps) = (opts.af_xdp, opts.host_taps);
        let inner = Arc::new(Inner {
            opts,
            table,
            state: Mutex::new(state),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            handshakes: AtomicU64::new(0),
            listener: Mutex::new(None),
            xdp: opts_af_xdp.then(xdp::XdpPorts::default),
            host_taps: opts_host_taps.then(host_tap::HostTaps::default),
        });
        inner.listen()?;
        Ok(Self { inner })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.inner.opts.socket
    }

    /// A copy of the current state.
    pub fn state(&self) -> FakeState {
        self.inner.state().clone()
    }

    /// Runs `f` on the state (e.g. to inject a fault).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.inner.state())
    }

    /// Entries in the message table it hands out.
    pub fn table_len(&self) -> usize {
        self.inner.table.len()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.inner.conns().len()
    }

    /// Completed handshakes since start.
    pub fn handshakes(&self) -> u64 {
        self.inner.handshakes.load(Ordering::Relaxed)
    }

    /// Simulates a VPP restart: every connection is dropped and the state is that of a
    /// fresh boot. The socket keeps listening.
    pub fn restart(&self) {
        self.inner.drop_connections();
        *self.inner.state() = FakeState::boot(&self.inner.opts.nics);
        self.inner.sync_xdp();
    }

    /// Frames each af_xdp interface's AF_XDP socket received, by sw_if_index
    /// ([`FakeOptions::af_xdp`]).
    pub fn af_xdp_counters(&self) -> std::collections::BTreeMap<u32, contiv_vswitch::VswitchCounters> {
        self.inner.xdp.as_ref().map(|x| x.counters()).unwrap_or_default()
    }

    /// Simulates a VPP restart that takes `downtime`: the socket disappears, connections
    /// drop, the state is lost; then it listens again.
    pub async fn restart_with_downtime(&self, downtime: Duration) -> std::io::Result<()> {
        self.inner.stop_listening();
        self.restart();
        tokio::time::sleep(downtime).await;
        self.inner.listen()
    }

    /// Drops every connection but keeps the state (a broken socket, not a restart).
    pub fn drop_connections(&self) {
        self.inner.drop_connections();
    }
}

impl Drop for FakeVpp {
    fn drop(&mut self) {
        self.inner.stop_listening();
        self.inner.drop_connections();
    }
}

async fn read_message<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; wire::FRAME_HEADER_LEN];
    r.read_exact(&mut header).await?;
    let len = wire::frame_len(&header);
    if len > 16 << 20 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("message of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(payload)
}

async fn serve(
    inner: Arc<Inner>,
    read: tokio::net::unix::OwnedReadHalf,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    conn_id: u64,
) {
    let mut reader = BufReader::with_capacity(256 << 10, read);
    let client_index = 0x8000_0000 | (conn_id as u32 & 0x7fff_ffff);
    let mut registered = false;
    let mut out = Vec::with_capacity(64 << 10);
    loop {
        let payload = match read_message(&mut reader).await {
            Ok(p) => p,
            Err(_) => break,
        };
        let Some(msg_id) = message::msg_id_of(&payload) else { break };
        let mut close = false;
        if !registered {
            if msg_id != SOCKCLNT_CREATE_ID {
                log::warn!("fake VPP: message id {msg_id} before sockclnt_create; closing");
                break;
            }
            let Ok((header, _create)) = message::decode::<api::SockclntCreate>(&payload) else { break };
            let reply = api::SockclntCreateReply {
                response: 0,
                index: client_index,
                count: inner.table.len() as u16,
                message_table: inner
                    .table
                    .entries
                    .iter()
                    .map(|(id, name)| api::MessageTableEntry { index: *id, name: name.clone() })
                    .collect(),
            };
            let reply_id = inner.table.id("sockclnt_create_reply").expect("memclnt is in the table");
            if message::encode_frame_into(&mut out, &reply, reply_id, 0, header.context).is_err() {
                break;
            }
            registered = true;
            inner.handshakes.fetch_add(1, Ordering::Relaxed);
        } else if let Some(info) = inner.table.info(msg_id) {
            let mut events = Vec::new();
            let mut ctx = handlers::Ctx {
                table: &inner.table,
                client_index,
                context: info.context_of(&payload),
                out: &mut out,
                events: &mut events,
                conn_id,
                vpe_pid: inner.opts.vpe_pid,
                details_page: inner.opts.details_page,
                close: false,
                xdp: inner.xdp.as_ref(),
            };
            handlers::handle(&mut inner.state(), &mut ctx, info, &payload);
            close = ctx.close;
            inner.sync_xdp();
            if !events.is_empty() {
                let conns = inner.conns();
                for (conn, frame) in events {
                    if conn == conn_id {
                        out.extend_from_slice(&frame);
                    } else if let Some(c) = conns.get(&conn) {
                        let _ = c.tx.send(frame);
                    }
                }
            }
        } else {
            log::warn!("fake VPP: unknown message id {msg_id}");
        }
        // Answers of pipelined requests go out together once the input is drained.
        if (close || reader.buffer().is_empty()) && !out.is_empty() {
            if tx.send(std::mem::take(&mut out)).is_err() {
                break;
            }
            out.reserve(64 << 10);
        }
        if close {
            break;
        }
    }
    inner.state().subscribers.remove(&conn_id);
    inner.conns().remove(&conn_id);
}

async fn write_loop(mut write: tokio::net::unix::OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut buf = Vec::with_capacity(64 << 10);
    while let Some(first) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        while let Ok(more) = rx.try_recv() {
            buf.extend_from_slice(&more);
        }
        if write.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
}
