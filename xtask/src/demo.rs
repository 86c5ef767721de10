//! `cargo xtask demo`: one node in its own network namespace with the real agent, three
//! pods created through the real CNI binary, traffic between them and to the gateway,
//! the per-pod counters read from the pinned maps, then everything cleaned up.

use std::{net::Ipv4Addr, path::Path, process::Command};

use anyhow::Result;
use contiv_tests::{Node, NodeOptions, Pod, counter, ping};

fn say(s: &str) {
    println!("\n\x1b[1m== {s}\x1b[0m");
}

fn show(cmd: &mut Command) {
    println!("$ {}", format!("{cmd:?}").replace('"', ""));
    match cmd.output() {
        Ok(o) => print!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        Err(e) => println!("({e})"),
    }
}

pub fn run(bins: &Path) -> Result<()> {
    // SAFETY: setting a variable before any thread is started.
    unsafe { std::env::set_var("CONTIV_BIN_DIR", bins) };
    say("starting a node (network namespace) with contiv-agent");
    let node = Node::start(NodeOptions::default());
    println!("node namespace {}, agent config {}", node.ns.name(), node.config_path.display());
    println!("{}", std::fs::read_to_string(&node.config_path)?);

    say("creating 3 pods: contiv-cni ADD, called exactly as a container runtime calls it");
    let pods: Vec<Pod> = (0..3).map(|_| node.add_pod()).collect();
    for p in &pods {
        println!("pod {} -> {}", p.ns.name(), p.result);
    }
    show(pods[0].ns.cmd("ip").args(["-br", "addr", "show", "eth0"]));
    show(pods[0].ns.cmd("ip").args(["route"]));
    show(pods[0].ns.cmd("ip").args(["neigh"]));

    say("pod -> pod through the eBPF fast path (TC + bpf_redirect_peer)");
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        let ok = ping(&pods[a].ns, pods[b].ip, 3);
        println!("ping {} -> {}: {}", pods[a].ip, pods[b].ip, if ok { "ok" } else { "FAILED" });
    }
    let server = pods[1].ns.cmd("iperf3").args(["-s", "-1", "-D"]).status()?;
    if server.success() {
        std::thread::sleep(std::time::Duration::from_millis(300));
        show(pods[0].ns.cmd("iperf3").args(["-c", &pods[1].ip.to_string(), "-t", "2", "-f", "g"]));
    }

    say("pod -> gateway: ARP and ICMP answered by the vswitch over AF_XDP");
    pods[2].ns.ip(&["neigh", "del", "10.1.1.1", "dev", "eth0"]);
    show(pods[2].ns.cmd("ping").args(["-c", "3", "-i", "0.2", "10.1.1.1"]));
    show(pods[2].ns.cmd("ip").args(["neigh", "show", "10.1.1.1"]));

    say("a spoofed source address is dropped");
    pods[0].ns.ip(&["addr", "add", "10.1.1.200/32", "dev", "eth0"]);
    show(pods[0].ns.cmd("ping").args(["-c", "2", "-W", "1", "-I", "10.1.1.200", &pods[1].ip.to_string()]));

    say("per-pod counters (bpftool map dump pinned <pin dir>/POD_COUNTERS, summed over CPUs)");
    println!(
        "{:<12} {:>10} {:>12} {:>10} {:>10} {:>10} {:>12}",
        "pod", "fwd pkts", "fwd bytes", "slow pkts", "from slow", "spoof ip", "spoof mac"
    );
    for p in &pods {
        if let Some(c) = node.pod_counters(p.ip) {
            println!(
                "{:<12} {:>10} {:>12} {:>10} {:>10} {:>10} {:>12}",
                p.ip,
                counter(&c, "fwd_packets"),
                counter(&c, "fwd_bytes"),
                counter(&c, "slow_packets"),
                counter(&c, "from_slow_packets"),
                counter(&c, "drop_spoofed_ip"),
                counter(&c, "drop_spoofed_mac")
            );
        }
    }
    let s = node.slowport_counters();
    println!("slow-path port: {s:?}");
    say("the maps, as an operator sees them");
    show(Command::new("bpftool").args(["map", "dump", "pinned"]).arg(node.pin_dir.join("PODS")));

    say("contiv-cni DEL for every pod, then cleanup");
    for p in &pods {
        let out = node.del_pod(p);
        println!("DEL {} -> exit {}", p.ip, out.exit_code);
    }
    println!("pod interfaces left on the node: {:?}", node.pod_links());
    let _: Ipv4Addr = pods[0].ip;
    drop(pods);
    drop(node);
    println!("\ndone: namespaces, agent and pinned maps removed");
    Ok(())
}
