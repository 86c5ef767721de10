//! `cargo xtask bench services`: what a Service costs a pod, and how fast a node follows
//! them, with 10, 1,000 and 10,000 Services in the store; this datapath against the same
//! Services rendered the way kube-proxy renders them, built in the same run and measured
//! alternately.
//!
//! **Ours**: a three-node cluster in a box. The client and server pods are on node-1; every
//! Service and EndpointSlice is real YAML applied with `netctl apply` (one multi-document
//! file per step). node-2's agent is stopped except while its cold start is timed. node-3
//! is ours with 10 services at every step (below).
//!
//! **Baselines**: kube-proxy's two renderings of the same Services, each in its own "node"
//! namespace with a client and a server pod namespace wired like a plain routed CNI (veth,
//! /32 routes, static neighbours, the pods' default route via the node; each baseline's client
//! has an address of its own, so no two baselines' connections share a tuple). The rules sit where
//! kube-proxy puts them for pod traffic: the node's nat PREROUTING hook (a pod's SYN enters
//! the node through its veth, is DNAT'ed there and routed to the backend's veth), so only
//! the service implementation differs from a kube-proxy node:
//! - iptables mode: `*nat` with PREROUTING/OUTPUT -> KUBE-SERVICES, one rule per service
//!   port (`-d clusterIP/32 -p tcp --dport`) jumping to KUBE-SVC-<hash>, which marks for
//!   masquerade from outside the cluster CIDR and picks a KUBE-SEP-<hash> with `statistic
//!   --mode random --probability 1/k`; each KUBE-SEP marks hairpin traffic and DNATs;
//!   KUBE-NODEPORTS last; KUBE-POSTROUTING masquerades marked traffic; the `*filter`
//!   chains kube-proxy hooks (KUBE-FORWARD and the empty service/firewall chains). Loaded with
//!   `iptables-nft-restore` (Debian 12's default iptables backend, nf_tables, which
//!   kube-proxy's image picks on such a node), and the same text with
//!   `iptables-legacy-restore` (x_tables) as a second iptables baseline. kube-proxy writes its services in Go map order, i.e. in no
//!   particular order, so the measured service sits in the middle of KUBE-SERVICES (where a
//!   service lands on average).
//! - nftables mode: table `ip kube-proxy` with the `service-ips` verdict map keyed by
//!   `ipv4_addr . inet_proto . inet_service`, per-service chains choosing an endpoint chain
//!   with `numgen random mod k vmap`, endpoint chains DNAT'ing, masquerade marking, the
//!   filter-hook chains and `cluster-ips` set; loaded with `nft -f`.
//! - no proxy: the same routed node and pods with no netfilter rule at all, the client
//!   connecting straight to the server's pod IP: what a new connection costs the kernel
//!   itself, the floor under every implementation.
//! - a redirect-only edge: the same routed node and pods, the client connecting straight to
//!   the server's pod IP, through ebpf/diagnostics/redirect-only.c on both host veths (a
//!   destination MAC write and `bpf_redirect_peer`; no source check, conntrack, policy,
//!   service or counter): the floor under every eBPF pod edge on veths.
//!
//! Metrics (target/bench/services.json, and target/bench/services.png: connect latency p50
//! and p99 against the number of services for every implementation, drawn with plotters):
//! - `connect_p50_10k_vs_iptables` (bar <= 0.2), `connect_p50_10k_vs_10` (ours at 10,000
//!   against ours at 10; bar <= 1.2: node-3's agent, configured with a proxy name, serves only
//!   the 10 services labelled for it, and its client and server pods are measured in the same
//!   blocks as node-1's, so that the machine's drift between the scale steps, which moved the
//!   kernel's own floor by up to 27%, does not enter the ratio; `..._first_phase` is the
//!   comparison across steps, node-1 at 10,000 against node-1 at 10), p99s, the nftables and iptables-legacy comparisons and
//!   every scale: a new TCP connection from the client pod to the service's ClusterIP, one
//!   64-byte request and its 64-byte answer (timed from connect() to the answer; the client
//!   closes with a reset, so neither side piles up TIME_WAIT). Client and server busy-poll on
//!   separate CPUs, as in the other latency benchmarks; blocks of 500 connections, each
//!   topology in turn, in an order shuffled for each block from a fixed seed (each topology
//!   first in as many blocks as any other). `connect_p50_10k_clusterip_vs_pod_ip` puts
//!   ours beside the same pods connecting to the server's pod IP (what the service layer
//!   adds to a connection); `connect_p50_10k_vs_kernel_routing_pod_ip` puts it beside the
//!   no-proxy floor above (the summary line says what the 0.2 bar asks for in microseconds
//!   against that floor), and `connect_p50_10k_vs_redirect_only_edge_pod_ip` beside the
//!   redirect-only edge (what everything ours does costs a connection; the summary line puts
//!   that edge against iptables and the kernel too). p90 rows beside the p99s: on a busy
//!   shared machine a p99 of busy-polling threads is mostly the time they spent descheduled.
//! - `clusterip_throughput` (bar >= 0.97) and `clusterip_rr_p50` (bar <= 1.05), p99: one TCP
//!   stream (iperf3) and 64-byte request/response from the client pod to the server through
//!   a ClusterIP, against the same pods talking directly, at 10,000 services. Throughput is
//!   the ratio of the two means over `ROUNDS` paired rounds (the throughput of all the time
//!   each ran). A single round's ratio scatters by about 8-10% on this machine with no lean
//!   either way (over 232 rounds of 23 runs the median round ratio was 1.000); the median
//!   of 8 rounds moved a run's ratio by about 4% and read under 0.97 in 8 of 25 runs, and
//!   resampling the recorded rounds puts the mean of 16 at about 2.5%.
//!   `clusterip_rr_p50` pools the samples of `RR_BLOCKS` connections per side. This
//!   machine's round trip sits at one level for a while (10.9, 13.2-13.6 or 15.1 us in the
//!   five runs of stop 41, often one level a whole run) and both sides move with it, so a
//!   pooled p50 that falls between two levels reads whichever side had a few more
//!   connections at the higher one.
//!   `clusterip_rr_median_pair_p50` (a diagnostic) is the pair of adjacent connections (one
//!   per side) whose p50 ratio is the median of the pairs'; the log lists every pair.
//! - `programming_p99_10k` (target <= 100 ms), p50 and max: from the spawn of a `netctl apply
//!   -f` process on a file holding a changed EndpointSlice (the probe service's backend port;
//!   the netctl binary the box runs, started in the control namespace where etcd listens, so
//!   its start, parse, connect, get and put all count) to the new port in node-1's pinned
//!   SVC_BACKENDS map, polled every 200 us; `PROGRAMMING_SAMPLES` changes per scale; baseline
//!   the same at 10 services. `programming_p99_10k_in_process` / `..._p50_..._in_process` are
//!   the figures this row used to be: from the start of the store write made in-process by
//!   the code `netctl apply` runs, its store client already connected (every other change
//!   is also written that way, the two kinds alternating). The log gives how long each
//!   netctl process ran.
//! - `cold_start_10k` (target <= 2 s): node-2's agent started on an empty bpffs (its pin
//!   directory removed, as on a fresh or rebooted node) with 10,000 services in the store,
//!   until its pinned SVC_FRONTENDS and SVC_BACKENDS hold every entry node-1's hold (median
//!   of a few starts); baseline the same with 10 services. `cold_start_10k_vs_iptables_restore`
//!   and `..._vs_nft_load` put it beside the wall time `iptables-nft-restore` / `nft -f` take
//!   to load the 10,000-service rendering alone, once, into their node namespace (which holds
//!   the 1,000-service rendering, replaced in the same load): a loader's time, the least
//!   kube-proxy does at start, without its own start, API watch and informer sync, so not
//!   kube-proxy's cold start. The loads are timed only after every running agent and etcd
//!   have gone quiet (`wait_settled`): right after an apply, node-3's agent (and etcd) still
//!   work through the 10,000 services after node-1 has programmed them, and a load timed
//!   meanwhile shared the 2 CPUs with them (`nft -f` of the 10,000-service rendering read
//!   20-85 s across runs). The log gives each loader's CPU time beside its wall time: a wall
//!   time well above it means the load still waited for a CPU (the machine is shared), and
//!   the row then says more about the machine than about the loader.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use contiv_common::{SVC_LOCAL_BASE, SvcBackend, SvcBackendKey, SvcFrontend, SvcKey, map_names};
use contiv_tests::{Netns, cluster::BoxOptions, cluster::ClusterBox};
use serde_json::Value;

use crate::bench_net::{
    Endpoint, RR_BLOCK, RR_BLOCKS, RR_WARMUP, StoreWriter, mean, median, percentile, pin_to_cpu, row, rr_samples_via,
    tcp_gbps, write_results,
};
use crate::progress;
use plotters::style::RGBColor;

/// The numbers of Services measured (every one a single-port ClusterIP, except the
/// throughput service's two ports).
const SCALES: [usize; 3] = [10, 1_000, 10_000];
/// Endpoints per filler service (addresses no pod holds: never connected to).
const FILLER_ENDPOINTS: usize = 2;
const FILLER_NAMESPACES: usize = 50;
/// Connect-latency blocks per scale; the topologies take turns block by block, in an order
/// shuffled for each block (`block_orders`). A multiple of the 8 topologies, so that each goes
/// first equally often: 24 rather than 20 adds about 3-4 s to the run (a block of all eight
/// at 10,000 services takes about 0.3 s), about 1% of it.
const CONNECT_BLOCKS: usize = 24;
/// The shuffles' fixed seed (the orders repeat run for run; each scale its own).
const CONNECT_ORDER_SEED: u64 = 0x5e41_1ce5;
const CONNECT_BLOCK: usize = 500;
const CONNECT_WARMUP: usize = 20;
/// Changes timed from a `netctl apply` process per scale (p99 is the third-slowest of 200);
/// every other one is also written in-process (`..._in_process`).
const PROGRAMMING_SAMPLES: usize = 200;
const COLD_STARTS: usize = 3;
/// "Settled" before the renderings are loaded (see `wait_settled`): at most 5 ticks (50 ms
/// at USER_HZ 100, 10% of a CPU) per process in each of 3 intervals of half a second; an
/// agent working through an apply uses a whole CPU; an idle one's periodic work (garbage
/// collection, leases) should stay well under this (not measured yet: the log says how
/// long the wait took, and when it gave up). At most 30 s per scale, then it loads anyway (and
/// says so in the log).
const QUIET_TICKS: u64 = 5;
const QUIET_INTERVALS: usize = 3;
const QUIET_INTERVAL: Duration = Duration::from_millis(500);
const QUIET_TIMEOUT: Duration = Duration::from_secs(30);
/// Throughput rounds (each: pod -> pod and pod -> ClusterIP, 5 s each, who goes first
/// alternating). Even, so each goes first equally often: on this 2-vCPU machine the order
/// within a round moved single rounds by 10-20%, and with 7 rounds one order had a round
/// more than the other. 16 rather than 8 for `clusterip_throughput`'s spread (module docs).
const ROUNDS: usize = 16;

const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DIRECT_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const SERVICE_PORT: u16 = 80;
const SERVER_PORT: u16 = 8080;
/// The throughput service's ports: iperf3 (bench_net's fixed port) and request/response.
const IPERF_PORT: u16 = 5299;
const RR_PORT: u16 = 7000;
/// The probe service's backend: an address no pod holds.
const PROBE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 1, 15, 2);
const CLUSTER_CIDR: &str = "10.1.0.0/16";
/// The baseline pods (a node's subnet of the same cluster range): the server, the same in
/// every baseline (so that every rendering is the same text), and each baseline's client
/// (`Proxy::client_ip`).
const BASE_SERVER: Ipv4Addr = Ipv4Addr::new(10, 1, 254, 3);
/// A baseline node's host veths (client's, server's) and the base of its pods' MACs.
const BASE_HOST_IFS: [&str; 2] = ["bs0", "bs1"];
const BASE_MAC_BASE: u8 = 0xb2;
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// node-3's agent serves only the services labelled with this proxy name: ours with 10
/// services, measured in the same blocks as ours with 10, 1,000 or 10,000 on node-1.
const SMALL_PROXY: &str = "bench-small";
const SMALL_SERVICES: usize = 10;
const SMALL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

// === the Services ===

/// One Service with its EndpointSlice.
#[derive(Debug, Clone)]
struct Svc {
    namespace: String,
    name: String,
    ip: Ipv4Addr,
    /// (port name, port, target port)
    ports: Vec<(&'static str, u16, u16)>,
    endpoints: Vec<(Ipv4Addr, String)>,
    /// `service.kubernetes.io/service-proxy-name` (None: the default proxy's).
    proxy_name: Option<&'static str>,
}

/// Filler `k`: ClusterIP 10.96.1.0 + k, two endpoints on (fictional) other nodes.
fn filler(k: usize) -> Svc {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 1, 0)) + k as u32);
    let endpoints = (0..FILLER_ENDPOINTS)
        .map(|e| {
            let j = (k * FILLER_ENDPOINTS + e) as u32;
            (Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 16, 0)) + j), format!("node-{}", 3 + j % 20))
        })
        .collect();
    Svc {
        namespace: format!("fill{}", k % FILLER_NAMESPACES),
        name: format!("s{k}"),
        ip,
        ports: vec![("http", SERVICE_PORT, SERVER_PORT)],
        endpoints,
        proxy_name: None,
    }
}

/// The three services the benchmark uses, leading to `server` (on `node`).
fn specials(server: Ipv4Addr, node: &str, probe_port: u16) -> Vec<Svc> {
    let bench = |name: &str, ip, ports, endpoints| Svc {
        namespace: "bench".into(),
        name: name.into(),
        ip,
        ports,
        endpoints,
        proxy_name: None,
    };
    vec![
        bench("target", TARGET_IP, vec![("http", SERVICE_PORT, SERVER_PORT)], vec![(server, node.to_owned())]),
        bench(
            "direct",
            DIRECT_IP,
            vec![("iperf", IPERF_PORT, IPERF_PORT), ("rr", RR_PORT, RR_PORT)],
            vec![(server, node.to_owned())],
        ),
        bench("probe", PROBE_IP, vec![("http", SERVICE_PORT, probe_port)], vec![(PROBE_BACKEND, "node-2".into())]),
    ]
}

/// node-3's services, labelled for its proxy name: the target leading to `server` (on
/// node-3), and fillers with endpoints no pod holds. node-1 leaves them out.
fn smalls(server: Ipv4Addr) -> Vec<Svc> {
    (0..SMALL_SERVICES)
        .map(|i| Svc {
            namespace: "bench".into(),
            name: if i == 0 { "small-target".into() } else { format!("small-{i}") },
            ip: Ipv4Addr::from(u32::from(SMALL_IP) + i as u32),
            ports: vec![("http", SERVICE_PORT, SERVER_PORT)],
            endpoints: vec![if i == 0 {
                (server, "node-3".into())
            } else {
                (Ipv4Addr::new(10, 1, 17, i as u8), "node-9".into())
            }],
            proxy_name: Some(SMALL_PROXY),
        })
        .collect()
}

/// The probe service with its backend on `port`.
fn probe(port: u16) -> Svc {
    specials(PROBE_BACKEND, "node-2", port).remove(2)
}

/// How many fillers a scale of `n` services has (the three specials count).
fn fillers(n: usize) -> usize {
    n - 3
}

fn endpoint_slice_yaml(s: &Svc) -> String {
    let ports: Vec<String> =
        s.ports.iter().map(|(name, _, target)| format!("{{name: {name}, protocol: TCP, port: {target}}}")).collect();
    let mut out = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {n}-x1, namespace: {ns}, labels: \
         {{kubernetes.io/service-name: {n}}}}}\naddressType: IPv4\nports: [{}]\nendpoints:\n",
        ports.join(", "),
        n = s.name,
        ns = s.namespace,
    );
    for (ip, node) in &s.endpoints {
        out.push_str(&format!(
            "- {{addresses: [{ip}], conditions: {{ready: true, serving: true, terminating: false}}, nodeName: {node}}}\n"
        ));
    }
    out
}

fn service_yaml(s: &Svc) -> String {
    let ports: Vec<String> = s
        .ports
        .iter()
        .map(|(name, port, target)| format!("{{name: {name}, protocol: TCP, port: {port}, targetPort: {target}}}"))
        .collect();
    let labels = match s.proxy_name {
        Some(p) => format!(", labels: {{service.kubernetes.io/service-proxy-name: {p}}}"),
        None => String::new(),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: {ns}{labels}}}\nspec:\n  type: ClusterIP\n  \
         clusterIP: {ip}\n  clusterIPs: [{ip}]\n  selector: {{app: {n}}}\n  ports: [{}]\n---\n{}",
        ports.join(", "),
        endpoint_slice_yaml(s),
        n = s.name,
        ns = s.namespace,
        ip = s.ip,
    )
}

fn manifest(svcs: &[Svc], namespaces: &[String]) -> String {
    let mut out = String::new();
    for ns in namespaces {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{kubernetes.io/metadata.name: {ns}}}}}\n---\n"
        ));
    }
    for s in svcs {
        out.push_str(&service_yaml(s));
        out.push_str("---\n");
    }
    out
}

/// Every service of a scale in kube-proxy's rendering order: the measured one in the middle.
fn rendering_order(n: usize, server: Ipv4Addr) -> Vec<Svc> {
    let mut all: Vec<Svc> = specials(server, "node", SERVER_PORT).into_iter().skip(1).collect();
    all.extend((0..fillers(n)).map(filler));
    let target = specials(server, "node", SERVER_PORT).remove(0);
    all.insert(all.len() / 2, target);
    all
}

// === kube-proxy's renderings ===

/// 64 bits of FNV-1a.
fn fnv64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `len` base32 characters of a hash of `s` (kube-proxy: base32 of a SHA-256, cut).
fn chain_hash(s: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bits = (u128::from(fnv64(s.as_bytes(), 0)) << 64) | u128::from(fnv64(s.as_bytes(), 0x9e37_79b9));
    (0..len).map(|i| ALPHABET[((bits >> (5 * i)) & 31) as usize] as char).collect()
}

/// kube-proxy's iptables mode (iptables-save syntax, for `iptables-restore`).
fn iptables_rules(svcs: &[Svc]) -> String {
    let mut chains = vec![];
    let mut rules = vec![];
    let mut services = vec![];
    for s in svcs {
        for (pname, port, target) in &s.ports {
            let spn = format!("{}/{}:{pname}", s.namespace, s.name);
            let svc_chain = format!("KUBE-SVC-{}", chain_hash(&format!("{spn}tcp"), 16));
            chains.push(svc_chain.clone());
            services.push(format!(
                "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{spn} cluster IP\" -m tcp --dport {port} -j {svc_chain}",
                s.ip
            ));
            rules.push(format!(
                "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{spn} cluster IP\" -m tcp \
                 --dport {port} -j KUBE-MARK-MASQ",
                s.ip
            ));
            let k = s.endpoints.len();
            for (i, (ip, _)) in s.endpoints.iter().enumerate() {
                let sep = format!("KUBE-SEP-{}", chain_hash(&format!("{spn}tcp{ip}:{target}"), 16));
                chains.push(sep.clone());
                let remaining = k - i;
                if remaining > 1 {
                    rules.push(format!(
                        "-A {svc_chain} -m comment --comment \"{spn} -> {ip}:{target}\" -m statistic --mode random \
                         --probability {:.11} -j {sep}",
                        1.0 / remaining as f64
                    ));
                } else {
                    rules.push(format!("-A {svc_chain} -m comment --comment \"{spn} -> {ip}:{target}\" -j {sep}"));
                }
                rules.push(format!("-A {sep} -s {ip}/32 -m comment --comment {spn} -j KUBE-MARK-MASQ"));
                rules.push(format!(
                    "-A {sep} -p tcp -m comment --comment {spn} -m tcp -j DNAT --to-destination {ip}:{target}"
                ));
            }
        }
    }
    let mut out = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
         :KUBE-PROXY-CANARY - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n",
    );
    for c in &chains {
        out.push_str(&format!(":{c} - [0:0]\n"));
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for r in services.iter().chain(&rules) {
        out.push_str(r);
        out.push('\n');
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in \
         this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n",
    );
    out
}

/// kube-proxy's nftables mode (`nft -f` syntax).
fn nft_rules(svcs: &[Svc]) -> String {
    const T: &str = "ip kube-proxy";
    // Replaces whatever an earlier load left.
    let mut out = format!("add table {T}\ndelete table {T}\nadd table {T} {{ comment \"rules for kube-proxy\" ; }}\n");
    let base = [
        "add chain T mark-for-masquerade",
        "add rule T mark-for-masquerade mark set mark or 0x4000",
        "add chain T masquerading",
        "add rule T masquerading mark and 0x4000 == 0 return",
        "add rule T masquerading mark set mark xor 0x4000",
        "add rule T masquerading masquerade fully-random",
        "add set T cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }",
        "add set T nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }",
        "add map T no-endpoint-nodeports { type inet_proto . inet_service : verdict ; }",
        "add map T no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; }",
        "add map T service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
        "add map T service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }",
        "add map T firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }",
        "add chain T firewall-check",
        "add rule T firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        "add chain T cluster-ips-check",
        "add rule T cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
        "add rule T cluster-ips-check ip daddr { 10.96.0.0/12 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
        "add chain T nodeport-endpoints-check",
        "add rule T nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
        "add chain T service-endpoints-check",
        "add rule T service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "add chain T services",
        "add rule T services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule T services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        "add chain T filter-prerouting { type filter hook prerouting priority -110 ; }",
        "add rule T filter-prerouting ct state new jump firewall-check",
        "add chain T filter-input { type filter hook input priority -110 ; }",
        "add rule T filter-input ct state new jump nodeport-endpoints-check",
        "add rule T filter-input ct state new jump service-endpoints-check",
        "add chain T filter-forward { type filter hook forward priority -110 ; }",
        "add rule T filter-forward ct state new jump service-endpoints-check",
        "add rule T filter-forward ct state new jump cluster-ips-check",
        "add chain T filter-output { type filter hook output priority -110 ; }",
        "add rule T filter-output ct state new jump service-endpoints-check",
        "add rule T filter-output ct state new jump firewall-check",
        "add chain T filter-output-post-dnat { type filter hook output priority -90 ; }",
        "add rule T filter-output-post-dnat ct state new jump cluster-ips-check",
        "add chain T nat-prerouting { type nat hook prerouting priority -100 ; }",
        "add rule T nat-prerouting jump services",
        "add chain T nat-output { type nat hook output priority -100 ; }",
        "add rule T nat-output jump services",
        "add chain T nat-postrouting { type nat hook postrouting priority 100 ; }",
        "add rule T nat-postrouting jump masquerading",
    ];
    for l in base {
        out.push_str(&l.replacen(" T ", &format!(" {T} "), 1));
        out.push('\n');
    }
    for s in svcs {
        out.push_str(&format!("add element {T} cluster-ips {{ {} }}\n", s.ip));
        for (pname, port, target) in &s.ports {
            let spn = format!("{}/{}/tcp/{pname}", s.namespace, s.name);
            let chain = format!("service-{}-{spn}", chain_hash(&spn, 8));
            out.push_str(&format!("add chain {T} {chain}\n"));
            out.push_str(&format!(
                "add rule {T} {chain} ip daddr {} tcp dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n",
                s.ip
            ));
            let mut vmap = vec![];
            for (i, (ip, _)) in s.endpoints.iter().enumerate() {
                let ep = format!("endpoint-{}-{spn}__{ip}/{target}", chain_hash(&format!("{spn}{ip}"), 8));
                out.push_str(&format!("add chain {T} {ep}\n"));
                out.push_str(&format!("add rule {T} {ep} ip saddr {ip} jump mark-for-masquerade\n"));
                out.push_str(&format!("add rule {T} {ep} meta l4proto tcp dnat to {ip}:{target}\n"));
                vmap.push(format!("{i} : goto {ep}"));
            }
            out.push_str(&format!(
                "add rule {T} {chain} numgen random mod {} vmap {{ {} }}\n",
                s.endpoints.len(),
                vmap.join(" , ")
            ));
            out.push_str(&format!("add element {T} service-ips {{ {} . tcp . {port} : goto {chain} }}\n", s.ip));
        }
    }
    out
}

// === the baseline nodes ===

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proxy {
    Iptables,
    IptablesLegacy,
    Nftables,
    /// No service proxy at all: the same routed pods with no netfilter rule, connecting
    /// to the server's pod IP (the kernel's own cost of a new connection).
    None,
    /// The same pods connecting to the server's pod IP through the least a TC pod edge can
    /// do (ebpf/diagnostics/redirect-only.c on the host veths): a MAC write and
    /// `bpf_redirect_peer`, nothing else. What any eBPF pod edge on veths costs at the least.
    RedirectOnly,
}

impl Proxy {
    fn label(self) -> &'static str {
        match self {
            Proxy::Iptables => "iptables",
            Proxy::IptablesLegacy => "iptables-legacy",
            Proxy::Nftables => "nftables",
            Proxy::None => "kernel-routing-pod-ip",
            Proxy::RedirectOnly => "redirect-only-edge-pod-ip",
        }
    }

    /// The baseline's client pod address, its own: the baselines' connections never share
    /// a 5-tuple (client address, source port, service or server address), so none can meet
    /// another's conntrack entry still in CLOSE (10 s after each reset), whatever namespace
    /// the baselines are built in. (Today each has its own node namespace, and conntrack
    /// keeps its entries per namespace; this keeps it so if they ever share one.)
    fn client_ip(self) -> Ipv4Addr {
        let host = match self {
            Proxy::Iptables => 2,
            Proxy::IptablesLegacy => 4,
            Proxy::Nftables => 5,
            Proxy::None => 6,
            Proxy::RedirectOnly => 7,
        };
        Ipv4Addr::new(10, 1, 254, host)
    }
}

/// A node whose pods are routed by the kernel, with kube-proxy's rules in its namespace.
struct ProxyNode {
    proxy: Proxy,
    node: Netns,
    client: Netns,
    server: Netns,
}

impl ProxyNode {
    fn new(proxy: Proxy) -> Self {
        let node = Netns::new("bsn");
        contiv_tests::run(node.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        let mut pods = vec![];
        for (i, ip) in [proxy.client_ip(), BASE_SERVER].into_iter().enumerate() {
            let pod = crate::bench_net::routed_pod(&node, "bsp", BASE_HOST_IFS[i], BASE_MAC_BASE, i as u8, ip);
            pods.push(pod);
        }
        let server = pods.pop().expect("server");
        let client = pods.pop().expect("client");
        if proxy == Proxy::RedirectOnly {
            attach_redirect_only(&node, BASE_HOST_IFS, BASE_MAC_BASE);
        }
        Self { proxy, node, client, server }
    }

    /// Loads the rendering of `svcs`; how long the loader took (wall clock), and the CPU
    /// time it used (user + system: a wall time well above it waited for a CPU).
    fn load(&self, svcs: &[Svc]) -> Result<(Duration, Duration)> {
        let (program, args, text): (&str, &[&str], String) = match self.proxy {
            Proxy::Iptables => ("iptables-nft-restore", &[], iptables_rules(svcs)),
            Proxy::IptablesLegacy => ("iptables-legacy-restore", &[], iptables_rules(svcs)),
            Proxy::Nftables => ("nft", &["-f", "-"], nft_rules(svcs)),
            Proxy::None | Proxy::RedirectOnly => return Ok((Duration::ZERO, Duration::ZERO)),
        };
        let cpu_before = children_cpu();
        let started = Instant::now();
        let mut child = self
            .node
            .cmd(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {program}"))?;
        child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        let took = started.elapsed();
        let cpu = children_cpu().saturating_sub(cpu_before);
        if !out.status.success() {
            bail!("{program} in {} failed: {}", self.node.name(), String::from_utf8_lossy(&out.stderr));
        }
        Ok((took, cpu))
    }
}

/// User + system CPU time of this process's children that have ended and been waited for
/// (the loader, and what `ip netns exec` ran; nothing else ends while one loads).
fn children_cpu() -> Duration {
    // SAFETY: getrusage fills the zeroed struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time (user + system, clock ticks) a process has used so far; None once it is gone.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Waits until every running agent of the box and etcd have gone quiet: none of them used
/// more than `QUIET_TICKS` clock ticks in each of `QUIET_INTERVALS` consecutive
/// intervals of `QUIET_INTERVAL`. After a big apply, node-1 has programmed its maps long
/// before every agent (node-3 filters the same 10,000 services for its proxy name) and
/// etcd are done; a loader timed meanwhile competes with them for this machine's 2 CPUs.
/// Returns how long it waited, and whether they went quiet within `QUIET_TIMEOUT`.
fn wait_settled(b: &ClusterBox) -> (Duration, bool) {
    let pids: Vec<u32> = b.state.nodes.iter().filter_map(|n| n.agent_pid).chain(b.state.etcd_pid).collect();
    let started = Instant::now();
    let mut last: Vec<Option<u64>> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let mut quiet = 0;
    while started.elapsed() < QUIET_TIMEOUT {
        std::thread::sleep(QUIET_INTERVAL);
        let now: Vec<Option<u64>> = pids.iter().map(|p| cpu_ticks(*p)).collect();
        let busy = now.iter().zip(&last).any(|(n, l)| match (n, l) {
            (Some(n), Some(l)) => n.saturating_sub(*l) > QUIET_TICKS,
            _ => false,
        });
        last = now;
        quiet = if busy { 0 } else { quiet + 1 };
        if quiet >= QUIET_INTERVALS {
            return (started.elapsed(), true);
        }
    }
    (started.elapsed(), false)
}

/// Compiles ebpf/diagnostics/redirect-only.c for the two pods behind `host_ifs` (their
/// MACs as `routed_pod` sets them from `mac_base`, indices 0 and 1) and attaches it to the
/// ingress of both host veths.
fn attach_redirect_only(node: &Netns, host_ifs: [&str; 2], mac_base: u8) {
    let ifindex = |dev: &str| contiv_tests::run(node.cmd("cat").arg(format!("/sys/class/net/{dev}/ifindex")));
    let mac = |i: usize| format!("0x02,{mac_base:#04x},0,0,0,{}", i + 1);
    let source = crate::workspace_root().join("ebpf/diagnostics/redirect-only.c");
    let object = std::env::temp_dir().join(format!("contiv-redirect-only-{}-{}.o", std::process::id(), node.name()));
    contiv_tests::run(
        std::process::Command::new("clang")
            .args(["-O2", "-target", "bpf", "-c"])
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .arg(format!("-DIF_A={}", ifindex(host_ifs[0]).trim()))
            .arg(format!("-DIF_B={}", ifindex(host_ifs[1]).trim()))
            .arg(format!("-DMAC_A={}", mac(0)))
            .arg(format!("-DMAC_B={}", mac(1))),
    );
    for dev in host_ifs {
        contiv_tests::run(node.cmd("tc").args(["qdisc", "add", "dev", dev, "clsact"]));
        contiv_tests::run(
            node.cmd("tc")
                .args(["filter", "add", "dev", dev, "ingress", "bpf", "da", "obj"])
                .arg(&object)
                .args(["sec", "tc"]),
        );
    }
    let _ = std::fs::remove_file(&object);
}

// === connect latency ===

/// Receives `buf.len()` bytes, busy-polling (MSG_DONTWAIT); Ok(false) if the peer closed.
fn spin_recv(fd: i32, buf: &mut [u8], stop: &AtomicBool) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: recv into the unfilled rest of `buf`.
        let n = unsafe { libc::recv(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got, libc::MSG_DONTWAIT) };
        if n > 0 {
            got += n as usize;
        } else if n == 0 {
            return Ok(false);
        } else {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e);
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }
    Ok(true)
}

/// New-connection latencies (microseconds) from `client_ns` to `to`, answered by a server
/// on `bind` in `server_ns`: connect, 64 bytes out, 64 bytes back; closed with a reset.
fn connect_samples(
    client_ns: &str,
    server_ns: &str,
    bind: SocketAddr,
    to: SocketAddr,
    count: usize,
) -> Result<Vec<f64>> {
    let listener = contiv_tests::cluster::enter(server_ns, move || std::net::TcpListener::bind(bind))
        .with_context(|| format!("binding {bind} in {server_ns}"))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = stop.clone();
    let server = std::thread::spawn(move || {
        pin_to_cpu(1);
        let mut buf = [0u8; 64];
        while !server_stop.load(Ordering::Relaxed) {
            let conn = match listener.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::hint::spin_loop();
                    continue;
                }
                Err(_) => continue,
            };
            let fd = conn.as_raw_fd();
            if spin_recv(fd, &mut buf, &server_stop).unwrap_or(false) {
                // SAFETY: send from a valid buffer on a valid socket.
                unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
                // Until the client's reset (or close).
                let mut rest = [0u8; 1];
                let _ = spin_recv(fd, &mut rest, &server_stop);
            }
        }
    });
    let client_ns = client_ns.to_owned();
    let samples = std::thread::spawn(move || -> Result<Vec<f64>> {
        let f = std::fs::File::open(Path::new("/run/netns").join(&client_ns))?;
        // SAFETY: setns on this thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        pin_to_cpu(0);
        let never = AtomicBool::new(false);
        let mut samples = Vec::with_capacity(count);
        let mut buf = [7u8; 64];
        let target = socket2::SockAddr::from(to);
        for i in 0..CONNECT_WARMUP + count {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            let fd = s.as_raw_fd();
            let t = Instant::now();
            s.connect(&target).with_context(|| format!("connecting to {to} from {client_ns}"))?;
            // SAFETY: send from a valid buffer on a connected socket.
            if unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) } != 64 {
                bail!("send to {to}: {}", std::io::Error::last_os_error());
            }
            if !spin_recv(fd, &mut buf, &never)? {
                bail!("{to} closed without answering");
            }
            let took = t.elapsed();
            contiv_tests::close_with_reset(&s);
            drop(s);
            if i >= CONNECT_WARMUP {
                samples.push(took.as_nanos() as f64 / 1e3);
            }
        }
        Ok(samples)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect client panicked"));
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    samples?
}

// === the node's maps ===

fn open_hash<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &str) -> Result<BpfHashMap<MapData, K, V>> {
    let data = MapData::from_pin(pin_dir.join(name)).with_context(|| format!("{}/{name}", pin_dir.display()))?;
    BpfHashMap::try_from(Map::HashMap(data)).with_context(|| format!("{name} is not the expected hash map"))
}

/// A node's pinned service maps, read the way the datapath reads them.
struct SvcMaps {
    frontends: BpfHashMap<MapData, SvcKey, SvcFrontend>,
    backends: BpfHashMap<MapData, SvcBackendKey, SvcBackend>,
}

impl SvcMaps {
    fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            frontends: open_hash(pin_dir, map_names::SVC_FRONTENDS)?,
            backends: open_hash(pin_dir, map_names::SVC_BACKENDS)?,
        })
    }

    fn frontend(&self, ip: Ipv4Addr, port: u16) -> Option<SvcFrontend> {
        self.frontends.get(&SvcKey { ip: ip.octets(), port, proto: 6, _pad: 0 }, 0).ok()
    }

    fn backend(&self, svc_id: u32, ordinal: u32) -> Option<SvcBackend> {
        self.backends.get(&SvcBackendKey { svc_id, ordinal }, 0).ok()
    }

    /// (frontends, backends of the Cluster sets): what every node holds alike (the Local
    /// sets are each node's own endpoints).
    fn counts(&self) -> (usize, usize) {
        let backends = self.backends.keys().filter(|k| k.as_ref().is_ok_and(|k| k.ordinal < SVC_LOCAL_BASE)).count();
        (self.frontends.keys().filter(|k| k.is_ok()).count(), backends)
    }
}

/// Waits until node-1's maps hold `frontends` frontends and the target leads to the server.
fn wait_programmed(maps: &SvcMaps, frontends: usize, what: &str) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let (f, _) = maps.counts();
        if f == frontends && maps.frontend(TARGET_IP, SERVICE_PORT).is_some() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("{what}: node-1 holds {f} of {frontends} frontends after 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// === programming latency ===

/// `netctl apply -f FILE` as an operator runs it: its own process (the binary the box runs,
/// from the bench's bin directory), spawned in the box's control namespace (where etcd
/// listens) by a thread that has entered it, so that no `ip netns exec` wrapper is timed.
struct NetctlApply {
    bin: std::path::PathBuf,
    control_ns: String,
    file: std::path::PathBuf,
}

impl NetctlApply {
    fn new(b: &ClusterBox) -> Self {
        Self {
            bin: b.state.bin_dir.join("netctl"),
            control_ns: b.state.control.clone(),
            file: b.state.dir.join("programming-probe.yaml"),
        }
    }

    /// Writes `yaml` to the file (before the clock starts: an operator's file exists before
    /// they run netctl), then runs `netctl apply -f` on it: the instant the process was
    /// spawned, and how long it ran to its exit.
    fn apply(&self, yaml: &str) -> Result<(Instant, Duration)> {
        std::fs::write(&self.file, yaml).with_context(|| format!("writing {}", self.file.display()))?;
        let (bin, file) = (self.bin.clone(), self.file.clone());
        let (t0, ran, out) = contiv_tests::cluster::enter(&self.control_ns, move || {
            let t0 = Instant::now();
            let out = std::process::Command::new(&bin)
                .args(["--etcd", "http://127.0.0.1:2379", "apply", "-f"])
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            (t0, t0.elapsed(), out)
        });
        let out = out.with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!("netctl apply -f {} failed: {}", self.file.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok((t0, ran))
    }
}

/// Programming latency samples of one scale, in milliseconds, sorted.
struct Programming {
    /// From the spawn of `netctl apply -f` (the start) to the map entry.
    process: Vec<f64>,
    /// From the start of the store write, in-process with a connected client (the figure
    /// before the process was timed: without netctl's start, parse and connect).
    in_process: Vec<f64>,
    /// How long each `netctl apply` process ran, spawn to exit.
    netctl_ran: Vec<f64>,
}

/// From each change of the probe's slice (a new backend port) to that port in node-1's
/// SVC_BACKENDS: `PROGRAMMING_SAMPLES` written by a `netctl apply` process, and every
/// other one of those also written in-process (the two kinds alternating which goes first).
fn programming_samples(
    writer: &StoreWriter,
    netctl: &NetctlApply,
    pin_dir: &Path,
    next_port: &mut u16,
) -> Result<Programming> {
    let probe_id = SvcMaps::open(pin_dir)?
        .frontend(PROBE_IP, SERVICE_PORT)
        .context("the probe service is not programmed on node-1")?
        .svc_id;
    // One change: start the poller, write the slice by `write` (which returns the start
    // instant), wait for the port in the map; milliseconds.
    let mut one = |write: &mut dyn FnMut(&str) -> Result<Instant>| -> Result<f64> {
        *next_port = if *next_port >= 60_000 { 20_000 } else { *next_port + 1 };
        let port = *next_port;
        let pin_dir = pin_dir.to_owned();
        let ready = Arc::new(AtomicBool::new(false));
        let poller_ready = ready.clone();
        let poller = std::thread::spawn(move || -> Result<Option<Instant>> {
            let maps = SvcMaps::open(&pin_dir)?;
            poller_ready.store(true, Ordering::Release);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if maps.backend(probe_id, 0).is_some_and(|b| b.port == port) {
                    return Ok(Some(Instant::now()));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(None)
        });
        while !ready.load(Ordering::Acquire) && !poller.is_finished() {
            std::thread::sleep(Duration::from_micros(100));
        }
        let t0 = write(&endpoint_slice_yaml(&probe(port)))?;
        let seen = poller.join().map_err(|_| anyhow::anyhow!("map poller panicked"))??;
        let Some(t1) = seen else { bail!("node-1 did not program the probe's port {port} in 30 s") };
        std::thread::sleep(Duration::from_millis(20));
        Ok(t1.saturating_duration_since(t0).as_secs_f64() * 1e3)
    };
    let mut out = Programming { process: vec![], in_process: vec![], netctl_ran: vec![] };
    let mut netctl_ran = vec![];
    let mut by_netctl = |yaml: &str| -> Result<Instant> {
        let (t0, ran) = netctl.apply(yaml)?;
        netctl_ran.push(ran.as_secs_f64() * 1e3);
        Ok(t0)
    };
    let mut in_process = |yaml: &str| writer.apply(yaml);
    for i in 0..PROGRAMMING_SAMPLES {
        match i % 4 {
            0 => {
                out.in_process.push(one(&mut in_process)?);
                out.process.push(one(&mut by_netctl)?);
            }
            2 => {
                out.process.push(one(&mut by_netctl)?);
                out.in_process.push(one(&mut in_process)?);
            }
            _ => out.process.push(one(&mut by_netctl)?),
        }
    }
    let _ = std::fs::remove_file(&netctl.file);
    out.netctl_ran = netctl_ran;
    for v in [&mut out.process, &mut out.in_process, &mut out.netctl_ran] {
        v.sort_by(f64::total_cmp);
    }
    Ok(out)
}

// === cold start ===

/// node-2's agent started on an empty bpffs: seconds until its service maps hold what
/// node-1's hold (`want`: frontends, Cluster-set backends); and when its CNI answered.
fn cold_start(b: &mut ClusterBox, want: (usize, usize)) -> Result<(f64, f64)> {
    let pin_dir = b.node("node-2").pin_dir.clone();
    b.stop_agent("node-2", false);
    if pin_dir.exists() {
        std::fs::remove_dir_all(&pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    let done = Arc::new(AtomicBool::new(false));
    let poll_done = done.clone();
    let poll_dir = pin_dir.clone();
    let started = Instant::now();
    let poller = std::thread::spawn(move || -> Option<Instant> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut maps = None;
        while Instant::now() < deadline && !poll_done.load(Ordering::Relaxed) {
            if maps.is_none() {
                maps = SvcMaps::open(&poll_dir).ok();
            }
            if let Some(m) = &maps {
                // Cheap first: the probe frontend; then every entry.
                if m.frontend(PROBE_IP, SERVICE_PORT).is_some() && m.counts() == want {
                    return Some(Instant::now());
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    });
    b.start_agent("node-2");
    let ready = started.elapsed().as_secs_f64();
    let seen = poller.join().map_err(|_| anyhow::anyhow!("cold-start poller panicked"));
    done.store(true, Ordering::Relaxed);
    let Some(t1) = seen? else {
        bail!("node-2 did not program {want:?} (frontends, backends) within 120 s:\n{}", b.agent_log("node-2"));
    };
    b.stop_agent("node-2", false);
    Ok((t1.duration_since(started).as_secs_f64(), ready))
}

// === the plot ===

struct Series {
    label: &'static str,
    color: RGBColor,
    /// (services, p50, p99) in microseconds
    points: Vec<(f64, f64, f64)>,
}

fn plot(path: &Path, series: &[Series]) -> Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read(FONT).with_context(|| format!("{FONT} (Debian package fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1500, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled("New TCP connection to a ClusterIP: connect + one 64-byte request/response", ("sans-serif", 24))
        .map_err(err)?;
    let panels = root.split_evenly((1, 2));
    // p50 on the left (with the legend), p99 on the right; services on a log scale, latency
    // on a linear one from zero.
    for (panel, (name, pick)) in panels.iter().zip([("p50", 0usize), ("p99", 1)]) {
        let value = |p: &(f64, f64, f64)| if pick == 0 { p.1 } else { p.2 };
        let values = series.iter().flat_map(|s| s.points.iter().map(value));
        let hi = values.fold(1.0f64, f64::max);
        // Room for the legend above the p50 lines.
        let ymax = hi * if pick == 0 { 1.6 } else { 1.15 };
        let mut chart = ChartBuilder::on(panel)
            .caption(name, ("sans-serif", 20))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d((7.0f64..14_000.0).log_scale(), 0.0..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("Services in the cluster")
            .y_desc(format!("{name} latency (us)"))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_labels(12)
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(err)?;
        for s in series {
            let color = s.color;
            chart
                .draw_series(LineSeries::new(s.points.iter().map(|p| (p.0, value(p))), color.stroke_width(3)))
                .map_err(err)?
                .label(s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
            chart.draw_series(s.points.iter().map(|p| Circle::new((p.0, value(p)), 4, color.filled()))).map_err(err)?;
        }
        if pick == 0 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font(("sans-serif", 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

// === the run ===

/// The order of the topologies in each of `blocks` blocks: shuffled for every block, so that
/// no topology always runs right after the same other one (a fixed rotation kept each one's
/// neighbours, and whatever a topology leaves behind fell on the one after it every time);
/// in each run of `topologies` blocks each topology goes first exactly once.
fn block_orders(topologies: usize, blocks: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = crate::bench_net::XorShift::new(seed);
    let mut firsts: Vec<usize> = vec![];
    (0..blocks)
        .map(|block| {
            if block % topologies == 0 {
                firsts = (0..topologies).collect();
                rng.shuffle(&mut firsts);
            }
            let first = firsts[block % topologies];
            let mut rest: Vec<usize> = (0..topologies).filter(|&t| t != first).collect();
            rng.shuffle(&mut rest);
            std::iter::once(first).chain(rest).collect()
        })
        .collect()
}

/// A client/server pair whose new connections are timed.
struct Topology {
    label: &'static str,
    client_ns: String,
    server_ns: String,
    bind: SocketAddr,
    to: SocketAddr,
}

fn p(v: &[f64], q: f64) -> f64 {
    percentile(v, q)
}

pub fn run(bins: &Path) -> Result<()> {
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("CONTIV_BIN_DIR", bins) };
    let bench_started = Instant::now();
    println!(
        "services benchmark: {:?} services; ours (a box) against kube-proxy's iptables (nf_tables and legacy) and \
         nftables renderings",
        SCALES
    );
    let step = progress::step("cluster in a box (3 nodes), pods, baseline nodes");
    let mut opts = BoxOptions::for_test(3);
    opts.id = format!("cbsv{}", std::process::id());
    opts.progress = true;
    let mut b = ClusterBox::up(opts);
    // node-2 runs only for its cold starts: its agent would otherwise compete for the CPUs.
    b.stop_agent("node-2", false);
    // node-3 serves only the services labelled for it: ours with 10 services, measured in
    // the same blocks as node-1 at every scale (a drift of the machine between scales then
    // moves both alike).
    b.stop_agent("node-3", false);
    let config = b.node("node-3").config.clone();
    let mut text = std::fs::read_to_string(&config).context("node-3's agent config")?;
    text.push_str(&format!("\n[services]\nproxyName = \"{SMALL_PROXY}\"\n"));
    std::fs::write(&config, text).context("node-3's agent config")?;
    b.start_agent("node-3");
    let server = b.add_pod("node-1", "bench/server", &[("app", "server")], &[]);
    let client = b.add_pod("node-1", "bench/client", &[("app", "client")], &[]);
    let small_server = b.add_pod("node-3", "bench/small-server", &[("app", "small-server")], &[]);
    let small_client = b.add_pod("node-3", "bench/small-client", &[("app", "small-client")], &[]);
    let small_pin_dir = b.node("node-3").pin_dir.clone();
    let proxies = [Proxy::Iptables, Proxy::IptablesLegacy, Proxy::Nftables, Proxy::None, Proxy::RedirectOnly];
    let bases: Vec<ProxyNode> = proxies.iter().map(|p| ProxyNode::new(*p)).collect();
    let pin_dir = b.node("node-1").pin_dir.clone();
    let writer = StoreWriter::start(&b.state.control)?;
    let netctl = NetctlApply::new(&b);
    step.finish();

    // Ours through the ClusterIP; ours straight to the server pod (what the service layer
    // adds); each kube-proxy rendering through the ClusterIP; the routed pods without any
    // proxy straight to the server pod (the kernel's floor for a new connection).
    let target = SocketAddr::from((TARGET_IP, SERVICE_PORT));
    let mut topologies = vec![
        Topology {
            label: "ours",
            client_ns: client.netns.clone(),
            server_ns: server.netns.clone(),
            bind: SocketAddr::from((server.ip, SERVER_PORT)),
            to: target,
        },
        Topology {
            label: "ours-pod-ip",
            client_ns: client.netns.clone(),
            server_ns: server.netns.clone(),
            bind: SocketAddr::from((server.ip, SERVER_PORT)),
            to: SocketAddr::from((server.ip, SERVER_PORT)),
        },
    ];
    for base in &bases {
        let to = match base.proxy {
            Proxy::None | Proxy::RedirectOnly => SocketAddr::from((BASE_SERVER, SERVER_PORT)),
            _ => target,
        };
        topologies.push(Topology {
            label: base.proxy.label(),
            client_ns: base.client.name().to_owned(),
            server_ns: base.server.name().to_owned(),
            bind: SocketAddr::from((BASE_SERVER, SERVER_PORT)),
            to,
        });
    }
    // Last, so that the indices below stay as they were: ours on node-3 with 10 services.
    topologies.push(Topology {
        label: "ours-10svc-node",
        client_ns: small_client.netns.clone(),
        server_ns: small_server.netns.clone(),
        bind: SocketAddr::from((small_server.ip, SERVER_PORT)),
        to: SocketAddr::from((SMALL_IP, SERVICE_PORT)),
    });
    // [topology][scale]: sorted samples.
    let mut connects: Vec<Vec<Vec<f64>>> = vec![vec![]; topologies.len()];
    let mut programming: Vec<Programming> = vec![];
    let mut cold: Vec<(f64, f64)> = vec![];
    let mut loads: Vec<Vec<f64>> = vec![];
    let mut applied = 0usize;
    let mut next_port = 20_000u16;
    for (si, &n) in SCALES.iter().enumerate() {
        let step = progress::step(format!("{n} services"));
        // The store: what is new at this scale, in one multi-document file.
        let mut new: Vec<Svc> = vec![];
        let mut namespaces = vec![];
        if applied == 0 {
            new.extend(specials(server.ip, "node-1", next_port));
            new.extend(smalls(small_server.ip));
            namespaces.push("bench".to_string());
            namespaces.extend((0..FILLER_NAMESPACES).map(|i| format!("fill{i}")));
        }
        let have = applied.saturating_sub(3);
        new.extend((have..fillers(n)).map(filler));
        let file = b.state.dir.join(format!("services-{n}.yaml"));
        std::fs::write(&file, manifest(&new, &namespaces))?;
        let t = Instant::now();
        let out = b.netctl(&["apply", "-f", &file.to_string_lossy()]);
        if !out.status.success() {
            bail!("netctl apply of {} services failed: {}", new.len(), String::from_utf8_lossy(&out.stderr));
        }
        let apply_s = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&file);
        applied = n;
        let maps = SvcMaps::open(&pin_dir)?;
        // Every service is one frontend, the throughput service two.
        let waited = wait_programmed(&maps, n + 1, &format!("{n} services"))?;
        if si == 0 {
            let small = SvcMaps::open(&small_pin_dir)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while small.counts().0 != SMALL_SERVICES || small.frontend(SMALL_IP, SERVICE_PORT).is_none() {
                if Instant::now() > deadline {
                    bail!("node-3 holds {} of its {SMALL_SERVICES} frontends after 60 s", small.counts().0);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let (fe, be) = maps.counts();
        step.note(format!(
            "netctl apply of {} Services + EndpointSlices in {apply_s:.1} s; node-1 holds {fe} frontends, {be} backends \
             {:.1} s later",
            new.len(),
            waited.as_secs_f64()
        ));
        // The loads are timed (cold_start_10k_vs_*) once every agent and etcd are done with
        // this scale's apply, not while they still work through it.
        let (settle, settled) = wait_settled(&b);
        step.note(format!(
            "agents and etcd {} after {:.1} s",
            if settled { "quiet" } else { "still busy (loading anyway)" },
            settle.as_secs_f64()
        ));
        let mut took = vec![];
        let mut cpu = vec![];
        for base in &bases {
            let (wall, used) = base.load(&rendering_order(n, BASE_SERVER))?;
            took.push(wall.as_secs_f64());
            cpu.push(used.as_secs_f64());
        }
        step.note(format!(
            "renderings loaded (wall / CPU): iptables-nft-restore {:.2} / {:.2} s, iptables-legacy-restore {:.2} / \
             {:.2} s, nft -f {:.2} / {:.2} s",
            took[0], cpu[0], took[1], cpu[1], took[2], cpu[2]
        ));
        loads.push(took);

        // New connections, the topologies taking turns block by block (in an order shuffled
        // for each block, each going first equally often, so a drift in the machine's load,
        // or what one topology leaves behind, hits each alike).
        let mut samples = vec![vec![]; topologies.len()];
        for order in block_orders(topologies.len(), CONNECT_BLOCKS, CONNECT_ORDER_SEED.wrapping_add(si as u64)) {
            for i in order {
                let t = &topologies[i];
                samples[i].extend(connect_samples(&t.client_ns, &t.server_ns, t.bind, t.to, CONNECT_BLOCK)?);
            }
        }
        let mut line = "connect p50/p90/p99 us:".to_string();
        for (i, mut s) in samples.into_iter().enumerate() {
            s.sort_by(f64::total_cmp);
            line.push_str(&format!("  {} {:.1}/{:.1}/{:.0}", topologies[i].label, p(&s, 0.5), p(&s, 0.9), p(&s, 0.99)));
            connects[i].push(s);
        }
        step.note(line);

        let prog = programming_samples(&writer, &netctl, &pin_dir, &mut next_port)?;
        step.note(format!(
            "programming latency from the netctl apply process: p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({} changes; \
             netctl ran p50 {:.1} ms); from the store write in-process: p50 {:.1} ms p99 {:.1} ms ({} changes)",
            p(&prog.process, 0.5),
            p(&prog.process, 0.99),
            p(&prog.process, 1.0),
            prog.process.len(),
            p(&prog.netctl_ran, 0.5),
            p(&prog.in_process, 0.5),
            p(&prog.in_process, 0.99),
            prog.in_process.len()
        ));
        programming.push(prog);

        if si == 0 || n == 10_000 {
            let want = maps.counts();
            let mut runs = vec![];
            for _ in 0..COLD_STARTS {
                runs.push(cold_start(&mut b, want)?);
            }
            let secs: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let ready: Vec<f64> = runs.iter().map(|r| r.1).collect();
            step.note(format!(
                "cold start (node-2): all {} frontends / {} backends programmed in {:?} s (median {:.2} s; CNI ready \
                 after {:.2} s)",
                want.0,
                want.1,
                secs.iter().map(|s| (s * 100.0).round() / 100.0).collect::<Vec<_>>(),
                median(&secs),
                median(&ready)
            ));
            cold.push((median(&secs), median(&ready)));
        }
        step.finish();
    }

    // pod -> ClusterIP against pod -> pod, at the largest scale.
    let step = progress::step("pod -> ClusterIP against pod -> pod: throughput and request/response");
    let srv = Endpoint::new(&server.netns, server.ip);
    let via_svc = Endpoint::new(&server.netns, DIRECT_IP);
    let cli = Endpoint::new(&client.netns, client.ip);
    let (mut bt, mut ot) = (vec![], vec![]);
    for round in 1..=ROUNDS {
        // Who goes first alternates.
        let (direct, svc) = if round % 2 == 1 {
            let d = tcp_gbps(&cli, &srv)?.0;
            (d, tcp_gbps(&cli, &via_svc)?.0)
        } else {
            let v = tcp_gbps(&cli, &via_svc)?.0;
            (tcp_gbps(&cli, &srv)?.0, v)
        };
        step.note(format!("round {round}: pod -> pod {direct:6.2} Gbit/s   pod -> ClusterIP {svc:6.2} Gbit/s"));
        bt.push(direct);
        ot.push(svc);
    }
    let (mut br, mut or) = (vec![], vec![]);
    // Each block's p50, per side: one connection each, so a pair's ratio shows whether a
    // run's pooled p50 moved with a few connections or with all of them.
    let (mut block_b, mut block_o) = (vec![], vec![]);
    let rr_via = SocketAddr::from((DIRECT_IP, RR_PORT));
    let block_p50 = |samples: Vec<f64>, pooled: &mut Vec<f64>, blocks: &mut Vec<f64>| {
        let mut sorted = samples;
        sorted.sort_by(f64::total_cmp);
        blocks.push(p(&sorted, 0.5));
        pooled.extend(sorted);
    };
    for block in 0..RR_BLOCKS {
        if block % 2 == 1 {
            block_p50(
                rr_samples_via(&cli, &srv, RR_PORT, Some(rr_via), true, RR_WARMUP, RR_BLOCK)?,
                &mut or,
                &mut block_o,
            );
        }
        block_p50(rr_samples_via(&cli, &srv, RR_PORT, None, true, RR_WARMUP, RR_BLOCK)?, &mut br, &mut block_b);
        if block % 2 == 0 {
            block_p50(
                rr_samples_via(&cli, &srv, RR_PORT, Some(rr_via), true, RR_WARMUP, RR_BLOCK)?,
                &mut or,
                &mut block_o,
            );
        }
    }
    br.sort_by(f64::total_cmp);
    or.sort_by(f64::total_cmp);
    step.note(format!(
        "request/response: pod -> pod p50 {:.1} us p99 {:.1} us   pod -> ClusterIP p50 {:.1} us p99 {:.1} us",
        p(&br, 0.5),
        p(&br, 0.99),
        p(&or, 0.5),
        p(&or, 0.99)
    ));
    let mut pairs: Vec<(f64, f64)> = block_b.iter().copied().zip(block_o.iter().copied()).collect();
    step.note(format!(
        "request/response p50 per block pair (pod -> pod / ClusterIP, us): {}; ratio over 1.05 in {} of {}",
        pairs.iter().map(|(b, o)| format!("{b:.1}/{o:.1}")).collect::<Vec<_>>().join(" "),
        pairs.iter().filter(|(b, o)| o / b > 1.05).count(),
        pairs.len()
    ));
    pairs.sort_by(|x, y| (x.1 / x.0).total_cmp(&(y.1 / y.0)));
    let median_pair = pairs[pairs.len() / 2];
    step.finish();
    // The service really carried the connections (socket-level or per packet).
    let counters = b.status_json("node-1", "/services").unwrap_or(Value::Null);
    let connections = |fe: &str| {
        counters["frontends"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["frontend"] == fe)
            .and_then(|f| f["connections"].as_u64())
            .unwrap_or(0)
    };
    let (target_conns, direct_conns) = (
        connections(&format!("{TARGET_IP}:{SERVICE_PORT}")),
        connections(&format!("{DIRECT_IP}:{IPERF_PORT}")) + connections(&format!("{DIRECT_IP}:{RR_PORT}")),
    );
    println!("node-1 counted {target_conns} connections to the target service and {direct_conns} to the direct one");
    if target_conns == 0 || direct_conns == 0 {
        bail!("the services' connection counters stayed at zero: the measured connections did not use the service");
    }
    drop(b);
    drop(bases);

    // Results.
    let last = SCALES.len() - 1;
    let scale_name = |n: usize| match n {
        10 => "10".to_string(),
        1_000 => "1k".to_string(),
        10_000 => "10k".to_string(),
        n => n.to_string(),
    };
    // Topology indices: 0 ours, 1 ours to the pod IP, then iptables, iptables-legacy,
    // nftables, the routed pods without a proxy to the pod IP, the same through the
    // redirect-only edge, and ours on the node with 10 services.
    let (ours, pod_ip, ipt, legacy, nft, kernel, edge, small) = (0, 1, 2, 3, 4, 5, 6, 7);
    let at = |t: usize, si: usize, q: f64| p(&connects[t][si], q);
    let prog = |si: usize, q: f64| p(&programming[si].process, q);
    let in_proc = |si: usize, q: f64| p(&programming[si].in_process, q);
    let mut results = vec![
        row("connect_p50_10k_vs_iptables", "us", at(ipt, last, 0.5), at(ours, last, 0.5), "lower"),
        // Ours at 10,000 services against ours at 10, in the same blocks: node-3's agent
        // serves 10 services while node-1's serves 10,000.
        row("connect_p50_10k_vs_10", "us", at(small, last, 0.5), at(ours, last, 0.5), "lower"),
        row("connect_p99_10k_vs_iptables", "us", at(ipt, last, 0.99), at(ours, last, 0.99), "lower"),
        row("connect_p99_10k_vs_10", "us", at(small, last, 0.99), at(ours, last, 0.99), "lower"),
        // Less exposed than p99 to the client or server being descheduled on a busy machine.
        row("connect_p90_10k_vs_iptables", "us", at(ipt, last, 0.9), at(ours, last, 0.9), "lower"),
        row("connect_p90_10k_vs_10", "us", at(small, last, 0.9), at(ours, last, 0.9), "lower"),
        // The same comparison across phases (node-1 at 10,000 against node-1 at 10, measured
        // minutes apart): the machine's drift in between counts too.
        row("connect_p50_10k_vs_10_first_phase", "us", at(ours, 0, 0.5), at(ours, last, 0.5), "lower"),
        // Both at 10 services: what the two nodes differ by besides their services.
        row("connect_p50_10_vs_10svc_node", "us", at(small, 0, 0.5), at(ours, 0, 0.5), "lower"),
        row("connect_p50_10k_vs_nftables", "us", at(nft, last, 0.5), at(ours, last, 0.5), "lower"),
        row("connect_p99_10k_vs_nftables", "us", at(nft, last, 0.99), at(ours, last, 0.99), "lower"),
        row("connect_p50_10k_vs_iptables_legacy", "us", at(legacy, last, 0.5), at(ours, last, 0.5), "lower"),
        row("connect_p50_10k_clusterip_vs_pod_ip", "us", at(pod_ip, last, 0.5), at(ours, last, 0.5), "lower"),
        // What a new connection costs the kernel itself (routed pods, no service, no
        // netfilter rule), beside ours through a ClusterIP among 10,000 services.
        row("connect_p50_10k_vs_kernel_routing_pod_ip", "us", at(kernel, last, 0.5), at(ours, last, 0.5), "lower"),
        // The least any TC pod edge costs: a program that only redirects, to the pod IP.
        row("connect_p50_10k_vs_redirect_only_edge_pod_ip", "us", at(edge, last, 0.5), at(ours, last, 0.5), "lower"),
    ];
    for (si, &n) in SCALES.iter().enumerate().take(last) {
        for (t, name) in [(ipt, "iptables"), (legacy, "iptables_legacy"), (nft, "nftables")] {
            results.push(row(
                &format!("connect_p50_{}_vs_{name}", scale_name(n)),
                "us",
                at(t, si, 0.5),
                at(ours, si, 0.5),
                "lower",
            ));
        }
    }
    results.extend([
        row("clusterip_throughput", "Gbit/s", mean(&bt), mean(&ot), "higher"),
        row("clusterip_rr_p50", "us", p(&br, 0.5), p(&or, 0.5), "lower"),
        row("clusterip_rr_p99", "us", p(&br, 0.99), p(&or, 0.99), "lower"),
        // Adjacent connections see the same level of the machine: the pair with the
        // median ratio (see the module docs).
        row("clusterip_rr_median_pair_p50", "us", median_pair.0, median_pair.1, "lower"),
        row("programming_p99_10k", "ms", prog(0, 0.99), prog(last, 0.99), "lower"),
        row("programming_p50_10k", "ms", prog(0, 0.5), prog(last, 0.5), "lower"),
        row("programming_max_10k", "ms", prog(0, 1.0), prog(last, 1.0), "lower"),
        row("programming_p99_1k", "ms", prog(0, 0.99), prog(1, 0.99), "lower"),
        // The figure before the netctl process was timed: from the store write, in-process.
        row("programming_p99_10k_in_process", "ms", in_proc(0, 0.99), in_proc(last, 0.99), "lower"),
        row("programming_p50_10k_in_process", "ms", in_proc(0, 0.5), in_proc(last, 0.5), "lower"),
        row("cold_start_10k", "s", cold[0].0, cold[1].0, "lower"),
        row("cold_start_10k_vs_iptables_restore", "s", loads[last][0], cold[1].0, "lower"),
        row("cold_start_10k_vs_nft_load", "s", loads[last][2], cold[1].0, "lower"),
    ]);
    write_results("services", &results)?;

    let png = crate::workspace_root().join("target/bench/services.png");
    let xs: Vec<f64> = SCALES.iter().map(|&n| n as f64).collect();
    let points = |samples: &[Vec<f64>]| -> Vec<(f64, f64, f64)> {
        samples.iter().zip(&xs).map(|(s, x)| (*x, p(s, 0.5), p(s, 0.99))).collect()
    };
    let series = vec![
        Series { label: "ours (eBPF, at connect())", color: RGBColor(0, 114, 178), points: points(&connects[ours]) },
        Series {
            label: "ours, straight to the pod IP (no service)",
            color: RGBColor(120, 120, 120),
            points: points(&connects[pod_ip]),
        },
        Series {
            label: "kube-proxy iptables (nf_tables backend)",
            color: RGBColor(213, 94, 0),
            points: points(&connects[ipt]),
        },
        Series {
            label: "kube-proxy iptables (legacy)",
            color: RGBColor(230, 159, 0),
            points: points(&connects[legacy]),
        },
        Series { label: "kube-proxy nftables", color: RGBColor(0, 158, 115), points: points(&connects[nft]) },
        Series {
            label: "no proxy: kernel routing, straight to the pod IP",
            color: RGBColor(0, 0, 0),
            points: points(&connects[kernel]),
        },
        Series {
            label: "no proxy: a TC edge that only redirects, straight to the pod IP",
            color: RGBColor(204, 121, 167),
            points: points(&connects[edge]),
        },
    ];
    plot(&png, &series)?;
    println!("wrote {}", png.display());

    let ratio =
        |name: &str| results.iter().find(|r| r["metric"] == name).and_then(|r| r["ratio"].as_f64()).unwrap_or(f64::NAN);
    let ours_of =
        |name: &str| results.iter().find(|r| r["metric"] == name).and_then(|r| r["ours"].as_f64()).unwrap_or(f64::NAN);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "bars: connect p50 10k vs iptables {:.3} <= 0.2: {}; connect p50 10k vs 10 {:.3} <= 1.2: {}; ClusterIP \
         throughput {:.3} >= 0.97: {}; ClusterIP RR p50 {:.3} <= 1.05: {}",
        ratio("connect_p50_10k_vs_iptables"),
        met(ratio("connect_p50_10k_vs_iptables") <= 0.2),
        ratio("connect_p50_10k_vs_10"),
        met(ratio("connect_p50_10k_vs_10") <= 1.2),
        ratio("clusterip_throughput"),
        met(ratio("clusterip_throughput") >= 0.97),
        ratio("clusterip_rr_p50"),
        met(ratio("clusterip_rr_p50") <= 1.05),
    );
    // The connect bar in absolute terms, beside the kernel's own floor.
    println!(
        "connect p50 at 10k: the 0.2 bar asks for <= {:.1} us; ours {:.1} us; the kernel's routed pod -> pod connect \
         with no service and no netfilter rule {:.1} us ({:.3} of iptables)",
        0.2 * at(ipt, last, 0.5),
        at(ours, last, 0.5),
        at(kernel, last, 0.5),
        at(kernel, last, 0.5) / at(ipt, last, 0.5),
    );
    println!(
        "connect p50 at 10k: a TC pod edge that only redirects (no source check, conntrack, policy or service) {:.1} us \
         ({:.3} of iptables, {:.3} of the kernel's routed connect); ours {:.3} of it",
        at(edge, last, 0.5),
        at(edge, last, 0.5) / at(ipt, last, 0.5),
        at(edge, last, 0.5) / at(kernel, last, 0.5),
        at(ours, last, 0.5) / at(edge, last, 0.5),
    );
    println!(
        "targets: programming p99 at 10k {:.1} ms <= 100 ms: {}; cold start with 10k {:.2} s <= 2 s: {}",
        ours_of("programming_p99_10k"),
        met(ours_of("programming_p99_10k") <= 100.0),
        ours_of("cold_start_10k"),
        met(ours_of("cold_start_10k") <= 2.0),
    );
    println!("services benchmark took {}", progress::clock(bench_started.elapsed()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measured_service_sits_in_the_middle_of_kube_services() {
        let order = rendering_order(1_000, BASE_SERVER);
        assert_eq!(order.len(), 1_000);
        let rules = iptables_rules(&order);
        let services: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A KUBE-SERVICES -d ")).collect();
        // One rule per service port (the throughput service has two), the NodePort jump last.
        assert_eq!(services.len(), 1_001);
        let at = services.iter().position(|l| l.contains(&format!("-d {TARGET_IP}/32"))).unwrap();
        assert!((450..=550).contains(&at), "target at {at}");
        assert!(rules.trim_end().ends_with("-j KUBE-NODEPORTS\nCOMMIT"));
        // Chain names within iptables' 28 characters, all distinct.
        let chains: Vec<&str> = rules
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter(|c| c.starts_with("KUBE-SVC-") || c.starts_with("KUBE-SEP-"))
            .collect();
        // A KUBE-SVC per service port; a KUBE-SEP per endpoint of each (the direct service: two ports).
        assert_eq!(chains.len(), 1_001 + 2 * 997 + 4);
        assert!(chains.iter().all(|c| c.split(' ').next().unwrap().len() <= 28));
        let distinct: std::collections::BTreeSet<&str> = chains.iter().copied().collect();
        assert_eq!(distinct.len(), chains.len());
        // Two endpoints: the first taken with probability 1/2, the second always.
        assert!(rules.contains("--probability 0.50000000000 -j KUBE-SEP-"));
    }

    /// `NetctlApply` starts netctl from a thread that entered the control namespace, with no
    /// `ip netns exec`: the child must land in that namespace (where etcd listens).
    #[test]
    fn a_process_spawned_from_an_entered_thread_runs_in_that_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: a network namespace needs root");
            return;
        }
        let ns = Netns::new("bsx");
        // /run/netns/NAME is a bind mount of the namespace: its inode is the namespace's.
        let want = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(Path::new("/run/netns").join(ns.name())).expect("the namespace's file"),
        );
        let link = contiv_tests::cluster::enter(ns.name(), || {
            std::process::Command::new("readlink").arg("/proc/self/ns/net").output().expect("readlink")
        });
        assert_eq!(String::from_utf8_lossy(&link.stdout).trim(), format!("net:[{want}]"));
    }

    #[test]
    fn cpu_ticks_reads_a_live_process_and_none_for_a_gone_one() {
        let me = cpu_ticks(std::process::id()).expect("this process's /proc/PID/stat");
        // Burn a little CPU: the count never goes down.
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(30) {
            std::hint::spin_loop();
        }
        assert!(cpu_ticks(std::process::id()).unwrap() >= me);
        assert_eq!(cpu_ticks(u32::MAX), None);
    }

    #[test]
    fn every_block_runs_each_topology_once_and_each_goes_first_equally_often() {
        let orders = block_orders(8, CONNECT_BLOCKS, CONNECT_ORDER_SEED);
        assert_eq!(orders.len(), CONNECT_BLOCKS);
        assert_eq!(CONNECT_BLOCKS % 8, 0, "each topology first equally often needs a multiple of 8");
        let mut first = [0usize; 8];
        for o in &orders {
            let mut sorted = o.clone();
            sorted.sort();
            assert_eq!(sorted, (0..8).collect::<Vec<_>>(), "{o:?}");
            first[o[0]] += 1;
        }
        assert!(first.iter().all(|&f| f == CONNECT_BLOCKS / 8), "{first:?}");
        // Not a rotation: some topology is followed by different ones in different blocks.
        let after = |o: &Vec<usize>, t: usize| o.iter().position(|&x| x == t).and_then(|i| o.get(i + 1).copied());
        assert!((0..8).any(|t| orders.iter().filter_map(|o| after(o, t)).collect::<std::collections::BTreeSet<_>>().len() > 1));
        // Fixed seed: the same orders every run.
        assert_eq!(orders, block_orders(8, CONNECT_BLOCKS, CONNECT_ORDER_SEED));
    }

    #[test]
    fn nftables_rendering_has_one_verdict_map_element_per_service_port() {
        let text = nft_rules(&rendering_order(10, BASE_SERVER));
        assert_eq!(text.lines().filter(|l| l.starts_with("add element ip kube-proxy service-ips")).count(), 11);
        assert!(text.contains(&format!(
            "add element ip kube-proxy service-ips {{ {TARGET_IP} . tcp . {SERVICE_PORT} : goto service-"
        )));
        assert!(text.contains(&format!("dnat to {BASE_SERVER}:{SERVER_PORT}")));
    }

    /// The renderings load into a kernel (root: a throwaway network namespace).
    #[test]
    fn renderings_load_with_iptables_restore_and_nft() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading netfilter rules needs root (a network namespace)");
            return;
        }
        for proxy in [Proxy::Iptables, Proxy::IptablesLegacy, Proxy::Nftables, Proxy::None] {
            let node = ProxyNode::new(proxy);
            node.load(&rendering_order(100, BASE_SERVER)).unwrap();
            // Loading again replaces the rules (the next scale).
            node.load(&rendering_order(200, BASE_SERVER)).unwrap();
            if proxy == Proxy::None {
                // The floor: no netfilter table at all in its node.
                let ruleset = contiv_tests::run(node.node.cmd("nft").args(["list", "ruleset"]));
                assert!(ruleset.trim().is_empty(), "the no-proxy node has rules:\n{ruleset}");
                continue;
            }
            let listed = match proxy {
                Proxy::Iptables => contiv_tests::run(node.node.cmd("iptables-nft-save").args(["-t", "nat"])),
                Proxy::IptablesLegacy => contiv_tests::run(node.node.cmd("iptables-legacy-save").args(["-t", "nat"])),
                Proxy::Nftables => {
                    contiv_tests::run(node.node.cmd("nft").args(["list", "map", "ip", "kube-proxy", "service-ips"]))
                }
                Proxy::None | Proxy::RedirectOnly => unreachable!("not in this test"),
            };
            let want = match proxy {
                Proxy::Nftables => format!("{TARGET_IP} . tcp . {SERVICE_PORT} : goto service-"),
                _ => format!("-A KUBE-SERVICES -d {TARGET_IP}/32"),
            };
            assert!(listed.contains(&want), "{proxy:?}: {want:?} not in\n{listed}");
            if proxy != Proxy::Nftables {
                let n = listed.lines().filter(|l| l.starts_with("-A KUBE-SERVICES -d ")).count();
                assert_eq!(n, 201, "{proxy:?}: the second load replaced the first");
            }
        }
    }

    /// Packets the node's IP stack forwarded (`/proc/net/snmp` of its namespace).
    fn forwarded(node: &Netns) -> u64 {
        let snmp = contiv_tests::run(node.cmd("cat").arg("/proc/net/snmp"));
        let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
        let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
        let at = names.split_whitespace().position(|n| n == "ForwDatagrams").unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    }

    /// The redirect-only reference edge carries the connections itself: the node's stack
    /// forwards none of their packets, where it forwards every one without the edge.
    #[test]
    fn the_redirect_only_edge_carries_connections_past_the_node_stack() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: attaching TC programs needs root (a network namespace)");
            return;
        }
        for proxy in [Proxy::None, Proxy::RedirectOnly] {
            let node = ProxyNode::new(proxy);
            let to = SocketAddr::from((BASE_SERVER, SERVER_PORT));
            let samples = connect_samples(node.client.name(), node.server.name(), to, to, 20).unwrap();
            assert_eq!(samples.len(), 20);
            let n = forwarded(&node.node);
            if proxy == Proxy::None {
                assert!(n >= 20 * 3, "kernel routing forwarded only {n} packets");
            } else {
                assert_eq!(n, 0, "the node's stack forwarded {n} packets past the redirect-only edge");
            }
        }
    }

    #[test]
    fn the_plot_is_a_png() {
        if !Path::new(FONT).exists() {
            eprintln!("skipped: {FONT} is missing (cargo xtask setup installs fonts-dejavu-core)");
            return;
        }
        let path = std::env::temp_dir().join(format!("contiv-services-plot-{}.png", std::process::id()));
        let pts = |a: f64, b: f64| vec![(10.0, a, a * 50.0), (1_000.0, a * 1.1, a * 60.0), (10_000.0, b, b * 80.0)];
        let series = vec![
            Series { label: "ours", color: RGBColor(0, 114, 178), points: pts(34.0, 32.0) },
            Series { label: "iptables", color: RGBColor(213, 94, 0), points: pts(44.0, 129.0) },
        ];
        plot(&path, &series).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 10_000, "a 1500x650 plot with text and lines: {} bytes", bytes.len());
    }
}
