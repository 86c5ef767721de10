//! Leader election on a `coordination.k8s.io/v1` Lease, so several KSR replicas are safe:
//! only the leader reflects (writes the store); the others stand by and take over once
//! the leader stops renewing.
//!
//! The protocol is client-go's (`leaderelection` with a Lease lock), kept small:
//! - every `retry_period` a candidate reads the Lease. If it does not exist, it creates
//!   one naming itself. If another holder's record has not changed for `lease_duration`
//!   (timed on this replica's own clock from when it saw the record change, so clock skew
//!   between nodes does not matter), it takes the Lease over. Every write is an update
//!   carrying the `resourceVersion` it read: of two candidates racing, the API server
//!   accepts one and answers the other `409 Conflict`.
//! - the leader renews every `retry_period`. If it could not renew for `renew_deadline`
//!   (shorter than `lease_duration`), it steps down and stops writing *before* any
//!   candidate can consider the Lease expired.
//! - on shutdown the leader releases the Lease (empty holder), so a standby replica takes
//!   over at its next retry instead of after `lease_duration`.

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

/// The Lease's name unless configured otherwise (the deploy manifests' Role names it).
pub const DEFAULT_LEASE_NAME: &str = "contiv-ksr";

/// Where the Lease lives and how long it lasts.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// Namespace of the Lease (KSR's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its Pod name).
    pub identity: String,
    /// How long a holder's record is trusted without a renewal.
    pub lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// Time between attempts (candidates) and renewals (leader).
    pub retry_period: Duration,
    /// How long a leader keeps leading while every store operation fails: then it releases
    /// the Lease, so that a replica that can reach the store takes over, and stands aside
    /// for one lease duration before it competes again.
    pub store_deadline: Duration,
}

impl ElectionConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            store_deadline: Duration::from_secs(60),
        }
    }

    /// The durations must nest: retry < renew deadline < lease duration; names non-empty.
    pub fn validate(&self) -> Result<(), String> {
        if self.namespace.is_empty() || self.name.is_empty() || self.identity.is_empty() {
            return Err("leader election needs a namespace, a lease name and an identity".into());
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(format!(
                "lease duration ({:?}) must be longer than the renew deadline ({:?})",
                self.lease_duration, self.renew_deadline
            ));
        }
        if self.renew_deadline <= self.retry_period {
            return Err(format!(
                "renew deadline ({:?}) must be longer than the retry period ({:?})",
                self.renew_deadline, self.retry_period
            ));
        }
        Ok(())
    }
}

/// The outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease (acquired or renewed).
    Leading,
    /// Someone else does (their identity; empty when unknown).
    Following(String),
}

/// What a Lease record says, to notice when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: String,
    renew_time: Option<String>,
    transitions: i32,
    resource_version: Option<String>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.unwrap_or_default(),
            renew_time: spec.renew_time.map(|t| t.0.to_string()),
            transitions: spec.lease_transitions.unwrap_or(0),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// Runs the Lease protocol for one replica.
pub struct LeaderElector {
    api: Api<Lease>,
    config: ElectionConfig,
    /// The last record seen and when (on our clock) it was first seen.
    observed: Option<(Record, Instant)>,
    /// While leading: the renew deadline counted from when the last successful renewal (or
    /// the acquisition) was *sent*. Others take over `lease_duration` after they saw that
    /// renewal, which they cannot have seen before it was sent, so writes stopped by then
    /// never overlap with the next leader's (the margin is `lease_duration - renew_deadline`).
    valid_until: Option<Instant>,
}

fn now() -> MicroTime {
    let micros = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(micros).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    /// An elector for `config` over `client`.
    pub fn new(client: kube::Client, config: ElectionConfig) -> Self {
        let api = Api::namespaced(client, &config.namespace);
        Self { api, config, observed: None, valid_until: None }
    }

    /// The configuration.
    pub fn config(&self) -> &ElectionConfig {
        &self.config
    }

    /// The Lease records whole seconds: round up, so others never wait less than we mean.
    fn lease_seconds(&self) -> i32 {
        (self.config.lease_duration.as_millis().div_ceil(1000)).clamp(1, i32::MAX as u128) as i32
    }

    fn observe(&mut self, lease: &Lease) -> Instant {
        let record = Record::of(lease);
        match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record, at));
                at
            }
        }
    }

    /// One round: create, take over or renew the Lease if we may.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let me = self.config.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(Attempt::Leading)
                }
                Err(e) if is_conflict(&e) => Ok(Attempt::Following(String::new())),
                Err(e) => Err(e),
            };
        };
        let seen_at = self.observe(&lease);
        let mut spec = lease.spec.take().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let their_duration = Duration::from_secs(
            spec.lease_duration_seconds.map_or(self.config.lease_duration.as_secs(), |s| s.max(1) as u64),
        );
        if !holder.is_empty() && holder != me && seen_at.elapsed() < their_duration {
            return Ok(Attempt::Following(holder));
        }
        if holder != me {
            if !holder.is_empty() {
                log::info!(
                    "lease {}/{}: {holder} stopped renewing; taking over",
                    self.config.namespace,
                    self.config.name
                );
            }
            spec.holder_identity = Some(me);
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now());
        spec.lease_duration_seconds = Some(self.lease_seconds());
        lease.spec = Some(spec);
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(updated) => {
                self.observe(&updated);
                Ok(Attempt::Leading)
            }
            Err(e) if is_conflict(&e) => Ok(Attempt::Following(holder)),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if we hold it: empty holder, so a standby takes over at once.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else { return Ok(()) };
        let mut spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        lease.spec = Some(spec);
        self.api.replace(&self.config.name, &PostParams::default(), &lease).await?;
        log::info!("released lease {}/{}", self.config.namespace, self.config.name);
        Ok(())
    }

    /// While leading, until when the last renewal lets this replica write.
    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until
    }

    /// Waits until this replica leads (or `stop` resolves first: `false`). Reports each
    /// round that did not make us leader through `on_round`: the holder, or the error.
    pub async fn acquire(
        &mut self,
        mut on_round: impl FnMut(Result<&str, &kube::Error>),
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        loop {
            let sent = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => {
                    self.valid_until = Some(sent + self.config.renew_deadline);
                    return true;
                }
                Ok(Attempt::Following(holder)) => on_round(Ok(&holder)),
                Err(e) => {
                    log::warn!("lease {}/{}: {e}", self.config.namespace, self.config.name);
                    on_round(Err(&e));
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.retry_period) => {}
                () = &mut *stop => return false,
            }
        }
    }

    /// Renews every `retry_period` while leading; returns `true` when leadership was lost
    /// (renewals failed for `renew_deadline`, or someone else holds the Lease), `false` when
    /// `stop` resolved. The Lease is not released here: the caller stops writing first,
    /// then calls [`LeaderElector::release`].
    /// `on_renewed` gets each new [`LeaderElector::valid_until`] (what the writer fences on).
    pub async fn hold(
        &mut self,
        stop: &mut (impl Future<Output = ()> + Unpin),
        mut on_renewed: impl FnMut(Instant),
    ) -> bool {
        // Counted from when the renewal was sent, not answered: a slow answer must not
        // stretch our term past what the other replicas grant it.
        let mut last_renew = self.valid_until.map_or_else(Instant::now, |until| until - self.config.renew_deadline);
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.config.retry_period) => {}
                () = &mut *stop => return false,
            }
            let left = self.config.renew_deadline.saturating_sub(last_renew.elapsed());
            let sent = Instant::now();
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Leading)) => {
                    last_renew = sent;
                    self.valid_until = Some(sent + self.config.renew_deadline);
                    on_renewed(sent + self.config.renew_deadline);
                }
                Ok(Ok(Attempt::Following(holder))) => {
                    log::warn!("lease {}/{} is held by {holder:?} now", self.config.namespace, self.config.name);
                    return true;
                }
                Ok(Err(e)) => log::warn!("renewing lease {}/{}: {e}", self.config.namespace, self.config.name),
                Err(_) => {
                    log::warn!("renewing lease {}/{}: no answer in time", self.config.namespace, self.config.name)
                }
            }
            if last_renew.elapsed() >= self.config.renew_deadline {
                log::warn!(
                    "lease {}/{}: not renewed for {:?}; stepping down",
                    self.config.namespace,
                    self.config.name,
                    self.config.renew_deadline
                );
                return true;
            }
        }
    }
}
