//! Pod CIDR per node, derived from the node ID as the original Contiv IPAM did: node `N` gets
//! the `N`th subnet of length `pod_prefix_len` inside `pod_subnet_cidr` (10.1.0.0/16 and /24:
//! node 1 -> 10.1.1.0/24, node 2 -> 10.1.2.0/24, ..., node 255 -> 10.1.255.0/24). ID 0 is
//! never handed out, so the first subnet stays unused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The cluster's pod addressing plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConfig {
    /// The subnet all pod CIDRs are cut from.
    #[serde(rename = "podSubnetCIDR")]
    pub pod_subnet_cidr: IpNet,
    /// Prefix length of one node's pod CIDR.
    pub pod_prefix_len: u8,
}

impl Default for IpamConfig {
    fn default() -> Self {
        Self { pod_subnet_cidr: "10.1.0.0/16".parse().expect("literal CIDR"), pod_prefix_len: 24 }
    }
}

/// Why an addressing plan or a node ID does not work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// The per-node prefix is not inside the subnet's address family range or not longer
    /// than the subnet's.
    #[error("per-node prefix /{node} must be longer than the pod subnet's /{subnet} and at most /{max}")]
    BadPrefix { subnet: u8, node: u8, max: u8 },
    /// The node ID has no pod CIDR in this plan.
    #[error("node id {id} is outside 1..={max} for this pod subnet")]
    IdOutOfRange { id: u32, max: u32 },
}

impl IpamConfig {
    /// Checks the plan.
    pub fn validate(&self) -> Result<(), IpamError> {
        let subnet = self.pod_subnet_cidr.prefix_len();
        let max = self.pod_subnet_cidr.max_prefix_len();
        if self.pod_prefix_len <= subnet || self.pod_prefix_len > max {
            return Err(IpamError::BadPrefix { subnet, node: self.pod_prefix_len, max });
        }
        Ok(())
    }

    /// The largest node ID this plan has a pod CIDR for (at most `u32::MAX`).
    pub fn max_node_id(&self) -> u32 {
        let bits = u32::from(self.pod_prefix_len.saturating_sub(self.pod_subnet_cidr.prefix_len()));
        if bits >= 32 { u32::MAX } else { (1u32 << bits) - 1 }
    }

    /// The pod CIDR of node `id`.
    pub fn pod_cidr(&self, id: u32) -> Result<IpNet, IpamError> {
        self.validate()?;
        let max = self.max_node_id();
        if id == 0 || id > max {
            return Err(IpamError::IdOutOfRange { id, max });
        }
        let shift = u32::from(self.pod_subnet_cidr.max_prefix_len() - self.pod_prefix_len);
        let base = self.pod_subnet_cidr.network();
        let addr = match base {
            IpAddr::V4(v4) => {
                let offset = u64::from(id) << shift;
                IpAddr::V4(Ipv4Addr::from((u64::from(u32::from(v4)) + offset) as u32))
            }
            IpAddr::V6(v6) => {
                let offset = u128::from(id) << shift;
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) + offset))
            }
        };
        Ok(IpNet::new(addr, self.pod_prefix_len).expect("prefix length checked by validate"))
    }

    /// The node ID whose pod CIDR is `cidr` (`None` if it is none of this plan's).
    pub fn id_of(&self, cidr: IpNet) -> Option<u32> {
        if self.validate().is_err() || cidr.prefix_len() != self.pod_prefix_len || !self.pod_subnet_cidr.contains(&cidr)
        {
            return None;
        }
        let shift = u32::from(self.pod_subnet_cidr.max_prefix_len() - self.pod_prefix_len);
        let offset = match (cidr.network(), self.pod_subnet_cidr.network()) {
            (IpAddr::V4(c), IpAddr::V4(b)) => u128::from(u32::from(c) - u32::from(b)),
            (IpAddr::V6(c), IpAddr::V6(b)) => u128::from(c) - u128::from(b),
            _ => return None,
        };
        let id = u32::try_from(offset >> shift).ok()?;
        (self.pod_cidr(id).ok()? == cidr).then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_matches_contiv() {
        let c = IpamConfig::default();
        assert_eq!(c.max_node_id(), 255);
        assert_eq!(c.pod_cidr(1).unwrap().to_string(), "10.1.1.0/24");
        assert_eq!(c.pod_cidr(2).unwrap().to_string(), "10.1.2.0/24");
        assert_eq!(c.pod_cidr(255).unwrap().to_string(), "10.1.255.0/24");
        assert_eq!(c.id_of("10.1.7.0/24".parse().unwrap()), Some(7));
        assert_eq!(c.id_of("10.1.0.0/24".parse().unwrap()), None, "id 0 is no node's");
        assert_eq!(c.id_of("10.2.7.0/24".parse().unwrap()), None);
        assert_eq!(c.id_of("10.1.7.0/25".parse().unwrap()), None);
        assert_eq!(c.pod_cidr(0), Err(IpamError::IdOutOfRange { id: 0, max: 255 }));
        assert_eq!(c.pod_cidr(256), Err(IpamError::IdOutOfRange { id: 256, max: 255 }));
    }

    #[test]
    fn other_plans() {
        let c = IpamConfig { pod_subnet_cidr: "10.128.0.0/14".parse().unwrap(), pod_prefix_len: 23 };
        assert_eq!(c.max_node_id(), 511);
        assert_eq!(c.pod_cidr(1).unwrap().to_string(), "10.128.2.0/23");
        assert_eq!(c.pod_cidr(511).unwrap().to_string(), "10.131.254.0/23");
        let v6 = IpamConfig { pod_subnet_cidr: "fd00:10::/56".parse().unwrap(), pod_prefix_len: 64 };
        assert_eq!(v6.pod_cidr(3).unwrap().to_string(), "fd00:10:0:3::/64");
        let bad = IpamConfig { pod_subnet_cidr: "10.1.0.0/24".parse().unwrap(), pod_prefix_len: 24 };
        assert!(matches!(bad.validate(), Err(IpamError::BadPrefix { .. })));
        assert!(bad.pod_cidr(1).is_err());
    }

    #[test]
    fn serde_names() {
        let json = serde_json::to_string(&IpamConfig::default()).unwrap();
        assert_eq!(json, r#"{"podSubnetCIDR":"10.1.0.0/16","podPrefixLen":24}"#);
    }
}
