//! The fake's message table: every generated message numbered as VPP numbers them
//! (memclnt first from 1, then each file in order), optionally padded with synthetic
//! entries to the size of a full VPP build's table, and with CRC overrides for tests.

use std::collections::HashMap;

use contiv_vpp_binapi::{MessageInfo, api};

/// Entries in a full VPP build's table (the VPP tree has ~1,610 `define`s plus ~575
/// `autoreply` replies across all `.api` files; a full build lists about this many).
pub const FULL_TABLE_SIZE: usize = 2200;

/// Module names used to make synthetic padding entries look like a real table.
const PAD_MODULES: &[&str] = &[
    "ipsec",
    "ikev2",
    "wireguard",
    "lisp",
    "gtpu",
    "srv6",
    "mpls",
    "bier",
    "bond",
    "lacp",
    "lldp",
    "dhcp",
    "dns",
    "flowprobe",
    "gre",
    "geneve",
    "ipip",
    "l2tp",
    "map",
    "nsh",
    "policer",
    "qos",
    "span",
    "stats",
    "udp",
    "vhost",
    "virtio",
    "vrrp",
    "cnat",
    "pnat",
    "det44",
    "nat64",
    "dslite",
    "pppoe",
    "rdma",
    "avf",
    "crypto",
    "session",
];
const PAD_OBJECTS: &[&str] = &["tunnel", "policy", "entry", "profile", "table", "session", "binding", "peer", "sa"];
const PAD_VERBS: &[&str] =
    &["add_del", "dump", "details", "enable_disable", "set", "get", "get_reply", "add_del_reply"];

/// The table a fake server hands out at `sockclnt_create`.
#[derive(Debug, Clone)]
pub struct ServerTable {
    /// `(id, name_crc)` in id order.
    pub entries: Vec<(u16, String)>,
    by_id: Vec<Option<&'static MessageInfo>>,
    ids_by_name: HashMap<&'static str, u16>,
    first_by_module: HashMap<String, (u16, u32)>,
}

impl ServerTable {
    /// Numbers every generated message; `crc_overrides` lists a message under another CRC
    /// (as a server with a different definition would); `pad_to` adds synthetic entries.
    pub fn new(crc_overrides: &[(String, u32)], pad_to: Option<usize>) -> Self {
        let mut entries = Vec::new();
        let mut by_id = vec![None];
        let mut ids_by_name = HashMap::new();
        let mut first_by_module = HashMap::new();
        for (i, info) in api::MESSAGES.iter().enumerate() {
            let id = (i + 1) as u16;
            let crc = crc_overrides.iter().find(|(n, _)| n == info.name).map(|(_, c)| *c).unwrap_or(info.crc);
            entries.push((id, format!("{}_{crc:08x}", info.name)));
            by_id.push(Some(info));
            ids_by_name.insert(info.name, id);
            if info.index_in_module == 0 {
                let crc = api::MODULES.iter().find(|m| m.name == info.module).map(|m| m.crc).unwrap_or(0);
                first_by_module.insert(info.module.to_owned(), (id, crc));
            }
        }
        if let Some(target) = pad_to {
            let mut n = 0usize;
            while entries.len() < target {
                let id = (entries.len() + 1) as u16;
                let module = PAD_MODULES[n % PAD_MODULES.len()];
                let object = PAD_OBJECTS[(n / PAD_MODULES.len()) % PAD_OBJECTS.len()];
                let verb = PAD_VERBS[(n / (PAD_MODULES.len() * PAD_OBJECTS.len())) % PAD_VERBS.len()];
                let round = n / (PAD_MODULES.len() * PAD_OBJECTS.len() * PAD_VERBS.len());
                let suffix = if round == 0 { String::new() } else { format!("_v{}", round + 1) };
                // A deterministic, CRC-looking number (FNV-1a of the name).
                let name = format!("{module}_{object}_{verb}{suffix}");
                let crc = name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
                entries.push((id, format!("{name}_{crc:08x}")));
                by_id.push(None);
                n += 1;
            }
        }
        Self { entries, by_id, ids_by_name, first_by_module }
    }

    /// The message behind an id (None for synthetic padding and unknown ids).
    pub fn info(&self, id: u16) -> Option<&'static MessageInfo> {
        self.by_id.get(id as usize).copied().flatten()
    }

    /// The id of a message by name.
    pub fn id(&self, name: &str) -> Option<u16> {
        self.ids_by_name.get(name).copied()
    }

    /// `get_first_msg_id`: the first id of a module given as `name_crc`.
    pub fn first_msg_id(&self, module_crc: &str) -> Option<u16> {
        let (module, crc) = module_crc.rsplit_once('_')?;
        let (first, module_crc) = self.first_by_module.get(module)?;
        (u32::from_str_radix(crc, 16).ok()? == *module_crc).then_some(*first)
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty (never: memclnt is always there).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memclnt_is_numbered_first_and_padding_reaches_full_size() {
        let t = ServerTable::new(&[], Some(FULL_TABLE_SIZE));
        assert_eq!(t.len(), FULL_TABLE_SIZE);
        assert_eq!(t.id("sockclnt_create"), Some(15));
        assert_eq!(t.id("control_ping_reply"), Some(24));
        let names: std::collections::HashSet<&str> = t.entries.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names.len(), FULL_TABLE_SIZE, "names are unique");
        assert!(t.entries.iter().all(|(_, n)| n.len() < 64), "names fit the table's 64-byte field");
        assert_eq!(t.first_msg_id("memclnt_b197c551"), Some(1));
        assert_eq!(t.first_msg_id("memclnt_00000000"), None);
    }

    #[test]
    fn an_override_lists_the_message_under_another_crc() {
        let t = ServerTable::new(&[("sw_interface_dump".into(), 0xdead_beef)], None);
        assert!(t.entries.iter().any(|(_, n)| n == "sw_interface_dump_deadbeef"));
        assert!(!t.entries.iter().any(|(_, n)| n == "sw_interface_dump_aa610c27"));
    }
}
