//! netctl apply/delete are all-or-nothing per store transaction: a store failure midway
//! writes nothing, a key changed by another writer between read and write is read again,
//! larger sets land in batches real etcd accepts and a failure says which landed.

use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use contiv_cluster_model::{ClusterObject, keys};
use contiv_netctl::{ApplyOutcome, DeleteOutcome, TXN_MAX_BYTES, TXN_MAX_OBJECTS, WriteFailure, manifest};
use contiv_store::testing::{Call, EtcdServer, Intercept, Intercepted};
use contiv_store::{Store, StoreConfig, StoreError};

/// In front of a real store: refuses every write touching `poison`, and can play another
/// writer: just before netctl's next write transaction it puts `interfere`.
#[derive(Default)]
struct Faulty {
    poison: Mutex<Option<String>>,
    interfere: Mutex<Option<(String, Vec<u8>)>>,
    write_txns: AtomicUsize,
}

#[async_trait::async_trait]
impl Intercept for Faulty {
    async fn before(&self, inner: &dyn Store, call: Call<'_>) -> Result<(), StoreError> {
        let writes = call.writes();
        if let Some(key) = writes.iter().find(|k| self.poison.lock().unwrap().as_deref() == Some(**k)) {
            return Err(StoreError::Unavailable(format!("injected fault writing {key}")));
        }
        if matches!(call, Call::Txn(_)) && !writes.is_empty() {
            self.write_txns.fetch_add(1, Ordering::SeqCst);
            let other = self.interfere.lock().unwrap().take();
            if let Some((key, value)) = other {
                inner.put(&key, value, None).await?;
            }
        }
        Ok(())
    }
}

fn faulty(inner: Arc<dyn Store>) -> (Arc<Intercepted<Faulty>>, Arc<dyn Store>) {
    let store = Intercepted::new(inner, Faulty::default());
    (store.clone(), store)
}

/// An embedded store in a temp dir (kept while the guard lives), [`Faulty`] in front of it.
async fn faulty_embedded() -> (tempfile::TempDir, Arc<dyn Store>, Arc<Intercepted<Faulty>>, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let inner = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    let (store, dyn_store) = faulty(inner.clone());
    (dir, inner, store, dyn_store)
}

fn namespaces(prefix: &str, n: usize) -> Vec<ClusterObject> {
    let yaml: String = (0..n)
        .map(|i| {
            format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {prefix}-{i}, labels: {{n: \"{i}\"}}}}\n")
        })
        .collect();
    manifest::parse_manifest(Path::new("gen.yaml"), &yaml).unwrap().objects
}

fn shop() -> Vec<ClusterObject> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cluster/20-shop.yaml");
    manifest::load_file(&dir).unwrap().objects
}

async fn k8s_keys(store: &Arc<dyn Store>) -> Vec<String> {
    store.list(keys::K8S_PREFIX).await.unwrap().kvs.into_iter().map(|kv| kv.key).collect()
}

#[tokio::test]
async fn store_failure_midway_through_apply_or_delete_writes_nothing() {
    let (_dir, inner, store, dyn_store) = faulty_embedded().await;
    let objects = shop();
    assert_eq!(objects.len(), 5);

    // The 4th object's write fails: the three before it must not be left behind.
    *store.hook.poison.lock().unwrap() = Some(objects[3].key());
    let err = contiv_netctl::apply(&dyn_store, &objects).await.unwrap_err();
    assert!(err.done.is_empty(), "{:?}", err.done);
    assert!(matches!(err.cause, WriteFailure::Store(StoreError::Unavailable(_))), "{err}");
    assert!(err.to_string().ends_with("nothing was written"), "{err}");
    assert_eq!(k8s_keys(&inner).await, Vec::<String>::new(), "a failed apply left objects in the store");

    *store.hook.poison.lock().unwrap() = None;
    let r = contiv_netctl::apply(&dyn_store, &objects).await.unwrap();
    assert!(r.iter().all(|(_, o)| *o == ApplyOutcome::Created), "{r:?}");
    assert_eq!(k8s_keys(&inner).await.len(), 5);

    // The same for delete.
    *store.hook.poison.lock().unwrap() = Some(objects[2].key());
    let refs: Vec<_> = objects.iter().map(|o| o.object_ref()).collect();
    let err = contiv_netctl::delete(&dyn_store, &refs).await.unwrap_err();
    assert!(err.done.is_empty());
    assert_eq!(k8s_keys(&inner).await.len(), 5, "a failed delete removed objects");
    *store.hook.poison.lock().unwrap() = None;
    let d = contiv_netctl::delete(&dyn_store, &refs).await.unwrap();
    assert!(d.iter().all(|(_, o)| *o == DeleteOutcome::Deleted), "{d:?}");
    assert!(k8s_keys(&inner).await.is_empty());
}

#[tokio::test]
async fn a_key_another_writer_changes_before_the_write_is_read_again() {
    let (_dir, inner, store, dyn_store) = faulty_embedded().await;
    let objects = shop();
    // Someone else creates object 1 between netctl's read (absent) and its write.
    *store.hook.interfere.lock().unwrap() = Some((objects[1].key(), b"someone else's value".to_vec()));
    let r = contiv_netctl::apply(&dyn_store, &objects).await.unwrap();
    assert_eq!(store.hook.write_txns.load(Ordering::SeqCst), 2, "the first write must fail its compare and be redone");
    assert_eq!(r[1], (objects[1].key(), ApplyOutcome::Configured), "{r:?}");
    assert!(r.iter().enumerate().all(|(i, (_, o))| i == 1 || *o == ApplyOutcome::Created), "{r:?}");
    assert_eq!(inner.get(&objects[1].key()).await.unwrap().unwrap().value, objects[1].encode());
}

#[tokio::test]
async fn real_etcd_takes_large_applies_in_batches_and_a_failure_says_what_landed() {
    let server = EtcdServer::start().expect("etcd (apt-get install etcd-server)");
    let inner = contiv_store::open(&StoreConfig::etcd([server.endpoint()])).await.unwrap();
    let (store, dyn_store) = faulty(inner.clone());

    // 250 objects: three transactions, each within etcd's 128 operations per request.
    let first = namespaces("a", 250);
    let r = contiv_netctl::apply(&dyn_store, &first).await.unwrap();
    assert_eq!(r.len(), 250);
    assert!(r.iter().all(|(_, o)| *o == ApplyOutcome::Created));
    assert_eq!(store.hook.write_txns.load(Ordering::SeqCst), 250usize.div_ceil(TXN_MAX_OBJECTS));
    assert_eq!(k8s_keys(&inner).await.len(), 250);

    // A failure in the second batch: the first batch stays, and the error says so.
    let second = namespaces("b", 250);
    *store.hook.poison.lock().unwrap() = Some(second[150].key());
    let err = contiv_netctl::apply(&dyn_store, &second).await.unwrap_err();
    assert_eq!(err.done.len(), TXN_MAX_OBJECTS);
    assert!(err.to_string().contains(&format!("the first {TXN_MAX_OBJECTS} objects were written")), "{err}");
    let landed: Vec<String> = k8s_keys(&inner).await.into_iter().filter(|k| k.contains("/b-")).collect();
    let mut expected: Vec<String> = err.done.iter().map(|(k, _)| k.clone()).collect();
    expected.sort();
    assert_eq!(landed, expected);

    // An object named twice: etcd refuses a transaction naming a key twice, so it is written
    // once, with its last value.
    *store.hook.poison.lock().unwrap() = None;
    let mut twice = namespaces("c", 1);
    let mut relabelled = namespaces("c", 1);
    if let ClusterObject::Namespace(ns) = &mut relabelled[0] {
        ns.labels.insert("second".into(), "yes".into());
    }
    twice.append(&mut relabelled.clone());
    let r = contiv_netctl::apply(&dyn_store, &twice).await.unwrap();
    assert_eq!(r, vec![(twice[0].key(), ApplyOutcome::Created)]);
    assert_eq!(inner.get(&twice[0].key()).await.unwrap().unwrap().value, relabelled[0].encode());
}

/// The command line, against a real etcd: an object too large for a store request fails the
/// whole apply before anything is written, and says which object; one just under the limit
/// goes with the rest in one transaction that etcd takes, and each object is reported.
#[test]
fn cli_against_real_etcd_refuses_an_oversized_object_and_writes_nothing() {
    let server = EtcdServer::start().expect("etcd (apt-get install etcd-server)");
    let dir = tempfile::tempdir().unwrap();
    let small: String =
        (0..10).map(|i| format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: s-{i}}}\n")).collect();
    let huge = format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: huge, labels: {{blob: \"{}\"}}}}\n",
        "x".repeat(TXN_MAX_BYTES)
    );
    let file = dir.path().join("ns.yaml");
    std::fs::write(&file, format!("{small}{huge}")).unwrap();
    let netctl = |file: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_netctl"))
            .args(["--etcd", &server.endpoint(), "apply", "-f"])
            .arg(file)
            .output()
            .unwrap()
    };
    let out = netctl(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/contiv/k8s/namespace/huge is ") && stderr.contains("nothing was written"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "nothing is reported written");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = rt.block_on(contiv_store::open(&StoreConfig::etcd([server.endpoint()]))).unwrap();
    assert!(rt.block_on(k8s_keys(&store)).is_empty(), "a refused apply wrote objects");

    let big = format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: big, labels: {{blob: \"{}\"}}}}\n",
        "x".repeat(TXN_MAX_BYTES - 8192)
    );
    std::fs::write(&file, format!("{small}{big}")).unwrap();
    let out = netctl(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| l.ends_with(" created")).count(), 11, "{stdout}");
    assert_eq!(rt.block_on(k8s_keys(&store)).len(), 11);
}
