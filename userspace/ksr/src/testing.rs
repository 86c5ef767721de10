//! A fake Kubernetes API server for tests (feature `test-support`): serves real list and
//! watch JSON for the six kinds contiv reflects, on 127.0.0.1, from an in-memory object set
//! with resourceVersions and an event log.
//!
//! Tests mutate the set ([`FakeApiServer::apply`], [`FakeApiServer::delete`]), break every
//! open watch ([`FakeApiServer::break_watches`]: clients re-watch from their last
//! resourceVersion), and expire history ([`FakeApiServer::expire_history`]: watches from an
//! older resourceVersion get a `410 Gone` ERROR event, forcing a relist).
//! [`FakeApiServer::delete_silently`] removes an object without a watch event, as if the
//! event had been lost, so only a relist can notice.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;

/// The API path, list kind and apiVersion of a resource.
struct ResourceType {
    path: &'static str,
    kind: &'static str,
    api_version: &'static str,
}

const RESOURCES: [ResourceType; 6] = [
    ResourceType { path: "/api/v1/pods", kind: "Pod", api_version: "v1" },
    ResourceType { path: "/api/v1/namespaces", kind: "Namespace", api_version: "v1" },
    ResourceType { path: "/api/v1/services", kind: "Service", api_version: "v1" },
    ResourceType { path: "/api/v1/nodes", kind: "Node", api_version: "v1" },
    ResourceType {
        path: "/apis/discovery.k8s.io/v1/endpointslices",
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
    },
    ResourceType {
        path: "/apis/networking.k8s.io/v1/networkpolicies",
        kind: "NetworkPolicy",
        api_version: "networking.k8s.io/v1",
    },
];

fn resource_of_kind(kind: &str) -> Option<&'static ResourceType> {
    RESOURCES.iter().find(|r| r.kind == kind)
}

fn resource_of_path(path: &str) -> Option<&'static ResourceType> {
    RESOURCES.iter().find(|r| r.path == path)
}

#[derive(Default)]
struct Cluster {
    rv: u64,
    /// path -> (namespace, name) -> object
    objects: HashMap<&'static str, BTreeMap<(String, String), Value>>,
    /// (path, rv, type, object)
    log: Vec<(&'static str, u64, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_watchable: u64,
    /// List requests served, per path.
    lists: HashMap<&'static str, usize>,
    /// Watch requests served, per path.
    watches: HashMap<&'static str, usize>,
}

struct Shared {
    cluster: Mutex<Cluster>,
    changed: watch::Sender<u64>,
    breaker: watch::Sender<u64>,
}

/// See the module docs. Stops serving when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

fn id_of(obj: &Value) -> (String, String) {
    let m = &obj["metadata"];
    (m["namespace"].as_str().unwrap_or_default().to_string(), m["name"].as_str().unwrap_or_default().to_string())
}

impl FakeApiServer {
    /// Starts serving on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            cluster: Mutex::new(Cluster { rv: 100, oldest_watchable: 0, ..Cluster::default() }),
            changed: watch::channel(0).0,
            breaker: watch::channel(0).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeApiServer { addr, shared, task })
    }

    /// The server URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client talking to this server.
    pub fn client(&self) -> kube::Client {
        let uri = self.url().parse().expect("loopback URL parses");
        kube::Client::try_from(kube::Config::new(uri)).expect("plain-HTTP kube client")
    }

    /// Creates or replaces an object (JSON with `kind`, `metadata.name`, and
    /// `metadata.namespace` for namespaced kinds); emits ADDED or MODIFIED.
    pub fn apply(&self, mut obj: Value) {
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let res = resource_of_kind(&kind).unwrap_or_else(|| panic!("fake API server does not serve kind {kind:?}"));
        let mut c = self.shared.cluster.lock().expect("fake apiserver lock");
        c.rv += 1;
        let rv = c.rv;
        obj["apiVersion"] = json!(res.api_version);
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let id = id_of(&obj);
        let existed = c.objects.entry(res.path).or_default().insert(id, obj.clone()).is_some();
        c.log.push((res.path, rv, if existed { "MODIFIED" } else { "ADDED" }, obj));
        drop(c);
        self.shared.changed.send_replace(rv);
    }

    /// Deletes an object; emits DELETED. Returns whether it existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.remove(kind, namespace, name, true)
    }

    /// Deletes an object without a watch event (a lost event).
    pub fn delete_silently(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.remove(kind, namespace, name, false)
    }

    fn remove(&self, kind: &str, namespace: &str, name: &str, emit: bool) -> bool {
        let res = resource_of_kind(kind).unwrap_or_else(|| panic!("unknown kind {kind:?}"));
        let mut c = self.shared.cluster.lock().expect("fake apiserver lock");
        let Some(mut obj) = c.objects.entry(res.path).or_default().remove(&(namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        c.rv += 1;
        let rv = c.rv;
        if emit {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            c.log.push((res.path, rv, "DELETED", obj));
        }
        drop(c);
        self.shared.changed.send_replace(rv);
        true
    }

    /// Ends every open watch stream (clients re-watch from their last resourceVersion).
    pub fn break_watches(&self) {
        self.shared.breaker.send_modify(|g| *g += 1);
    }

    /// Forgets all history: a watch from any resourceVersion before now gets `410 Gone`.
    pub fn expire_history(&self) {
        let mut c = self.shared.cluster.lock().expect("fake apiserver lock");
        c.rv += 1;
        c.oldest_watchable = c.rv;
        c.log.clear();
    }

    /// List requests served for a kind so far.
    pub fn list_count(&self, kind: &str) -> usize {
        let res = resource_of_kind(kind).unwrap_or_else(|| panic!("unknown kind {kind:?}"));
        self.shared.cluster.lock().expect("fake apiserver lock").lists.get(res.path).copied().unwrap_or(0)
    }

    /// Watch requests served for a kind so far.
    pub fn watch_count(&self, kind: &str) -> usize {
        let res = resource_of_kind(kind).unwrap_or_else(|| panic!("unknown kind {kind:?}"));
        self.shared.cluster.lock().expect("fake apiserver lock").watches.get(res.path).copied().unwrap_or(0)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code.as_u16()});
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn handle(State(shared): State<Arc<Shared>>, uri: Uri, RawQuery(q): RawQuery) -> Response {
    let Some(res) = resource_of_path(uri.path()) else {
        return status(StatusCode::NOT_FOUND, "NotFound", &format!("the server could not find {}", uri.path()));
    };
    let q = query_map(q.as_deref());
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        let mut c = shared.cluster.lock().expect("fake apiserver lock");
        *c.lists.entry(res.path).or_default() += 1;
        let items: Vec<Value> = c.objects.get(res.path).map(|m| m.values().cloned().collect()).unwrap_or_default();
        let body = json!({"apiVersion": res.api_version, "kind": format!("{}List", res.kind),
                          "metadata": {"resourceVersion": c.rv.to_string()}, "items": items});
        return ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    }
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let changed = shared.changed.subscribe();
    let mut breaker = shared.breaker.subscribe();
    breaker.borrow_and_update();
    let gone = {
        let mut c = shared.cluster.lock().expect("fake apiserver lock");
        *c.watches.entry(res.path).or_default() += 1;
        from < c.oldest_watchable
    };
    if gone {
        let ev = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
        let line = format!("{ev}\n");
        return ([(header::CONTENT_TYPE, "application/json")], line).into_response();
    }
    let path = res.path;
    let stream = futures::stream::unfold((from, false), move |(last, done)| {
        let shared = shared.clone();
        let mut changed = changed.clone();
        let mut breaker = breaker.clone();
        async move {
            if done {
                return None;
            }
            loop {
                // A broken watch ends before it emits anything more: otherwise an event
                // racing the break could still reach the client.
                if breaker.has_changed().unwrap_or(true) {
                    return None;
                }
                changed.borrow_and_update();
                let next = {
                    let c = shared.cluster.lock().expect("fake apiserver lock");
                    c.log.iter().find(|(p, rv, _, _)| *p == path && *rv > last).cloned()
                };
                if let Some((_, rv, ty, obj)) = next {
                    let line = format!("{}\n", json!({"type": ty, "object": obj}));
                    return Some((Ok::<_, Infallible>(Bytes::from(line)), (rv, false)));
                }
                tokio::select! {
                    biased;
                    _ = breaker.changed() => return None,
                    r = changed.changed() => if r.is_err() { return None },
                }
            }
        }
    });
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response()
}
