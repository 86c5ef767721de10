//! The API definitions the fake "runs", as VPP's `get_api_json` hands them out: a JSON array
//! of every loaded module's `.api.json` (the same vendored files the Rust types come from).

macro_rules! api_files {
    ($($name:literal),* $(,)?) => {
        &[$(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../vpp-binapi/api/", $name))),*]
    };
}

const FILES: &[&str] = api_files!(
    "acl.api.json",
    "acl_types.api.json",
    "af_xdp.api.json",
    "ethernet_types.api.json",
    "fib_types.api.json",
    "interface.api.json",
    "interface_types.api.json",
    "ip.api.json",
    "ip_neighbor.api.json",
    "ip_types.api.json",
    "l2.api.json",
    "memclnt.api.json",
    "memif.api.json",
    "mfib_types.api.json",
    "nat44_ed.api.json",
    "nat_types.api.json",
    "tapv2.api.json",
    "vlib.api.json",
    "vpe.api.json",
    "vpe_types.api.json",
    "vxlan.api.json",
);

/// `[<file>, <file>, ...]`.
pub fn api_json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| format!("[{}]", FILES.join(",")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_module_is_in_the_array() {
        let v: serde_json::Value = serde_json::from_str(super::api_json()).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 21);
        assert!(v.as_array().unwrap().iter().any(|m| m["vl_api_version"] == "0xb197c551"), "memclnt");
    }
}
