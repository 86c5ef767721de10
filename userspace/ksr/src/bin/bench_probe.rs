//! Benchmark probe for `cargo xtask bench ksr` (built with feature `test-support`).
//!
//! `contiv-ksr-bench-probe dump --services N --out FILE`
//!   writes the key and stored value of N Services and N EndpointSlices (4 endpoints each),
//!   one `key<TAB>value` line each: exactly what KSR writes for them, so the baseline
//!   (etcdctl transactions) writes the same bytes.
//! `contiv-ksr-bench-probe sync --etcd URL --services N`
//!   serves the same objects from the fake API server, starts the reflector into etcd with
//!   its HTTP endpoints, and prints one JSON line once it is ready:
//!   `{"sync_ms", "keys", "http_polls", "http_max_ms", "http_failures", "ready_polls"}` —
//!   while it syncs, a client polls `/readyz` and `/metrics` every 20 ms (each answer must
//!   come within 1 s).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use contiv_cluster_model::keys;
use contiv_ksr::testing::FakeApiServer;
use serde_json::{Value, json};

fn service(i: usize) -> Value {
    json!({"kind": "Service",
           "metadata": {"name": format!("svc-{i:05}"), "namespace": format!("ns-{:03}", i % 100), "uid": format!("uid-svc-{i}")},
           "spec": {"type": "ClusterIP", "clusterIP": format!("10.96.{}.{}", i >> 8 & 255, i & 255),
                    "clusterIPs": [format!("10.96.{}.{}", i >> 8 & 255, i & 255)],
                    "selector": {"app": format!("app-{i}")},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                              {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}],
                    "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"}})
}

fn slice(i: usize) -> Value {
    let endpoints: Vec<Value> = (0..4)
        .map(|e| {
            let n = i * 4 + e;
            json!({"addresses": [format!("10.{}.{}.{}", 1 + (n >> 16 & 127), n >> 8 & 255, n & 255)],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": format!("node-{}", n % 50)})
        })
        .collect();
    json!({"kind": "EndpointSlice",
           "metadata": {"name": format!("svc-{i:05}-x7k2p"), "namespace": format!("ns-{:03}", i % 100),
                        "labels": {"kubernetes.io/service-name": format!("svc-{i:05}")}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "metrics", "port": 9090, "protocol": "TCP"}]})
}

fn objects(n: usize) -> impl Iterator<Item = Value> {
    (0..n).flat_map(|i| [service(i), slice(i)])
}

fn stored(obj: &Value) -> anyhow::Result<(String, Vec<u8>)> {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    Ok(match obj["kind"].as_str() {
        Some("Service") => contiv_ksr::reflect::stored(&serde_json::from_value::<Service>(obj.clone())?)?,
        Some("EndpointSlice") => contiv_ksr::reflect::stored(&serde_json::from_value::<EndpointSlice>(obj.clone())?)?,
        other => bail!("unexpected kind {other:?}"),
    })
}

struct Args {
    mode: String,
    etcd: Option<String>,
    services: usize,
    out: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().context("usage: contiv-ksr-bench-probe dump|sync ...")?;
    let mut args = Args { mode, etcd: None, services: 10_000, out: None };
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--etcd" => args.etcd = Some(value),
            "--services" => args.services = value.parse()?,
            "--out" => args.out = Some(value),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn dump(args: &Args) -> anyhow::Result<()> {
    let path = args.out.as_ref().context("--out FILE")?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for obj in objects(args.services) {
        let (key, value) = stored(&obj)?;
        ensure!(!value.contains(&b'\n') && !key.contains('\t'), "unexpected separator in {key}");
        out.write_all(key.as_bytes())?;
        out.write_all(b"\t")?;
        out.write_all(&value)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// One HTTP/1.0 GET (blocking, 1 s timeouts); the status code, or an error.
fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<u16> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: probe\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status line")
}

/// What the poller saw.
#[derive(Default)]
struct Polls {
    answers: u64,
    failures: u64,
    not_ready: u64,
    max: Duration,
}

/// Polls /readyz and /metrics every 20 ms from a thread of its own (so its timings are the
/// server's, not this process's scheduler's) until `done` is set.
fn poll(addr: std::net::SocketAddr, done: &std::sync::atomic::AtomicBool) -> Polls {
    let mut p = Polls::default();
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        for path in ["/readyz", "/metrics"] {
            let t = Instant::now();
            match get(addr, path) {
                Ok(code) if code == 200 || (path == "/readyz" && code == 503) => {
                    p.answers += 1;
                    p.not_ready += u64::from(code == 503);
                }
                _ => p.failures += 1,
            }
            let took = t.elapsed();
            p.max = p.max.max(took);
            if took > Duration::from_secs(1) {
                p.failures += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

async fn sync(args: &Args) -> anyhow::Result<()> {
    let endpoint = args.etcd.clone().context("--etcd URL")?;
    let api = FakeApiServer::start().await?;
    for obj in objects(args.services) {
        api.apply(obj);
    }
    let store_metrics = contiv_store::metrics::StoreMetrics::new();
    let store = store_metrics.instrument(contiv_store::open(&contiv_store::StoreConfig::etcd([endpoint])).await?);
    let start = Instant::now();
    let reflector = contiv_ksr::Reflector::start(api.client(), store.clone(), Duration::from_secs(5));
    let health = contiv_ksr::Health::standalone(reflector.mirror.clone(), store_metrics);
    let addr = contiv_ksr::http::serve_dedicated("127.0.0.1:0".parse()?, health.clone())?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let done = done.clone();
        std::thread::spawn(move || poll(addr, &done))
    };
    let deadline = start + Duration::from_secs(600);
    while !reflector.mirror.ready_now() {
        ensure!(Instant::now() < deadline, "no sync within 10 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sync = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let polls = poller.join().map_err(|_| anyhow::anyhow!("poller panicked"))?;
    let keys = store.list(keys::K8S_PREFIX).await?.kvs.len();
    println!(
        "{}",
        json!({"sync_ms": sync.as_secs_f64() * 1000.0, "keys": keys, "http_polls": polls.answers,
               "http_max_ms": polls.max.as_secs_f64() * 1000.0, "http_failures": polls.failures,
               "not_ready_answers": polls.not_ready})
    );
    drop(reflector);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    match args.mode.as_str() {
        "dump" => dump(&args),
        "sync" => tokio::runtime::Runtime::new()?.block_on(sync(&args)),
        other => bail!("unknown mode {other}"),
    }
}
