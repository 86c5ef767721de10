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
async fn a_process_two_generations_behind_a_failed_rename_still_catches_up() {
    let options = Options { snapshot_every: 2, poll: Duration::from_secs(3600), ..Options::default() };
    let (dir, a, b) = shared_pair(options);
    b.put("/g/start", vec![], None).await.unwrap();
    // b's background reader is asleep; it stays on log-0 while a moves on.
    // Generation 0 -> 1: a snapshot, log-0 kept for readers that have not switched.
    for i in 0..2 {
        a.put(&format!("/g/a{i}"), vec![], None).await.unwrap();
    }
    // 1 -> 2: the rename fails (a directory is in the way); a continues in log-2 and the
    // cleanup of log-0 never runs.
    let snapshot = dir.path().join("snapshot.json");
    let first = std::fs::read(&snapshot).unwrap();
    std::fs::remove_file(&snapshot).unwrap();
    std::fs::create_dir(&snapshot).unwrap();
    for i in 2..4 {
        a.put(&format!("/g/a{i}"), vec![], None).await.unwrap();
    }
    assert!(dir.path().join("log-2.jsonl").exists());
    std::fs::remove_dir(&snapshot).unwrap();
    std::fs::write(&snapshot, first).unwrap();
    // 2 -> 3: a snapshot again; every log before log-2 goes, so b cannot stay on a log
    // nobody writes.
    for i in 4..6 {
        a.put(&format!("/g/a{i}"), vec![], None).await.unwrap();
    }
    assert!(!dir.path().join("log-0.jsonl").exists(), "the dead log was left behind");
    let l = b.list("/g/").await.unwrap();
    assert_eq!(l.kvs.len(), 7, "b caught up through the snapshot");
    assert_eq!(l.revision, a.list("/").await.unwrap().revision);
    // And b's writes land where a reads them.
    b.put("/g/from-b", vec![], None).await.unwrap();
    assert!(a.get("/g/from-b").await.unwrap().is_some());
}

/// Records another process appended before one this binary cannot read (a newer record
/// type during an upgrade, a damaged line) are applied once: every later read fails at the
/// bad record without sending their events again.
#[tokio::test]
async fn records_before_an_unreadable_one_are_applied_once() {
    // Two valid records, written by a store in another directory from the same start.
    let source = tempfile::tempdir().unwrap();
    {
        let s = EmbeddedStore::open(source.path()).unwrap();
        s.put("/w/1", b"1".to_vec(), None).await.unwrap();
        s.put("/w/2", b"2".to_vec(), None).await.unwrap();
    }
    let records = log_lines(source.path(), 0);
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    let mut w = s.watch("/w/", 0).await.unwrap();
    // Appended at once, so one read takes all three.
    let mut log = std::fs::OpenOptions::new().append(true).open(dir.path().join("log-0.jsonl")).unwrap();
    log.write_all(format!("{}\n{{\"rec\":\"fromTheFuture\"}}\n", records.join("\n")).as_bytes()).unwrap();
    drop(log);
    for _ in 0..3 {
        assert!(matches!(s.get("/w/1").await, Err(StoreError::Corrupt { .. })), "the bad record is reported");
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // background reads fail on it too
    // Drained for a second at most (events sent again would keep coming).
    let mut puts = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while puts.len() <= 2
        && let Ok(Some(msg)) = tokio::time::timeout_at(deadline, w.next()).await
    {
        let Ok(WatchMessage::Events(ev)) = msg else { panic!("unexpected {msg:?}") };
        puts.extend(ev.into_iter().map(|e| (e.kv.key, e.kv.mod_revision)));
    }
    assert_eq!(puts.len(), 2, "each record before the bad one sent its event once: {puts:?}");
    assert_eq!(puts[0].0, "/w/1");
    assert_eq!(puts[1].0, "/w/2");
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

// === snapshots that cannot be written, missing snapshots ===

fn log_lines(dir: &std::path::Path, generation: u64) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("log-{generation}.jsonl"))).unwrap().lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn a_failed_snapshot_does_not_fail_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { snapshot_every: 1, ..Options::default() };
    // The snapshot cannot be written (as on a full disk): its temporary file cannot be created.
    std::fs::create_dir(dir.path().join("snapshot.json.tmp")).unwrap();
    let s = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
    let r = s.put("/k", b"1".to_vec(), None).await.expect("the write is in the log: Ok");
    assert_eq!(s.get("/k").await.unwrap().unwrap().mod_revision, r);
    // Later writes of every kind keep working (each retries the snapshot, which fails again).
    let lease = s.lease_grant(60).await.expect("lease grant");
    s.put("/leased", b"l".to_vec(), Some(lease)).await.expect("second put");
    s.lease_keep_alive(lease).await.expect("keep-alive");
    s.compact(r).await.expect("compact");
    assert!(!dir.path().join("snapshot.json").exists());
    drop(s);
    let s = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
    assert_eq!(s.get("/k").await.unwrap().unwrap().value, b"1", "the write survives a reopen");
    assert_eq!(s.get("/leased").await.unwrap().unwrap().lease, lease);
    // Once the disk has room again, the next snapshot is written.
    std::fs::remove_dir(dir.path().join("snapshot.json.tmp")).unwrap();
    s.put("/k", b"2".to_vec(), None).await.unwrap();
    assert!(dir.path().join("snapshot.json").exists(), "the snapshot was tried again");
    drop(s);
    let s = EmbeddedStore::open_with(dir.path(), options).unwrap();
    assert_eq!(s.get("/k").await.unwrap().unwrap().value, b"2");
    assert_eq!(s.get("/leased").await.unwrap().unwrap().lease, lease);
}

#[tokio::test]
async fn a_leftover_snapshot_tmp_file_is_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("snapshot.json.tmp"), b"{\"half a snap").unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert!(!dir.path().join("snapshot.json.tmp").exists());
    s.put("/a", vec![], None).await.unwrap();
}

#[tokio::test]
async fn a_missing_snapshot_next_to_later_logs_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { snapshot_every: 2, ..Options::default() };
    {
        let s = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        for i in 0..6 {
            s.put(&format!("/k/{i}"), vec![b'v'], None).await.unwrap();
        }
    }
    std::fs::remove_file(dir.path().join("snapshot.json")).unwrap();
    match EmbeddedStore::open_with(dir.path(), options) {
        Err(StoreError::Corrupt { detail, .. }) => {
            assert!(detail.contains("snapshot.json") && detail.contains("log-3.jsonl"), "{detail}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(s) => panic!("opened with {} keys: the data before the logs is lost", s.list("/").await.unwrap().kvs.len()),
    }
}

#[tokio::test]
async fn without_a_snapshot_logs_from_generation_zero_are_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { snapshot_every: 2, ..Options::default() };
    {
        let s = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        for i in 0..3 {
            s.put(&format!("/k/{i}"), vec![b'v'], None).await.unwrap();
        }
    }
    // log-0 holds everything from the start, log-1 the rest: no snapshot is needed.
    std::fs::remove_file(dir.path().join("snapshot.json")).unwrap();
    let s = EmbeddedStore::open_with(dir.path(), options).unwrap();
    assert_eq!(s.list("/k/").await.unwrap().kvs.len(), 3);
}

#[tokio::test]
async fn a_watch_from_the_snapshot_revision_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { snapshot_every: 2, ..Options::default() };
    let (snap_rev, after) = {
        let s = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        s.put("/w/a", b"a".to_vec(), None).await.unwrap();
        let snap_rev = s.put("/w/b", b"b".to_vec(), None).await.unwrap(); // the snapshot is at this revision
        let after = s.put("/w/c", b"c".to_vec(), None).await.unwrap();
        (snap_rev, after)
    };
    let s = EmbeddedStore::open_with(dir.path(), options).unwrap();
    let mut w = s.watch("/w/", snap_rev).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(2), w.next()).await {
        Ok(Some(Err(StoreError::Compacted { requested, compacted }))) => {
            assert_eq!((requested, compacted), (snap_rev, snap_rev + 1));
        }
        // Delivering the snapshot revision's change would do as well.
        Ok(Some(Ok(WatchMessage::Events(ev)))) => assert_eq!(ev[0].kv.mod_revision, snap_rev, "{ev:?}"),
        other => panic!("a watch from the snapshot revision must answer: {other:?}"),
    }
    let mut w = s.watch("/w/", snap_rev + 1).await.unwrap();
    let Some(Ok(WatchMessage::Events(ev))) = w.next().await else { panic!("expected events") };
    assert_eq!((ev[0].kv.key.as_str(), ev[0].kv.mod_revision), ("/w/c", after));
}

// === leases ===

#[tokio::test]
async fn keep_alive_of_a_lease_past_its_deadline_fails() {
    let dir = tempfile::tempdir().unwrap();
    // No background sweep: only the keep-alive itself can notice the deadline.
    let options = Options { poll: Duration::from_secs(3600), ..Options::default() };
    let s = EmbeddedStore::open_with(dir.path(), options).unwrap();
    let lease = s.lease_grant(1).await.unwrap();
    s.put("/l", vec![], Some(lease)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        matches!(s.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(l)) if l == lease),
        "an expired lease cannot be revived"
    );
    assert_eq!(s.get("/l").await.unwrap(), None, "it was revoked with its keys");
    assert!(matches!(s.put("/m", vec![], Some(lease)).await, Err(StoreError::LeaseNotFound(_))));
}

#[tokio::test]
async fn put_under_a_lease_past_its_deadline_fails() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { poll: Duration::from_secs(3600), ..Options::default() };
    let s = EmbeddedStore::open_with(dir.path(), options).unwrap();
    let lease = s.lease_grant(1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(matches!(s.put("/m", vec![], Some(lease)).await, Err(StoreError::LeaseNotFound(l)) if l == lease));
    assert_eq!(s.get("/m").await.unwrap(), None);
}

#[tokio::test]
async fn a_lease_revoke_is_one_log_record() {
    let dir = tempfile::tempdir().unwrap();
    let lease = {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let lease = s.lease_grant(60).await.unwrap();
        s.put("/l/a", vec![], Some(lease)).await.unwrap();
        s.put("/l/b", vec![], Some(lease)).await.unwrap();
        let mut w = s.watch("/l/", 0).await.unwrap();
        let before = log_lines(dir.path(), 0).len();
        s.lease_revoke(lease).await.unwrap();
        assert_eq!(log_lines(dir.path(), 0).len(), before + 1, "the deletions and the revoke are one record");
        // Under a tag older binaries do not know: they fail on it instead of reading a
        // revoke that keeps the keys.
        let last = log_lines(dir.path(), 0).pop().unwrap();
        assert!(last.starts_with(r#"{"rec":"leaseRevokeWithKeys""#), "{last}");
        let Some(Ok(WatchMessage::Events(ev))) = w.next().await else { panic!("expected events") };
        assert_eq!(ev.len(), 2, "both deletions in one revision: {ev:?}");
        assert!(ev.iter().all(|e| e.kind == EventKind::Delete && e.kv.mod_revision == ev[0].kv.mod_revision));
        lease
    };
    // A crash before the record was complete: neither half happened.
    let mut lines = log_lines(dir.path(), 0);
    lines.pop();
    std::fs::write(dir.path().join("log-0.jsonl"), lines.join("\n") + "\n").unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert!(s.get("/l/a").await.unwrap().is_some(), "keys kept with their lease");
    assert!(s.lease_keep_alive(lease).await.is_ok(), "the lease is alive");
}

#[tokio::test]
async fn logs_with_the_revoke_written_as_two_records_still_read() {
    // What earlier versions wrote: the deletion of the lease's keys, then the revoke.
    let dir = tempfile::tempdir().unwrap();
    let log = [
        r#"{"rec":"leaseGrant","id":1,"ttl":60,"at":1}"#,
        r#"{"rec":"commit","rev":2,"changes":[{"op":"put","key":"/l","value":"v","lease":1},{"op":"put","key":"/k","value":"w","lease":0}]}"#,
        r#"{"rec":"commit","rev":3,"changes":[{"op":"delete","key":"/l"}]}"#,
        r#"{"rec":"leaseRevoke","id":1}"#,
    ];
    std::fs::write(dir.path().join("log-0.jsonl"), log.join("\n") + "\n").unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(s.get("/l").await.unwrap(), None);
    assert_eq!(s.get("/k").await.unwrap().unwrap().value, b"w");
    assert!(matches!(s.lease_keep_alive(1).await, Err(StoreError::LeaseNotFound(1))));
    assert_eq!(s.put("/x", vec![], None).await.unwrap(), 4);
}

// === watches ===

#[tokio::test]
async fn a_stalled_watch_ends_with_compacted_instead_of_buffering_forever() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    let buffer = Options::default().watch_buffer;
    let mut w = s.watch("/s/", 0).await.unwrap();
    let first = s.put("/s/0", vec![], None).await.unwrap();
    for i in 1..buffer + 100 {
        s.put(&format!("/s/{i}"), vec![], None).await.unwrap();
    }
    // The consumer wakes up: what was buffered, then the end.
    let mut delivered = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), w.next()).await.expect("the watch answers") {
            Some(Ok(WatchMessage::Events(ev))) => {
                assert_eq!(ev[0].kv.mod_revision, first + delivered as i64, "in order, none skipped");
                delivered += 1;
            }
            Some(Err(StoreError::Compacted { requested, .. })) => {
                assert_eq!(requested, first + delivered as i64, "names the first revision not delivered");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(delivered <= buffer, "at most {buffer} messages were buffered, got {delivered}");
    assert!(w.next().await.is_none(), "the watch ended");
    // A fresh watch from the revision it names works (the history still has it).
    let mut w = s.watch("/s/", first + delivered as i64).await.unwrap();
    assert!(matches!(w.next().await, Some(Ok(WatchMessage::Events(_)))));
}
