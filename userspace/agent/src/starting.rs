//! The CNI socket while the agent starts: bound before the agent joins the cluster store
//! (and, in VPP mode, before VPP's bootstrap), so that a runtime tearing pods down is not
//! held up by a store it does not need.
//!
//! - **DEL** is served from the node's own records: the pod's host interface is deleted and
//!   its record removed (the spec: DEL completes "to the fullest extent possible"). What it
//!   leaves (map entries, pinned links) is what the agent's start-up resync removes for
//!   every attachment it has no record of.
//! - **ADD, CHECK and GC** wait for the agent, then say "try again later" (11).
//! - **STATUS** says "not available" (50) at once.
//!
//! [`Starting::close`] hands over: the records are closed before the agent opens them, and
//! a DEL arriving after that waits for the agent like the others.

use std::time::Duration;

use contiv_cni_api::{CniError, v1};
use tokio::sync::Mutex;

use crate::{
    config::AgentConfig,
    podnet,
    state::{AttachmentKey, NodeState},
};

/// How long a request waits for the agent before "try again later" (contiv-cni's own
/// request timeout is 60 s).
pub const AGENT_WAIT: Duration = Duration::from_secs(20);

/// The CNI before the agent runs.
pub struct Starting {
    config: AgentConfig,
    /// The node's records, opened by the first DEL; `Err(())` once handed over.
    state: Mutex<Result<Option<NodeState>, ()>>,
}

impl Starting {
    pub fn new(config: AgentConfig) -> Self {
        Self { config, state: Mutex::new(Ok(None)) }
    }

    /// Closes the records for the agent (which opens them itself). DELs from now on wait
    /// for the agent.
    pub async fn close(&self) {
        *self.state.lock().await = Err(());
    }

    /// DEL from the records, or `None` once they were handed over (the agent serves it).
    pub async fn del(&self, req: &v1::CniRequest) -> Option<Result<(), CniError>> {
        let mut guard = self.state.lock().await;
        let slot = guard.as_mut().ok()?;
        Some(self.del_recorded(slot, req).await)
    }

    async fn del_recorded(&self, slot: &mut Option<NodeState>, req: &v1::CniRequest) -> Result<(), CniError> {
        let io = |what: &str, e: &dyn std::fmt::Display| CniError::io_failure(what, e.to_string());
        if slot.is_none()
            && let Some(subnet) = crate::state::subnet_in_use(&self.config.state_dir)
        {
            // The records' own subnet: a DEL allocates nothing.
            let config =
                self.config.clone().with_allocated_subnet(subnet).map_err(|e| io("reading the node's records", &e))?;
            let state = NodeState::open(&config.state_dir, config.pod_subnet, config.gateway)
                .map_err(|e| io("opening the node's records", &e))?;
            *slot = Some(state);
        }
        let key = AttachmentKey::new(&req.container_id, &req.ifname);
        let recorded = slot.as_ref().and_then(|s| s.get(&key)).map(|a| a.host_ifname.clone());
        // The host end has the attachment's own name whether or not it was recorded (an
        // ADD cut short leaves it unrecorded).
        let name = recorded.unwrap_or_else(|| podnet::host_ifname(&req.container_id, &req.ifname));
        podnet::delete_link_off_runtime(&name)
            .await
            .map_err(|e| CniError::internal("deleting the pod interface", e.to_string()))?;
        if let Some(state) = slot.as_mut() {
            state.remove(&key).map_err(|e| io("persisting the release", &e))?;
        }
        log::info!("DEL {}/{} while starting: {name} deleted, record released", req.container_id, req.ifname);
        Ok(())
    }
}

/// The answer to ADD, CHECK or GC while the agent is not there after [`AGENT_WAIT`]:
/// try again later (11); to STATUS, at once: not available (50).
pub fn not_started(status: bool) -> CniError {
    let (msg, details) = (
        "the agent is starting",
        "it has not joined the cluster store yet (or VPP is not up); only DEL is served until it has",
    );
    match status {
        true => CniError::not_available(msg, details),
        false => CniError::try_again_later(msg, details),
    }
}
