//! The ADD success result (spec section 5) for each supported `cniVersion`, built from the
//! agent's `AddReply`, and the `prevResult` a runtime may hand in.
//!
//! Formats differ in two places: before 1.0.0 each `ips` entry carries `"version": "4"|"6"`, and
//! only 1.1.0 has interface `mtu`. Spec 1.1.0 also adds optional fields (`socketPath`, `pciID`,
//! route `mtu`/`table`/...) that the agent does not report; those found in a `prevResult` are
//! kept verbatim.

use std::net::IpAddr;

use contiv_cni_api::v1;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::CniVersion;
use crate::error::CniError;

/// One entry of `interfaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    /// Fields this plugin does not produce (`socketPath`, `pciID`, ...), kept from `prevResult`.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One entry of `ips`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `"4"` or `"6"`; only in results before spec 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<u32>,
    /// CIDR, e.g. `10.1.1.2/32`.
    pub address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One entry of `routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gw: String,
    /// `mtu`, `advmss`, `priority`, `table`, `scope` (1.1.0), kept from `prevResult`.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// The `dns` object; serialises as `{}` when empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty() && self.domain.is_empty() && self.search.is_empty() && self.options.is_empty()
    }
}

/// The ADD success result. Empty lists are left out (as libcni does); `dns` is always present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl AddResult {
    /// Compact JSON for stdout.
    pub fn to_json(&self) -> String {
        // Only strings, integers and maps of JSON values: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Parses `addr/prefix` with a prefix that fits the family.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

/// Parses and checks a `prevResult` (code 7 if it is not a valid result).
pub fn parse_prev_result(v: &Value) -> Result<AddResult, CniError> {
    let bad = |details: String| CniError::invalid_config("invalid prevResult", details);
    let r: AddResult = serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?;
    for ip in &r.ips {
        if parse_cidr(&ip.address).is_none() {
            return Err(bad(format!("ips: {:?} is not an address in CIDR notation", ip.address)));
        }
        if !ip.gateway.is_empty() && ip.gateway.parse::<IpAddr>().is_err() {
            return Err(bad(format!("ips: gateway {:?} is not an IP address", ip.gateway)));
        }
        if let Some(i) = ip.interface
            && i as usize >= r.interfaces.len()
        {
            return Err(bad(format!("ips: interface index {i} out of range ({} interfaces)", r.interfaces.len())));
        }
    }
    for route in &r.routes {
        if parse_cidr(&route.dst).is_none() {
            return Err(bad(format!("routes: dst {:?} is not in CIDR notation", route.dst)));
        }
    }
    Ok(r)
}

/// Builds the result for `version` from the agent's reply.
///
/// With a `prevResult` (contiv-cni placed after another interface plugin), the spec asks the
/// plugin to output that result with its own changes: the agent's interfaces, ips and routes are
/// appended (ips re-indexed past the earlier interfaces) and its DNS replaces the earlier one
/// unless it is empty. An inconsistent reply (bad address, index out of range) is code 100.
pub fn add_result(version: CniVersion, reply: &v1::AddReply, prev: Option<AddResult>) -> Result<AddResult, CniError> {
    let bad = |details: String| CniError::internal("agent returned an invalid result", details);
    let mut out = prev.unwrap_or(AddResult {
        cni_version: String::new(),
        interfaces: Vec::new(),
        ips: Vec::new(),
        routes: Vec::new(),
        dns: Dns::default(),
    });
    out.cni_version = version.as_str().to_owned();
    let offset = out.interfaces.len();

    for ip in &reply.ips {
        let (addr, _) = parse_cidr(&ip.address)
            .ok_or_else(|| bad(format!("{:?} is not an address in CIDR notation", ip.address)))?;
        if !ip.gateway.is_empty() && ip.gateway.parse::<IpAddr>().is_err() {
            return Err(bad(format!("gateway {:?} is not an IP address", ip.gateway)));
        }
        if ip.interface as usize >= reply.interfaces.len() {
            return Err(bad(format!(
                "ip {} refers to interface {} of {}",
                ip.address,
                ip.interface,
                reply.interfaces.len()
            )));
        }
        let index = u32::try_from(offset + ip.interface as usize).map_err(|_| bad("too many interfaces".to_owned()))?;
        out.ips.push(IpConfig {
            version: version.ips_carry_version().then(|| if addr.is_ipv4() { "4" } else { "6" }.to_owned()),
            interface: Some(index),
            address: ip.address.clone(),
            gateway: ip.gateway.clone(),
            other: Map::new(),
        });
    }
    for route in &reply.routes {
        if parse_cidr(&route.dst).is_none() {
            return Err(bad(format!("route dst {:?} is not in CIDR notation", route.dst)));
        }
        if !route.gw.is_empty() && route.gw.parse::<IpAddr>().is_err() {
            return Err(bad(format!("route gw {:?} is not an IP address", route.gw)));
        }
        out.routes.push(Route { dst: route.dst.clone(), gw: route.gw.clone(), other: Map::new() });
    }
    for iface in &reply.interfaces {
        if iface.name.is_empty() {
            return Err(bad("interface without a name".to_owned()));
        }
        out.interfaces.push(Interface {
            name: iface.name.clone(),
            mac: iface.mac.clone(),
            mtu: (version.interfaces_carry_mtu() && iface.mtu != 0).then_some(iface.mtu),
            sandbox: iface.sandbox.clone(),
            other: Map::new(),
        });
    }
    if let Some(dns) = &reply.dns {
        let dns = Dns {
            nameservers: dns.nameservers.clone(),
            domain: dns.domain.clone(),
            search: dns.search.clone(),
            options: dns.options.clone(),
        };
        if !dns.is_empty() {
            out.dns = dns;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use contiv_cni_api::codes;
    use serde_json::json;

    /// What the agent answers for a pod: host veth + pod eth0, one v4 and one v6 address.
    fn sample_reply() -> v1::AddReply {
        v1::AddReply {
            error: None,
            interfaces: vec![
                v1::Interface {
                    name: "vethc1".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: 0,
                    sandbox: String::new(),
                },
                v1::Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: 1450,
                    sandbox: "/run/netns/pod1".into(),
                },
            ],
            ips: vec![
                v1::IpConfig { address: "10.1.1.2/32".into(), gateway: "10.1.1.1".into(), interface: 1 },
                v1::IpConfig { address: "fd00::2/128".into(), gateway: String::new(), interface: 1 },
            ],
            routes: vec![
                v1::Route { dst: "0.0.0.0/0".into(), gw: "10.1.1.1".into() },
                v1::Route { dst: "::/0".into(), gw: String::new() },
            ],
            dns: Some(v1::Dns {
                nameservers: vec!["10.96.0.10".into()],
                domain: String::new(),
                search: vec!["svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
        }
    }

    fn render(version: CniVersion, reply: &v1::AddReply) -> Value {
        let json = add_result(version, reply, None).unwrap().to_json();
        assert!(!json.contains('\n'), "compact output");
        serde_json::from_str(&json).unwrap()
    }

    fn expected(version: &str, with_ip_version: bool, with_mtu: bool) -> Value {
        let mut ips = json!([
            {"interface": 1, "address": "10.1.1.2/32", "gateway": "10.1.1.1"},
            {"interface": 1, "address": "fd00::2/128"}
        ]);
        if with_ip_version {
            ips[0]["version"] = json!("4");
            ips[1]["version"] = json!("6");
        }
        let mut eth0 = json!({"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/pod1"});
        if with_mtu {
            eth0["mtu"] = json!(1450);
        }
        json!({
            "cniVersion": version,
            "interfaces": [{"name": "vethc1", "mac": "02:00:00:00:00:01"}, eth0],
            "ips": ips,
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.1.1"}, {"dst": "::/0"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"], "options": ["ndots:5"]}
        })
    }

    #[test]
    fn result_0_3_x_has_ip_versions_and_no_mtu() {
        assert_eq!(render(CniVersion::V0_3_1, &sample_reply()), expected("0.3.1", true, false));
        assert_eq!(render(CniVersion::V0_3_0, &sample_reply()), expected("0.3.0", true, false));
    }

    #[test]
    fn result_0_4_0_has_ip_versions_and_no_mtu() {
        assert_eq!(render(CniVersion::V0_4_0, &sample_reply()), expected("0.4.0", true, false));
    }

    #[test]
    fn result_1_0_0_has_neither_ip_versions_nor_mtu() {
        assert_eq!(render(CniVersion::V1_0_0, &sample_reply()), expected("1.0.0", false, false));
    }

    #[test]
    fn result_1_1_0_has_interface_mtu_and_no_ip_versions() {
        assert_eq!(render(CniVersion::V1_1_0, &sample_reply()), expected("1.1.0", false, true));
    }

    #[test]
    fn result_field_order_is_conventional() {
        let json = add_result(CniVersion::V1_1_0, &sample_reply(), None).unwrap().to_json();
        let pos = |k: &str| json.find(&format!("\"{k}\":")).unwrap();
        assert!(pos("cniVersion") < pos("interfaces"));
        assert!(pos("interfaces") < pos("ips") && pos("ips") < pos("routes") && pos("routes") < pos("dns"));
    }

    #[test]
    fn empty_reply_still_has_dns_object() {
        let v = render(CniVersion::V1_0_0, &v1::AddReply::default());
        assert_eq!(v, json!({"cniVersion": "1.0.0", "dns": {}}));
    }

    #[test]
    fn inconsistent_reply_is_code_100() {
        let mut r = sample_reply();
        r.ips[0].interface = 2;
        assert_eq!(add_result(CniVersion::V1_0_0, &r, None).unwrap_err().code, codes::INTERNAL);
        let mut r = sample_reply();
        r.ips[0].address = "10.1.1.2".into();
        assert_eq!(add_result(CniVersion::V1_0_0, &r, None).unwrap_err().code, codes::INTERNAL);
        let mut r = sample_reply();
        r.routes[0].dst = "default".into();
        assert_eq!(add_result(CniVersion::V1_0_0, &r, None).unwrap_err().code, codes::INTERNAL);
    }

    #[test]
    fn prev_result_is_extended_not_replaced() {
        let prev = parse_prev_result(&json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "net0", "mac": "aa:bb:cc:dd:ee:ff", "socketPath": "/run/x.sock"}],
            "ips": [{"interface": 0, "address": "192.168.0.2/24"}],
            "routes": [{"dst": "192.168.1.0/24", "table": 100}],
            "dns": {"nameservers": ["1.1.1.1"]}
        }))
        .unwrap();
        let mut reply = sample_reply();
        reply.dns = None;
        let v: Value =
            serde_json::from_str(&add_result(CniVersion::V1_1_0, &reply, Some(prev)).unwrap().to_json()).unwrap();
        assert_eq!(v["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(v["interfaces"][0]["socketPath"], "/run/x.sock", "unknown fields kept");
        assert_eq!(v["interfaces"][2]["name"], "eth0");
        assert_eq!(v["ips"][0], json!({"interface": 0, "address": "192.168.0.2/24"}));
        assert_eq!(v["ips"][1]["interface"], 2, "our ips re-indexed past earlier interfaces");
        assert_eq!(v["routes"][0], json!({"dst": "192.168.1.0/24", "table": 100}));
        assert_eq!(v["routes"].as_array().unwrap().len(), 3);
        assert_eq!(v["dns"], json!({"nameservers": ["1.1.1.1"]}), "empty agent DNS keeps earlier DNS");
    }

    #[test]
    fn bad_prev_result_is_code_7() {
        for bad in [
            json!({"interfaces": [{"mac": "x"}]}),
            json!({"interfaces": "eth0"}),
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "interface": 0}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "gateway": "x"}]}),
            json!({"routes": [{"gw": "10.0.0.1"}]}),
        ] {
            assert_eq!(parse_prev_result(&bad).unwrap_err().code, codes::INVALID_CONFIG, "{bad}");
        }
        parse_prev_result(&json!({})).unwrap();
    }

    #[test]
    fn cidr_parsing() {
        assert!(parse_cidr("10.0.0.0/8").is_some());
        assert!(parse_cidr("fd00::/64").is_some());
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("10.0.0.0").is_none());
        assert!(parse_cidr("x/8").is_none());
    }
}
