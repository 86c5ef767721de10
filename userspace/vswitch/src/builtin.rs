//! The built-in slow-path backend: plays the pods' default gateway.
//!
//! It answers the two things a pod asks its gateway that the eBPF fast path
//! leaves to the slow path: "who has the gateway IP?" (ARP) and "are you
//! there?" (ICMP echo to the gateway IP), and it builds the one error the fast
//! path cannot: ICMP "fragmentation needed" for a packet too big for the path
//! out of the node (the datapath never fragments). It also refuses connections to services
//! without endpoints (and to backends just removed) the way a host without a listener
//! does: TCP RST, or ICMP port unreachable for UDP ([`Refusals`]). Everything else is
//! dropped and counted by reason.

use std::{collections::HashSet, net::Ipv4Addr, sync::Arc};

use crate::backend::{DropReason, ReplyKind, SlowPath, Verdict, VswitchCounters};
use crate::packet::*;

/// The gateway identity the vswitch answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The pods' default gateway address.
    pub ip: Ipv4Addr,
    /// The MAC address pods resolve the gateway to (the same as the
    /// datapath's `DatapathConfig::gateway_mac`).
    pub mac: [u8; 6],
    /// The largest IPv4 packet that can leave the node (the overlay's MTU); the
    /// fast path hands bigger ones here, and they are answered with ICMP
    /// "fragmentation needed" carrying this MTU. `None`: no such limit.
    pub path_mtu: Option<u16>,
}

/// Destinations the datapath hands over to be refused: frontends of services without
/// endpoints, backends removed a moment ago, cluster IPs on ports no service defines (the
/// datapath hands over only those: the defined ones it translates). (protocol numbers: 6
/// TCP, 17 UDP.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// (address, port, protocol).
    pub exact: HashSet<(Ipv4Addr, u16, u8)>,
    /// NodePorts without endpoints: (port, protocol) on any of `node_addrs`.
    pub node_ports: HashSet<(u16, u8)>,
    pub node_addrs: HashSet<Ipv4Addr>,
    /// Cluster IPs: every port that reaches the slow path is refused.
    pub cluster_ips: HashSet<Ipv4Addr>,
}

impl Refusals {
    /// Whether a connection to `dst:port` is refused.
    pub fn refuses(&self, dst: Ipv4Addr, port: u16, proto: u8) -> bool {
        self.exact.contains(&(dst, port, proto))
            || (self.node_ports.contains(&(port, proto)) && self.node_addrs.contains(&dst))
            || self.cluster_ips.contains(&dst)
    }
}

/// The built-in vswitch: ARP and ICMP echo responder for the gateway.
#[derive(Debug)]
pub struct BuiltinVswitch {
    gateway: GatewayConfig,
    refusals: Arc<Refusals>,
    /// The errors sent (RST, port unreachable, fragmentation needed), rate-limited.
    errors: ErrorLimiter,
    counters: VswitchCounters,
    /// Scratch buffer the replies are built in (kept to avoid allocating).
    scratch: Vec<u8>,
}

impl BuiltinVswitch {
    /// A vswitch answering for `gateway`.
    pub fn new(gateway: GatewayConfig) -> Self {
        Self {
            gateway,
            refusals: Arc::new(Refusals::default()),
            errors: ErrorLimiter::new(),
            counters: VswitchCounters::default(),
            scratch: Vec::with_capacity(2048),
        }
    }

    /// The gateway currently answered for.
    pub fn gateway(&self) -> GatewayConfig {
        self.gateway
    }

    /// Changes the gateway identity; takes effect with the next frame.
    /// Counters are kept.
    pub fn set_gateway(&mut self, gateway: GatewayConfig) {
        self.gateway = gateway;
    }

    /// Replaces the set of refused destinations; takes effect with the next frame.
    pub fn set_refusals(&mut self, refusals: Arc<Refusals>) {
        self.refusals = refusals;
    }

    fn classify(&mut self, frame: &[u8], tx: &mut dyn FnMut(&[u8])) -> Verdict {
        if frame.len() < ETH_HLEN {
            return Verdict::Dropped(DropReason::Malformed);
        }
        match be16(frame, 12) {
            ETHERTYPE_ARP => self.arp(frame, tx),
            ETHERTYPE_IPV4 => self.ipv4(frame, tx),
            _ => Verdict::Dropped(DropReason::NonIpv4),
        }
    }

    fn arp(&mut self, frame: &[u8], tx: &mut dyn FnMut(&[u8])) -> Verdict {
        let arp = &frame[ETH_HLEN..];
        if arp.len() < ARP_LEN {
            return Verdict::Dropped(DropReason::Malformed);
        }
        let is_eth_ipv4 =
            be16(arp, 0) == ARP_HTYPE_ETHERNET && be16(arp, 2) == ETHERTYPE_IPV4 && arp[4] == 6 && arp[5] == 4;
        let target_ip = Ipv4Addr::from(ipv4_at(arp, 24));
        if !is_eth_ipv4 || be16(arp, 6) != ARP_OP_REQUEST || target_ip != self.gateway.ip {
            return Verdict::Dropped(DropReason::ArpOther);
        }
        let requester_mac = mac_at(arp, 8);
        let requester_ip = ipv4_at(arp, 14);
        if requester_mac[0] & 1 != 0 {
            // A multicast/broadcast sender hardware address cannot be answered.
            return Verdict::Dropped(DropReason::Malformed);
        }

        let gw_mac = self.gateway.mac;
        let gw_ip = self.gateway.ip.octets();
        let out = &mut self.scratch;
        out.clear();
        // Ethernet: to the requester, from the gateway.
        out.extend_from_slice(&requester_mac);
        out.extend_from_slice(&gw_mac);
        out.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        // ARP reply: the gateway's MAC for the gateway's IP.
        out.extend_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        out.extend_from_slice(&[6, 4]);
        out.extend_from_slice(&ARP_OP_REPLY.to_be_bytes());
        out.extend_from_slice(&gw_mac);
        out.extend_from_slice(&gw_ip);
        out.extend_from_slice(&requester_mac);
        out.extend_from_slice(&requester_ip);
        tx(out);
        Verdict::Replied(ReplyKind::Arp)
    }

    fn ipv4(&mut self, frame: &[u8], tx: &mut dyn FnMut(&[u8])) -> Verdict {
        let ip = &frame[ETH_HLEN..];
        if ip.len() < IPV4_HLEN || ip[0] >> 4 != 4 {
            return Verdict::Dropped(DropReason::Malformed);
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total_len = usize::from(be16(ip, 2));
        // A packet bigger than the port comes cut to its MTU, its total length the
        // original's: the answers below need only its headers.
        let cut = total_len > ip.len() && frame.len() >= MAX_FRAME;
        if ihl < IPV4_HLEN || total_len < ihl || (total_len > ip.len() && !cut) || ihl > ip.len() {
            return Verdict::Dropped(DropReason::Malformed);
        }
        if internet_checksum(&ip[..ihl]) != 0 {
            return Verdict::Dropped(DropReason::Malformed);
        }
        let frag = be16(ip, 6);
        // A later fragment carries no header to answer about.
        if frag & IPV4_FRAG_OFFSET != 0 {
            return Verdict::Dropped(DropReason::Fragment);
        }
        let first_fragment = frag & IPV4_MF != 0;
        let dst = Ipv4Addr::from(ipv4_at(ip, 16));
        if dst != self.gateway.ip {
            // What the datapath hands over to be refused first: a refused datagram that is
            // also too big gets the refusal, not a path MTU to retry with.
            let proto = ip[9];
            let l4 = &ip[ihl..total_len.min(ip.len())];
            let refused = !first_fragment
                && (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
                && l4.len() >= 4
                && self.refusals.refuses(dst, be16(l4, 2), proto);
            // Too big for the path, first fragments too (the datapath never fragments, and
            // a sender learns the path MTU from this even without DF).
            let too_big = self.gateway.path_mtu.filter(|mtu| total_len > usize::from(*mtu));
            if !refused && too_big.is_none() {
                return Verdict::Dropped(if first_fragment {
                    DropReason::Fragment
                } else {
                    DropReason::UnknownDestination
                });
            }
            if !may_answer_with_error(frame, ihl) {
                return Verdict::Dropped(DropReason::ErrorNotAllowed);
            }
            // Refusals share one budget. "Fragmentation needed" has none, as in Linux
            // (path MTU discovery is never limited): one pod retrying a service without
            // endpoints must not black-hole other pods' large transfers.
            if refused {
                if proto == IPPROTO_TCP && l4.get(13).is_some_and(|f| f & TCP_RST != 0) {
                    return Verdict::Dropped(DropReason::UnknownDestination); // never answer a reset
                }
                if !self.errors.take(std::time::Instant::now()) {
                    return Verdict::Dropped(DropReason::ErrorRateLimited);
                }
            }
            return match (refused, too_big) {
                (true, _) if proto == IPPROTO_TCP => self.tcp_reset(frame, ihl, total_len, tx),
                (true, _) => self.port_unreachable(frame, ihl, total_len, tx),
                (false, Some(mtu)) => self.frag_needed(frame, ihl, mtu, tx),
                (false, None) => Verdict::Dropped(DropReason::UnknownDestination),
            };
        }
        if first_fragment {
            return Verdict::Dropped(DropReason::Fragment);
        }
        if cut {
            let echo = ip[9] == IPPROTO_ICMP && ip.get(ihl) == Some(&ICMP_ECHO_REQUEST);
            return Verdict::Dropped(if echo { DropReason::Truncated } else { DropReason::IcmpToGatewayOther });
        }
        // Ethernet padding past the IPv4 total length is not part of the packet. Options
        // are read past; the answer carries back a Record Route and a Timestamp, as the
        // kernel's does.
        let ip = &ip[..total_len];
        let icmp = &ip[ihl..];
        if ip[9] != IPPROTO_ICMP || icmp.len() < ICMP_ECHO_HLEN || icmp[0] != ICMP_ECHO_REQUEST {
            return Verdict::Dropped(DropReason::IcmpToGatewayOther);
        }
        if internet_checksum(icmp) != 0 {
            return Verdict::Dropped(DropReason::Malformed);
        }

        let requester_mac = mac_at(frame, 6);
        let requester_ip = ipv4_at(ip, 12);
        let gw_mac = self.gateway.mac;
        let out = &mut self.scratch;
        out.clear();
        out.extend_from_slice(&requester_mac);
        out.extend_from_slice(&gw_mac);
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip_start = out.len();
        let echoed = echo_options(&ip[IPV4_HLEN..ihl], dst, ms_since_midnight_ut()).unwrap_or(EchoOptions::NONE);
        let options_len = echoed.len.next_multiple_of(4);
        out.extend_from_slice(&[0x45 + (options_len / 4) as u8, ip[1]]); // version/IHL, TOS kept
        out.extend_from_slice(&((IPV4_HLEN + options_len + icmp.len()) as u16).to_be_bytes());
        out.extend_from_slice(&ip[4..6]); // identification kept
        out.extend_from_slice(&[0, 0]); // no flags, offset 0
        out.extend_from_slice(&[DEFAULT_TTL, IPPROTO_ICMP, 0, 0]);
        out.extend_from_slice(&dst.octets());
        out.extend_from_slice(&requester_ip);
        out.extend_from_slice(echoed.bytes());
        out.resize(out.len() + options_len - echoed.len, 0); // padded with End of Options
        let ip_csum = internet_checksum(&out[ip_start..]);
        put_be16(out, ip_start + 10, ip_csum);
        let icmp_start = out.len();
        out.extend_from_slice(&[ICMP_ECHO_REPLY, 0, 0, 0]);
        out.extend_from_slice(&icmp[4..]); // id, seq and payload kept
        let icmp_csum = internet_checksum(&out[icmp_start..]);
        put_be16(out, icmp_start + 2, icmp_csum);
        tx(out);
        Verdict::Replied(ReplyKind::IcmpEcho)
    }
}

/// Whether an error may answer `frame` (RFC 1122 3.2.2, 4.2.3.10): not about an ICMP error,
/// nor about a packet sent to a link-layer or IP broadcast or multicast address, nor to a
/// source that names no single host (unspecified, loopback, broadcast, multicast).
fn may_answer_with_error(frame: &[u8], ihl: usize) -> bool {
    let ip = &frame[ETH_HLEN..];
    let (src, dst) = (Ipv4Addr::from(ipv4_at(ip, 12)), Ipv4Addr::from(ipv4_at(ip, 16)));
    let group = |a: Ipv4Addr| a.is_multicast() || a.is_broadcast();
    if frame[0] & 1 != 0 || group(dst) || group(src) || src.is_unspecified() || src.is_loopback() {
        return false;
    }
    // ICMP errors: destination unreachable, source quench, redirect, time exceeded,
    // parameter problem.
    !(ip[9] == IPPROTO_ICMP && ip.get(ihl).is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12)))
}

/// A token bucket for the errors the vswitch sends: `RATE` a second, at most `BURST` at once.
#[derive(Debug)]
struct ErrorLimiter {
    tokens: f64,
    at: Option<std::time::Instant>,
}

impl ErrorLimiter {
    const RATE: f64 = 1000.0;
    const BURST: f64 = 50.0;

    fn new() -> Self {
        Self { tokens: Self::BURST, at: None }
    }

    /// Whether one more error may go out `now`.
    fn take(&mut self, now: std::time::Instant) -> bool {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * Self::RATE;
            self.tokens = (self.tokens + refill).min(Self::BURST);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// IPv4 option types.
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
const IPOPT_RR: u8 = 7;
const IPOPT_TS: u8 = 68;
/// Timestamp option flags (RFC 791): timestamps only; each with the recording address;
/// only at the addresses the sender listed.
const IPOPT_TS_TSONLY: u8 = 0;
const IPOPT_TS_TSANDADDR: u8 = 1;
const IPOPT_TS_PRESPEC: u8 = 3;
/// The most option bytes an IPv4 header holds.
const IPV4_MAX_OPTIONS: usize = 40;

/// The options an echo reply carries back (RFC 1122 3.2.2.6): the request's Record Route
/// and Timestamp, in their order, with this hop recorded in them.
struct EchoOptions {
    buf: [u8; IPV4_MAX_OPTIONS],
    len: usize,
}

impl EchoOptions {
    const NONE: Self = Self { buf: [0; IPV4_MAX_OPTIONS], len: 0 };

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The request's Record Route and Timestamp options with `hop` recorded in each on arrival
/// and again on the way back (where there is room), as Linux does, so that they span the
/// round trip; `now` is the time the Timestamp takes. A Timestamp with no room counts this
/// hop once, on arrival (Linux's `ip_options_echo` does not count it again). None when the
/// option list is malformed (an option's length past the list, a pointer outside its
/// option, a timestamp overflow count that would overflow itself): the reply then carries
/// no options.
fn echo_options(options: &[u8], hop: Ipv4Addr, now: u32) -> Option<EchoOptions> {
    let mut out = EchoOptions::NONE;
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            IPOPT_END => break,
            IPOPT_NOOP => i += 1,
            kind => {
                let len = usize::from(*options.get(i + 1)?);
                if len < 2 || i + len > options.len() {
                    return None;
                }
                if kind == IPOPT_RR || kind == IPOPT_TS {
                    let opt = &mut out.buf[out.len..out.len + len];
                    opt.copy_from_slice(&options[i..i + len]);
                    let recorded = [true, false].into_iter().all(|arriving| match kind {
                        IPOPT_RR => record_hop(opt, hop),
                        _ => record_timestamp(opt, hop, now, arriving),
                    });
                    if !recorded {
                        return None;
                    }
                    out.len += len;
                }
                i += len;
            }
        }
    }
    Some(out)
}

/// Records `hop` in a Record Route option (type, length, pointer, addresses) if it has room
/// left: at its pointer (1-based, from 4), which moves to the next slot. False when the
/// option is malformed.
fn record_hop(rr: &mut [u8], hop: Ipv4Addr) -> bool {
    let Some(&pointer) = rr.get(2) else { return false };
    let pointer = usize::from(pointer);
    if pointer < 4 {
        return false;
    }
    if pointer + 3 <= rr.len() {
        rr[pointer - 1..pointer + 3].copy_from_slice(&hop.octets());
        rr[2] += 4;
    }
    true
}

/// Records a timestamp in a Timestamp option (type, length, pointer, overflow and flag,
/// slots from byte 5): a 4-byte time, or for the address flags the address then the time.
/// With prespecified addresses only a slot naming `hop` takes one. With no room left the
/// overflow count goes up, `arriving` only: the overflow counts hops, not passes. False when
/// the option is malformed.
fn record_timestamp(ts: &mut [u8], hop: Ipv4Addr, now: u32, arriving: bool) -> bool {
    if ts.len() < 4 {
        return false;
    }
    let (pointer, flag) = (usize::from(ts[2]), ts[3] & 0x0f);
    let slot = match flag {
        IPOPT_TS_TSONLY => 4,
        IPOPT_TS_TSANDADDR | IPOPT_TS_PRESPEC => 8,
        _ => return false,
    };
    if pointer < 5 {
        return false;
    }
    if pointer > ts.len() {
        // Full: count this hop among those that found no room, once (on arrival).
        if !arriving {
            return true;
        }
        if ts[3] >> 4 == 0x0f {
            return false;
        }
        ts[3] += 0x10;
        return true;
    }
    if pointer + slot - 1 > ts.len() {
        return false;
    }
    let at = pointer - 1;
    match flag {
        IPOPT_TS_TSONLY => ts[at..at + 4].copy_from_slice(&now.to_be_bytes()),
        IPOPT_TS_PRESPEC if ts[at..at + 4] != hop.octets() => return true,
        _ => {
            ts[at..at + 4].copy_from_slice(&hop.octets());
            ts[at + 4..at + 8].copy_from_slice(&now.to_be_bytes());
        }
    }
    ts[2] += slot as u8;
    true
}

/// The Timestamp option's time: milliseconds since midnight UT (RFC 791).
fn ms_since_midnight_ut() -> u32 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (since_epoch.as_millis() % 86_400_000) as u32
}

impl BuiltinVswitch {
    /// ICMP destination unreachable, "fragmentation needed" (type 3 code 4, RFC 1191), from
    /// the gateway to the sender, quoting the packet's IPv4 header (options included) and
    /// first 8 bytes of payload.
    fn frag_needed(&mut self, frame: &[u8], ihl: usize, mtu: u16, tx: &mut dyn FnMut(&[u8])) -> Verdict {
        let ip = &frame[ETH_HLEN..];
        let quoted = &ip[..(ihl + 8).min(ip.len())];
        let requester_mac = mac_at(frame, 6);
        let requester_ip = ipv4_at(ip, 12);
        let gw_mac = self.gateway.mac;
        let gw_ip = self.gateway.ip.octets();
        let out = &mut self.scratch;
        out.clear();
        out.extend_from_slice(&requester_mac);
        out.extend_from_slice(&gw_mac);
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip_start = out.len();
        let total = (IPV4_HLEN + ICMP_ECHO_HLEN + quoted.len()) as u16;
        out.extend_from_slice(&[0x45, 0xc0]); // internetwork control, like the kernel's ICMP errors
        out.extend_from_slice(&total.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]); // id 0, no fragmentation
        out.extend_from_slice(&[DEFAULT_TTL, IPPROTO_ICMP, 0, 0]);
        out.extend_from_slice(&gw_ip);
        out.extend_from_slice(&requester_ip);
        let ip_csum = internet_checksum(&out[ip_start..]);
        put_be16(out, ip_start + 10, ip_csum);
        let icmp_start = out.len();
        out.extend_from_slice(&[ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0]);
        out.extend_from_slice(&mtu.to_be_bytes());
        out.extend_from_slice(quoted);
        let icmp_csum = internet_checksum(&out[icmp_start..]);
        put_be16(out, icmp_start + 2, icmp_csum);
        tx(out);
        Verdict::Replied(ReplyKind::FragNeeded)
    }
}

impl BuiltinVswitch {
    /// Starts an answer to the sender of `frame`: Ethernet back to it, an IPv4 header from
    /// the address it wrote to (filled in by [`finish_ipv4`]). Returns the IPv4 start.
    fn begin_reply(&mut self, frame: &[u8], tos: u8, proto: u8) -> usize {
        let ip = &frame[ETH_HLEN..];
        let (from, to) = (ipv4_at(ip, 16), ipv4_at(ip, 12));
        // From the gateway's MAC, whatever the frame was sent to (the uplink's MAC for a
        // client outside: the datapath fills in the MACs there anyway).
        let (sender_mac, our_mac) = (mac_at(frame, 6), self.gateway.mac);
        let out = &mut self.scratch;
        out.clear();
        out.extend_from_slice(&sender_mac);
        out.extend_from_slice(&our_mac);
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip_start = out.len();
        out.extend_from_slice(&[0x45, tos, 0, 0, 0, 0, 0x40, 0]); // length later; DF
        out.extend_from_slice(&[DEFAULT_TTL, proto, 0, 0]);
        out.extend_from_slice(&from);
        out.extend_from_slice(&to);
        ip_start
    }

    fn finish_ipv4(out: &mut [u8], ip_start: usize) {
        let total = (out.len() - ip_start) as u16;
        put_be16(out, ip_start + 2, total);
        let csum = internet_checksum(&out[ip_start..ip_start + IPV4_HLEN]);
        put_be16(out, ip_start + 10, csum);
    }

    /// TCP RST for a segment to a refused destination (RFC 9293 3.10.7.1: the reset takes
    /// its sequence number from the segment's ACK, or acknowledges the segment).
    /// `total_len` is the packet's, which may be more than `frame` holds (cut to the port).
    fn tcp_reset(&mut self, frame: &[u8], ihl: usize, total_len: usize, tx: &mut dyn FnMut(&[u8])) -> Verdict {
        let ip = &frame[ETH_HLEN..(ETH_HLEN + total_len).min(frame.len())];
        let tcp = &ip[ihl..];
        if tcp.len() < TCP_HLEN {
            return Verdict::Dropped(DropReason::Malformed);
        }
        let flags = tcp[13];
        if flags & TCP_RST != 0 {
            // Never answer a reset.
            return Verdict::Dropped(DropReason::UnknownDestination);
        }
        let data_off = usize::from(tcp[12] >> 4) * 4;
        let payload = (total_len - ihl).saturating_sub(data_off) as u32;
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
        let (sport, dport) = (be16(tcp, 2), be16(tcp, 0));
        let (src, dst) = (ipv4_at(ip, 16), ipv4_at(ip, 12));
        let (rst_seq, rst_ack, rst_flags) = if flags & TCP_ACK != 0 {
            (ack, 0, TCP_RST)
        } else {
            let len = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
            (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
        };
        let ip_start = self.begin_reply(frame, 0, IPPROTO_TCP);
        let out = &mut self.scratch;
        let tcp_start = out.len();
        out.extend_from_slice(&sport.to_be_bytes());
        out.extend_from_slice(&dport.to_be_bytes());
        out.extend_from_slice(&rst_seq.to_be_bytes());
        out.extend_from_slice(&rst_ack.to_be_bytes());
        out.extend_from_slice(&[(TCP_HLEN as u8 / 4) << 4, rst_flags, 0, 0, 0, 0, 0, 0]);
        let csum = l4_checksum(src, dst, IPPROTO_TCP, &out[tcp_start..]);
        put_be16(out, tcp_start + 16, csum);
        Self::finish_ipv4(out, ip_start);
        tx(out);
        Verdict::Replied(ReplyKind::TcpReset)
    }

    /// ICMP port unreachable for a UDP datagram to a refused destination, from that
    /// destination, quoting the datagram's IPv4 header and up to 64 bytes after it.
    fn port_unreachable(&mut self, frame: &[u8], ihl: usize, total_len: usize, tx: &mut dyn FnMut(&[u8])) -> Verdict {
        let ip = &frame[ETH_HLEN..(ETH_HLEN + total_len).min(frame.len())];
        let quoted = ip[..(ihl + 64).min(ip.len())].to_vec();
        let ip_start = self.begin_reply(frame, 0xc0, IPPROTO_ICMP);
        let out = &mut self.scratch;
        let icmp_start = out.len();
        out.extend_from_slice(&[ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&quoted);
        let csum = internet_checksum(&out[icmp_start..]);
        put_be16(out, icmp_start + 2, csum);
        Self::finish_ipv4(out, ip_start);
        tx(out);
        Verdict::Replied(ReplyKind::PortUnreachable)
    }
}

impl SlowPath for BuiltinVswitch {
    fn handle(&mut self, frame: &[u8], tx: &mut dyn FnMut(&[u8])) -> Verdict {
        let verdict = self.classify(frame, tx);
        self.counters.record(frame.len(), verdict);
        verdict
    }

    fn counters(&self) -> VswitchCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
    const GW_MAC: [u8; 6] = [0x02, 0xfe, 0x00, 0x00, 0x00, 0x01];
    const POD_IP: [u8; 4] = [10, 1, 0, 7];
    const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x01, 0x00, 0x07];

    fn vswitch() -> BuiltinVswitch {
        BuiltinVswitch::new(GatewayConfig { ip: GW_IP, mac: GW_MAC, path_mtu: Some(1450) })
    }

    /// Runs one frame through a vswitch, collecting what it transmits.
    fn run(vs: &mut BuiltinVswitch, frame: &[u8]) -> (Verdict, Vec<Vec<u8>>) {
        let mut sent = Vec::new();
        let verdict = vs.handle(frame, &mut |f| sent.push(f.to_vec()));
        (verdict, sent)
    }

    fn arp_frame(op: u16, sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&sender_mac);
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&sender_mac);
        f.extend_from_slice(&sender_ip);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target_ip);
        f
    }

    /// An Ethernet + IPv4 frame with a correct header checksum.
    fn ipv4_frame(proto: u8, dst: [u8; 4], options: &[u8], frag: u16, l4: &[u8]) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let ihl = (IPV4_HLEN + options.len()) / 4;
        let total = (ihl * 4 + l4.len()) as u16;
        let mut f = Vec::new();
        f.extend_from_slice(&GW_MAC);
        f.extend_from_slice(&POD_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        f.push(0x40 | ihl as u8);
        f.push(0x10);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0xbe, 0xef]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[63, proto, 0, 0]);
        f.extend_from_slice(&POD_IP);
        f.extend_from_slice(&dst);
        f.extend_from_slice(options);
        let csum = internet_checksum(&f[ETH_HLEN..ETH_HLEN + ihl * 4]);
        put_be16(&mut f, ETH_HLEN + 10, csum);
        f.extend_from_slice(l4);
        f
    }

    fn icmp(kind: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![kind, 0, 0, 0];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(payload);
        let csum = internet_checksum(&m);
        put_be16(&mut m, 2, csum);
        m
    }

    fn echo_request(payload: &[u8]) -> Vec<u8> {
        ipv4_frame(
            IPPROTO_ICMP,
            GW_IP.octets(),
            &[],
            0x4000, // DF, as ping sets it
            &icmp(ICMP_ECHO_REQUEST, 0x1234, 7, payload),
        )
    }

    #[test]
    fn arp_request_for_gateway_gets_exact_reply() {
        let mut vs = vswitch();
        let (verdict, sent) = run(&mut vs, &arp_frame(1, POD_MAC, POD_IP, GW_IP.octets()));
        assert_eq!(verdict, Verdict::Replied(ReplyKind::Arp));
        let expected: Vec<u8> = [
            &POD_MAC[..],                          // eth dst: the requester
            &GW_MAC,                               // eth src: the gateway
            &[0x08, 0x06],                         // ARP
            &[0x00, 0x01, 0x08, 0x00, 0x06, 0x04], // Ethernet/IPv4
            &[0x00, 0x02],                         // reply
            &GW_MAC,                               // sender MAC
            &[10, 1, 0, 1],                        // sender IP
            &POD_MAC,                              // target MAC
            &POD_IP,                               // target IP
        ]
        .concat();
        assert_eq!(sent, vec![expected]);
        let c = vs.counters();
        assert_eq!(c.arp_replies, 1);
        assert_eq!(c.rx_frames, 1);
        assert_eq!(c.drops.total(), 0);
    }

    #[test]
    fn arp_request_with_ethernet_padding_is_answered() {
        let mut vs = vswitch();
        let mut f = arp_frame(1, POD_MAC, POD_IP, GW_IP.octets());
        f.resize(60, 0);
        let (verdict, sent) = run(&mut vs, &f);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::Arp));
        assert_eq!(sent[0].len(), ETH_HLEN + ARP_LEN);
    }

    #[test]
    fn other_arp_is_dropped_as_arp_other() {
        let mut vs = vswitch();
        let cases = [
            arp_frame(1, POD_MAC, POD_IP, [10, 1, 0, 9]),  // someone else's IP
            arp_frame(2, POD_MAC, POD_IP, GW_IP.octets()), // a reply
            {
                let mut f = arp_frame(1, POD_MAC, POD_IP, GW_IP.octets());
                f[ETH_HLEN + 1] = 6; // htype 6 (IEEE 802)
                f
            },
        ];
        for f in &cases {
            let (verdict, sent) = run(&mut vs, f);
            assert_eq!(verdict, Verdict::Dropped(DropReason::ArpOther));
            assert!(sent.is_empty());
        }
        assert_eq!(vs.counters().drops.arp_other, 3);
        assert_eq!(vs.counters().arp_replies, 0);
    }

    #[test]
    fn truncated_arp_is_malformed() {
        let mut vs = vswitch();
        let f = arp_frame(1, POD_MAC, POD_IP, GW_IP.octets());
        let (verdict, sent) = run(&mut vs, &f[..f.len() - 1]);
        assert_eq!(verdict, Verdict::Dropped(DropReason::Malformed));
        assert!(sent.is_empty());
    }

    #[test]
    fn echo_request_to_gateway_gets_valid_reply() {
        let mut vs = vswitch();
        let payload: Vec<u8> = (0..56u8).collect();
        let req = echo_request(&payload);
        let (verdict, sent) = run(&mut vs, &req);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::IcmpEcho));
        assert_eq!(sent.len(), 1);
        let r = &sent[0];
        assert_eq!(r.len(), req.len());
        // Ethernet: MACs swapped, the gateway's MAC as source.
        assert_eq!(&r[0..6], &POD_MAC);
        assert_eq!(&r[6..12], &GW_MAC);
        assert_eq!(&r[12..14], &[0x08, 0x00]);
        let ip = &r[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
        assert_eq!(ip[0], 0x45);
        assert_eq!(ip[1], 0x10, "TOS kept");
        assert_eq!(be16(ip, 2) as usize, IPV4_HLEN + ICMP_ECHO_HLEN + payload.len());
        assert_eq!(be16(ip, 6), 0, "no fragment flags");
        assert_eq!(ip[8], DEFAULT_TTL);
        assert_eq!(ip[9], IPPROTO_ICMP);
        assert_eq!(&ip[12..16], &GW_IP.octets());
        assert_eq!(&ip[16..20], &POD_IP);
        assert_eq!(internet_checksum(ip), 0, "IPv4 header checksum");
        // Recompute the IPv4 checksum from scratch and compare with the field.
        let mut zeroed = ip.to_vec();
        put_be16(&mut zeroed, 10, 0);
        assert_eq!(internet_checksum(&zeroed), be16(ip, 10));
        let icmp = &r[ETH_HLEN + IPV4_HLEN..];
        assert_eq!(icmp[0], ICMP_ECHO_REPLY);
        assert_eq!(icmp[1], 0);
        assert_eq!(be16(icmp, 4), 0x1234, "id kept");
        assert_eq!(be16(icmp, 6), 7, "seq kept");
        assert_eq!(&icmp[8..], &payload[..], "payload kept");
        let mut zeroed = icmp.to_vec();
        put_be16(&mut zeroed, 2, 0);
        assert_eq!(internet_checksum(&zeroed), be16(icmp, 2), "ICMP checksum");
        assert_eq!(vs.counters().icmp_echo_replies, 1);
    }

    #[test]
    fn echo_reply_ignores_ethernet_padding_and_handles_odd_payload() {
        let mut vs = vswitch();
        let mut req = echo_request(&[0xab; 3]);
        let unpadded = req.len();
        req.resize(60, 0xee);
        let (verdict, sent) = run(&mut vs, &req);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::IcmpEcho));
        let r = &sent[0];
        assert_eq!(r.len(), unpadded);
        assert_eq!(internet_checksum(&r[ETH_HLEN..ETH_HLEN + IPV4_HLEN]), 0);
        assert_eq!(internet_checksum(&r[ETH_HLEN + IPV4_HLEN..]), 0);
    }

    #[test]
    fn a_gateway_echo_with_ip_options_is_answered_without_them() {
        let mut vs = vswitch();
        // A router-alert option (4 bytes): IHL 6.
        let f = ipv4_frame(
            IPPROTO_ICMP,
            GW_IP.octets(),
            &[0x94, 0x04, 0x00, 0x00],
            0,
            &icmp(ICMP_ECHO_REQUEST, 7, 9, b"xyz"),
        );
        let (verdict, sent) = run(&mut vs, &f);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::IcmpEcho));
        let r = &sent[0];
        let ip = &r[ETH_HLEN..];
        assert_eq!(ip[0], 0x45, "the answer carries no options");
        assert_eq!(usize::from(be16(ip, 2)), ip.len());
        assert_eq!(internet_checksum(&ip[..IPV4_HLEN]), 0);
        let icmp = &ip[IPV4_HLEN..];
        assert_eq!(internet_checksum(icmp), 0);
        assert_eq!((icmp[0], be16(icmp, 4), be16(icmp, 6), &icmp[8..]), (ICMP_ECHO_REPLY, 7, 9, &b"xyz"[..]));
    }

    #[test]
    fn a_gateway_echo_with_record_route_is_answered_with_the_route_and_the_gateway_in_it() {
        let mut vs = vswitch();
        // NOP, then a Record Route with three slots, the first holding the sender: IHL 9.
        let mut options = vec![IPOPT_NOOP, IPOPT_RR, 15, 8];
        options.extend_from_slice(&POD_IP);
        options.extend_from_slice(&[0; 8]);
        let f = ipv4_frame(IPPROTO_ICMP, GW_IP.octets(), &options, 0, &icmp(ICMP_ECHO_REQUEST, 7, 9, b"xyz"));
        let (verdict, sent) = run(&mut vs, &f);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::IcmpEcho));
        let ip = &sent[0][ETH_HLEN..];
        assert_eq!(ip[0], 0x49, "a 15-byte option, padded to 16");
        assert_eq!(usize::from(be16(ip, 2)), ip.len());
        assert_eq!(internet_checksum(&ip[..36]), 0);
        let mut route = vec![IPOPT_RR, 15, 16];
        route.extend_from_slice(&POD_IP);
        route.extend_from_slice(&GW_IP.octets());
        route.extend_from_slice(&GW_IP.octets());
        route.push(IPOPT_END);
        assert_eq!(&ip[20..36], &route[..], "the sender, then the gateway on arrival and on the way back");
        let reply = &ip[36..];
        assert_eq!(internet_checksum(reply), 0);
        assert_eq!((reply[0], be16(reply, 4), be16(reply, 6), &reply[8..]), (ICMP_ECHO_REPLY, 7, 9, &b"xyz"[..]));

        // A full route comes back as it was; a malformed option list is answered without.
        let full = [IPOPT_RR, 7, 8, 10, 1, 0, 9, IPOPT_END];
        let f = ipv4_frame(IPPROTO_ICMP, GW_IP.octets(), &full, 0, &icmp(ICMP_ECHO_REQUEST, 7, 9, b""));
        let (_, sent) = run(&mut vs, &f);
        assert_eq!(&sent[0][ETH_HLEN + 20..ETH_HLEN + 28], &full[..]);
        let bad = [IPOPT_RR, 9, 4, 0];
        let f = ipv4_frame(IPPROTO_ICMP, GW_IP.octets(), &bad, 0, &icmp(ICMP_ECHO_REQUEST, 7, 9, b""));
        let (verdict, sent) = run(&mut vs, &f);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::IcmpEcho));
        assert_eq!(sent[0][ETH_HLEN], 0x45);
    }

    #[test]
    fn a_gateway_echo_with_a_timestamp_option_is_answered_with_the_gateways_times_in_it() {
        let mut vs = vswitch();
        // Timestamps only, four slots, the first taken by the sender on its way out: IHL 10.
        let mut options = vec![IPOPT_TS, 20, 9, IPOPT_TS_TSONLY, 0, 0, 0, 42];
        options.extend_from_slice(&[0; 12]);
        let before = ms_since_midnight_ut();
        let f = ipv4_frame(IPPROTO_ICMP, GW_IP.octets(), &options, 0, &icmp(ICMP_ECHO_REQUEST, 7, 9, b"xyz"));
        let (verdict, sent) = run(&mut vs, &f);
        let after = ms_since_midnight_ut();
        assert_eq!(verdict, Verdict::Replied(ReplyKind::IcmpEcho));
        let ip = &sent[0][ETH_HLEN..];
        assert_eq!(ip[0], 0x4a);
        assert_eq!(usize::from(be16(ip, 2)), ip.len());
        assert_eq!(internet_checksum(&ip[..40]), 0);
        assert_eq!(&ip[20..28], &[IPOPT_TS, 20, 17, IPOPT_TS_TSONLY, 0, 0, 0, 42], "the sender's time kept");
        let time_at = |i: usize| u32::from_be_bytes(ip[i..i + 4].try_into().unwrap());
        let (arrived, left) = (time_at(28), time_at(32));
        assert_eq!(arrived, left, "recorded on arrival and on the way back");
        assert!((before..=after).contains(&arrived) || after < before, "{before} <= {arrived} <= {after}");
        assert_eq!(&ip[36..40], &[0; 4], "the last slot left for the sender");
        let reply = &ip[40..];
        assert_eq!(internet_checksum(reply), 0);
        assert_eq!((reply[0], be16(reply, 4), be16(reply, 6), &reply[8..]), (ICMP_ECHO_REPLY, 7, 9, &b"xyz"[..]));
    }

    #[test]
    fn echo_options_keep_record_route_and_timestamp_in_order_with_this_hop_recorded() {
        const NOW: u32 = 0x0102_0304;
        let gw = GW_IP.octets();
        let echoed = |options: &[u8]| echo_options(options, GW_IP, NOW).map_or(vec![], |o| o.bytes().to_vec());
        let cat = |parts: &[&[u8]]| parts.concat();
        let now = NOW.to_be_bytes();

        // Both, with other options (router alert) around them, which are left out.
        let options =
            cat(&[&[0x94, 4, 0, 0], &[IPOPT_RR, 7, 4, 0, 0, 0, 0], &[IPOPT_NOOP], &[IPOPT_TS, 12, 5, 0], &[0; 8]]);
        let want = cat(&[&[IPOPT_RR, 7, 8], &gw, &[IPOPT_TS, 12, 13, 0], &now, &now]);
        assert_eq!(echoed(&options), want, "the route has room for one hop, the timestamps for two");

        // Addresses and times.
        let options = cat(&[&[IPOPT_TS, 28, 13, IPOPT_TS_TSANDADDR], &POD_IP, &[0, 0, 0, 9], &[0; 16]]);
        let want = cat(&[&[IPOPT_TS, 28, 29, IPOPT_TS_TSANDADDR], &POD_IP, &[0, 0, 0, 9], &gw, &now, &gw, &now]);
        assert_eq!(echoed(&options), want);

        // Prespecified: the slot naming the gateway takes its time, the next, naming
        // another host, waits for that host.
        let other = [192, 0, 2, 1];
        let options = cat(&[&[IPOPT_TS, 20, 5, IPOPT_TS_PRESPEC], &gw, &[0; 4], &other, &[0; 4]]);
        let want = cat(&[&[IPOPT_TS, 20, 13, IPOPT_TS_PRESPEC], &gw, &now, &other, &[0; 4]]);
        assert_eq!(echoed(&options), want);

        // Full: each hop that found no room counts in the overflow nibble, the gateway once.
        assert_eq!(echoed(&[IPOPT_TS, 8, 9, 0x10, 0, 0, 0, 1]), [IPOPT_TS, 8, 9, 0x20, 0, 0, 0, 1]);
        // Room for one: taken on arrival; the way back finds it full and counts nothing.
        let options = cat(&[&[IPOPT_TS, 12, 9, IPOPT_TS_TSONLY], &[0, 0, 0, 1], &[0; 4]]);
        assert_eq!(echoed(&options), cat(&[&[IPOPT_TS, 12, 13, IPOPT_TS_TSONLY], &[0, 0, 0, 1], &now]));

        // Malformed: answered without options.
        for bad in [
            &[IPOPT_TS, 8, 9, 0xf0, 0, 0, 0, 1][..], // the overflow count would overflow
            &[IPOPT_TS, 8, 4, 0, 0, 0, 0, 0],        // pointer before the first slot
            &[IPOPT_TS, 8, 7, 0, 0, 0, 0, 0],        // a slot past the option's end
            &[IPOPT_TS, 12, 5, 2, 0, 0, 0, 0, 0, 0, 0, 0], // no such flag
            &[IPOPT_RR, 7, 3, 0, 0, 0, 0],           // route pointer before its first slot
            &[IPOPT_NOOP, IPOPT_TS],                 // no length
        ] {
            assert!(echoed(bad).is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn fragments_are_dropped() {
        let mut vs = vswitch();
        let l4 = icmp(ICMP_ECHO_REQUEST, 1, 1, &[0; 16]);
        let first = ipv4_frame(IPPROTO_ICMP, GW_IP.octets(), &[], IPV4_MF, &l4);
        let later = ipv4_frame(IPPROTO_ICMP, GW_IP.octets(), &[], 3, &[0; 24]);
        for f in [first, later] {
            let (verdict, sent) = run(&mut vs, &f);
            assert_eq!(verdict, Verdict::Dropped(DropReason::Fragment));
            assert!(sent.is_empty());
        }
        assert_eq!(vs.counters().drops.fragment, 2);
    }

    #[test]
    fn ipv4_to_other_destinations_is_unknown_destination() {
        let mut vs = vswitch();
        let l4 = icmp(ICMP_ECHO_REQUEST, 1, 1, b"hi");
        for dst in [[10, 1, 0, 9], [8, 8, 8, 8], [255, 255, 255, 255]] {
            let (verdict, sent) = run(&mut vs, &ipv4_frame(IPPROTO_ICMP, dst, &[], 0, &l4));
            assert_eq!(verdict, Verdict::Dropped(DropReason::UnknownDestination));
            assert!(sent.is_empty());
        }
        assert_eq!(vs.counters().drops.unknown_destination, 3);
    }

    #[test]
    fn non_echo_traffic_to_gateway_is_icmp_to_gateway_other() {
        let mut vs = vswitch();
        let udp = [0x30, 0x39, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00];
        let frames = [
            ipv4_frame(17, GW_IP.octets(), &[], 0, &udp),
            ipv4_frame(IPPROTO_ICMP, GW_IP.octets(), &[], 0, &icmp(ICMP_ECHO_REPLY, 1, 1, b"")),
            ipv4_frame(IPPROTO_ICMP, GW_IP.octets(), &[], 0, &[8, 0, 0]), // truncated ICMP
        ];
        for f in &frames {
            let (verdict, sent) = run(&mut vs, f);
            assert_eq!(verdict, Verdict::Dropped(DropReason::IcmpToGatewayOther));
            assert!(sent.is_empty());
        }
        assert_eq!(vs.counters().drops.icmp_to_gateway_other, 3);
    }

    #[test]
    fn ipv6_and_other_ethertypes_are_non_ipv4() {
        let mut vs = vswitch();
        let mut v6 = vec![0x33, 0x33, 0, 0, 0, 1];
        v6.extend_from_slice(&POD_MAC);
        v6.extend_from_slice(&[0x86, 0xdd]);
        v6.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 58, 255]);
        v6.extend_from_slice(&[0; 32 + 8]);
        let mut vlan = arp_frame(1, POD_MAC, POD_IP, GW_IP.octets());
        vlan[12..14].copy_from_slice(&[0x81, 0x00]);
        for f in [v6, vlan] {
            let (verdict, sent) = run(&mut vs, &f);
            assert_eq!(verdict, Verdict::Dropped(DropReason::NonIpv4));
            assert!(sent.is_empty());
        }
        assert_eq!(vs.counters().drops.non_ipv4, 2);
    }

    #[test]
    fn malformed_ipv4_is_dropped() {
        let mut vs = vswitch();
        let good = echo_request(b"abcd");
        let mut bad_hdr_csum = good.clone();
        bad_hdr_csum[ETH_HLEN + 10] ^= 0xff;
        let mut bad_icmp_csum = good.clone();
        let last = bad_icmp_csum.len() - 1;
        bad_icmp_csum[last] ^= 0xff;
        let mut total_len_too_big = good.clone();
        put_be16(&mut total_len_too_big, ETH_HLEN + 2, 1500);
        let mut version6 = good.clone();
        version6[ETH_HLEN] = 0x65;
        let cases = [
            good[..ETH_HLEN + 10].to_vec(), // truncated IPv4 header
            good[..10].to_vec(),            // truncated Ethernet header
            bad_hdr_csum,
            bad_icmp_csum,
            total_len_too_big,
            version6,
        ];
        for (i, f) in cases.iter().enumerate() {
            let (verdict, sent) = run(&mut vs, f);
            assert_eq!(verdict, Verdict::Dropped(DropReason::Malformed), "case {i}");
            assert!(sent.is_empty(), "case {i}");
        }
        assert_eq!(vs.counters().drops.malformed, cases.len() as u64);
    }

    #[test]
    fn set_gateway_takes_effect_and_keeps_counters() {
        let mut vs = vswitch();
        let new_ip = Ipv4Addr::new(10, 2, 0, 1);
        let new_mac = [0x02, 0xfe, 0, 0, 0, 0x22];
        run(&mut vs, &arp_frame(1, POD_MAC, POD_IP, GW_IP.octets()));
        vs.set_gateway(GatewayConfig { ip: new_ip, mac: new_mac, path_mtu: None });
        assert_eq!(vs.gateway().ip, new_ip);
        let (old, _) = run(&mut vs, &arp_frame(1, POD_MAC, POD_IP, GW_IP.octets()));
        assert_eq!(old, Verdict::Dropped(DropReason::ArpOther));
        let (verdict, sent) = run(&mut vs, &arp_frame(1, POD_MAC, POD_IP, new_ip.octets()));
        assert_eq!(verdict, Verdict::Replied(ReplyKind::Arp));
        assert_eq!(&sent[0][6..12], &new_mac);
        assert_eq!(&sent[0][ETH_HLEN + 8..ETH_HLEN + 14], &new_mac);
        assert_eq!(&sent[0][ETH_HLEN + 14..ETH_HLEN + 18], &new_ip.octets());
        let c = vs.counters();
        assert_eq!((c.rx_frames, c.arp_replies, c.drops.arp_other), (3, 2, 1));
    }

    #[test]
    fn counters_serialise_as_plain_json() {
        let mut vs = vswitch();
        run(&mut vs, &echo_request(b"p"));
        let json = serde_json::to_value(vs.counters()).expect("serialise");
        assert_eq!(json["icmp_echo_replies"], 1);
        assert_eq!(json["drops"]["fragment"], 0);
    }

    #[test]
    fn packet_too_big_for_the_path_gets_frag_needed_with_the_mtu() {
        let mut vs = vswitch();
        let payload = vec![0x42u8; 1500];
        let big = ipv4_frame(17, [10, 1, 2, 9], &[], 0x4000, &payload);
        let (verdict, sent) = run(&mut vs, &big);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::FragNeeded));
        let r = &sent[0];
        assert_eq!(&r[0..6], &POD_MAC, "back to the sender");
        let ip = &r[ETH_HLEN..];
        assert_eq!(internet_checksum(&ip[..IPV4_HLEN]), 0);
        assert_eq!(&ip[12..16], &GW_IP.octets(), "from the gateway");
        assert_eq!(&ip[16..20], &POD_IP);
        let icmp = &ip[IPV4_HLEN..];
        assert_eq!((icmp[0], icmp[1]), (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED));
        assert_eq!(be16(icmp, 6), 1450, "next-hop MTU");
        assert_eq!(&icmp[8..8 + IPV4_HLEN + 8], &big[ETH_HLEN..ETH_HLEN + IPV4_HLEN + 8], "quotes header + 8 bytes");
        assert_eq!(internet_checksum(icmp), 0);
        assert_eq!(vs.counters().frag_needed_sent, 1);
        // A packet that fits, to an unknown destination, is still dropped.
        let small = ipv4_frame(17, [10, 1, 2, 9], &[], 0x4000, &[0; 100]);
        assert_eq!(run(&mut vs, &small).0, Verdict::Dropped(DropReason::UnknownDestination));
    }

    fn refusing(dst: [u8; 4], port: u16, proto: u8) -> BuiltinVswitch {
        let mut vs = vswitch();
        let mut r = Refusals::default();
        r.exact.insert((Ipv4Addr::from(dst), port, proto));
        vs.set_refusals(Arc::new(r));
        vs
    }

    fn tcp_segment(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&ack.to_be_bytes());
        t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(payload);
        let csum = l4_checksum(POD_IP, [10, 96, 0, 10], IPPROTO_TCP, &t);
        put_be16(&mut t, 16, csum);
        t
    }

    #[test]
    fn syn_to_a_refused_service_gets_a_valid_rst_ack_from_the_service_address() {
        let svc = [10, 96, 0, 10];
        let mut vs = refusing(svc, 80, IPPROTO_TCP);
        let f = ipv4_frame(IPPROTO_TCP, svc, &[], 0x4000, &tcp_segment(40000, 80, 1000, 0, TCP_SYN, &[]));
        let (verdict, sent) = run(&mut vs, &f);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::TcpReset));
        let r = &sent[0];
        assert_eq!(mac_at(r, 0), POD_MAC);
        let ip = &r[ETH_HLEN..];
        assert_eq!(internet_checksum(&ip[..IPV4_HLEN]), 0);
        assert_eq!(usize::from(be16(ip, 2)), ip.len());
        assert_eq!((ipv4_at(ip, 12), ipv4_at(ip, 16)), (svc, POD_IP));
        let tcp = &ip[IPV4_HLEN..];
        assert_eq!((be16(tcp, 0), be16(tcp, 2)), (80, 40000));
        assert_eq!(tcp[13], TCP_RST | TCP_ACK);
        assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 1001, "acknowledges the SYN");
        assert_eq!(l4_checksum(svc, POD_IP, IPPROTO_TCP, tcp), 0, "valid TCP checksum");
        // A segment with ACK: the reset takes its sequence number from it; a reset is never answered.
        let f = ipv4_frame(IPPROTO_TCP, svc, &[], 0, &tcp_segment(40000, 80, 5, 777, TCP_ACK, b"x"));
        let (_, sent) = run(&mut vs, &f);
        let tcp = &sent[0][ETH_HLEN + IPV4_HLEN..];
        assert_eq!((u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]), tcp[13]), (777, TCP_RST));
        let f = ipv4_frame(IPPROTO_TCP, svc, &[], 0, &tcp_segment(40000, 80, 5, 0, TCP_RST, &[]));
        assert!(run(&mut vs, &f).1.is_empty());
        // Another port of the same address is not refused.
        let f = ipv4_frame(IPPROTO_TCP, svc, &[], 0, &tcp_segment(40000, 81, 5, 0, TCP_SYN, &[]));
        assert_eq!(run(&mut vs, &f).0, Verdict::Dropped(DropReason::UnknownDestination));
        assert_eq!(vs.counters().tcp_resets_sent, 2);
    }

    #[test]
    fn a_cluster_ip_refuses_whatever_port_reaches_the_slow_path() {
        let svc = [10, 96, 0, 10];
        let mut vs = vswitch();
        let mut r = Refusals::default();
        r.cluster_ips.insert(Ipv4Addr::from(svc));
        vs.set_refusals(Arc::new(r));
        let f = ipv4_frame(IPPROTO_TCP, svc, &[], 0, &tcp_segment(40000, 81, 5, 0, TCP_SYN, &[]));
        assert_eq!(run(&mut vs, &f).0, Verdict::Replied(ReplyKind::TcpReset));
        // Another address is not.
        let f = ipv4_frame(IPPROTO_TCP, [10, 96, 0, 11], &[], 0, &tcp_segment(40000, 81, 5, 0, TCP_SYN, &[]));
        assert_eq!(run(&mut vs, &f).0, Verdict::Dropped(DropReason::UnknownDestination));
    }

    #[test]
    fn udp_to_a_refused_node_port_gets_port_unreachable_quoting_the_datagram() {
        let node = Ipv4Addr::new(192, 168, 100, 11);
        let mut vs = vswitch();
        let mut r = Refusals::default();
        r.node_ports.insert((30053, IPPROTO_UDP));
        r.node_addrs.insert(node);
        vs.set_refusals(Arc::new(r));
        let udp = [0x9c, 0x40, 0x75, 0x65, 0, 12, 0, 0, b'p', b'i', b'n', b'g'];
        let f = ipv4_frame(IPPROTO_UDP, node.octets(), &[], 0, &udp);
        let (verdict, sent) = run(&mut vs, &f);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::PortUnreachable));
        let ip = &sent[0][ETH_HLEN..];
        assert_eq!(ipv4_at(ip, 12), node.octets());
        let icmp = &ip[IPV4_HLEN..];
        assert_eq!((icmp[0], icmp[1]), (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH));
        assert_eq!(internet_checksum(icmp), 0);
        assert_eq!(&icmp[8..], &f[ETH_HLEN..], "the whole short datagram is quoted");
        // With IP options: the port is read past them, and they are quoted too.
        let f = ipv4_frame(IPPROTO_UDP, node.octets(), &[1, 1, 1, 0], 0, &udp);
        let (verdict, sent) = run(&mut vs, &f);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::PortUnreachable));
        let icmp = &sent[0][ETH_HLEN + IPV4_HLEN..];
        assert_eq!(&icmp[8..], &f[ETH_HLEN..], "the datagram is quoted with its options");
        assert_eq!(internet_checksum(icmp), 0);
        // Another node's address with that port is not this set's.
        let f = ipv4_frame(IPPROTO_UDP, [192, 168, 100, 99], &[], 0, &udp);
        assert_eq!(run(&mut vs, &f).0, Verdict::Dropped(DropReason::UnknownDestination));
    }

    /// What the datapath hands over for a packet bigger than the port: the first
    /// [`MAX_FRAME`] bytes, the IPv4 total length still the packet's.
    fn cut(frame: &[u8]) -> Vec<u8> {
        assert!(frame.len() > MAX_FRAME);
        frame[..MAX_FRAME].to_vec()
    }

    #[test]
    fn packets_cut_to_the_port_are_answered_from_their_headers() {
        let svc = [10, 96, 0, 10];
        // "Fragmentation needed" for a jumbo DF packet, quoting its real length.
        let mut vs = vswitch();
        let big = ipv4_frame(IPPROTO_UDP, [10, 1, 2, 9], &[], 0x4000, &vec![0x42; 3000]);
        let (verdict, sent) = run(&mut vs, &cut(&big));
        assert_eq!(verdict, Verdict::Replied(ReplyKind::FragNeeded));
        let icmp = &sent[0][ETH_HLEN + IPV4_HLEN..];
        assert_eq!(be16(icmp, 6), 1450);
        assert_eq!(be16(icmp, 8 + 2), 3020, "the quoted header keeps the packet's length");
        assert_eq!(internet_checksum(icmp), 0);
        // A refused jumbo datagram gets its port unreachable, quoting 64 bytes.
        let mut vs = refusing(svc, 53, IPPROTO_UDP);
        let mut udp = vec![0x9c, 0x40, 0, 53, 0x0b, 0xb8, 0, 0];
        udp.resize(3000, 0x42);
        let f = ipv4_frame(IPPROTO_UDP, svc, &[], 0, &udp);
        let (verdict, sent) = run(&mut vs, &cut(&f));
        assert_eq!(verdict, Verdict::Replied(ReplyKind::PortUnreachable));
        let icmp = &sent[0][ETH_HLEN + IPV4_HLEN..];
        assert_eq!(&icmp[8..], &f[ETH_HLEN..ETH_HLEN + IPV4_HLEN + 64]);
        // A refused jumbo segment without ACK is acknowledged whole, not as far as the cut.
        let mut vs = refusing(svc, 80, IPPROTO_TCP);
        let f = ipv4_frame(IPPROTO_TCP, svc, &[], 0x4000, &tcp_segment(40000, 80, 1000, 0, TCP_SYN, &[7; 3000]));
        let (verdict, sent) = run(&mut vs, &cut(&f));
        assert_eq!(verdict, Verdict::Replied(ReplyKind::TcpReset));
        let tcp = &sent[0][ETH_HLEN + IPV4_HLEN..];
        assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 1000 + 1 + 3000);
        // An echo request to the gateway cannot be echoed from part of it; anything else
        // that big for the gateway is what it is.
        let mut vs = vswitch();
        let (verdict, sent) = run(&mut vs, &cut(&echo_request(&vec![1; 3000])));
        assert_eq!(verdict, Verdict::Dropped(DropReason::Truncated));
        assert!(sent.is_empty());
        let udp = ipv4_frame(IPPROTO_UDP, GW_IP.octets(), &[], 0, &vec![0; 3000]);
        assert_eq!(run(&mut vs, &cut(&udp)).0, Verdict::Dropped(DropReason::IcmpToGatewayOther));
        // A frame shorter than the port's largest that claims more is malformed, as before.
        assert_eq!(run(&mut vs, &big[..1000]).0, Verdict::Dropped(DropReason::Malformed));
    }

    #[test]
    fn a_refused_datagram_too_big_for_the_path_gets_the_refusal() {
        let svc = [10, 96, 0, 10];
        let mut vs = refusing(svc, 53, IPPROTO_UDP);
        let mut udp = vec![0x9c, 0x40, 0, 53, 0x05, 0xc8, 0, 0];
        udp.resize(1480, 0x42);
        let f = ipv4_frame(IPPROTO_UDP, svc, &[], 0x4000, &udp);
        let (verdict, sent) = run(&mut vs, &f);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::PortUnreachable));
        assert_eq!(sent[0][ETH_HLEN + IPV4_HLEN + 1], ICMP_PORT_UNREACH, "not fragmentation needed");
    }

    #[test]
    fn a_first_fragment_too_big_for_the_path_gets_frag_needed() {
        let mut vs = vswitch();
        let first = ipv4_frame(IPPROTO_UDP, [10, 1, 2, 9], &[], IPV4_MF, &[0x42; 1480]);
        let (verdict, sent) = run(&mut vs, &first);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::FragNeeded));
        assert_eq!(be16(&sent[0][ETH_HLEN + IPV4_HLEN..], 6), 1450);
        // One that fits is still a fragment the slow path cannot use.
        let small = ipv4_frame(IPPROTO_UDP, [10, 1, 2, 9], &[], IPV4_MF, &[0x42; 100]);
        assert_eq!(run(&mut vs, &small).0, Verdict::Dropped(DropReason::Fragment));
    }

    #[test]
    fn no_error_answers_an_icmp_error_a_broadcast_or_a_multicast() {
        let svc = [10, 96, 0, 10];
        let mut vs = refusing(svc, 53, IPPROTO_UDP);
        // An ICMP error (port unreachable) too big for the path.
        let mut unreach = vec![ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
        unreach.resize(1480, 0);
        let f = ipv4_frame(IPPROTO_ICMP, [10, 1, 2, 9], &[], 0x4000, &unreach);
        assert_eq!(run(&mut vs, &f), (Verdict::Dropped(DropReason::ErrorNotAllowed), vec![]));
        // A refused datagram sent to the broadcast MAC, and one to a multicast address.
        let udp = [0x9c, 0x40, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4];
        let mut f = ipv4_frame(IPPROTO_UDP, svc, &[], 0, &udp);
        f[0..6].copy_from_slice(&[0xff; 6]);
        assert_eq!(run(&mut vs, &f), (Verdict::Dropped(DropReason::ErrorNotAllowed), vec![]));
        let mut r = Refusals::default();
        r.exact.insert((Ipv4Addr::new(239, 1, 1, 1), 53, IPPROTO_UDP));
        vs.set_refusals(Arc::new(r));
        let f = ipv4_frame(IPPROTO_UDP, [239, 1, 1, 1], &[], 0, &udp);
        assert_eq!(run(&mut vs, &f), (Verdict::Dropped(DropReason::ErrorNotAllowed), vec![]));
        assert_eq!(vs.counters().drops.error_not_allowed, 3);
    }

    #[test]
    fn errors_are_rate_limited_and_come_from_the_gateway_mac() {
        let svc = [10, 96, 0, 10];
        let mut vs = refusing(svc, 53, IPPROTO_UDP);
        let udp = [0x9c, 0x40, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4];
        let mut f = ipv4_frame(IPPROTO_UDP, svc, &[], 0, &udp);
        // Sent to another MAC (a client outside writes to the uplink's).
        f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        let (verdict, sent) = run(&mut vs, &f);
        assert_eq!(verdict, Verdict::Replied(ReplyKind::PortUnreachable));
        assert_eq!(mac_at(&sent[0], 6), GW_MAC, "from the gateway's MAC");
        let answered = (0..1000).filter(|_| !run(&mut vs, &f).1.is_empty()).count();
        assert!((49..=60).contains(&answered), "a burst of 1000 got {answered} answers");
        assert!(vs.counters().drops.error_rate_limited >= 900);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!run(&mut vs, &f).1.is_empty(), "the bucket refills");
        // With the refusals' budget spent, a packet too big for the path still learns the
        // path MTU (Linux never limits it either).
        while !run(&mut vs, &f).1.is_empty() {}
        let big = ipv4_frame(IPPROTO_UDP, [10, 1, 2, 9], &[], 0x4000, &[0x42; 1480]);
        for _ in 0..100 {
            assert_eq!(run(&mut vs, &big).0, Verdict::Replied(ReplyKind::FragNeeded));
        }
    }

    #[test]
    fn resets_to_a_refused_destination_spend_no_error_budget() {
        let svc = [10, 96, 0, 10];
        let mut vs = refusing(svc, 80, IPPROTO_TCP);
        let rst = ipv4_frame(IPPROTO_TCP, svc, &[], 0x4000, &tcp_segment(40000, 80, 1000, 5, TCP_RST | TCP_ACK, &[]));
        for _ in 0..200 {
            let (verdict, sent) = run(&mut vs, &rst);
            assert_eq!(verdict, Verdict::Dropped(DropReason::UnknownDestination));
            assert!(sent.is_empty(), "a reset is never answered");
        }
        let syn = ipv4_frame(IPPROTO_TCP, svc, &[], 0x4000, &tcp_segment(40001, 80, 1000, 0, TCP_SYN, &[]));
        assert_eq!(run(&mut vs, &syn).0, Verdict::Replied(ReplyKind::TcpReset), "the budget is whole");
        assert_eq!(vs.counters().drops.error_rate_limited, 0);
    }
}
