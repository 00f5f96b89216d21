//! Endpoint choice from manifests, as an operator writes them: a Node, a
//! Service and its EndpointSlices, read back as the internal and external
//! sets and the reason that `/debug/services` shows. The cases follow
//! upstream's `TestCategorizeEndpoints` (`pkg/proxy/topology_test.go`;
//! each names its upstream case) with the objects upstream's
//! EndpointSlice controller and API would hold for them.

use kube_userspace_proxy::discovery::{build_snapshot_with, Options, Sourced};
use kube_userspace_proxy::model::Snapshot;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The objects of one case, by kind.
type Objects = (
    Vec<Sourced<Service>>,
    Vec<Sourced<EndpointSlice>>,
    Vec<Sourced<Node>>,
);

/// Splits YAML documents into the three kinds.
fn objects(yaml: &str) -> Objects {
    let (mut svcs, mut slices, mut nodes) = (Vec::new(), Vec::new(), Vec::new());
    for (i, doc) in yaml.split("\n---\n").enumerate() {
        let origin = format!("case doc {i}");
        let kind: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
        match kind["kind"].as_str() {
            Some("Service") => svcs.push(Sourced {
                origin,
                object: serde_saphyr::from_str(doc).unwrap(),
            }),
            Some("EndpointSlice") => slices.push(Sourced {
                origin,
                object: serde_saphyr::from_str(doc).unwrap(),
            }),
            Some("Node") => nodes.push(Sourced {
                origin,
                object: serde_saphyr::from_str(doc).unwrap(),
            }),
            other => panic!("unexpected kind {other:?}"),
        }
    }
    (svcs, slices, nodes)
}

/// Internal set, external set and reason of the one service port.
fn choose(yaml: &str) -> (Vec<String>, Vec<String>, String) {
    let (svcs, slices, nodes) = objects(yaml);
    let options = Options {
        node_name: Some("node-a".into()),
        ..Options::default()
    };
    let (snap, problems) =
        build_snapshot_with(&svcs, &slices, &nodes, &Snapshot::default(), &options);
    assert!(problems.is_empty(), "{problems:?}");
    let e = snap
        .services
        .into_values()
        .next()
        .expect("one service port");
    let addrs = |v: &[kube_userspace_proxy::model::Endpoint]| {
        v.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>()
    };
    (
        addrs(e.choice.internal(&e.port)),
        addrs(e.choice.external(&e.port)),
        e.choice.reason,
    )
}

const NODE_ZONE_A: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}";

fn service(spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: ns}}\nspec:\n  clusterIP: 10.96.0.9\n  ports: [{{name: http, port: 80}}]\n{spec}")
}

/// An EndpointSlice of `web` with one endpoint per line of `endpoints`.
fn slice(endpoints: &str) -> String {
    format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 80}}]\nendpoints:\n{endpoints}")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn zone_hints_are_used_when_every_endpoint_has_one_and_one_matches() {
    // Upstream: "should use topology since all endpoints have hints, node
    // has a zone label and and there are endpoints for the node's zone".
    let yaml = [
        NODE_ZONE_A.to_string(),
        service("  trafficDistribution: PreferSameZone\n"),
        slice(
            "- {addresses: [10.1.2.3], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}\n\
             - {addresses: [10.1.2.4], nodeName: node-b, hints: {forZones: [{name: zone-b}]}}\n\
             - {addresses: [10.1.2.5], nodeName: node-c, hints: {forZones: [{name: zone-c}]}}\n\
             - {addresses: [10.1.2.6], nodeName: node-c, hints: {forZones: [{name: zone-a}]}}\n",
        ),
    ]
    .join("\n---\n");
    let (internal, external, reason) = choose(&yaml);
    assert_eq!(internal, strings(&["10.1.2.3:80", "10.1.2.6:80"]));
    assert!(external.is_empty());
    assert_eq!(reason, "zone hints (zone-a)");
}

#[test]
fn zone_hints_are_ignored_when_one_endpoint_has_none() {
    // Upstream: "should not use topology since at least one endpoint
    // doesn't have hints".
    let yaml = [
        NODE_ZONE_A.to_string(),
        service(""),
        slice(
            "- {addresses: [10.1.2.3], hints: {forZones: [{name: zone-a}]}}\n\
             - {addresses: [10.1.2.4]}\n",
        ),
    ]
    .join("\n---\n");
    let (internal, _, reason) = choose(&yaml);
    assert_eq!(internal, strings(&["10.1.2.3:80", "10.1.2.4:80"]));
    assert_eq!(reason, "hints ignored: 10.1.2.4:80 has none");
}

#[test]
fn zone_hints_are_ignored_without_the_node_zone_label() {
    // Upstream: "should not use topology since node has no zone label".
    let yaml = [
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}".to_string(),
        service(""),
        slice(
            "- {addresses: [10.1.2.3], hints: {forZones: [{name: zone-a}]}}\n\
             - {addresses: [10.1.2.4], hints: {forZones: [{name: zone-b}]}}\n",
        ),
    ]
    .join("\n---\n");
    let (internal, _, reason) = choose(&yaml);
    assert_eq!(internal, strings(&["10.1.2.3:80", "10.1.2.4:80"]));
    assert_eq!(reason, "hints ignored: node has no zone label");
}

#[test]
fn node_hints_win_over_zone_hints() {
    // Upstream (1.33+, PreferSameNode): "should prefer same-node hints over
    // same-zone hints".
    let yaml = [
        NODE_ZONE_A.to_string(),
        service("  trafficDistribution: PreferSameNode\n"),
        slice(
            "- {addresses: [10.1.2.3], nodeName: node-a, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}}\n\
             - {addresses: [10.1.2.4], nodeName: node-b, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-b}]}}\n",
        ),
    ]
    .join("\n---\n");
    let (internal, _, reason) = choose(&yaml);
    assert_eq!(internal, strings(&["10.1.2.3:80"]));
    assert_eq!(reason, "node hints (node-a)");
}

#[test]
fn external_policy_local_uses_local_endpoints_for_external_traffic_only() {
    // Upstream: "externalTrafficPolicy: Local, topology ignored for Local
    // endpoints".
    let yaml = [
        NODE_ZONE_A.to_string(),
        service("  type: NodePort\n  externalTrafficPolicy: Local\n")
            .replace("port: 80}", "port: 80, nodePort: 30080}"),
        slice(
            "- {addresses: [10.1.2.3], nodeName: node-a, hints: {forZones: [{name: zone-a}]}}\n\
             - {addresses: [10.1.2.4], nodeName: node-a, hints: {forZones: [{name: zone-b}]}}\n\
             - {addresses: [10.1.2.5], nodeName: node-b, hints: {forZones: [{name: zone-c}]}}\n\
             - {addresses: [10.1.2.6], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}\n",
        ),
    ]
    .join("\n---\n");
    let (internal, external, reason) = choose(&yaml);
    assert_eq!(internal, strings(&["10.1.2.3:80", "10.1.2.6:80"]));
    assert_eq!(external, strings(&["10.1.2.3:80", "10.1.2.4:80"]));
    assert_eq!(
        reason,
        "internal: zone hints (zone-a); external: node-local"
    );
}

#[test]
fn only_terminating_endpoints_are_used_as_a_fallback() {
    // Upstream: "Cluster traffic policy, only terminating endpoints".
    let yaml = [
        NODE_ZONE_A.to_string(),
        service(""),
        slice(
            "- {addresses: [10.1.2.3], conditions: {ready: false, serving: true, terminating: true}}\n\
             - {addresses: [10.1.2.4], conditions: {ready: false, serving: false, terminating: true}}\n",
        ),
    ]
    .join("\n---\n");
    let (internal, _, reason) = choose(&yaml);
    assert_eq!(internal, strings(&["10.1.2.3:80"]));
    assert_eq!(reason, "terminating fallback");
}

#[test]
fn a_service_without_endpoints_says_so() {
    let yaml = [NODE_ZONE_A.to_string(), service(""), slice("  []\n")].join("\n---\n");
    let yaml = yaml.replace("endpoints:\n  []", "endpoints: []");
    let (internal, external, reason) = choose(&yaml);
    assert!(internal.is_empty() && external.is_empty());
    assert_eq!(reason, "no endpoints");
}
