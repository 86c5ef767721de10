//! contiv-ksr against a fake Kubernetes API server serving real list/watch JSON
//! (contiv_ksr::testing), writing into the embedded store (and once into a real etcd).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use contiv_cluster_model::keys::{self, Kind};
use contiv_cluster_model::{ToModel, encode};
use contiv_ksr::Reflector;
use contiv_ksr::testing::FakeApiServer;
use contiv_store::Store;
use k8s_openapi::api::core::v1 as core;
use serde_json::{Value, json};

// === fixtures ===

fn namespace(name: &str, labels: Value) -> Value {
    json!({"kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, ip: &str, app: &str) -> Value {
    json!({"kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": app}, "uid": format!("uid-{name}")},
           "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "img",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn fixtures() -> Vec<Value> {
    vec![
        namespace("default", json!({"kubernetes.io/metadata.name": "default"})),
        namespace("shop", json!({"env": "prod"})),
        json!({"kind": "Node", "metadata": {"name": "node-a"},
               "spec": {"podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24"]},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"},
                                        {"type": "Hostname", "address": "node-a"}]}}),
        pod("shop", "web-0", "10.1.0.5", "web"),
        pod("shop", "web-1", "10.1.0.6", "web"),
        json!({"kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                        "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080, "protocol": "TCP"}],
                        "sessionAffinity": "None", "externalTrafficPolicy": "Cluster", "internalTrafficPolicy": "Cluster"}}),
        json!({"kind": "EndpointSlice", "metadata": {"name": "web-x1", "namespace": "shop",
                                                     "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true}, "nodeName": "node-a"},
                             {"addresses": ["10.1.0.6"], "conditions": {"ready": false, "terminating": true}, "nodeName": "node-a"}],
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
        json!({"kind": "NetworkPolicy", "metadata": {"name": "web-in", "namespace": "shop"},
               "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}],
                                     "ports": [{"port": "http"}]}]}}),
    ]
}

/// The key and value KSR must store for a fixture object.
fn expected(obj: &Value) -> (String, Vec<u8>) {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    fn kv<K: ToModel + serde::de::DeserializeOwned>(v: &Value) -> (String, Vec<u8>) {
        let m = serde_json::from_value::<K>(v.clone()).expect("fixture parses").to_model().expect("fixture converts");
        (contiv_cluster_model::ModelObject::key(&m), encode(&m))
    }
    match obj["kind"].as_str().expect("kind") {
        "Namespace" => kv::<core::Namespace>(obj),
        "Node" => kv::<core::Node>(obj),
        "Pod" => kv::<core::Pod>(obj),
        "Service" => kv::<core::Service>(obj),
        "EndpointSlice" => kv::<EndpointSlice>(obj),
        "NetworkPolicy" => kv::<NetworkPolicy>(obj),
        other => panic!("no fixture kind {other}"),
    }
}

// === harness ===

struct Env {
    api: FakeApiServer,
    store: Arc<dyn Store>,
    ksr: Reflector,
    _dir: tempfile::TempDir,
}

async fn start_with(objects: &[Value], seed: &[(&str, &[u8])]) -> Env {
    let _ = env_logger::builder().is_test(true).try_init();
    let api = FakeApiServer::start().await.expect("fake apiserver");
    for o in objects {
        api.apply(o.clone());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = contiv_store::open(&contiv_store::StoreConfig::embedded(dir.path())).await.expect("embedded store");
    for (k, v) in seed {
        store.put(k, v.to_vec(), None).await.expect("seed");
    }
    let ksr = Reflector::start(api.client(), store.clone(), Duration::from_millis(200));
    Env { api, store, ksr, _dir: dir }
}

async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn k8s_content(store: &Arc<dyn Store>) -> BTreeMap<String, Vec<u8>> {
    store.list(keys::K8S_PREFIX).await.expect("list").kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

async fn wait_ready(env: &Env) {
    let m = env.ksr.mirror.clone();
    wait_for("ksr ready", || {
        let m = m.clone();
        async move { m.ready().await }
    })
    .await;
}

async fn wait_content(env: &Env, what: &str, pred: impl Fn(&BTreeMap<String, Vec<u8>>) -> bool) {
    let store = env.store.clone();
    let pred = &pred;
    wait_for(what, || {
        let store = store.clone();
        async move { pred(&k8s_content(&store).await) }
    })
    .await;
}

// === tests ===

#[tokio::test]
async fn fake_apiserver_fixture_objects_map_to_expected_keys_and_values() {
    let objects = fixtures();
    let stale_key = "/contiv/k8s/pod/shop/gone-pod";
    let stale_policy = "/contiv/k8s/networkpolicy/old/deny";
    let (ns_key, ns_value) = expected(&objects[1]);
    let env = start_with(&objects, &[(stale_key, b"{\"v\":1}"), (stale_policy, b"x"), (&ns_key, &ns_value)]).await;
    let ns_rev_before = env.store.get(&ns_key).await.unwrap().unwrap().mod_revision;
    wait_ready(&env).await;

    let want: BTreeMap<String, Vec<u8>> = objects.iter().map(expected).collect();
    let got = k8s_content(&env.store).await;
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    assert_eq!(got, want, "stored values differ from the model conversion");
    for key in [
        "/contiv/k8s/namespace/default",
        "/contiv/k8s/namespace/shop",
        "/contiv/k8s/node/node-a",
        "/contiv/k8s/pod/shop/web-0",
        "/contiv/k8s/pod/shop/web-1",
        "/contiv/k8s/service/shop/web",
        "/contiv/k8s/endpointslice/shop/web-x1",
        "/contiv/k8s/networkpolicy/shop/web-in",
    ] {
        assert!(got.contains_key(key), "missing {key}");
    }
    // Keys of objects the API does not have were deleted.
    assert!(env.store.get(stale_key).await.unwrap().is_none());
    assert!(env.store.get(stale_policy).await.unwrap().is_none());
    // A key that already held the right value was not rewritten.
    assert_eq!(env.store.get(&ns_key).await.unwrap().unwrap().mod_revision, ns_rev_before);
    assert!(env.ksr.mirror.counters.unchanged.load(Ordering::Relaxed) >= 1);
    // The marker says a full sync happened.
    assert!(env.store.get(keys::KSR_MARKER).await.unwrap().is_some());
    let status = env.ksr.mirror.status().await;
    let pods = status.iter().find(|s| s.kind == Kind::Pod).unwrap();
    assert_eq!(pods.objects, 2);
}

#[tokio::test]
async fn fake_apiserver_watch_events_add_update_delete() {
    let env = start_with(&fixtures(), &[]).await;
    wait_ready(&env).await;
    let svc_key = "/contiv/k8s/service/shop/web";
    let svc_rev = env.store.get(svc_key).await.unwrap().unwrap().mod_revision;

    // Update: web-0 moves to another app label; add web-2; delete the policy.
    env.api.apply(pod("shop", "web-0", "10.1.0.5", "api"));
    let new_pod = pod("shop", "web-2", "10.1.0.7", "web");
    env.api.apply(new_pod.clone());
    assert!(env.api.delete("NetworkPolicy", "shop", "web-in"));
    // Re-applying an unchanged service produces a MODIFIED event with the same model.
    let svc = fixtures().into_iter().find(|o| o["kind"] == "Service").unwrap();
    env.api.apply(svc);

    let (k0, v0) = expected(&pod("shop", "web-0", "10.1.0.5", "api"));
    let (k2, v2) = expected(&new_pod);
    wait_content(&env, "watch events applied", |c| {
        c.get(&k0) == Some(&v0) && c.get(&k2) == Some(&v2) && !c.contains_key("/contiv/k8s/networkpolicy/shop/web-in")
    })
    .await;
    // The unchanged service was not rewritten.
    assert_eq!(env.store.get(svc_key).await.unwrap().unwrap().mod_revision, svc_rev);
    // Watches, not relists, delivered this.
    assert_eq!(env.api.list_count("Pod"), 1);
}

#[tokio::test]
async fn fake_apiserver_broken_watch_resumes_from_resource_version() {
    let env = start_with(&fixtures(), &[]).await;
    wait_ready(&env).await;
    let watches_before = env.api.watch_count("Pod");
    env.api.break_watches();
    // Changes while the watch is broken are delivered by the resumed watch.
    let p = pod("shop", "web-9", "10.1.0.99", "web");
    env.api.apply(p.clone());
    assert!(env.api.delete("Pod", "shop", "web-1"));
    let (k, v) = expected(&p);
    wait_content(&env, "changes made during the break", |c| {
        c.get(&k) == Some(&v) && !c.contains_key("/contiv/k8s/pod/shop/web-1")
    })
    .await;
    assert!(env.api.watch_count("Pod") > watches_before, "the watch was re-established");
    assert_eq!(env.api.list_count("Pod"), 1, "resuming from the resourceVersion needs no relist");
    assert_eq!(env.ksr.mirror.counters.watch_errors.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn fake_apiserver_410_gone_forces_relist_and_deletes_missing_objects() {
    let env = start_with(&fixtures(), &[]).await;
    wait_ready(&env).await;
    assert_eq!(env.api.list_count("Pod"), 1);
    // A deletion whose event is lost, and an addition, then history expires and the watch
    // breaks: the re-watch gets 410 Gone, the relist must converge the store.
    assert!(env.api.delete_silently("Pod", "shop", "web-1"));
    assert!(env.api.delete_silently("Service", "shop", "web"));
    env.api.expire_history();
    // Break first: an event delivered on the old stream would move the client's
    // resourceVersion past the expiry and the re-watch would (rightly) not get 410.
    env.api.break_watches();
    let p = pod("shop", "web-3", "10.1.0.33", "web");
    env.api.apply(p.clone());
    let (k, v) = expected(&p);
    wait_content(&env, "relist after 410", |c| {
        c.get(&k) == Some(&v)
            && !c.contains_key("/contiv/k8s/pod/shop/web-1")
            && !c.contains_key("/contiv/k8s/service/shop/web")
    })
    .await;
    assert!(env.api.list_count("Pod") >= 2, "410 Gone must force a relist");
    assert!(env.ksr.mirror.counters.watch_errors.load(Ordering::Relaxed) >= 1);
    assert!(env.store.get("/contiv/k8s/pod/shop/web-0").await.unwrap().is_some(), "survivors stay");
}

#[tokio::test]
async fn fake_apiserver_store_data_loss_is_detected_by_marker_and_resynced() {
    let objects = fixtures();
    let env = start_with(&objects, &[]).await;
    wait_ready(&env).await;
    let want: BTreeMap<String, Vec<u8>> = objects.iter().map(expected).collect();
    // The store loses everything (e.g. etcd came back with an empty data dir).
    env.store.delete_prefix(keys::ROOT).await.unwrap();
    wait_content(&env, "resync after data loss", |c| *c == want).await;
    let m = env.ksr.mirror.clone();
    wait_for("marker rewritten", || {
        let s = env.store.clone();
        async move { s.get(keys::KSR_MARKER).await.unwrap().is_some() }
    })
    .await;
    assert_eq!(m.counters.marker_resyncs.load(Ordering::Relaxed), 1);
    assert_eq!(env.api.list_count("Pod"), 1, "resync uses KSR's own state, no relist");
}

/// After the store lost its data, KSR's next write (a watch event) does not bring the marker
/// back with it: agents would take a store holding that one object for a complete one and
/// drop every policy and service it lacks. The marker comes back with the full resync.
#[tokio::test]
async fn fake_apiserver_a_write_after_data_loss_does_not_bring_the_marker_back_early() {
    let objects = fixtures();
    let env = start_with(&objects, &[]).await;
    wait_ready(&env).await;
    let late = pod("shop", "web-2", "10.1.0.7", "web");
    let mut want: BTreeMap<String, Vec<u8>> = objects.iter().map(expected).collect();
    want.extend([expected(&late)]);
    env.store.delete_prefix(keys::ROOT).await.unwrap();
    env.api.apply(late);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let marker = env.store.get(keys::KSR_MARKER).await.unwrap().is_some();
        let content = k8s_content(&env.store).await;
        if marker {
            assert_eq!(content, want, "the marker is back while the store is not whole");
            break;
        }
        assert!(Instant::now() < deadline, "no resync after the data loss");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(env.ksr.mirror.counters.marker_resyncs.load(Ordering::Relaxed), 1);
}

/// A marker someone else rewrote is no loss: KSR's write that finds it moved goes without
/// it, and the next repair moves the marker past that write (no resync).
#[tokio::test]
async fn fake_apiserver_a_marker_moved_by_someone_else_is_caught_up_without_a_resync() {
    let objects = fixtures();
    let env = start_with(&objects, &[]).await;
    wait_ready(&env).await;
    env.store.put(keys::KSR_MARKER, b"{}".to_vec(), None).await.unwrap();
    let late = pod("shop", "web-2", "10.1.0.7", "web");
    let (key, value) = expected(&late);
    env.api.apply(late);
    wait_content(&env, "the new pod", |c| c.get(&key) == Some(&value)).await;
    let store = env.store.clone();
    let key = &key;
    wait_for("the marker rewritten past the pod's write", || {
        let store = store.clone();
        async move {
            let marker = store.get(keys::KSR_MARKER).await.unwrap().unwrap();
            let pod = store.get(key).await.unwrap().unwrap();
            marker.value != b"{}" && marker.mod_revision > pod.mod_revision
        }
    })
    .await;
    assert_eq!(env.ksr.mirror.counters.marker_resyncs.load(Ordering::Relaxed), 0);
}

/// A kind whose list and watch keep failing (a ClusterRole edited to drop it) makes KSR not
/// ready, naming the kind, instead of staying green with the kind frozen in the store; KSR
/// is ready again once the kind is followed again.
#[tokio::test]
async fn fake_apiserver_a_kind_that_keeps_failing_makes_ksr_not_ready() {
    use contiv_ksr::testing::Grant;
    let env = start_with(&fixtures(), &[]).await;
    wait_ready(&env).await;
    let m = env.ksr.mirror.clone();
    m.set_watch_stall(Duration::from_millis(300), Duration::from_millis(1500));
    let grants = |skip: &str| -> Vec<Grant> {
        contiv_ksr::reflect::watched_kinds()
            .into_iter()
            .filter(|w| w.resource != skip)
            .map(|w| Grant {
                namespace: None,
                rule: k8s_openapi::api::rbac::v1::PolicyRule {
                    api_groups: Some(vec![w.group]),
                    resources: Some(vec![w.resource]),
                    verbs: ["get", "list", "watch"].map(String::from).to_vec(),
                    ..Default::default()
                },
            })
            .collect()
    };
    env.api.authorize(grants("endpointslices"));
    env.api.break_watches();
    let not_ready = |want: bool| {
        let m = m.clone();
        move || {
            let m = m.clone();
            async move { m.ready().await != want }
        }
    };
    wait_for("not ready while endpointslices are refused", not_ready(true)).await;
    let why = m.not_ready_because().unwrap();
    assert!(why.contains("endpointslice") && why.contains("failing"), "{why}");
    env.api.authorize(grants(""));
    wait_for("ready again", not_ready(false)).await;
}

#[tokio::test]
async fn fake_apiserver_unconvertible_object_is_skipped() {
    let mut objects = fixtures();
    objects.push(json!({"kind": "Pod", "metadata": {"name": "bad", "namespace": "shop"},
                        "status": {"podIP": "300.1.1.1", "podIPs": [{"ip": "300.1.1.1"}]}}));
    objects.push(json!({"kind": "EndpointSlice", "metadata": {"name": "dns", "namespace": "shop"},
                        "addressType": "FQDN", "endpoints": [{"addresses": ["db.example"]}]}));
    let env = start_with(&objects, &[]).await;
    wait_ready(&env).await;
    let got = k8s_content(&env.store).await;
    assert!(!got.contains_key("/contiv/k8s/pod/shop/bad"));
    assert!(!got.contains_key("/contiv/k8s/endpointslice/shop/dns"));
    assert!(got.contains_key("/contiv/k8s/pod/shop/web-0"));
    assert_eq!(env.ksr.mirror.counters.convert_errors.load(Ordering::Relaxed), 2);
    // An update that breaks a reflected object removes its key rather than keeping stale data.
    env.api.apply(json!({"kind": "Pod", "metadata": {"name": "web-0", "namespace": "shop"},
                         "status": {"podIPs": [{"ip": "garbage"}]}}));
    wait_content(&env, "broken update removes the key", |c| !c.contains_key("/contiv/k8s/pod/shop/web-0")).await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn fake_apiserver_health_and_object_counts_over_http() {
    let api = FakeApiServer::start().await.unwrap();
    for o in fixtures() {
        api.apply(o);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&contiv_store::StoreConfig::embedded(dir.path())).await.unwrap();
    // Before the reflector syncs, /readyz says not ready.
    let mirror = Arc::new(contiv_ksr::Mirror::new(store.clone(), &Kind::ALL));
    let health = contiv_ksr::Health::standalone(mirror, Default::default());
    let (addr, _t) = contiv_ksr::http::serve("127.0.0.1:0".parse().unwrap(), health).await.unwrap();
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    assert_eq!(http_get(addr, "/readyz").await.0, 503);

    let ksr = Reflector::start(api.client(), store, Duration::from_millis(200));
    let health = contiv_ksr::Health::standalone(ksr.mirror.clone(), Default::default());
    let (addr, _t2) = contiv_ksr::http::serve("127.0.0.1:0".parse().unwrap(), health).await.unwrap();
    wait_for("readyz 200", || async move { http_get(addr, "/readyz").await.0 == 200 }).await;
    let (code, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "contiv_ksr_objects{kind=\"pod\"} 2",
        "contiv_ksr_objects{kind=\"namespace\"} 2",
        "contiv_ksr_objects{kind=\"service\"} 1",
        "contiv_ksr_objects{kind=\"endpointslice\"} 1",
        "contiv_ksr_objects{kind=\"networkpolicy\"} 1",
        "contiv_ksr_objects{kind=\"node\"} 1",
        "contiv_ksr_ready 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }
}

/// A real etcd of the test's own (these tests need one).
fn etcd_server() -> contiv_store::testing::EtcdServer {
    contiv_store::testing::EtcdServer::start()
        .unwrap_or_else(|e| panic!("etcd is required for this test (apt-get install etcd-server): {e}"))
}

#[tokio::test]
async fn fake_apiserver_reflects_into_real_etcd() {
    let etcd = etcd_server();
    let api = FakeApiServer::start().await.unwrap();
    let objects = fixtures();
    for o in &objects {
        api.apply(o.clone());
    }
    let store = contiv_store::open(&contiv_store::StoreConfig::etcd([etcd.endpoint()])).await.unwrap();
    let ksr = Reflector::start(api.client(), store.clone(), Duration::from_millis(200));
    let m = ksr.mirror.clone();
    wait_for("ksr ready on etcd", || {
        let m = m.clone();
        async move { m.ready().await }
    })
    .await;
    let want: BTreeMap<String, Vec<u8>> = objects.iter().map(expected).collect();
    assert_eq!(k8s_content(&store).await, want);
    assert!(api.delete("Pod", "shop", "web-0"));
    let s = store.clone();
    wait_for("delete reflected in etcd", || {
        let s = s.clone();
        async move { s.get("/contiv/k8s/pod/shop/web-0").await.unwrap().is_none() }
    })
    .await;
}

/// A converge of more than etcd takes in one request (1.5 MiB), while the marker is KSR's
/// (each transaction then also compares and rewrites it): every batch still fits, and the
/// store comes back whole.
#[tokio::test]
async fn fake_apiserver_a_converge_larger_than_one_etcd_request_fits_with_the_marker() {
    let etcd = etcd_server();
    let api = FakeApiServer::start().await.unwrap();
    let mut objects = fixtures();
    // 40 EndpointSlices of 800 endpoints: about 2 MB stored.
    objects.extend((0..40).map(|i| {
        let endpoints: Vec<Value> = (0..800)
            .map(|j| {
                json!({"addresses": [format!("10.{}.{}.{}", 100 + i, j / 250, j % 250 + 1)],
                            "conditions": {"ready": true}, "nodeName": "node-a"})
            })
            .collect();
        json!({"kind": "EndpointSlice", "metadata": {"name": format!("big-{i:02}"), "namespace": "shop",
                                                     "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "endpoints": endpoints,
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    }));
    for o in &objects {
        api.apply(o.clone());
    }
    let store = contiv_store::open(&contiv_store::StoreConfig::etcd([etcd.endpoint()])).await.unwrap();
    let ksr = Reflector::start(api.client(), store.clone(), Duration::from_millis(200));
    let m = ksr.mirror.clone();
    let ready = || {
        let m = m.clone();
        async move { m.ready().await }
    };
    wait_for("ksr ready on etcd", ready).await;
    let want: BTreeMap<String, Vec<u8>> = objects.iter().map(expected).collect();
    let stored: usize = want.values().map(Vec::len).sum();
    assert!(stored > 1_600_000, "{stored} bytes: more than one etcd request");
    // The slices vanish behind KSR's back (the marker stays); a relist converges them back.
    store.delete_prefix(&Kind::EndpointSlice.prefix()).await.unwrap();
    api.expire_history();
    api.break_watches();
    let s = store.clone();
    let want = &want;
    wait_for("the relist's converge", || {
        let s = s.clone();
        async move { k8s_content(&s).await == *want }
    })
    .await;
    assert_eq!(m.counters.marker_resyncs.load(Ordering::Relaxed), 0, "the marker was KSR's throughout");
}

/// Needs a real cluster: `kind create cluster` (or `k3d cluster create`), then
/// `cargo test -p contiv-ksr --test fake_apiserver -- --ignored real_cluster`.
#[tokio::test]
#[ignore = "needs cluster"]
async fn real_cluster_reflects_default_namespace_and_nodes() {
    let client = kube::Client::try_default().await.expect("kubeconfig for a real cluster");
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&contiv_store::StoreConfig::embedded(dir.path())).await.unwrap();
    let ksr = Reflector::start(client, store.clone(), Duration::from_secs(1));
    let m = ksr.mirror.clone();
    wait_for("ksr ready against the cluster", || {
        let m = m.clone();
        async move { m.ready().await }
    })
    .await;
    assert!(store.get("/contiv/k8s/namespace/default").await.unwrap().is_some());
    assert!(!store.list(&Kind::Node.prefix()).await.unwrap().kvs.is_empty());
    assert!(store.get("/contiv/k8s/service/default/kubernetes").await.unwrap().is_some());
}

#[tokio::test]
async fn fake_apiserver_large_lists_are_paged_and_fully_reflected() {
    let objects: Vec<Value> = (0..1200)
        .map(|i| pod("default", &format!("p{i:04}"), &format!("10.1.{}.{}", i / 250, i % 250 + 1), "x"))
        .collect();
    let env = start_with(&objects, &[]).await;
    wait_ready(&env).await;
    let pods = env.store.list(&Kind::Pod.prefix()).await.unwrap().kvs.len();
    assert_eq!(pods, 1200);
    // kube's watcher lists 500 at a time: three pages for 1200 pods.
    assert!(env.api.list_count("Pod") >= 3, "lists served: {}", env.api.list_count("Pod"));
}

#[tokio::test]
async fn fake_apiserver_departed_nodes_give_their_ids_back() {
    use contiv_node_registry::{IpamConfig, NodeRegistry};
    let _ = env_logger::builder().is_test(true).try_init();
    let api = FakeApiServer::start().await.expect("fake apiserver");
    for o in fixtures() {
        api.apply(o);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = contiv_store::open(&contiv_store::StoreConfig::embedded(dir.path())).await.expect("embedded store");
    // node-a is a Kubernetes Node whose agent is down; node-b has a live agent and no Node
    // object; node-gone is neither.
    let registry = NodeRegistry::new(store.clone(), IpamConfig::default()).expect("registry");
    for name in ["node-a", "node-gone", "node-b"] {
        registry.allocate(name).await.expect("allocate");
    }
    let _b = registry.register("node-b", vec![]).await.expect("register");
    let allocated = |store: Arc<dyn Store>| async move {
        store.list(keys::IPAM_NODES_PREFIX).await.expect("list").kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>()
    };
    let ksr = Reflector::start_with(
        api.client(),
        store.clone(),
        Duration::from_millis(200),
        Some(Duration::from_millis(200)),
        Default::default(),
    );
    wait_for("node-gone released", || {
        let store = store.clone();
        async move { !allocated(store).await.contains(&keys::ipam_node("node-gone")) }
    })
    .await;
    let ids = store.list(keys::NODE_IDS_PREFIX).await.expect("ids").kvs;
    assert_eq!(ids.len(), 2, "node-gone's id claim went with it");
    // A few more sweeps: the member and the live node keep theirs.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(allocated(store.clone()).await, [keys::ipam_node("node-a"), keys::ipam_node("node-b")]);
    assert_eq!(ksr.mirror.counters.departed_nodes_released.load(Ordering::Relaxed), 1);

    // The Node object is deleted (the machine was removed): its allocation goes too.
    assert!(api.delete("Node", "", "node-a"));
    wait_for("node-a released", || {
        let store = store.clone();
        async move { allocated(store).await == [keys::ipam_node("node-b")] }
    })
    .await;
    assert_eq!(registry.allocate("node-c").await.expect("allocate").id, 1, "node-a's id is reused");
}
