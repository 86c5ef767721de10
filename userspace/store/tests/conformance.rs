//! One conformance suite, run against both backends: the embedded store in a temp dir and a
//! real etcd on loopback (each test gets its own etcd).

use std::sync::Arc;
use std::time::Duration;

use contiv_store::{
    Compare, EventKind, Revision, Store, StoreError, Txn, TxnOp, WatchEvent, WatchMessage, WatchStream,
};
use futures::StreamExt;

/// Keeps the backend's resources (temp dir, etcd process) alive for the test.
struct Backend {
    store: Arc<dyn Store>,
    _guard: Box<dyn std::any::Any + Send>,
}

async fn embedded() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = contiv_store::open(&contiv_store::StoreConfig::embedded(dir.path())).await.expect("open embedded");
    assert_eq!(store.backend(), "embedded");
    Backend { store, _guard: Box::new(dir) }
}

async fn etcd() -> Backend {
    let server = contiv_store::testing::EtcdServer::start().expect("start etcd");
    let store = contiv_store::open(&contiv_store::StoreConfig::etcd([server.endpoint()])).await.expect("connect etcd");
    assert_eq!(store.backend(), "etcd");
    Backend { store, _guard: Box::new(server) }
}

async fn next_events(w: &mut WatchStream) -> Vec<WatchEvent> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("watch message within 10 s")
            .expect("watch stream ended")
            .expect("watch error");
        if let WatchMessage::Events(ev) = msg {
            return ev;
        }
    }
}

/// Collects events until `n` arrived.
async fn collect(w: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut all = Vec::new();
    while all.len() < n {
        all.extend(next_events(w).await);
    }
    all
}

async fn put_get_delete(s: Arc<dyn Store>) {
    let r1 = s.put("/t/a", b"1".to_vec(), None).await.unwrap();
    let r2 = s.put("/t/a", b"2".to_vec(), None).await.unwrap();
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    let kv = s.get("/t/a").await.unwrap().expect("key present");
    assert_eq!(kv.value, b"2");
    assert_eq!(kv.mod_revision, r2);
    assert_eq!(kv.create_revision, r1, "create revision kept across updates");
    assert_eq!(kv.lease, 0);
    assert!(s.delete("/t/a").await.unwrap());
    assert!(!s.delete("/t/a").await.unwrap(), "second delete finds nothing");
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    let r3 = s.put("/t/a", b"3".to_vec(), None).await.unwrap();
    assert_eq!(s.get("/t/a").await.unwrap().unwrap().create_revision, r3, "re-created key has a new create revision");
}

async fn list_prefix(s: Arc<dyn Store>) {
    for k in ["/p/b", "/p/a", "/p/c/d", "/q/a", "/p"] {
        s.put(k, k.as_bytes().to_vec(), None).await.unwrap();
    }
    let last = s.put("/p/e", b"e".to_vec(), None).await.unwrap();
    let l = s.list("/p/").await.unwrap();
    let keys: Vec<&str> = l.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/b", "/p/c/d", "/p/e"]);
    assert!(l.revision >= last);
    assert_eq!(l.kvs[0].value, b"/p/a");
    assert_eq!(s.list("/none/").await.unwrap().kvs.len(), 0);
    assert_eq!(s.delete_prefix("/p/").await.unwrap(), 4);
    assert_eq!(s.list("/p/").await.unwrap().kvs.len(), 0);
    assert!(s.get("/p").await.unwrap().is_some(), "delete_prefix spares keys outside the prefix");
    assert!(s.get("/q/a").await.unwrap().is_some());
}

async fn list_everything(s: Arc<dyn Store>) {
    s.put("/a", b"1".to_vec(), None).await.unwrap();
    s.put("/b/c", b"2".to_vec(), None).await.unwrap();
    let mut w = s.watch("", 1).await.unwrap();
    let keys: Vec<String> = s.list("").await.unwrap().kvs.into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, ["/a", "/b/c"]);
    let ev = collect(&mut w, 2).await;
    assert_eq!(ev[1].kv.key, "/b/c", "an empty prefix watches everything");
    assert_eq!(s.delete_prefix("").await.unwrap(), 2);
    assert!(s.list("").await.unwrap().kvs.is_empty());
}

async fn list_many_pages(s: Arc<dyn Store>) {
    // More keys than one etcd page, to exercise paging at a fixed revision.
    let value = vec![b'x'; 100];
    for chunk in 0..120 {
        let ops = (0..100)
            .map(|i| TxnOp::Put { key: format!("/many/{:05}", chunk * 100 + i), value: value.clone(), lease: None })
            .collect();
        s.txn(Txn { compares: vec![], success: ops, failure: vec![] }).await.unwrap();
    }
    let l = s.list("/many/").await.unwrap();
    assert_eq!(l.kvs.len(), 12_000);
    assert!(l.kvs.windows(2).all(|w| w[0].key < w[1].key), "sorted, no duplicates");
}

async fn txn_absent(s: Arc<dyn Store>) {
    let claim = |v: &str| Txn {
        compares: vec![Compare::Absent("/ids/1".into())],
        success: vec![TxnOp::Put { key: "/ids/1".into(), value: v.as_bytes().to_vec(), lease: None }],
        failure: vec![TxnOp::Get { key: "/ids/1".into() }],
    };
    let first = s.txn(claim("node-a")).await.unwrap();
    assert!(first.succeeded);
    assert!(first.gets.is_empty());
    let second = s.txn(claim("node-b")).await.unwrap();
    assert!(!second.succeeded, "the id is taken");
    assert_eq!(second.gets.len(), 1);
    assert_eq!(second.gets[0].as_ref().unwrap().value, b"node-a");
    assert_eq!(second.revision, first.revision, "a failed txn with reads only does not bump the revision");
}

async fn txn_mod_revision(s: Arc<dyn Store>) {
    let r = s.put("/cas", b"v1".to_vec(), None).await.unwrap();
    let swap = |rev: Revision, v: &str| Txn {
        compares: vec![Compare::ModRevision("/cas".into(), rev)],
        success: vec![
            TxnOp::Put { key: "/cas".into(), value: v.as_bytes().to_vec(), lease: None },
            TxnOp::Delete { key: "/cas-old".into() },
            TxnOp::Put { key: "/cas-side".into(), value: b"s".to_vec(), lease: None },
        ],
        failure: vec![],
    };
    let ok = s.txn(swap(r, "v2")).await.unwrap();
    assert!(ok.succeeded);
    assert_eq!(ok.revision, r + 1, "one transaction is one revision");
    assert_eq!(s.get("/cas-side").await.unwrap().unwrap().mod_revision, r + 1);
    let stale = s.txn(swap(r, "v3")).await.unwrap();
    assert!(!stale.succeeded, "stale mod_revision loses");
    assert_eq!(s.get("/cas").await.unwrap().unwrap().value, b"v2");
    // ModRevision 0 means "absent".
    assert!(
        s.txn(Txn { compares: vec![Compare::ModRevision("/nope".into(), 0)], ..Txn::default() })
            .await
            .unwrap()
            .succeeded
    );
    assert!(
        s.txn(Txn { compares: vec![Compare::Value("/cas".into(), b"v2".to_vec())], ..Txn::default() })
            .await
            .unwrap()
            .succeeded
    );
    assert!(
        !s.txn(Txn { compares: vec![Compare::Value("/cas".into(), b"v1".to_vec())], ..Txn::default() })
            .await
            .unwrap()
            .succeeded
    );
    assert!(
        !s.txn(Txn { compares: vec![Compare::Value("/nope".into(), vec![])], ..Txn::default() })
            .await
            .unwrap()
            .succeeded
    );
}

async fn lease_revoke(s: Arc<dyn Store>) {
    let lease = s.lease_grant(30).await.unwrap();
    assert_ne!(lease, 0);
    s.put("/l/a", b"a".to_vec(), Some(lease)).await.unwrap();
    s.put("/l/keep", b"k".to_vec(), None).await.unwrap();
    assert_eq!(s.get("/l/a").await.unwrap().unwrap().lease, lease);
    assert!(s.lease_keep_alive(lease).await.unwrap() > 0);
    s.lease_revoke(lease).await.unwrap();
    assert_eq!(s.get("/l/a").await.unwrap(), None, "revoking deletes the lease's keys");
    assert!(s.get("/l/keep").await.unwrap().is_some());
    assert!(matches!(s.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(l)) if l == lease));
    assert!(matches!(s.put("/l/b", vec![], Some(lease)).await, Err(StoreError::LeaseNotFound(l)) if l == lease));
}

async fn lease_expiry(s: Arc<dyn Store>) {
    let lease = s.lease_grant(1).await.unwrap();
    s.put("/exp/a", b"a".to_vec(), Some(lease)).await.unwrap();
    let mut w = s.watch("/exp/", 0).await.unwrap();
    // etcd raises tiny TTLs to its minimum (a few seconds).
    let ev = collect(&mut w, 1).await;
    assert_eq!(ev[0].kind, EventKind::Delete);
    assert_eq!(ev[0].kv.key, "/exp/a");
    assert_eq!(s.get("/exp/a").await.unwrap(), None);
    assert!(matches!(s.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(_))));
}

async fn watch_from_revision(s: Arc<dyn Store>) {
    let r1 = s.put("/w/a", b"1".to_vec(), None).await.unwrap();
    s.put("/other/x", b"x".to_vec(), None).await.unwrap();
    s.put("/w/b", b"2".to_vec(), None).await.unwrap();
    assert!(s.delete("/w/a").await.unwrap());
    let mut w = s.watch("/w/", r1).await.unwrap();
    let ev = collect(&mut w, 3).await;
    let seen: Vec<(EventKind, &str, &[u8])> =
        ev.iter().map(|e| (e.kind, e.kv.key.as_str(), e.kv.value.as_slice())).collect();
    assert_eq!(
        seen,
        [
            (EventKind::Put, "/w/a", &b"1"[..]),
            (EventKind::Put, "/w/b", &b"2"[..]),
            (EventKind::Delete, "/w/a", &b""[..])
        ]
    );
    assert_eq!(ev[0].kv.mod_revision, r1);
    assert!(ev.windows(2).all(|p| p[0].kv.mod_revision < p[1].kv.mod_revision));
    // Live events after the replay, prefix-filtered.
    s.put("/other/y", b"y".to_vec(), None).await.unwrap();
    let r = s.put("/w/c", b"3".to_vec(), None).await.unwrap();
    let ev = next_events(&mut w).await;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kv.key, "/w/c");
    assert_eq!(ev[0].kv.mod_revision, r);
}

async fn watch_txn_is_one_message(s: Arc<dyn Store>) {
    let mut w = s.watch("/tx/", 0).await.unwrap();
    let ops = (0..5).map(|i| TxnOp::Put { key: format!("/tx/{i}"), value: vec![b'v'], lease: None }).collect();
    let res = s.txn(Txn { compares: vec![], success: ops, failure: vec![] }).await.unwrap();
    let ev = next_events(&mut w).await;
    assert_eq!(ev.len(), 5, "all events of one revision arrive together");
    assert!(ev.iter().all(|e| e.kv.mod_revision == res.revision));
}

async fn watch_list_then_resume(s: Arc<dyn Store>) {
    s.put("/lr/a", b"1".to_vec(), None).await.unwrap();
    let l = s.list("/lr/").await.unwrap();
    let r = s.put("/lr/b", b"2".to_vec(), None).await.unwrap();
    let mut w = s.watch("/lr/", l.revision + 1).await.unwrap();
    let ev = next_events(&mut w).await;
    assert_eq!(ev[0].kv.key, "/lr/b", "list + watch from revision + 1 misses nothing and repeats nothing");
    assert_eq!(ev[0].kv.mod_revision, r);
}

async fn watch_compacted(s: Arc<dyn Store>) {
    let r1 = s.put("/c/a", b"1".to_vec(), None).await.unwrap();
    s.put("/c/a", b"2".to_vec(), None).await.unwrap();
    let r3 = s.put("/c/a", b"3".to_vec(), None).await.unwrap();
    s.compact(r3).await.unwrap();
    let mut w = s.watch("/c/", r1).await.unwrap();
    let item = tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("answer").expect("an item");
    match item {
        Err(StoreError::Compacted { compacted, .. }) => assert!(compacted >= r3, "compacted at {compacted}"),
        other => panic!("expected Compacted, got {other:?}"),
    }
    // From the compaction revision on, watching works.
    let mut w = s.watch("/c/", r3).await.unwrap();
    let ev = next_events(&mut w).await;
    assert_eq!(ev[0].kv.value, b"3");
}

async fn watch_from_future_revision(s: Arc<dyn Store>) {
    let r = s.put("/f/a", b"a".to_vec(), None).await.unwrap();
    let mut w = s.watch("/f/", r + 3).await.unwrap();
    for k in ["/f/b", "/f/c", "/f/d", "/f/e"] {
        s.put(k, k.as_bytes().to_vec(), None).await.unwrap();
    }
    let ev = collect(&mut w, 2).await;
    let seen: Vec<(&str, Revision)> = ev.iter().map(|e| (e.kv.key.as_str(), e.kv.mod_revision)).collect();
    assert_eq!(seen, [("/f/d", r + 3), ("/f/e", r + 4)], "events from the start revision on, none before");
}

macro_rules! conformance {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = super::$backend().await;
                    super::$case(b.store.clone()).await;
                }
            )*
        }
    };
}

conformance!(embedded: put_get_delete, list_prefix, list_everything, list_many_pages, txn_absent, txn_mod_revision, lease_revoke,
    lease_expiry, watch_from_revision, watch_from_future_revision, watch_txn_is_one_message, watch_list_then_resume,
    watch_compacted);
conformance!(etcd: put_get_delete, list_prefix, list_everything, list_many_pages, txn_absent, txn_mod_revision, lease_revoke,
    lease_expiry, watch_from_revision, watch_from_future_revision, watch_txn_is_one_message, watch_list_then_resume,
    watch_compacted);
