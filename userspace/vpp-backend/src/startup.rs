//! VPP's `startup.conf`, rendered from the `[vpp]` configuration: the NIC handed to DPDK,
//! the CPU layout, the plugins this backend uses (everything else disabled) and the API socket.

use std::fmt::Write as _;

use crate::config::VppConfig;

/// Plugins the VPP backend needs; every other plugin is disabled.
pub const PLUGINS: &[(&str, &str)] = &[
    ("dpdk_plugin.so", "owns the uplink NIC"),
    ("af_xdp_plugin.so", "the slow-path port's vswitch end (XDP -> AF_XDP)"),
    ("vxlan_plugin.so", "tunnels to the other nodes"),
    ("nat_plugin.so", "NAT44-ED for pod egress with the node IP"),
    ("acl_plugin.so", "ACLs"),
    ("tap_plugin.so", "the host interconnect"),
    ("ping_plugin.so", "answers ICMP echo for VPP's addresses (the pods' gateway)"),
];

/// `startup.conf` could not be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    /// No NIC to hand to DPDK.
    #[error("[vpp] uplinkPci is required to render startup.conf (the NIC DPDK takes, e.g. 0000:00:08.0)")]
    NoUplink,
}

/// Compresses sorted CPU numbers into VPP's list syntax (`1-3,5`).
fn corelist(cores: &[u16]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cores.len() {
        let start = cores[i];
        let mut end = start;
        while i + 1 < cores.len() && cores[i + 1] == end + 1 {
            i += 1;
            end = cores[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(",")
}

/// Renders `startup.conf`.
pub fn render_startup_conf(cfg: &VppConfig) -> Result<String, StartupError> {
    let pci = cfg.uplink_pci.as_deref().ok_or(StartupError::NoUplink)?;
    let mut s = String::new();
    let w = &mut s;
    // Writing to a String cannot fail.
    let _ = writeln!(w, "# Rendered by contiv-agent from its [vpp] configuration; edits are overwritten.");
    let _ = writeln!(w, "unix {{\n  nodaemon\n  full-coredump\n  cli-listen {}\n}}\n", cfg.cli_socket.display());
    let _ = writeln!(w, "api-trace {{\n  on\n}}\n");
    let _ = writeln!(w, "socksvr {{\n  socket-name {}\n}}\n", cfg.api_socket.display());
    let _ = writeln!(w, "statseg {{\n  socket-name {}\n}}\n", cfg.stats_socket.display());
    let _ = writeln!(w, "cpu {{\n  main-core {}", cfg.main_core);
    if !cfg.worker_cores.is_empty() {
        let _ = writeln!(w, "  corelist-workers {}", corelist(&cfg.worker_cores));
    }
    let _ = writeln!(w, "}}\n");
    if let Some(n) = cfg.buffers_per_numa {
        let _ = writeln!(w, "buffers {{\n  buffers-per-numa {n}\n}}\n");
    }
    let _ = writeln!(w, "dpdk {{\n  dev {pci} {{\n    name {}", cfg.uplink_name);
    let _ = writeln!(w, "    num-rx-queues {}", cfg.rx_queues);
    if let Some(tx) = cfg.tx_queues {
        let _ = writeln!(w, "    num-tx-queues {tx}");
    }
    let _ = writeln!(w, "    num-rx-desc {}\n    num-tx-desc {}\n  }}\n}}\n", cfg.rx_descriptors, cfg.tx_descriptors);
    let _ = writeln!(w, "plugins {{");
    if let Some(p) = &cfg.plugin_path {
        let _ = writeln!(w, "  path {}", p.display());
    }
    let _ = writeln!(w, "  plugin default {{ disable }}");
    for (plugin, why) in PLUGINS {
        let _ = writeln!(w, "  plugin {plugin} {{ enable }}  # {why}");
    }
    let _ = writeln!(w, "}}");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> VppConfig {
        #[derive(serde::Deserialize)]
        struct W {
            vpp: VppConfig,
        }
        toml::from_str::<W>(&format!("[vpp]\n{text}")).unwrap().vpp
    }

    /// The body of a `name { ... }` block (first occurrence), without nested blocks' braces.
    fn block<'a>(conf: &'a str, name: &str) -> &'a str {
        let start =
            conf.find(&format!("{name} {{")).unwrap_or_else(|| panic!("no {name} block in\n{conf}")) + name.len() + 2;
        let mut depth = 1;
        for (i, c) in conf[start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return &conf[start..start + i];
                    }
                }
                _ => {}
            }
        }
        panic!("unbalanced {name} block");
    }

    #[test]
    fn renders_the_nic_cpus_plugins_and_socket() {
        let c = cfg(r#"
            uplinkPci = "0000:00:08.0"
            uplinkName = "GigabitEthernet0/8/0"
            rxQueues = 2
            txQueues = 3
            rxDescriptors = 2048
            txDescriptors = 512
            mainCore = 0
            workerCores = [1, 2, 3, 6]
            apiSocket = "/run/vpp/contiv-api.sock"
            buffersPerNuma = 32768
        "#);
        let conf = render_startup_conf(&c).unwrap();
        let dev = block(&conf, "dev 0000:00:08.0");
        for line in
            ["name GigabitEthernet0/8/0", "num-rx-queues 2", "num-tx-queues 3", "num-rx-desc 2048", "num-tx-desc 512"]
        {
            assert!(dev.contains(line), "{line} missing in dev block:\n{dev}");
        }
        let cpu = block(&conf, "cpu");
        assert!(cpu.contains("main-core 0") && cpu.contains("corelist-workers 1-3,6"), "{cpu}");
        assert!(block(&conf, "socksvr").contains("socket-name /run/vpp/contiv-api.sock"));
        assert!(block(&conf, "buffers").contains("buffers-per-numa 32768"));
        let plugins = block(&conf, "plugins");
        assert!(plugins.contains("plugin default { disable }"));
        for p in
            ["dpdk_plugin.so", "af_xdp_plugin.so", "nat_plugin.so", "vxlan_plugin.so", "acl_plugin.so", "tap_plugin.so"]
        {
            assert!(plugins.contains(&format!("plugin {p} {{ enable }}")), "{p} not enabled:\n{plugins}");
        }
        // Every block is balanced, so VPP's parser sees what we meant.
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }

    #[test]
    fn optional_parts_are_left_out_and_a_missing_nic_is_an_error() {
        let conf = render_startup_conf(&cfg("uplinkPci = \"0000:02:00.1\"")).unwrap();
        assert!(!conf.contains("corelist-workers"));
        assert!(!conf.contains("num-tx-queues"));
        assert!(!conf.contains("buffers {"));
        assert!(block(&conf, "dev 0000:02:00.1").contains("name uplink0"));
        assert!(block(&conf, "socksvr").contains("/run/vpp/api.sock"));
        let err = render_startup_conf(&VppConfig::default()).unwrap_err();
        assert!(err.to_string().contains("uplinkPci"));
    }

    #[test]
    fn cores_compress_into_ranges() {
        assert_eq!(corelist(&[1]), "1");
        assert_eq!(corelist(&[1, 2, 3]), "1-3");
        assert_eq!(corelist(&[0, 2, 3, 5, 7, 8]), "0,2-3,5,7-8");
    }
}
