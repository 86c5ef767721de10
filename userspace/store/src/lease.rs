//! Keeping a lease alive in the background.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::{LeaseId, Store, StoreError};

/// Refreshes `lease` every `interval` until the returned handle is aborted or dropped with
/// the task, or the lease is gone. The task ends with the error that stopped it:
/// [`StoreError::LeaseNotFound`] when the lease expired (the owner must register anew).
/// Transport errors are retried (the lease survives as long as its TTL allows).
pub fn spawn_keep_alive(store: Arc<dyn Store>, lease: LeaseId, interval: Duration) -> JoinHandle<StoreError> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            match store.lease_keep_alive(lease).await {
                Ok(_) => {}
                Err(e @ StoreError::LeaseNotFound(_)) => return e,
                Err(StoreError::Closed) => return StoreError::Closed,
                Err(e) => log::warn!("keep-alive of lease {lease:x} failed, retrying: {e}"),
            }
        }
    })
}
