//! The node's persistent state: which pod attachments exist and which IP each holds.
//!
//! IPAM is derived from the attachments (an address is in use exactly when an
//! attachment holds it, or an ADD in flight has reserved it), so the two can never
//! disagree. Every change is durable before the CNI request is answered, so an agent
//! restart never reissues an address in use:
//!
//! - `state.json` is a snapshot, replaced atomically (write, fsync, rename, fsync dir);
//! - `state.log` is a journal of the changes since: one JSON line per change, appended
//!   and `fdatasync`ed (a small write to one file, several times cheaper than replacing
//!   the snapshot). Opening replays it and folds it into a new snapshot, as does every
//!   [`COMPACT_AFTER`]th change. Each line is a whole put or remove, so replaying the
//!   journal over a snapshot that already holds it (a crash between the two steps of a
//!   compaction) gives the same state. A last line cut short by a crash was never
//!   acknowledged and is dropped; any other bad line is corruption and stops the agent.
//!   After a failed write the journal may hold a change the agent undid, so the next
//!   write is a compaction, which rewrites the truth and empties the journal.
//!
//! An ADD's reservation ([`NodeState::reserve`]) is kept in memory only; the attachment
//! becomes durable once, when it is complete ([`NodeState::put`]), before the reply. An
//! address is handed out only by that reply, so a crash before the write loses nothing
//! that was handed out; what the unfinished ADD built (host veth, pinned link, map
//! entries) names no recorded attachment and the agent removes it when it starts.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// State file format version. 2: changes since the snapshot are in `state.log` (an agent
/// that knows only version 1 would ignore them, so it must refuse the file).
const STATE_VERSION: u32 = 2;

/// Journal records after which the next change rewrites the snapshot.
pub const COMPACT_AFTER: usize = 1024;

/// One change, a line of `state.log`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", tag = "op")]
enum Change {
    Put { attachment: Box<PodAttachment>, next_offset: u32 },
    Remove { key: AttachmentKey, next_offset: u32 },
}

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
    /// The pod subnet cannot spare an address for the host.
    #[error("pod subnet {0} is too small to spare an address for the host (/29 or larger needed)")]
    NoRoomForHost(Ipv4Net),
    /// The node holds as many pods as its datapath maps do.
    #[error("the node holds {0} pods, the most its datapath maps hold")]
    Full(u32),
}

/// The most pods a node holds: the datapath's pod maps are this big.
const MAX_PODS: u32 = contiv_common::MAX_PODS;

/// (container ID, interface name): how the runtime names an attachment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
    /// The pod network namespace's cookie (the socket-level service programs act only on
    /// this node's namespaces). 0: not known (recorded by an older agent).
    #[serde(default)]
    pub netns_cookie: u64,
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
    /// The host's address in the pod subnet ([`NodeState::host_address`]); an agent that
    /// does not know it reads the file the same and leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_address: Option<Ipv4Addr>,
}

/// The pod subnet the node's pods hold addresses of, as the state in `dir` records it:
/// `None` without a state, or when it records no pod (snapshot and journal empty), since
/// then nothing is lost if the node gets another subnet.
pub fn subnet_in_use(dir: &Path) -> Option<Ipv4Net> {
    let file: StateFile = serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()?;
    let journal = std::fs::metadata(dir.join("state.log")).is_ok_and(|m| m.len() > 0);
    (!file.attachments.is_empty() || journal).then_some(file.pod_subnet)
}

/// Attachments and address allocation for one node, persisted in `state.json`.
#[derive(Debug)]
pub struct NodeState {
    path: PathBuf,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    next_offset: u32,
    attachments: BTreeMap<AttachmentKey, PodAttachment>,
    /// The host's address in the pod subnet, once asked for ([`Self::host_address`]).
    host_address: Option<Ipv4Addr>,
    /// Addresses reserved by ADDs in flight (not persisted; see the module docs).
    reserved: BTreeMap<AttachmentKey, Ipv4Addr>,
    /// `state.log`, open for appending.
    journal: Option<File>,
    /// Records in the journal.
    journal_records: usize,
    /// A journal write failed: the next change compacts instead of appending.
    needs_compaction: bool,
    /// [`COMPACT_AFTER`] (tests lower it).
    compact_after: usize,
}

impl NodeState {
    /// Loads the state from `dir/state.json` and `dir/state.log` (or starts empty), and
    /// compacts them into a new snapshot.
    pub fn open(dir: &Path, subnet: Ipv4Net, gateway: Ipv4Addr) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Io { path: dir.to_owned(), source })?;
        let path = dir.join("state.json");
        let mut state = Self {
            path: path.clone(),
            subnet,
            gateway,
            next_offset: 0,
            attachments: BTreeMap::new(),
            host_address: None,
            reserved: BTreeMap::new(),
            journal: None,
            journal_records: 0,
            needs_compaction: false,
            compact_after: COMPACT_AFTER,
        };
        match std::fs::read(&path) {
            Ok(text) => state.load_snapshot(&text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StateError::Io { path, source }),
        }
        state.replay_journal()?;
        state.compact()?;
        Ok(state)
    }

    fn load_snapshot(&mut self, text: &[u8]) -> Result<(), StateError> {
        // Version 1 (no journal) reads the same.
        let file: StateFile = serde_json::from_slice(text)
            .map_err(|e| StateError::Corrupt { path: self.path.clone(), reason: e.to_string() })?;
        if !(1..=STATE_VERSION).contains(&file.version) {
            return Err(StateError::Corrupt {
                path: self.path.clone(),
                reason: format!("version {} (this agent reads 1 to {STATE_VERSION})", file.version),
            });
        }
        if file.pod_subnet != self.subnet {
            // Addresses outside the new subnet stay reserved until their pods go away.
            log::warn!(
                "pod subnet changed from {} to {}; existing pods keep their addresses",
                file.pod_subnet,
                self.subnet
            );
        }
        self.next_offset = file.next_offset;
        // One of another subnet is picked again when asked for.
        self.host_address = file.host_address.filter(|a| self.subnet.contains(a));
        for a in file.attachments {
            self.attachments.insert(a.key(), a);
        }
        Ok(())
    }

    fn journal_path(&self) -> PathBuf {
        self.path.with_file_name("state.log")
    }

    /// Applies `state.log` (if any) on top of the snapshot.
    fn replay_journal(&mut self) -> Result<(), StateError> {
        let path = self.journal_path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let mut lines = text.split_inclusive(|b| *b == b'\n').enumerate().peekable();
        while let Some((n, line)) = lines.next() {
            let last = lines.peek().is_none();
            let change = line
                .strip_suffix(b"\n")
                .ok_or_else(|| "cut short".to_owned())
                .and_then(|l| serde_json::from_slice::<Change>(l).map_err(|e| e.to_string()));
            match change {
                Ok(Change::Put { attachment, next_offset }) => {
                    self.attachments.insert(attachment.key(), *attachment);
                    self.next_offset = next_offset;
                }
                Ok(Change::Remove { key, next_offset }) => {
                    self.attachments.remove(&key);
                    self.next_offset = next_offset;
                }
                // The write a crash interrupted: it was never acknowledged.
                Err(reason) if last => log::warn!("{}: dropping an unfinished last record ({reason})", path.display()),
                Err(reason) => {
                    return Err(StateError::Corrupt { path, reason: format!("line {}: {reason}", n + 1) });
                }
            }
        }
        Ok(())
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

    /// Picks a free address (not network, gateway, broadcast, held by an attachment or
    /// reserved by an ADD in flight).
    pub fn allocate_ip(&mut self) -> Result<Ipv4Addr, StateError> {
        let base = u32::from(self.subnet.network());
        // The configuration keeps the subnet between /16 and /30, so this cannot overflow;
        // checked anyway, as a shift by 32 would.
        let size =
            1u32.checked_shl(32 - u32::from(self.subnet.prefix_len())).ok_or(StateError::Exhausted(self.subnet))?;
        if self.pods_addresses().len() >= MAX_PODS as usize {
            return Err(StateError::Full(MAX_PODS));
        }
        let used = self.used_addresses();
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

    /// Addresses held by an attachment or reserved by an ADD in flight, and the host's.
    fn used_addresses(&self) -> std::collections::HashSet<Ipv4Addr> {
        let mut used = self.pods_addresses();
        used.extend(self.host_address);
        used
    }

    /// Addresses held by an attachment or reserved by an ADD in flight.
    fn pods_addresses(&self) -> std::collections::HashSet<Ipv4Addr> {
        self.attachments.values().map(|a| a.ip).chain(self.reserved.values().copied()).collect()
    }

    /// The host's address in the pod subnet (`uplink = "vpp"`: the source of the host's
    /// traffic to other nodes' pods, which comes back through their tunnels like traffic to
    /// this node's pods; see vpp_host.rs). The one recorded, unless a pod holds it (an
    /// agent that did not know it handed it out) or it became the gateway; else the highest
    /// host address of the subnet no pod holds, other than the gateway, recorded in the
    /// snapshot before it is returned. No pod gets it while it is recorded. A subnet smaller
    /// than a /29 keeps its few addresses for pods.
    pub fn host_address(&mut self) -> Result<Ipv4Addr, StateError> {
        if self.subnet.prefix_len() > 29 {
            return Err(StateError::NoRoomForHost(self.subnet));
        }
        let pods = self.pods_addresses();
        let (network, broadcast) = (u32::from(self.subnet.network()), u32::from(self.subnet.broadcast()));
        let usable = |ip: &Ipv4Addr| {
            (network + 1..broadcast).contains(&u32::from(*ip)) && *ip != self.gateway && !pods.contains(ip)
        };
        if let Some(a) = self.host_address.filter(|a| usable(a)) {
            return Ok(a);
        }
        let picked = (network + 1..broadcast)
            .rev()
            .map(Ipv4Addr::from)
            .find(usable)
            .ok_or(StateError::Exhausted(self.subnet))?;
        let previous = self.host_address.replace(picked);
        if let Err(e) = self.compact() {
            self.host_address = previous;
            self.repair();
            return Err(e);
        }
        Ok(picked)
    }

    /// Gives the host's address back to the pods (a node no longer in `uplink = "vpp"`).
    pub fn forget_host_address(&mut self) -> Result<(), StateError> {
        let Some(previous) = self.host_address.take() else { return Ok(()) };
        if let Err(e) = self.compact() {
            self.host_address = Some(previous);
            self.repair();
            return Err(e);
        }
        Ok(())
    }

    /// How many addresses an ADD could still get (not network, gateway, broadcast, held or
    /// reserved).
    pub fn free_addresses(&self) -> u32 {
        let size = 1u64 << (32 - u32::from(self.subnet.prefix_len()));
        let used = self.used_addresses();
        let unusable = 2 + u64::from(self.subnet.contains(&self.gateway) && !used.contains(&self.gateway));
        let in_subnet = size.saturating_sub(unusable + used.len() as u64);
        // The host's address is not a pod's: the pod maps' size caps pods only.
        in_subnet.min(u64::from(MAX_PODS).saturating_sub(self.pods_addresses().len() as u64)) as u32
    }

    /// Reserves a free address for the ADD of `key`, in memory only: it is not handed out
    /// again until [`Self::release`] or [`Self::put`] of that key.
    pub fn reserve(&mut self, key: &AttachmentKey) -> Result<Ipv4Addr, StateError> {
        let ip = self.allocate_ip()?;
        self.reserved.insert(key.clone(), ip);
        Ok(ip)
    }

    /// Drops the reservation of a failed ADD.
    pub fn release(&mut self, key: &AttachmentKey) {
        self.reserved.remove(key);
    }

    /// Records (or replaces) an attachment and persists; its reservation becomes the record.
    /// If persisting fails the attachment is not recorded (the reservation stays).
    pub fn put(&mut self, attachment: PodAttachment) -> Result<(), StateError> {
        let key = attachment.key();
        let previous = self.attachments.insert(key.clone(), attachment.clone());
        if let Err(e) = self.log(Change::Put { attachment: Box::new(attachment), next_offset: self.next_offset }) {
            match previous {
                Some(p) => self.attachments.insert(key, p),
                None => self.attachments.remove(&key),
            };
            self.repair();
            return Err(e);
        }
        self.reserved.remove(&key);
        Ok(())
    }

    /// Forgets an attachment (its address becomes free) and persists. If persisting fails
    /// the attachment stays.
    pub fn remove(&mut self, key: &AttachmentKey) -> Result<Option<PodAttachment>, StateError> {
        let Some(removed) = self.attachments.remove(key) else {
            return Ok(None);
        };
        if let Err(e) = self.log(Change::Remove { key: key.clone(), next_offset: self.next_offset }) {
            self.attachments.insert(key.clone(), removed);
            self.repair();
            return Err(e);
        }
        Ok(Some(removed))
    }

    /// Makes `change` (already applied in memory) durable: a journal append, or a
    /// compaction when one is due.
    fn log(&mut self, change: Change) -> Result<(), StateError> {
        if self.needs_compaction || self.journal_records >= self.compact_after || self.journal.is_none() {
            return self.compact();
        }
        let path = self.journal_path();
        let mut line = serde_json::to_vec(&change).expect("a change serializes");
        line.push(b'\n');
        let journal = self.journal.as_mut().expect("checked above");
        match journal.write_all(&line).and_then(|()| journal.sync_data()) {
            Ok(()) => {
                self.journal_records += 1;
                Ok(())
            }
            Err(source) => {
                self.needs_compaction = true;
                Err(StateError::Io { path, source })
            }
        }
    }

    /// After a failed write: rewrite the in-memory truth (the change undone) now if the disk
    /// lets us, so the journal cannot hold a change that was reported as failed.
    fn repair(&mut self) {
        if self.needs_compaction
            && let Err(e) = self.compact()
        {
            log::error!("state: {e}; retrying with the next change");
        }
    }

    /// Writes a new snapshot and empties the journal.
    fn compact(&mut self) -> Result<(), StateError> {
        self.needs_compaction = true;
        self.write_snapshot()?;
        let path = self.journal_path();
        let io = |source| StateError::Io { path: path.clone(), source };
        let journal = match self.journal.take() {
            Some(j) => j,
            None => {
                let j = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
                if let Some(dir) = path.parent() {
                    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
                }
                j
            }
        };
        journal.set_len(0).and_then(|()| journal.sync_all()).map_err(io)?;
        self.journal = Some(journal);
        self.journal_records = 0;
        self.needs_compaction = false;
        Ok(())
    }

    fn write_snapshot(&self) -> Result<(), StateError> {
        let file = StateFile {
            version: STATE_VERSION,
            pod_subnet: self.subnet,
            next_offset: self.next_offset,
            attachments: self.attachments.values().cloned().collect(),
            host_address: self.host_address,
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("state serializes");
        replace_durably(&self.path, &bytes).map_err(|source| StateError::Io { path: self.path.clone(), source })
    }
}

/// Replaces the file at `path` with `bytes` through `<path>.tmp`, synced, renamed over it,
/// and the directory synced: a crash leaves the old file or the new one, whole.
pub fn replace_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all())?;
    }
    Ok(())
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
            netns_cookie: 0,
        }
    }

    fn open(dir: &Path, subnet: &str) -> NodeState {
        let subnet: Ipv4Net = subnet.parse().unwrap();
        let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        NodeState::open(dir, subnet, gw).unwrap()
    }

    /// Only a state that holds pods pins the node's subnet (cluster::join).
    #[test]
    fn the_subnet_in_use_is_recorded_only_while_pods_hold_addresses() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(subnet_in_use(dir.path()), None, "no state");
        let mut s = open(dir.path(), "10.1.3.0/24");
        assert_eq!(subnet_in_use(dir.path()), None, "no pod");
        let ip = s.allocate_ip().unwrap();
        s.put(attachment("a", ip)).unwrap();
        assert_eq!(subnet_in_use(dir.path()), Some("10.1.3.0/24".parse().unwrap()), "a pod, in the journal");
        drop(s);
        let _reopened = open(dir.path(), "10.1.3.0/24");
        assert_eq!(subnet_in_use(dir.path()), Some("10.1.3.0/24".parse().unwrap()), "a pod, in the snapshot");
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
    fn reservations_are_not_handed_out_twice_and_not_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/29");
        let (ka, kb) = (AttachmentKey::new("a", "eth0"), AttachmentKey::new("b", "eth0"));
        let a = s.reserve(&ka).unwrap();
        let b = s.reserve(&kb).unwrap();
        assert_ne!(a, b);
        s.put(attachment("a", a)).unwrap();
        // b is still in flight: a restart forgets it (its ADD never answered) but keeps a.
        let mut reopened = open(dir.path(), "10.1.1.0/29");
        assert!(reopened.get(&ka).is_some());
        assert_ne!(reopened.allocate_ip().unwrap(), a);
        // Released, b's address is free again; the in-memory state never repeats a or b meanwhile.
        for _ in 0..3 {
            let ip = s.reserve(&AttachmentKey::new("x", "eth0")).unwrap();
            assert!(ip != a && ip != b);
            s.release(&AttachmentKey::new("x", "eth0"));
        }
        s.release(&kb);
    }

    #[test]
    fn free_addresses_count_down_to_zero_with_allocations() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/29");
        assert_eq!(s.free_addresses(), 5, "8 less network, gateway, broadcast");
        let a = s.allocate_ip().unwrap();
        s.put(attachment("a", a)).unwrap();
        s.reserve(&AttachmentKey::new("b", "eth0")).unwrap();
        assert_eq!(s.free_addresses(), 3);
        for c in ["c", "d", "e"] {
            s.reserve(&AttachmentKey::new(c, "eth0")).unwrap();
        }
        assert_eq!(s.free_addresses(), 0);
        assert!(s.allocate_ip().is_err(), "agrees with the allocator");
    }

    #[test]
    fn the_hosts_address_is_the_highest_free_one_kept_across_restarts_and_never_a_pods() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/29");
        assert_eq!(s.free_addresses(), 5);
        let host = s.host_address().unwrap();
        assert_eq!(host, Ipv4Addr::new(10, 1, 1, 6), "the highest host address");
        assert_eq!(s.host_address().unwrap(), host, "the same when asked again");
        assert_eq!(s.free_addresses(), 4, "one fewer for pods");
        let mut pods = vec![];
        while let Ok(ip) = s.allocate_ip() {
            s.put(attachment(&pods.len().to_string(), ip)).unwrap();
            pods.push(ip);
        }
        assert_eq!(pods, (2..=5).map(|i| Ipv4Addr::new(10, 1, 1, i)).collect::<Vec<_>>(), "never the host's");
        drop(s);
        // Recorded before it was returned: a restart keeps it and still hands it to no pod.
        let mut s = open(dir.path(), "10.1.1.0/29");
        assert_eq!(s.host_address().unwrap(), host);
        assert!(matches!(s.allocate_ip(), Err(StateError::Exhausted(_))));
        // A pod holding it (an agent that did not know it handed it out): another is picked.
        s.remove(&AttachmentKey::new("3", "eth0")).unwrap();
        s.remove(&AttachmentKey::new("1", "eth0")).unwrap();
        s.host_address = None;
        let taken = s.allocate_ip().unwrap();
        assert_eq!(taken, host, "without a recorded host address, a pod may get it");
        s.put(attachment("x", taken)).unwrap();
        s.host_address = Some(host);
        assert_eq!(s.host_address().unwrap(), Ipv4Addr::new(10, 1, 1, 5), "the highest one no pod holds");
        drop(s);
        assert_eq!(open(dir.path(), "10.1.1.0/29").host_address().unwrap(), Ipv4Addr::new(10, 1, 1, 5));
        // Another subnet: one of its own.
        let mut s = open(dir.path(), "10.1.2.0/29");
        assert_eq!(s.host_address().unwrap(), Ipv4Addr::new(10, 1, 2, 6));
        drop(s);
        // The gateway moved onto it: another one.
        let subnet = "10.1.2.0/29".parse().unwrap();
        let mut s = NodeState::open(dir.path(), subnet, Ipv4Addr::new(10, 1, 2, 6)).unwrap();
        assert_eq!(s.host_address().unwrap(), Ipv4Addr::new(10, 1, 2, 5));
        drop(s);
        // A node no longer in VPP mode gives it back.
        let back = tempfile::tempdir().unwrap();
        let mut s = open(back.path(), "10.1.4.0/29");
        s.host_address().unwrap();
        assert_eq!(s.free_addresses(), 4, "8 less network, gateway, broadcast and the host's");
        s.forget_host_address().unwrap();
        drop(s);
        assert_eq!(open(back.path(), "10.1.4.0/29").free_addresses(), 5, "given back for good");
        // A /30 has one address besides the gateway: the pods keep it.
        let small = tempfile::tempdir().unwrap();
        let mut s = open(small.path(), "10.1.3.0/30");
        assert!(matches!(s.host_address(), Err(StateError::NoRoomForHost(_))));
        assert_eq!(s.free_addresses(), 1);
    }

    /// A pod subnet bigger than the datapath's pod maps: addresses stop at their size.
    #[test]
    fn a_node_holds_no_more_pods_than_its_maps() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.0.0/19");
        assert_eq!(s.free_addresses(), MAX_PODS, "8190 addresses, {MAX_PODS} pods");
        for i in 0..MAX_PODS {
            s.reserve(&AttachmentKey::new(format!("c{i}"), "eth0")).unwrap();
        }
        assert_eq!(s.free_addresses(), 0);
        let err = s.reserve(&AttachmentKey::new("one-more", "eth0")).unwrap_err();
        assert!(matches!(err, StateError::Full(MAX_PODS)), "{err}");
        s.release(&AttachmentKey::new("c7", "eth0"));
        assert_eq!(s.free_addresses(), 1);
        s.reserve(&AttachmentKey::new("one-more", "eth0")).unwrap();
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

    fn journal_lines(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join("state.log")).unwrap().lines().count()
    }

    #[test]
    fn changes_are_journaled_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/24");
        for id in ["a", "b", "c"] {
            let ip = s.allocate_ip().unwrap();
            s.put(attachment(id, ip)).unwrap();
        }
        s.remove(&AttachmentKey::new("b", "eth0")).unwrap();
        assert_eq!(journal_lines(dir.path()), 4, "one appended line per change, no snapshot rewrite");
        let snapshot: StateFile =
            serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
        assert!(snapshot.attachments.is_empty());
        drop(s);
        let mut s = open(dir.path(), "10.1.1.0/24");
        let ids: Vec<String> = s.attachments().map(|a| a.container_id.clone()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(journal_lines(dir.path()), 0, "opening folds the journal into the snapshot");
        // The allocator continues where it left off.
        assert_eq!(s.allocate_ip().unwrap(), Ipv4Addr::new(10, 1, 1, 5));
    }

    #[test]
    fn journal_lines_are_camel_case_like_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/24");
        let ip = s.allocate_ip().unwrap();
        s.put(attachment("a", ip)).unwrap();
        s.remove(&AttachmentKey::new("a", "eth0")).unwrap();
        let text = std::fs::read_to_string(dir.path().join("state.log")).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["op"], "put");
        assert_eq!(lines[0]["attachment"]["containerId"], "a");
        assert_eq!(lines[0]["nextOffset"], 3);
        assert_eq!(
            lines[1],
            serde_json::json!({"op": "remove", "key": {"containerId": "a", "ifname": "eth0"}, "nextOffset": 3})
        );
    }

    #[test]
    fn compaction_crash_replays_to_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/24");
        let a = s.allocate_ip().unwrap();
        s.put(attachment("a", a)).unwrap();
        s.remove(&AttachmentKey::new("a", "eth0")).unwrap();
        let b = s.allocate_ip().unwrap();
        s.put(attachment("b", b)).unwrap();
        let journal = std::fs::read(dir.path().join("state.log")).unwrap();
        drop(s);
        // Reopening compacts; put the old journal back as if the truncate never happened.
        drop(open(dir.path(), "10.1.1.0/24"));
        std::fs::write(dir.path().join("state.log"), journal).unwrap();
        let s = open(dir.path(), "10.1.1.0/24");
        let held: Vec<(String, Ipv4Addr)> = s.attachments().map(|x| (x.container_id.clone(), x.ip)).collect();
        assert_eq!(held, [("b".to_owned(), b)]);
    }

    #[test]
    fn an_unfinished_last_record_is_dropped_but_a_bad_one_before_it_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/24");
        let a = s.allocate_ip().unwrap();
        s.put(attachment("a", a)).unwrap();
        drop(s);
        let log = dir.path().join("state.log");
        let good = std::fs::read_to_string(&log).unwrap();
        let torn = format!("{good}{}", &good[..good.len() / 2]);
        std::fs::write(&log, &torn).unwrap();
        let s = open(dir.path(), "10.1.1.0/24");
        assert_eq!(s.len(), 1);
        drop(s);
        std::fs::write(&log, format!("{{\"op\":\"nonsense\"}}\n{good}")).unwrap();
        let err = NodeState::open(dir.path(), "10.1.1.0/24".parse().unwrap(), Ipv4Addr::new(10, 1, 1, 1)).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }) && err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn compacts_every_n_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/24");
        s.compact_after = 3;
        for id in ["a", "b", "c", "d"] {
            let ip = s.allocate_ip().unwrap();
            s.put(attachment(id, ip)).unwrap();
        }
        assert_eq!(journal_lines(dir.path()), 0, "the 4th change rewrote the snapshot");
        let snapshot: StateFile =
            serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
        assert_eq!(snapshot.attachments.len(), 4);
    }

    #[test]
    fn a_failed_write_is_undone_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), "10.1.1.0/24");
        let a = s.allocate_ip().unwrap();
        // A journal that cannot be written (read-only fd): the put fails and is not recorded.
        s.journal = Some(File::open(dir.path().join("state.log")).unwrap());
        assert!(s.put(attachment("a", a)).is_err());
        assert!(s.get(&AttachmentKey::new("a", "eth0")).is_none());
        // The disk works again: the next change compacts, and only it is on disk.
        s.journal = None;
        let b = s.allocate_ip().unwrap();
        s.put(attachment("b", b)).unwrap();
        drop(s);
        let s = open(dir.path(), "10.1.1.0/24");
        let ids: Vec<String> = s.attachments().map(|x| x.container_id.clone()).collect();
        assert_eq!(ids, ["b"]);
    }

    #[test]
    fn version_1_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = serde_json::json!({"version": 1, "podSubnet": "10.1.1.0/24", "nextOffset": 3,
            "attachments": [serde_json::to_value(attachment("old", Ipv4Addr::new(10, 1, 1, 2))).unwrap()]});
        std::fs::write(dir.path().join("state.json"), v1.to_string()).unwrap();
        let s = open(dir.path(), "10.1.1.0/24");
        assert_eq!(s.get(&AttachmentKey::new("old", "eth0")).unwrap().ip, Ipv4Addr::new(10, 1, 1, 2));
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        let err = NodeState::open(dir.path(), "10.1.1.0/24".parse().unwrap(), Ipv4Addr::new(10, 1, 1, 1)).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
    }
}
