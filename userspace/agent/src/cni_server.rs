//! The CNI gRPC service on a unix socket (mode 0600: only root may wire pods).

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Instant};

use contiv_cni_api::v1::{self, cni_server::CniServer};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{
    agent::Agent,
    metrics::AgentMetrics,
    starting::{AGENT_WAIT, Starting, not_started},
    timing::{self, PluginTiming},
};

/// The root timing span of a request on an attachment.
fn operation(op: &'static str, req: &Request<v1::CniRequest>) -> tracing::Span {
    let plugin = PluginTiming::from_metadata(req.metadata());
    let r = req.get_ref();
    timing::operation(op, &format!("{}/{}", r.container_id, r.ifname), plugin)
}

/// The tonic service: translates between the wire contract and [`Agent`], timing each
/// request into the `contiv_cni_request_duration_seconds` histogram. Until the agent is
/// there (`agent` is `None`), [`Starting`] answers.
pub struct CniService {
    agent: tokio::sync::watch::Receiver<Option<Arc<Agent>>>,
    starting: Arc<Starting>,
    metrics: Arc<AgentMetrics>,
}

impl CniService {
    /// The agent, waiting up to [`AGENT_WAIT`] for it if `wait`.
    async fn agent(&self, wait: bool) -> Option<Arc<Agent>> {
        if let Some(agent) = self.agent.borrow().clone() {
            return Some(agent);
        }
        if !wait {
            return None;
        }
        let mut rx = self.agent.clone();
        let waited = tokio::time::timeout(AGENT_WAIT, rx.wait_for(|a| a.is_some())).await;
        waited.ok()?.ok()?.clone()
    }
}

/// The CNI code of a reply's error (0: success).
fn code(error: Option<&v1::CniError>) -> u32 {
    error.map_or(0, |e| e.code)
}

#[tonic::async_trait]
impl v1::cni_server::Cni for CniService {
    async fn add(&self, req: Request<v1::CniRequest>) -> Result<Response<v1::AddReply>, Status> {
        let span = operation("ADD", &req);
        let start = Instant::now();
        let r = req.into_inner();
        let reply = match self.agent(true).await {
            Some(agent) => detached(async move { agent.add(&r).await }.instrument(span)).await?,
            None => Err(not_started(false)),
        };
        let reply = match reply {
            Ok(r) => r,
            Err(e) => v1::AddReply { error: Some(e.to_proto()), ..Default::default() },
        };
        self.metrics.observe_cni("ADD", code(reply.error.as_ref()), start.elapsed());
        Ok(Response::new(reply))
    }

    async fn del(&self, req: Request<v1::CniRequest>) -> Result<Response<v1::DelReply>, Status> {
        let span = operation("DEL", &req);
        let start = Instant::now();
        let r = req.into_inner();
        let result = match self.agent(false).await {
            Some(agent) => detached(async move { agent.del(&r).await }.instrument(span)).await?,
            None => {
                let starting = Arc::clone(&self.starting);
                let early = {
                    let r = r.clone();
                    detached(async move { starting.del(&r).await }.instrument(span.clone())).await?
                };
                match early {
                    Some(result) => result,
                    // Handed over meanwhile: the agent serves it.
                    None => match self.agent(true).await {
                        Some(agent) => detached(async move { agent.del(&r).await }.instrument(span)).await?,
                        None => Err(not_started(false)),
                    },
                }
            }
        };
        let error = result.err().map(|e| e.to_proto());
        self.metrics.observe_cni("DEL", code(error.as_ref()), start.elapsed());
        Ok(Response::new(v1::DelReply { error }))
    }

    async fn check(&self, req: Request<v1::CniRequest>) -> Result<Response<v1::CheckReply>, Status> {
        let start = Instant::now();
        let error = match self.agent(true).await {
            Some(agent) => agent.check(req.get_ref()).await.err(),
            None => Some(not_started(false)),
        };
        let error = error.map(|e| e.to_proto());
        self.metrics.observe_cni("CHECK", code(error.as_ref()), start.elapsed());
        Ok(Response::new(v1::CheckReply { error }))
    }

    async fn status(&self, _req: Request<v1::StatusRequest>) -> Result<Response<v1::StatusReply>, Status> {
        let start = Instant::now();
        let error = match self.agent(false).await {
            Some(agent) => agent.cni_status().await.err(),
            None => Some(not_started(true)),
        };
        let error = error.map(|e| e.to_proto());
        self.metrics.observe_cni("STATUS", code(error.as_ref()), start.elapsed());
        Ok(Response::new(v1::StatusReply { error }))
    }

    async fn gc(&self, req: Request<v1::GcRequest>) -> Result<Response<v1::GcReply>, Status> {
        let start = Instant::now();
        let r = req.into_inner();
        let removed = match self.agent(true).await {
            Some(agent) => detached(async move { agent.gc(&r).await }).await?,
            None => Err(not_started(false)),
        };
        let reply = match removed {
            Ok(removed) => v1::GcReply { error: None, removed },
            Err(e) => v1::GcReply { error: Some(e.to_proto()), removed: 0 },
        };
        self.metrics.observe_cni("GC", code(reply.error.as_ref()), start.elapsed());
        Ok(Response::new(reply))
    }
}

/// Runs a request's work to its end even if its caller goes away: the server drops a
/// handler whose client reset the stream (the plugin's timeout, or the runtime killing the
/// plugin), and an ADD cancelled between reserving an address and recording the attachment
/// would leave both the address and the host veth to no one (a later DEL finds no record).
/// Finished, the attachment is recorded and the runtime's DEL undoes it.
async fn detached<T: Send + 'static>(work: impl std::future::Future<Output = T> + Send + 'static) -> Result<T, Status> {
    tokio::spawn(work).await.map_err(|e| Status::internal(format!("the request's task failed: {e}")))
}

/// Binds the socket (replacing a stale one) and restricts it to its owner.
pub fn bind(socket: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", socket.display())),
    }
    // Create the socket with no permissions for group/other from the first moment.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let listener = tokio::net::UnixListener::bind(socket);
    nix::sys::stat::umask(old_umask);
    let listener = listener.with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    log::info!("serving CNI on {}", socket.display());
    Ok(listener)
}

/// Serves CNI on `listener` (from [`bind`] on `socket`) until `shutdown` resolves:
/// [`Starting`] until `agent` names the agent, the agent from then on.
pub async fn serve(
    listener: tokio::net::UnixListener,
    socket: &Path,
    agent: tokio::sync::watch::Receiver<Option<Arc<Agent>>>,
    starting: Arc<Starting>,
    metrics: Arc<AgentMetrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    tonic::transport::Server::builder()
        .add_service(CniServer::new(CniService { agent, starting, metrics }))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
        .context("CNI server")?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::Duration,
    };

    use super::*;

    /// A request whose caller goes away half-way still finishes its work.
    #[tokio::test]
    async fn a_request_dropped_by_its_caller_runs_to_its_end() {
        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        let call = detached(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            d.store(true, Ordering::SeqCst);
        });
        // The caller gives up after 10 ms: its future is dropped, as tonic drops a handler.
        assert!(tokio::time::timeout(Duration::from_millis(10), call).await.is_err());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(done.load(Ordering::SeqCst), "the work ran to its end");
    }
}
