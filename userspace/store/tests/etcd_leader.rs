//! A three-member etcd where the member the client talks to loses the others (they are
//! frozen, so it has no leader, as when it is cut off from the majority): requests to it fail
//! at once with "no leader" instead of hanging, and the watch on it is cancelled by etcd and
//! resumed once the member has a leader again, instead of staying open and silent.

use std::time::{Duration, Instant};

use contiv_store::testing::EtcdCluster;
use contiv_store::{StoreConfig, StoreError, WatchMessage};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_leader_fails_requests_and_cuts_its_watches() {
    let mut cluster = EtcdCluster::start(3, &["--heartbeat-interval=50", "--election-timeout=300"]).expect("etcd");
    let store = contiv_store::open(&StoreConfig::etcd([cluster.members[0].endpoint()])).await.unwrap();
    let mut w = store.watch("/p/", 0).await.unwrap();
    let r = store.put("/p/a", b"1".to_vec(), None).await.unwrap();
    let Ok(Some(Ok(WatchMessage::Events(ev)))) = tokio::time::timeout(Duration::from_secs(10), w.next()).await else {
        panic!("expected the first event")
    };
    assert_eq!(ev[0].kv.mod_revision, r);

    cluster.members[1].pause();
    cluster.members[2].pause();
    // Within a few election timeouts the member knows it has no leader and says so.
    let start = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), store.get("/p/a")).await {
            Ok(Err(StoreError::Unavailable(m))) if m.contains("no leader") => break,
            // Still had a leader, or a request that hung (what happens without the requirement).
            Ok(_) | Err(_) => {}
        }
        assert!(start.elapsed() < Duration::from_secs(10), "requests never failed with \"no leader\"");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // etcd cancels the watches on it after three election timeouts without a leader.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.members[1].resume();
    cluster.members[2].resume();

    let mut written = None;
    for _ in 0..100 {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), store.put("/p/b", b"2".to_vec(), None)).await {
            written = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written = written.expect("puts work again once there is a leader");
    let mut reconnected = false;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("the watch keeps delivering")
            .expect("stream open")
            .expect("no watch error");
        match msg {
            WatchMessage::Reconnected { resumed_from } => {
                assert_eq!(resumed_from, r + 1);
                reconnected = true;
            }
            WatchMessage::Events(ev) => {
                assert_eq!((ev[0].kv.key.as_str(), ev[0].kv.mod_revision), ("/p/b", written));
                break;
            }
        }
    }
    assert!(reconnected, "the watch on the member without leader was cut and resumed, not left silent");
}
