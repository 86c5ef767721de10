//! The etcd backend over TLS against a real etcd started with certificates generated here
//! (`testing::TestPki`): client certificates required, server certificate checked.

use std::time::Duration;

use contiv_store::testing::{EtcdServer, TestPki};
use contiv_store::{StoreConfig, StoreError, TlsConfig};
use futures::StreamExt;

fn config(server: &EtcdServer, tls: TlsConfig) -> StoreConfig {
    let mut c = StoreConfig::etcd([server.endpoint()]).with_tls(tls);
    c.dial_timeout_ms = 3000;
    c
}

#[tokio::test]
async fn etcd_tls_with_client_certificate_reads_writes_and_watches() {
    let pki = TestPki::generate().expect("test PKI");
    let server = EtcdServer::start_tls(&pki).expect("start etcd with TLS");
    assert!(server.endpoint().starts_with("https://"));
    let store = contiv_store::open(&config(&server, pki.client_tls())).await.expect("connect over TLS");
    let mut watch = store.watch("/tls/", 0).await.expect("watch");
    let rev = store.put("/tls/a", b"1".to_vec(), None).await.expect("put");
    assert_eq!(store.get("/tls/a").await.unwrap().expect("key").value, b"1");
    assert_eq!(store.list("/tls/").await.unwrap().kvs.len(), 1);
    let msg = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.expect("watch event in time");
    match msg.expect("stream open").expect("no watch error") {
        contiv_store::WatchMessage::Events(ev) => assert_eq!(ev[0].kv.mod_revision, rev),
        other => panic!("expected events, got {other:?}"),
    }
}

#[tokio::test]
async fn etcd_tls_refuses_wrong_ca_and_missing_client_certificate() {
    let pki = TestPki::generate().expect("test PKI");
    let server = EtcdServer::start_tls(&pki).expect("start etcd with TLS");

    // The server certificate was not signed by this CA: the handshake must fail.
    let wrong_ca = TlsConfig { ca_file: pki.other_ca(), ..pki.client_tls() };
    let err = contiv_store::open(&config(&server, wrong_ca)).await.err().expect("a wrong CA must not connect");
    assert!(matches!(err, StoreError::Unavailable(_) | StoreError::Etcd(_)), "wrong CA: {err}");

    // etcd runs with --client-cert-auth: without a client certificate it refuses us.
    let no_client = TlsConfig { ca_file: pki.ca(), cert_file: None, key_file: None, server_name: None };
    let err = contiv_store::open(&config(&server, no_client)).await.err().expect("no client cert must not connect");
    assert!(matches!(err, StoreError::Unavailable(_) | StoreError::Etcd(_)), "no client certificate: {err}");

    // A missing file is named.
    let missing = TlsConfig { ca_file: pki.dir().join("nope.pem"), ..pki.client_tls() };
    let err = contiv_store::open(&config(&server, missing)).await.err().expect("missing CA file");
    assert!(err.to_string().contains("nope.pem"), "{err}");
}

#[tokio::test]
async fn etcd_tls_settings_and_endpoint_schemes_must_agree() {
    let tls = TlsConfig { ca_file: "/x/ca.pem".into(), ..TlsConfig::default() };
    for (config, needle) in [
        (StoreConfig::etcd(["https://127.0.0.1:2379"]), "need TLS settings"),
        (StoreConfig::etcd(["http://127.0.0.1:2379"]).with_tls(tls.clone()), "endpoints are http://"),
        (StoreConfig::etcd(["https://a:2379", "http://b:2379"]).with_tls(tls.clone()), "mix"),
        (StoreConfig::etcd(["127.0.0.1:2379"]), "http:// or https://"),
        (
            StoreConfig::etcd(["https://a:2379"])
                .with_tls(TlsConfig { cert_file: Some("/x/c.pem".into()), ..tls.clone() }),
            "key file",
        ),
        (StoreConfig::etcd(["https://a:2379"]).with_tls(TlsConfig::default()), "CA file"),
    ] {
        let err = contiv_store::open(&config).await.err().expect("invalid config must be refused");
        assert!(matches!(err, StoreError::Config(_)), "{config:?}: {err}");
        assert!(err.to_string().contains(needle), "{config:?}: {err:?} should mention {needle:?}");
    }
}
