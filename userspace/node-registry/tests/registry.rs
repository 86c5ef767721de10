//! Node registry against a real etcd (and the embedded store where noted).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use contiv_cluster_model::NodeAddress;
use contiv_node_registry::{DepartedNodes, IpamConfig, NodeRegistry, RegistryError};
use contiv_store::testing::EtcdServer;
use contiv_store::{Store, StoreConfig};

async fn etcd_store(server: &EtcdServer) -> Arc<dyn Store> {
    contiv_store::open(&StoreConfig::etcd([server.endpoint()])).await.expect("connect etcd")
}

fn addr(ip: &str) -> Vec<NodeAddress> {
    vec![NodeAddress { address_type: "InternalIP".into(), address: ip.into() }]
}

async fn concurrent(store: Arc<dyn Store>, n: usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        // Each agent has its own registry (as separate processes would).
        let registry = NodeRegistry::new(store.clone(), IpamConfig::default()).unwrap();
        tasks.push(tokio::spawn(async move {
            registry.register(&format!("node-{i}"), addr(&format!("192.168.0.{i}"))).await.expect("register")
        }));
    }
    let regs: Vec<_> = futures::future::join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
    let ids: BTreeSet<u32> = regs.iter().map(|r| r.node.id).collect();
    assert_eq!(ids.len(), n, "distinct ids: {ids:?}");
    assert_eq!(ids, (1..=n as u32).collect(), "ids are the lowest free ones, from 1");
    let cidrs: Vec<ipnet::IpNet> = regs.iter().map(|r| r.node.pod_cidr).collect();
    for (i, a) in cidrs.iter().enumerate() {
        for b in &cidrs[i + 1..] {
            assert!(!a.contains(b) && !b.contains(a), "{a} and {b} overlap");
        }
    }
    for r in &regs {
        assert_eq!(r.node.pod_cidr, IpamConfig::default().pod_cidr(r.node.id).unwrap());
    }
    let registry = NodeRegistry::new(store.clone(), IpamConfig::default()).unwrap();
    assert_eq!(registry.nodes().await.unwrap().len(), n);
    assert_eq!(registry.allocations().await.unwrap().len(), n);
    assert_eq!(registry.allocations_by_id().await.unwrap().len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_get_distinct_ids_etcd() {
    let server = EtcdServer::start().expect("etcd");
    // One client connection per agent, like real agents.
    let store = etcd_store(&server).await;
    concurrent(store, 16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_on_separate_connections_etcd() {
    let server = EtcdServer::start().expect("etcd");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let endpoint = server.endpoint();
        tasks.push(tokio::spawn(async move {
            let store = contiv_store::open(&StoreConfig::etcd([endpoint])).await.unwrap();
            let registry = NodeRegistry::new(store, IpamConfig::default()).unwrap();
            registry.allocate(&format!("n{i}")).await.unwrap().id
        }));
    }
    let ids: BTreeSet<u32> = futures::future::join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(ids, (1..=16).collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_get_distinct_ids_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    concurrent(store, 16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_id_and_cidr() {
    let server = EtcdServer::start().expect("etcd");
    let first = {
        let registry = NodeRegistry::new(etcd_store(&server).await, IpamConfig::default()).unwrap();
        registry.register("a", addr("10.0.0.1")).await.unwrap();
        let b = registry.register("b", addr("10.0.0.2")).await.unwrap();
        let node = b.node.clone();
        b.deregister().await.unwrap();
        assert!(registry.nodes().await.unwrap().iter().all(|n| n.name != "b"), "deregistered node is gone");
        node
    };
    // A new process (new connection, new registry) registers the same name.
    let registry = NodeRegistry::new(etcd_store(&server).await, IpamConfig::default()).unwrap();
    registry.register("c", addr("10.0.0.3")).await.unwrap();
    let again = registry.register("b", addr("10.0.0.22")).await.unwrap();
    assert_eq!(again.node.id, first.id);
    assert_eq!(again.node.pod_cidr, first.pod_cidr);
    assert_eq!(again.node.addresses, addr("10.0.0.22"), "addresses are refreshed");
    let c = registry.allocate("c").await.unwrap();
    assert_eq!(c.id, 3, "a and b keep 1 and 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_expires_with_its_lease_but_allocation_stays() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    let registry = NodeRegistry::new(store.clone(), IpamConfig::default()).unwrap().with_lease_ttl(1);
    let reg = registry.register("gone", addr("10.0.0.9")).await.unwrap();
    // Kept alive: still there after several TTLs.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(registry.nodes().await.unwrap().len(), 1, "keep-alive holds the registration");
    drop(reg); // the agent dies
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(registry.nodes().await.unwrap().is_empty(), "registration expired");
    assert_eq!(registry.allocations().await.unwrap().len(), 1, "the allocation is not under the lease");
    assert_eq!(registry.allocate("gone").await.unwrap().id, 1);
}

#[tokio::test]
async fn ids_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    let plan = IpamConfig { pod_subnet_cidr: "10.9.0.0/22".parse().unwrap(), pod_prefix_len: 24 };
    let registry = NodeRegistry::new(store, plan).unwrap();
    let ids: Vec<u32> = [
        registry.allocate("a").await.unwrap(),
        registry.allocate("b").await.unwrap(),
        registry.allocate("c").await.unwrap(),
    ]
    .iter()
    .map(|a| a.id)
    .collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(registry.allocate("c").await.unwrap().pod_cidr.to_string(), "10.9.3.0/24");
    assert!(matches!(registry.allocate("d").await, Err(RegistryError::Exhausted { max: 3 })));
    assert!(registry.release("b").await.unwrap());
    assert_eq!(registry.allocate("d").await.unwrap().id, 2, "a released id is reused");
}

#[tokio::test]
async fn mismatched_plan_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    NodeRegistry::new(store.clone(), IpamConfig::default()).unwrap().allocate("a").await.unwrap();
    let other = IpamConfig { pod_subnet_cidr: "10.2.0.0/16".parse().unwrap(), pod_prefix_len: 24 };
    let err = NodeRegistry::new(store, other).unwrap().allocate("b").await.unwrap_err();
    assert!(matches!(err, RegistryError::ConfigMismatch { .. }), "{err}");
}

#[tokio::test]
async fn malformed_claim_counts_as_taken() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    store.put("/contiv/node-ids/1", b"garbage".to_vec(), None).await.unwrap();
    store.put("/contiv/nodes/broken", b"{".to_vec(), None).await.unwrap();
    let registry = NodeRegistry::new(store, IpamConfig::default()).unwrap();
    assert_eq!(registry.allocate("a").await.unwrap().id, 2);
    assert!(registry.nodes().await.unwrap().is_empty(), "malformed registration skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_or_deleted_key_is_re_registered_with_the_same_id() {
    let server = EtcdServer::start().expect("etcd");
    let store = etcd_store(&server).await;
    let registry = NodeRegistry::new(store.clone(), IpamConfig::default()).unwrap();
    registry.allocate("first").await.unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let registry = registry.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            registry
                .keep_registered("n", addr("10.0.0.5"), |n| seen.lock().unwrap().push((n.id, n.pod_cidr)), async {
                    let _ = stopped.await;
                })
                .await;
        })
    };
    let wait_for = |count: usize| {
        let seen = seen.clone();
        async move {
            for _ in 0..200 {
                if seen.lock().unwrap().len() >= count {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("expected {count} registrations, saw {:?}", seen.lock().unwrap());
        }
    };
    wait_for(1).await;
    // Someone (or an expiry) takes the lease away.
    let lease = store.get("/contiv/nodes/n").await.unwrap().expect("registered").lease;
    store.lease_revoke(lease).await.unwrap();
    wait_for(2).await;
    let regs = seen.lock().unwrap().clone();
    assert_eq!(regs[0], regs[1], "same id and CIDR after re-registering");
    assert_eq!(regs[0].0, 2);
    let mut present = false;
    for _ in 0..100 {
        if let Some(kv) = store.get("/contiv/nodes/n").await.unwrap() {
            assert_ne!(kv.lease, lease, "a new lease");
            present = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(present);
    // The key deleted while its lease lives (`etcdctl del`): registered again too, else
    // every other node would drop this one's routes until its agent restarts.
    store.delete("/contiv/nodes/n").await.unwrap();
    wait_for(3).await;
    let mut back = false;
    for _ in 0..100 {
        if store.get("/contiv/nodes/n").await.unwrap().is_some() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the deleted registration was not written again");
    stop.send(()).unwrap();
    task.await.unwrap();
    assert!(store.get("/contiv/nodes/n").await.unwrap().is_none(), "withdrawn at shutdown");
}

/// A store wiped (or restored from a backup older than a node) loses the node's
/// allocation. The node's pods hold addresses of its pod CIDR: the agent, which knows its
/// ID, claims that ID again rather than the lowest free one; if another node took it
/// meanwhile, or the store allocates the node another ID, it is an error, never a move.
#[tokio::test]
async fn a_node_keeps_its_id_across_a_wiped_store_or_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    let registry = |s: &Arc<dyn Store>| NodeRegistry::new(s.clone(), IpamConfig::default()).unwrap();
    let (a, b, c) = (registry(&store), registry(&store), registry(&store));
    for (r, n) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        r.allocate(n).await.unwrap();
    }
    assert_eq!(c.allocate("c").await.unwrap().id, 3);

    // Wiped: c's agent (this registry, which allocated 3) registers again first.
    store.delete_prefix("/contiv/").await.unwrap();
    let again = c.allocate("c").await.unwrap();
    assert_eq!((again.id, again.pod_cidr.to_string()), (3, "10.1.3.0/24".to_string()));
    // A new node takes the lowest free ID, not c's.
    assert_eq!(registry(&store).allocate("d").await.unwrap().id, 1);

    // A restarted agent names the ID its state records.
    store.delete_prefix("/contiv/").await.unwrap();
    let restarted = registry(&store);
    restarted.pin("c", IpamConfig::default().id_of("10.1.3.0/24".parse().unwrap()).unwrap());
    assert_eq!(restarted.allocate("c").await.unwrap().id, 3);

    // Wiped, and another node took c's ID first: refused, loudly.
    store.delete_prefix("/contiv/").await.unwrap();
    let e = registry(&store);
    e.pin("e", 3);
    assert_eq!(e.allocate("e").await.unwrap().id, 3);
    match c.allocate("c").await {
        Err(RegistryError::Conflict { id: 3, holder, .. }) => assert_eq!(holder, "e"),
        other => panic!("expected a conflict over id 3: {other:?}"),
    }

    // The store allocates c another ID than the one it runs with: refused.
    store.delete_prefix("/contiv/").await.unwrap();
    registry(&store).allocate("x").await.unwrap();
    registry(&store).allocate("c").await.unwrap(); // id 2, by a registry that knew nothing
    match c.allocate("c").await {
        Err(RegistryError::Moved { running: 3, stored: 2, .. }) => {}
        other => panic!("expected a refusal to move c from id 3 to 2: {other:?}"),
    }
}

/// Two hosts under one node name (a cloned machine) would hand out the same pod addresses:
/// while one holds a live registration, the other (another underlay address) is refused;
/// the same host registering again (an agent restart within the lease) is not.
#[tokio::test]
async fn a_second_host_under_a_live_node_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    let registry = NodeRegistry::new(store.clone(), IpamConfig::default()).unwrap();
    let details =
        |ip: &str| contiv_node_registry::NodeDetails { addresses: addr(ip), uplink_ip: Some(ip.parse().unwrap()) };
    let first = registry.register("n", details("192.168.0.5")).await.unwrap();
    match registry.register("n", details("192.168.0.6")).await {
        Err(RegistryError::NameTaken { address, .. }) => assert_eq!(address.to_string(), "192.168.0.5"),
        other => panic!("expected the clone to be refused: {:?}", other.map(|r| r.node.clone())),
    }
    let again = registry.register("n", details("192.168.0.5")).await.expect("the same host again");
    assert_eq!(again.node.id, first.node.id);
    drop(first);
    again.deregister().await.unwrap();
    let clone = registry.register("n", details("192.168.0.6")).await.expect("once the name is free");
    assert_eq!(clone.node.uplink_ip, Some("192.168.0.6".parse().unwrap()));
}

#[tokio::test]
async fn departed_nodes_give_their_ids_back_after_two_sweeps() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    let plan = IpamConfig { pod_subnet_cidr: "10.9.0.0/22".parse().unwrap(), pod_prefix_len: 24 };
    let registry = NodeRegistry::new(store.clone(), plan).unwrap();
    // "member" is a Kubernetes Node whose agent is down; "live" has a running agent but no
    // Node object (yet); "gone" is neither. They take the plan's three IDs.
    for name in ["member", "live", "gone"] {
        registry.allocate(name).await.unwrap();
    }
    assert!(matches!(registry.allocate("next").await, Err(RegistryError::Exhausted { .. })));
    let _live = registry.register("live", addr("10.0.0.2")).await.unwrap();
    let members: BTreeSet<String> = ["member".to_string()].into();
    let mut sweeper = DepartedNodes::new();

    assert!(sweeper.sweep(store.as_ref(), &members).await.unwrap().is_empty(), "the first sweep only notes");
    assert_eq!(sweeper.candidates().collect::<Vec<_>>(), ["gone"]);
    let released = sweeper.sweep(store.as_ref(), &members).await.unwrap();
    assert_eq!(released.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["gone"]);
    let claims = registry.allocations_by_id().await.unwrap();
    assert!(!claims.values().any(|n| n == "gone"), "the id claim goes with the allocation: {claims:?}");
    assert_eq!(registry.allocate("next").await.unwrap().id, released[0].id, "the id is free again");
    assert!(sweeper.sweep(store.as_ref(), &members).await.unwrap().is_empty());
    let names: Vec<String> = registry.allocations().await.unwrap().into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["live", "member", "next"]);
}

#[tokio::test]
async fn a_departed_node_changed_between_sweeps_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = contiv_store::open(&StoreConfig::embedded(dir.path())).await.unwrap();
    let registry = NodeRegistry::new(store.clone(), IpamConfig::default()).unwrap();
    registry.allocate("a").await.unwrap();
    registry.allocate("b").await.unwrap();
    let none = BTreeSet::new();
    let mut sweeper = DepartedNodes::new();
    assert!(sweeper.sweep(store.as_ref(), &none).await.unwrap().is_empty());
    // Between the sweeps, "a" comes back (registers) and "b" is re-allocated (released by
    // hand and allocated again: a new revision).
    let _a = registry.register("a", addr("10.0.0.1")).await.unwrap();
    assert!(registry.release("b").await.unwrap());
    registry.allocate("b").await.unwrap();
    assert!(sweeper.sweep(store.as_ref(), &none).await.unwrap().is_empty(), "neither is released");
    assert_eq!(sweeper.candidates().collect::<Vec<_>>(), ["b"]);
    assert_eq!(registry.allocations().await.unwrap().len(), 2);
}
