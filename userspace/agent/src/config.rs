//! Agent configuration: a TOML file, every field optional with a documented default.
//! Parsed and validated before anything starts; a bad file exits with a clear message.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::Deserialize;

/// Errors found while reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown/ill-typed fields.
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value parsed but makes no sense.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The raw file format. Field names are camelCase, like the original Contiv config.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    node_name: Option<String>,
    pod_subnet: Option<Ipv4Net>,
    gateway: Option<Ipv4Addr>,
    gateway_mac: Option<String>,
    mtu: Option<u32>,
    cni_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    bpf_pin_dir: Option<PathBuf>,
    slowpath_host_ifname: Option<String>,
    slowpath_vswitch_ifname: Option<String>,
    dns: Option<DnsConfig>,
    etcd_endpoints: Option<Vec<String>>,
    store_dir: Option<PathBuf>,
    #[serde(rename = "podSubnetCIDR")]
    pod_subnet_cidr: Option<Ipv4Net>,
    pod_prefix_len: Option<u8>,
    status_addr: Option<std::net::SocketAddr>,
    etcd_tls: Option<contiv_store::TlsConfig>,
    uplink: Option<Uplink>,
    vpp: Option<VppConfig>,
}

/// Who owns the node's uplink NIC (see the architecture: one owner per node).
#[derive(Debug, Deserialize, serde::Serialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Uplink {
    /// The kernel owns the NIC; eBPF encapsulates cross-node traffic (the default).
    #[default]
    Kernel,
    /// FD.io VPP owns the NIC through DPDK (the `vpp` deployment variant).
    Vpp,
}

/// How the agent reaches VPP when `uplink = "vpp"`. VPP's own settings (the DPDK device,
/// cores, buffers) live in its startup.conf; these two sockets must match it.
#[derive(Debug, Deserialize, serde::Serialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VppConfig {
    /// VPP's binary-API socket (startup.conf `socksvr { socket-name ... }`).
    #[serde(default = "VppConfig::default_api_socket")]
    pub api_socket: PathBuf,
    /// VPP's stats segment socket (startup.conf `statseg { socket-name ... }`).
    #[serde(default = "VppConfig::default_stats_socket")]
    pub stats_socket: PathBuf,
}

impl VppConfig {
    fn default_api_socket() -> PathBuf {
        "/run/vpp/api.sock".into()
    }
    fn default_stats_socket() -> PathBuf {
        "/run/vpp/stats.sock".into()
    }
}

impl Default for VppConfig {
    fn default() -> Self {
        Self { api_socket: Self::default_api_socket(), stats_socket: Self::default_stats_socket() }
    }
}

/// DNS settings handed to pods in the CNI result.
#[derive(Debug, Deserialize, serde::Serialize, Default, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DnsConfig {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// Validated configuration of one node's agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Name of this node. Default: the host name.
    pub node_name: String,
    /// This node's pod subnet. When the file sets `podSubnet`, that; otherwise the node
    /// registry allocates it from `podSubnetCIDR` by node ID (10.1.<id>.0/24 by default).
    pub pod_subnet: Ipv4Net,
    /// True when `podSubnet` was set in the file (no allocation from the registry).
    pub pod_subnet_fixed: bool,
    /// The pods' gateway. Default: the first host address of `pod_subnet`.
    pub gateway: Ipv4Addr,
    /// True when `gateway` was set in the file.
    pub gateway_fixed: bool,
    /// The cluster's pod subnet, cut into per-node subnets. Default 10.1.0.0/16.
    pub pod_subnet_cidr: Ipv4Net,
    /// Prefix length of one node's subnet. Default 24.
    pub pod_prefix_len: u8,
    /// etcd endpoints of the cluster store; empty: the embedded store in `store_dir`.
    pub etcd_endpoints: Vec<String>,
    /// TLS towards etcd (`https://` endpoints): CA, client certificate and key.
    pub etcd_tls: Option<contiv_store::TlsConfig>,
    /// Who owns the uplink NIC. Default kernel.
    pub uplink: Uplink,
    /// VPP's sockets (used when `uplink` is vpp).
    pub vpp: VppConfig,
    /// Directory of the embedded store. Default `<stateDir>/store`.
    pub store_dir: PathBuf,
    /// Status endpoint (healthz, readyz, pods, vswitch, metrics). Default 127.0.0.1:9192.
    pub status_addr: std::net::SocketAddr,
    /// MAC address pods resolve the gateway to. Default 02:fe:00:00:00:01.
    pub gateway_mac: [u8; 6],
    /// MTU of pod interfaces. Default 1500.
    pub mtu: u32,
    /// The CNI gRPC socket (mode 0600). Default /run/contiv/cni.sock.
    pub cni_socket: PathBuf,
    /// Where the agent keeps its state (IPAM, attachments). Default /var/lib/contiv.
    pub state_dir: PathBuf,
    /// bpffs directory for pinned maps. Default /sys/fs/bpf/contiv.
    pub bpf_pin_dir: PathBuf,
    /// Host end of the slow-path port. Default cslow0.
    pub slowpath_host_ifname: String,
    /// vswitch end of the slow-path port (AF_XDP). Default cslow1.
    pub slowpath_vswitch_ifname: String,
    /// DNS for pods. Default: none.
    pub dns: DnsConfig,
}

pub const DEFAULT_POD_SUBNET: &str = "10.1.1.0/24";
pub const DEFAULT_POD_SUBNET_CIDR: &str = "10.1.0.0/16";
pub const DEFAULT_GATEWAY_MAC: [u8; 6] = [0x02, 0xfe, 0x00, 0x00, 0x00, 0x01];

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|source| ConfigError::Parse { path: PathBuf::from("<config>"), source: Box::new(source) })?;
        Self::from_raw(raw)
    }

    /// Adopts the subnet the node registry allocated (unless the file fixed one); the
    /// gateway follows it unless the file fixed that too.
    pub fn with_allocated_subnet(mut self, subnet: Ipv4Net) -> Result<Self, ConfigError> {
        if self.pod_subnet_fixed {
            return Ok(self);
        }
        self.pod_subnet = subnet.trunc();
        if !self.gateway_fixed {
            self.gateway = Ipv4Addr::from(u32::from(self.pod_subnet.network()) + 1);
        }
        if !self.pod_subnet.contains(&self.gateway) {
            return Err(ConfigError::Invalid(format!(
                "gateway {} is outside the allocated pod subnet {}",
                self.gateway, self.pod_subnet
            )));
        }
        Ok(self)
    }

    /// All defaults.
    pub fn defaults() -> Self {
        Self::from_raw(RawConfig::default()).expect("defaults are valid")
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let pod_subnet_fixed = raw.pod_subnet.is_some();
        let gateway_fixed = raw.gateway.is_some();
        let pod_subnet_cidr =
            raw.pod_subnet_cidr.unwrap_or_else(|| DEFAULT_POD_SUBNET_CIDR.parse().expect("valid default")).trunc();
        let pod_prefix_len = raw.pod_prefix_len.unwrap_or(24);
        if pod_prefix_len <= pod_subnet_cidr.prefix_len() || pod_prefix_len > 30 {
            return Err(ConfigError::Invalid(format!(
                "podPrefixLen {pod_prefix_len} must be longer than podSubnetCIDR {pod_subnet_cidr} and at most 30"
            )));
        }
        let store = contiv_store::StoreConfig {
            etcd_endpoints: raw.etcd_endpoints.clone().unwrap_or_default(),
            etcd_tls: raw.etcd_tls.clone(),
            ..contiv_store::StoreConfig::default()
        };
        if let Err(e) = store.validate() {
            let detail = e.to_string();
            let detail = detail.strip_prefix("invalid store configuration: ").unwrap_or(&detail);
            return Err(ConfigError::Invalid(format!("etcdEndpoints / [etcdTls]: {detail}")));
        }
        let uplink = raw.uplink.unwrap_or_default();
        if raw.vpp.is_some() && uplink != Uplink::Vpp {
            return Err(ConfigError::Invalid("the [vpp] table applies only with uplink = \"vpp\"".into()));
        }
        let pod_subnet = raw.pod_subnet.unwrap_or_else(|| DEFAULT_POD_SUBNET.parse().expect("valid default")).trunc();
        if pod_subnet.prefix_len() > 30 {
            return Err(ConfigError::Invalid(format!("podSubnet {pod_subnet} is too small: need at least a /30")));
        }
        let first_host = Ipv4Addr::from(u32::from(pod_subnet.network()) + 1);
        let gateway = raw.gateway.unwrap_or(first_host);
        if !pod_subnet.contains(&gateway) || gateway == pod_subnet.network() || gateway == pod_subnet.broadcast() {
            return Err(ConfigError::Invalid(format!(
                "gateway {gateway} must be a host address inside podSubnet {pod_subnet}"
            )));
        }
        let gateway_mac = match raw.gateway_mac {
            Some(s) => parse_mac(&s).ok_or_else(|| {
                ConfigError::Invalid(format!("gatewayMac {s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
            })?,
            None => DEFAULT_GATEWAY_MAC,
        };
        if gateway_mac[0] & 1 == 1 || gateway_mac == [0; 6] {
            return Err(ConfigError::Invalid("gatewayMac must be a unicast, non-zero MAC".into()));
        }
        let mtu = raw.mtu.unwrap_or(1500);
        if !(576..=9000).contains(&mtu) {
            return Err(ConfigError::Invalid(format!("mtu {mtu} out of range 576..=9000")));
        }
        let ifname = |v: Option<String>, default: &str, field: &str| -> Result<String, ConfigError> {
            let name = v.unwrap_or_else(|| default.to_owned());
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(ConfigError::Invalid(format!("{field} {name:?} is not a valid interface name")));
            }
            Ok(name)
        };
        let slowpath_host_ifname = ifname(raw.slowpath_host_ifname, "cslow0", "slowpathHostIfname")?;
        let slowpath_vswitch_ifname = ifname(raw.slowpath_vswitch_ifname, "cslow1", "slowpathVswitchIfname")?;
        if slowpath_host_ifname == slowpath_vswitch_ifname {
            return Err(ConfigError::Invalid("the two ends of the slow-path port need different names".into()));
        }
        let node_name = match raw.node_name {
            Some(n) if !n.is_empty() => n,
            Some(_) => return Err(ConfigError::Invalid("nodeName must not be empty".into())),
            None => {
                nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
            }
        };
        let state_dir = raw.state_dir.unwrap_or_else(|| "/var/lib/contiv".into());
        Ok(Self {
            node_name,
            pod_subnet,
            pod_subnet_fixed,
            gateway,
            gateway_fixed,
            pod_subnet_cidr,
            pod_prefix_len,
            etcd_endpoints: raw.etcd_endpoints.unwrap_or_default(),
            etcd_tls: raw.etcd_tls,
            uplink,
            vpp: raw.vpp.unwrap_or_default(),
            store_dir: raw.store_dir.unwrap_or_else(|| state_dir.join("store")),
            status_addr: raw.status_addr.unwrap_or_else(|| "127.0.0.1:9192".parse().expect("valid default")),
            gateway_mac,
            mtu,
            cni_socket: raw.cni_socket.unwrap_or_else(|| contiv_cni_api::DEFAULT_SOCKET.into()),
            state_dir,
            bpf_pin_dir: raw.bpf_pin_dir.unwrap_or_else(|| contiv_common::DEFAULT_PIN_DIR.into()),
            slowpath_host_ifname,
            slowpath_vswitch_ifname,
            dns: raw.dns.unwrap_or_default(),
        })
    }
}

impl AgentConfig {
    /// Where the cluster store is: etcd (with TLS when configured), else the embedded store.
    pub fn store_config(&self) -> contiv_store::StoreConfig {
        contiv_store::StoreConfig {
            etcd_endpoints: self.etcd_endpoints.clone(),
            embedded_path: self.store_dir.clone(),
            etcd_tls: self.etcd_tls.clone(),
            ..contiv_store::StoreConfig::default()
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = AgentConfig::from_toml("").unwrap();
        assert_eq!(c.pod_subnet.to_string(), "10.1.1.0/24");
        assert_eq!(c.gateway, Ipv4Addr::new(10, 1, 1, 1));
        assert_eq!(c.gateway_mac, DEFAULT_GATEWAY_MAC);
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.cni_socket, PathBuf::from("/run/contiv/cni.sock"));
        assert_eq!(c.bpf_pin_dir, PathBuf::from("/sys/fs/bpf/contiv"));
        assert_eq!(c.slowpath_host_ifname, "cslow0");
    }

    #[test]
    fn fields_are_read() {
        let c = AgentConfig::from_toml(
            r#"
            nodeName = "n1"
            podSubnet = "10.1.7.0/24"
            mtu = 1450
            gatewayMac = "02:aa:bb:cc:dd:ee"
            [dns]
            nameservers = ["10.96.0.10"]
            search = ["svc.cluster.local"]
            "#,
        )
        .unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.gateway, Ipv4Addr::new(10, 1, 7, 1));
        assert_eq!(c.mtu, 1450);
        assert_eq!(c.gateway_mac, [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
        assert_eq!(c.dns.nameservers, vec!["10.96.0.10"]);
    }

    #[test]
    fn bad_values_are_rejected_with_the_field_named() {
        for (text, needle) in [
            ("podSubnet = \"nonsense\"", "podSubnet"),
            ("unknownField = 1", "unknownField"),
            ("mtu = 10", "mtu"),
            ("gatewayMac = \"zz\"", "gatewayMac"),
            ("gatewayMac = \"01:00:00:00:00:01\"", "gatewayMac"),
            ("gateway = \"10.2.0.1\"", "gateway"),
            ("podSubnet = \"10.1.1.0/31\"", "podSubnet"),
            ("slowpathHostIfname = \"this-name-is-way-too-long\"", "slowpathHostIfname"),
            ("podPrefixLen = 8", "podPrefixLen"),
            ("etcdEndpoints = [\"127.0.0.1:2379\"]", "etcdEndpoints"),
            ("etcdEndpoints = [\"https://e:2379\"]", "TLS"),
            ("etcdEndpoints = [\"http://e:2379\"]\n[etcdTls]\ncaFile = \"/ca.pem\"", "http://"),
            ("etcdEndpoints = [\"https://e:2379\"]\n[etcdTls]\ncertFile = \"/c.pem\"", "caFile"),
            ("etcdEndpoints = [\"https://e:2379\"]\n[etcdTls]\ncaFile = \"/ca\"\ncertFile = \"/c\"", "key"),
            ("[etcdTls]\ncaFile = \"/ca\"\nbogus = 1", "bogus"),
            ("uplink = \"dpdk\"", "uplink"),
            ("[vpp]\napiSocket = \"/run/vpp/api.sock\"", "uplink"),
        ] {
            let err = AgentConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: error {err:?} should name {needle}");
        }
    }

    #[test]
    fn etcd_tls_and_vpp_uplink_are_read() {
        let c = AgentConfig::from_toml(
            r#"
            etcdEndpoints = ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"]
            uplink = "vpp"
            [etcdTls]
            caFile = "/etc/contiv/etcd-tls/ca.crt"
            certFile = "/etc/contiv/etcd-tls/tls.crt"
            keyFile = "/etc/contiv/etcd-tls/tls.key"
            [vpp]
            apiSocket = "/run/vpp/api.sock"
            "#,
        )
        .unwrap();
        let tls = c.etcd_tls.clone().expect("tls");
        assert_eq!(tls.ca_file, PathBuf::from("/etc/contiv/etcd-tls/ca.crt"));
        assert_eq!(tls.key_file, Some(PathBuf::from("/etc/contiv/etcd-tls/tls.key")));
        assert_eq!(c.uplink, Uplink::Vpp);
        assert_eq!(c.vpp.stats_socket, PathBuf::from("/run/vpp/stats.sock"));
        let store = c.store_config();
        assert_eq!(store.etcd_tls, Some(tls));
        assert_eq!(store.embedded_path, c.store_dir);
        assert_eq!(AgentConfig::from_toml("").unwrap().uplink, Uplink::Kernel);
    }

    #[test]
    fn allocated_subnet_applies_unless_fixed() {
        let c = AgentConfig::from_toml("").unwrap();
        assert!(!c.pod_subnet_fixed);
        assert_eq!(c.store_dir, PathBuf::from("/var/lib/contiv/store"));
        let c = c.with_allocated_subnet("10.1.7.0/24".parse().unwrap()).unwrap();
        assert_eq!(c.pod_subnet.to_string(), "10.1.7.0/24");
        assert_eq!(c.gateway, Ipv4Addr::new(10, 1, 7, 1));
        let fixed = AgentConfig::from_toml("podSubnet = \"10.9.0.0/24\"").unwrap();
        let fixed = fixed.with_allocated_subnet("10.1.7.0/24".parse().unwrap()).unwrap();
        assert_eq!(fixed.pod_subnet.to_string(), "10.9.0.0/24");
    }

    #[test]
    fn mac_round_trip() {
        let mac = parse_mac("02:fe:00:00:00:01").unwrap();
        assert_eq!(format_mac(&mac), "02:fe:00:00:00:01");
        assert!(parse_mac("02:fe:00:00:00").is_none());
        assert!(parse_mac("02:fe:00:00:00:01:02").is_none());
    }
}
