//! The `[vpp]` section of the agent's configuration (camelCase TOML, every field optional),
//! read when `uplink = "vpp"`. Validated before anything starts.

use std::{net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

/// An invalid `[vpp]` value; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid [vpp] configuration: {0}")]
pub struct VppConfigError(pub String);

/// How VPP's af_xdp plugin binds its socket.
#[derive(Clone, Copy, Debug, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AfXdpMode {
    /// Let the kernel choose.
    Auto,
    /// Copy mode (what a veth supports).
    #[default]
    Copy,
    /// Zero-copy (a NIC driver with AF_XDP zero-copy support).
    ZeroCopy,
}

/// A host service reached on the node IP from outside, forwarded by VPP's NAT to the host
/// over the host interconnect (e.g. `tcp/22`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPort {
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// Port.
    pub port: u16,
}

impl std::str::FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (proto, port) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected tcp/PORT or udp/PORT"))?;
        let proto = match proto {
            "tcp" => 6,
            "udp" => 17,
            other => return Err(format!("{s:?}: protocol {other:?} is not tcp or udp")),
        };
        let port: u16 = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
        if port == 0 {
            return Err(format!("{s:?}: port 0"));
        }
        Ok(Self { proto, port })
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawVppConfig {
    api_socket: Option<PathBuf>,
    cli_socket: Option<PathBuf>,
    stats_socket: Option<PathBuf>,
    uplink_pci: Option<String>,
    uplink_name: Option<String>,
    rx_queues: Option<u16>,
    tx_queues: Option<u16>,
    rx_descriptors: Option<u16>,
    tx_descriptors: Option<u16>,
    main_core: Option<u16>,
    worker_cores: Option<Vec<u16>>,
    af_xdp_rx_queues: Option<u16>,
    af_xdp_mode: Option<AfXdpMode>,
    vxlan_vni: Option<u32>,
    host_if_name: Option<String>,
    host_tap_id: Option<u32>,
    host_interconnect_subnet: Option<Ipv4Net>,
    host_ports: Option<Vec<HostPort>>,
    nat_sessions: Option<u32>,
    stn_state_file: Option<PathBuf>,
    uplink_address: Option<ipnet::Ipv4Net>,
    uplink_gateway: Option<Ipv4Addr>,
    uplink_mtu: Option<u32>,
    plugin_path: Option<PathBuf>,
    buffers_per_numa: Option<u32>,
}

/// Validated `[vpp]` configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VppConfig {
    /// VPP's binary-API socket (startup.conf `socksvr { socket-name }`). Default /run/vpp/api.sock.
    pub api_socket: PathBuf,
    /// VPP's CLI socket. Default /run/vpp/cli.sock.
    pub cli_socket: PathBuf,
    /// VPP's stats segment socket (startup.conf `statseg { socket-name }`). Default /run/vpp/stats.sock.
    pub stats_socket: PathBuf,
    /// PCI address of the NIC handed to DPDK (e.g. `0000:00:08.0`). Required for startup.conf.
    pub uplink_pci: Option<String>,
    /// VPP's name for that NIC (startup.conf `dev ... { name }`). Default `uplink0`.
    pub uplink_name: String,
    /// NIC receive queues. Default 1.
    pub rx_queues: u16,
    /// NIC transmit queues; default: one per VPP thread (DPDK's choice).
    pub tx_queues: Option<u16>,
    /// Receive descriptors per queue. Default 1024.
    pub rx_descriptors: u16,
    /// Transmit descriptors per queue. Default 1024.
    pub tx_descriptors: u16,
    /// CPU of VPP's main thread. Default 0.
    pub main_core: u16,
    /// CPUs of VPP's worker threads. Default none (the main thread forwards).
    pub worker_cores: Vec<u16>,
    /// Queues of the af_xdp interface on the slow-path port. Default 1.
    pub af_xdp_rx_queues: u16,
    /// Bind mode of that interface. Default copy (the slow-path port is a veth).
    pub af_xdp_mode: AfXdpMode,
    /// VNI of the node-to-node VXLAN tunnels. Default 10.
    pub vxlan_vni: u32,
    /// Host end of the host interconnect tap. Default `vpp1`.
    pub host_if_name: String,
    /// Id of that tap in VPP (its VPP name is `tap<id>`). Default 0.
    pub host_tap_id: u32,
    /// The /30 of the host interconnect: VPP takes the first host address, the host the
    /// second. Default 172.30.255.0/30.
    pub host_interconnect_subnet: Ipv4Net,
    /// Host services reachable from outside on the node IP. Default tcp/22, tcp/10250.
    pub host_ports: Vec<HostPort>,
    /// NAT44-ED session table size; 0: VPP's default.
    pub nat_sessions: u32,
    /// Where contiv-stn publishes the NIC configuration it took from the host.
    /// Default /run/contiv/stn.json. Not read when `uplink_address` is set.
    pub stn_state_file: PathBuf,
    /// The uplink's address (and prefix) when no contiv-stn hands one over: a node whose
    /// NIC for VPP is a second NIC the host never configured. The first address is the
    /// node IP (tunnel end, NAT pool). Default: read the handover from `stn_state_file`.
    pub uplink_address: Option<Ipv4Net>,
    /// The default gateway on the uplink (with `uplink_address`).
    pub uplink_gateway: Option<Ipv4Addr>,
    /// The uplink's MTU (with `uplink_address`); default: VPP's.
    pub uplink_mtu: Option<u32>,
    /// VPP's plugin directory, if not the packaged one.
    pub plugin_path: Option<PathBuf>,
    /// Buffers per NUMA node; default VPP's.
    pub buffers_per_numa: Option<u32>,
}

impl Default for VppConfig {
    fn default() -> Self {
        Self::from_raw(RawVppConfig::default()).expect("defaults are valid")
    }
}

impl<'de> Deserialize<'de> for VppConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawVppConfig::deserialize(d)?;
        Self::from_raw(raw).map_err(serde::de::Error::custom)
    }
}

fn check_ifname(name: &str, field: &str) -> Result<(), VppConfigError> {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
        return Err(VppConfigError(format!("{field} {name:?} is not a valid Linux interface name")));
    }
    Ok(())
}

/// Whether `s` is a PCI address `dddd:bb:dd.f`.
pub fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && hex(0..4)
        && hex(5..7)
        && hex(8..10)
        && (b'0'..=b'7').contains(&b[11])
}

impl VppConfig {
    fn from_raw(raw: RawVppConfig) -> Result<Self, VppConfigError> {
        let err = |m: String| Err(VppConfigError(m));
        if let Some(pci) = &raw.uplink_pci
            && !is_pci_address(pci)
        {
            return err(format!("uplinkPci {pci:?} is not a PCI address like 0000:00:08.0"));
        }
        let uplink_name = raw.uplink_name.unwrap_or_else(|| "uplink0".into());
        if uplink_name.is_empty() || uplink_name.len() > 63 || uplink_name.contains([' ', '\0', '{', '}']) {
            return err(format!("uplinkName {uplink_name:?} is not a usable VPP interface name"));
        }
        let rx_queues = raw.rx_queues.unwrap_or(1);
        if rx_queues == 0 || raw.tx_queues == Some(0) {
            return err("rxQueues and txQueues must be at least 1".into());
        }
        for (v, field) in [(raw.rx_descriptors, "rxDescriptors"), (raw.tx_descriptors, "txDescriptors")] {
            if let Some(n) = v
                && (!n.is_power_of_two() || !(64..=16384).contains(&n))
            {
                return err(format!("{field} {n} must be a power of two between 64 and 16384"));
            }
        }
        let main_core = raw.main_core.unwrap_or(0);
        let mut worker_cores = raw.worker_cores.unwrap_or_default();
        worker_cores.sort_unstable();
        if worker_cores.windows(2).any(|w| w[0] == w[1]) || worker_cores.contains(&main_core) {
            return err(format!("workerCores {worker_cores:?} must be distinct and not the mainCore {main_core}"));
        }
        let af_xdp_rx_queues = raw.af_xdp_rx_queues.unwrap_or(1);
        if af_xdp_rx_queues != 1 {
            // The slow-path port is a veth of one queue: VPP would fail to create the af_xdp
            // interface's other queues, and VPP mode would have no slow path.
            return err(format!(
                "afXdpRxQueues {af_xdp_rx_queues}: only 1 is supported (the slow-path port has one queue)"
            ));
        }
        let vxlan_vni = raw.vxlan_vni.unwrap_or(10);
        if vxlan_vni == 0 || vxlan_vni >= 1 << 24 {
            return err(format!("vxlanVni {vxlan_vni} must be in 1..16777215"));
        }
        let host_if_name = raw.host_if_name.unwrap_or_else(|| "vpp1".into());
        check_ifname(&host_if_name, "hostIfName")?;
        let host_interconnect_subnet =
            raw.host_interconnect_subnet.unwrap_or_else(|| "172.30.255.0/30".parse().expect("valid default")).trunc();
        if host_interconnect_subnet.prefix_len() > 30 {
            return err(format!(
                "hostInterconnectSubnet {host_interconnect_subnet} needs two host addresses (at most /30)"
            ));
        }
        if let Some(gw) = raw.uplink_gateway {
            let Some(addr) = raw.uplink_address else {
                return err("uplinkGateway needs uplinkAddress (the gateway must be on the uplink's subnet)".into());
            };
            if !addr.trunc().contains(&gw) || gw == addr.addr() {
                return err(format!("uplinkGateway {gw} is not another address of uplinkAddress {addr}"));
            }
        }
        if let Some(addr) = raw.uplink_address
            && (addr.prefix_len() > 31 || addr.addr() == addr.network() && addr.prefix_len() < 31)
        {
            return err(format!("uplinkAddress {addr} is not a host address with its prefix (e.g. 192.0.2.10/24)"));
        }
        if raw.uplink_mtu.is_some() && raw.uplink_address.is_none() {
            return err("uplinkMtu needs uplinkAddress (with contiv-stn the MTU comes with the handover)".into());
        }
        if let Some(mtu) = raw.uplink_mtu
            && !(576..=9216).contains(&mtu)
        {
            return err(format!("uplinkMtu {mtu} out of range 576..=9216"));
        }
        Ok(Self {
            api_socket: raw.api_socket.unwrap_or_else(|| "/run/vpp/api.sock".into()),
            cli_socket: raw.cli_socket.unwrap_or_else(|| "/run/vpp/cli.sock".into()),
            stats_socket: raw.stats_socket.unwrap_or_else(|| "/run/vpp/stats.sock".into()),
            uplink_pci: raw.uplink_pci,
            uplink_name,
            rx_queues,
            tx_queues: raw.tx_queues,
            rx_descriptors: raw.rx_descriptors.unwrap_or(1024),
            tx_descriptors: raw.tx_descriptors.unwrap_or(1024),
            main_core,
            worker_cores,
            af_xdp_rx_queues,
            af_xdp_mode: raw.af_xdp_mode.unwrap_or_default(),
            vxlan_vni,
            host_if_name,
            host_tap_id: raw.host_tap_id.unwrap_or(0),
            host_interconnect_subnet,
            host_ports: raw
                .host_ports
                .unwrap_or_else(|| vec![HostPort { proto: 6, port: 22 }, HostPort { proto: 6, port: 10250 }]),
            nat_sessions: raw.nat_sessions.unwrap_or(0),
            stn_state_file: raw.stn_state_file.unwrap_or_else(|| "/run/contiv/stn.json".into()),
            uplink_address: raw.uplink_address,
            uplink_gateway: raw.uplink_gateway,
            uplink_mtu: raw.uplink_mtu,
            plugin_path: raw.plugin_path,
            buffers_per_numa: raw.buffers_per_numa,
        })
    }

    /// VPP's address on the host interconnect (first host address of the subnet).
    pub fn host_interconnect_vpp(&self) -> Ipv4Net {
        let n = &self.host_interconnect_subnet;
        Ipv4Net::new(Ipv4Addr::from(u32::from(n.network()) + 1), n.prefix_len()).expect("valid prefix")
    }

    /// The host's address on the host interconnect (second host address).
    pub fn host_interconnect_host(&self) -> Ipv4Net {
        let n = &self.host_interconnect_subnet;
        Ipv4Net::new(Ipv4Addr::from(u32::from(n.network()) + 2), n.prefix_len()).expect("valid prefix")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VppConfig, String> {
        #[derive(Deserialize)]
        struct Wrapper {
            #[serde(default)]
            vpp: Option<VppConfig>,
        }
        toml::from_str::<Wrapper>(text).map(|w| w.vpp.unwrap_or_default()).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = VppConfig::default();
        assert_eq!(c.api_socket, PathBuf::from("/run/vpp/api.sock"));
        assert_eq!((c.rx_queues, c.rx_descriptors, c.tx_descriptors), (1, 1024, 1024));
        assert_eq!(c.af_xdp_mode, AfXdpMode::Copy);
        assert_eq!(c.host_interconnect_vpp().to_string(), "172.30.255.1/30");
        assert_eq!(c.host_interconnect_host().to_string(), "172.30.255.2/30");
        assert_eq!(c.host_ports.len(), 2);
    }

    #[test]
    fn fields_are_read_from_the_vpp_table() {
        let c = parse(
            r#"
            [vpp]
            uplinkPci = "0000:00:08.0"
            uplinkName = "GigabitEthernet0/8/0"
            rxQueues = 2
            workerCores = [2, 1]
            afXdpMode = "zero-copy"
            hostPorts = ["tcp/22", "udp/53"]
            "#,
        )
        .unwrap();
        assert_eq!(c.uplink_pci.as_deref(), Some("0000:00:08.0"));
        assert_eq!(c.worker_cores, vec![1, 2]);
        assert_eq!(c.af_xdp_mode, AfXdpMode::ZeroCopy);
        assert_eq!(c.host_ports[1], HostPort { proto: 17, port: 53 });
        let c =
            parse("[vpp]\nuplinkAddress = \"192.0.2.10/24\"\nuplinkGateway = \"192.0.2.1\"\nuplinkMtu = 9000").unwrap();
        assert_eq!(c.uplink_address.unwrap().to_string(), "192.0.2.10/24");
        assert_eq!(c.uplink_gateway, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(c.uplink_mtu, Some(9000));
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        for (text, needle) in [
            ("uplinkPci = \"eth0\"", "uplinkPci"),
            ("rxDescriptors = 1000", "rxDescriptors"),
            ("workerCores = [0]", "workerCores"),
            ("vxlanVni = 0", "vxlanVni"),
            ("hostIfName = \"a/b\"", "hostIfName"),
            ("hostInterconnectSubnet = \"172.30.0.0/31\"", "hostInterconnectSubnet"),
            ("hostPorts = [\"sctp/1\"]", "sctp"),
            ("noSuchField = 1", "noSuchField"),
            ("uplinkGateway = \"192.0.2.1\"", "uplinkGateway needs uplinkAddress"),
            ("uplinkAddress = \"192.0.2.10/24\"\nuplinkGateway = \"198.51.100.1\"", "uplinkGateway"),
            ("uplinkAddress = \"192.0.2.0/24\"", "uplinkAddress"),
            ("uplinkMtu = 1500", "uplinkMtu needs uplinkAddress"),
            ("uplinkAddress = \"192.0.2.10/24\"\nuplinkMtu = 100", "uplinkMtu"),
            ("afXdpRxQueues = 2", "afXdpRxQueues 2: only 1 is supported"),
            ("afXdpRxQueues = 0", "afXdpRxQueues"),
        ] {
            let err = parse(&format!("[vpp]\n{text}")).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
