//! How fast the node's service proxy follows the cluster, as kube-proxy reports it.
//!
//! - `contiv_network_programming_duration_seconds`: Kubernetes' network programming
//!   latency SLI. It is kube-proxy's `network_programming_duration_seconds`. Each
//!   EndpointSlice the EndpointSlice controller writes carries the time of the pod or
//!   service change it reflects (annotation `endpoints.kubernetes.io/last-change-trigger-time`).
//!   One sample per slice change is taken when the apply that includes it succeeds (a
//!   rewrite that keeps the time is not sampled again: crate::cluster). A failed
//!   apply keeps the change's time until a later one succeeds. Times from before the agent
//!   started are not counted (kube-proxy skips them too): such a change was programmed by
//!   the agent's first full apply, whose wait says nothing about this proxy's latency.
//! - `contiv_service_sync_duration_seconds`: how long one sync of the service plan took,
//!   from taking the queued changes to the maps holding them (kube-proxy's
//!   `sync_proxy_rules_duration_seconds`).
//! - `contiv_service_sync_failures_total`: applies that failed and were retried.
//!
//! The trigger time comes from the controller's clock and the sample is taken on the node's
//! clock. Skew between them shows up in the samples; a sample that would be negative counts
//! as zero.

use std::time::{Duration, SystemTime};

use prometheus_client::metrics::{
    counter::Counter,
    histogram::{Histogram, exponential_buckets},
};
use prometheus_client::registry::{Registry, Unit};

/// The proxy's programming metrics; the agent owns one.
#[derive(Debug)]
pub struct ProgrammingMetrics {
    since: SystemTime,
    network_programming: Histogram,
    sync_duration: Histogram,
    sync_failures: Counter,
}

impl ProgrammingMetrics {
    /// Metrics of a proxy that started at `since`.
    pub fn new(since: SystemTime) -> Self {
        Self {
            since,
            // 1 ms .. ~131 s: a sync of one slice takes milliseconds; a proxy that fell behind
            // minutes.
            network_programming: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            // 100 us .. ~13 s: one changed slice up to a full plan of 10,000 services.
            sync_duration: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            sync_failures: Counter::default(),
        }
    }

    /// An apply succeeded at `now` with the changes that happened at `triggers`. Returns
    /// how many samples were taken.
    pub fn programmed(&self, triggers: &[SystemTime], now: SystemTime) -> usize {
        let mut n = 0;
        for t in triggers.iter().filter(|t| **t > self.since) {
            let took = now.duration_since(*t).unwrap_or(Duration::ZERO);
            self.network_programming.observe(took.as_secs_f64());
            n += 1;
        }
        n
    }

    /// One sync took `took` (successful or not).
    pub fn synced(&self, took: Duration) {
        self.sync_duration.observe(took.as_secs_f64());
    }

    /// An apply failed (it is retried).
    pub fn failed(&self) {
        self.sync_failures.inc();
    }

    /// Adds the metrics to a scrape's registry (they share their values with this one).
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "contiv_network_programming_duration",
            "From the change an EndpointSlice reflects (its last-change-trigger-time) to the node's maps holding it",
            Unit::Seconds,
            self.network_programming.clone(),
        );
        registry.register_with_unit(
            "contiv_service_sync_duration",
            "One sync of the service plan: from taking the queued changes to the maps holding them",
            Unit::Seconds,
            self.sync_duration.clone(),
        );
        registry.register(
            "contiv_service_sync_failures",
            "Service syncs whose apply failed (retried within a second)",
            self.sync_failures.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &ProgrammingMetrics) -> String {
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn samples_changes_made_after_the_start_and_never_below_zero() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_317_200);
        let m = ProgrammingMetrics::new(start);
        let now = start + Duration::from_secs(10);
        let triggers = [
            start - Duration::from_secs(5),       // before the start: not counted
            now - Duration::from_millis(1500),    // 1.5 s
            now + Duration::from_secs(1),         // a clock ahead of ours: 0
            start + Duration::from_millis(9_750), // 0.25 s
        ];
        assert_eq!(m.programmed(&triggers, now), 3);
        m.synced(Duration::from_millis(3));
        m.failed();
        let t = text(&m);
        let lines: Vec<&str> = t.lines().collect();
        for want in [
            "contiv_network_programming_duration_seconds_count 3",
            "contiv_network_programming_duration_seconds_sum 1.75",
            "contiv_network_programming_duration_seconds_bucket{le=\"0.001\"} 1",
            "contiv_network_programming_duration_seconds_bucket{le=\"2.048\"} 3",
            "contiv_service_sync_duration_seconds_count 1",
            "contiv_service_sync_failures_total 1",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{t}");
        }
    }
}
