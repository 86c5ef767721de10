//! Embedded-store behavior beyond the shared suite: durability, torn logs, one owner.

use std::io::Write;
use std::time::Duration;

use contiv_store::embedded::{EmbeddedStore, Options};
use contiv_store::{EventKind, Store, StoreError, WatchMessage};
use futures::StreamExt;

#[tokio::test]
async fn reopen_keeps_keys_revision_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let (rev, lease) = {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put("/a", b"1".to_vec(), None).await.unwrap();
        let lease = s.lease_grant(60).await.unwrap();
        s.put("/leased", b"l".to_vec(), Some(lease)).await.unwrap();
        s.delete("/a").await.unwrap();
        let rev = s.put("/b", b"2".to_vec(), None).await.unwrap();
        (rev, lease)
    };
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(s.get("/a").await.unwrap(), None);
    let b = s.get("/b").await.unwrap().unwrap();
    assert_eq!((b.value.as_slice(), b.mod_revision), (&b"2"[..], rev));
    assert_eq!(s.list("/").await.unwrap().revision, rev);
    assert_eq!(s.get("/leased").await.unwrap().unwrap().lease, lease);
    assert!(s.lease_keep_alive(lease).await.is_ok(), "the lease survives a reopen");
    assert_ne!(s.lease_grant(5).await.unwrap(), lease, "lease ids are not reused");
    assert_eq!(s.put("/c", vec![], None).await.unwrap(), rev + 1, "revisions continue");
    // History replayed from the log serves a watch from an old revision.
    let mut w = s.watch("/b", rev).await.unwrap();
    let Some(Ok(WatchMessage::Events(ev))) = w.next().await else { panic!("expected events") };
    assert_eq!(ev[0].kv.mod_revision, rev);
}

#[tokio::test]
async fn snapshot_then_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { snapshot_every: 10, ..Options::default() };
    {
        let s = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        for i in 0..35 {
            s.put(&format!("/k/{i:02}"), format!("{i}").into_bytes(), None).await.unwrap();
        }
        s.delete("/k/00").await.unwrap();
    }
    assert!(dir.path().join("snapshot.json").exists());
    let s = EmbeddedStore::open_with(dir.path(), options).unwrap();
    let l = s.list("/k/").await.unwrap();
    assert_eq!(l.kvs.len(), 34);
    assert_eq!(l.kvs.last().unwrap().value, b"34");
    assert_eq!(l.revision, 1 + 36);
}

#[tokio::test]
async fn torn_last_record_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put("/a", b"1".to_vec(), None).await.unwrap();
    }
    let mut log = std::fs::OpenOptions::new().append(true).open(dir.path().join("log-0.jsonl")).unwrap();
    log.write_all(br#"{"rec":"commit","rev":3,"chan"#).unwrap();
    drop(log);
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(s.get("/a").await.unwrap().unwrap().value, b"1");
    let r = s.put("/b", b"2".to_vec(), None).await.unwrap();
    drop(s);
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(s.get("/b").await.unwrap().unwrap().mod_revision, r, "appends after the cut are readable");
}

#[tokio::test]
async fn corrupt_record_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("log-0.jsonl"), "not json\n{}\n").unwrap();
    assert!(matches!(EmbeddedStore::open(dir.path()), Err(StoreError::Corrupt { .. })));
}

#[tokio::test]
async fn history_window_compacts_old_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open_with(dir.path(), Options { history: 5, ..Options::default() }).unwrap();
    let first = s.put("/h", b"0".to_vec(), None).await.unwrap();
    for i in 1..10 {
        s.put("/h", format!("{i}").into_bytes(), None).await.unwrap();
    }
    let mut w = s.watch("/h", first).await.unwrap();
    assert!(matches!(w.next().await, Some(Err(StoreError::Compacted { .. }))));
    let mut w = s.watch("/h", first + 6).await.unwrap();
    let Some(Ok(WatchMessage::Events(ev))) = w.next().await else { panic!("expected events") };
    assert_eq!(ev[0].kind, EventKind::Put);
    assert_eq!(ev[0].kv.value, b"6");
}

#[tokio::test]
async fn lease_expires_after_reopen_without_keepalive() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let lease = s.lease_grant(1).await.unwrap();
        s.put("/l", vec![], Some(lease)).await.unwrap();
    }
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert!(s.get("/l").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(s.get("/l").await.unwrap(), None, "the lease expired and took its key");
}

// === several processes on one directory ===
// Two instances opened on the same directory have separate open files, locks and in-memory
// state, exactly like two processes.

fn shared_pair(options: Options) -> (tempfile::TempDir, EmbeddedStore, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let a = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
    let b = EmbeddedStore::open_with(dir.path(), options).unwrap();
    (dir, a, b)
}

#[tokio::test]
async fn two_processes_see_each_others_writes() {
    let (_dir, a, b) = shared_pair(Options::default());
    let r1 = a.put("/x", b"from a".to_vec(), None).await.unwrap();
    let kv = b.get("/x").await.unwrap().expect("b reads a's write");
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"from a"[..], r1));
    let r2 = b.put("/y", b"from b".to_vec(), None).await.unwrap();
    assert_eq!(r2, r1 + 1, "one revision counter for both");
    assert_eq!(a.list("/").await.unwrap().kvs.len(), 2);
    assert!(b.delete("/x").await.unwrap());
    assert_eq!(a.get("/x").await.unwrap(), None);
}

#[tokio::test]
async fn watch_sees_another_process_writes() {
    let (_dir, a, b) = shared_pair(Options::default());
    let mut w = b.watch("/w/", 0).await.unwrap();
    let r = a.put("/w/1", b"1".to_vec(), None).await.unwrap();
    a.delete("/w/1").await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("event in time");
        let Some(Ok(WatchMessage::Events(ev))) = msg else { panic!("unexpected {msg:?}") };
        seen.extend(ev);
    }
    assert_eq!((seen[0].kind, seen[0].kv.mod_revision), (EventKind::Put, r));
    assert_eq!((seen[1].kind, seen[1].kv.mod_revision), (EventKind::Delete, r + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cas_across_processes() {
    use contiv_store::{Compare, Txn, TxnOp};
    let (_dir, a, b) = shared_pair(Options::default());
    let stores: [std::sync::Arc<dyn Store>; 2] = [std::sync::Arc::new(a), std::sync::Arc::new(b)];
    let mut tasks = Vec::new();
    for t in 0..16 {
        let s = stores[t % 2].clone();
        tasks.push(tokio::spawn(async move {
            for id in 1.. {
                let key = format!("/ids/{id}");
                let res = s
                    .txn(Txn {
                        compares: vec![Compare::Absent(key.clone())],
                        success: vec![TxnOp::Put { key, value: format!("t{t}").into_bytes(), lease: None }],
                        failure: vec![],
                    })
                    .await
                    .unwrap();
                if res.succeeded {
                    return id;
                }
            }
            unreachable!("the loop only ends by returning")
        }));
    }
    let mut ids: Vec<u32> = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    assert_eq!(ids, (1..=16).collect::<Vec<_>>(), "every id claimed exactly once");
}

#[tokio::test]
async fn log_generations_are_followed() {
    let options = Options { snapshot_every: 5, ..Options::default() };
    let (dir, a, b) = shared_pair(options.clone());
    for i in 0..23 {
        a.put(&format!("/g/{i:02}"), vec![b'a'], None).await.unwrap();
        if i % 7 == 0 {
            b.put(&format!("/h/{i:02}"), vec![b'b'], None).await.unwrap();
        }
    }
    assert_eq!(b.list("/g/").await.unwrap().kvs.len(), 23);
    assert_eq!(a.list("/h/").await.unwrap().kvs.len(), 4);
    let logs = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("log-"))
        .count();
    assert!(logs <= 2, "old generations are removed ({logs} logs)");
    drop((a, b));
    let c = EmbeddedStore::open_with(dir.path(), options).unwrap();
    assert_eq!(c.list("/").await.unwrap().kvs.len(), 27);
    assert_eq!(c.list("/").await.unwrap().revision, 1 + 27);
}

#[tokio::test]
async fn lease_kept_alive_by_one_process_holds_in_the_other() {
    let (_dir, a, b) = shared_pair(Options::default());
    let lease = a.lease_grant(1).await.unwrap();
    a.put("/l", vec![], Some(lease)).await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.lease_keep_alive(lease).await.unwrap();
    }
    assert!(b.get("/l").await.unwrap().is_some(), "b saw the keep-alives and did not expire the lease");
    // The owner stops; the lease expires (whichever process notices first).
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(b.get("/l").await.unwrap(), None);
    assert_eq!(a.get("/l").await.unwrap(), None);
    assert!(matches!(b.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(_))));
}

#[tokio::test]
async fn crashed_writer_torn_record_is_cut_by_the_next_writer() {
    let (dir, a, b) = shared_pair(Options::default());
    a.put("/a", b"1".to_vec(), None).await.unwrap();
    let mut log = std::fs::OpenOptions::new().append(true).open(dir.path().join("log-0.jsonl")).unwrap();
    log.write_all(br#"{"rec":"commit","rev":3,"chan"#).unwrap();
    drop(log);
    assert!(b.get("/a").await.is_ok(), "a reader waits for the rest of the line");
    let r = b.put("/b", b"2".to_vec(), None).await.unwrap();
    assert_eq!(r, 3);
    assert_eq!(a.get("/b").await.unwrap().unwrap().mod_revision, r);
}

#[tokio::test]
async fn lagging_process_reloads_the_snapshot() {
    let options = Options { snapshot_every: 3, poll: Duration::from_secs(3600), ..Options::default() };
    let (_dir, a, b) = shared_pair(options);
    b.put("/g/start", vec![], None).await.unwrap();
    let mut w = b.watch("/g/", 0).await.unwrap();
    // b's background reader is asleep: a moves many generations ahead.
    for i in 0..50 {
        a.put(&format!("/g/{i:02}"), vec![b'a'], None).await.unwrap();
    }
    let l = b.list("/g/").await.unwrap();
    assert_eq!(l.kvs.len(), 51, "b caught up through the snapshot");
    assert_eq!(l.revision, a.list("/").await.unwrap().revision);
    // It gets the changes it could follow, in order, then `Compacted`: list again.
    let mut last = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("a message") {
            Some(Ok(WatchMessage::Events(ev))) => {
                for e in ev {
                    assert!(e.kv.mod_revision > last);
                    last = e.kv.mod_revision;
                }
            }
            Some(Err(StoreError::Compacted { .. })) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(last < l.revision, "it could not have followed every change");
}

#[tokio::test]
async fn records_larger_than_a_read_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..9 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put("/small", b"1".to_vec(), None).await.unwrap();
        s.put("/big", big.clone(), None).await.unwrap();
        s.put("/after", b"2".to_vec(), None).await.unwrap();
    }
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(s.get("/big").await.unwrap().unwrap().value, big);
    assert_eq!(s.get("/after").await.unwrap().unwrap().value, b"2");
}
