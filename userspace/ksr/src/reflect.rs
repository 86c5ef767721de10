//! The Kubernetes side: one kube-runtime watcher per kind, feeding the [`Mirror`].

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use contiv_cluster_model::{ConvertError, Kind, ModelObject, ToModel, encode};
use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

use crate::mirror::Mirror;

/// The key and stored value of an object.
pub fn stored<K: ToModel>(obj: &K) -> Result<(String, Vec<u8>), ConvertError> {
    let model = obj.to_model()?;
    Ok((model.key(), encode(&model)))
}

/// Runs the watcher of one kind until the stream ends (it does not: the backoff retries
/// every error). Each (re)list — `Init`, `InitApply`..., `InitDone` — replaces the kind's
/// content in the store; `Apply` and `Delete` events write single keys.
pub async fn reflect<K>(api: Api<K>, mirror: Arc<Mirror>)
where
    K: Resource + ToModel + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let kind = <K::Model as ModelObject>::KIND;
    // However this task ends (the stream ends, a panic, an abort), the kind is no longer
    // followed: readiness says so.
    struct Ended(Arc<Mirror>, Kind);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.watch_ended(self.1);
        }
    }
    let _ended = Ended(mirror.clone(), kind);
    let mut stream = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut buffer: Option<BTreeMap<String, Vec<u8>>> = None;
    while let Some(event) = stream.next().await {
        if event.is_ok() {
            mirror.watch_ok(kind);
        }
        match event {
            Ok(Event::Init) => {
                log::debug!("{kind}: listing");
                buffer = Some(BTreeMap::new());
            }
            Ok(Event::InitApply(obj)) => {
                let buf = buffer.get_or_insert_with(BTreeMap::new);
                match stored(&obj) {
                    Ok((key, value)) => {
                        buf.insert(key, value);
                    }
                    Err(e) => skip(&mirror, kind, &obj, &e),
                }
            }
            Ok(Event::InitDone) => {
                let desired = buffer.take().unwrap_or_default();
                log::info!("{kind}: listed {} objects; converging the store", desired.len());
                mirror.replace(kind, desired).await;
            }
            Ok(Event::Apply(obj)) => match stored(&obj) {
                Ok((key, value)) => mirror.apply(kind, key, value).await,
                Err(e) => {
                    skip(&mirror, kind, &obj, &e);
                    // The store must not keep an older version the API no longer has.
                    if let Ok(r) = obj.model_ref() {
                        mirror.remove(kind, &r.key()).await;
                    }
                }
            },
            Ok(Event::Delete(obj)) => match obj.model_ref() {
                Ok(r) => mirror.remove(kind, &r.key()).await,
                Err(e) => skip(&mirror, kind, &obj, &e),
            },
            Err(e) => {
                mirror.watch_failed(kind);
                mirror.counters.watch_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("{kind}: watch error (retrying with backoff): {e}");
            }
        }
    }
    log::error!("{kind}: watcher stream ended");
}

fn skip<K: ToModel>(mirror: &Mirror, kind: Kind, obj: &K, e: &ConvertError) {
    mirror.counters.convert_errors.fetch_add(1, Ordering::Relaxed);
    let name = obj.model_ref().map_or_else(|_| "<unnamed>".to_string(), |r| r.to_string());
    log::warn!("{kind}: skipping {name}: {e}");
}

/// One kind KSR reflects: its API coordinates (what RBAC must grant: get, list and watch)
/// and how its watcher starts. [`watched_kinds`] is the one list both the watchers and the
/// deploy manifests' ClusterRole check come from.
#[derive(Debug, Clone)]
pub struct Watched {
    /// API group ("" for the core group).
    pub group: String,
    /// API version.
    pub version: String,
    /// Resource name (plural), as RBAC rules name it.
    pub resource: String,
    spawn: fn(&Client, &Arc<Mirror>) -> JoinHandle<()>,
}

/// The verbs KSR needs on every watched kind.
pub const WATCH_VERBS: [&str; 3] = ["get", "list", "watch"];

fn watched<K>() -> Watched
where
    K: Resource<DynamicType = ()> + ToModel + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    Watched {
        group: K::group(&()).into_owned(),
        version: K::version(&()).into_owned(),
        resource: K::plural(&()).into_owned(),
        spawn: |client, mirror| tokio::spawn(reflect(Api::<K>::all(client.clone()), mirror.clone())),
    }
}

/// Every kind KSR watches, cluster-wide.
pub fn watched_kinds() -> Vec<Watched> {
    vec![
        watched::<core::Namespace>(),
        watched::<core::Node>(),
        watched::<core::Pod>(),
        watched::<core::Service>(),
        watched::<discovery::EndpointSlice>(),
        watched::<networking::NetworkPolicy>(),
    ]
}

/// Starts the watchers of every kind in [`watched_kinds`] on `client`.
pub fn spawn_all(client: &Client, mirror: &Arc<Mirror>) -> Vec<JoinHandle<()>> {
    watched_kinds().iter().map(|w| (w.spawn)(client, mirror)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_kind_is_watched_once() {
        let kinds = watched_kinds();
        assert_eq!(kinds.len(), Kind::ALL.len());
        let mut resources: Vec<(String, String)> =
            kinds.iter().map(|w| (w.group.clone(), w.resource.clone())).collect();
        resources.sort();
        resources.dedup();
        assert_eq!(resources.len(), Kind::ALL.len());
        assert!(resources.contains(&("discovery.k8s.io".into(), "endpointslices".into())), "{resources:?}");
        assert!(resources.contains(&(String::new(), "pods".into())), "{resources:?}");
    }
}
