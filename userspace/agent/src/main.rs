//! `contiv-agent`: the per-node vswitch agent daemon.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use contiv_agent::{
    agent::Agent,
    cluster, cni_server,
    config::{AgentConfig, Uplink},
    metrics::AgentMetrics,
    status,
};

/// Exit code for a bad configuration (sysexits EX_USAGE... EX_CONFIG).
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(name = "contiv-agent", version, about = "Contiv vswitch agent: eBPF datapath, AF_XDP slow path, CNI server")]
struct Cli {
    /// Configuration file (TOML). Without it every default applies (see README).
    #[arg(long, short, env = "CONTIV_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name, overriding the file's `nodeName` (a DaemonSet passes the
    /// Kubernetes node name, which may differ from the host name).
    #[arg(long, env = "CONTIV_NODE_NAME")]
    node_name: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration, print it, and exit.
    CheckConfig,
    /// Mount bpffs on /sys/fs/bpf unless it is mounted, and exit (the DaemonSet's
    /// privileged init container, so the agent itself needs no privileged mode).
    MountBpffs,
    /// Print VPP's startup.conf rendered from the `[vpp]` section (for `uplink = "vpp"`):
    /// the NIC for DPDK, CPUs, the plugins in use, the API socket.
    RenderStartupConf,
    /// Undo what agents left on this node after contiv is removed: unpin everything under
    /// `bpfPinDir` (the links go, so the pod, uplink and socket programs detach) and
    /// delete the overlay device and the slow-path port. Pods' own interfaces go with them.
    Cleanup,
}

/// `contiv-agent cleanup`: see [`Command::Cleanup`]. Whatever is already gone is fine.
fn cleanup(config: &AgentConfig) -> ExitCode {
    let mut failed = false;
    match std::fs::remove_dir_all(&config.bpf_pin_dir) {
        Ok(()) => println!("removed the pins under {}", config.bpf_pin_dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            eprintln!("contiv-agent: removing {}: {e}", config.bpf_pin_dir.display());
            failed = true;
        }
    }
    let devices = [config.overlay.ifname.clone(), config.slowpath_host_ifname.clone()];
    let deleted = tokio::runtime::Builder::new_current_thread().enable_all().build().map(|rt| {
        rt.block_on(async {
            let node = contiv_agent::podnet::node_handle()?;
            let mut gone = vec![];
            for name in &devices {
                if contiv_agent::podnet::link_by_name(&node, name).await?.is_some() {
                    contiv_agent::podnet::delete_link(&node, name).await?;
                    gone.push(name.clone());
                }
            }
            Ok::<_, contiv_agent::podnet::PodNetError>(gone)
        })
    });
    match deleted {
        Ok(Ok(gone)) => gone.iter().for_each(|d| println!("deleted {d}")),
        Ok(Err(e)) => {
            eprintln!("contiv-agent: deleting {devices:?}: {e}");
            failed = true;
        }
        Err(e) => {
            eprintln!("contiv-agent: starting the runtime: {e}");
            failed = true;
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    if let Some(Command::MountBpffs) = cli.command {
        return match contiv_agent::datapath::mount_bpffs() {
            Ok(()) => {
                println!("bpffs is mounted on /sys/fs/bpf");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("contiv-agent: mounting bpffs on /sys/fs/bpf: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match &cli.config {
        Some(path) => AgentConfig::from_file(path),
        None => Ok(AgentConfig::defaults()),
    };
    let config = match config {
        Ok(c) => match &cli.node_name {
            Some(n) if n.is_empty() => {
                eprintln!("contiv-agent: bad configuration: --node-name must not be empty");
                return ExitCode::from(EX_CONFIG);
            }
            Some(n) => AgentConfig { node_name: n.clone(), ..c },
            None => c,
        },
        Err(e) => {
            eprintln!("contiv-agent: bad configuration: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    match cli.command {
        Some(Command::CheckConfig) => {
            println!("{config:#?}");
            return ExitCode::SUCCESS;
        }
        Some(Command::RenderStartupConf) => {
            if config.uplink != Uplink::Vpp {
                eprintln!("contiv-agent: note: uplink is {:?}, not \"vpp\"; rendering anyway", config.uplink.as_str());
            }
            return match contiv_vpp_backend::render_startup_conf(&config.vpp) {
                Ok(conf) => {
                    print!("{conf}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("contiv-agent: bad configuration: {e}");
                    ExitCode::from(EX_CONFIG)
                }
            };
        }
        Some(Command::Cleanup) => return cleanup(&config),
        Some(Command::Run | Command::MountBpffs) | None => {}
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("contiv-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("contiv-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); `log` records of the agent's
/// libraries are bridged in. `contiv_agent::timing=debug` adds one line per CNI ADD with the
/// wall time of each phase (see the README, "Where ADD time goes").
fn init_logging() {
    use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false);
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(contiv_agent::timing::PhaseTimings).try_init();
}

/// What the agent starts from: VPP's bootstrap (VPP mode), then the join to the cluster
/// store (this node's pod subnet), its registrations and the model's list, begun.
async fn join(
    config: AgentConfig,
    metrics: &AgentMetrics,
) -> anyhow::Result<(AgentConfig, cluster::ClusterLink, cluster::Listing, Vec<contiv_node_registry::NodeRegistration>)>
{
    // VPP mode: on a single-NIC node contiv-stn took the host's network, and only VPP gives
    // it back (uplink, host interconnect): that must be up before the store can be reached.
    if config.uplink == Uplink::Vpp {
        contiv_agent::vpp::bootstrap(&config.vpp, &config.node_name, contiv_agent::vpp::BOOTSTRAP_WAIT).await?;
    }
    // The store decides this node's pod subnet (node ID -> CIDR) unless the file fixed it.
    let link = cluster::join(&config, metrics.store()).await?;
    let ipv4 = match link.allocation.pod_cidr {
        ipnet::IpNet::V4(net) => net,
        other => anyhow::bail!("allocated pod CIDR {other} is not IPv4"),
    };
    let config = config.with_allocated_subnet(ipv4)?;
    log::info!("node {}: pod subnet {}, gateway {}", config.node_name, config.pod_subnet, config.gateway);
    let registrations = cluster::registrations(&link).await?;
    let listing = cluster::start_listing(&link);
    Ok((config, link, listing, registrations))
}

/// Waits for the CNI server, told to stop, to finish its requests: at most 5 s (a request
/// may be waiting up to 20 s for the agent or the cluster model, and the DaemonSet's grace
/// period is 10 s). Then it is dropped, and its socket removed.
async fn stop_cni(mut cni: tokio::task::JoinHandle<anyhow::Result<()>>, socket: &std::path::Path) {
    if tokio::time::timeout(std::time::Duration::from_secs(5), &mut cni).await.is_err() {
        log::warn!("CNI requests still waiting after 5 s: dropped");
        cni.abort();
        let _ = std::fs::remove_file(socket);
    }
}

async fn run(config: AgentConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let metrics = std::sync::Arc::new(AgentMetrics::new());
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: shutting down"),
            _ = int.recv() => log::info!("SIGINT: shutting down"),
        }
    };
    tokio::pin!(shutdown);
    // CNI from the first moment: until the agent runs, DEL is served from the node's
    // records (pods can be torn down while the store or VPP is away) and the rest waits.
    let socket = config.cni_socket.clone();
    let listener = cni_server::bind(&socket)?;
    let (agent_tx, agent_rx) = tokio::sync::watch::channel(None);
    let starting = std::sync::Arc::new(contiv_agent::starting::Starting::new(config.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut cni_stop = stop_rx.clone();
    let mut cni = tokio::spawn({
        let (starting, metrics, socket) = (starting.clone(), metrics.clone(), socket.clone());
        async move {
            let stop = async move {
                let _ = cni_stop.wait_for(|v| *v).await;
            };
            cni_server::serve(listener, &socket, agent_rx, starting, metrics, stop).await
        }
    });
    // A stop while joining ends here: nothing of the datapath was touched yet.
    let joined = tokio::select! {
        joined = join(config, &metrics) => joined,
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            stop_cni(cni, &socket).await;
            return Ok(());
        }
    };
    let started = match joined {
        Ok((config, link, listing, registrations)) => {
            let status_addr = config.status_addr;
            // The node's records are the agent's from here.
            starting.close().await;
            Agent::start(config, registrations).await.map(|agent| (agent, link, listing, status_addr))
        }
        Err(e) => Err(e),
    };
    let (agent, link, listing, status_addr) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = stop_tx.send(true);
            stop_cni(cni, &socket).await;
            return Err(e);
        }
    };
    agent_tx.send_replace(Some(agent.clone()));
    let mut background = cluster::spawn(&link, listing, agent.clone(), stop_rx.clone());
    // Conntrack expiry (services and policy flows) and notes of closed UDP sockets, every 10 s.
    let sweeper = agent.clone();
    let mut sweep_stop = stop_rx.clone();
    background.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = sweep_stop.wait_for(|v| *v) => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
            }
            sweeper.gc_conntrack().await;
            sweeper.sweep_udp_notes().await;
        }
    }));
    // The node's plan against what the kernel holds: every `resyncSeconds` (repairs what someone else
    // changed: a route flushed with a device bounced, an entry deleted), and soon after an
    // apply that failed somewhere (1 s, doubling to 30 s while it keeps failing).
    let resyncer = agent.clone();
    let mut resync_stop = stop_rx.clone();
    let every = std::time::Duration::from_secs(u64::from(agent.config().resync_seconds));
    background.push(tokio::spawn(async move {
        use std::time::{Duration, Instant};
        let mut next = Instant::now() + every;
        let mut retry = Duration::from_secs(1);
        let mut was_failing = false;
        loop {
            tokio::select! {
                _ = resync_stop.wait_for(|v| *v) => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let failing = resyncer.apply_failed();
            if failing && !was_failing {
                // A new failure (an ADD, a cluster change): try again soon.
                retry = Duration::from_secs(1);
                next = next.min(Instant::now() + retry);
            }
            was_failing = failing;
            if Instant::now() < next {
                continue;
            }
            resyncer.resync().await;
            was_failing = resyncer.apply_failed();
            if was_failing {
                retry = (retry * 2).min(Duration::from_secs(30));
                next = Instant::now() + retry;
            } else {
                retry = Duration::from_secs(1);
                next = Instant::now() + every;
            }
        }
    }));
    let healer = agent.clone();
    let mut heal_stop = stop_rx.clone();
    background.push(tokio::spawn(async move {
        loop {
            let stopped = tokio::select! {
                _ = heal_stop.wait_for(|v| *v) => true,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => false,
            };
            if stopped {
                return;
            }
            healer.heal_slowpath().await;
        }
    }));
    // The datapath event stream's reader (netctl monitor).
    if let Some(task) = agent.spawn_monitor(stop_rx.clone()).await {
        background.push(task);
    }
    // kube-proxy's health server (port 10256), for load balancers; only while this agent
    // is the node's service proxy.
    if agent.config().services.enabled
        && let Some(addr) = agent.config().services.healthz_addr()
    {
        let health = agent.proxy_health().clone();
        let mut stop = stop_rx.clone();
        background.push(tokio::spawn(async move {
            contiv_agent::proxyhealth::serve(health, addr, async move {
                let _ = stop.wait_for(|v| *v).await;
            })
            .await;
        }));
    }
    // DELs contiv-cni recorded while no agent ran, now and every 10 s (one may be recorded
    // while this agent starts, before its socket answers).
    let finisher = agent.clone();
    let mut finish_stop = stop_rx.clone();
    let pending = contiv_cni_api::pending_del::dir_for(&agent.config().cni_socket);
    background.push(tokio::spawn(async move {
        loop {
            finisher.finish_pending_dels(&pending).await;
            tokio::select! {
                _ = finish_stop.wait_for(|v| *v) => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
            }
        }
    }));
    // The network config list install-cni staged goes in place once the agent is ready.
    if let Some(staged) = agent.config().cni_conf_staged.clone() {
        let publisher = agent.clone();
        let mut stop = stop_rx.clone();
        background.push(tokio::spawn(async move {
            loop {
                if publisher.status().is_ok() {
                    match contiv_agent::cniconf::publish(&staged) {
                        Ok(Some(target)) => {
                            log::info!("ready: the network config {} is in place for the runtime", target.display());
                            return;
                        }
                        Ok(None) => return,
                        Err(e) => log::error!("publishing the network config {}: {e}; retrying", staged.display()),
                    }
                }
                tokio::select! {
                    _ = stop.wait_for(|v| *v) => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        }));
    }
    let status_agent = agent.clone();
    let status_metrics = metrics.clone();
    let mut status_stop = stop_rx;
    background.push(tokio::spawn(async move {
        let stop = async move {
            let _ = status_stop.wait_for(|v| *v).await;
        };
        if let Err(e) = status::serve(status_agent, status_metrics, status_addr, stop).await {
            log::error!("{e:#}");
        }
    }));
    // A store that can no longer write (the embedded store after a failed fsync) is only
    // opened again by a restart: the agent exits for the DaemonSet to restart it.
    let store_failed = contiv_store::until_failed(link.store.clone());
    // The node IP the agent started with left the uplink: the agent restarts to take the new
    // one (seen twice, 2 s apart, so an address replaced in one step is not a change).
    let ip_agent = agent.clone();
    let node_ip_lost = async move {
        let mut seen = 0;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            match ip_agent.node_ip_lost().await {
                Some(why) if seen > 0 => return why,
                Some(_) => seen += 1,
                None => seen = 0,
            }
        }
    };
    let mut withdraw = None;
    let served = tokio::select! {
        _ = &mut shutdown => Ok(()),
        served = &mut cni => served.unwrap_or_else(|e| Err(anyhow::anyhow!("the CNI server's task failed: {e}"))),
        why = store_failed => Err(anyhow::anyhow!("the cluster store can no longer write ({why}): exiting to reopen it")),
        why = node_ip_lost => {
            withdraw = agent.node_ip();
            Err(anyhow::anyhow!("{why}: exiting to start again with the new address"))
        }
    };
    let _ = stop_tx.send(true);
    if !cni.is_finished() {
        stop_cni(cni, &socket).await;
    }
    for task in background {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    // The registration under the old address goes now (its keep-alive stopped with the
    // background tasks), or the restarted agent would wait out its lease to register anew.
    // A new connection: the store's was made from the old address and died with it.
    if let Some(old) = withdraw {
        let name = &agent.config().node_name;
        let withdrawn = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let store = contiv_store::open(&agent.config().store_config()).await?;
            let registry = contiv_node_registry::NodeRegistry::new(store, *link.registry.ipam())?;
            registry.withdraw(name, old).await.map_err(anyhow::Error::from)
        })
        .await;
        match withdrawn {
            Ok(Ok(())) => log::info!("withdrew the registration of {name} at {old}"),
            Ok(Err(e)) => log::warn!("withdrawing the registration of {name} at {old}: {e:#}"),
            Err(_) => log::warn!("withdrawing the registration of {name} at {old}: no answer in 5 s"),
        }
    }
    agent.shutdown();
    log::info!("stopped; the pod datapath stays in place");
    served
}
