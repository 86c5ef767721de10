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
//!
//! It also serves `coordination.k8s.io/v1` Leases in namespaces (get, create, update) with
//! the API server's optimistic concurrency: an update whose `metadata.resourceVersion` is
//! not the stored one gets `409 Conflict`, a create of an existing Lease `409
//! AlreadyExists`. [`FakeApiServer::fail_leases`] makes Lease requests fail (an API server
//! the leader cannot reach). [`FakeApiServer::authorize`] enforces RBAC rules (403 for
//! anything they do not grant), and [`FakeApiServer::requests`] lists every request as
//! `(verb, group, resource)` so tests can compare what the code does with what a Role grants.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{Method, StatusCode, Uri, header};
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

/// One API request as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    /// get, list, watch, create, update, patch, delete.
    pub verb: String,
    /// API group ("" for the core group).
    pub group: String,
    /// Resource (plural).
    pub resource: String,
    /// Namespace of a namespaced request.
    pub namespace: Option<String>,
    /// Object name of a request for one object.
    pub name: Option<String>,
}

/// One RBAC rule, scoped to a namespace (a Role's) or cluster-wide (a ClusterRole's).
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// `None`: every namespace and cluster-scoped resources (ClusterRoleBinding).
    pub namespace: Option<String>,
    pub rule: k8s_openapi::api::rbac::v1::PolicyRule,
}

impl Grant {
    fn allows(&self, a: &Access) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        let r = &self.rule;
        if let Some(ns) = &self.namespace
            && a.namespace.as_ref() != Some(ns)
        {
            return false;
        }
        let names_ok = match (&r.resource_names, &a.name) {
            (Some(names), Some(n)) if !names.is_empty() => names.contains(n),
            (Some(names), None) if !names.is_empty() => false,
            _ => true,
        };
        any(&r.verbs, &a.verb)
            && any(r.api_groups.as_deref().unwrap_or_default(), &a.group)
            && any(r.resources.as_deref().unwrap_or_default(), &a.resource)
            && names_ok
    }
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
    /// Leases: (namespace, name) -> object.
    leases: BTreeMap<(String, String), Value>,
    /// Lease requests fail with 503 while set.
    leases_failing: bool,
    /// 409 answers given.
    conflicts: usize,
    /// RBAC in force; `None`: everything is allowed.
    grants: Option<Vec<Grant>>,
    /// Every request, in order.
    requests: Vec<Access>,
    /// Requests refused with 403.
    denied: Vec<Access>,
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

    /// Enforces RBAC from now on: a request no grant allows gets `403 Forbidden`.
    pub fn authorize(&self, grants: Vec<Grant>) {
        self.shared.cluster.lock().expect("fake apiserver lock").grants = Some(grants);
    }

    /// Every request served so far (allowed or not).
    pub fn requests(&self) -> Vec<Access> {
        self.shared.cluster.lock().expect("fake apiserver lock").requests.clone()
    }

    /// Requests refused with 403 so far.
    pub fn denied(&self) -> Vec<Access> {
        self.shared.cluster.lock().expect("fake apiserver lock").denied.clone()
    }

    /// While `on`, every Lease request fails with `503 Service Unavailable`.
    pub fn fail_leases(&self, on: bool) {
        self.shared.cluster.lock().expect("fake apiserver lock").leases_failing = on;
    }

    /// A Lease as stored (JSON), if it exists.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        let c = self.shared.cluster.lock().expect("fake apiserver lock");
        c.leases.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    /// Creates or overwrites a Lease directly (as another client would), bumping its
    /// resourceVersion.
    pub fn put_lease(&self, namespace: &str, name: &str, spec: Value) {
        let mut c = self.shared.cluster.lock().expect("fake apiserver lock");
        c.rv += 1;
        let obj = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": c.rv.to_string()}, "spec": spec});
        c.leases.insert((namespace.to_string(), name.to_string()), obj);
    }

    /// `409` answers (resourceVersion conflicts, create of an existing object) so far.
    pub fn conflicts(&self) -> usize {
        self.shared.cluster.lock().expect("fake apiserver lock").conflicts
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

/// Splits an API path into (group, namespace, resource, name).
fn parse_path(path: &str) -> Option<(String, Option<String>, String, Option<String>)> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => return None,
    };
    let s = |x: &&str| x.to_string();
    match rest {
        [res] => Some((group, None, s(res), None)),
        ["namespaces", ns, res] => Some((group, Some(s(ns)), s(res), None)),
        ["namespaces", ns, res, name] => Some((group, Some(s(ns)), s(res), Some(s(name)))),
        [res, name] => Some((group, None, s(res), Some(s(name)))),
        _ => None,
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    let q = query_map(q.as_deref());
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let Some((group, namespace, resource, name)) = parse_path(uri.path()) else {
        return status(StatusCode::NOT_FOUND, "NotFound", &format!("the server could not find {}", uri.path()));
    };
    let verb = match (&method, name.is_some(), watching) {
        (&Method::GET, _, true) => "watch",
        (&Method::GET, true, false) => "get",
        (&Method::GET, false, false) => "list",
        (&Method::POST, _, _) => "create",
        (&Method::PUT, _, _) => "update",
        (&Method::PATCH, _, _) => "patch",
        (&Method::DELETE, _, _) => "delete",
        _ => return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "method not allowed"),
    };
    let access = Access { verb: verb.to_string(), group, resource, namespace, name };
    {
        let mut c = shared.cluster.lock().expect("fake apiserver lock");
        c.requests.push(access.clone());
        let allowed = c.grants.as_ref().is_none_or(|g| g.iter().any(|g| g.allows(&access)));
        if !allowed {
            c.denied.push(access.clone());
            let msg = format!(
                "forbidden: cannot {} resource \"{}\" in API group \"{}\"{}",
                access.verb,
                access.resource,
                access.group,
                access.namespace.as_ref().map_or_else(String::new, |n| format!(" in the namespace \"{n}\""))
            );
            return status(StatusCode::FORBIDDEN, "Forbidden", &msg);
        }
    }
    if access.group == "coordination.k8s.io" && access.resource == "leases" {
        return lease_request(&shared, &access, &body);
    }
    let Some(res) = resource_of_path(uri.path()) else {
        return status(StatusCode::NOT_FOUND, "NotFound", &format!("the server could not find {}", uri.path()));
    };
    if verb == "list" {
        let mut c = shared.cluster.lock().expect("fake apiserver lock");
        *c.lists.entry(res.path).or_default() += 1;
        // Paged like the API server: `limit` items, then a `continue` token (here the offset;
        // the fake serves pages from the current state, not a snapshot).
        let all = c.objects.get(res.path);
        let total = all.map_or(0, BTreeMap::len);
        let offset: usize = q.get("continue").and_then(|v| v.parse().ok()).unwrap_or(0);
        let limit: usize = q.get("limit").and_then(|v| v.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
        let items: Vec<Value> = all.map(|m| m.values().skip(offset).take(limit).cloned().collect()).unwrap_or_default();
        let mut metadata = json!({"resourceVersion": c.rv.to_string()});
        if offset.saturating_add(items.len()) < total {
            metadata["continue"] = json!((offset + items.len()).to_string());
        }
        let body = json!({"apiVersion": res.api_version, "kind": format!("{}List", res.kind),
                          "metadata": metadata, "items": items});
        return ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    }
    if verb != "watch" {
        return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "this fake serves list and watch only");
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

/// get / create / update of a namespaced Lease, with resourceVersion conflicts.
fn lease_request(shared: &Shared, a: &Access, body: &[u8]) -> Response {
    let mut c = shared.cluster.lock().expect("fake apiserver lock");
    if c.leases_failing {
        return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "injected: leases unavailable");
    }
    let Some(ns) = a.namespace.clone() else {
        return status(StatusCode::NOT_FOUND, "NotFound", "leases are namespaced");
    };
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let not_found = |name: &str| {
        status(StatusCode::NOT_FOUND, "NotFound", &format!("leases.coordination.k8s.io \"{name}\" not found"))
    };
    match a.verb.as_str() {
        "get" => {
            let name = a.name.clone().unwrap_or_default();
            match c.leases.get(&(ns, name.clone())) {
                Some(obj) => json_response(StatusCode::OK, obj),
                None => not_found(&name),
            }
        }
        "create" => {
            let Some(mut obj) = parsed else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not a Lease");
            };
            let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
            if name.is_empty() {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name is required");
            }
            if c.leases.contains_key(&(ns.clone(), name.clone())) {
                c.conflicts += 1;
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("leases.coordination.k8s.io \"{name}\" already exists"),
                );
            }
            c.rv += 1;
            obj["apiVersion"] = json!("coordination.k8s.io/v1");
            obj["kind"] = json!("Lease");
            obj["metadata"]["namespace"] = json!(ns);
            obj["metadata"]["resourceVersion"] = json!(c.rv.to_string());
            c.leases.insert((ns, name), obj.clone());
            json_response(StatusCode::CREATED, &obj)
        }
        "update" => {
            let name = a.name.clone().unwrap_or_default();
            let Some(mut obj) = parsed else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not a Lease");
            };
            let Some(stored) = c.leases.get(&(ns.clone(), name.clone())) else {
                return not_found(&name);
            };
            let want = obj["metadata"]["resourceVersion"].as_str().unwrap_or_default();
            let have = stored["metadata"]["resourceVersion"].as_str().unwrap_or_default();
            if want.is_empty() || want != have {
                c.conflicts += 1;
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            c.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(c.rv.to_string());
            obj["metadata"]["namespace"] = json!(ns);
            c.leases.insert((ns, name), obj.clone());
            json_response(StatusCode::OK, &obj)
        }
        other => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &format!("leases: {other} not served")),
    }
}
