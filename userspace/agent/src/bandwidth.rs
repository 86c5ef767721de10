//! Pod bandwidth limits: the CNI `bandwidth` capability (what a runtime under kubelet passes
//! for a pod's `kubernetes.io/ingress-bandwidth` / `egress-bandwidth` annotations).
//!
//! Shaping is done by `tbf` qdiscs placed where the eBPF fast path cannot skip them:
//! - egress (what the pod sends): on the pod's own interface, so the pod's TCP stack is held
//!   back by the queue (TCP small queues) rather than by drops, whatever path the packet
//!   takes next;
//! - ingress (what the pod receives): on the pod's host veth; the fast path hands packets for
//!   such a pod to that veth's egress instead of straight into the pod.
//!
//! Production eBPF datapaths pace with EDT and `fq`; the kernels this project runs on here
//! have neither `fq` nor `etf` (CONFIG_NET_SCH_FQ/ETF unset) but do have `tbf`, which every
//! kernel CNI plugins run on has. Rates are bits per second and bursts bits, as in the CNI
//! bandwidth plugin's conventions. The burst is honoured up to [`MAX_BURST`] of time at the
//! rate, because runtimes commonly pass a "no limit" burst (2^31 bits) that would otherwise
//! let hundreds of megabytes through unshaped.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest burst honoured, as time at the rate.
pub const MAX_BURST: Duration = Duration::from_millis(100);
/// The smallest burst, in full-size frames of the pod's MTU: tbf drops a frame larger than
/// its burst (and a GSO packet whose segments are), so a jumbo-frame pod with a small limit
/// would send nothing full-size at all.
const MIN_BURST_FRAMES: u64 = 4;
/// The link header a frame adds to the MTU.
const ETH_HLEN: u64 = 14;
/// How long the queue behind a limit may be, as time at the rate (the bandwidth plugin's
/// latency knob); the queue also holds one burst and one GSO super-packet.
const QUEUE_LATENCY: Duration = Duration::from_millis(50);

/// A pod's limits as the runtime gave them (bits/s and bits; 0 = no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthLimits {
    #[serde(default)]
    pub ingress_rate: u64,
    #[serde(default)]
    pub ingress_burst: u64,
    #[serde(default)]
    pub egress_rate: u64,
    #[serde(default)]
    pub egress_burst: u64,
}

/// One `tbf` qdisc's parameters, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shaper {
    pub rate_bytes_per_sec: u64,
    pub burst_bytes: u32,
    pub limit_bytes: u32,
}

impl BandwidthLimits {
    /// Limits from a network config: `runtimeConfig.bandwidth` (the capability), else the
    /// same keys at the top level (a static per-network limit). `None` when there are none.
    /// A null is absent, as elsewhere in a network config.
    pub fn from_network_config(conf: &serde_json::Value) -> Result<Option<Self>, String> {
        let source = conf
            .get("runtimeConfig")
            .and_then(|rc| rc.get("bandwidth"))
            .filter(|b| !b.is_null())
            .map(|b| ("runtimeConfig.bandwidth", b.clone()))
            .or_else(|| {
                let keys = ["ingressRate", "ingressBurst", "egressRate", "egressBurst"];
                let obj: serde_json::Map<String, serde_json::Value> = keys
                    .iter()
                    .filter_map(|k| conf.get(*k).filter(|v| !v.is_null()).map(|v| ((*k).to_owned(), v.clone())))
                    .collect();
                (!obj.is_empty()).then_some(("ingressRate/egressRate", serde_json::Value::Object(obj)))
            });
        let Some((field, value)) = source else {
            return Ok(None);
        };
        let value = canonical_keys(value);
        let limits: Self = serde_json::from_value(value)
            .map_err(|e| format!("{field}: {e} (rates in bits/s and bursts in bits, non-negative integers)"))?;
        for (dir, rate, burst) in [
            ("ingress", limits.ingress_rate, limits.ingress_burst),
            ("egress", limits.egress_rate, limits.egress_burst),
        ] {
            if rate == 0 && burst != 0 {
                return Err(format!("{field}: {dir}Burst is set but {dir}Rate is not"));
            }
            if rate != 0 && rate < 8_000 {
                return Err(format!("{field}: {dir}Rate {rate} bit/s is below the 8000 bit/s minimum"));
            }
        }
        Ok((limits.ingress_rate != 0 || limits.egress_rate != 0).then_some(limits))
    }

    pub fn ingress_limited(&self) -> bool {
        self.ingress_rate != 0
    }

    pub fn egress_limited(&self) -> bool {
        self.egress_rate != 0
    }

    /// The shaper for what the pod receives, if limited; `mtu` is the pod interface's.
    pub fn ingress_shaper(&self, mtu: u32) -> Option<Shaper> {
        shaper(self.ingress_rate, self.ingress_burst, mtu)
    }

    /// The shaper for what the pod sends, if limited; `mtu` is the pod interface's.
    pub fn egress_shaper(&self, mtu: u32) -> Option<Shaper> {
        shaper(self.egress_rate, self.egress_burst, mtu)
    }
}

/// The bandwidth object with its keys spelled as this crate names them. containerd hands
/// the capability over as go-cni's `BandWidth` struct, which has no JSON tags, so its keys
/// arrive as `IngressRate`, `EgressBurst`...; the reference plugin reads them because Go
/// matches JSON keys regardless of case, and so does this. Where two spellings of one key
/// are given, the one spelled exactly wins.
fn canonical_keys(value: serde_json::Value) -> serde_json::Value {
    const KEYS: [&str; 4] = ["ingressRate", "ingressBurst", "egressRate", "egressBurst"];
    let serde_json::Value::Object(obj) = value else {
        return value;
    };
    let mut out = serde_json::Map::new();
    let mut exact = std::collections::BTreeSet::new();
    for (k, v) in obj {
        match KEYS.iter().find(|c| c.eq_ignore_ascii_case(&k)) {
            Some(c) if **c == k => {
                exact.insert(*c);
                out.insert(k, v);
            }
            Some(c) if !exact.contains(c) => {
                out.insert((*c).to_owned(), v);
            }
            Some(_) => {}
            None => {
                out.insert(k, v);
            }
        }
    }
    serde_json::Value::Object(out)
}

fn shaper(bits_per_sec: u64, burst_bits: u64, mtu: u32) -> Option<Shaper> {
    if bits_per_sec == 0 {
        return None;
    }
    let rate = bits_per_sec / 8;
    let at_rate = |d: Duration| (u128::from(rate) * d.as_nanos() / 1_000_000_000) as u64;
    let min_burst = MIN_BURST_FRAMES * (u64::from(mtu.max(1500)) + ETH_HLEN);
    let burst = (burst_bits / 8).min(at_rate(MAX_BURST)).max(min_burst);
    let limit = burst + at_rate(QUEUE_LATENCY) + 65_536;
    Some(Shaper {
        rate_bytes_per_sec: rate,
        burst_bytes: burst.min(u64::from(u32::MAX)) as u32,
        limit_bytes: limit.min(u64::from(u32::MAX)) as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn capability_values_become_shapers() {
        let conf = json!({"runtimeConfig": {"bandwidth": {"ingressRate": 10_000_000, "ingressBurst": 400_000,
            "egressRate": 20_000_000, "egressBurst": 1u64 << 31}}});
        let l = BandwidthLimits::from_network_config(&conf).unwrap().unwrap();
        let ing = l.ingress_shaper(1500).unwrap();
        assert_eq!(ing.rate_bytes_per_sec, 1_250_000);
        assert_eq!(ing.burst_bytes, 50_000);
        assert_eq!(ing.limit_bytes, 50_000 + 62_500 + 65_536, "burst + 50 ms at the rate + one GSO packet");
        let eg = l.egress_shaper(1500).unwrap();
        assert_eq!(eg.rate_bytes_per_sec, 2_500_000);
        assert_eq!(eg.burst_bytes, 250_000, "a 2^31-bit burst is capped at 100 ms of the rate");
    }

    #[test]
    fn top_level_keys_are_a_static_limit_and_the_capability_wins() {
        let conf = json!({"egressRate": 1_000_000, "egressBurst": 8_000});
        let l = BandwidthLimits::from_network_config(&conf).unwrap().unwrap();
        assert!(l.egress_limited() && !l.ingress_limited());
        assert_eq!(l.egress_shaper(1500).unwrap().burst_bytes, 4 * 1514, "at least a few frames");
        let conf = json!({"egressRate": 1_000_000, "runtimeConfig": {"bandwidth": {"ingressRate": 2_000_000}}});
        let l = BandwidthLimits::from_network_config(&conf).unwrap().unwrap();
        assert!(!l.egress_limited() && l.ingress_limited());
        assert_eq!(l.egress_shaper(1500), None);
    }

    /// containerd (go-cni) sends the capability as a Go struct without JSON tags.
    #[test]
    fn keys_spelled_as_containerd_sends_them_are_read() {
        let conf = json!({"runtimeConfig": {"bandwidth": {"IngressRate": 10_000_000, "IngressBurst": 4_294_967_295u64,
            "EgressRate": 0, "EgressBurst": 0}}});
        let l = BandwidthLimits::from_network_config(&conf).unwrap().expect("containerd's keys are limits");
        assert_eq!(l.ingress_shaper(1500).unwrap().rate_bytes_per_sec, 1_250_000);
        assert!(!l.egress_limited());
        // The exact spelling wins over another case of the same key, in either order.
        let both = json!({"runtimeConfig": {"bandwidth": {"EGRESSRATE": 8_000, "egressRate": 16_000}}});
        assert_eq!(BandwidthLimits::from_network_config(&both).unwrap().unwrap().egress_rate, 16_000);
        let both = json!({"runtimeConfig": {"bandwidth": {"egressRate": 16_000, "egressrate": 8_000}}});
        assert_eq!(BandwidthLimits::from_network_config(&both).unwrap().unwrap().egress_rate, 16_000);
        let err = BandwidthLimits::from_network_config(&json!({"runtimeConfig": {"bandwidth": {"IngressRate": -1}}}))
            .unwrap_err();
        assert!(err.contains("runtimeConfig.bandwidth"), "{err}");
    }

    /// tbf drops a frame larger than its burst: a slow limit on a jumbo-frame pod still
    /// lets full-size frames through.
    #[test]
    fn the_smallest_burst_holds_full_size_frames_of_the_pods_mtu() {
        let l = BandwidthLimits { egress_rate: 500_000, ..Default::default() };
        assert_eq!(l.egress_shaper(1500).unwrap().burst_bytes, 4 * 1514);
        assert_eq!(l.egress_shaper(9000).unwrap().burst_bytes, 4 * 9014);
        assert_eq!(l.egress_shaper(1280).unwrap().burst_bytes, 4 * 1514, "never under 1500-byte frames");
    }

    #[test]
    fn none_without_limits_and_errors_name_the_field() {
        assert_eq!(BandwidthLimits::from_network_config(&json!({"name": "x"})).unwrap(), None);
        assert_eq!(BandwidthLimits::from_network_config(&json!({"runtimeConfig": {"bandwidth": {}}})).unwrap(), None);
        // Null is absent: no limit, or the static one beside it.
        let null = json!({"runtimeConfig": {"bandwidth": null}, "ingressRate": null});
        assert_eq!(BandwidthLimits::from_network_config(&null).unwrap(), None);
        let null = json!({"runtimeConfig": {"bandwidth": null}, "egressRate": 1_000_000, "egressBurst": 8_000});
        assert!(BandwidthLimits::from_network_config(&null).unwrap().unwrap().egress_limited());
        for bad in [
            json!({"runtimeConfig": {"bandwidth": {"ingressRate": -1}}}),
            json!({"runtimeConfig": {"bandwidth": {"ingressRate": "fast"}}}),
            json!({"runtimeConfig": {"bandwidth": {"egressBurst": 1000}}}),
            json!({"runtimeConfig": {"bandwidth": {"egressRate": 10}}}),
        ] {
            let err = BandwidthLimits::from_network_config(&bad).unwrap_err();
            assert!(err.contains("runtimeConfig.bandwidth"), "{err}");
        }
    }
}
