//! `netctl get`: what the store holds, as tables or JSON. Values that do not decode are
//! reported as warnings (with their key) and skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use contiv_cluster_model::keys::{self, Kind};
use contiv_cluster_model::*;
use contiv_node_registry::{IpamAllocation, IpamConfig, NodeIdClaim, NodeRegistration};
use contiv_store::{Store, StoreError};
use serde::Serialize;
use serde_json::{Value, json};

/// What to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Resource {
    /// Nodes: Kubernetes nodes, agent registrations and IPAM allocations, by name.
    #[value(alias = "node")]
    Nodes,
    /// Pods.
    #[value(alias = "pod")]
    Pods,
    /// Services.
    #[value(alias = "service", alias = "svc")]
    Services,
    /// EndpointSlices.
    #[value(alias = "endpointslices", alias = "ep")]
    Endpoints,
    /// Network policies.
    #[value(alias = "policy", alias = "networkpolicies", alias = "netpol")]
    Policies,
    /// IPAM configuration, allocations and node ID claims.
    Ipam,
    /// A node's conntrack table, from its agent (needs --node).
    #[value(alias = "ct")]
    Conntrack,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// Pretty JSON of the model values.
    Json,
}

/// The rendered output plus warnings about values that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Text for stdout.
    pub text: String,
    /// One line per skipped value.
    pub warnings: Vec<String>,
}

/// Renders rows as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn join<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let s: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if s.is_empty() { "<none>".into() } else { s.join(",") }
}

fn labels_text(l: &Labels) -> String {
    join(l.iter().map(|(k, v)| format!("{k}={v}")))
}

fn selector_text(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for r in &s.match_expressions {
        parts.push(match r.operator {
            SelectorOperator::In => format!("{} in ({})", r.key, r.values.join(",")),
            SelectorOperator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
            SelectorOperator::Exists => r.key.clone(),
            SelectorOperator::DoesNotExist => format!("!{}", r.key),
        });
    }
    if parts.is_empty() { "<all>".into() } else { parts.join(",") }
}

fn protocol_text(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

fn port_ref_text(p: &PortRef) -> String {
    match p {
        PortRef::Number(n) => n.to_string(),
        PortRef::Name(n) => n.clone(),
    }
}

async fn decode_prefix<T: serde::de::DeserializeOwned>(
    store: &Arc<dyn Store>,
    prefix: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, T)>, StoreError> {
    let mut out = Vec::new();
    for kv in store.list(prefix).await?.kvs {
        match decode::<T>(&kv.value) {
            Ok(v) => out.push((kv.key, v)),
            Err(e) => warnings.push(format!("skipping {}: {e}", kv.key)),
        }
    }
    Ok(out)
}

async fn objects(
    store: &Arc<dyn Store>,
    kind: Kind,
    namespace: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Vec<ClusterObject>, StoreError> {
    let prefix = match namespace {
        Some(ns) if kind.is_namespaced() => format!("{}{ns}/", kind.prefix()),
        _ => kind.prefix(),
    };
    let mut out = Vec::new();
    for kv in store.list(&prefix).await?.kvs {
        match ClusterObject::decode(&kv.key, &kv.value) {
            Ok(o) => out.push(o),
            Err(e) => warnings.push(format!("skipping {}: {e}", kv.key)),
        }
    }
    Ok(out)
}

fn to_json<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("\"unserializable: {e}\""));
    s.push('\n');
    s
}

fn model_json(objs: &[ClusterObject]) -> String {
    to_json(&objs)
}

/// One kind's listing: the model objects as JSON, or a table with a row per object.
fn listing(
    objs: &[ClusterObject],
    format: Format,
    headers: &[&str],
    row: impl Fn(&ClusterObject) -> Option<Vec<String>>,
) -> String {
    if format == Format::Json {
        return model_json(objs);
    }
    let rows: Vec<Vec<String>> = objs.iter().filter_map(row).collect();
    table(headers, &rows)
}

/// Lists `what` from the store. `namespace` narrows namespaced kinds.
pub async fn get(
    store: &Arc<dyn Store>,
    what: Resource,
    namespace: Option<&str>,
    format: Format,
) -> Result<Output, StoreError> {
    let mut warnings = Vec::new();
    let text =
        match what {
            Resource::Nodes => nodes(store, format, &mut warnings).await?,
            Resource::Ipam => ipam(store, format, &mut warnings).await?,
            Resource::Conntrack => {
                warnings.push("conntrack is a node's table, read from its agent: pass --node NODE".into());
                String::new()
            }
            Resource::Pods => {
                let objs = objects(store, Kind::Pod, namespace, &mut warnings).await?;
                listing(&objs, format, &["NAMESPACE", "NAME", "NODE", "IPS", "HOSTNET", "LABELS"], |o| match o {
                    ClusterObject::Pod(p) => Some(vec![
                        p.namespace.clone(),
                        p.name.clone(),
                        p.node_name.clone().unwrap_or_else(|| "<none>".into()),
                        join(&p.ips),
                        if p.host_network { "yes".into() } else { "no".into() },
                        labels_text(&p.labels),
                    ]),
                    _ => None,
                })
            }
            Resource::Services => {
                let objs = objects(store, Kind::Service, namespace, &mut warnings).await?;
                listing(&objs, format, &["NAMESPACE", "NAME", "TYPE", "CLUSTER-IPS", "EXTERNAL-IPS", "PORTS"], |o| {
                    match o {
                        ClusterObject::Service(s) => Some(vec![
                            s.namespace.clone(),
                            s.name.clone(),
                            format!("{:?}", s.service_type),
                            if s.headless { "None".into() } else { join(&s.cluster_ips) },
                            join(s.external_ips.iter().chain(&s.load_balancer_ips)),
                            join(s.ports.iter().map(|p| {
                                let node = p.node_port.map(|n| format!(":{n}")).unwrap_or_default();
                                let name = if p.name.is_empty() { String::new() } else { format!("{}=", p.name) };
                                format!(
                                    "{name}{}{node}/{}->{}",
                                    p.port,
                                    protocol_text(p.protocol),
                                    port_ref_text(&p.target_port)
                                )
                            })),
                        ]),
                        _ => None,
                    }
                })
            }
            Resource::Endpoints => {
                let objs = objects(store, Kind::EndpointSlice, namespace, &mut warnings).await?;
                listing(&objs, format, &["NAMESPACE", "NAME", "SERVICE", "ENDPOINTS", "PORTS"], |o| match o {
                    ClusterObject::EndpointSlice(e) => Some(vec![
                        e.namespace.clone(),
                        e.name.clone(),
                        e.service_name.clone().unwrap_or_else(|| "<none>".into()),
                        join(e.endpoints.iter().flat_map(|ep| {
                            let c = ep.conditions;
                            let state = if c.terminating {
                                "(terminating)"
                            } else if !c.ready {
                                "(not-ready)"
                            } else {
                                ""
                            };
                            ep.addresses.iter().map(move |a| format!("{a}{state}"))
                        })),
                        join(e.ports.iter().map(|p| {
                            let port = p.port.map_or_else(|| "*".to_string(), |n| n.to_string());
                            let name = if p.name.is_empty() { String::new() } else { format!("{}=", p.name) };
                            format!("{name}{port}/{}", protocol_text(p.protocol))
                        })),
                    ]),
                    _ => None,
                })
            }
            Resource::Policies => {
                let objs = objects(store, Kind::NetworkPolicy, namespace, &mut warnings).await?;
                listing(
                    &objs,
                    format,
                    &["NAMESPACE", "NAME", "POD-SELECTOR", "TYPES", "INGRESS-RULES", "EGRESS-RULES"],
                    |o| match o {
                        ClusterObject::NetworkPolicy(p) => Some(vec![
                            p.namespace.clone(),
                            p.name.clone(),
                            selector_text(&p.pod_selector),
                            join(p.policy_types.iter().map(|t| format!("{t:?}"))),
                            p.ingress.len().to_string(),
                            p.egress.len().to_string(),
                        ]),
                        _ => None,
                    },
                )
            }
        };
    Ok(Output { text, warnings })
}

async fn nodes(store: &Arc<dyn Store>, format: Format, warnings: &mut Vec<String>) -> Result<String, StoreError> {
    let k8s: BTreeMap<String, Node> = objects(store, Kind::Node, None, warnings)
        .await?
        .into_iter()
        .filter_map(|o| match o {
            ClusterObject::Node(n) => Some((n.name.clone(), n)),
            _ => None,
        })
        .collect();
    let regs: BTreeMap<String, NodeRegistration> =
        decode_prefix::<NodeRegistration>(store, keys::NODES_PREFIX, warnings)
            .await?
            .into_iter()
            .map(|(_, r)| (r.name.clone(), r))
            .collect();
    let allocs: BTreeMap<String, IpamAllocation> =
        decode_prefix::<IpamAllocation>(store, keys::IPAM_NODES_PREFIX, warnings)
            .await?
            .into_iter()
            .map(|(_, a)| (a.name.clone(), a))
            .collect();
    let names: BTreeSet<&String> = k8s.keys().chain(regs.keys()).chain(allocs.keys()).collect();
    if format == Format::Json {
        let v: Vec<Value> = names
            .iter()
            .map(|n| {
                json!({"name": n, "kubernetes": k8s.get(*n), "registration": regs.get(*n), "allocation": allocs.get(*n)})
            })
            .collect();
        return Ok(to_json(&v));
    }
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|n| {
            let reg = regs.get(*n);
            let alloc = allocs.get(*n);
            let id = reg.map(|r| r.id).or(alloc.map(|a| a.id)).map_or_else(|| "<none>".into(), |i| i.to_string());
            let cidr = reg
                .map(|r| r.pod_cidr.to_string())
                .or(alloc.map(|a| a.pod_cidr.to_string()))
                .unwrap_or_else(|| "<none>".into());
            let addrs = match (reg, k8s.get(*n)) {
                (Some(r), _) if !r.addresses.is_empty() => join(r.addresses.iter().map(|a| &a.address)),
                (_, Some(k)) => join(k.addresses.iter().filter(|a| a.address_type.ends_with("IP")).map(|a| &a.address)),
                _ => "<none>".into(),
            };
            vec![
                (*n).clone(),
                id,
                cidr,
                addrs,
                if reg.is_some() { "yes".into() } else { "no".into() },
                if k8s.contains_key(*n) { "yes".into() } else { "no".into() },
            ]
        })
        .collect();
    Ok(table(&["NAME", "ID", "POD-CIDR", "ADDRESSES", "REGISTERED", "KUBERNETES"], &rows))
}

async fn ipam(store: &Arc<dyn Store>, format: Format, warnings: &mut Vec<String>) -> Result<String, StoreError> {
    let config = match store.get(keys::IPAM_CONFIG).await? {
        None => None,
        Some(kv) => match decode::<IpamConfig>(&kv.value) {
            Ok(c) => Some(c),
            Err(e) => {
                warnings.push(format!("skipping {}: {e}", keys::IPAM_CONFIG));
                None
            }
        },
    };
    let allocs = decode_prefix::<IpamAllocation>(store, keys::IPAM_NODES_PREFIX, warnings).await?;
    let claims = decode_prefix::<NodeIdClaim>(store, keys::NODE_IDS_PREFIX, warnings).await?;
    let claims: BTreeMap<u32, String> =
        claims.into_iter().filter_map(|(k, c)| Some((keys::parse_node_id(&k)?, c.name))).collect();
    if format == Format::Json {
        let allocations: Vec<&IpamAllocation> = allocs.iter().map(|(_, a)| a).collect();
        return Ok(to_json(&json!({"config": config, "allocations": allocations, "node_ids": claims})));
    }
    let mut out = match &config {
        Some(c) => format!("pod subnet {} split into /{} per node\n\n", c.pod_subnet_cidr, c.pod_prefix_len),
        None => "no IPAM configuration stored yet (written by the first agent)\n\n".into(),
    };
    let mut rows: Vec<Vec<String>> = allocs
        .iter()
        .map(|(_, a)| {
            let claim = match claims.get(&a.id) {
                Some(holder) if holder == &a.name => "ok".to_string(),
                Some(holder) => format!("claimed by {holder}"),
                None => "unclaimed".to_string(),
            };
            vec![a.id.to_string(), a.name.clone(), a.pod_cidr.to_string(), claim]
        })
        .collect();
    // A claimed ID no allocation uses: held by a node that has no (or another) allocation,
    // e.g. one that left without releasing it, or one between claiming and allocating.
    let allocated: BTreeSet<u32> = allocs.iter().map(|(_, a)| a.id).collect();
    rows.extend(
        claims
            .iter()
            .filter(|(id, _)| !allocated.contains(id))
            .map(|(id, holder)| vec![id.to_string(), holder.clone(), "unallocated".into(), "claimed".into()]),
    );
    rows.sort_by_key(|r| r[0].parse::<u32>().unwrap_or(u32::MAX));
    out.push_str(&table(&["ID", "NODE", "POD-CIDR", "ID-CLAIM"], &rows));
    Ok(out)
}
