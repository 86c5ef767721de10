//! A quiet watch learns the store's revision from etcd's progress notifications: after an
//! outage during which other keys changed and were compacted, it resumes after that revision
//! instead of failing with `Compacted` (which would make its consumer list everything again).

use std::time::Duration;

use contiv_store::testing::EtcdServer;
use contiv_store::{StoreConfig, StoreError, WatchMessage};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_watch_resumes_after_its_last_progress_notification() {
    let mut server =
        EtcdServer::start_with_args(&["--experimental-watch-progress-notify-interval=100ms"]).expect("etcd");
    let store = contiv_store::open(&StoreConfig::etcd([server.endpoint()])).await.unwrap();
    let mut w = store.watch("/quiet/", 0).await.unwrap();
    let mut last = 0;
    for i in 0..20 {
        last = store.put(&format!("/busy/{i}"), b"x".to_vec(), None).await.unwrap();
    }
    // Progress notifications reach the watch (every 100 ms here, 10 minutes by default).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    store.compact(last).await.unwrap();
    server.kill();
    server.restart().expect("etcd restart");
    let mut written = None;
    for _ in 0..100 {
        if let Ok(r) = store.put("/quiet/x", b"1".to_vec(), None).await {
            written = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written = written.expect("puts work again after the restart");
    let mut reconnected = false;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("the watch keeps delivering")
            .expect("stream open");
        match msg {
            Ok(WatchMessage::Reconnected { resumed_from }) => {
                assert!(resumed_from > last, "resumed from {resumed_from}, after the progress at {last}");
                reconnected = true;
            }
            Ok(WatchMessage::Events(ev)) => {
                assert_eq!((ev[0].kv.key.as_str(), ev[0].kv.mod_revision), ("/quiet/x", written));
                break;
            }
            Err(e @ StoreError::Compacted { .. }) => {
                panic!("the watch was told the store reached revision {last}, yet resumed from before it: {e}")
            }
            Err(e) => panic!("watch error: {e}"),
        }
    }
    assert!(reconnected);
}
