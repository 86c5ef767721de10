//! netctl: manifests -> store, equality with what contiv-ksr writes, bad-YAML handling, get.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use contiv_cluster_model::keys;
use contiv_netctl::get::{Format, Resource};
use contiv_netctl::manifest::{self, ManifestError};
use contiv_netctl::{ApplyOutcome, DeleteOutcome};
use contiv_store::{Store, StoreConfig};
use serde::Deserialize;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

async fn embedded(dir: &Path) -> Arc<dyn Store> {
    contiv_store::open(&StoreConfig::embedded(dir)).await.expect("embedded store")
}

async fn k8s_content(store: &Arc<dyn Store>) -> BTreeMap<String, Vec<u8>> {
    store.list(keys::K8S_PREFIX).await.unwrap().kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

/// The fixture documents as the API server would hold them (namespace defaulted).
fn raw_documents(dir: &Path) -> Vec<Value> {
    let mut docs = Vec::new();
    for f in manifest::manifest_files(dir).unwrap() {
        let text = std::fs::read_to_string(&f).unwrap();
        for de in serde_yaml_ng::Deserializer::from_str(&text) {
            let mut v = Value::deserialize(de).unwrap();
            if v.is_null() {
                continue;
            }
            let namespaced = !matches!(v["kind"].as_str(), Some("Namespace" | "Node"));
            if namespaced && v["metadata"].get("namespace").is_none() {
                v["metadata"]["namespace"] = "default".into();
            }
            docs.push(v);
        }
    }
    docs
}

#[tokio::test]
async fn apply_fixture_set_equals_ksr_reflection_of_the_same_objects() {
    let dir = fixtures().join("cluster");
    // KSR reflecting the objects from a (fake) API server.
    let api = contiv_ksr::testing::FakeApiServer::start().await.unwrap();
    let docs = raw_documents(&dir);
    assert_eq!(docs.len(), 9, "fixture set size");
    for d in &docs {
        api.apply(d.clone());
    }
    let ksr_dir = tempfile::tempdir().unwrap();
    let ksr_store = embedded(ksr_dir.path()).await;
    let ksr = contiv_ksr::Reflector::start(api.client(), ksr_store.clone(), Duration::from_millis(200));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ksr.mirror.ready().await {
        assert!(Instant::now() < deadline, "ksr did not sync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // netctl applying the YAML.
    let net_dir = tempfile::tempdir().unwrap();
    let net_store = embedded(net_dir.path()).await;
    let manifests = manifest::load_all(&[dir]).expect("fixtures are valid");
    let objects: Vec<_> = manifests.into_iter().flat_map(|m| m.objects).collect();
    let report = contiv_netctl::apply(&net_store, &objects).await.unwrap();
    assert!(report.iter().all(|(_, o)| *o == ApplyOutcome::Created));

    let from_ksr = k8s_content(&ksr_store).await;
    let from_netctl = k8s_content(&net_store).await;
    assert_eq!(from_netctl.len(), 9);
    assert_eq!(from_netctl.keys().collect::<Vec<_>>(), from_ksr.keys().collect::<Vec<_>>());
    for (k, v) in &from_ksr {
        assert_eq!(
            from_netctl.get(k),
            Some(v),
            "value of {k} differs:\nksr:    {}\nnetctl: {}",
            String::from_utf8_lossy(v),
            String::from_utf8_lossy(from_netctl.get(k).map(Vec::as_slice).unwrap_or_default())
        );
    }
    assert!(from_netctl.contains_key("/contiv/k8s/service/default/dns"));
    assert!(from_netctl.contains_key("/contiv/k8s/networkpolicy/shop/db-from-web"));
}

#[tokio::test]
async fn apply_twice_is_unchanged_and_delete_removes() {
    let dir = tempfile::tempdir().unwrap();
    let store = embedded(dir.path()).await;
    let m = manifest::load_file(&fixtures().join("cluster/20-shop.yaml")).unwrap();
    assert_eq!(m.objects.len(), 5);
    contiv_netctl::apply(&store, &m.objects).await.unwrap();
    let rev = store.list(keys::K8S_PREFIX).await.unwrap().revision;
    let again = contiv_netctl::apply(&store, &m.objects).await.unwrap();
    assert!(again.iter().all(|(_, o)| *o == ApplyOutcome::Unchanged));
    assert_eq!(store.list(keys::K8S_PREFIX).await.unwrap().revision, rev, "nothing rewritten");

    let changed = manifest::parse_manifest(
        Path::new("inline.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, labels: {app: api}}\n",
    )
    .unwrap();
    let r = contiv_netctl::apply(&store, &changed.objects).await.unwrap();
    assert_eq!(r, vec![("/contiv/k8s/pod/shop/web-0".to_string(), ApplyOutcome::Configured)]);

    let refs: Vec<_> = m.objects.iter().map(|o| o.object_ref()).collect();
    let d = contiv_netctl::delete(&store, &refs).await.unwrap();
    assert!(d.iter().all(|(_, o)| *o == DeleteOutcome::Deleted));
    assert!(k8s_content(&store).await.is_empty());
    let d = contiv_netctl::delete(&store, &refs[..1]).await.unwrap();
    assert_eq!(d[0].1, DeleteOutcome::NotFound);
    // Delete needs only identities: a manifest whose spec is invalid still names its objects,
    // and they match what apply derived from the valid one.
    let from_text = manifest::load_all_refs(&[fixtures().join("cluster/20-shop.yaml")]).unwrap();
    assert_eq!(from_text, refs);
    let bad = manifest::load_all_refs(&[fixtures().join("bad/field-type.yaml")]).unwrap();
    assert_eq!(bad[1].key(), "/contiv/k8s/service/shop/web");
    let dflt = manifest::load_all_refs(&[fixtures().join("cluster/30-default-ns.yml")]).unwrap();
    assert_eq!(dflt[0].key(), "/contiv/k8s/service/default/dns");
    assert!(manifest::load_all_refs(&[fixtures().join("bad/unsupported.yaml")]).is_err());
    assert!(manifest::load_all_refs(&[fixtures().join("bad/missing-name.yaml")]).is_err());
}

fn load_err(name: &str) -> ManifestError {
    let path = fixtures().join("bad").join(name);
    let errs = manifest::load_all(std::slice::from_ref(&path)).expect_err("bad fixture must fail");
    assert_eq!(errs.len(), 1);
    let e = errs.into_iter().next().unwrap();
    assert!(e.to_string().contains(&path.display().to_string()), "error names the file: {e}");
    e
}

#[test]
fn bad_yaml_errors_name_file_document_and_field() {
    let e = load_err("syntax.yaml");
    assert!(matches!(e, ManifestError::Yaml { document: 2, .. }), "{e}");

    let e = load_err("field-type.yaml");
    assert_eq!(e.document(), Some(2));
    assert_eq!(e.field(), Some("spec.ports[0].port"), "{e}");
    assert!(e.to_string().contains("Service/web"), "{e}");

    let e = load_err("model.yaml");
    assert_eq!(e.document(), Some(3));
    assert_eq!(e.field(), Some("spec.ingress[0].from[0].ipBlock.except[0]"), "{e}");

    let e = load_err("unsupported.yaml");
    assert!(matches!(&e, ManifestError::Unsupported { kind, document: 1, .. } if kind == "Deployment"), "{e}");

    let e = load_err("wrong-api-version.yaml");
    assert_eq!(e.field(), Some("apiVersion"), "{e}");

    let e = load_err("missing-name.yaml");
    assert_eq!(e.field(), Some("metadata.name"), "{e}");

    let e = manifest::parse_manifest(Path::new("x.yaml"), "kind: Pod\nmetadata: {name: a}\n").unwrap_err();
    assert_eq!(e.field(), Some("apiVersion"));
    let e = manifest::parse_manifest(Path::new("x.yaml"), "- just\n- a list\n").unwrap_err();
    assert_eq!(e.document(), Some(1));
}

fn netctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_netctl"))
        .args(args)
        .env_remove("CONTIV_ETCD_ENDPOINTS")
        .output()
        .expect("run netctl")
}

/// As kubectl: files without a single object are an error, not a silent success.
#[test]
fn cli_refuses_files_without_objects() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "# nothing yet\n---\n---\n").unwrap();
    let only_other_files = dir.path().join("manifests");
    std::fs::create_dir(&only_other_files).unwrap();
    std::fs::write(only_other_files.join("svc.YAML"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
        .unwrap();
    for verb in ["apply", "delete"] {
        for path in [&empty, &only_other_files] {
            let out = netctl(&["--data-dir", data.to_str().unwrap(), verb, "-f", path.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(1), "{verb} -f {}", path.display());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(&format!("no objects passed to {verb}")), "{stderr}");
        }
    }
}

#[tokio::test]
async fn cli_writes_nothing_when_any_file_fails_validation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let good = fixtures().join("cluster");
    let bad = fixtures().join("bad/field-type.yaml");
    let out = netctl(&["--data-dir", data, "apply", "-f", good.to_str().unwrap(), "-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("field-type.yaml: document 2") && stderr.contains("spec.ports[0].port"), "{stderr}");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    {
        let store = embedded(dir.path()).await;
        assert!(k8s_content(&store).await.is_empty(), "a failing file must block every write");
    }

    // The good set alone applies, and `get` shows it.
    let out = netctl(&["--data-dir", data, "apply", "-f", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("/contiv/k8s/pod/shop/web-0 created"), "{stdout}");

    let out = netctl(&["--data-dir", data, "get", "pods"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE") && lines[0].contains("IPS"), "{table}");
    assert!(lines.iter().any(|l| l.contains("web-0") && l.contains("10.1.1.5") && l.contains("node-a")), "{table}");
    assert_eq!(lines.len(), 3, "{table}");

    let out = netctl(&["--data-dir", data, "get", "services", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json output");
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert!(arr.iter().any(|s| s["name"] == "web" && s["ports"][0]["node_port"] == 30080));

    let out = netctl(&["--data-dir", data, "delete", "-f", good.join("20-shop.yaml").to_str().unwrap()]);
    assert!(out.status.success());
    let out = netctl(&["--data-dir", data, "get", "pods"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1, "only the header is left");
}

#[tokio::test]
async fn get_tables_for_every_resource_and_skips_malformed_values() {
    use contiv_node_registry::{IpamAllocation, IpamConfig, NodeIdClaim, NodeRegistration};
    let dir = tempfile::tempdir().unwrap();
    let store = embedded(dir.path()).await;
    let objects: Vec<_> =
        manifest::load_all(&[fixtures().join("cluster")]).unwrap().into_iter().flat_map(|m| m.objects).collect();
    contiv_netctl::apply(&store, &objects).await.unwrap();
    use contiv_cluster_model::encode as enc;
    store.put(keys::IPAM_CONFIG, enc(&IpamConfig::default()), None).await.unwrap();
    let cidr: ipnet::IpNet = "10.1.1.0/24".parse().unwrap();
    store
        .put(&keys::ipam_node("node-a"), enc(&IpamAllocation { name: "node-a".into(), id: 1, pod_cidr: cidr }), None)
        .await
        .unwrap();
    store.put(&keys::node_id(1), enc(&NodeIdClaim { name: "node-a".into() }), None).await.unwrap();
    store
        .put(
            &keys::node("node-a"),
            enc(&NodeRegistration { name: "node-a".into(), id: 1, addresses: vec![], pod_cidr: cidr, uplink_ip: None }),
            None,
        )
        .await
        .unwrap();
    store.put("/contiv/k8s/pod/shop/garbage", b"{nope".to_vec(), None).await.unwrap();

    let get = |what| {
        let store = store.clone();
        async move { contiv_netctl::get::get(&store, what, None, Format::Table).await.unwrap() }
    };
    let nodes = get(Resource::Nodes).await;
    assert!(
        nodes.text.lines().any(|l| l.starts_with("node-a")
            && l.contains("10.1.1.0/24")
            && l.contains(" 1 ")
            && l.contains("192.168.1.10")),
        "{}",
        nodes.text
    );
    let pods = get(Resource::Pods).await;
    assert_eq!(pods.warnings.len(), 1, "{:?}", pods.warnings);
    assert!(pods.warnings[0].contains("/contiv/k8s/pod/shop/garbage"));
    assert_eq!(pods.text.lines().count(), 3);
    let svcs = get(Resource::Services).await;
    assert!(svcs.text.contains("http=80:30080/TCP->http"), "{}", svcs.text);
    let eps = get(Resource::Endpoints).await;
    assert!(eps.text.lines().any(|l| l.contains("web-abc") && l.contains("10.1.1.5")), "{}", eps.text);
    let pols = get(Resource::Policies).await;
    assert!(
        pols.text.lines().any(|l| l.contains("db-from-web") && l.contains("app=db") && l.contains("Ingress,Egress")),
        "{}",
        pols.text
    );
    let ipam = get(Resource::Ipam).await;
    assert!(ipam.text.contains("pod subnet 10.1.0.0/16 split into /24"), "{}", ipam.text);
    assert!(ipam.text.lines().any(|l| l.starts_with('1') && l.contains("node-a") && l.contains("ok")), "{}", ipam.text);
    let json = contiv_netctl::get::get(&store, Resource::Ipam, None, Format::Json).await.unwrap();
    let v: Value = serde_json::from_str(&json.text).unwrap();
    assert_eq!(v["allocations"][0]["id"], 1);
    // Namespace filter.
    let only_default =
        contiv_netctl::get::get(&store, Resource::Services, Some("default"), Format::Json).await.unwrap();
    let v: Value = serde_json::from_str(&only_default.text).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn get_ipam_shows_id_claims_that_no_allocation_uses() {
    use contiv_cluster_model::encode as enc;
    use contiv_node_registry::{IpamAllocation, NodeIdClaim};
    let dir = tempfile::tempdir().unwrap();
    let store = embedded(dir.path()).await;
    let cidr: ipnet::IpNet = "10.1.1.0/24".parse().unwrap();
    let alloc = IpamAllocation { name: "node-a".into(), id: 1, pod_cidr: cidr };
    store.put(&keys::ipam_node("node-a"), enc(&alloc), None).await.unwrap();
    for (id, holder) in [(1, "node-a"), (7, "node-z"), (3, "node-a")] {
        store.put(&keys::node_id(id), enc(&NodeIdClaim { name: holder.into() }), None).await.unwrap();
    }
    let out = contiv_netctl::get::get(&store, Resource::Ipam, None, Format::Table).await.unwrap();
    let rows: Vec<Vec<&str>> = out.text.lines().skip(3).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [
            vec!["1", "node-a", "10.1.1.0/24", "ok"],
            vec!["3", "node-a", "unallocated", "claimed"],
            vec!["7", "node-z", "unallocated", "claimed"]
        ],
        "{}",
        out.text
    );
}

#[tokio::test]
async fn cli_refuses_unknown_fields_and_applies_and_deletes_lists() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let data = data.to_str().unwrap();
    // A misspelt targetPort: kubectl refuses it; so does netctl, and writes nothing.
    let svc = dir.path().join("svc.yaml");
    std::fs::write(
        &svc,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  ports: [{port: 80, targetport: 8080}]\n",
    )
    .unwrap();
    let out = netctl(&["--data-dir", data, "apply", "-f", svc.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .contains(&format!("{}: document 2 (Service/web): unknown field spec.ports[0].targetport", svc.display())),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was written"), "{stderr}");

    // What `kubectl get -o yaml` prints: a List, applied item by item, and deleted so.
    let list = dir.path().join("list.yaml");
    std::fs::write(
        &list,
        "apiVersion: v1\nkind: List\nmetadata: {resourceVersion: \"\"}\nitems:\n\
         - apiVersion: v1\n  kind: Namespace\n  metadata: {name: shop, uid: 1a2b, resourceVersion: \"5\"}\n  status: {phase: Active}\n\
         - apiVersion: v1\n  kind: Service\n  metadata: {name: web, namespace: shop, creationTimestamp: \"2025-01-02T03:04:05Z\"}\n  \
           spec: {clusterIP: 10.96.0.20, ports: [{port: 80, targetPort: 8080, protocol: TCP}]}\n  status: {loadBalancer: {}}\n",
    )
    .unwrap();
    let out = netctl(&["--data-dir", data, "apply", "-f", list.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/contiv/k8s/namespace/shop created\n/contiv/k8s/service/shop/web created\n"
    );
    let out = netctl(&["--data-dir", data, "get", "services"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("80/TCP->8080"), "{}", String::from_utf8_lossy(&out.stdout));
    let out = netctl(&["--data-dir", data, "delete", "-f", list.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/contiv/k8s/namespace/shop deleted\n/contiv/k8s/service/shop/web deleted\n"
    );
}

/// netctl reaches an etcd that serves TLS with client certificates only, as deploy/etcd
/// does, with the same flags as contiv-ksr; without them it is refused with a clear error.
#[test]
fn cli_reaches_an_etcd_that_requires_tls_and_client_certificates() {
    let pki = contiv_store::testing::TestPki::generate().expect("test PKI");
    let server = contiv_store::testing::EtcdServer::start_tls(&pki).expect("start etcd with TLS");
    let (cert, key) = pki.client();
    let (ca, cert, key) = (pki.ca(), cert.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned());
    let endpoint = server.endpoint();
    let tls = [
        "--etcd",
        &endpoint,
        "--etcd-ca-file",
        ca.to_str().unwrap(),
        "--etcd-cert-file",
        &cert,
        "--etcd-key-file",
        &key,
    ];
    let good = fixtures().join("cluster");
    let out = netctl(&[&tls[..], &["apply", "-f", good.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = netctl(&[&tls[..], &["get", "pods", "-n", "shop"]].concat());
    assert!(String::from_utf8_lossy(&out.stdout).contains("web-0"), "{}", String::from_utf8_lossy(&out.stdout));

    let out = netctl(&["--etcd", &endpoint, "get", "pods"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("need TLS settings"), "{stderr}");
    let out = netctl(&["--etcd", &endpoint, "--etcd-cert-file", &cert, "--etcd-key-file", &key, "get", "pods"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("need --etcd-ca-file"), "{stderr}");
}
