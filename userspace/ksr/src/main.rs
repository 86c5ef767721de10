//! contiv-ksr: see the crate docs. Configuration by flags or environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use contiv_store::StoreConfig;

/// Reflects Kubernetes objects into the contiv store.
#[derive(Debug, Parser)]
#[command(name = "contiv-ksr", version)]
struct Args {
    /// kubeconfig file; without it: in-cluster config, else ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// etcd endpoints, comma separated (e.g. http://127.0.0.1:2379). Without them the
    /// embedded store at --data-dir is used.
    #[arg(long = "etcd", env = "CONTIV_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Directory of the embedded store.
    #[arg(long, env = "CONTIV_STORE_DIR", default_value = "/var/lib/contiv/store")]
    data_dir: PathBuf,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "CONTIV_KSR_HTTP", default_value = "0.0.0.0:9191")]
    http: SocketAddr,
    /// Seconds between marker checks and repairs of failed writes.
    #[arg(long, env = "CONTIV_KSR_REPAIR_SECONDS", default_value_t = 5)]
    repair_seconds: u64,
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

async fn run(args: Args) -> anyhow::Result<()> {
    let store_config =
        if args.etcd.is_empty() { StoreConfig::embedded(&args.data_dir) } else { StoreConfig::etcd(args.etcd.clone()) };
    // The store may come up after KSR (etcd in the same rollout): keep trying.
    let store = loop {
        match contiv_store::open(&store_config).await {
            Ok(s) => break s,
            Err(e @ (contiv_store::StoreError::Unavailable(_) | contiv_store::StoreError::Etcd(_))) => {
                log::warn!("store not reachable yet ({e}); retrying in 2s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e).context("opening the store"),
        }
    };
    log::info!("store: {}", store.backend());
    let client = kube_client(args.kubeconfig.as_ref()).await?;
    let reflector = contiv_ksr::Reflector::start(client, store, Duration::from_secs(args.repair_seconds.max(1)));
    let (addr, _http) = contiv_ksr::http::serve(args.http, reflector.mirror.clone())
        .await
        .with_context(|| format!("binding {}", args.http))?;
    log::info!("serving /healthz /readyz /metrics on {addr}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    log::info!("shutting down");
    drop(reflector);
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("contiv-ksr: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("contiv-ksr: {e:#}");
            ExitCode::FAILURE
        }
    }
}
