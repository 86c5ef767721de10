//! `cargo xtask cluster ...`: the cluster in a box as a user-facing tool (see
//! tests/src/cluster.rs for what a box is). State lives in one directory (`--dir`, default
//! /run/contiv-box/default), so separate invocations work on the same box.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use contiv_tests::cluster::{self, BoxOptions, ClusterBox, ContainerPort};

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Builds a box: etcd, a fabric, N nodes with their agents, an external namespace.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Extra agent configuration (TOML lines) for every node.
        #[arg(long, default_value = "")]
        agent_config: String,
        /// VPP mode: `uplink = "vpp"`, each node with its own FAKE VPP (contiv-fake-vpp), which
        /// holds what the agent programs but forwards nothing between nodes.
        #[arg(long)]
        fake_vpp: bool,
    },
    /// Pods: `pod add NODE NS/NAME [--labels k=v,...] [--ports name=8080/TCP,...]`, `pod del NS/NAME`.
    Pod {
        #[command(subcommand)]
        cmd: PodCmd,
    },
    /// Runs a command in a node, a pod (NS/NAME), `external` or `control`.
    Exec {
        target: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Nodes, agents, pods and what each node routes.
    Status,
    /// Stops or starts a node's agent (`--kill`: SIGKILL, a crash).
    Agent {
        node: String,
        #[arg(value_parser = ["stop", "start"])]
        action: String,
        #[arg(long)]
        kill: bool,
    },
    /// `netctl` against the box's etcd, e.g. `cluster netctl get pods`.
    Netctl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Removes everything of the box (also what a crashed earlier run left).
    Down,
}

#[derive(Subcommand)]
pub enum PodCmd {
    Add {
        node: String,
        /// NAMESPACE/NAME
        pod: String,
        /// k=v,k=v
        #[arg(long, default_value = "")]
        labels: String,
        /// name=PORT[/PROTO],...
        #[arg(long, default_value = "")]
        ports: String,
    },
    Del {
        /// NAMESPACE/NAME
        pod: String,
    },
}

fn load(dir: &Path) -> Result<ClusterBox> {
    ClusterBox::load(dir).with_context(|| format!("no box in {} (cargo xtask cluster up)", dir.display()))
}

pub fn run(dir: Option<PathBuf>, cmd: ClusterCmd) -> Result<()> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(cluster::DEFAULT_DIR));
    match cmd {
        ClusterCmd::Up { nodes, agent_config, fake_vpp } => {
            if dir.join("box.json").exists() {
                bail!("a box already runs from {} (cargo xtask cluster down first)", dir.display());
            }
            // Whatever a crashed earlier run left under the same id goes first.
            cluster::remove_by_id(cluster::DEFAULT_ID);
            eprintln!("cluster: starting etcd, the fabric and {nodes} node(s) (agents come up one by one)...");
            let b = ClusterBox::up(BoxOptions {
                nodes,
                id: cluster::DEFAULT_ID.into(),
                dir,
                persist: true,
                agent_config: agent_config.replace("\\n", "\n"),
                fake_vpp: fake_vpp.then(Vec::new),
                progress: true,
            });
            print_status(&b);
        }
        ClusterCmd::Pod { cmd: PodCmd::Add { node, pod, labels, ports } } => {
            let mut b = load(&dir)?;
            let labels: Vec<(&str, &str)> = labels
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|kv| kv.split_once('=').context("labels are k=v,k=v"))
                .collect::<Result<_>>()?;
            let ports: Vec<ContainerPort> = ports
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|p| p.parse().map_err(anyhow::Error::msg))
                .collect::<Result<_>>()?;
            let p = b.add_pod(&node, &pod, &labels, &ports);
            println!("{} on {}: {} (netns {})", p.id(), p.node, p.ip, p.netns);
        }
        ClusterCmd::Pod { cmd: PodCmd::Del { pod } } => {
            let mut b = load(&dir)?;
            b.del_pod(&pod);
            println!("{pod} deleted");
        }
        ClusterCmd::Exec { target, command } => {
            let b = load(&dir)?;
            let Some(_) = b.netns_of(&target) else { bail!("no node, pod or namespace {target:?} in the box") };
            let status = b.cmd(&target, &command[0]).args(&command[1..]).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        ClusterCmd::Status => print_status(&load(&dir)?),
        ClusterCmd::Agent { node, action, kill } => {
            let mut b = load(&dir)?;
            if action == "stop" {
                b.stop_agent(&node, kill);
            } else {
                b.start_agent(&node);
            }
            print_status(&b);
        }
        ClusterCmd::Netctl { args } => {
            let b = load(&dir)?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = b.netctl(&args);
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        ClusterCmd::Down => {
            match ClusterBox::load(&dir) {
                Ok(mut b) => b.down(),
                Err(_) => {
                    eprintln!("cluster: no state in {}; removing whatever box namespaces are left", dir.display())
                }
            }
            cluster::remove_by_id(cluster::DEFAULT_ID);
            let _ = std::fs::remove_dir_all(&dir);
            println!("cluster: down");
        }
    }
    Ok(())
}

fn print_status(b: &ClusterBox) {
    println!("box {} (state in {})", b.state.id, b.state.dir.display());
    println!("  control  {}  etcd http://{}:2379", b.state.control, cluster::CONTROL_IP);
    println!("  external {}  {} (router {})", b.state.external, cluster::EXTERNAL_IP, cluster::ROUTER_IP);
    for n in &b.state.nodes {
        let node = b.status_json(&n.name, "/node");
        let agent = match (n.agent_pid, &node) {
            (Some(pid), Some(_)) => format!("agent {pid} ready"),
            (Some(pid), None) => format!("agent {pid} not answering"),
            (None, _) => "agent stopped".into(),
        };
        let subnet = node.as_ref().and_then(|v| v["podSubnet"].as_str().map(str::to_owned)).unwrap_or_default();
        let routes = node.as_ref().and_then(|v| v["remoteRoutes"].as_object().map(|m| m.len())).unwrap_or(0);
        println!("  {:<8} {}  {}  pods {subnet}, {routes} remote prefixes", n.name, n.ip, agent);
    }
    for p in &b.state.pods {
        println!("  pod {:<24} {:<8} {}", p.id(), p.node, p.ip);
    }
}
