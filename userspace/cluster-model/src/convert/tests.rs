//! One test per kind from realistic API JSON, plus defaulting and error paths.

use super::*;
use crate::encode;
use serde_json::json;

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("fixture is valid Kubernetes JSON")
}

#[test]
fn pod_converts_ips_ports_node_and_labels() {
    let pod: core::Pod = from_json(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web", "tier": "fe"},
                     "uid": "u1", "resourceVersion": "42"},
        "spec": {
            "nodeName": "node-a",
            "containers": [
                {"name": "c1", "image": "nginx", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"containerPort": 53, "protocol": "UDP"}]},
                {"name": "c2", "image": "sidecar", "ports": [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]}
            ]
        },
        "status": {"podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}
    }));
    let m = pod.to_model().unwrap();
    assert_eq!(m.name, "web-0");
    assert_eq!(m.namespace, "shop");
    assert_eq!(m.labels, labels(&[("app", "web"), ("tier", "fe")]));
    assert_eq!(m.ips, vec!["10.1.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
    assert_eq!(m.node_name.as_deref(), Some("node-a"));
    assert!(!m.host_network);
    assert_eq!(
        m.container_ports,
        vec![
            ContainerPort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 8080,
                host_port: None,
                host_ip: None
            },
            ContainerPort { name: None, protocol: Protocol::Udp, port: 53, host_port: None, host_ip: None },
            ContainerPort {
                name: Some("metrics".into()),
                protocol: Protocol::Tcp,
                port: 9090,
                host_port: None,
                host_ip: None
            },
        ]
    );
    assert_eq!(pod.model_ref().unwrap().key(), "/contiv/k8s/pod/shop/web-0");
    assert_eq!(m.resolve_port(&PortRef::Name("http".into()), Protocol::Tcp), Some(8080));
    assert_eq!(m.resolve_port(&PortRef::Name("http".into()), Protocol::Udp), None);
    assert_eq!(m.resolve_port(&PortRef::Name("nope".into()), Protocol::Tcp), None);
    assert_eq!(m.resolve_port(&PortRef::Number(53), Protocol::Udp), Some(53));
    assert_eq!(m.key(), "/contiv/k8s/pod/shop/web-0");
    // The exact stored bytes: what KSR and netctl both write.
    assert_eq!(
        String::from_utf8(encode(&m)).unwrap(),
        r#"{"v":1,"name":"web-0","namespace":"shop","labels":{"app":"web","tier":"fe"},"ips":["10.1.0.5","fd00::5"],"node_name":"node-a","host_network":false,"container_ports":[{"name":"http","protocol":"TCP","port":8080},{"name":null,"protocol":"UDP","port":53},{"name":"metrics","protocol":"TCP","port":9090}]}"#
    );
}

#[test]
fn pod_host_network_single_ip_and_pending() {
    let pod: core::Pod = from_json(json!({
        "metadata": {"name": "kp", "namespace": "kube-system"},
        "spec": {"hostNetwork": true, "containers": []},
        "status": {"podIP": "192.168.1.10"}
    }));
    let m = pod.to_model().unwrap();
    assert!(m.host_network);
    assert_eq!(m.ips, vec!["192.168.1.10".parse::<IpAddr>().unwrap()]);
    let pending: core::Pod = from_json(json!({"metadata": {"name": "p", "namespace": "d"}}));
    let m = pending.to_model().unwrap();
    assert!(m.ips.is_empty() && m.node_name.is_none() && m.container_ports.is_empty());
}

/// A finished pod (Succeeded, Failed) keeps its addresses in its status, but they are free
/// for the next pod: the model drops them, so no policy peer or hostPort follows them.
#[test]
fn finished_pods_have_no_addresses() {
    for (phase, kept) in
        [("Succeeded", false), ("Failed", false), ("Running", true), ("Pending", true), ("Unknown", true)]
    {
        let pod: core::Pod = from_json(json!({
            "metadata": {"name": "job-1", "namespace": "d", "labels": {"app": "frontend"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"phase": phase, "podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.7"}]}
        }));
        let m = pod.to_model().unwrap();
        assert_eq!(!m.ips.is_empty(), kept, "{phase}: {m:?}");
        assert_eq!(m.labels, labels(&[("app", "frontend")]), "{phase}");
    }
}

/// Native sidecars (init containers that keep running, restartPolicy Always) serve named
/// ports as Kubernetes' own port lookup finds them; other init containers do not.
#[test]
fn pod_ports_of_native_sidecars_count() {
    let pod: core::Pod = from_json(json!({
        "metadata": {"name": "web", "namespace": "d"},
        "spec": {
            "initContainers": [
                {"name": "setup", "ports": [{"name": "setup", "containerPort": 7000}]},
                {"name": "proxy", "restartPolicy": "Always", "ports": [{"name": "metrics", "containerPort": 9901}]}
            ],
            "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]
        }
    }));
    let m = pod.to_model().unwrap();
    let names: Vec<(Option<&str>, u16)> = m.container_ports.iter().map(|p| (p.name.as_deref(), p.port)).collect();
    assert_eq!(names, vec![(Some("http"), 8080), (Some("metrics"), 9901)]);
}

#[test]
fn pod_host_ports_and_host_ips() {
    let pod: core::Pod = from_json(json!({
        "metadata": {"name": "dns", "namespace": "d"},
        "spec": {"containers": [{"name": "c", "ports": [
            {"containerPort": 53, "protocol": "UDP", "hostPort": 5353},
            {"containerPort": 8080, "hostPort": 80, "hostIP": "192.168.1.10"},
            {"containerPort": 9090, "hostPort": 9090, "hostIP": "0.0.0.0"},
            {"containerPort": 7070, "hostPort": 0}]}]}
    }));
    let m = pod.to_model().unwrap();
    let got: Vec<(u16, Option<u16>, Option<IpAddr>)> =
        m.container_ports.iter().map(|p| (p.port, p.host_port, p.host_ip)).collect();
    assert_eq!(
        got,
        vec![
            (53, Some(5353), None),
            (8080, Some(80), Some("192.168.1.10".parse().unwrap())),
            (9090, Some(9090), None),
            (7070, None, None),
        ]
    );
    // Stored only when set: a pod without host ports keeps its exact bytes.
    let bytes = String::from_utf8(encode(&m)).unwrap();
    assert!(bytes.contains(r#""port":53,"host_port":5353}"#), "{bytes}");
    assert!(bytes.contains(r#""port":7070}"#), "{bytes}");
}

/// The API server does not check hostIP, so `localhost` gets in. Refusing the pod would
/// drop it from the store (and from policy); only that port's host mapping is lost.
#[test]
fn a_host_ip_that_is_no_address_loses_only_its_host_port() {
    let pod: core::Pod = from_json(json!({
        "metadata": {"name": "p", "namespace": "d", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": 80, "hostPort": 8080, "hostIP": "localhost"},
            {"name": "dns", "containerPort": 53, "protocol": "UDP", "hostPort": 53, "hostIP": "10.0.0.1"},
            {"name": "admin", "containerPort": 9000, "hostIP": "nope"}]}]},
        "status": {"podIP": "10.1.0.5"}
    }));
    let m = pod.to_model().expect("the pod converts");
    assert_eq!(m.ips, vec!["10.1.0.5".parse::<IpAddr>().unwrap()]);
    assert_eq!(m.labels, labels(&[("app", "web")]));
    assert_eq!(
        m.container_ports,
        vec![
            ContainerPort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 80,
                host_port: None,
                host_ip: None
            },
            ContainerPort {
                name: Some("dns".into()),
                protocol: Protocol::Udp,
                port: 53,
                host_port: Some(53),
                host_ip: Some("10.0.0.1".parse().unwrap())
            },
            ContainerPort {
                name: Some("admin".into()),
                protocol: Protocol::Tcp,
                port: 9000,
                host_port: None,
                host_ip: None
            },
        ]
    );
    // The named port still resolves.
    assert_eq!(m.resolve_port(&PortRef::Name("http".into()), Protocol::Tcp), Some(80));
}

#[test]
fn pod_errors_name_the_field() {
    let bad_ip: core::Pod = from_json(json!({
        "metadata": {"name": "p", "namespace": "d"},
        "status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "not-an-ip"}]}
    }));
    assert_eq!(bad_ip.to_model().unwrap_err().field(), "status.podIPs[1].ip");
    let bad_port: core::Pod = from_json(json!({
        "metadata": {"name": "p", "namespace": "d"},
        "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 70000}]}]}
    }));
    assert_eq!(bad_port.to_model().unwrap_err().field(), "spec.containers[0].ports[0].containerPort");
    let bad_proto: core::Pod = from_json(json!({
        "metadata": {"name": "p", "namespace": "d"},
        "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "protocol": "ICMP"}]}]}
    }));
    assert_eq!(bad_proto.to_model().unwrap_err().field(), "spec.containers[0].ports[0].protocol");
    let no_ns: core::Pod = from_json(json!({"metadata": {"name": "p"}}));
    assert_eq!(no_ns.to_model().unwrap_err(), ConvertError::Missing { field: "metadata.namespace".into() });
    let no_name: core::Pod = from_json(json!({"metadata": {"namespace": "d"}}));
    assert_eq!(no_name.model_ref().unwrap_err().field(), "metadata.name");
    let slash: core::Pod = from_json(json!({"metadata": {"name": "a/b", "namespace": "d"}}));
    assert!(matches!(slash.to_model(), Err(ConvertError::Invalid { .. })));
}

/// The API server keeps `kubernetes.io/metadata.name` equal to the name, whatever a client
/// sends; a namespace from YAML (netctl) converts the same.
#[test]
fn namespace_name_label_is_always_the_name() {
    for given in [json!({"env": "prod"}), json!({"env": "prod", "kubernetes.io/metadata.name": "other"}), json!(null)] {
        let ns: core::Namespace = from_json(json!({"metadata": {"name": "shop", "labels": given}}));
        let m = ns.to_model().unwrap();
        assert_eq!(m.labels.get(LABEL_NAMESPACE_NAME).map(String::as_str), Some("shop"), "{given}");
        assert_eq!(m.labels.contains_key("env"), !given.is_null(), "{given}");
        assert_eq!(m.labels.len(), if given.is_null() { 1 } else { 2 }, "{given}");
    }
}

#[test]
fn namespace_converts_labels() {
    let ns: core::Namespace = from_json(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop", "env": "prod"}},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}
    }));
    let m = ns.to_model().unwrap();
    assert_eq!(m.name, "shop");
    assert_eq!(m.labels.get("env").map(String::as_str), Some("prod"));
    assert_eq!(ns.model_ref().unwrap().key(), "/contiv/k8s/namespace/shop");
}

#[test]
fn service_converts_everything_the_proxy_needs() {
    let svc: core::Service = from_json(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop",
                     "labels": {"service.kubernetes.io/service-proxy-name": "other-proxy"}},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053},
                {"name": "plain", "port": 8443}
            ],
            "externalIPs": ["203.0.113.7"],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
            "externalTrafficPolicy": "Local",
            "internalTrafficPolicy": "Local",
            "healthCheckNodePort": 31000
        },
        "status": {"loadBalancer": {"ingress": [
            {"ip": "198.51.100.1"}, {"hostname": "lb.example"},
            {"ip": "198.51.100.2", "ipMode": "VIP"}, {"ip": "198.51.100.3", "ipMode": "Proxy"}
        ]}}
    }));
    let m = svc.to_model().unwrap();
    assert_eq!(m.service_type, ServiceType::LoadBalancer);
    assert_eq!(m.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap(), "fd00:96::10".parse().unwrap()]);
    assert!(!m.headless);
    assert_eq!(
        m.ports,
        vec![
            ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: PortRef::Name("http".into()),
                node_port: Some(30080)
            },
            ServicePort {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: 53,
                target_port: PortRef::Number(5353),
                node_port: Some(30053)
            },
            ServicePort {
                name: "plain".into(),
                protocol: Protocol::Tcp,
                port: 8443,
                target_port: PortRef::Number(8443),
                node_port: None
            },
        ]
    );
    assert_eq!(m.external_ips, vec!["203.0.113.7".parse::<IpAddr>().unwrap()]);
    // A Proxy-mode load balancer's address is not ours: pods reach it through the balancer.
    assert_eq!(m.load_balancer_ips, vec!["198.51.100.1".parse::<IpAddr>().unwrap(), "198.51.100.2".parse().unwrap()]);
    assert_eq!(m.session_affinity, SessionAffinity::ClientIP { timeout_seconds: 600 });
    assert_eq!(m.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(m.internal_traffic_policy, TrafficPolicy::Local);
    assert_eq!(m.health_check_node_port, Some(31000));
    assert_eq!(m.service_proxy_name.as_deref(), Some("other-proxy"));
    assert!(!m.headless_label);
    assert!(m.ignored_by_proxy(None));
    assert!(!m.ignored_by_proxy(Some("other-proxy")));
    // The port JSON: targetPort is a bare number or a bare name.
    let json = String::from_utf8(encode(&m)).unwrap();
    assert!(json.contains(r#""target_port":"http""#) && json.contains(r#""target_port":5353"#), "{json}");
    let back: Service = crate::decode(json.as_bytes()).unwrap();
    assert_eq!(back, m);
}

#[test]
fn service_addresses_and_ranges_with_leading_zeros_read_as_kubernetes_reads_them() {
    // Objects made before the API server refused leading zeros still hold them; Kubernetes
    // (and so kube-proxy) reads the fields as decimal. One such entry must not cost the
    // whole Service.
    let svc: core::Service = from_json(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "legacy", "namespace": "shop"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.010", "clusterIPs": ["10.96.0.010"],
            "ports": [{"name": "http", "port": 80}],
            "externalIPs": ["203.0.113.007", "0198.051.100.9"],
            "loadBalancerSourceRanges": ["010.000.0.0/08", " 192.168.001.0/24 ", "2001:db8::/32"]
        }
    }));
    let m = svc.to_model().unwrap();
    assert_eq!(m.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(m.external_ips, vec!["203.0.113.7".parse::<IpAddr>().unwrap(), "198.51.100.9".parse().unwrap()]);
    let want: Vec<IpNet> =
        ["10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32"].iter().map(|n| n.parse().unwrap()).collect();
    assert_eq!(m.load_balancer_source_ranges, want);
    // What is not an address at all is still refused, naming the entry.
    for (field, bad) in [
        ("externalIPs", json!(["1.2.3.256"])),
        ("externalIPs", json!(["1.2.3"])),
        ("externalIPs", json!(["1.2.3.4.5"])),
        ("externalIPs", json!(["1.2.+3.4"])),
        ("loadBalancerSourceRanges", json!(["10.0.0.0/33"])),
        ("loadBalancerSourceRanges", json!(["10.0.0.0/"])),
        ("loadBalancerSourceRanges", json!(["10.0.0.0"])),
        ("loadBalancerSourceRanges", json!(["10.0.0.0/+8"])),
    ] {
        let mut v = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.11", "ports": [{"port": 80}]}
        });
        v["spec"][field] = bad.clone();
        let svc: core::Service = from_json(v);
        let e = svc.to_model().expect_err(&format!("{field}: {bad}")).to_string();
        assert!(e.contains(&format!("spec.{field}[0]")), "{e}");
    }
}

#[test]
fn service_defaults_headless_and_ignore_labels() {
    let plain: core::Service = from_json(json!({
        "metadata": {"name": "s", "namespace": "d"},
        "spec": {"clusterIP": "10.96.1.1", "ports": [{"port": 443}], "sessionAffinity": "ClientIP"}
    }));
    let m = plain.to_model().unwrap();
    assert_eq!(m.service_type, ServiceType::ClusterIP);
    assert_eq!(m.cluster_ips, vec!["10.96.1.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(m.ports[0].name, "");
    assert_eq!(m.session_affinity, SessionAffinity::ClientIP { timeout_seconds: DEFAULT_AFFINITY_TIMEOUT_SECONDS });
    assert_eq!(m.external_traffic_policy, TrafficPolicy::Cluster);
    assert!(!m.ignored_by_proxy(None));

    let headless: core::Service = from_json(json!({
        "metadata": {"name": "h", "namespace": "d", "labels": {"service.kubernetes.io/headless": ""}},
        "spec": {"clusterIP": "None", "clusterIPs": ["None"]}
    }));
    let m = headless.to_model().unwrap();
    assert!(m.headless && m.headless_label && m.cluster_ips.is_empty());
    assert!(m.ignored_by_proxy(None));

    // targetPort 0 and "" are `port`, as the API server defaults them (SetDefaults_Service).
    let zero: core::Service = from_json(json!({
        "metadata": {"name": "s", "namespace": "d"},
        "spec": {"ports": [{"port": 80}, {"port": 81, "targetPort": 0}, {"port": 82, "targetPort": ""},
                           {"port": 83, "targetPort": "web"}]}
    }));
    let targets: Vec<PortRef> = zero.to_model().unwrap().ports.into_iter().map(|p| p.target_port).collect();
    assert_eq!(targets, [PortRef::Number(80), PortRef::Number(81), PortRef::Number(82), PortRef::Name("web".into())]);
    let bad: core::Service = from_json(json!({
        "metadata": {"name": "s", "namespace": "d"},
        "spec": {"ports": [{"port": 80}, {"port": 81, "targetPort": 70000}]}
    }));
    assert_eq!(bad.to_model().unwrap_err().field(), "spec.ports[1].targetPort");
    let bad_type: core::Service =
        from_json(json!({"metadata": {"name": "s", "namespace": "d"}, "spec": {"type": "Weird"}}));
    assert_eq!(bad_type.to_model().unwrap_err().field(), "spec.type");
    let bad_etp: core::Service =
        from_json(json!({"metadata": {"name": "s", "namespace": "d"}, "spec": {"externalTrafficPolicy": "Global"}}));
    assert_eq!(bad_etp.to_model().unwrap_err().field(), "spec.externalTrafficPolicy");
}

#[test]
fn endpointslice_converts_with_condition_defaults() {
    let es: discovery::EndpointSlice = from_json(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc12", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.1.0.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
             "nodeName": "node-a", "zone": "z1", "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "shop"},
             "hints": {"forZones": [{"name": "z1"}, {"name": "z2"}], "forNodes": [{"name": "node-a"}]}},
            {"addresses": ["10.1.1.7"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "node-b"},
            {"addresses": ["10.1.2.9"]},
            {"addresses": ["10.1.2.10"], "conditions": {"ready": false, "terminating": true}}
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    }));
    let m = es.to_model().unwrap();
    assert_eq!(m.service_name.as_deref(), Some("web"));
    assert_eq!(m.address_type, AddressType::IPv4);
    assert_eq!(m.endpoints.len(), 4);
    assert_eq!(m.endpoints[0].conditions, EndpointConditions { ready: true, serving: true, terminating: false });
    assert_eq!(m.endpoints[0].zone.as_deref(), Some("z1"));
    assert_eq!(m.endpoints[0].hints_for_zones, ["z1", "z2"]);
    assert_eq!(m.endpoints[0].hints_for_nodes, ["node-a"]);
    assert!(m.endpoints[1].hints_for_zones.is_empty() && m.endpoints[1].hints_for_nodes.is_empty());
    assert_eq!(m.endpoints[1].conditions, EndpointConditions { ready: false, serving: true, terminating: true });
    assert_eq!(m.endpoints[1].node_name.as_deref(), Some("node-b"));
    // Unset conditions: ready and serving (the API says nil means true), not terminating.
    assert_eq!(m.endpoints[2].conditions, EndpointConditions { ready: true, serving: true, terminating: false });
    // Unset serving is true also beside `ready: false`: a terminating endpoint written that
    // way is a fallback, as kube-proxy reads it.
    assert_eq!(m.endpoints[3].conditions, EndpointConditions { ready: false, serving: true, terminating: true });
    assert_eq!(
        m.ports,
        vec![
            EndpointPort { name: "http".into(), protocol: Protocol::Tcp, port: Some(8080) },
            EndpointPort { name: "dns".into(), protocol: Protocol::Udp, port: Some(53) },
        ]
    );
    assert_eq!(m.key(), "/contiv/k8s/endpointslice/shop/web-abc12");
}

#[test]
fn endpointslice_keeps_a_valid_last_change_trigger_time_and_ignores_a_malformed_one() {
    let slice = |annotation: Option<&str>| -> discovery::EndpointSlice {
        let mut v = json!({"metadata": {"name": "web-abc12", "namespace": "shop"}, "addressType": "IPv4"});
        if let Some(a) = annotation {
            v["metadata"]["annotations"] = json!({"endpoints.kubernetes.io/last-change-trigger-time": a});
        }
        from_json(v)
    };
    // As the EndpointSlice controller writes it (Go's RFC3339Nano), and with an offset.
    let m = slice(Some("2026-12-03T17:05:59.25Z")).to_model().unwrap();
    assert_eq!(m.last_change_trigger_time.as_deref(), Some("2026-12-03T17:05:59.25Z"));
    let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_796_317_559_250);
    assert_eq!(m.trigger_time(), Some(at));
    let m = slice(Some("2026-12-03T19:05:59+02:00")).to_model().unwrap();
    assert_eq!(m.last_change_trigger_time.as_deref(), Some("2026-12-03T17:05:59Z"));
    // A value that is no time only feeds a metric: the slice converts without it.
    let m = slice(Some("yesterday")).to_model().unwrap();
    assert_eq!(m.last_change_trigger_time, None);
    let mut m = slice(None).to_model().unwrap();
    assert_eq!(m.last_change_trigger_time, None);
    assert_eq!(m.trigger_time(), None);
    // A stored value not written by the conversion: read as no time.
    m.last_change_trigger_time = Some("soon".into());
    assert_eq!(m.trigger_time(), None);
    m.last_change_trigger_time = None;
    // Left out of the stored value when absent (older agents read what newer ksrs write).
    assert!(!String::from_utf8(crate::encode(&m)).unwrap().contains("trigger"));
}

#[test]
fn an_endpointslice_port_out_of_range_is_that_port_unusable_not_the_slice() {
    let es: discovery::EndpointSlice = from_json(json!({
        "metadata": {"name": "e", "namespace": "d"}, "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"]}],
        "ports": [{"name": "a", "port": 0, "protocol": "TCP"}, {"name": "c", "port": 70000, "protocol": "TCP"},
                  {"name": "b", "port": 8080, "protocol": "TCP"}]
    }));
    let m = es.to_model().expect("the slice converts");
    let ports: Vec<(&str, Option<u16>)> = m.ports.iter().map(|p| (p.name.as_str(), p.port)).collect();
    assert_eq!(ports, vec![("a", None), ("c", None), ("b", Some(8080))]);
    assert_eq!(m.endpoints.len(), 1);
}

/// An IPv4-mapped IPv6 address is IPv4 to Kubernetes (Go's ParseIPSloppy, then To4): in an
/// IPv4 slice, in externalIPs and load balancer addresses, and as a prefix.
#[test]
fn ipv4_mapped_ipv6_addresses_are_ipv4() {
    let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
    let es: discovery::EndpointSlice = from_json(json!({
        "metadata": {"name": "e", "namespace": "d"}, "addressType": "IPv4",
        "endpoints": [{"addresses": ["::ffff:10.1.0.6"]}, {"addresses": ["10.1.0.7"]}]
    }));
    let m = es.to_model().expect("an IPv4 slice");
    assert_eq!(m.endpoints[0].addresses, [v4("10.1.0.6")]);
    assert!(m.endpoints[0].addresses[0].is_ipv4());
    let v6: discovery::EndpointSlice = from_json(json!({
        "metadata": {"name": "e", "namespace": "d"}, "addressType": "IPv6",
        "endpoints": [{"addresses": ["fd00::1"]}, {"addresses": ["::ffff:10.1.0.6"]}]
    }));
    assert_eq!(v6.to_model().unwrap_err().field(), "endpoints[1].addresses[0]");

    let svc: core::Service = from_json(json!({
        "metadata": {"name": "s", "namespace": "d"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.9", "ports": [{"port": 80}],
                 "externalIPs": ["::ffff:203.0.113.7", "2001:db8::7"],
                 "loadBalancerSourceRanges": ["::ffff:10.0.0.0/104", "::ffff:0:0/96", "::ffff:10.0.0.0/64"]},
        "status": {"loadBalancer": {"ingress": [{"ip": "::ffff:198.51.100.1"}]}}
    }));
    let m = svc.to_model().unwrap();
    assert_eq!(m.external_ips, [v4("203.0.113.7"), v4("2001:db8::7")]);
    assert_eq!(m.load_balancer_ips, [v4("198.51.100.1")]);
    // The length counts 128 bits: what stays mapped is IPv4 (Go's IPNet reads it so);
    // a shorter one clears the mapping and is IPv6.
    let want: Vec<IpNet> = ["10.0.0.0/8", "0.0.0.0/0", "::/64"].iter().map(|n| n.parse().unwrap()).collect();
    assert_eq!(m.load_balancer_source_ranges, want);
}

#[test]
fn endpointslice_rejects_fqdn_and_family_mismatch() {
    let fqdn: discovery::EndpointSlice = from_json(json!({
        "metadata": {"name": "e", "namespace": "d"}, "addressType": "FQDN",
        "endpoints": [{"addresses": ["db.example"]}]
    }));
    assert!(matches!(fqdn.to_model(), Err(ConvertError::Unsupported { .. })));
    let mixed: discovery::EndpointSlice = from_json(json!({
        "metadata": {"name": "e", "namespace": "d"}, "addressType": "IPv6",
        "endpoints": [{"addresses": ["fd00::1"]}, {"addresses": ["10.0.0.1"]}]
    }));
    assert_eq!(mixed.to_model().unwrap_err().field(), "endpoints[1].addresses[0]");
}

#[test]
fn networkpolicy_converts_full_spec() {
    let np: networking::NetworkPolicy = from_json(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-fe", "namespace": "shop"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"},
                            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["be", "data"]},
                                                 {"key": "canary", "operator": "DoesNotExist"}]},
            "ingress": [
                {"from": [
                    {"podSelector": {"matchLabels": {"app": "web"}}},
                    {"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {}},
                    {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}}],
                 "ports": [{"protocol": "TCP", "port": 5432}, {"port": "metrics"}, {"port": 30000, "endPort": 30100, "protocol": "UDP"}]},
                {}
            ],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.1/8"}}]}]
        }
    }));
    let m = np.to_model().unwrap();
    assert_eq!(m.pod_selector.match_labels, labels(&[("app", "db")]));
    assert_eq!(m.pod_selector.match_expressions[0].operator, SelectorOperator::In);
    assert_eq!(m.pod_selector.match_expressions[1].values, Vec::<String>::new());
    // policyTypes defaulted: Ingress always, Egress because egress rules exist.
    assert_eq!(m.policy_types, vec![PolicyType::Ingress, PolicyType::Egress]);
    assert_eq!(m.ingress.len(), 2);
    let rule = &m.ingress[0];
    assert_eq!(
        rule.peers[0],
        PolicyPeer::Pods {
            namespace_selector: None,
            pod_selector: Some(LabelSelector { match_labels: labels(&[("app", "web")]), match_expressions: vec![] })
        }
    );
    assert_eq!(
        rule.peers[1],
        PolicyPeer::Pods {
            namespace_selector: Some(LabelSelector {
                match_labels: labels(&[("env", "prod")]),
                match_expressions: vec![]
            }),
            pod_selector: Some(LabelSelector::default())
        }
    );
    assert_eq!(
        rule.peers[2],
        PolicyPeer::IpBlock(IpBlock {
            cidr: "172.17.0.0/16".parse().unwrap(),
            except: vec!["172.17.1.0/24".parse().unwrap()]
        })
    );
    assert_eq!(
        rule.ports,
        vec![
            PolicyPort { protocol: Protocol::Tcp, port: Some(PortRef::Number(5432)), end_port: None },
            PolicyPort { protocol: Protocol::Tcp, port: Some(PortRef::Name("metrics".into())), end_port: None },
            PolicyPort { protocol: Protocol::Udp, port: Some(PortRef::Number(30000)), end_port: Some(30100) },
        ]
    );
    // An empty rule allows everything.
    assert!(m.ingress[1].peers.is_empty() && m.ingress[1].ports.is_empty());
    // Host bits are cleared.
    assert_eq!(
        m.egress[0].peers[0],
        PolicyPeer::IpBlock(IpBlock { cidr: "10.0.0.0/8".parse().unwrap(), except: vec![] })
    );
    let back: NetworkPolicy = crate::decode(&encode(&m)).unwrap();
    assert_eq!(back, m);
    // The selector semantics.
    assert!(m.pod_selector.matches(&labels(&[("app", "db"), ("tier", "be")])));
    assert!(!m.pod_selector.matches(&labels(&[("app", "db"), ("tier", "be"), ("canary", "1")])));
    assert!(!m.pod_selector.matches(&labels(&[("app", "db")])));
}

#[test]
fn networkpolicy_defaults_and_errors() {
    let deny: networking::NetworkPolicy = from_json(json!({
        "metadata": {"name": "deny", "namespace": "d"}, "spec": {"podSelector": {}}
    }));
    let m = deny.to_model().unwrap();
    assert_eq!(m.policy_types, vec![PolicyType::Ingress]);
    assert!(m.ingress.is_empty() && m.egress.is_empty());
    let egress_only: networking::NetworkPolicy = from_json(json!({
        "metadata": {"name": "e", "namespace": "d"}, "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
    }));
    assert_eq!(egress_only.to_model().unwrap().policy_types, vec![PolicyType::Egress]);

    let cases = [
        (json!({"policyTypes": ["Sideways"]}), "spec.policyTypes[0]"),
        (json!({"ingress": [{"from": [{}]}]}), "spec.ingress[0].from[0].podSelector|namespaceSelector|ipBlock"),
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
            "spec.ingress[0].from[0].ipBlock",
        ),
        (json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}), "spec.egress[0].to[0].ipBlock.cidr"),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}]}]}),
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (json!({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}), "spec.ingress[0].ports[0].endPort"),
        (json!({"ingress": [{"ports": [{"port": 100, "endPort": 90}]}]}), "spec.ingress[0].ports[0].endPort"),
        // Unlike a Service's targetPort, a policy port of 0 or "" is no default: invalid.
        (json!({"ingress": [{"ports": [{"port": 0}]}]}), "spec.ingress[0].ports[0].port"),
        (json!({"egress": [{"ports": [{"port": ""}]}]}), "spec.egress[0].ports[0].port"),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}}),
            "spec.podSelector.matchExpressions[0].operator",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "spec.podSelector.matchExpressions[0].values",
        ),
    ];
    for (spec, field) in cases {
        let np: networking::NetworkPolicy =
            from_json(json!({"metadata": {"name": "x", "namespace": "d"}, "spec": spec}));
        assert_eq!(np.to_model().unwrap_err().field(), field, "{spec}");
    }
}

#[test]
fn node_converts_addresses_and_pod_cidrs() {
    let node: core::Node = from_json(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"kubernetes.io/hostname": "node-a", "topology.kubernetes.io/zone": "z1"}},
        "spec": {"podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24", "fd00:1::/64"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"},
                                 {"type": "Hostname", "address": "node-a"},
                                 {"type": "ExternalIP", "address": "203.0.113.10"}]}
    }));
    let m = node.to_model().unwrap();
    assert_eq!(m.name, "node-a");
    assert_eq!(m.addresses.len(), 3);
    assert_eq!(m.ips_of_type("InternalIP"), vec!["192.168.1.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(m.ips_of_type("ExternalIP"), vec!["203.0.113.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(m.pod_cidrs, vec!["10.1.0.0/24".parse::<IpNet>().unwrap(), "fd00:1::/64".parse().unwrap()]);
    assert_eq!(m.zone.as_deref(), Some("z1"));
    assert_eq!(node.model_ref().unwrap().key(), "/contiv/k8s/node/node-a");

    let legacy: core::Node = from_json(json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.2.0.0/24"}}));
    assert_eq!(legacy.to_model().unwrap().pod_cidrs, vec!["10.2.0.0/24".parse::<IpNet>().unwrap()]);
    assert_eq!(legacy.to_model().unwrap().zone, None, "no zone label");
    let bad: core::Node = from_json(json!({"metadata": {"name": "n"}, "spec": {"podCIDRs": ["nope"]}}));
    assert_eq!(bad.to_model().unwrap_err().field(), "spec.podCIDRs[0]");
}

#[test]
fn a_node_is_to_be_deleted_with_a_deletion_timestamp_or_the_autoscalers_taint() {
    let node = |extra: serde_json::Value| {
        let mut n = json!({"metadata": {"name": "n"}, "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}});
        json_patch(&mut n, extra);
        from_json::<core::Node>(n).to_model().unwrap()
    };
    assert!(!node(json!({})).to_be_deleted, "an unrelated taint");
    assert!(
        node(json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1733212800", "effect": "NoSchedule"}]}}))
            .to_be_deleted
    );
    assert!(node(json!({"metadata": {"name": "n", "deletionTimestamp": "2026-12-03T08:00:00Z"}})).to_be_deleted);
    // Stored only when set: the value of a node in service stays as it was.
    let plain = serde_json::to_value(node(json!({}))).unwrap();
    assert!(plain.get("to_be_deleted").is_none() && plain.get("toBeDeleted").is_none(), "{plain}");
}

/// Replaces the top-level fields of `base` with `extra`'s.
fn json_patch(base: &mut serde_json::Value, extra: serde_json::Value) {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
}
