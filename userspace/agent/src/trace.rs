//! `netctl trace`: what the datapath does with a packet from a pod, and why.
//!
//! The agent makes the packet up (Ethernet from the pod's MAC to the gateway's, IPv4 from
//! the pod's address, a TCP SYN, a UDP datagram or an ICMP echo request), runs the
//! `tc_from_pod` it attached to the pod's interface on it with `BPF_PROG_TEST_RUN` in trace
//! mode, and turns the steps the program recorded, its return code and the packet it left
//! into a report. The program is the one that forwards the pod's real packets and reads the
//! same maps, so the answer cannot drift from the real path; in trace mode it writes
//! nothing (see `ebpf/contiv-ebpf/src/trace.rs`).
//!
//! This module is the pure half: requests, packets, and the wording of each step from the
//! names the agent looks up.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use contiv_common::{TraceStep, ct_flags, drop_reason, policy_dir, trace_policy, trace_route, trace_step, verdict};
use serde::Serialize;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// tc return codes.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// A bad `/trace` request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceRequestError {
    #[error("from {0:?}: expected NAMESPACE/NAME")]
    From(String),
    #[error("to {0:?}: expected IP:PORT/PROTO (TCP, UDP or SCTP), IP:PORT (TCP) or IP/ICMP")]
    To(String),
    #[error("fromIp {0:?}: not an IPv4 address")]
    FromIp(String),
}

/// Where the traced packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    pub ip: Ipv4Addr,
    /// 0 for ICMP.
    pub port: u16,
    pub proto: u8,
}

impl std::str::FromStr for Destination {
    type Err = TraceRequestError;

    /// `10.96.0.10:53/UDP`, `10.1.2.3:80` (TCP), `10.1.2.3/ICMP`; protocols in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TraceRequestError::To(s.to_owned());
        let (addr, proto) = match s.rsplit_once('/') {
            Some((a, p)) => (a, Some(p.to_ascii_uppercase())),
            None => (s, None),
        };
        let (ip, port) = match addr.split_once(':') {
            Some((ip, port)) => (ip, Some(port.parse::<u16>().map_err(|_| bad())?)),
            None => (addr, None),
        };
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let proto = match (proto.as_deref(), port) {
            (Some("ICMP"), None | Some(0)) => IPPROTO_ICMP,
            (Some("TCP") | None, Some(p)) if p != 0 => IPPROTO_TCP,
            (Some("UDP"), Some(p)) if p != 0 => IPPROTO_UDP,
            (Some("SCTP"), Some(p)) if p != 0 => IPPROTO_SCTP,
            _ => return Err(bad()),
        };
        Ok(Self { ip, port: port.unwrap_or(0), proto })
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.proto {
            IPPROTO_ICMP => write!(f, "{}/ICMP", self.ip),
            p => write!(f, "{}:{}/{}", self.ip, self.port, proto_name(p)),
        }
    }
}

/// A parsed `/trace` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRequest {
    pub namespace: String,
    pub name: String,
    pub to: Destination,
    /// Send from this address instead of the pod's (to see the anti-spoofing check).
    pub from_ip: Option<Ipv4Addr>,
}

impl TraceRequest {
    pub fn parse(from: &str, to: &str, from_ip: Option<&str>) -> Result<Self, TraceRequestError> {
        let (namespace, name) = from
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| TraceRequestError::From(from.to_owned()))?;
        let from_ip = match from_ip.filter(|s| !s.is_empty()) {
            Some(s) => Some(s.parse().map_err(|_| TraceRequestError::FromIp(s.to_owned()))?),
            None => None,
        };
        Ok(Self { namespace: namespace.into(), name: name.into(), to: to.parse()?, from_ip })
    }
}

pub fn proto_name(p: u8) -> &'static str {
    match p {
        IPPROTO_ICMP => "ICMP",
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        IPPROTO_SCTP => "SCTP",
        _ => "?",
    }
}

// === packets ===

/// The packet a pod would send: Ethernet (`src_mac` -> `dst_mac`), IPv4 (TTL 64, DF), then a
/// TCP SYN, a UDP datagram or SCTP header with 4 bytes of payload, or an ICMP echo request
/// (identifier `sport`). Checksums are right.
pub fn build_packet(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, sport: u16, to: &Destination) -> Vec<u8> {
    let l4: Vec<u8> = match to.proto {
        IPPROTO_TCP => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&to.port.to_be_bytes());
            h[4..8].copy_from_slice(&1u32.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = 0x02; // SYN
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            h
        }
        IPPROTO_UDP => {
            let mut h = vec![0u8; 12];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&to.port.to_be_bytes());
            h[4..6].copy_from_slice(&12u16.to_be_bytes());
            h[8..12].copy_from_slice(b"trce");
            h
        }
        IPPROTO_SCTP => {
            // Common header only (ports, verification tag, checksum left 0): enough for ports.
            let mut h = vec![0u8; 16];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&to.port.to_be_bytes());
            h[12..16].copy_from_slice(b"trce");
            h
        }
        _ => {
            let mut h = vec![0u8; 16];
            h[0] = 8; // echo request
            h[4..6].copy_from_slice(&sport.to_be_bytes());
            h[6..8].copy_from_slice(&1u16.to_be_bytes());
            h[8..16].copy_from_slice(b"contiv-t");
            let c = checksum(&h, 0);
            h[2..4].copy_from_slice(&c.to_be_bytes());
            h
        }
    };
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&sport.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = to.proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&to.ip.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut l4 = l4;
    if matches!(to.proto, IPPROTO_TCP | IPPROTO_UDP) {
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&to.ip.octets());
        pseudo.extend_from_slice(&[0, to.proto]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        let c = checksum(&l4, sum(&pseudo));
        let off = if to.proto == IPPROTO_TCP { 16 } else { 6 };
        l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut frame = Vec::with_capacity(14 + ip.len() + l4.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

fn sum(data: &[u8]) -> u32 {
    data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

/// The Internet checksum of `data` plus a partial sum.
fn checksum(data: &[u8], partial: u32) -> u16 {
    let mut s = sum(data) + partial;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A frame as the report shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PacketReport {
    pub src_mac: String,
    pub dst_mac: String,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: &'static str,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub len: usize,
}

impl PacketReport {
    /// Reads an Ethernet + IPv4 (+ ports) frame; `None` if it is not one.
    pub fn parse(frame: &[u8]) -> Option<Self> {
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
            return None;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let proto = ip[9];
        let l4 = ip.get(ihl..).unwrap_or(&[]);
        let (sport, dport) = match proto {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP if l4.len() >= 4 => {
                (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]))
            }
            IPPROTO_ICMP if l4.len() >= 6 => (u16::from(l4[0]), u16::from_be_bytes([l4[4], l4[5]])),
            _ => (0, 0),
        };
        let ip4 = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
        Some(Self {
            src_mac: mac(&frame[6..12]),
            dst_mac: mac(&frame[0..6]),
            src: ip4(12),
            dst: ip4(16),
            proto: proto_name(proto),
            sport,
            dport,
            ttl: ip[8],
            len: frame.len(),
        })
    }

    /// `10.1.1.2:40000 -> 10.1.2.3:80 TCP ttl 64`.
    pub fn summary(&self) -> String {
        if self.proto == "ICMP" {
            return format!("{} -> {} ICMP type {} id {} ttl {}", self.src, self.dst, self.sport, self.dport, self.ttl);
        }
        format!("{}:{} -> {}:{} {} ttl {}", self.src, self.sport, self.dst, self.dport, self.proto, self.ttl)
    }
}

/// Bytes as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The inner frame of a VXLAN packet to UDP `port` that the program encapsulated itself
/// (outer IPv4 without options, UDP, VXLAN with a valid VNI), with its VNI; `None` for
/// anything else.
pub fn vxlan_inner(frame: &[u8], port: u16) -> Option<(&[u8], u32)> {
    const OUTER: usize = 14 + 20 + 8 + 8;
    let ip = frame.get(14..34)?;
    let udp = frame.get(34..42)?;
    let vxlan = frame.get(42..OUTER)?;
    let vxlan_to_port = frame[12..14] == [0x08, 0x00]
        && ip[0] == 0x45
        && ip[9] == 17
        && u16::from_be_bytes([udp[2], udp[3]]) == port
        && vxlan[0] & 0x08 != 0;
    let vni = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
    (vxlan_to_port && frame.len() >= OUTER + 14).then(|| (&frame[OUTER..], vni))
}

/// Hex back to bytes; `None` if it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn mac(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")
}

// === the report ===

/// One decision of the traced packet.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    /// `source check`, `conntrack`, `service`, `policy egress`, `policy ingress`, `route`,
    /// `delivery`, ...
    pub stage: &'static str,
    /// A word or two: `ok`, `spoofed`, `miss`, `backend`, `denied`, `local pod`, ...
    pub result: String,
    pub detail: String,
}

/// What the datapath did with the packet in the end.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Into a pod on this node.
    Delivered,
    /// To another node over the overlay.
    Forwarded,
    /// To the node's own stack (the host, node addresses, outside the cluster).
    ToHost,
    /// Out of the uplink.
    ToUplink,
    /// To the slow path (vswitch or VPP).
    SlowPath,
    Dropped,
}

/// The names a report is written with (looked up by the agent).
#[derive(Debug, Default, Clone)]
pub struct Names {
    /// Pod addresses -> `namespace/name`.
    pub pods: BTreeMap<Ipv4Addr, String>,
    /// ifindex -> interface name (pods' veths, the overlay, the slow-path port, the uplink).
    pub interfaces: BTreeMap<u32, String>,
    /// Node addresses -> node names.
    pub nodes: BTreeMap<Ipv4Addr, String>,
    /// Service port ids -> `namespace/name:port (KIND)`.
    pub services: BTreeMap<u32, String>,
    /// The POLICY entry that decided a check: (pod, direction, peer) -> its peer prefix and
    /// what it allows.
    pub policy: BTreeMap<(Ipv4Addr, u8, Ipv4Addr), (ipnet::Ipv4Net, Vec<String>)>,
    /// `vswitch` or `VPP`.
    pub slow_path: &'static str,
}

impl Names {
    fn pod(&self, ip: Ipv4Addr) -> String {
        match self.pods.get(&ip) {
            Some(n) => format!("{n} ({ip})"),
            None => ip.to_string(),
        }
    }

    fn iface(&self, ifindex: u32) -> String {
        match self.interfaces.get(&ifindex) {
            Some(n) => format!("{n} (ifindex {ifindex})"),
            None => format!("ifindex {ifindex}"),
        }
    }

    fn node(&self, ip: Ipv4Addr) -> String {
        match self.nodes.get(&ip) {
            Some(n) => format!("node {n} ({ip})"),
            None => format!("node {ip}"),
        }
    }

    fn service(&self, id: u32) -> String {
        self.services.get(&id).cloned().unwrap_or_else(|| format!("service port {id}"))
    }
}

fn ip(b: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(b)
}

/// The check a POLICY step made, for [`Names::policy`]: (pod, direction, peer), when an
/// entry decided it (allowed, or its ports did not allow it).
pub fn policy_step_key(s: &TraceStep) -> Option<(Ipv4Addr, u8, Ipv4Addr)> {
    let result = (s.arg >> 4) & 0xf;
    if s.code != trace_step::POLICY || !(result == trace_policy::ALLOWED || result == trace_policy::PORT_DENIED) {
        return None;
    }
    Some((Ipv4Addr::from(s.value.to_ne_bytes()), (s.arg & 0xf) as u8, ip(s.ip)))
}

/// The words for one step.
pub fn describe(s: &TraceStep, n: &Names, sender: Ipv4Addr) -> StepReport {
    let step = |stage: &'static str, result: &str, detail: String| StepReport { stage, result: result.into(), detail };
    let at = ip(s.ip);
    match s.code {
        trace_step::SOURCE_OK => step("source check", "ok", format!("source MAC and address are {}'s own", n.pod(at))),
        trace_step::SOURCE_SPOOFED if s.arg == u16::from(drop_reason::SPOOFED_MAC) => {
            step("source check", "spoofed", format!("the source MAC is not {}'s", n.pod(sender)))
        }
        trace_step::SOURCE_SPOOFED => step(
            "source check",
            "spoofed",
            format!("source address {at} is not {}'s: the pod may only send from its own", n.pod(sender)),
        ),
        trace_step::NOT_IPV4 => step(
            "protocol",
            "slow path",
            format!(
                "ethertype {:#06x}{} is not IPv4: the {} handles it",
                s.arg,
                if s.arg == 0x0806 { " (ARP)" } else { "" },
                n.slow_path
            ),
        ),
        trace_step::FRAGMENT if s.arg == 0 => step(
            "fragment",
            "dropped",
            "a later fragment whose first fragment this node did not pass: its ports are unknown".into(),
        ),
        trace_step::FRAGMENT => step(
            "fragment",
            "ports of its first fragment",
            format!("a later fragment of a datagram from port {} to port {}", s.port, s.aux),
        ),
        trace_step::MALFORMED => step("parse", "malformed", "a header could not be read".into()),
        trace_step::CT_HIT => {
            let mut d = "the flow is established (or a reply): allowed without a policy check".to_owned();
            if s.arg & ct_flags::DNAT != 0 {
                let _ = write!(d, "; destination rewritten to {at}:{} ({})", s.port, n.service(s.value));
            } else if s.arg & ct_flags::REV_DNAT != 0 {
                let _ = write!(d, "; source rewritten back to {at}:{} ({})", s.port, n.service(s.value));
            } else if s.arg & ct_flags::SNAT != 0 {
                d.push_str("; source port rewritten (another flow's replies have this flow's addresses)");
            } else if s.arg & ct_flags::REV_SNAT != 0 {
                d.push_str("; destination port rewritten back (the flow took another source port)");
            }
            step("conntrack", "hit", d)
        }
        trace_step::CT_MISS => step("conntrack", "miss", "a new flow".into()),
        trace_step::DEAD_BACKEND => step(
            "service",
            "refused",
            format!("{at}:{} is a backend removed moments ago: the {} refuses the connection", s.port, n.slow_path),
        ),
        trace_step::SVC_FRONTEND => {
            let local = if s.aux > 0 { format!(", {} on this node", s.aux) } else { String::new() };
            step(
                "service",
                "frontend",
                format!("{at}:{} is {}: {} backend(s){local}", s.port, n.service(s.value), s.arg),
            )
        }
        trace_step::SVC_NONE => step("service", "none", "the destination is no service frontend".into()),
        trace_step::SVC_PORT_UNDEFINED => step(
            "service",
            "refused",
            format!(
                "{at} is a cluster IP and no service defines {}/{}: the {} refuses the connection",
                s.port,
                crate::services::proto_name(s.aux as u8),
                n.slow_path
            ),
        ),
        trace_step::SVC_SOURCE_DENIED => step(
            "service",
            "source denied",
            format!("{at} is outside the loadBalancerSourceRanges of {}", n.service(s.value)),
        ),
        trace_step::SVC_NO_BACKEND => step(
            "service",
            "no backend",
            format!(
                "{} has no usable {}endpoint",
                n.service(s.value),
                if s.arg & 1 != 0 { "local (traffic policy Local) " } else { "" }
            ),
        ),
        trace_step::SVC_BACKEND => {
            let how = if s.arg & 2 != 0 { "the client's session affinity" } else { "at random" };
            let set = if s.arg & 1 != 0 { " of the Local set" } else { "" };
            step(
                "service",
                "backend",
                format!("backend {}:{} chosen ({how}, ordinal {}{set})", n.pod(at), s.port, s.aux),
            )
        }
        trace_step::SVC_SNAT => step(
            "service",
            "source rewritten",
            if s.arg == 1 {
                format!("source port rewritten to {at}:{}: another flow's replies have this flow's addresses", s.port)
            } else {
                format!("source rewritten to {at}:{} so the reply comes back through this node", s.port)
            },
        ),
        trace_step::POLICY => policy(s, n),
        trace_step::ROUTE => route(s, n),
        trace_step::TTL_EXCEEDED => step("route", "ttl exceeded", "the TTL would reach zero".into()),
        trace_step::CT_RECORD => step(
            "conntrack",
            "record",
            format!(
                "the new flow is recorded (both directions{}) so its later packets and replies pass on one \
                 lookup; not written in a trace",
                if s.arg & ct_flags::DNAT != 0 { ", with its translation" } else { "" }
            ),
        ),
        trace_step::VERDICT => delivery(s, n),
        trace_step::OVERLAY_SOURCE if s.arg != 0 => step(
            "overlay source",
            "ok",
            format!("from {}; the inner source {} is that node's", n.node(at), n.pod(sender)),
        ),
        trace_step::OVERLAY_SOURCE => step(
            "overlay source",
            "spoofed",
            format!(
                "from {}, but the inner source {} is {}",
                n.node(at),
                n.pod(sender),
                if s.value == 0 {
                    "no node's".to_owned()
                } else {
                    format!("{}'s", n.node(Ipv4Addr::from(s.value.to_ne_bytes())))
                }
            ),
        ),
        trace_step::UNKNOWN_INTERFACE => step(
            "source check",
            "unknown interface",
            format!("{} is no pod's interface in the datapath", n.iface(s.value)),
        ),
        other => step("?", "?", format!("step {other} (arg {}, {at}:{}, {})", s.arg, s.port, s.value)),
    }
}

fn policy(s: &TraceStep, n: &Names) -> StepReport {
    let direction = (s.arg & 0xf) as u8;
    let result = (s.arg >> 4) & 0xf;
    let stage = if direction == policy_dir::EGRESS { "policy egress" } else { "policy ingress" };
    let pod = n.pod(Ipv4Addr::from(s.value.to_ne_bytes()));
    let peer = ip(s.ip);
    let what = match s.aux as u8 {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => format!("{}:{}", proto_name(s.aux as u8), s.port),
        IPPROTO_ICMP => "ICMP".into(),
        p => format!("protocol {p}"),
    };
    let (dir, toward) = if direction == policy_dir::EGRESS { ("egress", "to") } else { ("ingress", "from") };
    let entry = || {
        let (prefix, allowed) = n.policy.get(&policy_step_key(s)?)?;
        Some(format!("entry {prefix}: {}", allowed.join(",")))
    };
    let (word, detail) = match result {
        trace_policy::NOT_ISOLATED => {
            ("not isolated", format!("no NetworkPolicy selects {pod} for {dir}: everything is allowed"))
        }
        trace_policy::ALLOWED => (
            "allowed",
            format!("{pod}'s {dir} rules allow {what} {toward} {} ({})", n.pod(peer), entry().unwrap_or_default()),
        ),
        trace_policy::NO_MATCH => {
            ("denied", format!("{pod} is isolated for {dir} and no rule allows {} at all", n.pod(peer)))
        }
        _ => (
            "denied",
            format!(
                "{pod}'s {dir} rules do not allow {what} {toward} {} ({})",
                n.pod(peer),
                entry().unwrap_or_default()
            ),
        ),
    };
    StepReport { stage, result: word.into(), detail }
}

fn route(s: &TraceStep, n: &Names) -> StepReport {
    let at = ip(s.ip);
    let (word, detail) = match s.arg {
        trace_route::LOCAL_POD => {
            ("local pod", format!("{} runs on this node, behind {}", n.pod(at), n.iface(s.value)))
        }
        trace_route::GATEWAY => ("gateway", format!("{at} is the pods' gateway: the {} answers", n.slow_path)),
        trace_route::VPP => ("to VPP", "VPP owns the wire: everything not for a local pod goes to VPP".into()),
        trace_route::REMOTE_NODE => ("other node", format!("owned by {}: over the overlay", n.node(at))),
        trace_route::TOO_BIG => (
            "too big",
            format!("too big for the overlay to {}: the slow path answers \"fragmentation needed\"", n.node(at)),
        ),
        trace_route::UNKNOWN_LOCAL => {
            ("unknown address", format!("{at} is in this node's pod subnet but no pod has it: the {}", n.slow_path))
        }
        trace_route::HOST => (
            "node stack",
            format!("{at} is no pod: the node's own stack routes it (the host, node addresses, outside the cluster)"),
        ),
        trace_route::UPLINK => ("uplink", "a reply to a client outside the cluster: out of the uplink".into()),
        trace_route::NO_CONFIG => ("slow path", "the datapath has no configuration yet".into()),
        trace_route::NO_DESTINATION => ("no destination", format!("{at} is neither a pod on this node nor this node")),
        trace_route::NO_ROUTE => {
            ("no route", format!("{at} is in the cluster's pod range, but no node owns it: dropped, never sent out"))
        }
        _ => ("?", format!("route kind {}", s.arg)),
    };
    StepReport { stage: "route", result: word.into(), detail }
}

fn delivery(s: &TraceStep, n: &Names) -> StepReport {
    let (word, detail) = match s.arg as u8 {
        verdict::LOCAL => {
            ("delivered", format!("into {} with bpf_redirect_peer via {}", n.pod(ip(s.ip)), n.iface(s.value)))
        }
        verdict::LOCAL_SHAPED => (
            "delivered",
            format!("to the egress of {} (its ingress is shaped), then into {}", n.iface(s.value), n.pod(ip(s.ip))),
        ),
        verdict::TUNNEL => ("forwarded", format!("encapsulated to {} out of {}", n.node(ip(s.ip)), n.iface(s.value))),
        verdict::HOST => ("to the node", "handed to the node's stack".into()),
        verdict::UPLINK => ("to the uplink", format!("out of {}", n.iface(s.value))),
        verdict::SLOW_PATH => ("slow path", format!("to the {} through {}", n.slow_path, n.iface(s.value))),
        verdict::DROP => ("dropped", format!("dropped: {}", drop_reason::name(s.port as u8))),
        _ => ("?", format!("verdict {}", s.arg)),
    };
    StepReport { stage: "delivery", result: word.into(), detail }
}

/// The outcome, its drop reason, and one sentence, from the steps and the return code.
pub fn conclude(steps: &[TraceStep], return_code: u32, n: &Names) -> (Outcome, Option<&'static str>, String) {
    let Some(last) = steps.iter().rev().find(|s| s.code == trace_step::VERDICT) else {
        let outcome = if return_code == TC_ACT_SHOT { Outcome::Dropped } else { Outcome::SlowPath };
        return (outcome, None, format!("the program returned {return_code} without a verdict step"));
    };
    match last.arg as u8 {
        verdict::LOCAL | verdict::LOCAL_SHAPED => {
            (Outcome::Delivered, None, format!("delivered to {} on this node", n.pod(ip(last.ip))))
        }
        verdict::TUNNEL => (Outcome::Forwarded, None, format!("forwarded to {} over the overlay", n.node(ip(last.ip)))),
        verdict::HOST => (Outcome::ToHost, None, "handed to the node's stack".into()),
        verdict::UPLINK => (Outcome::ToUplink, None, "sent out of the uplink".into()),
        verdict::SLOW_PATH => (Outcome::SlowPath, None, format!("handed to the {}", n.slow_path)),
        _ => {
            let reason = drop_reason::name(last.port as u8);
            (Outcome::Dropped, Some(reason), format!("dropped ({reason})"))
        }
    }
}

/// The kernel's word for a tc return code.
pub fn action(return_code: u32) -> &'static str {
    match return_code {
        TC_ACT_OK => "TC_ACT_OK",
        TC_ACT_SHOT => "TC_ACT_SHOT",
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inner_frame_of_an_encapsulated_packet_is_found_and_anything_else_is_not() {
        let inner: Vec<u8> = (0..60u8).collect();
        let mut f = vec![0u8; 12];
        f.extend([0x08, 0x00, 0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 192, 168, 100, 11, 192, 168, 100, 12]);
        f.extend([0xc0, 0x00, 0x12, 0xb5, 0, 0, 0, 0]);
        f.extend([0x08, 0, 0, 0, 0, 0, 7, 0]);
        f.extend(&inner);
        assert_eq!(vxlan_inner(&f, 4789), Some((&inner[..], 7)));
        assert_eq!(vxlan_inner(&f, 8472), None, "another port");
        let mut tcp = f.clone();
        tcp[23] = 6;
        assert_eq!(vxlan_inner(&tcp, 4789), None, "not UDP");
        assert_eq!(vxlan_inner(&f[..60], 4789), None, "too short for an inner Ethernet header");
        assert_eq!(vxlan_inner(&inner, 4789), None);
    }

    #[test]
    fn destinations_parse_with_defaults_and_refuse_nonsense() {
        let d: Destination = "10.96.0.10:53/udp".parse().unwrap();
        assert_eq!(d, Destination { ip: Ipv4Addr::new(10, 96, 0, 10), port: 53, proto: IPPROTO_UDP });
        assert_eq!("10.1.2.3:80".parse::<Destination>().unwrap().proto, IPPROTO_TCP);
        assert_eq!("10.1.2.3/ICMP".parse::<Destination>().unwrap().proto, IPPROTO_ICMP);
        assert_eq!("10.1.2.3:80/SCTP".parse::<Destination>().unwrap().to_string(), "10.1.2.3:80/SCTP");
        for bad in ["10.1.2.3", "10.1.2.3:0/TCP", "10.1.2.3:80/ICMP", "x:80", "10.1.2.3:99999", "10.1.2.3:80/GRE"] {
            assert!(bad.parse::<Destination>().is_err(), "{bad}");
        }
        assert!(TraceRequest::parse("web", "10.1.2.3:80", None).is_err());
        assert!(TraceRequest::parse("x/a", "10.1.2.3:80", Some("nope")).is_err());
        let r = TraceRequest::parse("x/a", "10.1.2.3:80", Some("10.9.9.9")).unwrap();
        assert_eq!((r.namespace.as_str(), r.name.as_str(), r.from_ip), ("x", "a", Some(Ipv4Addr::new(10, 9, 9, 9))));
    }

    #[test]
    fn hex_round_trips_and_refuses_nonsense() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(unhex("00ab10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }

    #[test]
    fn packets_are_well_formed() {
        let to = Destination { ip: Ipv4Addr::new(10, 1, 2, 3), port: 80, proto: IPPROTO_TCP };
        let f = build_packet([2, 0, 0, 0, 0, 2], [2, 0xfe, 0, 0, 0, 1], Ipv4Addr::new(10, 1, 1, 2), 40000, &to);
        assert_eq!(f.len(), 14 + 20 + 20);
        assert_eq!(checksum(&f[14..34], 0), 0, "IPv4 header checksum");
        let mut pseudo = vec![10, 1, 1, 2, 10, 1, 2, 3, 0, 6];
        pseudo.extend_from_slice(&20u16.to_be_bytes());
        assert_eq!(checksum(&f[34..], sum(&pseudo)), 0, "TCP checksum");
        let p = PacketReport::parse(&f).unwrap();
        assert_eq!(p.summary(), "10.1.1.2:40000 -> 10.1.2.3:80 TCP ttl 64");
        assert_eq!(p.src_mac, "02:00:00:00:00:02");
        let icmp = Destination { ip: Ipv4Addr::new(10, 1, 2, 3), port: 0, proto: IPPROTO_ICMP };
        let f = build_packet([2; 6], [4; 6], Ipv4Addr::new(10, 1, 1, 2), 7, &icmp);
        assert_eq!(checksum(&f[34..], 0), 0, "ICMP checksum");
        assert_eq!(PacketReport::parse(&f).unwrap().summary(), "10.1.1.2 -> 10.1.2.3 ICMP type 8 id 7 ttl 64");
    }

    fn st(code: u16, arg: u16, ip: [u8; 4], port: u16, aux: u16, value: u32) -> TraceStep {
        TraceStep { code, arg, ip, port, aux, value }
    }

    #[test]
    fn steps_read_as_sentences_with_names() {
        let mut n = Names { slow_path: "vswitch", ..Default::default() };
        n.pods.insert(Ipv4Addr::new(10, 1, 1, 2), "x/a".into());
        n.pods.insert(Ipv4Addr::new(10, 1, 2, 3), "y/b".into());
        n.nodes.insert(Ipv4Addr::new(192, 168, 100, 12), "node-2".into());
        n.interfaces.insert(5, "cvx0".into());
        n.policy.insert(
            (Ipv4Addr::new(10, 1, 2, 3), 0, Ipv4Addr::new(10, 1, 1, 2)),
            ("10.1.0.0/16".parse().unwrap(), vec!["TCP:80".into()]),
        );
        let me = Ipv4Addr::new(10, 1, 1, 2);
        let r = describe(&st(trace_step::ROUTE, trace_route::REMOTE_NODE, [192, 168, 100, 12], 0, 0, 5), &n, me);
        assert_eq!(r.detail, "owned by node node-2 (192.168.100.12): over the overlay");
        let deny = st(
            trace_step::POLICY,
            u16::from(policy_dir::INGRESS) | trace_policy::PORT_DENIED << 4,
            [10, 1, 1, 2],
            81,
            u16::from(IPPROTO_TCP),
            u32::from_ne_bytes([10, 1, 2, 3]),
        );
        let r = describe(&deny, &n, me);
        assert_eq!((r.stage, r.result.as_str()), ("policy ingress", "denied"));
        assert_eq!(
            r.detail,
            "y/b (10.1.2.3)'s ingress rules do not allow TCP:81 from x/a (10.1.1.2) (entry 10.1.0.0/16: TCP:80)"
        );
        let spoof = st(trace_step::SOURCE_SPOOFED, u16::from(drop_reason::SPOOFED_IP), [10, 1, 1, 99], 0, 0, 0);
        assert!(describe(&spoof, &n, me).detail.starts_with("source address 10.1.1.99 is not x/a (10.1.1.2)'s"));
        let drop =
            st(trace_step::VERDICT, u16::from(verdict::DROP), [0; 4], u16::from(drop_reason::POLICY_INGRESS), 0, 0);
        assert_eq!(conclude(&[deny, drop], TC_ACT_SHOT, &n).1, Some("policy_ingress"));
        let tunnel = st(trace_step::VERDICT, u16::from(verdict::TUNNEL), [192, 168, 100, 12], 0, 0, 5);
        let (o, _, s) = conclude(&[tunnel], TC_ACT_REDIRECT, &n);
        assert_eq!((o, s.as_str()), (Outcome::Forwarded, "forwarded to node node-2 (192.168.100.12) over the overlay"));
        // A flow that took another source port (its reply addresses were another flow's).
        let remapped = st(trace_step::CT_HIT, ct_flags::SNAT, [10, 1, 2, 3], 53, 0, 0);
        assert!(
            describe(&remapped, &n, me)
                .detail
                .ends_with("; source port rewritten (another flow's replies have this flow's addresses)")
        );
        let clash = st(trace_step::SVC_SNAT, 1, [10, 1, 1, 2], 61234, 0, 0);
        assert!(describe(&clash, &n, me).detail.contains("another flow's replies have this flow's addresses"));
    }
}
