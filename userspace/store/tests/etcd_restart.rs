//! etcd killed and restarted under a running watch: the watch reconnects and resumes from the
//! last revision + 1, so every change made before, during and after the outage arrives once.

use std::collections::BTreeMap;
use std::time::Duration;

use contiv_store::testing::EtcdServer;
use contiv_store::{EventKind, StoreConfig, WatchMessage};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_etcd_restart() {
    let mut server = EtcdServer::start().expect("etcd");
    let store = contiv_store::open(&StoreConfig::etcd([server.endpoint()])).await.unwrap();
    let mut w = store.watch("/r/", 0).await.unwrap();
    for i in 0..10 {
        store.put(&format!("/r/{i}"), b"before".to_vec(), None).await.unwrap();
    }
    server.kill();
    // Writes fail while etcd is down.
    assert!(store.put("/r/x", vec![], None).await.is_err());
    server.restart().expect("etcd restart");
    // Unary calls recover on their own (tonic reconnects); retry briefly.
    let mut ok = false;
    for _ in 0..100 {
        if store.put("/r/0", b"after".to_vec(), None).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "puts work again after the restart");
    for i in 1..10 {
        store.put(&format!("/r/{i}"), b"after".to_vec(), None).await.unwrap();
    }
    store.delete("/r/9").await.unwrap();

    let mut seen: BTreeMap<String, Vec<(EventKind, String)>> = BTreeMap::new();
    let mut reconnected = false;
    let mut last_rev = 0;
    let mut count = 0;
    while count < 21 {
        let msg = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("watch keeps delivering")
            .expect("stream open")
            .expect("no error");
        match msg {
            WatchMessage::Reconnected { resumed_from } => {
                assert!(resumed_from > 0);
                reconnected = true;
            }
            WatchMessage::Events(ev) => {
                for e in ev {
                    assert!(e.kv.mod_revision > last_rev, "in order, no duplicates");
                    last_rev = e.kv.mod_revision;
                    seen.entry(e.kv.key.clone()).or_default().push((e.kind, String::from_utf8(e.kv.value).unwrap()));
                    count += 1;
                }
            }
        }
    }
    assert!(reconnected, "the consumer is told about the reconnect");
    assert_eq!(seen.len(), 10);
    for i in 0..9 {
        let want = vec![(EventKind::Put, "before".to_string()), (EventKind::Put, "after".to_string())];
        assert_eq!(seen[&format!("/r/{i}")], want, "key {i}");
    }
    assert_eq!(seen["/r/9"].last().unwrap().0, EventKind::Delete);
}
