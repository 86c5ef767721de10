//! netctl: see the crate docs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use contiv_netctl::get::{Format, Resource};
use contiv_netctl::{ApplyOutcome, DeleteOutcome, manifest};
use contiv_store::{Store, StoreConfig, TlsConfig};

/// Writes Kubernetes manifests into the contiv store and shows what it holds.
#[derive(Debug, Parser)]
#[command(name = "netctl", version)]
struct Args {
    /// etcd endpoints, comma separated (https:// with --etcd-ca-file, as deploy/etcd
    /// serves). Without them: the embedded store at --data-dir.
    #[arg(long = "etcd", global = true, env = "CONTIV_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd: Vec<String>,
    /// CA certificate (PEM) that signed etcd's server certificate; turns on TLS.
    #[arg(long, global = true, env = "CONTIV_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, global = true, env = "CONTIV_ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert-file.
    #[arg(long, global = true, env = "CONTIV_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// Name etcd's server certificate must carry (default: the endpoint's host).
    #[arg(long, global = true, env = "CONTIV_ETCD_SERVER_NAME")]
    etcd_server_name: Option<String>,
    /// Directory of the embedded store.
    #[arg(long, global = true, env = "CONTIV_STORE_DIR", default_value = "/var/lib/contiv/store")]
    data_dir: PathBuf,
    /// The status endpoint of this node's agent (for `get ... --node`).
    #[arg(long, global = true, env = "CONTIV_AGENT", default_value = contiv_netctl::agent::DEFAULT_AGENT)]
    agent: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes the objects of manifest files (or directories of them) into the store.
    /// Every document of every file is validated before anything is written; a field the
    /// object's kind does not have is an error, as with kubectl.
    Apply {
        /// A manifest file or a directory of *.yaml/*.yml/*.json files.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Removes the objects of manifest files from the store (only kind, apiVersion and
    /// metadata of each document are read).
    Delete {
        /// A manifest file or a directory of them.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Lists nodes, pods, services, endpoints, policies or ipam; with --node, what a node's
    /// datapath holds (policies, services, conntrack).
    Get {
        /// What to list.
        #[arg(value_enum)]
        what: Resource,
        /// Only this namespace (namespaced kinds).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
        /// What node N's datapath holds, asked of its agent instead of the store: for
        /// policies what it enforces per pod (its address from its registration, see
        /// --status-port), for services the frontends and backends programmed, for
        /// conntrack its flows (both: see --agent).
        #[arg(long)]
        node: Option<String>,
        /// With --node: only this pod, NAMESPACE/NAME (for conntrack: the flows it is in; for
        /// policies also NAME, in -n's namespace or any).
        #[arg(long, requires = "node")]
        pod: Option<String>,
        /// With --node: the port of the agents' status endpoint (`statusAddr`).
        #[arg(long, default_value_t = 9192)]
        status_port: u16,
        /// With --node, for conntrack: only flows this service (NAMESPACE/NAME) translated.
        #[arg(long, requires = "node")]
        service: Option<String>,
        /// With --node, for conntrack: at most N flows, the most recently seen (default 200;
        /// 0: all, up to the agent's cap of 100000).
        #[arg(long, requires = "node")]
        limit: Option<usize>,
    },
    /// Streams a node's datapath events live: every dropped packet (time, pod, 5-tuple,
    /// reason) and, when the agent monitors flows, every allowed new flow. The kernel bounds
    /// the rate per CPU; events beyond it are not emitted but counted, and shown as
    /// "N events suppressed". Runs until interrupted (or --count events).
    Monitor {
        /// The node whose agent to ask (its address from its registration). Default: the
        /// node --pod runs on, else --agent.
        #[arg(long)]
        node: Option<String>,
        /// Only events of this pod (NAMESPACE/NAME): sent or received by it.
        #[arg(long)]
        pod: Option<String>,
        /// Only drops.
        #[arg(long)]
        drops: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// `table`: one line per event; `json`: the agent's NDJSON as it comes.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
        /// The port of the agents' status endpoint (`statusAddr`).
        #[arg(long, default_value_t = 9192)]
        status_port: u16,
    },
    /// What the datapath does with a packet from a pod, and why: the node's agent runs the
    /// pod's real `tc_from_pod` program on a made-up packet (BPF_PROG_TEST_RUN) in trace
    /// mode, which records every decision (anti-spoofing, conntrack, service translation,
    /// policy, route, delivery) and changes no state. A packet forwarded to another node is
    /// followed there (that node's overlay program, the receiver's ingress rules).
    Trace {
        /// The sending pod: NAMESPACE/NAME.
        #[arg(long)]
        from: String,
        /// The destination: IP:PORT/PROTO (TCP, UDP, SCTP), IP:PORT (TCP) or IP/ICMP.
        #[arg(long)]
        to: String,
        /// Send from this address instead of the pod's own (to see anti-spoofing at work).
        #[arg(long)]
        from_ip: Option<std::net::Ipv4Addr>,
        /// The node whose agent to ask. Default: the node the pod runs on (from the store).
        #[arg(long)]
        node: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
        /// The port of the agents' status endpoint (`statusAddr`).
        #[arg(long, default_value_t = 9192)]
        status_port: u16,
    },
}

async fn open(args: &Args) -> anyhow::Result<Arc<dyn Store>> {
    let mut config =
        if args.etcd.is_empty() { StoreConfig::embedded(&args.data_dir) } else { StoreConfig::etcd(args.etcd.clone()) };
    if let Some(tls) = TlsConfig::from_flags(
        args.etcd_ca_file.clone(),
        args.etcd_cert_file.clone(),
        args.etcd_key_file.clone(),
        args.etcd_server_name.clone(),
    )? {
        config = config.with_tls(tls);
    }
    config.validate()?;
    contiv_store::open(&config).await.context("opening the store")
}

fn load(files: &[PathBuf]) -> Result<Vec<contiv_cluster_model::ClusterObject>, ExitCode> {
    match manifest::load_all(files) {
        Ok(ms) => Ok(ms.into_iter().flat_map(|m| m.objects).collect()),
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("nothing was written");
            Err(ExitCode::from(1))
        }
    }
}

/// Prints one line per object written (also those that landed before a failure), then the
/// error, if any.
fn report<O>(
    result: Result<Vec<(String, O)>, contiv_netctl::WriteError<O>>,
    word: impl Fn(&O) -> &'static str,
) -> ExitCode {
    match result {
        Ok(done) => {
            for (key, outcome) in &done {
                println!("{key} {}", word(outcome));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            for (key, outcome) in &e.done {
                println!("{key} {}", word(outcome));
            }
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        Command::Apply { files } => {
            let objects = match load(files) {
                Ok(o) => o,
                Err(code) => return Ok(code),
            };
            if objects.is_empty() {
                // As kubectl: a typo'd directory or a comment-only file is not a success.
                eprintln!(
                    "error: no objects passed to apply (the files hold no document; a directory's *.yaml, *.yml and *.json files are read)"
                );
                return Ok(ExitCode::from(1));
            }
            let store = open(&args).await?;
            let word = |outcome: &ApplyOutcome| match outcome {
                ApplyOutcome::Created => "created",
                ApplyOutcome::Configured => "configured",
                ApplyOutcome::Unchanged => "unchanged",
            };
            return Ok(report(contiv_netctl::apply(&store, &objects).await, word));
        }
        Command::Delete { files } => {
            let objects = match manifest::load_all_refs(files) {
                Ok(o) => o,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("error: {e}");
                    }
                    eprintln!("nothing was deleted");
                    return Ok(ExitCode::from(1));
                }
            };
            if objects.is_empty() {
                eprintln!(
                    "error: no objects passed to delete (the files hold no document; a directory's *.yaml, *.yml and *.json files are read)"
                );
                return Ok(ExitCode::from(1));
            }
            let store = open(&args).await?;
            let word = |outcome: &DeleteOutcome| match outcome {
                DeleteOutcome::Deleted => "deleted",
                DeleteOutcome::NotFound => "not found",
            };
            return Ok(report(contiv_netctl::delete(&store, &objects).await, word));
        }
        Command::Get { what: Resource::Services, namespace, output, node: Some(node), .. } => {
            let report = contiv_netctl::agent::node_report(&args.agent, "/services", Some(node))?;
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => print!("{}", contiv_netctl::agent::services_table(&report, namespace.as_deref())),
            }
            let unread = contiv_netctl::agent::read_errors(&report);
            if !unread.is_empty() {
                for e in unread {
                    eprintln!("error: {node}: {e}: what it holds is missing above");
                }
                return Ok(ExitCode::from(1));
            }
        }
        Command::Get { what: Resource::Conntrack, node: None, .. } => {
            eprintln!("error: conntrack is a node's table, read from its agent: pass --node NODE");
            return Ok(ExitCode::from(2));
        }
        Command::Get {
            what: Resource::Conntrack, namespace, output, node: Some(node), pod, service, limit, ..
        } => {
            let path =
                contiv_netctl::agent::conntrack_path(pod.as_deref(), service.as_deref(), namespace.as_deref(), *limit);
            let report = contiv_netctl::agent::node_report(&args.agent, &path, Some(node))?;
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => print!("{}", contiv_netctl::agent::conntrack_table(&report)),
            }
        }
        Command::Get { what, namespace, output, node: Some(node), pod, status_port, .. } => {
            if *what != Resource::Policies {
                eprintln!("error: --node is supported for policies, services and conntrack");
                return Ok(ExitCode::from(2));
            }
            let store = open(&args).await?;
            let text = contiv_netctl::node::policies(
                &store,
                node,
                *status_port,
                namespace.as_deref(),
                pod.as_deref(),
                *output,
            )
            .await?;
            print!("{text}");
        }
        Command::Monitor { node, pod, drops, count, output, status_port } => {
            use contiv_netctl::inspect::{MonitorArgs, Target};
            let target = match (node, pod) {
                (Some(n), _) => Target::Node(n.clone()),
                (None, Some(p)) => Target::PodsNode(p.clone()),
                (None, None) => Target::Address(args.agent.clone()),
            };
            let store = match target {
                Target::Address(_) => None,
                _ => Some(open(&args).await?),
            };
            let addr = contiv_netctl::inspect::resolve(store.as_ref(), &target, *status_port).await?;
            drop(store);
            let margs = MonitorArgs { pod: pod.clone(), drops: *drops, count: *count, json: *output == Format::Json };
            contiv_netctl::inspect::monitor(&addr, &margs, &mut std::io::stdout().lock()).await?;
        }
        Command::Trace { from, to, from_ip, node, output, status_port } => {
            use contiv_netctl::inspect::{Target, TraceArgs};
            let target = match node {
                Some(n) => Target::Node(n.clone()),
                None => Target::PodsNode(from.clone()),
            };
            let store = open(&args).await?;
            let addr = contiv_netctl::inspect::resolve(Some(&store), &target, *status_port).await?;
            let targs = TraceArgs { from: from.clone(), to: to.clone(), from_ip: from_ip.map(|ip| ip.to_string()) };
            let mut report = contiv_netctl::inspect::trace(&addr, &targs).await?;
            // Forwarded to another node: follow it there.
            match contiv_netctl::inspect::trace_arrival(&store, &report, *status_port).await {
                Some(Ok(arrival)) => report["arrival"] = arrival,
                Some(Err(e)) => report["arrival"] = serde_json::Value::String(e.to_string()),
                None => {}
            }
            drop(store);
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => print!("{}", contiv_netctl::inspect::render_trace(&report)),
            }
        }
        Command::Get { what, namespace, output, .. } => {
            let store = open(&args).await?;
            let out = contiv_netctl::get::get(&store, *what, namespace.as_deref(), *output).await?;
            for w in &out.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", out.text);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("netctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
