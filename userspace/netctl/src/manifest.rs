//! Reading Kubernetes YAML (or JSON) manifests into model objects, validating everything
//! before anything is written.

use std::path::{Path, PathBuf};

use contiv_cluster_model::{ClusterObject, ConvertError, Kind, ObjectRef, ToModel};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Namespace given to namespaced objects whose manifest has none (as kubectl's default
/// context would).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why a manifest cannot be applied. `document` counts from 1 within the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file or directory cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The document is not valid YAML.
    #[error("{}: document {document}: invalid YAML: {message}", path.display())]
    Yaml {
        /// The file.
        path: PathBuf,
        /// Document number (from 1).
        document: usize,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A field is missing or has a bad value.
    #[error("{}: document {document} ({object}): field {field}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Document number (from 1).
        document: usize,
        /// `Kind/name` as far as known.
        object: String,
        /// Path of the field (`spec.ports[0].port`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The kind is not one contiv models.
    #[error("{}: document {document}: unsupported kind {kind:?} (apiVersion {api_version:?}); netctl handles Namespace, Pod, Service, Node (v1), EndpointSlice (discovery.k8s.io/v1), NetworkPolicy (networking.k8s.io/v1)", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Document number (from 1).
        document: usize,
        /// The document's kind.
        kind: String,
        /// The document's apiVersion.
        api_version: String,
    },
}

impl ManifestError {
    /// The field the error is about, when it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ManifestError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The document number (from 1) the error is about.
    pub fn document(&self) -> Option<usize> {
        match self {
            ManifestError::Yaml { document, .. }
            | ManifestError::Invalid { document, .. }
            | ManifestError::Unsupported { document, .. } => Some(*document),
            ManifestError::Io { .. } => None,
        }
    }
}

/// The objects of one file, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The file.
    pub path: PathBuf,
    /// Its objects.
    pub objects: Vec<ClusterObject>,
}

fn convert<K>(mut doc: Value, namespaced: bool) -> Result<ClusterObject, (String, String)>
where
    K: ToModel + DeserializeOwned,
    ClusterObject: From<K::Model>,
{
    if namespaced {
        let meta = &mut doc["metadata"];
        if meta.is_object() && meta.get("namespace").is_none_or(|n| n.is_null() || n == "") {
            meta["namespace"] = Value::from(DEFAULT_NAMESPACE);
        }
    }
    let obj: K = serde_path_to_error::deserialize(doc).map_err(|e| {
        let field = e.path().to_string();
        (if field == "." { "(document)".to_string() } else { field }, e.into_inner().to_string())
    })?;
    let model = obj.to_model().map_err(|e: ConvertError| (e.field().to_string(), e.reason()))?;
    Ok(ClusterObject::from(model))
}

/// Converts one parsed document (JSON value) into a model object.
pub fn parse_document(path: &Path, document: usize, doc: Value) -> Result<ClusterObject, ManifestError> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("<unnamed>").to_string();
    let invalid = |field: &str, message: String| ManifestError::Invalid {
        path: path.to_path_buf(),
        document,
        object: format!("{}/{name}", if kind.is_empty() { "?" } else { &kind }),
        field: field.to_string(),
        message,
    };
    if !doc.is_object() {
        return Err(invalid("(document)", "a manifest document must be a mapping".into()));
    }
    if kind.is_empty() {
        return Err(invalid("kind", "required field is missing".into()));
    }
    if api_version.is_empty() {
        return Err(invalid("apiVersion", "required field is missing".into()));
    }
    let result = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => convert::<core::Namespace>(doc, false),
        ("v1", "Node") => convert::<core::Node>(doc, false),
        ("v1", "Pod") => convert::<core::Pod>(doc, true),
        ("v1", "Service") => convert::<core::Service>(doc, true),
        ("discovery.k8s.io/v1", "EndpointSlice") => convert::<discovery::EndpointSlice>(doc, true),
        ("networking.k8s.io/v1", "NetworkPolicy") => convert::<networking::NetworkPolicy>(doc, true),
        (_, "Namespace" | "Node" | "Pod" | "Service" | "EndpointSlice" | "NetworkPolicy") => {
            return Err(invalid("apiVersion", format!("{api_version:?} is not the apiVersion of {kind}")));
        }
        _ => {
            return Err(ManifestError::Unsupported { path: path.to_path_buf(), document, kind, api_version });
        }
    };
    result.map_err(|(field, message)| invalid(&field, message))
}

/// The identity (kind, namespace, name) of one document, reading only `apiVersion`, `kind`
/// and `metadata`: what `delete` needs, so a manifest whose spec no longer validates can
/// still be deleted.
pub fn document_ref(path: &Path, document: usize, doc: &Value) -> Result<ObjectRef, ManifestError> {
    let kind_name = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    let invalid = |field: &str, message: &str| ManifestError::Invalid {
        path: path.to_path_buf(),
        document,
        object: format!("{kind_name}/{}", if name.is_empty() { "<unnamed>" } else { name }),
        field: field.to_string(),
        message: message.to_string(),
    };
    let kind = match (api_version, kind_name) {
        ("v1", "Namespace") => Kind::Namespace,
        ("v1", "Node") => Kind::Node,
        ("v1", "Pod") => Kind::Pod,
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("networking.k8s.io/v1", "NetworkPolicy") => Kind::NetworkPolicy,
        _ => {
            return Err(ManifestError::Unsupported {
                path: path.to_path_buf(),
                document,
                kind: kind_name.to_string(),
                api_version: api_version.to_string(),
            });
        }
    };
    if name.is_empty() || name.contains('/') {
        return Err(invalid("metadata.name", "a non-empty name without '/' is required"));
    }
    if !kind.is_namespaced() {
        return Ok(ObjectRef::cluster(kind, name));
    }
    let ns = match doc.pointer("/metadata/namespace").and_then(Value::as_str) {
        None | Some("") => DEFAULT_NAMESPACE,
        Some(ns) if ns.contains('/') => {
            return Err(invalid("metadata.namespace", "may not contain '/'"));
        }
        Some(ns) => ns,
    };
    Ok(ObjectRef::namespaced(kind, ns, name))
}

/// The identities of a manifest's objects (see [`document_ref`]).
pub fn parse_refs(path: &Path, text: &str) -> Result<Vec<ObjectRef>, ManifestError> {
    let mut refs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let doc = Value::deserialize(de).map_err(|e| ManifestError::Yaml {
            path: path.to_path_buf(),
            document,
            message: e.to_string(),
        })?;
        if !doc.is_null() {
            refs.push(document_ref(path, document, &doc)?);
        }
    }
    Ok(refs)
}

/// Loads the identities of every object the paths name; all errors, or all refs.
pub fn load_all_refs(paths: &[PathBuf]) -> Result<Vec<ObjectRef>, Vec<ManifestError>> {
    let mut refs = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        match manifest_files(p) {
            Ok(files) => {
                for f in files {
                    let parsed = std::fs::read_to_string(&f)
                        .map_err(|source| ManifestError::Io { path: f.clone(), source })
                        .and_then(|text| parse_refs(&f, &text));
                    match parsed {
                        Ok(r) => refs.extend(r),
                        Err(e) => errors.push(e),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(refs) } else { Err(errors) }
}

/// Parses the text of a manifest file: YAML with `---`-separated documents (JSON is YAML).
/// Empty documents are skipped. Fails on the first bad document, so a file is all or nothing.
pub fn parse_manifest(path: &Path, text: &str) -> Result<Manifest, ManifestError> {
    let mut objects = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let doc = Value::deserialize(de).map_err(|e| ManifestError::Yaml {
            path: path.to_path_buf(),
            document,
            message: e.to_string(),
        })?;
        if doc.is_null() {
            continue;
        }
        objects.push(parse_document(path, document, doc)?);
    }
    Ok(Manifest { path: path.to_path_buf(), objects })
}

/// Reads one file.
pub fn load_file(path: &Path) -> Result<Manifest, ManifestError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ManifestError::Io { path: path.to_path_buf(), source })?;
    parse_manifest(path, &text)
}

/// The manifest files a `-f` argument names: the file itself, or a directory's `*.yaml`,
/// `*.yml` and `*.json` files (not recursive), sorted by name.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let io = |source| ManifestError::Io { path: path.to_path_buf(), source };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(io)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if p.is_file() && matches!(ext, "yaml" | "yml" | "json") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads every manifest the paths name. Returns every error (one per failing file), so the
/// caller writes nothing unless all files are valid.
pub fn load_all(paths: &[PathBuf]) -> Result<Vec<Manifest>, Vec<ManifestError>> {
    let mut manifests = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        match manifest_files(p) {
            Ok(files) => {
                for f in files {
                    match load_file(&f) {
                        Ok(m) => manifests.push(m),
                        Err(e) => errors.push(e),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(manifests) } else { Err(errors) }
}
