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

/// Where in a file: `document 2`, or `document 1 item 3` for the third item of a `List`.
fn at(document: usize, item: Option<usize>) -> String {
    match item {
        Some(i) => format!("document {document} item {i}"),
        None => format!("document {document}"),
    }
}

/// `unknown field a` or `unknown fields a, b`.
fn unknown_fields_text(fields: &[String]) -> String {
    match fields {
        [one] => format!("unknown field {one}"),
        many => format!("unknown fields {}", many.join(", ")),
    }
}

/// Why a manifest cannot be applied. `document` counts from 1 within the file; `item`, from
/// 1 within a `List` document (`kind: List`, `PodList`, ...), when the object is one.
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
    #[error("{}: {} ({object}): field {field}: {message}", path.display(), at(*document, *item))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Document number (from 1).
        document: usize,
        /// Item number (from 1) within a `List` document.
        item: Option<usize>,
        /// `Kind/name` as far as known.
        object: String,
        /// Path of the field (`spec.ports[0].port`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Fields the object's kind does not have (a misspelling, say), which `kubectl apply`
    /// refuses too rather than drop them.
    #[error("{}: {} ({object}): {}", path.display(), at(*document, *item), unknown_fields_text(fields))]
    UnknownField {
        /// The file.
        path: PathBuf,
        /// Document number (from 1).
        document: usize,
        /// Item number (from 1) within a `List` document.
        item: Option<usize>,
        /// `Kind/name`.
        object: String,
        /// Paths of the unknown fields (`spec.ports[0].targetport`), in document order.
        fields: Vec<String>,
    },
    /// The kind is not one contiv models.
    #[error("{}: {}: unsupported kind {kind:?} (apiVersion {api_version:?}); netctl handles Namespace, Pod, Service, Node (v1), EndpointSlice (discovery.k8s.io/v1), NetworkPolicy (networking.k8s.io/v1), and List of them", path.display(), at(*document, *item))]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Document number (from 1).
        document: usize,
        /// Item number (from 1) within a `List` document.
        item: Option<usize>,
        /// The document's kind.
        kind: String,
        /// The document's apiVersion.
        api_version: String,
    },
}

impl ManifestError {
    /// The field the error is about, when it is about one (the first, for unknown fields).
    pub fn field(&self) -> Option<&str> {
        match self {
            ManifestError::Invalid { field, .. } => Some(field),
            ManifestError::UnknownField { fields, .. } => fields.first().map(String::as_str),
            _ => None,
        }
    }

    /// The document number (from 1) the error is about.
    pub fn document(&self) -> Option<usize> {
        match self {
            ManifestError::Yaml { document, .. }
            | ManifestError::Invalid { document, .. }
            | ManifestError::UnknownField { document, .. }
            | ManifestError::Unsupported { document, .. } => Some(*document),
            ManifestError::Io { .. } => None,
        }
    }

    /// The item number (from 1) within a `List` document the error is about.
    pub fn item(&self) -> Option<usize> {
        match self {
            ManifestError::Invalid { item, .. }
            | ManifestError::UnknownField { item, .. }
            | ManifestError::Unsupported { item, .. } => *item,
            _ => None,
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

/// A field path as the errors print it (`spec.ports[0].targetPort`).
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    fn walk(p: &serde_ignored::Path<'_>, out: &mut String) {
        use serde_ignored::Path as P;
        match p {
            P::Root => {}
            P::Seq { parent, index } => {
                walk(parent, out);
                out.push_str(&format!("[{index}]"));
            }
            P::Map { parent, key } => {
                walk(parent, out);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => walk(parent, out),
        }
    }
    let mut out = String::new();
    walk(path, &mut out);
    if out.is_empty() { "(document)".into() } else { out }
}

/// Why a document does not convert, before the file and document are known.
enum Rejected {
    /// A field is missing or has a bad value: the field's path and what is wrong.
    Invalid(String, String),
    /// Fields the type does not have.
    Unknown(Vec<String>),
}

/// Deserializes `doc` as `T`, strictly as `kubectl apply` does: a field `T` does not have is
/// an error. (k8s-openapi's types, like serde's derived ones, skip unknown keys as
/// `IgnoredAny`, which `serde_ignored` sees and reports with its path.)
fn strict<T: DeserializeOwned>(doc: Value) -> Result<T, Rejected> {
    let mut unknown = Vec::new();
    let mut note = |p: serde_ignored::Path<'_>| unknown.push(field_path(&p));
    let obj = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(doc, &mut note)).map_err(|e| {
        let field = e.path().to_string();
        Rejected::Invalid(if field == "." { "(document)".to_string() } else { field }, e.into_inner().to_string())
    })?;
    // `status` is the cluster's to write, and a newer cluster than these types (what
    // `kubectl get -o yaml` of it prints) has status fields they do not know: not a typo of
    // the user's, and not applied anyway.
    unknown.retain(|p| !p.starts_with("status."));
    if unknown.is_empty() { Ok(obj) } else { Err(Rejected::Unknown(unknown)) }
}

fn convert<K>(mut doc: Value, namespaced: bool) -> Result<ClusterObject, Rejected>
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
    let obj: K = strict(doc)?;
    let model = obj.to_model().map_err(|e: ConvertError| Rejected::Invalid(e.field().to_string(), e.reason()))?;
    Ok(ClusterObject::from(model))
}

/// Converts one parsed document (JSON value) into a model object.
pub fn parse_document(path: &Path, document: usize, doc: Value) -> Result<ClusterObject, ManifestError> {
    parse_object(path, document, None, doc)
}

/// Converts one object (a document, or item `item` of a `List` document) into a model object.
fn parse_object(path: &Path, document: usize, item: Option<usize>, doc: Value) -> Result<ClusterObject, ManifestError> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("<unnamed>").to_string();
    let object = format!("{}/{name}", if kind.is_empty() { "?" } else { &kind });
    let invalid = |field: &str, message: String| ManifestError::Invalid {
        path: path.to_path_buf(),
        document,
        item,
        object: object.clone(),
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
        ("v1", "Service") => {
            let allocated = allocated_fields(&doc);
            convert::<core::Service>(doc, true).and_then(|obj| match allocated {
                Ok(()) => Ok(obj),
                Err((field, message)) => Err(Rejected::Invalid(field, message)),
            })
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => convert::<discovery::EndpointSlice>(doc, true),
        ("networking.k8s.io/v1", "NetworkPolicy") => convert::<networking::NetworkPolicy>(doc, true),
        (_, "Namespace" | "Node" | "Pod" | "Service" | "EndpointSlice" | "NetworkPolicy") => {
            return Err(invalid("apiVersion", format!("{api_version:?} is not the apiVersion of {kind}")));
        }
        _ => {
            return Err(ManifestError::Unsupported { path: path.to_path_buf(), document, item, kind, api_version });
        }
    };
    result.map_err(|rejected| match rejected {
        Rejected::Invalid(field, message) => invalid(&field, message),
        Rejected::Unknown(fields) => {
            ManifestError::UnknownField { path: path.to_path_buf(), document, item, object: object.clone(), fields }
        }
    })
}

/// The fields of a Service the API server fills in when a manifest leaves them out: a
/// cluster IP, the node ports of a NodePort or LoadBalancer service, and the health-check
/// port of a LoadBalancer with `externalTrafficPolicy: Local`. netctl writes to the store
/// directly, where nothing allocates them, and a service without them would be stored but
/// never reachable by those addresses and ports: the manifest must give them, as
/// `kubectl get -o yaml` of a live service does. The first one missing, as (field, reason).
fn allocated_fields(doc: &Value) -> Result<(), (String, String)> {
    const NO_ALLOCATOR: &str = "netctl writes to the store directly, with no API server to allocate one";
    let spec = &doc["spec"];
    let service_type = spec["type"].as_str().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return Ok(());
    }
    let given = |v: &Value| !v.is_null() && v != "" && v != 0;
    if !given(&spec["clusterIP"]) && !given(&spec["clusterIPs"][0]) {
        return Err((
            "spec.clusterIP".into(),
            format!("required: {NO_ALLOCATOR} (give the address, or None for a headless service)"),
        ));
    }
    let load_balancer = service_type == "LoadBalancer";
    if service_type == "NodePort" || (load_balancer && spec["allocateLoadBalancerNodePorts"] != false) {
        let ports = spec["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
        if let Some(i) = ports.iter().position(|p| !given(&p["nodePort"])) {
            return Err((
                format!("spec.ports[{i}].nodePort"),
                format!("required for a {service_type} service: {NO_ALLOCATOR} (give a port of the node-port range)"),
            ));
        }
    }
    if load_balancer && spec["externalTrafficPolicy"] == "Local" && !given(&spec["healthCheckNodePort"]) {
        return Err((
            "spec.healthCheckNodePort".into(),
            format!("required for a LoadBalancer service with externalTrafficPolicy Local: {NO_ALLOCATOR}"),
        ));
    }
    Ok(())
}

/// A list document as `kubectl get -o yaml` prints it (`v1 List`), or a typed list such as
/// `PodList` as the API server answers: its fields, checked as strictly as an object's.
#[derive(Deserialize)]
#[allow(dead_code)] // read only to check the document has no other fields
struct ListDocument {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    metadata: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta>,
    items: Option<Vec<Value>>,
}

/// The objects of one document, each with its item number (from 1) when the document is a
/// list: `kind: List` (what `kubectl get ... -o yaml` prints) or `<Kind>List` with `items`
/// (the API server's typed lists, whose items may leave out `apiVersion` and `kind`: they
/// are the list's). Anything else is one object. `strict_fields`: a list field netctl does not know
/// is an error (as for objects); `delete` reads lists leniently.
fn unpack(
    path: &Path,
    document: usize,
    mut doc: Value,
    strict_fields: bool,
) -> Result<Vec<(Option<usize>, Value)>, ManifestError> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    let is_list = kind == "List" || (kind.len() > 4 && kind.ends_with("List") && doc.get("items").is_some());
    if !doc.is_object() || !is_list {
        return Ok(vec![(None, doc)]);
    }
    let invalid = |field: &str, message: String| ManifestError::Invalid {
        path: path.to_path_buf(),
        document,
        item: None,
        object: kind.clone(),
        field: field.to_string(),
        message,
    };
    if api_version.is_empty() {
        return Err(invalid("apiVersion", "required field is missing".into()));
    }
    if kind == "List" && api_version != "v1" {
        return Err(invalid("apiVersion", format!("{api_version:?} is not the apiVersion of List")));
    }
    if strict_fields {
        match strict::<ListDocument>(doc.clone()) {
            Ok(_) => {}
            Err(Rejected::Invalid(field, message)) => return Err(invalid(&field, message)),
            Err(Rejected::Unknown(fields)) => {
                return Err(ManifestError::UnknownField {
                    path: path.to_path_buf(),
                    document,
                    item: None,
                    object: kind.clone(),
                    fields,
                });
            }
        }
    }
    let items = match doc.get_mut("items").map(Value::take) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(invalid("items", "expected a sequence of objects".into())),
    };
    let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            if let (Some(item_kind), Some(fields)) = (item_kind, item.as_object_mut()) {
                fields.entry("kind").or_insert_with(|| Value::from(item_kind));
                fields.entry("apiVersion").or_insert_with(|| Value::from(api_version.as_str()));
            }
            (Some(i + 1), item)
        })
        .collect())
}

/// The documents of a manifest's text (YAML, `---`-separated; JSON is YAML) as JSON values,
/// YAML merge keys (`<<: *anchor`) applied, each with its number (from 1). Empty documents
/// are skipped.
fn documents(path: &Path, text: &str) -> Result<Vec<(usize, Value)>, ManifestError> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let yaml_error = |message: String| ManifestError::Yaml { path: path.to_path_buf(), document, message };
        let mut doc = serde_yaml_ng::Value::deserialize(de).map_err(|e| yaml_error(e.to_string()))?;
        doc.apply_merge().map_err(|e| yaml_error(format!("merge key (<<): {e}")))?;
        let doc = yaml_to_json(doc).map_err(yaml_error)?;
        if !doc.is_null() {
            docs.push((document, doc));
        }
    }
    Ok(docs)
}

/// A YAML value as JSON, as Kubernetes reads YAML: scalar mapping keys become strings (`80:`
/// is the key "80"), tags are dropped, and numbers JSON cannot hold (`.nan`) become null.
fn yaml_to_json(v: serde_yaml_ng::Value) -> Result<Value, String> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            (None, None) => n.as_f64().map_or(Value::Null, Value::from),
        },
        Y::String(s) => Value::String(s),
        Y::Sequence(seq) => Value::Array(seq.into_iter().map(yaml_to_json).collect::<Result<_, _>>()?),
        Y::Mapping(map) => {
            let mut out = serde_json::Map::with_capacity(map.len());
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    Y::Null => "null".to_string(),
                    Y::Tagged(t) => match yaml_to_json(t.value)? {
                        Value::String(s) => s,
                        other => return Err(format!("a mapping key must be a scalar, not {other}")),
                    },
                    Y::Sequence(_) | Y::Mapping(_) => return Err("a mapping key must be a scalar".into()),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => yaml_to_json(t.value)?,
    })
}

/// The identity (kind, namespace, name) of one document, reading only `apiVersion`, `kind`
/// and `metadata`: what `delete` needs, so a manifest whose spec no longer validates can
/// still be deleted.
pub fn document_ref(path: &Path, document: usize, doc: &Value) -> Result<ObjectRef, ManifestError> {
    object_ref(path, document, None, doc)
}

/// [`document_ref`] of one object (a document, or item `item` of a `List` document).
fn object_ref(path: &Path, document: usize, item: Option<usize>, doc: &Value) -> Result<ObjectRef, ManifestError> {
    let kind_name = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    let invalid = |field: &str, message: &str| ManifestError::Invalid {
        path: path.to_path_buf(),
        document,
        item,
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
                item,
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

/// The identities of a manifest's objects (see [`document_ref`]), the items of `List`
/// documents included.
pub fn parse_refs(path: &Path, text: &str) -> Result<Vec<ObjectRef>, ManifestError> {
    let mut refs = Vec::new();
    for (document, doc) in documents(path, text)? {
        for (item, object) in unpack(path, document, doc, false)? {
            refs.push(object_ref(path, document, item, &object)?);
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

/// Parses the text of a manifest file: YAML with `---`-separated documents (JSON is YAML),
/// merge keys applied; a `List` document stands for its items. Empty documents are skipped.
/// Fails on the first bad object, so a file is all or nothing.
pub fn parse_manifest(path: &Path, text: &str) -> Result<Manifest, ManifestError> {
    let mut objects = Vec::new();
    for (document, doc) in documents(path, text)? {
        for (item, object) in unpack(path, document, doc, true)? {
            objects.push(parse_object(path, document, item, object)?);
        }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use contiv_cluster_model::{ClusterObject, PortRef};

    use super::{ManifestError, parse_manifest, parse_refs};

    fn service_ports(o: &ClusterObject) -> Vec<(u16, PortRef)> {
        match o {
            ClusterObject::Service(s) => s.ports.iter().map(|p| (p.port, p.target_port.clone())).collect(),
            other => panic!("not a service: {other:?}"),
        }
    }

    #[test]
    fn a_field_the_kind_does_not_have_is_refused_with_its_path() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                    spec:\n  clusterIP: 10.96.0.9\n  ports: [{port: 80, targetport: 8080}]\n";
        let e = parse_manifest(Path::new("svc.yaml"), text).unwrap_err();
        assert_eq!(e.to_string(), "svc.yaml: document 2 (Service/web): unknown field spec.ports[0].targetport");
        assert_eq!(e.field(), Some("spec.ports[0].targetport"));
        assert_eq!(e.document(), Some(2));

        // Every unknown field of the document is named, wherever it is.
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, lables: {app: web}}\n\
                    spec: {nodename: n1, containers: [{name: c, image: i, port: [{containerPort: 80}]}]}\n\
                    stauts: {}\n";
        let e = parse_manifest(Path::new("pod.yaml"), text).unwrap_err();
        assert!(matches!(&e, ManifestError::UnknownField { fields, .. } if fields.len() == 4), "{e}");
        assert_eq!(
            e.to_string(),
            "pod.yaml: document 1 (Pod/a): unknown fields metadata.lables, spec.containers[0].port, \
             spec.nodename, stauts"
        );
    }

    #[test]
    fn status_fields_of_a_newer_cluster_are_not_refused() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                    spec:\n  clusterIP: 10.96.0.9\n  ports: [{port: 80}]\n\
                    status:\n  loadBalancer: {ingress: [{ip: 192.0.2.7, someNewField: x}]}\n  newerThing: {}\n";
        let objects = parse_manifest(Path::new("svc.yaml"), text).unwrap().objects;
        assert_eq!(objects.len(), 1);
        // A typo of `status` itself is still one.
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}\nstatsu: {}\n";
        let e = parse_manifest(Path::new("svc.yaml"), text).unwrap_err();
        assert_eq!(e.field(), Some("statsu"));
    }

    /// What `kubectl get -o yaml` prints: a `v1 List` of objects carrying the fields the API
    /// server fills in (managedFields, creationTimestamp, uid, status, ...), all of which
    /// k8s-openapi knows.
    const KUBECTL_GET: &str = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    creationTimestamp: "2025-01-02T03:04:05Z"
    labels: {kubernetes.io/metadata.name: shop}
    name: shop
    resourceVersion: "17"
    uid: 0b7a3f3e-8a3e-4c59-9b0e-1c2d3e4f5a6b
  spec: {finalizers: [kubernetes]}
  status: {phase: Active}
- apiVersion: v1
  kind: Pod
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-0","namespace":"shop"}}
    creationTimestamp: "2025-01-02T03:04:05Z"
    generateName: web-
    generation: 1
    labels: {app: web}
    managedFields:
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1:
        f:metadata:
          f:labels:
            .: {}
            f:app: {}
      manager: kubectl-client-side-apply
      operation: Update
      time: "2025-01-02T03:04:05Z"
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1:
        f:status:
          f:podIPs: {}
      manager: kubelet
      operation: Update
      subresource: status
      time: "2025-01-02T03:04:07Z"
    name: web-0
    namespace: shop
    ownerReferences:
    - {apiVersion: apps/v1, blockOwnerDeletion: true, controller: true, kind: StatefulSet, name: web, uid: 0a1b2c3d}
    resourceVersion: "4242"
    uid: 6f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b
  spec:
    containers:
    - image: nginx
      imagePullPolicy: Always
      name: nginx
      ports: [{containerPort: 8080, name: http, protocol: TCP}]
      resources: {}
      terminationMessagePath: /dev/termination-log
      terminationMessagePolicy: File
      volumeMounts:
      - {mountPath: /var/run/secrets/kubernetes.io/serviceaccount, name: kube-api-access, readOnly: true}
    dnsPolicy: ClusterFirst
    enableServiceLinks: true
    nodeName: node-a
    preemptionPolicy: PreemptLowerPriority
    priority: 0
    restartPolicy: Always
    schedulerName: default-scheduler
    securityContext: {}
    serviceAccount: default
    serviceAccountName: default
    terminationGracePeriodSeconds: 30
    tolerations:
    - {effect: NoExecute, key: node.kubernetes.io/not-ready, operator: Exists, tolerationSeconds: 300}
    volumes:
    - name: kube-api-access
      projected:
        defaultMode: 420
        sources:
        - serviceAccountToken: {expirationSeconds: 3607, path: token}
  status:
    conditions:
    - {lastProbeTime: null, lastTransitionTime: "2025-01-02T03:04:07Z", status: "True", type: Ready}
    containerStatuses:
    - containerID: containerd://abc
      image: docker.io/library/nginx:latest
      imageID: docker.io/library/nginx@sha256:abc
      lastState: {}
      name: nginx
      ready: true
      restartCount: 0
      started: true
      state:
        running: {startedAt: "2025-01-02T03:04:06Z"}
    hostIP: 192.168.1.10
    hostIPs: [{ip: 192.168.1.10}]
    phase: Running
    podIP: 10.1.1.5
    podIPs: [{ip: 10.1.1.5}]
    qosClass: BestEffort
    startTime: "2025-01-02T03:04:05Z"
- apiVersion: v1
  kind: Service
  metadata: {creationTimestamp: "2025-01-02T03:04:05Z", name: web, namespace: shop, resourceVersion: "99", uid: x}
  spec:
    clusterIP: 10.96.0.20
    clusterIPs: [10.96.0.20]
    internalTrafficPolicy: Cluster
    ipFamilies: [IPv4]
    ipFamilyPolicy: SingleStack
    ports: [{name: http, port: 80, protocol: TCP, targetPort: http}]
    selector: {app: web}
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  addressType: IPv4
  endpoints:
  - addresses: [10.1.1.5]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: node-a
    targetRef: {kind: Pod, name: web-0, namespace: shop, uid: 6f1e2d3c}
  metadata:
    generateName: web-
    labels: {endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io, kubernetes.io/service-name: web}
    name: web-abc
    namespace: shop
  ports: [{name: http, port: 8080, protocol: TCP}]
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {generation: 1, name: deny, namespace: shop}
  spec: {podSelector: {}, policyTypes: [Ingress]}
- apiVersion: v1
  kind: Node
  metadata: {labels: {kubernetes.io/hostname: node-a}, name: node-a}
  spec: {podCIDR: 10.1.1.0/24, podCIDRs: [10.1.1.0/24]}
  status:
    addresses: [{address: 192.168.1.10, type: InternalIP}, {address: node-a, type: Hostname}]
    allocatable: {cpu: "2", memory: 4Gi, pods: "110"}
    capacity: {cpu: "2", memory: 4Gi, pods: "110"}
    conditions:
    - {lastHeartbeatTime: "2025-01-02T03:04:05Z", lastTransitionTime: "2025-01-02T03:04:05Z", message: ok, reason: KubeletReady, status: "True", type: Ready}
    daemonEndpoints: {kubeletEndpoint: {Port: 10250}}
    images: [{names: [nginx], sizeBytes: 1000}]
    nodeInfo: {architecture: amd64, bootID: b, containerRuntimeVersion: containerd://2.0, kernelVersion: "6.8", kubeProxyVersion: "", kubeletVersion: v1.33.0, machineID: m, operatingSystem: linux, osImage: Debian, systemUUID: s}
kind: List
metadata:
  resourceVersion: ""
"#;

    #[test]
    fn kubectl_get_output_applies_item_by_item() {
        let m = parse_manifest(Path::new("get.yaml"), KUBECTL_GET).unwrap();
        let keys: Vec<String> = m.objects.iter().map(ClusterObject::key).collect();
        assert_eq!(
            keys,
            [
                "/contiv/k8s/namespace/shop",
                "/contiv/k8s/pod/shop/web-0",
                "/contiv/k8s/service/shop/web",
                "/contiv/k8s/endpointslice/shop/web-abc",
                "/contiv/k8s/networkpolicy/shop/deny",
                "/contiv/k8s/node/node-a",
            ]
        );
        // delete -f reads the same identities.
        let refs: Vec<String> =
            parse_refs(Path::new("get.yaml"), KUBECTL_GET).unwrap().iter().map(|r| r.key()).collect();
        assert_eq!(refs, keys);

        // An error names the document and the item.
        let bad = KUBECTL_GET.replace("podIP: 10.1.1.5", "podIP: [10.1.1.5]");
        let e = parse_manifest(Path::new("get.yaml"), &bad).unwrap_err();
        assert_eq!((e.document(), e.item(), e.field()), (Some(1), Some(2), Some("status.podIP")), "{e}");
        assert!(e.to_string().starts_with("get.yaml: document 1 item 2 (Pod/web-0): field status.podIP: "), "{e}");
        let bad = KUBECTL_GET.replace("sessionAffinity: None", "sessionAffinity: None\n    sesionAffinity: x");
        let e = parse_manifest(Path::new("get.yaml"), &bad).unwrap_err();
        assert_eq!(e.to_string(), "get.yaml: document 1 item 3 (Service/web): unknown field spec.sesionAffinity");
        let bad = KUBECTL_GET.replace("kind: Pod\n", "kind: Deployment\n");
        let e = parse_manifest(Path::new("get.yaml"), &bad).unwrap_err();
        assert!(e.to_string().starts_with("get.yaml: document 1 item 2: unsupported kind \"Deployment\""), "{e}");
        assert!(parse_refs(Path::new("get.yaml"), &bad).is_err());
        // The list's own fields are checked too.
        let bad = KUBECTL_GET.replace("kind: List\n", "kind: List\nitem: []\n");
        let e = parse_manifest(Path::new("get.yaml"), &bad).unwrap_err();
        assert_eq!(e.to_string(), "get.yaml: document 1 (List): unknown field item");
        let e = parse_manifest(Path::new("l.yaml"), "apiVersion: v1\nkind: List\nitems: {a: b}\n").unwrap_err();
        assert_eq!(e.field(), Some("items"), "{e}");
        assert!(
            parse_manifest(Path::new("l.yaml"), "apiVersion: v1\nkind: List\nitems: []\n").unwrap().objects.is_empty()
        );
    }

    #[test]
    fn typed_lists_lend_their_items_kind_and_api_version() {
        // As the API server answers a list request: items without apiVersion and kind.
        let text = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n\
                    apiVersion: v1\nkind: PodList\nmetadata: {resourceVersion: '5'}\nitems:\n\
                    - metadata: {name: a, namespace: x}\n\
                    - metadata: {name: b, namespace: x}\n  spec: {nodeName: n1}\n\
                    - metadata: {name: c, namespace: x}\n  spec: {nodname: n1}\n";
        let e = parse_manifest(Path::new("pods.json"), text).unwrap_err();
        assert_eq!(e.to_string(), "pods.json: document 2 item 3 (Pod/c): unknown field spec.nodname");
        let refs: Vec<String> = parse_refs(Path::new("pods.json"), text).unwrap().iter().map(|r| r.key()).collect();
        assert_eq!(
            refs,
            ["/contiv/k8s/namespace/x", "/contiv/k8s/pod/x/a", "/contiv/k8s/pod/x/b", "/contiv/k8s/pod/x/c"]
        );
        let good = text.replace("nodname", "nodeName");
        let m = parse_manifest(Path::new("pods.json"), &good).unwrap();
        assert_eq!(m.objects.len(), 4);
        let text =
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicyList\nitems: [{metadata: {name: p}, spec: {}}]\n";
        let m = parse_manifest(Path::new("p.yaml"), text).unwrap();
        assert_eq!(m.objects[0].key(), "/contiv/k8s/networkpolicy/default/p");
    }

    #[test]
    fn yaml_merge_keys_are_applied() {
        let text = r#"apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.9
  ports:
    - &http {name: http, port: 80, targetPort: 8080}
    - <<: *http
      name: alt
      port: 81
"#;
        let m = parse_manifest(Path::new("svc.yaml"), text).unwrap();
        assert_eq!(service_ports(&m.objects[0]), [(80, PortRef::Number(8080)), (81, PortRef::Number(8080))]);
        // A list of merges, the earlier winning, and the key's own values over both.
        let text = r#"apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.9
  ports:
    - &a {name: a, port: 80, targetPort: 8080}
    - &b {name: b, port: 90, targetPort: 9090, protocol: UDP}
    - <<: [*b, *a]
      name: c
"#;
        let m = parse_manifest(Path::new("svc.yaml"), text).unwrap();
        assert_eq!(service_ports(&m.objects[0])[2], (90, PortRef::Number(9090)));
        // delete -f sees merged metadata.
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  <<: {name: a, namespace: x}\n";
        assert_eq!(parse_refs(Path::new("p.yaml"), text).unwrap()[0].key(), "/contiv/k8s/pod/x/a");
        let e = parse_manifest(Path::new("p.yaml"), "apiVersion: v1\nkind: Pod\nmetadata:\n  <<: 3\n").unwrap_err();
        assert!(matches!(e, ManifestError::Yaml { document: 1, .. }), "{e}");
    }

    #[test]
    fn what_an_api_server_would_allocate_must_be_given() {
        let svc = |spec: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {spec}\n");
        let refused = |spec: &str| parse_manifest(Path::new("svc.yaml"), &svc(spec)).unwrap_err();
        let e = refused("{ports: [{port: 80}]}");
        assert_eq!(e.field(), Some("spec.clusterIP"), "{e}");
        assert!(e.to_string().contains("no API server to allocate one"), "{e}");
        assert_eq!(refused("{clusterIP: '', ports: [{port: 80}]}").field(), Some("spec.clusterIP"));
        let e = refused("{type: NodePort, clusterIP: 10.96.0.9, ports: [{port: 80, nodePort: 30080}, {port: 81}]}");
        assert_eq!(e.field(), Some("spec.ports[1].nodePort"), "{e}");
        assert!(e.to_string().contains("required for a NodePort service"), "{e}");
        let e = refused("{type: LoadBalancer, clusterIP: 10.96.0.9, ports: [{port: 80}]}");
        assert_eq!(e.field(), Some("spec.ports[0].nodePort"), "{e}");
        let local = "{type: LoadBalancer, clusterIP: 10.96.0.9, externalTrafficPolicy: Local, \
                     ports: [{port: 80, nodePort: 30080}]}";
        assert_eq!(refused(local).field(), Some("spec.healthCheckNodePort"));
        for ok in [
            "{clusterIP: 10.96.0.9, ports: [{port: 80}]}",
            "{clusterIPs: [10.96.0.9], ports: [{port: 80}]}",
            "{clusterIP: None, clusterIPs: [None]}",
            "{type: ExternalName, externalName: db.example.org}",
            "{type: NodePort, clusterIP: 10.96.0.9, ports: [{port: 80, nodePort: 30080}]}",
            "{type: LoadBalancer, clusterIP: 10.96.0.9, allocateLoadBalancerNodePorts: false, ports: [{port: 80}]}",
            "{type: LoadBalancer, clusterIP: 10.96.0.9, externalTrafficPolicy: Local, healthCheckNodePort: 32000, \
             ports: [{port: 80, nodePort: 30080}]}",
        ] {
            assert!(parse_manifest(Path::new("svc.yaml"), &svc(ok)).is_ok(), "{ok}");
        }
        // delete reads only the identity.
        assert!(parse_refs(Path::new("svc.yaml"), &svc("{ports: [{port: 80}]}")).is_ok());
    }

    #[test]
    fn scalar_keys_read_as_strings() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels: {80: http, true: yes}\n";
        let m = parse_manifest(Path::new("p.yaml"), text).unwrap();
        let ClusterObject::Pod(p) = &m.objects[0] else { panic!() };
        assert_eq!(p.labels.get("80").map(String::as_str), Some("http"), "{p:?}");
    }
}
