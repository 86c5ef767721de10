//! ClusterWatch against a real etcd (and the embedded store): start resync, per-kind events,
//! malformed values, etcd killed and restarted mid-run, compaction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contiv_cluster_model::ClusterObject;
use contiv_cluster_model::keys::{self, Kind};
use contiv_cluster_watch::{ClusterEvent, ClusterModel, ClusterWatch, Object, ObjectKind, ResyncReason};
use contiv_store::testing::{EtcdServer, Intercept, Intercepted};
use contiv_store::{Revision, Store, StoreConfig, StoreError, WatchStream};
use serde_json::json;

fn v(value: serde_json::Value) -> Vec<u8> {
    let mut value = value;
    value.as_object_mut().unwrap().insert("v".into(), json!(1));
    serde_json::to_vec(&value).unwrap()
}

fn pod(ns: &str, name: &str, ip: &str) -> (String, Vec<u8>) {
    (
        keys::k8s_key(Kind::Pod, Some(ns), name),
        v(json!({"name": name, "namespace": ns, "ips": [ip], "labels": {"app": "web"}})),
    )
}

fn service(ns: &str, name: &str, ip: &str) -> (String, Vec<u8>) {
    (
        keys::k8s_key(Kind::Service, Some(ns), name),
        v(json!({"name": name, "namespace": ns, "cluster_ips": [ip],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "target_port": 8080}]})),
    )
}

fn slice(ns: &str, name: &str, ips: &[&str]) -> (String, Vec<u8>) {
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    (
        keys::k8s_key(Kind::EndpointSlice, Some(ns), name),
        v(json!({"name": name, "namespace": ns, "service_name": "svc", "address_type": "IPv4",
                 "endpoints": endpoints, "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]})),
    )
}

fn namespace(name: &str) -> (String, Vec<u8>) {
    (keys::k8s_key(Kind::Namespace, None, name), v(json!({"name": name, "labels": {"team": "a"}})))
}

fn policy(ns: &str, name: &str) -> (String, Vec<u8>) {
    (
        keys::k8s_key(Kind::NetworkPolicy, Some(ns), name),
        v(json!({"name": name, "namespace": ns, "pod_selector": {}, "policy_types": ["Ingress"]})),
    )
}

fn node(name: &str) -> (String, Vec<u8>) {
    (
        keys::k8s_key(Kind::Node, None, name),
        v(json!({"name": name, "addresses": [{"address_type": "InternalIP", "address": "192.168.1.1"}]})),
    )
}

fn registration(name: &str, id: u32) -> (String, Vec<u8>) {
    (keys::node(name), v(json!({"name": name, "id": id, "addresses": [], "pod_cidr": format!("10.1.{id}.0/24")})))
}

async fn put(store: &Arc<dyn Store>, (key, value): (String, Vec<u8>)) {
    store.put(&key, value, None).await.unwrap();
}

/// Records events and a copy of the model after each one.
#[derive(Clone, Default)]
struct Recorder {
    events: Arc<Mutex<Vec<ClusterEvent>>>,
    model: Arc<Mutex<ClusterModel>>,
}

impl Recorder {
    fn consumer(&self) -> impl FnMut(&ClusterModel, &ClusterEvent) + Send + 'static {
        let this = self.clone();
        move |model, event| {
            this.events.lock().unwrap().push(event.clone());
            *this.model.lock().unwrap() = model.clone();
        }
    }

    fn events(&self) -> Vec<ClusterEvent> {
        self.events.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, cond: impl Fn(&[ClusterEvent], &ClusterModel) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let events = self.events.lock().unwrap();
                let model = self.model.lock().unwrap();
                if cond(&events, &model) {
                    return;
                }
                if Instant::now() > deadline {
                    panic!("timed out waiting for {what}; events: {:#?}", *events);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn spawn(store: Arc<dyn Store>, rec: &Recorder) -> (Arc<ClusterWatch>, tokio::sync::oneshot::Sender<()>) {
    run_watch(Arc::new(ClusterWatch::new(store)), rec)
}

fn run_watch(watch: Arc<ClusterWatch>, rec: &Recorder) -> (Arc<ClusterWatch>, tokio::sync::oneshot::Sender<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let w = watch.clone();
    let mut consumer = rec.consumer();
    tokio::spawn(async move {
        w.run(&mut consumer, async move {
            let _ = stopped.await;
        })
        .await;
    });
    (watch, stop)
}

fn resyncs(events: &[ClusterEvent], reason: ResyncReason) -> usize {
    events.iter().filter(|e| **e == ClusterEvent::Resync(reason)).count()
}

async fn start_resync_then_events(store: Arc<dyn Store>) {
    put(&store, namespace("default")).await;
    put(&store, pod("default", "web-0", "10.1.1.2")).await;
    put(&store, service("default", "svc", "10.96.0.10")).await;
    put(&store, slice("default", "svc-abc", &["10.1.1.2"])).await;
    put(&store, policy("default", "deny")).await;
    put(&store, node("n1")).await;
    put(&store, registration("n1", 1)).await;
    store.put("/contiv/ipam/config", b"{}".to_vec(), None).await.unwrap(); // not part of the model
    let rec = Recorder::default();
    let (watch, _stop) = spawn(store.clone(), &rec);
    rec.wait_for("start resync", |e, _| resyncs(e, ResyncReason::Start) == 1).await;
    {
        let m = rec.model.lock().unwrap();
        assert_eq!(m.len(), 7);
        for kind in Kind::ALL {
            assert_eq!(m.count(kind), 1, "{kind}");
        }
        assert_eq!(m.registrations().next().unwrap().id, 1);
        assert_eq!(m.pods().next().unwrap().ips[0].to_string(), "10.1.1.2");
        assert_eq!(m.services().next().unwrap().cluster_ips[0].to_string(), "10.96.0.10");
    }
    assert_eq!(rec.events().len(), 1, "only the resync so far");

    put(&store, pod("default", "web-1", "10.1.1.3")).await;
    put(&store, slice("default", "svc-abc", &["10.1.1.2", "10.1.1.3"])).await;
    put(&store, slice("default", "svc-abc", &["10.1.1.2", "10.1.1.3"])).await; // identical: no event
    store.delete(&keys::k8s_key(Kind::Pod, Some("default"), "web-0")).await.unwrap();
    store.delete(&keys::node("n1")).await.unwrap();
    rec.wait_for("4 changes", |e, _| e.len() == 5).await;
    let events = rec.events();
    match &events[1] {
        ClusterEvent::Added { key, object: Object::K8s(ClusterObject::Pod(p)) } => {
            assert_eq!(key, "/contiv/k8s/pod/default/web-1");
            assert_eq!(p.name, "web-1");
        }
        other => panic!("expected pod added, got {other:?}"),
    }
    match &events[2] {
        ClusterEvent::Updated {
            old: Object::K8s(ClusterObject::EndpointSlice(o)),
            new: Object::K8s(ClusterObject::EndpointSlice(n)),
            ..
        } => {
            assert_eq!((o.endpoints.len(), n.endpoints.len()), (1, 2));
        }
        other => panic!("expected slice updated, got {other:?}"),
    }
    assert!(matches!(&events[3], ClusterEvent::Deleted { object, .. } if object.kind() == ObjectKind::K8s(Kind::Pod)));
    assert!(matches!(&events[4], ClusterEvent::Deleted { object, .. } if object.kind() == ObjectKind::Registration));
    let store_revision = store.list("/contiv/").await.unwrap().revision;
    let model = watch.model();
    let m = model.read().unwrap();
    assert_eq!(m.count(Kind::Pod), 1);
    assert_eq!(m.registrations().count(), 0);
    assert_eq!(m.revision(), store_revision);
}

/// The agent lists the store while its datapath loads: `run` then starts from that list
/// (no second list), and what was written in between comes as events after the resync.
async fn primed_watch_starts_from_its_list(store: Arc<dyn Store>) {
    put(&store, pod("default", "before", "10.1.1.2")).await;
    put(&store, service("default", "svc", "10.96.0.10")).await;
    let watch = Arc::new(ClusterWatch::new(store.clone()));
    assert_eq!(watch.prime().await.unwrap(), 2);
    assert_eq!(watch.model().read().unwrap().len(), 2, "the model holds the list before run");
    put(&store, pod("default", "between", "10.1.1.3")).await;
    store.delete(&keys::k8s_key(Kind::Service, Some("default"), "svc")).await.unwrap();
    let rec = Recorder::default();
    let (watch, _stop) = run_watch(watch, &rec);
    rec.wait_for("the resync and both changes", |e, _| e.len() == 3).await;
    let events = rec.events();
    assert_eq!(events[0], ClusterEvent::Resync(ResyncReason::Start));
    assert!(matches!(&events[1], ClusterEvent::Added { key, .. } if key.ends_with("/between")), "{events:#?}");
    assert!(matches!(&events[2], ClusterEvent::Deleted { key, .. } if key.ends_with("/svc")), "{events:#?}");
    assert_eq!(watch.stats().lists.load(Ordering::Relaxed), 1, "run started from the primed list");
    let store_revision = store.list("/contiv/").await.unwrap().revision;
    let model = watch.model();
    let m = model.read().unwrap();
    assert_eq!((m.count(Kind::Pod), m.count(Kind::Service)), (2, 0));
    assert_eq!(m.revision(), store_revision);
}

async fn malformed_values_skipped(store: Arc<dyn Store>) {
    let (good_key, good) = pod("ns", "good", "10.1.1.9");
    store.put(&good_key, good.clone(), None).await.unwrap();
    store.put("/contiv/k8s/pod/ns/garbage", b"{not json".to_vec(), None).await.unwrap();
    store
        .put("/contiv/k8s/pod/ns/future", br#"{"v":99,"name":"future","namespace":"ns"}"#.to_vec(), None)
        .await
        .unwrap();
    // A value naming another object than its key.
    store.put("/contiv/k8s/pod/ns/liar", pod("ns", "other", "10.1.1.1").1, None).await.unwrap();
    store.put("/contiv/k8s/bogus/x", b"{}".to_vec(), None).await.unwrap();
    store.put(&keys::node("n9"), registration("n8", 8).1, None).await.unwrap();
    let rec = Recorder::default();
    let (watch, _stop) = spawn(store.clone(), &rec);
    rec.wait_for("start", |e, _| !e.is_empty()).await;
    {
        let m = rec.model.lock().unwrap();
        assert_eq!(m.len(), 1, "only the good pod: {:?}", m.iter().map(|(k, _)| k).collect::<Vec<_>>());
        assert_eq!(m.malformed_keys().count(), 5);
    }
    // A malformed update keeps the last good value and emits nothing; the watch goes on.
    store.put(&good_key, b"[1,2,3]".to_vec(), None).await.unwrap();
    store.put("/contiv/k8s/pod/ns/garbage", b"still bad".to_vec(), None).await.unwrap();
    put(&store, pod("ns", "after", "10.1.1.10")).await;
    rec.wait_for("the good pod after the bad values", |e, _| e.len() == 2).await;
    let events = rec.events();
    assert!(matches!(&events[1], ClusterEvent::Added { key, .. } if key.ends_with("/after")));
    let model = watch.model();
    let m = model.read().unwrap();
    assert_eq!(m.count(Kind::Pod), 2);
    assert!(matches!(m.get(&good_key), Some(Object::K8s(ClusterObject::Pod(p))) if p.name == "good"));
    assert!(m.malformed_keys().any(|k| k == good_key));
    assert!(watch.stats().malformed.load(Ordering::Relaxed) >= 7);
}

async fn etcd_backend() -> (EtcdServer, Arc<dyn Store>) {
    let server = EtcdServer::start().expect("etcd");
    let store = contiv_store::open(&StoreConfig::etcd([server.endpoint()])).await.unwrap();
    (server, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_resync_then_events_etcd() {
    let (_server, store) = etcd_backend().await;
    start_resync_then_events(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_resync_then_events_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    start_resync_then_events(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primed_watch_starts_from_its_list_etcd() {
    let (_server, store) = etcd_backend().await;
    primed_watch_starts_from_its_list(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primed_watch_starts_from_its_list_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    primed_watch_starts_from_its_list(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_skipped_etcd() {
    let (_server, store) = etcd_backend().await;
    malformed_values_skipped(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_skipped_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    malformed_values_skipped(store).await;
}

/// etcd is killed and restarted while the watch runs; a writer keeps writing through the
/// outage (retrying). Afterwards the model equals the store, the consumer got a resync, and
/// every change was seen as an event (revision-based, nothing missed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_mid_run_resyncs_and_misses_nothing() {
    let (mut server, store) = etcd_backend().await;
    for i in 0..20 {
        put(&store, service("default", &format!("s{i}"), &format!("10.96.0.{i}"))).await;
    }
    let rec = Recorder::default();
    let (watch, _stop) = spawn(store.clone(), &rec);
    rec.wait_for("start", |e, m| !e.is_empty() && m.count(Kind::Service) == 20).await;

    // A writer on its own connection: services 20..60, deletes of 0..10, retried while down.
    let writer_store = contiv_store::open(&StoreConfig::etcd([server.endpoint()])).await.unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        tokio::spawn(async move {
            for i in 20..60 {
                let (k, v) = service("default", &format!("s{i}"), &format!("10.96.1.{i}"));
                while writer_store.put(&k, v.clone(), None).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if i < 30 {
                    let k = keys::k8s_key(Kind::Service, Some("default"), &format!("s{}", i - 20));
                    while writer_store.delete(&k).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart().expect("etcd restart");
    writer.await.unwrap();
    assert!(done.load(Ordering::SeqCst));
    rec.wait_for("reconnect resync and all changes", |e, m| {
        resyncs(e, ResyncReason::Reconnected) >= 1
            && m.count(Kind::Service) == 50
            && m.get(&service("default", "s59", "").0).is_some()
    })
    .await;
    let truth = store.list(keys::K8S_PREFIX).await.unwrap();
    let model = watch.model();
    let m = model.read().unwrap();
    let keys_in_model: Vec<&str> = m.iter().map(|(k, _)| k).collect();
    let keys_in_store: Vec<&str> = truth.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys_in_model, keys_in_store);
    // Every change arrived as an event: 40 adds, 10 deletes.
    let events = rec.events();
    let adds = events.iter().filter(|e| matches!(e, ClusterEvent::Added { .. })).count();
    let deletes = events.iter().filter(|e| matches!(e, ClusterEvent::Deleted { .. })).count();
    assert_eq!((adds, deletes), (40, 10));
    assert_eq!(watch.stats().lists.load(Ordering::Relaxed), 1, "resumed by revision, no relist needed");
}

/// In front of a real store: the first watch fails as compacted after `during` is written:
/// the watch lists again and resyncs.
struct CompactOnce {
    fired: AtomicBool,
    during: (String, Vec<u8>),
}

#[async_trait::async_trait]
impl Intercept for CompactOnce {
    async fn watch(&self, inner: &dyn Store, _: &str, from: Revision) -> Option<Result<WatchStream, StoreError>> {
        if self.fired.swap(true, Ordering::SeqCst) {
            return None;
        }
        // Meanwhile a change happens that the failed watch would have carried.
        if let Err(e) = inner.put(&self.during.0, self.during.1.clone(), None).await {
            return Some(Err(e));
        }
        let err = StoreError::Compacted { requested: from, compacted: from + 1 };
        Some(Ok(Box::pin(futures::stream::iter([Err(err)]))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_relists_and_resyncs() {
    let (_server, inner) = etcd_backend().await;
    put(&inner, pod("ns", "before", "10.1.1.40")).await;
    let during = pod("ns", "during", "10.1.1.50");
    let store: Arc<dyn Store> = Intercepted::new(inner, CompactOnce { fired: AtomicBool::new(false), during });
    let rec = Recorder::default();
    let (watch, _stop) = spawn(store.clone(), &rec);
    rec.wait_for("compaction resync with the pod written meanwhile", |e, m| {
        resyncs(e, ResyncReason::Compacted) == 1 && m.count(Kind::Pod) == 2
    })
    .await;
    put(&store, pod("ns", "later", "10.1.1.41")).await;
    rec.wait_for("live event after the relist", |e, _| {
        e.iter().any(|e| matches!(e, ClusterEvent::Added { key, .. } if key.ends_with("/later")))
    })
    .await;
    assert_eq!(watch.stats().lists.load(Ordering::Relaxed), 2);
    assert_eq!(resyncs(&rec.events(), ResyncReason::Start), 1);
}

/// A policy turns unreadable while the watch is down; the relist keeps its last good value
/// (as a watched bad update does) instead of dropping it, which would open what it closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_keeps_last_good_value_of_a_key_gone_malformed() {
    let (_server, inner) = etcd_backend().await;
    let (policy_key, good) = policy("ns", "deny-all");
    put(&inner, (policy_key.clone(), good)).await;
    let (new_key, _) = policy("ns", "new-but-bad");
    put(&inner, (new_key.clone(), b"{not json".to_vec())).await;
    let during = (policy_key.clone(), b"{\"v\":1,\"name\":".to_vec());
    let store: Arc<dyn Store> = Intercepted::new(inner, CompactOnce { fired: AtomicBool::new(false), during });
    let rec = Recorder::default();
    let (watch, _stop) = spawn(store.clone(), &rec);
    rec.wait_for("compaction resync", |e, _| resyncs(e, ResyncReason::Compacted) == 1).await;
    assert_eq!(watch.stats().lists.load(Ordering::Relaxed), 2);
    let model = watch.model();
    let m = model.read().unwrap();
    assert!(
        matches!(m.get(&policy_key), Some(Object::K8s(ClusterObject::NetworkPolicy(p))) if p.name == "deny-all"),
        "the policy's last good value is gone after the relist: {:?}",
        m.get(&policy_key)
    );
    assert_eq!(m.count(Kind::NetworkPolicy), 1, "a key never readable stays absent");
    let mut bad: Vec<&str> = m.malformed_keys().collect();
    bad.sort();
    let mut want = vec![policy_key.as_str(), new_key.as_str()];
    want.sort();
    assert_eq!(bad, want);
}

/// etcd comes back empty (data lost) and gets fewer writes than the agent had seen: the
/// watch notices the store went back, lists again, and the model matches the new store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_etcd_is_detected_and_relisted() {
    let (mut server, store) = etcd_backend().await;
    for i in 0..30 {
        put(&store, service("default", &format!("old{i}"), "10.96.0.1")).await;
    }
    let rec = Recorder::default();
    let (watch, _stop) = spawn(store.clone(), &rec);
    rec.wait_for("start", |e, m| !e.is_empty() && m.count(Kind::Service) == 30).await;
    server.kill_and_wipe().unwrap();
    server.restart().expect("etcd restart");
    // A reflector refills the new store with less than before.
    let mut written = false;
    for _ in 0..100 {
        if store
            .put(&service("default", "new0", "10.96.0.2").0, service("default", "new0", "10.96.0.2").1, None)
            .await
            .is_ok()
        {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(written);
    put(&store, service("default", "new1", "10.96.0.3")).await;
    rec.wait_for("reset resync with the new content", |e, m| {
        resyncs(e, ResyncReason::StoreReset) >= 1 && m.count(Kind::Service) == 2
    })
    .await;
    let model = watch.model();
    let m = model.read().unwrap();
    let names: Vec<&str> = m.services().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["new0", "new1"]);
}

/// Single-node mode: the agent watches the embedded store while another process (netctl)
/// writes into the same directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_shared_with_a_writer_process() {
    let dir = tempfile::tempdir().unwrap();
    let agent_store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    let rec = Recorder::default();
    let (_watch, _stop) = spawn(agent_store, &rec);
    rec.wait_for("start", |e, _| !e.is_empty()).await;
    let netctl_store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    put(&netctl_store, namespace("prod")).await;
    put(&netctl_store, service("prod", "api", "10.96.5.5")).await;
    netctl_store.delete(&keys::k8s_key(Kind::Namespace, None, "prod")).await.unwrap();
    rec.wait_for("the other process's changes", |e, m| e.len() == 4 && m.count(Kind::Service) == 1).await;
    let events = rec.events();
    assert!(matches!(&events[1], ClusterEvent::Added { key, .. } if key == "/contiv/k8s/namespace/prod"));
    assert!(matches!(&events[3], ClusterEvent::Deleted { key, .. } if key == "/contiv/k8s/namespace/prod"));
}
