//! The async client: one unix-socket connection to VPP at a time, replies matched to
//! requests by context (any number in flight), dumps closed by `control_ping`, `*_get`
//! cursors, events, reconnect.
//!
//! # Tasks
//! A connection has a reader task (splits the stream into messages, hands replies to the
//! waiting request by context, broadcasts events) and a writer task (writes queued frames,
//! batching whatever queued up meanwhile into one write). Requests never touch the socket
//! themselves, so any number of them can be pending at once.
//!
//! # Reconnect
//! When the socket is lost (VPP restarted), every pending request fails with
//! [`Error::Disconnected`], [`Client::state`] turns to disconnected and
//! [`Client::disconnected`] resolves. [`Client::reconnect`] opens a fresh connection with a
//! fresh handshake: message ids may differ after a restart, so the new table replaces the old.
//! Subscriptions (`want_*_events`) and VPP's state are gone after a VPP restart: replaying
//! them is the caller's job.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    sync::{broadcast, mpsc, oneshot, watch},
    task::JoinHandle,
};

use crate::{
    api,
    message::{self, CursorReply, Dump, Getter, Message, MessageInfo, Request},
    wire::{self, DecodeError, EncodeError, FRAME_HEADER_LEN},
};

/// Fixed ids of the handshake (memclnt is numbered first, from 1).
const SOCKCLNT_CREATE_ID: u16 = 15;
const SOCKCLNT_CREATE_REPLY_ID: u16 = 16;
/// The context of the handshake (what vpp_papi uses too).
const HANDSHAKE_CONTEXT: u32 = 124;
/// Largest payload accepted from the server (a full message table is ~150 KB).
const MAX_PAYLOAD: usize = 64 << 20;

/// VPP's API error numbers (`retval`), from vnet's error definitions.
pub mod errno {
    /// Unspecified error.
    pub const UNSPECIFIED: i32 = -1;
    /// Invalid sw_if_index.
    pub const INVALID_SW_IF_INDEX: i32 = -2;
    /// No such FIB / VRF.
    pub const NO_SUCH_FIB: i32 = -3;
    /// No such entry.
    pub const NO_SUCH_ENTRY: i32 = -6;
    /// Invalid value.
    pub const INVALID_VALUE: i32 = -7;
    /// Unimplemented: the message is known but not handled.
    pub const UNIMPLEMENTED: i32 = -9;
    /// Feature disabled by configuration.
    pub const FEATURE_DISABLED: i32 = -30;
    /// Address not found for interface.
    pub const ADDRESS_NOT_FOUND_FOR_INTERFACE: i32 = -60;
    /// Invalid interface.
    pub const INVALID_INTERFACE: i32 = -71;
    /// Invalid argument.
    pub const INVALID_ARGUMENT: i32 = -73;
    /// Tunnel already exists.
    pub const TUNNEL_EXIST: i32 = -75;
    /// Interface already exists.
    pub const IF_ALREADY_EXISTS: i32 = -79;
    /// Value already exists.
    pub const VALUE_EXIST: i32 = -81;
    /// Address in use.
    pub const ADDRESS_IN_USE: i32 = -105;
    /// Entry already exists.
    pub const ENTRY_ALREADY_EXISTS: i32 = -116;
    /// Address already present on another interface.
    pub const DUPLICATE_IF_ADDRESS: i32 = -127;
    /// Call the `*_get` again with the returned cursor.
    pub const EAGAIN: i32 = -165;

    /// A short description of a retval.
    pub fn describe(retval: i32) -> &'static str {
        match retval {
            0 => "ok",
            UNSPECIFIED => "unspecified error",
            INVALID_SW_IF_INDEX => "invalid sw_if_index",
            NO_SUCH_FIB => "no such FIB / VRF",
            NO_SUCH_ENTRY => "no such entry",
            INVALID_VALUE => "invalid value",
            UNIMPLEMENTED => "unimplemented",
            FEATURE_DISABLED => "feature disabled",
            ADDRESS_NOT_FOUND_FOR_INTERFACE => "address not found for interface",
            INVALID_INTERFACE => "invalid interface",
            INVALID_ARGUMENT => "invalid argument",
            TUNNEL_EXIST => "tunnel already exists",
            IF_ALREADY_EXISTS => "interface already exists",
            VALUE_EXIST => "value already exists",
            ADDRESS_IN_USE => "address in use",
            ENTRY_ALREADY_EXISTS => "entry already exists",
            DUPLICATE_IF_ADDRESS => "address already present on another interface",
            EAGAIN => "again (cursor)",
            _ => "VPP error",
        }
    }
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened.
    #[error("connecting to VPP at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The handshake did not complete.
    #[error("VPP handshake on {path} failed: {reason}")]
    Handshake {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The server lists the message under a different CRC: its definition differs from ours,
    /// so it is not sent.
    #[error(
        "VPP refuses message {name}: our definition has CRC {ours:08x}, the server lists {server} \
         (the API changed; this client needs the server's .api.json)"
    )]
    CrcMismatch {
        /// Message name.
        name: &'static str,
        /// Our CRC.
        ours: u32,
        /// The `name_crc` entries the server lists for this name.
        server: String,
    },
    /// The server does not list the message at all (plugin not loaded, or too old a VPP).
    #[error("VPP does not know message {name_crc} (is its plugin loaded?)")]
    UnknownMessage {
        /// `name_crc`.
        name_crc: &'static str,
    },
    /// VPP answered with a negative retval.
    #[error("{message} failed in VPP: retval {retval} ({})", errno::describe(*retval))]
    Retval {
        /// The request.
        message: &'static str,
        /// The retval.
        retval: i32,
    },
    /// No connection (never connected, or lost and not reconnected yet).
    #[error("not connected to VPP")]
    NotConnected,
    /// The connection was lost while the request was pending.
    #[error("the connection to VPP was lost")]
    Disconnected,
    /// No answer in time.
    #[error("{message}: no answer from VPP within {timeout:?}")]
    Timeout {
        /// The request.
        message: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// The message could not be encoded (bad input, nothing was sent).
    #[error("encoding {message}: {source}")]
    Encode {
        /// The message.
        message: &'static str,
        #[source]
        source: EncodeError,
    },
    /// An answer could not be decoded.
    #[error("decoding {message}: {source}")]
    Decode {
        /// The message.
        message: &'static str,
        #[source]
        source: DecodeError,
    },
    /// An answer of the wrong type arrived for a request.
    #[error("{message}: unexpected answer {got}")]
    UnexpectedAnswer {
        /// The request.
        message: &'static str,
        /// What arrived.
        got: String,
    },
    /// A getter did not make progress.
    #[error("{message}: VPP keeps answering EAGAIN without moving the cursor ({cursor})")]
    CursorStuck {
        /// The request.
        message: &'static str,
        /// The cursor.
        cursor: u32,
    },
}

/// How to reach VPP.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The API socket (`socksvr { socket-name }` in startup.conf). Default `/run/vpp/api.sock`.
    pub socket: PathBuf,
    /// The name this client registers under (at most 63 bytes).
    pub name: String,
    /// How long a request waits for its answer.
    pub request_timeout: Duration,
    /// How long connecting and the handshake may take.
    pub connect_timeout: Duration,
    /// Events buffered per subscriber before the slowest one loses some.
    pub event_capacity: usize,
}

impl ClientOptions {
    /// Defaults for `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            name: "contiv-agent".into(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            event_capacity: 1024,
        }
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self::new("/run/vpp/api.sock")
    }
}

// === impl MessageTable ===

/// The server's message table from the handshake: `name_crc` -> id.
#[derive(Debug, Default)]
pub struct MessageTable {
    ids: HashMap<String, u16>,
    by_id: Vec<Option<&'static MessageInfo>>,
    crcs_by_name: HashMap<String, Vec<String>>,
}

impl MessageTable {
    /// Builds the table from `(id, name_crc)` entries.
    pub fn new(entries: impl IntoIterator<Item = (u16, String)>) -> Self {
        let mut t = MessageTable::default();
        for (id, name_crc) in entries {
            if let Some(info) = message::find(&name_crc) {
                if t.by_id.len() <= id as usize {
                    t.by_id.resize(id as usize + 1, None);
                }
                t.by_id[id as usize] = Some(info);
            }
            if let Some((name, _)) = name_crc.rsplit_once('_') {
                t.crcs_by_name.entry(name.to_owned()).or_default().push(name_crc.clone());
            }
            t.ids.insert(name_crc, id);
        }
        t
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id of `name_crc`, if listed.
    pub fn id(&self, name_crc: &str) -> Option<u16> {
        self.ids.get(name_crc).copied()
    }

    /// The id of message `M`, refusing it when the server lists it under another CRC.
    pub fn id_of<M: Message>(&self) -> Result<u16, Error> {
        self.id_by_name_crc(M::NAME, M::CRC, M::NAME_CRC)
    }

    fn id_by_name_crc(&self, name: &'static str, crc: u32, name_crc: &'static str) -> Result<u16, Error> {
        if let Some(id) = self.id(name_crc) {
            return Ok(id);
        }
        match self.crcs_by_name.get(name) {
            Some(listed) => Err(Error::CrcMismatch { name, ours: crc, server: listed.join(", ") }),
            None => Err(Error::UnknownMessage { name_crc }),
        }
    }

    /// The generated message behind an id, if it is one of ours.
    pub fn info(&self, id: u16) -> Option<&'static MessageInfo> {
        self.by_id.get(id as usize).copied().flatten()
    }
}

// === connection state and events ===

/// Whether the client is connected, and to which connection (it counts up on every
/// successful connect, so a change tells a caller that VPP may have lost its state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionState {
    /// Connected now.
    pub connected: bool,
    /// Number of the current (or last) connection; 0 before the first.
    pub generation: u64,
}

/// An asynchronous message from VPP (a message without context, or with context 0).
#[derive(Clone, Debug)]
pub struct Event {
    /// Its id on this connection.
    pub msg_id: u16,
    /// The generated message it is, if it is one of ours.
    pub info: Option<&'static MessageInfo>,
    /// The payload (header included).
    pub payload: Arc<[u8]>,
}

impl Event {
    /// The event as message `M`, if it is one.
    pub fn decode<M: Message>(&self) -> Option<Result<M, DecodeError>> {
        let info = self.info?;
        if info.name_crc != M::NAME_CRC {
            return None;
        }
        Some(message::decode::<M>(&self.payload).map(|(_, m)| m))
    }

    /// The event's message name.
    pub fn name(&self) -> &'static str {
        self.info.map(|i| i.name).unwrap_or("<unknown>")
    }
}

// === pending requests ===

enum Waiter {
    Reply { reply_id: u16, tx: oneshot::Sender<Result<Vec<u8>, Error>> },
    Dump { details_id: u16, end_id: u16, items: Vec<Vec<u8>>, tx: oneshot::Sender<Result<Vec<Vec<u8>>, Error>> },
    Get { reply_id: u16, details_id: u16, items: Vec<Vec<u8>>, tx: oneshot::Sender<Result<Answer, Error>> },
}

type Answer = (Vec<u8>, Vec<Vec<u8>>);

#[derive(Default)]
struct Pending {
    closed: bool,
    waiters: HashMap<u32, (&'static str, Waiter)>,
}

struct Conn {
    generation: u64,
    table: MessageTable,
    client_index: u32,
    out: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<Pending>,
    next_context: AtomicU32,
    lost: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Conn {
    fn context(&self) -> u32 {
        loop {
            let c = self.next_context.fetch_add(1, Ordering::Relaxed);
            if c != 0 && c != HANDSHAKE_CONTEXT {
                return c;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a waiter and queues the frames. Fails if the connection is gone.
    fn submit(&self, context: u32, name: &'static str, waiter: Waiter, frames: Vec<u8>) -> Result<(), Error> {
        {
            let mut p = self.lock();
            if p.closed {
                return Err(Error::Disconnected);
            }
            p.waiters.insert(context, (name, waiter));
        }
        if self.out.send(frames).is_err() {
            self.lock().waiters.remove(&context);
            return Err(Error::Disconnected);
        }
        Ok(())
    }

    fn forget(&self, context: u32) {
        self.lock().waiters.remove(&context);
    }

    /// Marks the connection lost and fails every waiter.
    fn close(&self) {
        let waiters = {
            let mut p = self.lock();
            p.closed = true;
            std::mem::take(&mut p.waiters)
        };
        for (_, (_, w)) in waiters {
            match w {
                Waiter::Reply { tx, .. } => drop(tx.send(Err(Error::Disconnected))),
                Waiter::Dump { tx, .. } => drop(tx.send(Err(Error::Disconnected))),
                Waiter::Get { tx, .. } => drop(tx.send(Err(Error::Disconnected))),
            }
        }
        self.lost.send_replace(true);
    }

    /// Hands one received message to its waiter.
    fn deliver(&self, msg_id: u16, context: u32, payload: Vec<u8>) {
        let mut p = self.lock();
        let Some((name, waiter)) = p.waiters.get_mut(&context) else {
            log::debug!("VPP message id {msg_id} for context {context} nobody waits for (timed out?)");
            return;
        };
        let name = *name;
        let done = match waiter {
            Waiter::Reply { reply_id, .. } => {
                if msg_id != *reply_id {
                    Some(Err(self.unexpected(name, msg_id)))
                } else {
                    Some(Ok(payload))
                }
            }
            Waiter::Dump { details_id, end_id, items, .. } => {
                if msg_id == *details_id {
                    items.push(payload);
                    None
                } else if msg_id == *end_id {
                    Some(Ok(Vec::new()))
                } else {
                    Some(Err(self.unexpected(name, msg_id)))
                }
            }
            Waiter::Get { reply_id, details_id, items, .. } => {
                if msg_id == *details_id {
                    items.push(payload);
                    None
                } else if msg_id == *reply_id {
                    Some(Ok(payload))
                } else {
                    Some(Err(self.unexpected(name, msg_id)))
                }
            }
        };
        let Some(result) = done else { return };
        let Some((_, waiter)) = p.waiters.remove(&context) else { return };
        drop(p);
        match waiter {
            Waiter::Reply { tx, .. } => drop(tx.send(result)),
            Waiter::Dump { tx, items, .. } => drop(tx.send(result.map(|_| items))),
            Waiter::Get { tx, items, .. } => drop(tx.send(result.map(|reply| (reply, items)))),
        }
    }

    fn unexpected(&self, name: &'static str, msg_id: u16) -> Error {
        let got = self.table.info(msg_id).map(|i| i.name.to_owned()).unwrap_or_else(|| format!("message id {msg_id}"));
        Error::UnexpectedAnswer { message: name, got }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
    }
}

// === impl Client ===

struct Shared {
    opts: ClientOptions,
    conn: Mutex<Option<Arc<Conn>>>,
    events: broadcast::Sender<Event>,
    state: watch::Sender<ConnectionState>,
    generation: AtomicU64,
    /// Serialises (re)connects.
    connecting: tokio::sync::Mutex<()>,
}

/// A client of VPP's binary API. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("socket", &self.shared.opts.socket).field("state", &self.state()).finish()
    }
}

impl Client {
    /// A client that is not connected yet; [`Client::reconnect`] connects it.
    pub fn new(opts: ClientOptions) -> Self {
        let (events, _) = broadcast::channel(opts.event_capacity.max(1));
        let (state, _) = watch::channel(ConnectionState { connected: false, generation: 0 });
        Self {
            shared: Arc::new(Shared {
                opts,
                conn: Mutex::new(None),
                events,
                state,
                generation: AtomicU64::new(0),
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Connects and completes the handshake.
    pub async fn connect(opts: ClientOptions) -> Result<Self, Error> {
        let c = Self::new(opts);
        c.reconnect().await?;
        Ok(c)
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.shared.opts
    }

    /// Drops the current connection (if any) and opens a new one with a new handshake.
    pub async fn reconnect(&self) -> Result<(), Error> {
        let _guard = self.shared.connecting.lock().await;
        if let Some(old) = self.take_conn() {
            old.close();
        }
        let opts = &self.shared.opts;
        let path = opts.socket.clone();
        let handshake = async {
            let stream =
                UnixStream::connect(&path).await.map_err(|source| Error::Connect { path: path.clone(), source })?;
            handshake(stream, opts).await
        };
        let (stream, client_index, table) =
            tokio::time::timeout(opts.connect_timeout, handshake).await.map_err(|_| Error::Handshake {
                path: path.clone(),
                reason: format!("no answer within {:?}", opts.connect_timeout),
            })??;
        let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (lost, _) = watch::channel(false);
        let conn = Arc::new(Conn {
            generation,
            table,
            client_index,
            out: out_tx,
            pending: Mutex::new(Pending::default()),
            next_context: AtomicU32::new(1),
            lost,
            tasks: Mutex::new(Vec::new()),
        });
        let (read_half, write_half) = stream.into_split();
        let reader = tokio::spawn(read_loop(read_half, Arc::downgrade(&conn), self.shared.clone()));
        let writer = tokio::spawn(write_loop(write_half, out_rx, Arc::downgrade(&conn)));
        conn.tasks.lock().unwrap_or_else(|e| e.into_inner()).extend([reader, writer]);
        *self.shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        self.shared.state.send_replace(ConnectionState { connected: true, generation });
        log::info!("connected to VPP at {} (connection {generation})", path.display());
        Ok(())
    }

    fn take_conn(&self) -> Option<Arc<Conn>> {
        self.shared.conn.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn conn(&self) -> Result<Arc<Conn>, Error> {
        let conn = self.shared.conn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match conn {
            Some(c) if !*c.lost.borrow() => Ok(c),
            Some(_) => Err(Error::Disconnected),
            None => Err(Error::NotConnected),
        }
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.conn().is_ok()
    }

    /// The connection state; changes on connect and on loss.
    pub fn state(&self) -> ConnectionState {
        *self.shared.state.borrow()
    }

    /// Watches the connection state.
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// Resolves when the current connection is lost (at once if there is none).
    pub async fn disconnected(&self) {
        let Ok(conn) = self.conn() else { return };
        let mut lost = conn.lost.subscribe();
        drop(conn);
        let _ = lost.wait_for(|l| *l).await;
    }

    /// The server's message table of the current connection (its size).
    pub fn table_len(&self) -> Option<usize> {
        self.conn().ok().map(|c| c.table.len())
    }

    /// The client index the server gave this connection.
    pub fn client_index(&self) -> Option<u32> {
        self.conn().ok().map(|c| c.client_index)
    }

    /// Checks that the server knows message `M` with our CRC, without sending anything.
    pub fn supports<M: Message>(&self) -> Result<(), Error> {
        self.conn()?.table.id_of::<M>().map(|_| ())
    }

    /// Subscribes to events (messages without context). Events arrive from the moment of
    /// subscribing, across reconnects.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// Sends a request and waits for its reply; a negative `retval` is an error.
    ///
    /// The returned future owns a copy of the message (it borrows nothing), so any number of
    /// them can be started and awaited together.
    pub fn request<M: Request>(
        &self,
        msg: &M,
    ) -> impl Future<Output = Result<M::Reply, Error>> + Send + 'static + use<M> {
        let (this, msg) = (self.clone(), msg.clone());
        async move {
            let reply = this.request_inner(msg).await?;
            match reply.retval() {
                Some(r) if r < 0 => Err(Error::Retval { message: M::NAME, retval: r }),
                _ => Ok(reply),
            }
        }
    }

    /// Sends a request and returns its reply whatever its `retval`.
    pub fn request_unchecked<M: Request>(
        &self,
        msg: &M,
    ) -> impl Future<Output = Result<M::Reply, Error>> + Send + 'static + use<M> {
        let (this, msg) = (self.clone(), msg.clone());
        async move { this.request_inner(msg).await }
    }

    async fn request_inner<M: Request>(&self, msg: M) -> Result<M::Reply, Error> {
        let conn = self.conn()?;
        let id = conn.table.id_of::<M>()?;
        let reply_id = conn.table.id_of::<M::Reply>()?;
        let context = conn.context();
        let mut frame = Vec::with_capacity(64);
        message::encode_frame_into(&mut frame, &msg, id, conn.client_index, context)
            .map_err(|source| Error::Encode { message: M::NAME, source })?;
        let (tx, rx) = oneshot::channel();
        conn.submit(context, M::NAME, Waiter::Reply { reply_id, tx }, frame)?;
        let payload = self.wait(&conn, context, M::NAME, rx).await?;
        decode_answer::<M::Reply>(&payload)
    }

    /// Runs a dump: the request, then `control_ping` with the same context; collects the
    /// details until `control_ping_reply`.
    pub fn dump<M: Dump>(
        &self,
        msg: &M,
    ) -> impl Future<Output = Result<Vec<M::Details>, Error>> + Send + 'static + use<M> {
        let (this, msg) = (self.clone(), msg.clone());
        async move { this.dump_inner(msg).await }
    }

    async fn dump_inner<M: Dump>(&self, msg: M) -> Result<Vec<M::Details>, Error> {
        let conn = self.conn()?;
        let id = conn.table.id_of::<M>()?;
        let details_id = conn.table.id_of::<M::Details>()?;
        let ping_id = conn.table.id_of::<api::ControlPing>()?;
        let end_id = conn.table.id_of::<api::ControlPingReply>()?;
        let context = conn.context();
        let mut frames = Vec::with_capacity(96);
        message::encode_frame_into(&mut frames, &msg, id, conn.client_index, context)
            .map_err(|source| Error::Encode { message: M::NAME, source })?;
        message::encode_frame_into(&mut frames, &api::ControlPing::default(), ping_id, conn.client_index, context)
            .map_err(|source| Error::Encode { message: M::NAME, source })?;
        let (tx, rx) = oneshot::channel();
        conn.submit(context, M::NAME, Waiter::Dump { details_id, end_id, items: Vec::new(), tx }, frames)?;
        let items = self.wait(&conn, context, M::NAME, rx).await?;
        items.iter().map(|p| decode_answer::<M::Details>(p)).collect()
    }

    /// Runs a `*_get` to the end: while VPP answers EAGAIN (-165) it is called again with the
    /// returned cursor. Returns the last reply and every details message.
    pub fn get<M: Getter>(
        &self,
        msg: &M,
    ) -> impl Future<Output = Result<(M::Reply, Vec<M::Details>), Error>> + Send + 'static + use<M> {
        let (this, msg) = (self.clone(), msg.clone());
        async move { this.get_inner(msg).await }
    }

    async fn get_inner<M: Getter>(&self, mut req: M) -> Result<(M::Reply, Vec<M::Details>), Error> {
        let mut all = Vec::new();
        let mut last_cursor = None;
        loop {
            let conn = self.conn()?;
            let id = conn.table.id_of::<M>()?;
            let reply_id = conn.table.id_of::<M::Reply>()?;
            let details_id = conn.table.id_of::<M::Details>()?;
            let context = conn.context();
            let mut frame = Vec::with_capacity(64);
            message::encode_frame_into(&mut frame, &req, id, conn.client_index, context)
                .map_err(|source| Error::Encode { message: M::NAME, source })?;
            let (tx, rx) = oneshot::channel();
            conn.submit(context, M::NAME, Waiter::Get { reply_id, details_id, items: Vec::new(), tx }, frame)?;
            let (reply, items) = self.wait(&conn, context, M::NAME, rx).await?;
            let reply = decode_answer::<M::Reply>(&reply)?;
            let got = items.len();
            for p in &items {
                all.push(decode_answer::<M::Details>(p)?);
            }
            match reply.retval() {
                Some(errno::EAGAIN) => {
                    let cursor = reply.cursor();
                    if got == 0 && last_cursor == Some(cursor) {
                        return Err(Error::CursorStuck { message: M::NAME, cursor });
                    }
                    last_cursor = Some(cursor);
                    req.set_cursor(cursor);
                }
                Some(r) if r < 0 => return Err(Error::Retval { message: M::NAME, retval: r }),
                _ => return Ok((reply, all)),
            }
        }
    }

    async fn wait<T>(
        &self,
        conn: &Conn,
        context: u32,
        name: &'static str,
        rx: oneshot::Receiver<Result<T, Error>>,
    ) -> Result<T, Error> {
        let timeout = self.shared.opts.request_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => {
                conn.forget(context);
                Err(Error::Timeout { message: name, timeout })
            }
        }
    }

    /// Says goodbye (`sockclnt_delete`) and closes the connection.
    pub async fn close(&self) -> Result<(), Error> {
        let Ok(conn) = self.conn() else { return Ok(()) };
        let result = self.request_inner(api::SockclntDelete { index: conn.client_index }).await;
        if let Some(c) = self.take_conn() {
            c.close();
        }
        self.shared.state.send_replace(ConnectionState { connected: false, generation: conn.generation });
        match result {
            Ok(r) if r.response == 1 => Ok(()),
            Ok(r) => Err(Error::Retval { message: "sockclnt_delete", retval: r.response }),
            Err(Error::Disconnected) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn decode_answer<M: Message>(payload: &[u8]) -> Result<M, Error> {
    message::decode::<M>(payload).map(|(_, m)| m).map_err(|source| Error::Decode { message: M::NAME, source })
}

/// Reads one message: the 16-byte frame header, then exactly its payload.
async fn read_message<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut header).await?;
    let len = wire::frame_len(&header);
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("message of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(payload)
}

async fn handshake(mut stream: UnixStream, opts: &ClientOptions) -> Result<(UnixStream, u32, MessageTable), Error> {
    let path = opts.socket.clone();
    let fail = |reason: String| Error::Handshake { path: path.clone(), reason };
    let mut frame = Vec::new();
    let create = api::SockclntCreate { name: opts.name.clone() };
    message::encode_frame_into(&mut frame, &create, SOCKCLNT_CREATE_ID, 0, HANDSHAKE_CONTEXT)
        .map_err(|source| Error::Encode { message: "sockclnt_create", source })?;
    stream.write_all(&frame).await.map_err(|e| fail(format!("sending sockclnt_create: {e}")))?;
    let mut reader = BufReader::with_capacity(256 << 10, &mut stream);
    let payload = read_message(&mut reader).await.map_err(|e| fail(format!("reading sockclnt_create_reply: {e}")))?;
    if !reader.buffer().is_empty() {
        return Err(fail("unexpected data after sockclnt_create_reply".into()));
    }
    drop(reader);
    let id = message::msg_id_of(&payload).unwrap_or(0);
    if id != SOCKCLNT_CREATE_REPLY_ID {
        return Err(fail(format!("expected sockclnt_create_reply (id 16), got id {id}")));
    }
    let (_, reply) = message::decode::<api::SockclntCreateReply>(&payload)
        .map_err(|e| fail(format!("decoding sockclnt_create_reply: {e}")))?;
    if reply.response != 0 {
        return Err(fail(format!("VPP refused the client: response {}", reply.response)));
    }
    let table = MessageTable::new(reply.message_table.into_iter().map(|e| (e.index, e.name)));
    Ok((stream, reply.index, table))
}

async fn read_loop(read: tokio::net::unix::OwnedReadHalf, conn: std::sync::Weak<Conn>, shared: Arc<Shared>) {
    let mut reader = BufReader::with_capacity(256 << 10, read);
    let reason = loop {
        let payload = match read_message(&mut reader).await {
            Ok(p) => p,
            Err(e) => break e,
        };
        let Some(conn) = conn.upgrade() else { return };
        let msg_id = message::msg_id_of(&payload).unwrap_or(u16::MAX);
        let info = conn.table.info(msg_id);
        let context = info.map(|i| i.context_of(&payload)).unwrap_or(0);
        if context == 0 {
            let _ = shared.events.send(Event { msg_id, info, payload: payload.into() });
        } else {
            conn.deliver(msg_id, context, payload);
        }
    };
    if let Some(conn) = conn.upgrade() {
        log::warn!("lost the connection to VPP ({reason})");
        conn.close();
        let generation = conn.generation;
        shared.state.send_if_modified(|s| {
            if s.generation == generation && s.connected {
                s.connected = false;
                true
            } else {
                false
            }
        });
    }
}

async fn write_loop(
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    conn: std::sync::Weak<Conn>,
) {
    let mut buf = Vec::with_capacity(64 << 10);
    while let Some(first) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        // Everything queued meanwhile goes out in the same write.
        while buf.len() < (256 << 10) {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if let Err(e) = write.write_all(&buf).await {
            log::warn!("writing to VPP failed: {e}");
            if let Some(c) = conn.upgrade() {
                c.close();
            }
            return;
        }
    }
}
