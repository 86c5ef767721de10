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
    let mut stream = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut buffer: Option<BTreeMap<String, Vec<u8>>> = None;
    while let Some(event) = stream.next().await {
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

/// Starts the watchers of all six kinds on `client`.
pub fn spawn_all(client: &Client, mirror: &Arc<Mirror>) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(reflect(Api::<core::Namespace>::all(client.clone()), mirror.clone())),
        tokio::spawn(reflect(Api::<core::Node>::all(client.clone()), mirror.clone())),
        tokio::spawn(reflect(Api::<core::Pod>::all(client.clone()), mirror.clone())),
        tokio::spawn(reflect(Api::<core::Service>::all(client.clone()), mirror.clone())),
        tokio::spawn(reflect(Api::<discovery::EndpointSlice>::all(client.clone()), mirror.clone())),
        tokio::spawn(reflect(Api::<networking::NetworkPolicy>::all(client.clone()), mirror.clone())),
    ]
}
