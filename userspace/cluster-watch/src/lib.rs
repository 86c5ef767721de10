//! The agent side of the store: [`ClusterWatch`] lists and watches the cluster model in the
//! store (`/contiv/k8s/...` objects and `/contiv/nodes/...` registrations), keeps it in memory
//! ([`ClusterModel`]) and hands every change to a [`ClusterConsumer`] (the dataplane).
//!
//! - Start: one consistent list at revision `r`, then [`ClusterEvent::Resync`] with the full
//!   model, then a watch from `r + 1`: nothing is missed, nothing repeated. The list may be
//!   taken ahead with [`ClusterWatch::prime`] while the process does other start-up work.
//! - Changes: [`ClusterEvent::Added`] / [`Updated`](ClusterEvent::Updated) /
//!   [`Deleted`](ClusterEvent::Deleted), applied to the model before the consumer sees them;
//!   writes that leave an object unchanged emit nothing.
//! - Store reconnect (the store's watch resumed without loss): `Resync(Reconnected)` so the
//!   consumer can re-check its state against the model.
//! - History compacted, the store wiped/restored, or the watch failed: list again, replace
//!   the model, `Resync(Compacted | StoreReset | WatchFailed)`.
//! - A value that does not decode is logged with its key and skipped; the object keeps its
//!   last good value (or stays absent); the key shows in [`ClusterModel::malformed_keys`].

pub mod model;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use contiv_cluster_model::keys;
use contiv_store::{EventKind, Revision, Store, StoreError, WatchEvent, WatchMessage};
use futures::StreamExt;

pub use model::{ClusterModel, Object, ObjectKind, SkipReason, decode_entry};

/// Why the consumer gets a full resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The watch just started.
    Start,
    /// The store connection broke and the watch resumed (no change was lost).
    Reconnected,
    /// The watch's history was compacted; the model was listed again.
    Compacted,
    /// The store lost its data (wiped or restored from a backup); the model was listed again.
    StoreReset,
    /// The watch failed otherwise; the model was listed again.
    WatchFailed,
    /// contiv-ksr's marker appeared or went ([`ClusterModel::ksr_marker`]): whether the
    /// model is the cluster's changed, though no object did.
    KsrMarker,
}

/// A change of the model, as handed to the consumer.
// Events are short-lived and handed out by reference; boxing the objects would cost an
// allocation per change for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// The whole model may have changed: reconcile against it.
    Resync(ResyncReason),
    Added {
        key: String,
        object: Object,
    },
    Updated {
        key: String,
        old: Object,
        new: Object,
    },
    Deleted {
        key: String,
        object: Object,
    },
}

/// Receives the model's changes. Called from the watch task with the model already updated.
pub trait ClusterConsumer: Send {
    fn on_event(&mut self, model: &ClusterModel, event: &ClusterEvent);
}

impl<F: FnMut(&ClusterModel, &ClusterEvent) + Send> ClusterConsumer for F {
    fn on_event(&mut self, model: &ClusterModel, event: &ClusterEvent) {
        self(model, event)
    }
}

/// Counters of a running watch.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Full resyncs delivered (including the first).
    pub resyncs: AtomicU64,
    /// Full lists of the store.
    pub lists: AtomicU64,
    /// Store events applied.
    pub events: AtomicU64,
    /// Values skipped as malformed.
    pub malformed: AtomicU64,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Watches the cluster model in a store (see the crate docs).
pub struct ClusterWatch {
    store: Arc<dyn Store>,
    prefix: String,
    model: Arc<RwLock<ClusterModel>>,
    stats: Arc<WatchStats>,
    /// The revision [`prime`](Self::prime) listed the model at, until the first session
    /// starts from it.
    primed: Mutex<Option<Revision>>,
}

impl ClusterWatch {
    /// A watch of everything under `/contiv/` that the model holds.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            prefix: keys::ROOT.to_string(),
            model: Arc::default(),
            stats: Arc::default(),
            primed: Mutex::new(None),
        }
    }

    /// Lists the store into the model now, ahead of [`run`](Self::run), which then starts
    /// from this list (its `Resync(Start)`, then a watch from the list's revision + 1)
    /// instead of listing again: changes written in between come as events, and a revision
    /// compacted meanwhile lists again, as in any session. Returns the objects listed. A
    /// failed list changes nothing: `run` lists as usual.
    pub async fn prime(&self) -> Result<usize, StoreError> {
        let revision = self.list_into_model().await?;
        *self.primed.lock().unwrap_or_else(|p| p.into_inner()) = Some(revision);
        Ok(self.read().len())
    }

    /// The model, shared (read it; only this watch writes it: `prime`, then `run`).
    pub fn model(&self) -> Arc<RwLock<ClusterModel>> {
        self.model.clone()
    }

    /// The counters.
    pub fn stats(&self) -> Arc<WatchStats> {
        self.stats.clone()
    }

    fn read(&self) -> RwLockReadGuard<'_, ClusterModel> {
        self.model.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs until `shutdown` completes; store failures are retried with backoff forever.
    pub async fn run<C: ClusterConsumer>(&self, consumer: &mut C, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            () = self.run_forever(consumer) => {}
            () = shutdown => {}
        }
    }

    async fn run_forever<C: ClusterConsumer>(&self, consumer: &mut C) {
        let mut reason = ResyncReason::Start;
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.session(consumer, reason).await {
                Ok(next) => {
                    reason = next;
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    log::warn!("cluster watch: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    reason = ResyncReason::WatchFailed;
                }
            }
        }
    }

    /// Lists, resyncs, watches until the watch ends; returns why the next resync happens.
    async fn session<C: ClusterConsumer>(
        &self,
        consumer: &mut C,
        reason: ResyncReason,
    ) -> Result<ResyncReason, StoreError> {
        let primed = self.primed.lock().unwrap_or_else(|p| p.into_inner()).take();
        let revision = match primed {
            Some(revision) => revision,
            None => self.list_into_model().await?,
        };
        self.resync(consumer, reason);
        let mut stream = self.store.watch(&self.prefix, revision + 1).await?;
        while let Some(item) = stream.next().await {
            match item {
                Ok(WatchMessage::Events(events)) => self.apply(consumer, events),
                Ok(WatchMessage::Reconnected { resumed_from }) => {
                    log::info!("cluster watch: store reconnected, resumed at revision {resumed_from}");
                    self.resync(consumer, ResyncReason::Reconnected);
                }
                Err(StoreError::Compacted { requested, compacted }) => {
                    log::warn!("cluster watch: revision {requested} compacted (now {compacted}); listing again");
                    return Ok(ResyncReason::Compacted);
                }
                Err(e @ StoreError::Rewound { .. }) => {
                    log::warn!("cluster watch: {e}");
                    return Ok(ResyncReason::StoreReset);
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Unavailable("watch stream ended".into()))
    }

    /// Lists the store and replaces the model with what it holds; returns the list's revision.
    async fn list_into_model(&self) -> Result<Revision, StoreError> {
        let list = self.store.list(&self.prefix).await?;
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let mut fresh = ClusterModel::default();
        fresh.set_revision(list.revision);
        let mut malformed = Vec::new();
        for kv in list.kvs {
            if kv.key == keys::KSR_MARKER {
                fresh.set_ksr_marker(true);
                continue;
            }
            match decode_entry(&kv.key, &kv.value) {
                Ok(Some(object)) => {
                    fresh.insert(kv.key, object);
                }
                Ok(None) => {}
                Err(e) => {
                    log::warn!("skipping malformed value at {}: {e}", kv.key);
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    malformed.push(kv.key);
                }
            }
        }
        let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
        // A key still in the store but unreadable keeps its last good value, as it does when
        // the bad value arrives by watch: dropping it would, for a policy, open what it closed.
        for key in malformed {
            if let Some(last_good) = model.get(&key) {
                fresh.insert(key.clone(), last_good.clone());
            }
            fresh.mark_malformed(key);
        }
        let revision = fresh.revision();
        *model = fresh;
        Ok(revision)
    }

    fn resync<C: ClusterConsumer>(&self, consumer: &mut C, reason: ResyncReason) {
        self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
        let model = self.read();
        consumer.on_event(&model, &ClusterEvent::Resync(reason));
    }

    /// Applies one batch (one or more revisions) to the model, then tells the consumer.
    fn apply<C: ClusterConsumer>(&self, consumer: &mut C, events: Vec<WatchEvent>) {
        let mut out = Vec::with_capacity(events.len());
        let marker_changed;
        {
            let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
            let marker_before = model.ksr_marker();
            for ev in events {
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                model.set_revision(ev.kv.mod_revision);
                let key = ev.kv.key;
                if key == keys::KSR_MARKER {
                    model.set_ksr_marker(ev.kind == EventKind::Put);
                    continue;
                }
                match ev.kind {
                    EventKind::Delete => {
                        if let Some(object) = model.remove(&key) {
                            out.push(ClusterEvent::Deleted { key, object });
                        }
                    }
                    EventKind::Put => match decode_entry(&key, &ev.kv.value) {
                        Ok(Some(new)) => match model.insert(key.clone(), new.clone()) {
                            None => out.push(ClusterEvent::Added { key, object: new }),
                            Some(old) if old != new => out.push(ClusterEvent::Updated { key, old, new }),
                            Some(_) => {}
                        },
                        Ok(None) => {}
                        Err(e) => {
                            log::warn!("skipping malformed value at {key} (revision {}): {e}", ev.kv.mod_revision);
                            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                            model.mark_malformed(key);
                        }
                    },
                }
            }
            marker_changed = model.ksr_marker() != marker_before;
        }
        let model = self.read();
        for event in &out {
            consumer.on_event(&model, event);
        }
        if marker_changed {
            drop(model);
            self.resync(consumer, ResyncReason::KsrMarker);
        }
    }
}
