//! contiv-ksr: see the crate docs. Configuration by flags or environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use contiv_store::{StoreConfig, TlsConfig};

/// Exit code for a bad configuration (sysexits EX_CONFIG).
const EX_CONFIG: u8 = 78;

/// Reflects Kubernetes objects into the contiv store.
#[derive(Debug, Parser)]
#[command(name = "contiv-ksr", version)]
struct Args {
    /// kubeconfig file; without it: in-cluster config, else ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// etcd endpoints, comma separated (e.g. http://127.0.0.1:2379, or https:// with the
    /// --etcd-ca-file settings). Without them the embedded store at --data-dir is used.
    #[arg(long = "etcd", env = "CONTIV_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd: Vec<String>,
    /// CA certificate (PEM) that signed etcd's server certificate; turns on TLS.
    #[arg(long, env = "CONTIV_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, env = "CONTIV_ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert-file.
    #[arg(long, env = "CONTIV_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// Name etcd's server certificate must carry (default: the endpoint's host).
    #[arg(long, env = "CONTIV_ETCD_SERVER_NAME")]
    etcd_server_name: Option<String>,
    /// Directory of the embedded store.
    #[arg(long, env = "CONTIV_STORE_DIR", default_value = "/var/lib/contiv/store")]
    data_dir: PathBuf,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "CONTIV_KSR_HTTP", default_value = "0.0.0.0:9191")]
    http: SocketAddr,
    /// Seconds between marker checks and repairs of failed writes.
    #[arg(long, env = "CONTIV_KSR_REPAIR_SECONDS", default_value_t = 5)]
    repair_seconds: u64,
    /// Seconds between sweeps for departed nodes: a node that is no Kubernetes Node and has
    /// no live agent in two sweeps in a row gives its node ID and pod CIDR back. 0: never.
    #[arg(long, env = "CONTIV_KSR_DEPARTED_NODE_SWEEP_SECONDS", default_value_t = 60)]
    departed_node_sweep_seconds: u64,
    /// Take part in leader election on a Lease: only the leader writes the store, so
    /// several replicas are safe.
    #[arg(long, env = "CONTIV_KSR_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the Lease (the Pod's own; from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "contiv")]
    leader_elect_namespace: String,
    /// Name of the Lease.
    #[arg(long, default_value = contiv_ksr::leader::DEFAULT_LEASE_NAME)]
    leader_elect_name: String,
    /// This replica's identity in the Lease (default: POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    leader_elect_identity: Option<String>,
    /// Seconds a leader's Lease is trusted without renewal.
    #[arg(long, default_value_t = 15)]
    leader_elect_lease_seconds: u64,
    /// Seconds a leader keeps writing without a successful renewal (< lease).
    #[arg(long, default_value_t = 10)]
    leader_elect_renew_deadline_seconds: u64,
    /// Seconds between election attempts and renewals (< renew deadline).
    #[arg(long, default_value_t = 2)]
    leader_elect_retry_seconds: u64,
    /// Seconds a leader keeps the Lease while every store operation fails; then it hands
    /// the Lease to a replica that reaches the store.
    #[arg(long, default_value_t = 60)]
    leader_elect_store_deadline_seconds: u64,
}

impl Args {
    fn store_config(&self) -> anyhow::Result<StoreConfig> {
        let mut config = if self.etcd.is_empty() {
            StoreConfig::embedded(&self.data_dir)
        } else {
            StoreConfig::etcd(self.etcd.clone())
        };
        if let Some(tls) = TlsConfig::from_flags(
            self.etcd_ca_file.clone(),
            self.etcd_cert_file.clone(),
            self.etcd_key_file.clone(),
            self.etcd_server_name.clone(),
        )? {
            config = config.with_tls(tls);
        }
        config.validate()?;
        Ok(config)
    }

    fn election(&self) -> anyhow::Result<contiv_ksr::ElectionConfig> {
        let identity = match &self.leader_elect_identity {
            Some(i) => i.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .context("no --leader-elect-identity and no host name")?,
        };
        let mut e = contiv_ksr::ElectionConfig::new(&self.leader_elect_namespace, &self.leader_elect_name, identity);
        e.lease_duration = Duration::from_secs(self.leader_elect_lease_seconds);
        e.renew_deadline = Duration::from_secs(self.leader_elect_renew_deadline_seconds);
        e.retry_period = Duration::from_secs(self.leader_elect_retry_seconds);
        e.store_deadline = Duration::from_secs(self.leader_elect_store_deadline_seconds);
        e.validate().map_err(anyhow::Error::msg)?;
        Ok(e)
    }
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await.context("no in-cluster config and no kubeconfig")?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn run(
    args: Args,
    store_config: StoreConfig,
    election: Option<contiv_ksr::ElectionConfig>,
) -> anyhow::Result<()> {
    let store_metrics = contiv_store::metrics::StoreMetrics::new();
    // The store may come up after KSR (etcd in the same rollout): keep trying.
    let store = loop {
        match contiv_store::open(&store_config).await {
            Ok(s) => break store_metrics.instrument(s),
            Err(e @ (contiv_store::StoreError::Unavailable(_) | contiv_store::StoreError::Etcd(_))) => {
                log::warn!("store not reachable yet ({e}); retrying in 2s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e).context("opening the store"),
        }
    };
    log::info!("store: {}", store.backend());
    let client = kube_client(args.kubeconfig.as_ref()).await?;
    let repair = Duration::from_secs(args.repair_seconds.max(1));
    let departed =
        (args.departed_node_sweep_seconds > 0).then(|| Duration::from_secs(args.departed_node_sweep_seconds));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // A store that can no longer write (the embedded store after a failed fsync) is only
    // opened again by a restart: KSR stops, and exits with an error, to be restarted.
    let store_failed = std::sync::Arc::new(std::sync::OnceLock::new());
    let stop = {
        let (store, failed) = (store.clone(), store_failed.clone());
        async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                why = contiv_store::until_failed(store) => {
                    log::error!("the store can no longer write ({why}): stopping to reopen it");
                    let _ = failed.set(why);
                }
            }
            log::info!("shutting down");
        }
    };
    match election {
        Some(election) => {
            let health = contiv_ksr::Health::elected(store_metrics);
            let addr = contiv_ksr::http::serve_dedicated(args.http, health.clone())
                .with_context(|| format!("binding {}", args.http))?;
            log::info!(
                "serving /healthz /readyz /metrics on {addr}; leader election on lease {}/{} as {}",
                election.namespace,
                election.name,
                election.identity
            );
            contiv_ksr::run_elected(client, store, repair, departed, election, health, stop).await;
        }
        None => {
            let reflector = contiv_ksr::Reflector::start_with(client, store, repair, departed, Default::default());
            let health = contiv_ksr::Health::standalone(reflector.mirror.clone(), store_metrics);
            let addr = contiv_ksr::http::serve_dedicated(args.http, health)
                .with_context(|| format!("binding {}", args.http))?;
            log::info!("serving /healthz /readyz /metrics on {addr}");
            stop.await;
            drop(reflector);
        }
    }
    match store_failed.get() {
        Some(why) => anyhow::bail!("the store can no longer write: {why}"),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let checked =
        args.store_config().and_then(|s| Ok((s, if args.leader_elect { Some(args.election()?) } else { None })));
    let (store_config, election) = match checked {
        Ok(c) => c,
        Err(e) => {
            eprintln!("contiv-ksr: bad configuration: {e:#}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("contiv-ksr: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, store_config, election)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("contiv-ksr: {e:#}");
            ExitCode::FAILURE
        }
    }
}
