//! What a CNI network config may change for one attachment: `mtu`, `dns`, and bandwidth
//! limits from the `bandwidth` capability (`runtimeConfig.bandwidth`). contiv-cni has already
//! checked the config's shape with the same MTU range; this reads it again because the agent
//! is the one that acts on it, and must refuse (code 7) rather than guess.

use contiv_cni_api::{CniError, codes};
use serde::{Deserialize, Deserializer};

use crate::bandwidth::BandwidthLimits;
use crate::config::{self, DnsConfig};

/// The network's `dns` as runtimes and other plugins write it: `null` means absent and
/// keys this plugin does not use are ignored, as the reference plugins do (the agent's own
/// file, by contrast, refuses unknown keys to catch typos).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NetDns {
    #[serde(default, deserialize_with = "null_as_default")]
    nameservers: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    domain: String,
    #[serde(default, deserialize_with = "null_as_default")]
    search: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    options: Vec<String>,
}

fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
struct NetConf {
    mtu: Option<u32>,
    dns: Option<NetDns>,
}

/// The MTU, DNS and bandwidth limits for an attachment of this network: the config's values
/// where it has them, else the node's defaults. An empty `dns` is the node's. `max_mtu`: the
/// largest MTU the node's pods can use (less than [`config::POD_MTU_MAX`] in VPP mode).
pub(super) fn overrides(
    raw: &[u8],
    default_mtu: u32,
    max_mtu: u32,
    default_dns: &DnsConfig,
) -> Result<(u32, DnsConfig, Option<BandwidthLimits>), CniError> {
    let invalid = |e: String| CniError::new(codes::INVALID_CONFIG, "invalid network configuration", e);
    let value: serde_json::Value = serde_json::from_slice(raw).map_err(|e| invalid(e.to_string()))?;
    let bandwidth = BandwidthLimits::from_network_config(&value).map_err(invalid)?;
    let conf: NetConf = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    let mtu = conf.mtu.unwrap_or(default_mtu);
    if !(config::POD_MTU_MIN..=config::POD_MTU_MAX).contains(&mtu) {
        return Err(invalid(format!("mtu {mtu} out of range {}..={}", config::POD_MTU_MIN, config::POD_MTU_MAX)));
    }
    if mtu > max_mtu {
        return Err(invalid(format!(
            "mtu {mtu} is above {max_mtu}, the most this node's pods can use (in VPP mode their traffic crosses \
             the slow-path port, whose MTU is {max_mtu})"
        )));
    }
    let dns = conf.dns.unwrap_or_default();
    let dns = DnsConfig { nameservers: dns.nameservers, domain: dns.domain, search: dns.search, options: dns.options };
    let dns = if dns == DnsConfig::default() { default_dns.clone() } else { dns };
    Ok((mtu, dns, bandwidth))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node_dns() -> DnsConfig {
        DnsConfig { nameservers: vec!["10.96.0.10".into()], search: vec!["cluster.local".into()], ..Default::default() }
    }

    fn read(conf: serde_json::Value) -> Result<(u32, DnsConfig), CniError> {
        overrides(conf.to_string().as_bytes(), 1450, config::POD_MTU_MAX, &node_dns()).map(|(mtu, dns, _)| (mtu, dns))
    }

    #[test]
    fn dns_null_or_with_keys_we_do_not_use_reads_as_the_runtimes_write_it() {
        let base = json!({"cniVersion": "1.1.0", "name": "n", "type": "contiv-cni"});
        assert_eq!(read(base.clone()).unwrap(), (1450, node_dns()));
        let mut c = base.clone();
        c["dns"] = json!(null);
        assert_eq!(read(c).unwrap(), (1450, node_dns()));
        let mut c = base.clone();
        c["dns"] = json!({"nameservers": null, "domain": null, "search": null, "options": null});
        assert_eq!(read(c).unwrap(), (1450, node_dns()), "all null is no dns");
        let mut c = base.clone();
        c["dns"] = json!({"nameservers": ["1.1.1.1"], "options": null, "sortlist": ["10.0.0.0/8"]});
        let (_, dns) = read(c).unwrap();
        assert_eq!(dns, DnsConfig { nameservers: vec!["1.1.1.1".into()], ..Default::default() });
    }

    #[test]
    fn mtu_outside_what_a_pod_can_use_is_code_7() {
        let base = json!({"cniVersion": "1.1.0", "name": "n", "type": "contiv-cni"});
        for (mtu, ok) in [(575, false), (576, true), (9000, true), (9001, false), (65535, false)] {
            let mut c = base.clone();
            c["mtu"] = json!(mtu);
            match read(c) {
                Ok((m, _)) => assert!(ok && m == mtu, "{mtu} accepted"),
                Err(e) => assert!(
                    !ok && e.code == codes::INVALID_CONFIG && e.details.contains("out of range"),
                    "{mtu}: {e:?}"
                ),
            }
        }
        let mut c = base.clone();
        c["dns"] = json!({"nameservers": "1.1.1.1"});
        assert_eq!(read(c).unwrap_err().code, codes::INVALID_CONFIG);
        // A VPP-mode node holds pods to the slow-path port's MTU.
        let mut c = base;
        c["mtu"] = json!(1501);
        let raw = c.to_string();
        let e = overrides(raw.as_bytes(), 1450, 1500, &node_dns()).expect_err("refused");
        assert!(e.code == codes::INVALID_CONFIG && e.details.contains("slow-path port"), "{e:?}");
        c["mtu"] = json!(1500);
        assert_eq!(overrides(c.to_string().as_bytes(), 1450, 1500, &node_dns()).unwrap().0, 1500);
    }
}
