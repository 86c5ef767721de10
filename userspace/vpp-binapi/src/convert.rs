//! Conversions between the API's address types and std / ipnet ones.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::api::{Address, AddressFamily, AddressUnion, Ip4Prefix, Ip6Prefix, Prefix};

impl From<Ipv4Addr> for Address {
    fn from(a: Ipv4Addr) -> Self {
        Self { af: AddressFamily::ADDRESS_IP4, un: AddressUnion::from_ip4(&a.octets()) }
    }
}

impl From<Ipv6Addr> for Address {
    fn from(a: Ipv6Addr) -> Self {
        Self { af: AddressFamily::ADDRESS_IP6, un: AddressUnion::from_ip6(&a.octets()) }
    }
}

impl From<IpAddr> for Address {
    fn from(a: IpAddr) -> Self {
        match a {
            IpAddr::V4(a) => a.into(),
            IpAddr::V6(a) => a.into(),
        }
    }
}

impl Address {
    /// The address, or None for an address family VPP does not define.
    pub fn to_ip(&self) -> Option<IpAddr> {
        match self.af {
            AddressFamily::ADDRESS_IP4 => Some(IpAddr::V4(Ipv4Addr::from(self.un.ip4()))),
            AddressFamily::ADDRESS_IP6 => Some(IpAddr::V6(Ipv6Addr::from(self.un.ip6()))),
            _ => None,
        }
    }

    /// The IPv4 address, if this is one.
    pub fn to_ipv4(&self) -> Option<Ipv4Addr> {
        match self.to_ip() {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        }
    }
}

impl AddressUnion {
    /// The union holding an IPv4 address.
    pub fn from_ipv4(a: Ipv4Addr) -> Self {
        Self::from_ip4(&a.octets())
    }
}

impl From<IpNet> for Prefix {
    fn from(n: IpNet) -> Self {
        Self { address: n.addr().into(), len: n.prefix_len() }
    }
}

impl From<Ipv4Net> for Prefix {
    fn from(n: Ipv4Net) -> Self {
        IpNet::V4(n).into()
    }
}

impl Prefix {
    /// The prefix (address bits kept as VPP gave them), or None if malformed.
    pub fn to_net(&self) -> Option<IpNet> {
        match self.address.to_ip()? {
            IpAddr::V4(a) => Ipv4Net::new(a, self.len).ok().map(IpNet::V4),
            IpAddr::V6(a) => Ipv6Net::new(a, self.len).ok().map(IpNet::V6),
        }
    }

    /// The IPv4 prefix, if this is one.
    pub fn to_ipv4_net(&self) -> Option<Ipv4Net> {
        match self.to_net()? {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }
    }
}

impl From<Ipv4Net> for Ip4Prefix {
    fn from(n: Ipv4Net) -> Self {
        Self { address: n.addr().octets(), len: n.prefix_len() }
    }
}

impl Ip4Prefix {
    /// The prefix, or None if the length is over 32.
    pub fn to_net(&self) -> Option<Ipv4Net> {
        Ipv4Net::new(Ipv4Addr::from(self.address), self.len).ok()
    }
}

impl From<Ipv6Net> for Ip6Prefix {
    fn from(n: Ipv6Net) -> Self {
        Self { address: n.addr().octets(), len: n.prefix_len() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::to_bytes;

    #[test]
    fn addresses_round_trip_and_encode_as_a_padded_union() {
        let a: Address = Ipv4Addr::new(10, 1, 2, 3).into();
        assert_eq!(a.to_ip(), Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))));
        let b = to_bytes(&a).unwrap();
        assert_eq!(b.len(), 17, "af + 16-byte union");
        assert_eq!(&b[..5], &[0, 10, 1, 2, 3]);
        assert!(b[5..].iter().all(|&x| x == 0));
        let p: Prefix = "192.0.2.0/24".parse::<Ipv4Net>().unwrap().into();
        assert_eq!(p.to_ipv4_net(), Some("192.0.2.0/24".parse().unwrap()));
        let v6: Address = "2001:db8::1".parse::<IpAddr>().unwrap().into();
        assert_eq!(v6.to_ip().unwrap().to_string(), "2001:db8::1");
    }
}
