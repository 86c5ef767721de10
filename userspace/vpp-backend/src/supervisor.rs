//! Keeps VPP converged while the agent runs: reconciles whenever the desired state
//! changes, every `resync_interval`, and after every reconnect. When VPP restarts (the
//! socket is lost) it reconnects with backoff and replays everything; the eBPF side is not
//! touched.

use std::time::Duration;

use contiv_vpp_binapi::Client;
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    desired::VppDesired,
    reconcile::{ReconcileReport, Reconciler},
};

/// Timing of the supervisor.
#[derive(Clone, Debug)]
pub struct SupervisorOptions {
    /// Full resync period (catches changes made to VPP behind the agent's back).
    pub resync_interval: Duration,
    /// First reconnect delay; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(30),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// What the supervisor last did, for the agent's status endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VppStatus {
    /// Connected to VPP now.
    pub connected: bool,
    /// Connections made so far (a VPP restart makes it grow).
    pub generation: u64,
    /// Passes completed.
    pub passes: u64,
    /// The last completed pass.
    pub last: Option<ReconcileReport>,
    /// The last error (connection or dump), if the last attempt failed.
    pub last_error: Option<String>,
}

/// The running supervisor. Dropping it stops it.
pub struct VppSupervisor {
    status: watch::Receiver<VppStatus>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl VppSupervisor {
    /// Starts converging VPP (through `client`, connected or not) to `desired`.
    pub fn spawn(client: Client, desired: watch::Receiver<VppDesired>, opts: SupervisorOptions) -> Self {
        let (status_tx, status) = watch::channel(VppStatus::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(Reconciler::new(client), desired, opts, status_tx, stop_rx));
        Self { status, stop, task: Some(task) }
    }

    /// Watches the status.
    pub fn status(&self) -> watch::Receiver<VppStatus> {
        self.status.clone()
    }

    /// Stops and waits for the current pass to end.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for VppSupervisor {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn run(
    rec: Reconciler,
    mut desired: watch::Receiver<VppDesired>,
    opts: SupervisorOptions,
    status: watch::Sender<VppStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let client = rec.client().clone();
    let mut backoff = opts.min_backoff;
    loop {
        if *stop.borrow() {
            return;
        }
        if !client.is_connected() {
            status.send_modify(|s| s.connected = false);
            match client.reconnect().await {
                Ok(()) => {
                    backoff = opts.min_backoff;
                    let generation = client.state().generation;
                    log::info!("VPP connection {generation}: replaying the desired state");
                    status.send_modify(|s| {
                        s.connected = true;
                        s.generation = generation;
                    });
                }
                Err(e) => {
                    status.send_modify(|s| s.last_error = Some(e.to_string()));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(opts.max_backoff);
                    continue;
                }
            }
        }
        let want = desired.borrow_and_update().clone();
        match rec.reconcile(&want).await {
            Ok(report) => {
                if !report.applied.is_empty() || !report.failed.is_empty() {
                    log::info!("VPP: {} changes applied, {} refused", report.applied.len(), report.failed.len());
                }
                status.send_modify(|s| {
                    s.passes += 1;
                    s.last = Some(report);
                    s.last_error = None;
                });
            }
            Err(e) => {
                log::warn!("VPP reconcile: {e}");
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                if e.is_connection() {
                    continue;
                }
            }
        }
        tokio::select! {
            r = desired.changed() => if r.is_err() { return },
            _ = client.disconnected() => {}
            _ = tokio::time::sleep(opts.resync_interval) => {}
            _ = stop.changed() => return,
        }
    }
}
