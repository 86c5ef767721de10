//! The cluster model contiv's control plane stores: trimmed, versioned JSON of the Kubernetes
//! objects the dataplane needs, the store key layout ([`keys`]), and the conversions from
//! Kubernetes API types ([`convert`]) that contiv-ksr and netctl both use, so they write
//! byte-identical values.
//!
//! A stored value is the JSON of a model type with a leading version field:
//! `{"v":1,"name":"web-0","namespace":"default",...}`. Use [`encode`] / [`decode`] (or
//! [`ClusterObject::decode`] when the kind comes from the key).

pub mod convert;
pub mod keys;
pub mod model;

pub use convert::{ConvertError, ToModel};
pub use keys::{Kind, ObjectRef};
pub use model::*;

use serde::{Deserialize, Serialize};

/// Version of the value format this crate writes and reads.
pub const MODEL_VERSION: u32 = 1;

/// Why a stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The value is not JSON of the expected shape.
    #[error("malformed value: {0}")]
    Json(#[source] serde_json::Error),
    /// The value was written by a newer (or unknown) model version.
    #[error("unsupported model version {found} (this build reads {MODEL_VERSION})")]
    Version {
        /// The version found in the value.
        found: u32,
    },
    /// The key is not the key of a reflected Kubernetes object.
    #[error("not a cluster object key: {0}")]
    Key(String),
    /// The value names a different object than its key.
    #[error("value of {key} describes {found}")]
    Mismatch {
        /// The key the value was read from.
        key: String,
        /// The object the value describes.
        found: ObjectRef,
    },
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    v: u32,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Deserialize)]
struct Header {
    v: u32,
}

/// Encodes a model value as versioned JSON.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(&Envelope { v: MODEL_VERSION, body: value })
        .expect("model types always serialize: string keys, no fallible Serialize impls")
}

/// Decodes versioned JSON written by [`encode`].
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let header: Header = serde_json::from_slice(bytes).map_err(DecodeError::Json)?;
    if header.v != MODEL_VERSION {
        return Err(DecodeError::Version { found: header.v });
    }
    serde_json::from_slice(bytes).map_err(DecodeError::Json)
}

/// Any reflected object, as the agent sees it when watching [`keys::K8S_PREFIX`].
/// Serializes as the inner model (without the version field; use [`ClusterObject::encode`]
/// for stored values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ClusterObject {
    /// A pod.
    Pod(Pod),
    /// A namespace.
    Namespace(Namespace),
    /// A service.
    Service(Service),
    /// An EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// A network policy.
    NetworkPolicy(NetworkPolicy),
    /// A node.
    Node(Node),
}

macro_rules! from_model {
    ($($t:ident),*) => {$(
        impl From<$t> for ClusterObject {
            fn from(o: $t) -> Self {
                ClusterObject::$t(o)
            }
        }
    )*};
}
from_model!(Pod, Namespace, Service, EndpointSlice, NetworkPolicy, Node);

impl ClusterObject {
    /// The object's identity.
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            ClusterObject::Pod(o) => o.object_ref(),
            ClusterObject::Namespace(o) => o.object_ref(),
            ClusterObject::Service(o) => o.object_ref(),
            ClusterObject::EndpointSlice(o) => o.object_ref(),
            ClusterObject::NetworkPolicy(o) => o.object_ref(),
            ClusterObject::Node(o) => o.object_ref(),
        }
    }

    /// The object's store key.
    pub fn key(&self) -> String {
        self.object_ref().key()
    }

    /// The stored value.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ClusterObject::Pod(o) => encode(o),
            ClusterObject::Namespace(o) => encode(o),
            ClusterObject::Service(o) => encode(o),
            ClusterObject::EndpointSlice(o) => encode(o),
            ClusterObject::NetworkPolicy(o) => encode(o),
            ClusterObject::Node(o) => encode(o),
        }
    }

    /// Decodes the value stored under `key`, choosing the type by the key's kind and
    /// checking that the value names the same object as the key.
    pub fn decode(key: &str, value: &[u8]) -> Result<ClusterObject, DecodeError> {
        let r = ObjectRef::parse(key).ok_or_else(|| DecodeError::Key(key.to_string()))?;
        let obj = match r.kind {
            Kind::Pod => ClusterObject::Pod(decode(value)?),
            Kind::Namespace => ClusterObject::Namespace(decode(value)?),
            Kind::Service => ClusterObject::Service(decode(value)?),
            Kind::EndpointSlice => ClusterObject::EndpointSlice(decode(value)?),
            Kind::NetworkPolicy => ClusterObject::NetworkPolicy(decode(value)?),
            Kind::Node => ClusterObject::Node(decode(value)?),
        };
        let found = obj.object_ref();
        if found != r {
            return Err(DecodeError::Mismatch { key: key.to_string(), found });
        }
        Ok(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace { name: "prod".into(), labels: [("team".to_string(), "a".to_string())].into() }
    }

    #[test]
    fn encode_puts_version_first_and_roundtrips() {
        let bytes = encode(&ns());
        assert_eq!(std::str::from_utf8(&bytes).unwrap(), r#"{"v":1,"name":"prod","labels":{"team":"a"}}"#);
        let back: Namespace = decode(&bytes).unwrap();
        assert_eq!(back, ns());
    }

    #[test]
    fn decode_rejects_other_versions_and_garbage() {
        let err = decode::<Namespace>(br#"{"v":2,"name":"x"}"#).unwrap_err();
        assert!(matches!(err, DecodeError::Version { found: 2 }), "{err}");
        assert!(matches!(decode::<Namespace>(b"{not json"), Err(DecodeError::Json(_))));
        assert!(matches!(decode::<Namespace>(br#"{"name":"x"}"#), Err(DecodeError::Json(_))));
        assert!(matches!(decode::<Namespace>(br#"{"v":1}"#), Err(DecodeError::Json(_))));
    }

    #[test]
    fn cluster_object_decode_checks_key() {
        let v = encode(&ns());
        let obj = ClusterObject::decode("/contiv/k8s/namespace/prod", &v).unwrap();
        assert_eq!(obj, ClusterObject::Namespace(ns()));
        assert_eq!(obj.encode(), v);
        assert!(matches!(ClusterObject::decode("/contiv/k8s/namespace/other", &v), Err(DecodeError::Mismatch { .. })));
        assert!(matches!(ClusterObject::decode("/contiv/nodes/x", &v), Err(DecodeError::Key(_))));
        // A namespace value under a pod key fails to decode as a pod.
        assert!(ClusterObject::decode("/contiv/k8s/pod/prod/x", &v).is_err());
    }
}
