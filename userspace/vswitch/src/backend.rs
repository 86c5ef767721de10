//! The seam between a slow-path port and whatever serves the frames behind it.
//!
//! A port (today [`crate::AfXdpPort`]) receives every frame the eBPF fast path
//! could not handle, hands it to a [`SlowPath`] backend and transmits whatever
//! the backend emits back through the same port. The backend never sees
//! sockets, rings or UMEM frames: it is a pure frames-in / frames-out function
//! plus counters, so it can be unit-tested without a kernel and replaced (for
//! instance by a bridge to FD.io VPP) without touching the port.

use serde::Serialize;

/// A backend serving the node's slow path.
///
/// # Contract
/// - [`SlowPath::handle`] is called once per received frame, in arrival order,
///   from the port's own thread. `frame` starts at the Ethernet header and ends
///   at the last byte the kernel delivered (Ethernet padding included, no FCS).
/// - The backend emits zero or more complete Ethernet frames by calling `tx`,
///   synchronously, before `handle` returns. The slice passed to `tx` is only
///   borrowed for the call: the port copies it into a transmit buffer, so the
///   backend may reuse its scratch memory right away. A frame emitted through
///   `tx` leaves the vswitch end of the slow-path port and is delivered by the
///   datapath to the pod owning its IPv4 destination (or ARP target IP).
/// - `handle` must not block: the port calls it for a batch of frames while
///   holding the backend's lock (see [`crate::RunningPort::with_backend`]).
/// - The returned [`Verdict`] tells the port what happened, for its own
///   counters and logs; the backend keeps its detailed counters itself and
///   reports them through [`SlowPath::counters`].
pub trait SlowPath {
    /// Processes one received frame; emits replies through `tx`.
    fn handle(&mut self, frame: &[u8], tx: &mut dyn FnMut(&[u8])) -> Verdict;

    /// A snapshot of the backend's counters since it was created.
    fn counters(&self) -> VswitchCounters;
}

/// What a backend did with one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The frame was answered; the reply (or replies) went out through `tx`.
    Replied(ReplyKind),
    /// The frame was consumed without any reply, for the given reason.
    Dropped(DropReason),
}

/// The kind of reply the built-in vswitch sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyKind {
    /// An ARP reply telling a pod the gateway's MAC address.
    Arp,
    /// An ICMP echo reply from the gateway address.
    IcmpEcho,
    /// ICMP "fragmentation needed" for a packet too big for the path out of the node.
    FragNeeded,
    /// TCP RST for a connection to a service without endpoints (or to a removed backend).
    TcpReset,
    /// ICMP "port unreachable" for UDP to a service without endpoints.
    PortUnreachable,
}

/// Why a frame was dropped. Every reason has its own counter in
/// [`DropCounters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// ARP that is not a well-formed request for the gateway's IPv4 address
    /// (replies, requests for other addresses, non-Ethernet/IPv4 ARP).
    ArpOther,
    /// IPv4 addressed to the gateway that is not an ICMP echo request
    /// (other ICMP types, TCP, UDP, ...).
    IcmpToGatewayOther,
    /// An IPv4 fragment (MF set or non-zero fragment offset).
    Fragment,
    /// IPv4 addressed to neither the gateway nor anything the vswitch serves.
    UnknownDestination,
    /// Not IPv4 and not ARP (IPv6, VLAN-tagged frames, other ethertypes).
    NonIpv4,
    /// Truncated or inconsistent headers, bad IPv4 header or ICMP checksum.
    Malformed,
    /// An error (RST, port unreachable, fragmentation needed) that must not be sent
    /// (RFC 1122 3.2.2): about an ICMP error, a packet to a broadcast or multicast
    /// address, or from a source that names no single host.
    ErrorNotAllowed,
    /// An error over the rate the vswitch sends them at (1000 a second, bursts of 50, as
    /// the kernel's `icmp_msgs_per_sec` and `icmp_msgs_burst`): a flood to a refused
    /// address is not reflected one for one.
    ErrorRateLimited,
    /// An echo request to the gateway bigger than the slow-path port carries: the datapath
    /// cut it to the port's MTU ([`contiv_common::SLOW_PORT_MTU`]), and the reply would
    /// need all of it.
    Truncated,
}

impl DropReason {
    /// Every reason, in the order the counters are listed.
    pub const ALL: [DropReason; 9] = [
        DropReason::ArpOther,
        DropReason::IcmpToGatewayOther,
        DropReason::Fragment,
        DropReason::UnknownDestination,
        DropReason::NonIpv4,
        DropReason::Malformed,
        DropReason::ErrorNotAllowed,
        DropReason::ErrorRateLimited,
        DropReason::Truncated,
    ];

    /// The counter's name, as exposed by the agent.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::ArpOther => "arp_other",
            DropReason::IcmpToGatewayOther => "icmp_to_gateway_other",
            DropReason::Fragment => "fragment",
            DropReason::UnknownDestination => "unknown_destination",
            DropReason::NonIpv4 => "non_ipv4",
            DropReason::Malformed => "malformed",
            DropReason::ErrorNotAllowed => "error_not_allowed",
            DropReason::ErrorRateLimited => "error_rate_limited",
            DropReason::Truncated => "truncated",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of a slow-path backend, as a plain struct the agent can serialise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VswitchCounters {
    /// Frames handed to the backend.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// ARP replies sent for the gateway address.
    pub arp_replies: u64,
    /// ICMP echo replies sent from the gateway address.
    pub icmp_echo_replies: u64,
    /// ICMP "fragmentation needed" errors sent for packets too big for the path.
    pub frag_needed_sent: u64,
    /// TCP resets sent for connections a service refuses (no endpoint, removed backend).
    pub tcp_resets_sent: u64,
    /// ICMP "port unreachable" sent for UDP a service refuses.
    pub port_unreachable_sent: u64,
    /// Frames dropped, by reason.
    pub drops: DropCounters,
}

impl VswitchCounters {
    /// Counts one handled frame of `len` bytes with its verdict.
    pub fn record(&mut self, len: usize, verdict: Verdict) {
        self.rx_frames += 1;
        self.rx_bytes += len as u64;
        match verdict {
            Verdict::Replied(ReplyKind::Arp) => self.arp_replies += 1,
            Verdict::Replied(ReplyKind::IcmpEcho) => self.icmp_echo_replies += 1,
            Verdict::Replied(ReplyKind::FragNeeded) => self.frag_needed_sent += 1,
            Verdict::Replied(ReplyKind::TcpReset) => self.tcp_resets_sent += 1,
            Verdict::Replied(ReplyKind::PortUnreachable) => self.port_unreachable_sent += 1,
            Verdict::Dropped(reason) => *self.drops.get_mut(reason) += 1,
        }
    }

    /// Frames answered with a reply.
    pub fn replies(&self) -> u64 {
        self.arp_replies
            + self.icmp_echo_replies
            + self.frag_needed_sent
            + self.tcp_resets_sent
            + self.port_unreachable_sent
    }
}

/// Dropped frames by [`DropReason`]; field names are [`DropReason::as_str`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DropCounters {
    pub arp_other: u64,
    pub icmp_to_gateway_other: u64,
    pub fragment: u64,
    pub unknown_destination: u64,
    pub non_ipv4: u64,
    pub malformed: u64,
    pub error_not_allowed: u64,
    pub error_rate_limited: u64,
    pub truncated: u64,
}

impl DropCounters {
    /// The counter for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::ArpOther => self.arp_other,
            DropReason::IcmpToGatewayOther => self.icmp_to_gateway_other,
            DropReason::Fragment => self.fragment,
            DropReason::UnknownDestination => self.unknown_destination,
            DropReason::NonIpv4 => self.non_ipv4,
            DropReason::Malformed => self.malformed,
            DropReason::ErrorNotAllowed => self.error_not_allowed,
            DropReason::ErrorRateLimited => self.error_rate_limited,
            DropReason::Truncated => self.truncated,
        }
    }

    fn get_mut(&mut self, reason: DropReason) -> &mut u64 {
        match reason {
            DropReason::ArpOther => &mut self.arp_other,
            DropReason::IcmpToGatewayOther => &mut self.icmp_to_gateway_other,
            DropReason::Fragment => &mut self.fragment,
            DropReason::UnknownDestination => &mut self.unknown_destination,
            DropReason::NonIpv4 => &mut self.non_ipv4,
            DropReason::Malformed => &mut self.malformed,
            DropReason::ErrorNotAllowed => &mut self.error_not_allowed,
            DropReason::ErrorRateLimited => &mut self.error_rate_limited,
            DropReason::Truncated => &mut self.truncated,
        }
    }

    /// All drops together.
    pub fn total(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_each_verdict_in_its_own_counter() {
        let mut c = VswitchCounters::default();
        c.record(42, Verdict::Replied(ReplyKind::Arp));
        c.record(98, Verdict::Replied(ReplyKind::IcmpEcho));
        for reason in DropReason::ALL {
            c.record(10, Verdict::Dropped(reason));
        }
        assert_eq!(c.rx_frames, 2 + DropReason::ALL.len() as u64);
        assert_eq!(c.rx_bytes, 42 + 98 + 10 * DropReason::ALL.len() as u64);
        assert_eq!(c.arp_replies, 1);
        assert_eq!(c.icmp_echo_replies, 1);
        assert_eq!(c.replies(), 2);
        for reason in DropReason::ALL {
            assert_eq!(c.drops.get(reason), 1, "{reason}");
        }
        assert_eq!(c.drops.total(), DropReason::ALL.len() as u64);
    }

    #[test]
    fn drop_counter_field_names_match_reason_names() {
        let mut c = DropCounters::default();
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            *c.get_mut(reason) = i as u64 + 1;
        }
        let json = serde_json::to_value(c).expect("serialise");
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(json[reason.as_str()], i as u64 + 1, "{reason}");
        }
    }
}
