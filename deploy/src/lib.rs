//! The deploy/ manifests as data, for the tests that keep them honest and for
//! `cargo xtask images`:
//!
//! - [`IMAGES`]: the container images contiv builds, the binaries in each, and the tag
//!   (the crate version) the manifests must use;
//! - [`parse_strict`]: a Kubernetes document into the k8s-openapi type of its kind, with
//!   every field the type does not know reported as an error (a typo in a manifest is
//!   silently dropped by the API server otherwise);
//! - [`render`]: the subset of kustomize the manifests use (`resources`, `patches` as
//!   strategic-merge patches, `images`), so a variant (deploy/vpp) is checked as the objects
//!   it produces. Anything else in a kustomization.yaml is refused, not ignored.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// The version every contiv image is tagged with: the workspace's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One container image contiv builds.
#[derive(Debug, Clone, Copy)]
pub struct Image {
    /// Repository name (`contiv/agent`); the tag is [`VERSION`].
    pub name: &'static str,
    /// Executables in `/usr/bin`, the first being the entrypoint.
    pub binaries: &'static [&'static str],
    /// The cargo package that builds the binaries; `None` for a Debian binary.
    pub package: Option<&'static str>,
    /// What runs to smoke-test the image (appended to the entrypoint).
    pub smoke_args: &'static [&'static str],
    /// Programs of the build machine's Debian the binaries run, copied into `/usr/bin`
    /// with the libraries they load (host path; each is smoke-tested with `--version`).
    pub tools: &'static [&'static str],
}

/// Every image contiv builds.
pub const IMAGES: &[Image] = &[
    Image {
        name: "contiv/agent",
        binaries: &["contiv-agent", "contiv-cni"],
        package: Some("contiv-agent"),
        smoke_args: &["check-config"],
        // The masquerade of pod traffic leaving the cluster (`uplink = "kernel"`).
        tools: &["/usr/sbin/nft"],
    },
    Image {
        name: "contiv/ksr",
        binaries: &["contiv-ksr"],
        package: Some("contiv-ksr"),
        smoke_args: &["--version"],
        tools: &[],
    },
    Image {
        name: "contiv/stn",
        binaries: &["contiv-stn"],
        package: Some("contiv-stn"),
        smoke_args: &["--version"],
        tools: &[],
    },
    // Debian's etcd (etcd-server), so the default rollout needs no image from elsewhere.
    Image { name: "contiv/etcd", binaries: &["etcd"], package: None, smoke_args: &["--version"], tools: &[] },
];

/// `name:VERSION`.
pub fn image_ref(image: &Image) -> String {
    format!("{}:{VERSION}", image.name)
}

/// The image of a reference (`contiv/agent:0.1.0`), if contiv builds it.
pub fn image_of(reference: &str) -> Option<&'static Image> {
    let name = reference.rsplit_once(':').map_or(reference, |(n, _)| n);
    IMAGES.iter().find(|i| i.name == name)
}

/// Why the manifests could not be read or rendered.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Yaml { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Kustomize { path: PathBuf, msg: String },
}

/// One document of a manifest file.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file it came from.
    pub file: PathBuf,
    /// Its position in the file.
    pub index: usize,
    /// The object.
    pub value: Value,
}

impl Document {
    /// `kind`.
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
    /// Where it came from, for messages.
    pub fn origin(&self) -> String {
        format!("{}#{} ({} {})", self.file.display(), self.index, self.kind(), self.name())
    }
}

/// Every document of one YAML file (empty documents skipped).
pub fn load_file(path: &Path) -> Result<Vec<Document>, DeployError> {
    let text = std::fs::read_to_string(path).map_err(|source| DeployError::Io { path: path.to_owned(), source })?;
    let mut docs = Vec::new();
    for (index, de) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let value = Value::deserialize(de)
            .map_err(|e| DeployError::Yaml { path: path.to_owned(), msg: format!("document {index}: {e}") })?;
        if !value.is_null() {
            docs.push(Document { file: path.to_owned(), index, value });
        }
    }
    Ok(docs)
}

/// The kustomization.yaml fields the manifests use; anything else is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    #[allow(dead_code, reason = "checked by serde only")]
    api_version: String,
    #[allow(dead_code, reason = "checked by serde only")]
    kind: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    patches: Vec<PatchRef>,
    #[serde(default)]
    images: Vec<ImageOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRef {
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ImageOverride {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

/// The objects a kustomization directory produces (the subset described in the crate docs).
pub fn render(dir: &Path) -> Result<Vec<Document>, DeployError> {
    let kpath = dir.join("kustomization.yaml");
    let kerr = |msg: String| DeployError::Kustomize { path: kpath.clone(), msg };
    let text = std::fs::read_to_string(&kpath).map_err(|source| DeployError::Io { path: kpath.clone(), source })?;
    let k: Kustomization = serde_yaml_ng::from_str(&text).map_err(|e| kerr(e.to_string()))?;
    let mut docs = Vec::new();
    for r in &k.resources {
        let p = dir.join(r);
        if p.is_dir() {
            docs.extend(render(&p)?);
        } else if p.is_file() {
            docs.extend(load_file(&p)?);
        } else {
            return Err(kerr(format!("resource {r} does not exist")));
        }
    }
    for patch in &k.patches {
        let p = dir.join(&patch.path);
        for pd in load_file(&p)? {
            let target = docs
                .iter_mut()
                .find(|d| {
                    d.kind() == pd.kind()
                        && d.name() == pd.name()
                        && d.value["metadata"]["namespace"] == pd.value["metadata"]["namespace"]
                })
                .ok_or_else(|| kerr(format!("patch {} matches no resource", pd.origin())))?;
            strategic_merge(&mut target.value, &pd.value);
        }
    }
    for image in &k.images {
        let mut used = false;
        for d in &mut docs {
            for c in containers_mut(&mut d.value) {
                let Some(current) = c["image"].as_str() else { continue };
                let (name, tag) = current.rsplit_once(':').map_or((current, None), |(n, t)| (n, Some(t)));
                if name != image.name {
                    continue;
                }
                used = true;
                let name = image.new_name.as_deref().unwrap_or(name);
                let tag = image.new_tag.as_deref().or(tag);
                c["image"] = Value::String(match tag {
                    Some(t) => format!("{name}:{t}"),
                    None => name.to_string(),
                });
            }
        }
        if !used {
            return Err(kerr(format!("images: {} is used by no container", image.name)));
        }
    }
    Ok(docs)
}

/// The containers and init containers of a workload (or of a bare Pod spec). Adds nothing
/// to objects without any.
pub fn containers_mut(obj: &mut Value) -> Vec<&mut Value> {
    let templated = obj.pointer("/spec/template/spec").is_some_and(Value::is_object);
    let spec = if templated { obj.pointer_mut("/spec/template/spec") } else { obj.pointer_mut("/spec") };
    let mut out = Vec::new();
    if let Some(spec) = spec.and_then(Value::as_object_mut) {
        for (key, list) in spec.iter_mut() {
            if (key == "containers" || key == "initContainers")
                && let Some(list) = list.as_array_mut()
            {
                out.extend(list.iter_mut());
            }
        }
    }
    out
}

/// The containers and init containers of a workload, read-only.
pub fn containers(obj: &Value) -> Vec<&Value> {
    let spec =
        if obj["spec"]["template"]["spec"].is_object() { &obj["spec"]["template"]["spec"] } else { &obj["spec"] };
    ["initContainers", "containers"].iter().flat_map(|k| spec[*k].as_array().into_iter().flatten()).collect()
}

/// Strategic merge as Kubernetes does it for the fields the patches touch: objects merge
/// key by key; lists of objects that carry `name` (containers, volumes, volumeMounts, env,
/// ports) merge element by element on `name`, new names appended; other values replace.
pub fn strategic_merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(existing) => strategic_merge(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(p))
            if p.iter().all(|e| e["name"].is_string()) && b.iter().all(|e| e["name"].is_string()) =>
        {
            for pe in p {
                match b.iter_mut().find(|be| be["name"] == pe["name"]) {
                    Some(be) => strategic_merge(be, pe),
                    None => b.push(pe.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// A document parsed into its k8s-openapi type.
#[derive(Debug, Clone)]
pub enum Typed {
    Namespace(Box<k8s_openapi::api::core::v1::Namespace>),
    ServiceAccount(Box<k8s_openapi::api::core::v1::ServiceAccount>),
    ConfigMap(Box<k8s_openapi::api::core::v1::ConfigMap>),
    Service(Box<k8s_openapi::api::core::v1::Service>),
    ClusterRole(Box<k8s_openapi::api::rbac::v1::ClusterRole>),
    ClusterRoleBinding(Box<k8s_openapi::api::rbac::v1::ClusterRoleBinding>),
    Role(Box<k8s_openapi::api::rbac::v1::Role>),
    RoleBinding(Box<k8s_openapi::api::rbac::v1::RoleBinding>),
    DaemonSet(Box<k8s_openapi::api::apps::v1::DaemonSet>),
    Deployment(Box<k8s_openapi::api::apps::v1::Deployment>),
    StatefulSet(Box<k8s_openapi::api::apps::v1::StatefulSet>),
}

fn strict<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, Vec<String>> {
    let mut unknown = Vec::new();
    let parsed: Result<T, _> = serde_ignored::deserialize(value, |path| unknown.push(format!("unknown field {path}")));
    match parsed {
        Ok(t) if unknown.is_empty() => Ok(t),
        Ok(_) => Err(unknown),
        Err(e) => Err(vec![e.to_string()]),
    }
}

/// Parses `value` into the type its `apiVersion`/`kind` name; unknown fields, wrong
/// types, missing required fields and unknown kinds are errors (each listed).
pub fn parse_strict(value: &Value) -> Result<Typed, Vec<String>> {
    let api = value["apiVersion"].as_str().unwrap_or_default();
    let kind = value["kind"].as_str().unwrap_or_default();
    Ok(match (api, kind) {
        ("v1", "Namespace") => Typed::Namespace(Box::new(strict(value)?)),
        ("v1", "ServiceAccount") => Typed::ServiceAccount(Box::new(strict(value)?)),
        ("v1", "ConfigMap") => Typed::ConfigMap(Box::new(strict(value)?)),
        ("v1", "Service") => Typed::Service(Box::new(strict(value)?)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Typed::ClusterRole(Box::new(strict(value)?)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => Typed::ClusterRoleBinding(Box::new(strict(value)?)),
        ("rbac.authorization.k8s.io/v1", "Role") => Typed::Role(Box::new(strict(value)?)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => Typed::RoleBinding(Box::new(strict(value)?)),
        ("apps/v1", "DaemonSet") => Typed::DaemonSet(Box::new(strict(value)?)),
        ("apps/v1", "Deployment") => Typed::Deployment(Box::new(strict(value)?)),
        ("apps/v1", "StatefulSet") => Typed::StatefulSet(Box::new(strict(value)?)),
        _ => return Err(vec![format!("no type known for apiVersion {api:?} kind {kind:?}")]),
    })
}

/// The deploy/ directory of this source tree.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}
