//! Benchmark probe for `cargo xtask bench store`.
//!
//! `contiv-store-bench-probe load (--etcd URL | --embedded DIR) --services N --endpoints M`
//!   writes N services and N EndpointSlices (M endpoints each) in the contiv model format.
//! `contiv-store-bench-probe watch (--etcd URL | --embedded DIR) --expect K`
//!   starts a ClusterWatch, and once its model holds K objects prints one JSON line
//!   `{"ready_ms":..,"objects":..}` and waits for stdin to close (so the caller can read this
//!   process's peak RSS from /proc/<pid>/status), then exits.
//! `contiv-store-bench-probe list (--etcd URL | --embedded DIR) --expect K`
//!   reads every key under the cluster-model prefix once (one `Store::list`, nothing decoded),
//!   checks there are K, prints `{"objects":..}` and exits: the plain read of the same data
//!   from the same store that `watch` is compared with.

use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use contiv_cluster_model::{
    AddressType, ClusterObject, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, PortRef, Protocol, Service,
    ServicePort, ServiceType, SessionAffinity, TrafficPolicy,
};
use contiv_cluster_watch::{ClusterEvent, ClusterModel, ClusterWatch};
use contiv_store::{Store, StoreConfig, Txn, TxnOp};

struct Args {
    mode: String,
    config: StoreConfig,
    services: usize,
    endpoints: usize,
    expect: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().context("usage: probe load|watch (--etcd URL | --embedded DIR) ...")?;
    let mut args = Args { mode, config: StoreConfig::default(), services: 10_000, endpoints: 4, expect: 0 };
    let mut have_store = false;
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--etcd" => {
                args.config = StoreConfig::etcd([value]);
                have_store = true;
            }
            "--embedded" => {
                args.config = StoreConfig::embedded(value);
                have_store = true;
            }
            "--services" => args.services = value.parse()?,
            "--endpoints" => args.endpoints = value.parse()?,
            "--expect" => args.expect = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    if !have_store {
        bail!("--etcd URL or --embedded DIR is required");
    }
    Ok(args)
}

fn ip(base: [u8; 2], i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(base[0], base[1], (i >> 8) as u8, i as u8))
}

/// A service the size of a typical one: two named ports, one cluster IP.
fn service(i: usize) -> ClusterObject {
    ClusterObject::Service(Service {
        name: format!("svc-{i:05}"),
        namespace: format!("ns-{:03}", i % 100),
        service_type: ServiceType::ClusterIP,
        cluster_ips: vec![ip([10, 96], i)],
        headless: false,
        ports: vec![
            ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: PortRef::Number(8080),
                node_port: None,
            },
            ServicePort {
                name: "metrics".into(),
                protocol: Protocol::Tcp,
                port: 9090,
                target_port: PortRef::Name("metrics".into()),
                node_port: None,
            },
        ],
        external_ips: vec![],
        load_balancer_ips: vec![],
        session_affinity: SessionAffinity::None,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
        service_proxy_name: None,
        headless_label: false,
        load_balancer_source_ranges: vec![],
    })
}

fn slice(i: usize, endpoints: usize) -> ClusterObject {
    ClusterObject::EndpointSlice(EndpointSlice {
        name: format!("svc-{i:05}-abcde"),
        namespace: format!("ns-{:03}", i % 100),
        service_name: Some(format!("svc-{i:05}")),
        address_type: AddressType::IPv4,
        endpoints: (0..endpoints)
            .map(|e| Endpoint {
                addresses: vec![ip([10, 1], (i * endpoints + e) % 65_536)],
                conditions: EndpointConditions { ready: true, serving: true, terminating: false },
                node_name: Some(format!("node-{}", e % 8)),
                zone: None,
                hints_for_zones: vec![],
                hints_for_nodes: vec![],
            })
            .collect(),
        ports: vec![
            EndpointPort { name: "http".into(), protocol: Protocol::Tcp, port: Some(8080) },
            EndpointPort { name: "metrics".into(), protocol: Protocol::Tcp, port: Some(9090) },
        ],
        last_change_trigger_time: None,
    })
}

async fn load(store: Arc<dyn Store>, services: usize, endpoints: usize) -> anyhow::Result<()> {
    // etcd allows 128 operations per transaction by default.
    let mut ops = Vec::with_capacity(100);
    for i in 0..services {
        for obj in [service(i), slice(i, endpoints)] {
            ops.push(TxnOp::Put { key: obj.key(), value: obj.encode(), lease: None });
        }
        if ops.len() >= 100 || i + 1 == services {
            let success = std::mem::take(&mut ops);
            store.txn(Txn { compares: vec![], success, failure: vec![] }).await?;
        }
    }
    Ok(())
}

async fn watch(store: Arc<dyn Store>, expect: usize, start: Instant) -> anyhow::Result<()> {
    let cw = ClusterWatch::new(store);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<usize>();
    let mut done_tx = Some(done_tx);
    let mut consumer = move |model: &ClusterModel, _event: &ClusterEvent| {
        if model.len() >= expect
            && let Some(tx) = done_tx.take()
        {
            let _ = tx.send(model.len());
        }
    };
    let objects = tokio::select! {
        () = cw.run(&mut consumer, std::future::pending()) => bail!("watch ended"),
        n = done_rx => n?,
    };
    let ready_ms = start.elapsed().as_secs_f64() * 1000.0;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::json!({"ready_ms": ready_ms, "objects": objects}))?;
    out.flush()?;
    drop(out);
    // Keep the model alive while the caller reads our peak RSS; exit when stdin closes.
    let model = cw.model();
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin().lock().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            line.clear();
        }
    })
    .await?;
    drop(model);
    Ok(())
}

async fn list(store: Arc<dyn Store>, expect: usize) -> anyhow::Result<()> {
    let listed = store.list(contiv_cluster_model::keys::K8S_PREFIX).await?;
    let objects = listed.kvs.len();
    if objects < expect {
        bail!("listed {objects} keys, expected {expect}");
    }
    println!("{}", serde_json::json!({"objects": objects}));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let store = contiv_store::open(&args.config).await.context("opening the store")?;
        match args.mode.as_str() {
            "load" => load(store, args.services, args.endpoints).await,
            "watch" => watch(store, args.expect, start).await,
            "list" => list(store, args.expect).await,
            other => bail!("unknown mode {other}"),
        }
    })
}
