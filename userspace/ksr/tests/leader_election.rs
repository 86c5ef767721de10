//! Two KSR replicas against the fake API server (which serves Leases with the real API's
//! resourceVersion conflicts): one leads and writes, the other stands by and writes
//! nothing; a crashed leader is replaced within the lease duration; a leader that cannot
//! renew stops writing before its Lease can expire; a stopping leader hands over at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use contiv_ksr::testing::FakeApiServer;
use contiv_ksr::{Attempt, ElectionConfig, Health, LeaderElector, Role};
use contiv_store::testing::{Call, Intercept, Intercepted};
use contiv_store::{Store, StoreError};
use serde_json::{Value, json};

const NS: &str = "contiv";
const LEASE: &str = "contiv-ksr";

fn pod(name: &str, ip: &str) -> Value {
    json!({"kind": "Pod", "metadata": {"name": name, "namespace": "default"},
           "spec": {"nodeName": "n1", "containers": []}, "status": {"podIPs": [{"ip": ip}]}})
}

fn objects() -> Vec<Value> {
    vec![
        json!({"kind": "Namespace", "metadata": {"name": "default"}}),
        json!({"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}),
        pod("a", "10.1.1.1"),
    ]
}

/// Counts the writes one replica sends to the (shared) store; `cut` makes every call fail,
/// as for a replica whose node lost its way to the store.
#[derive(Default)]
struct Counting {
    writes: AtomicU64,
    cut: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Intercept for Counting {
    async fn before(&self, _: &dyn Store, call: Call<'_>) -> Result<(), StoreError> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("cut off by the test".into()));
        }
        // Any call that may write counts, also a transaction whose compares fail.
        if !matches!(call, Call::Get(_) | Call::List(_)) {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn election(identity: &str, lease_ms: u64, renew_ms: u64, retry_ms: u64) -> ElectionConfig {
    let mut e = ElectionConfig::new(NS, LEASE, identity);
    e.lease_duration = Duration::from_millis(lease_ms);
    e.renew_deadline = Duration::from_millis(renew_ms);
    e.retry_period = Duration::from_millis(retry_ms);
    e.validate().expect("valid election config");
    e
}

/// One replica running `run_elected` in a task.
struct Replica {
    health: Arc<Health>,
    store: Arc<Intercepted<Counting>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    fn start(api: &FakeApiServer, shared: &Arc<dyn Store>, election: ElectionConfig) -> Self {
        let store = Intercepted::new(shared.clone(), Counting::default());
        let health = Health::elected(Default::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(contiv_ksr::run_elected(
            api.client(),
            store.clone(),
            Duration::from_millis(200),
            None,
            election,
            health.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        Replica { health, store, stop: Some(tx), task }
    }

    fn leading(&self) -> bool {
        self.health.role() == Role::Leader
    }

    /// Stops gracefully (the leader releases its Lease) and waits for the task.
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }

    /// Dies without releasing anything, like a killed process.
    fn crash(self) {
        self.task.abort();
    }
}

async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn has_key(store: &Arc<dyn Store>, key: &str) -> bool {
    matches!(store.get(key).await, Ok(Some(_)))
}

async fn setup() -> (FakeApiServer, Arc<dyn Store>, tempfile::TempDir) {
    let _ = env_logger::builder().is_test(true).try_init();
    let api = FakeApiServer::start().await.expect("fake apiserver");
    for o in objects() {
        api.apply(o);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = contiv_store::open(&contiv_store::StoreConfig::embedded(dir.path())).await.expect("embedded store");
    (api, store, dir)
}

#[tokio::test]
async fn fake_apiserver_only_the_leader_writes_and_a_crashed_leader_is_replaced_within_the_lease() {
    let (api, store, _dir) = setup().await;
    // Whole seconds: the Lease records its duration in seconds.
    let (lease_ms, retry_ms) = (2000, 200);
    let a = Replica::start(&api, &store, election("ksr-a", lease_ms, 1000, retry_ms));
    let b = Replica::start(&api, &store, election("ksr-b", lease_ms, 1000, retry_ms));
    wait_for("a leader that is ready", 20, || [&a, &b].iter().any(|r| r.leading() && r.health.readiness().0)).await;
    let (leader, standby) = if a.leading() { (a, b) } else { (b, a) };
    assert!(leader.store.hook.writes.load(Ordering::SeqCst) > 0, "the leader wrote the store");
    assert!(has_key(&store, "/contiv/k8s/pod/default/a").await);
    // The standby reads the Lease, names the leader, is ready (to take over) and writes nothing.
    let holder = api.lease(NS, LEASE).expect("lease exists")["spec"]["holderIdentity"].as_str().unwrap().to_string();
    wait_for("standby names the leader", 10, || standby.health.role() == Role::Follower(holder.clone())).await;
    assert!(standby.health.readiness().0, "a standby is ready");
    tokio::time::sleep(Duration::from_millis(3 * retry_ms)).await;
    assert_eq!(standby.store.hook.writes.load(Ordering::SeqCst), 0, "the standby must not write");

    // The leader dies without releasing its Lease; a new object arrives meanwhile.
    leader.crash();
    let crashed = Instant::now();
    api.apply(pod("b", "10.1.1.2"));
    wait_for("the standby takes over", 20, || standby.leading()).await;
    let took = crashed.elapsed();
    // It waits for the lease to expire on its own clock: at most one lease duration after
    // the last renewal it saw, i.e. lease + one retry period after the crash.
    assert!(took <= Duration::from_millis(lease_ms + 2 * retry_ms), "takeover after {took:?}, lease is {lease_ms} ms");
    assert!(took >= Duration::from_millis(lease_ms - retry_ms), "took over too early ({took:?}): lease not honoured");
    let s = store.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !has_key(&s, "/contiv/k8s/pod/default/b").await {
        assert!(Instant::now() < deadline, "the new leader reflects the new pod");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(standby.store.hook.writes.load(Ordering::SeqCst) > 0);
    let lease = api.lease(NS, LEASE).unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], json!(1), "{lease}");
    standby.stop().await;
}

#[tokio::test]
async fn fake_apiserver_racing_candidates_get_one_winner_through_resource_version_conflicts() {
    let (api, _store, _dir) = setup().await;
    // A holder that will never renew again.
    api.put_lease(
        NS,
        LEASE,
        json!({"holderIdentity": "ghost", "leaseDurationSeconds": 1, "renewTime": "2020-01-01T00:00:00.000000Z",
               "acquireTime": "2020-01-01T00:00:00.000000Z", "leaseTransitions": 4}),
    );
    let mut a = LeaderElector::new(api.client(), election("ksr-a", 1000, 600, 100));
    let mut b = LeaderElector::new(api.client(), election("ksr-b", 1000, 600, 100));
    // The renewTime is ancient, but each candidate times expiry on its own clock from
    // when it first saw this record: not yet expired.
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Following("ghost".into()));
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Following("ghost".into()));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let conflicts_before = api.conflicts();
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let winners = [&ra, &rb].iter().filter(|r| ***r == Attempt::Leading).count();
    assert_eq!(winners, 1, "exactly one winner: a={ra:?} b={rb:?}");
    let holder = api.lease(NS, LEASE).unwrap()["spec"]["holderIdentity"].as_str().unwrap().to_string();
    let winner = if ra == Attempt::Leading { "ksr-a" } else { "ksr-b" };
    assert_eq!(holder, winner);
    assert_eq!(api.lease(NS, LEASE).unwrap()["spec"]["leaseTransitions"], json!(5));
    // Both read the same resourceVersion before either wrote, so the loser's update was a
    // conflict; if the reads were not interleaved, the loser saw the new holder and backed off.
    let loser = if ra == Attempt::Leading { &rb } else { &ra };
    assert!(
        api.conflicts() > conflicts_before || *loser == Attempt::Following(winner.into()),
        "loser {loser:?}, conflicts {}",
        api.conflicts()
    );
    // A stale update (old resourceVersion) is always refused by the fake, as by the API server.
    let mut stale = api.lease(NS, LEASE).unwrap();
    stale["metadata"]["resourceVersion"] = json!("1");
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> = kube::Api::namespaced(api.client(), NS);
    let stale: k8s_openapi::api::coordination::v1::Lease = serde_json::from_value(stale).unwrap();
    let err = leases.replace(LEASE, &Default::default(), &stale).await.expect_err("stale update must conflict");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409), "{err}");
}

#[tokio::test]
async fn fake_apiserver_stopping_leader_releases_the_lease_and_the_standby_takes_over_at_once() {
    let (api, store, _dir) = setup().await;
    // A long lease: only a release can explain a quick takeover.
    let a = Replica::start(&api, &store, election("ksr-a", 30_000, 20_000, 200));
    wait_for("a leads", 20, || a.leading()).await;
    let b = Replica::start(&api, &store, election("ksr-b", 30_000, 20_000, 200));
    wait_for("b stands by", 20, || matches!(b.health.role(), Role::Follower(_))).await;
    let stopped = Instant::now();
    a.stop().await;
    wait_for("b takes over", 10, || b.leading()).await;
    assert!(stopped.elapsed() < Duration::from_secs(3), "takeover took {:?}", stopped.elapsed());
    b.stop().await;
    let lease = api.lease(NS, LEASE).unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "released on stop: {lease}");
}

#[tokio::test]
async fn fake_apiserver_leader_that_cannot_renew_stops_writing_before_its_lease_expires() {
    let (api, store, _dir) = setup().await;
    let (lease_ms, renew_ms, retry_ms) = (3000, 1500, 200);
    let a = Replica::start(&api, &store, election("ksr-a", lease_ms, renew_ms, retry_ms));
    wait_for("a leads and is ready", 20, || a.leading() && a.health.readiness().0).await;
    let mirror = a.health.mirror().expect("a leader has a mirror");
    api.fail_leases(true);
    let cut = Instant::now();
    wait_for("a steps down", 10, || !a.leading()).await;
    let stepped = cut.elapsed();
    assert!(
        stepped < Duration::from_millis(lease_ms),
        "stepped down after {stepped:?}: must be before the lease ({lease_ms} ms) can expire elsewhere"
    );
    assert!(!mirror.is_writing(), "the old term's writes are fenced");
    assert!(!a.health.readiness().0, "a replica that cannot read its lease is not ready");
    let writes = a.store.hook.writes.load(Ordering::SeqCst);
    api.apply(pod("late", "10.1.1.9"));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(a.store.hook.writes.load(Ordering::SeqCst), writes, "no writes after stepping down");
    assert!(!has_key(&store, "/contiv/k8s/pod/default/late").await);
    // The API comes back: it still holds the Lease record, renews it and reflects again.
    api.fail_leases(false);
    wait_for("a leads again", 20, || a.leading()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !has_key(&store, "/contiv/k8s/pod/default/late").await {
        assert!(Instant::now() < deadline, "the pod created meanwhile is reflected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop().await;
}

/// A leader whose store refuses every operation (its node lost the way to etcd) while the
/// API server still renews its Lease hands the Lease over after the store deadline: the
/// standby, which reaches the store, takes over and reflects what changed meanwhile.
#[tokio::test]
async fn fake_apiserver_leader_cut_off_from_the_store_hands_over_to_the_standby() {
    let (api, store, _dir) = setup().await;
    let (lease_ms, retry_ms) = (2000, 200);
    let mut e = election("ksr-a", lease_ms, 1000, retry_ms);
    e.store_deadline = Duration::from_millis(1500);
    let a = Replica::start(&api, &store, e);
    wait_for("a leads and is ready", 20, || a.leading() && a.health.readiness().0).await;
    let mut e = election("ksr-b", lease_ms, 1000, retry_ms);
    e.store_deadline = Duration::from_millis(1500);
    let b = Replica::start(&api, &store, e);
    wait_for("b follows a", 10, || b.health.role() == Role::Follower("ksr-a".into())).await;

    a.store.hook.cut.store(true, Ordering::SeqCst);
    let cut = Instant::now();
    api.apply(pod("c", "10.1.1.3"));
    wait_for("b takes over", 20, || b.leading()).await;
    assert!(cut.elapsed() >= Duration::from_millis(1500), "a kept leading for the store deadline");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !has_key(&store, "/contiv/k8s/pod/default/c").await {
        assert!(Instant::now() < deadline, "the new leader reflects the pod added while a was cut off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!a.leading(), "a stands aside");
    b.stop().await;
    a.stop().await;
}
