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
    let mut log = std::fs::OpenOptions::new().append(true).open(dir.path().join("log.jsonl")).unwrap();
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
    std::fs::write(dir.path().join("log.jsonl"), "not json\n{}\n").unwrap();
    assert!(matches!(EmbeddedStore::open(dir.path()), Err(StoreError::Corrupt { .. })));
}

#[tokio::test]
async fn second_owner_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _s = EmbeddedStore::open(dir.path()).unwrap();
    assert!(matches!(EmbeddedStore::open(dir.path()), Err(StoreError::Locked(_))));
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
