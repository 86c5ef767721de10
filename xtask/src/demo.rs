//! `cargo xtask demo`: a two-node cluster in a box (real etcd, real agents, pods wired by the
//! real CNI), traffic across nodes over the eBPF VXLAN overlay, from the host to a pod, from a
//! pod to the host and to "the internet" (masqueraded to the node's address), then the
//! counters from the pinned maps, and everything removed again.

use std::{path::Path, process::Command, time::Duration};

use anyhow::Result;
use contiv_tests::cluster::{BoxOptions, ClusterBox, EXTERNAL_IP};

fn say(s: &str) {
    println!("\n\x1b[1m== {s}\x1b[0m");
}

fn show(cmd: &mut Command) {
    let shown = format!("{cmd:?}").replace('"', "");
    println!("$ {}", shown.split(" exec ").last().unwrap_or(&shown));
    match cmd.output() {
        Ok(o) => print!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        Err(e) => println!("({e})"),
    }
}

fn iperf(b: &ClusterBox, client: &str, server: &str, server_ip: std::net::Ipv4Addr) {
    let mut srv = b.cmd(server, "iperf3").args(["-s", "-1"]).stdout(std::process::Stdio::piped()).spawn();
    std::thread::sleep(Duration::from_millis(400));
    show(b.cmd(client, "iperf3").args(["-c", &server_ip.to_string(), "-t", "2", "-f", "m"]));
    if let Ok(s) = srv.as_mut() {
        let out = s.wait_with_output_ref();
        if let Some(line) = out.lines().find(|l| l.contains("Accepted connection from")) {
            println!("  (iperf3 server on {server}: {})", line.trim());
        }
    }
}

trait WaitOutput {
    fn wait_with_output_ref(&mut self) -> String;
}

impl WaitOutput for std::process::Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let _ = self.wait();
        let mut s = String::new();
        if let Some(out) = self.stdout.as_mut() {
            let _ = out.read_to_string(&mut s);
        }
        s
    }
}

pub fn run(bins: &Path) -> Result<()> {
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("CONTIV_BIN_DIR", bins) };
    say("a cluster in a box: etcd, a fabric, two nodes each with contiv-agent, an external namespace");
    let mut opts = BoxOptions::for_test(2);
    opts.id = format!("cdemo{}", std::process::id());
    opts.progress = true;
    let mut b = ClusterBox::up(opts);
    for n in &b.state.nodes {
        println!("{}: namespace {}, underlay {}, agent config {}", n.name, n.netns, n.ip, n.config.display());
    }
    println!("{}", std::fs::read_to_string(&b.node("node-1").config)?);

    say("pods: the Pod object goes into the store (netctl apply), then contiv-cni ADD, as kubelet and a runtime do");
    let web1 = b.add_pod("node-1", "shop/web-1", &[("app", "web")], &[]);
    let web2 = b.add_pod("node-2", "shop/web-2", &[("app", "web")], &[]);
    let client = b.add_pod("node-1", "shop/client", &[("app", "client")], &[]);
    for p in [&web1, &web2, &client] {
        println!("pod {:<12} on {}: {}", p.id(), p.node, p.ip);
    }
    show(b.cmd("shop/client", "ip").args(["-br", "addr", "show", "eth0"]));
    show(b.cmd("shop/client", "ip").args(["route"]));
    show(&mut b.netctl_cmd(&["get", "pods"]));

    say("pod -> pod on another node: eBPF encapsulation into one flow-based VXLAN device, no per-peer state");
    show(b.cmd("shop/client", "ping").args(["-c", "3", "-i", "0.2", &web2.ip.to_string()]));
    iperf(&b, "shop/client", "shop/web-2", web2.ip);

    say("pod -> pod on the same node: bpf_redirect_peer, no host routing");
    show(b.cmd("shop/client", "ping").args(["-c", "2", "-i", "0.2", &web1.ip.to_string()]));

    say("host -> pod (what kubelet's probes do) and pod -> host");
    show(b.cmd("node-1", "ping").args(["-c", "2", "-i", "0.2", &web1.ip.to_string()]));
    show(b.cmd("shop/web-1", "ping").args(["-c", "2", "-i", "0.2", &b.node("node-1").ip.to_string()]));

    say("pod -> the outside world: masqueraded to the node's address by nftables");
    show(b.cmd("shop/client", "ping").args(["-c", "2", "-i", "0.2", &EXTERNAL_IP.to_string()]));
    iperf(&b, "shop/client", "external", EXTERNAL_IP);

    say("path MTU: pods get the underlay's MTU minus the 50 bytes of VXLAN");
    show(b.cmd("shop/client", "ping").args(["-c", "1", "-M", "do", "-s", "1422", &web2.ip.to_string()]));

    say("per-pod counters (the agent's /pods, read from the pinned POD_COUNTERS map)");
    println!(
        "{:<12} {:>9} {:>11} {:>11} {:>9} {:>11} {:>10}",
        "pod", "local pkt", "tunnel pkt", "from tunnel", "host pkt", "slow path", "spoof drop"
    );
    for node in ["node-1", "node-2"] {
        for p in b.status_json(node, "/pods").and_then(|v| v.as_array().cloned()).unwrap_or_default() {
            let c = &p["counters"];
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            println!(
                "{:<12} {:>9} {:>11} {:>11} {:>9} {:>11} {:>10}",
                p["podName"].as_str().unwrap_or(""),
                n("fwdPackets"),
                n("tunnelPackets"),
                n("fromTunnelPackets"),
                n("hostPackets"),
                n("slowPackets"),
                n("dropSpoofedIp") + n("dropSpoofedMac")
            );
        }
    }
    say("what node-1 routes to other nodes (/node) and the map behind it");
    println!("{}", b.status("node-1", "/node").unwrap_or_default());
    show(Command::new("bpftool").args(["map", "dump", "pinned"]).arg(b.node("node-1").pin_dir.join("REMOTE_ROUTES")));

    say("cleanup: contiv-cni DEL for every pod, then the box goes");
    for id in ["shop/web-1", "shop/web-2", "shop/client"] {
        b.del_pod(id);
        println!("DEL {id}");
    }
    drop(b);
    println!("\ndone: namespaces, agents, etcd and pinned maps removed");
    Ok(())
}
