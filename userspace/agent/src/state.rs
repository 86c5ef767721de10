//! The node's persistent state: which pod attachments exist and which IP each holds.
//!
//! IPAM is derived from the attachments (an address is in use exactly when an
//! attachment holds it), so the two can never disagree. The file is replaced
//! atomically (write, fsync, rename, fsync dir) after every change, before the
//! CNI request is answered, so an agent restart never reissues an address in use.

use std::{
    collections::BTreeMap,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// State file format version.
const STATE_VERSION: u32 = 1;

/// Errors reading or writing the state file, or allocating addresses.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state file could not be read or written.
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state file exists but is not ours or is corrupt.
    #[error("state file {path} is unreadable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// No free address is left in the pod subnet.
    #[error("no free address left in pod subnet {0}")]
    Exhausted(Ipv4Net),
}

/// (container ID, interface name): how the runtime names an attachment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Self { container_id: container_id.into(), ifname: ifname.into() }
    }
}

/// One pod interface wired by this agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAttachment {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub network_name: String,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    /// 0 until the interface exists.
    pub host_ifindex: u32,
    pub host_mac: String,
    pub pod_mac: String,
    /// False while ADD is still wiring it (a crash leaves it for cleanup).
    pub complete: bool,
    /// MTU the pod interface got.
    #[serde(default)]
    pub mtu: u32,
    /// DNS handed to the pod (from the network config, else the agent's).
    #[serde(default)]
    pub dns: crate::config::DnsConfig,
    /// The Pod object this attachment belongs to (`K8S_POD_NAMESPACE`/`K8S_POD_NAME` in
    /// `CNI_ARGS`, as a runtime under kubelet passes them); empty when the runtime gave none.
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    /// Rate limits from the runtime's `bandwidth` capability, if any.
    #[serde(default)]
    pub bandwidth: Option<crate::bandwidth::BandwidthLimits>,
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`); empty when absent.
pub fn pod_identity(cni_args: &str) -> (String, String) {
    let mut ns = String::new();
    let mut name = String::new();
    for (k, v) in cni_args.split(';').filter_map(|kv| kv.split_once('=')) {
        match k.trim() {
            "K8S_POD_NAMESPACE" => ns = v.trim().to_owned(),
            "K8S_POD_NAME" => name = v.trim().to_owned(),
            _ => {}
        }
    }
    (ns, name)
}

impl PodAttachment {
    pub fn key(&self) -> AttachmentKey {
        AttachmentKey::new(&self.container_id, &self.ifname)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateFile {
    version: u32,
    pod_subnet: Ipv4Net,
    /// Where the next allocation search starts (round robin, so a just-freed
    /// address is not handed out again at once).
    next_offset: u32,
    attachments: Vec<PodAttachment>,
}

/// Attachments and address allocation for one node, persisted in `state.json`.
#[derive(Debug)]
pub struct NodeState {
    path: PathBuf,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    next_offset: u32,
    attachments: BTreeMap<AttachmentKey, PodAttachment>,
}

impl NodeState {
    /// Loads the state from `dir/state.json`, or starts empty if there is none.
    pub fn open(dir: &Path, subnet: Ipv4Net, gateway: Ipv4Addr) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Io { path: dir.to_owned(), source })?;
        let path = dir.join("state.json");
        let mut state = Self { path: path.clone(), subnet, gateway, next_offset: 0, attachments: BTreeMap::new() };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(state),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let file: StateFile = serde_json::from_slice(&text)
            .map_err(|e| StateError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        if file.version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path,
                reason: format!("version {} (expected {STATE_VERSION})", file.version),
            });
        }
        if file.pod_subnet != subnet {
            // Addresses outside the new subnet stay reserved until their pods go away.
            log::warn!("pod subnet changed from {} to {subnet}; existing pods keep their addresses", file.pod_subnet);
        }
        state.next_offset = file.next_offset;
        for a in file.attachments {
            state.attachments.insert(a.key(), a);
        }
        Ok(state)
    }

    pub fn get(&self, key: &AttachmentKey) -> Option<&PodAttachment> {
        self.attachments.get(key)
    }

    pub fn attachments(&self) -> impl Iterator<Item = &PodAttachment> {
        self.attachments.values()
    }

    pub fn len(&self) -> usize {
        self.attachments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attachments.is_empty()
    }

    /// Picks a free address (not network, gateway, broadcast, or held by an attachment).
    pub fn allocate_ip(&mut self) -> Result<Ipv4Addr, StateError> {
        let base = u32::from(self.subnet.network());
        let size = 1u32 << (32 - self.subnet.prefix_len());
        let used: std::collections::HashSet<Ipv4Addr> = self.attachments.values().map(|a| a.ip).collect();
        for i in 0..size {
            let offset = (self.next_offset + i) % size;
            let ip = Ipv4Addr::from(base + offset);
            if offset == 0 || offset == size - 1 || ip == self.gateway || used.contains(&ip) {
                continue;
            }
            self.next_offset = (offset + 1) % size;
            return Ok(ip);
        }
        Err(StateError::Exhausted(self.subnet))
    }

    /// Records (or replaces) an attachment and persists.
    pub fn put(&mut self, attachment: PodAttachment) -> Result<(), StateError> {
        self.attachments.insert(attachment.key(), attachment);
        self.save()
    }

    /// Forgets an attachment (its address becomes free) and persists.
    pub fn remove(&mut self, key: &AttachmentKey) -> Result<Option<PodAttachment>, StateError> {
        let removed = self.attachments.remove(key);
        if removed.is_some() {
            self.save()?;
        }
        Ok(removed)
    }

    fn save(&self) -> Result<(), StateError> {
        let file = StateFile {
            version: STATE_VERSION,
            pod_subnet: self.subnet,
            next_offset: self.next_offset,
            attachments: self.attachments.values().cloned().collect(),
        };
        let io = |source| StateError::Io { path: self.path.clone(), source };
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&serde_json::to_vec_pretty(&file).expect("state serializes")).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(id: &str, ip: Ipv4Addr) -> PodAttachment {
        PodAttachment {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            network_name: "contiv".into(),
            ip,
            host_ifname: format!("cv{id}"),
            host_ifindex: 7,
            host_mac: "02:00:00:00:00:01".into(),
            pod_mac: "02:00:00:00:00:02".into(),
            complete: true,
            mtu: 1500,
            dns: Default::default(),
            pod_namespace: "default".into(),
            pod_name: id.into(),
            bandwidth: None,
        }
    }

    fn open(dir: &Path, subnet: &str) -> NodeState {
        let subnet: Ipv4Net = subnet.parse().unwrap();
        let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        NodeState::open(dir, subnet, gw).unwrap()
    }

    #[test]
    fn skips_network_gateway_broadcast_and_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/29");
        let mut got = vec![];
        while let Ok(ip) = s.allocate_ip() {
            s.put(attachment(&got.len().to_string(), ip)).unwrap();
            got.push(ip);
        }
        let expect: Vec<Ipv4Addr> = (2..=6).map(|i| Ipv4Addr::new(10, 1, 1, i)).collect();
        assert_eq!(got, expect);
        assert!(matches!(s.allocate_ip(), Err(StateError::Exhausted(_))));
    }

    #[test]
    fn freed_address_is_not_reused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/24");
        let a = s.allocate_ip().unwrap();
        s.put(attachment("a", a)).unwrap();
        s.remove(&AttachmentKey::new("a", "eth0")).unwrap();
        let b = s.allocate_ip().unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn pod_identity_comes_from_cni_args() {
        assert_eq!(
            pod_identity("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_INFRA_CONTAINER_ID=abc"),
            ("shop".to_owned(), "cart-0".to_owned())
        );
        assert_eq!(pod_identity(""), (String::new(), String::new()));
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/24");
        let a = s.allocate_ip().unwrap();
        s.put(attachment("a", a)).unwrap();
        drop(s);
        let mut s = open(dir.path(), "10.1.1.0/24");
        assert_eq!(s.get(&AttachmentKey::new("a", "eth0")).unwrap().ip, a);
        let b = s.allocate_ip().unwrap();
        assert_ne!(a, b, "an address in use must never be reissued after restart");
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        let err = NodeState::open(dir.path(), "10.1.1.0/24".parse().unwrap(), Ipv4Addr::new(10, 1, 1, 1)).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
    }
}
