//! The gRPC client to the vswitch agent's CNI socket (`contiv_cni_api::v1::cni_client`).

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use contiv_cni_api::plugin_timing;
use contiv_cni_api::v1::cni_client::CniClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// When this process started (CLOCK_MONOTONIC ns; 0: not recorded). Sent to the agent with
/// each request so its ADD timing shows the plugin's own start-up.
static PROCESS_STARTED_NS: AtomicU64 = AtomicU64::new(0);

/// Records the process start; `main` calls it first thing.
pub fn mark_process_start() {
    PROCESS_STARTED_NS.store(plugin_timing::monotonic_ns(), Ordering::Relaxed);
}

/// How long to wait for the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting to the socket (and the HTTP/2 handshake).
    pub connect: Duration,
    /// One ADD/DEL/CHECK/GC request, from sending to the full reply.
    pub request: Duration,
    /// One STATUS request: a readiness probe, so an agent that is this slow counts as not
    /// available rather than keeping the runtime waiting a full request timeout.
    pub status: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(3), request: Duration::from_secs(60), status: Duration::from_secs(10) }
    }
}

/// Why a call to the agent failed (transport level; in-band CNI errors are in the reply).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No agent listens: the socket is missing or refuses the connection (crash-looping,
    /// between an upgrade's pods, uninstalled).
    #[error("the agent is not running at {socket}: {reason}")]
    NotRunning { socket: PathBuf, reason: String },
    /// The connection did not complete in time, or failed after the socket accepted it.
    #[error("cannot reach the agent at {socket}: {reason}")]
    Unreachable { socket: PathBuf, reason: String },
    /// The socket (or a directory on its path) does not let this process connect: the agent
    /// serves only its owner (root). Retrying cannot help.
    #[error("connect({socket}): permission denied; {who}")]
    PermissionDenied { socket: PathBuf, who: String },
    /// The agent took longer than the request timeout.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent (or the transport) answered with a gRPC status instead of a reply.
    #[error("agent RPC failed: {}: {}", .0.code(), .0.message())]
    Rpc(#[source] tonic::Status),
}

impl AgentError {
    /// Whether the failure is plausibly transient (the runtime should retry later).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::NotRunning { .. } | Self::Unreachable { .. } | Self::Timeout(_) => true,
            Self::PermissionDenied { .. } => false,
            Self::Rpc(s) => matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Aborted
                    | tonic::Code::ResourceExhausted
            ),
        }
    }
}

/// A connected client plus the request timeout to apply to each call.
pub struct Agent {
    client: CniClient<Channel>,
    request_timeout: Duration,
    /// When the connection was up (CLOCK_MONOTONIC ns), for the agent's timing.
    connected_ns: u64,
}

impl Agent {
    /// Connects to the agent's unix socket at `socket`.
    pub async fn connect(socket: &Path, timeouts: Timeouts) -> Result<Self, AgentError> {
        let unreachable = |reason: String| AgentError::Unreachable { socket: socket.to_path_buf(), reason };
        // Dial the socket first, so a refusal by the file system (not root) is told apart from
        // an agent that is down, then run HTTP/2 over that one stream.
        let stream = match tokio::time::timeout(timeouts.connect, UnixStream::connect(socket)).await {
            Err(_) => return Err(unreachable(format!("no connection within {:?}", timeouts.connect))),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(AgentError::PermissionDenied {
                    socket: socket.to_path_buf(),
                    who: who_may_connect(socket),
                });
            }
            Ok(Err(e)) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                return Err(AgentError::NotRunning { socket: socket.to_path_buf(), reason: e.to_string() });
            }
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Ok(Ok(stream)) => stream,
        };
        let stream = std::sync::Mutex::new(Some(stream));
        // The URI is never resolved: the connector hands over the stream dialled above (once;
        // this client never reconnects).
        let endpoint = Endpoint::from_static("http://contiv-agent.invalid")
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.request);
        let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
            let stream = stream.lock().ok().and_then(|mut s| s.take());
            async move {
                let stream = stream.ok_or_else(|| std::io::Error::other("the agent connection was closed"))?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }));
        let channel = match tokio::time::timeout(timeouts.connect, connect).await {
            Err(_) => {
                return Err(unreachable(format!("no connection within {:?}", timeouts.connect)));
            }
            Ok(Err(e)) => return Err(unreachable(error_chain(&e))),
            Ok(Ok(channel)) => channel,
        };
        Ok(Self {
            client: CniClient::new(channel),
            request_timeout: timeouts.request,
            connected_ns: plugin_timing::monotonic_ns(),
        })
    }

    /// `msg` with the plugin's timing as metadata.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let started = PROCESS_STARTED_NS.load(Ordering::Relaxed);
        let md = req.metadata_mut();
        if started != 0 {
            md.insert(plugin_timing::STARTED_NS, started.into());
        }
        md.insert(plugin_timing::CONNECTED_NS, self.connected_ns.into());
        req
    }

    pub async fn add(
        &mut self,
        req: contiv_cni_api::v1::CniRequest,
    ) -> Result<contiv_cni_api::v1::AddReply, AgentError> {
        let timeout = self.request_timeout;
        let req = self.request(req);
        call(timeout, self.client.add(req)).await
    }

    pub async fn del(
        &mut self,
        req: contiv_cni_api::v1::CniRequest,
    ) -> Result<contiv_cni_api::v1::DelReply, AgentError> {
        let timeout = self.request_timeout;
        let req = self.request(req);
        call(timeout, self.client.del(req)).await
    }

    pub async fn check(
        &mut self,
        req: contiv_cni_api::v1::CniRequest,
    ) -> Result<contiv_cni_api::v1::CheckReply, AgentError> {
        let timeout = self.request_timeout;
        let req = self.request(req);
        call(timeout, self.client.check(req)).await
    }

    pub async fn status(
        &mut self,
        req: contiv_cni_api::v1::StatusRequest,
    ) -> Result<contiv_cni_api::v1::StatusReply, AgentError> {
        let timeout = self.request_timeout;
        let req = self.request(req);
        call(timeout, self.client.status(req)).await
    }

    pub async fn gc(&mut self, req: contiv_cni_api::v1::GcRequest) -> Result<contiv_cni_api::v1::GcReply, AgentError> {
        let timeout = self.request_timeout;
        let req = self.request(req);
        call(timeout, self.client.gc(req)).await
    }
}

async fn call<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(AgentError::Timeout(timeout)),
        Ok(Err(status)) if status.code() == tonic::Code::Cancelled && is_timeout_status(&status) => {
            Err(AgentError::Timeout(timeout))
        }
        Ok(Err(status)) => Err(AgentError::Rpc(status)),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

/// tonic reports its own per-request timeout as `Cancelled` with "Timeout expired".
fn is_timeout_status(status: &tonic::Status) -> bool {
    status.message().to_ascii_lowercase().contains("timeout")
}

/// Who owns the socket, for the permission-denied message.
fn who_may_connect(socket: &Path) -> String {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match std::fs::metadata(socket) {
        Ok(m) => format!(
            "the socket is owned by uid {} gid {} with mode {:04o} and contiv-cni runs as uid {me}",
            m.uid(),
            m.gid(),
            m.mode() & 0o7777
        ),
        Err(e) => format!("contiv-cni runs as uid {me} and cannot even look at the socket ({e})"),
    }
}

/// `e` and its sources, joined (tonic's transport error alone just says "transport error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Some errors already print their source; do not repeat it.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
