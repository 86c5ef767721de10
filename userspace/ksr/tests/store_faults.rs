//! contiv-ksr when the store fails: failed writes are repaired, a real etcd killed and
//! restarted mid-run catches up, and the binary runs from flags against a kubeconfig.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use contiv_cluster_model::keys;
use contiv_ksr::Reflector;
use contiv_ksr::testing::FakeApiServer;
use contiv_store::testing::{Call, Intercept, Intercepted};
use contiv_store::{Store, StoreError};
use serde_json::{Value, json};

fn pod(name: &str, ip: &str) -> Value {
    json!({"kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"app": "x"}},
           "spec": {"nodeName": "n1", "containers": []}, "status": {"podIPs": [{"ip": ip}]}})
}

fn base() -> Vec<Value> {
    vec![
        json!({"kind": "Namespace", "metadata": {"name": "default"}}),
        json!({"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}),
        pod("a", "10.1.1.1"),
    ]
}

async fn wait_for<F, Fut>(what: &str, secs: u64, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn has_key(store: &Arc<dyn Store>, key: &str) -> bool {
    matches!(store.get(key).await, Ok(Some(_)))
}

/// In front of a real store: every key-value call fails while `broken` is set.
#[derive(Default)]
struct Flaky {
    broken: AtomicBool,
}

#[async_trait::async_trait]
impl Intercept for Flaky {
    async fn before(&self, _: &dyn Store, _: Call<'_>) -> Result<(), StoreError> {
        if self.broken.load(Ordering::SeqCst) { Err(StoreError::Unavailable("injected fault".into())) } else { Ok(()) }
    }
}

#[tokio::test]
async fn fake_apiserver_failed_store_writes_are_repaired() {
    let api = FakeApiServer::start().await.unwrap();
    for o in base() {
        api.apply(o);
    }
    let dir = tempfile::tempdir().unwrap();
    let inner = contiv_store::open(&contiv_store::StoreConfig::embedded(dir.path())).await.unwrap();
    let flaky = Intercepted::new(inner.clone(), Flaky::default());
    let ksr = Reflector::start(api.client(), flaky.clone(), Duration::from_millis(100));
    let m = ksr.mirror.clone();
    wait_for("ready", 20, || {
        let m = m.clone();
        async move { m.ready().await }
    })
    .await;

    flaky.hook.broken.store(true, Ordering::SeqCst);
    api.apply(pod("b", "10.1.1.2"));
    assert!(api.delete("Pod", "default", "a"));
    let m2 = m.clone();
    wait_for("not ready while writes fail", 20, || {
        let m = m2.clone();
        async move { !m.ready().await }
    })
    .await;
    assert!(m.counters.store_errors.load(Ordering::Relaxed) > 0);
    assert!(!has_key(&inner, "/contiv/k8s/pod/default/b").await);

    flaky.hook.broken.store(false, Ordering::SeqCst);
    wait_for("repair", 20, || {
        let inner = inner.clone();
        async move {
            has_key(&inner, "/contiv/k8s/pod/default/b").await && !has_key(&inner, "/contiv/k8s/pod/default/a").await
        }
    })
    .await;
    wait_for("ready again", 20, || {
        let m = m.clone();
        async move { m.ready().await }
    })
    .await;
}

/// A real etcd, the fake API server with [`base`], and KSR reflecting one into the other,
/// ready.
async fn ksr_on_etcd() -> (contiv_store::testing::EtcdServer, FakeApiServer, Arc<dyn Store>, Reflector) {
    let etcd = contiv_store::testing::EtcdServer::start().expect("etcd (apt-get install etcd-server)");
    let api = FakeApiServer::start().await.unwrap();
    for o in base() {
        api.apply(o);
    }
    let store = contiv_store::open(&contiv_store::StoreConfig::etcd([etcd.endpoint()])).await.unwrap();
    let ksr = Reflector::start(api.client(), store.clone(), Duration::from_millis(200));
    let m = ksr.mirror.clone();
    wait_for("ready", 20, || {
        let m = m.clone();
        async move { m.ready().await }
    })
    .await;
    (etcd, api, store, ksr)
}

#[tokio::test]
async fn fake_apiserver_etcd_killed_and_restarted_catches_up() {
    let (mut etcd, api, store, ksr) = ksr_on_etcd().await;
    let m = ksr.mirror.clone();

    etcd.kill();
    api.apply(pod("during-outage", "10.1.1.9"));
    assert!(api.delete("Pod", "default", "a"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart().expect("etcd restarts on its data dir");
    wait_for("changes made during the outage reach etcd", 60, || {
        let s = store.clone();
        async move {
            has_key(&s, "/contiv/k8s/pod/default/during-outage").await
                && !has_key(&s, "/contiv/k8s/pod/default/a").await
        }
    })
    .await;
    let s = store.clone();
    wait_for("ready after the outage", 60, || {
        let m = m.clone();
        async move { m.ready().await }
    })
    .await;
    assert!(has_key(&s, keys::KSR_MARKER).await);
}

/// etcd restored from a backup of its data directory (taken while it was stopped): every
/// key, the KSR marker included, is as old as the backup, with its old revisions. KSR must
/// notice and write what changed since, although the marker is there.
#[tokio::test]
async fn fake_apiserver_etcd_restored_from_a_backup_is_resynced() {
    let (mut etcd, api, store, ksr) = ksr_on_etcd().await;
    let m = ksr.mirror.clone();
    let data = etcd.data_dir().join("data");
    let backup = tempfile::tempdir().unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let status = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
        assert!(status.success(), "cp -a {} {}", from.display(), to.display());
    };
    etcd.kill();
    copy(&data, backup.path());
    etcd.restart().expect("etcd restarts on its data dir");

    // The cluster moves on after the backup.
    api.apply(pod("after-backup", "10.1.1.9"));
    assert!(api.delete("Pod", "default", "a"));
    let changed = |s: Arc<dyn Store>| async move {
        has_key(&s, "/contiv/k8s/pod/default/after-backup").await && !has_key(&s, "/contiv/k8s/pod/default/a").await
    };
    wait_for("the change reaches etcd", 30, || changed(store.clone())).await;

    etcd.kill();
    std::fs::remove_dir_all(&data).unwrap();
    copy(&backup.path().join("data"), etcd.data_dir());
    etcd.restart().expect("etcd restarts on the restored data dir");
    wait_for("the restored store resynced", 60, || changed(store.clone())).await;
    assert_eq!(m.counters.marker_resyncs.load(Ordering::Relaxed), 1);
}

/// Kills (by its own handle) and reaps the child this test started.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_runs_from_flags_and_serves_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = FakeApiServer::start().await.unwrap();
    for o in base() {
        api.apply(o);
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: me\n\
             current-context: fake\nusers:\n- name: me\n  user: {{}}\n",
            api.url()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let data = dir.path().join("store");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_contiv-ksr"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--data-dir")
        .arg(&data)
        .arg("--http")
        .arg(format!("127.0.0.1:{port}"))
        .env_remove("CONTIV_ETCD_ENDPOINTS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start contiv-ksr");
    let _guard = Kill(child);
    async fn get(port: u16, path: &str) -> Option<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, buf.split_once("\r\n\r\n")?.1.to_string()))
    }
    wait_for("binary ready", 30, || async move { matches!(get(port, "/readyz").await, Some((200, _))) }).await;
    let (_, metrics) = get(port, "/metrics").await.unwrap();
    let counts: BTreeMap<&str, &str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("contiv_ksr_objects{kind=\""))
        .filter_map(|l| l.split_once("\"} "))
        .collect();
    assert_eq!(counts.get("pod"), Some(&"1"), "{metrics}");
    assert_eq!(counts.get("node"), Some(&"1"), "{metrics}");
    assert_eq!(counts.get("namespace"), Some(&"1"), "{metrics}");
    assert_eq!(counts.get("service"), Some(&"0"), "{metrics}");
}
