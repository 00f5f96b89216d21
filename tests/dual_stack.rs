//! Dual-stack with the default flags, for real, in network namespaces the
//! test creates: a "node" namespace runs the proxy binary (no
//! `--bind-address`), a "pod" namespace holds one backend per family, an
//! "ext" namespace is a client outside the cluster. An IPv6-only Service is
//! served on its IPv6 ClusterIP, nodePort and external IP; a dual-stack
//! Service sends each family to endpoints of its own family only, as
//! upstream's one proxier per family does. Root and the tools are
//! required: without them this test fails, it never skips.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::lab::{external_client, require_root_and_tools, tcp, Proxy, Seen};
use common::netns::{node_and_pod, pod_ipv6, require_tools, wait_for, Netns};

const TEST: &str = "both_families_are_served_with_default_flags_each_to_its_own_endpoints";

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// `ns/six` (IPv6 only: ClusterIP, nodePort 30130, an external IP) and
/// `ns/both` (dual-stack ClusterIPs), each over the pod's backend of each
/// family it has.
const MANIFEST: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: six, namespace: ns}\n\
spec:\n  type: NodePort\n  clusterIP: \"fd00:96::10\"\n  ipFamilies: [IPv6]\n\
\x20 externalIPs: [\"fd00:240::99\"]\n  ports: [{name: http, port: 80, nodePort: 30130}]\n\
---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {name: six-1, namespace: ns, labels: {kubernetes.io/service-name: six}}\n\
addressType: IPv6\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [\"fd00:239:1::2\"]}]\n\
---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: both, namespace: ns}\n\
spec:\n  clusterIPs: [10.96.0.20, \"fd00:96::20\"]\n  ipFamilies: [IPv4, IPv6]\n\
\x20 ipFamilyPolicy: RequireDualStack\n  ports: [{name: http, port: 80}]\n\
---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {name: both-4, namespace: ns, labels: {kubernetes.io/service-name: both}}\n\
addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [\"10.239.1.2\"]}]\n\
---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {name: both-6, namespace: ns, labels: {kubernetes.io/service-name: both}}\n\
addressType: IPv6\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [\"fd00:239:1::2\"]}]\n";

#[test]
fn both_families_are_served_with_default_flags_each_to_its_own_endpoints() {
    require_root_and_tools(TEST);
    require_tools(TEST, &["ip6tables-save", "ip6tables-restore"], "iptables");
    let (node, pod, pod_if) = node_and_pod("ds", "10.239.1");
    // IPv6 on the pod link, the pod routed through the node.
    pod_ipv6(&node, &pod, &pod_if, "10.239.1", "fd00:239:1");
    let (ext, _) = external_client(&node, "10.239.2", Some("fd00:239:2"));
    // The IPv6 service range is routed, as a real node's default route would.
    node.run(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd00:96::/64",
        "via",
        "fd00:239:2::2",
    ]);
    pod.name_backend(at("10.239.1.2", 8080), "v4");
    pod.name_backend(at("fd00:239:1::2", 8080), "v6");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("services.yaml"), MANIFEST).unwrap();
    // Default flags: no --bind-address.
    let proxy = Proxy::start(&node, dir.path(), &[]);
    let t = Duration::from_secs(3);
    let seen = |ns: &Netns, addr: SocketAddr| tcp(ns, addr, t).0;
    wait_for("the IPv6 ClusterIP served", Duration::from_secs(10), || {
        seen(&pod, at("fd00:96::10", 80)) == Seen::Answer("v6\n".into())
    });

    // The IPv6-only Service: ClusterIP (a pod, the node), nodePort and
    // external IP (from outside).
    let v6 = || Seen::Answer("v6\n".into());
    let v4 = || Seen::Answer("v4\n".into());
    assert_eq!(
        seen(&node, at("fd00:96::10", 80)),
        v6(),
        "node → IPv6 ClusterIP"
    );
    assert_eq!(
        seen(&ext, at("fd00:239:2::1", 30130)),
        v6(),
        "ext → IPv6 nodePort"
    );
    assert_eq!(
        seen(&ext, at("fd00:240::99", 80)),
        v6(),
        "ext → IPv6 external IP"
    );

    // The dual-stack Service: each family to its own endpoints, every time.
    for _ in 0..10 {
        assert_eq!(seen(&pod, at("10.96.0.20", 80)), v4(), "IPv4 ClusterIP");
        assert_eq!(seen(&pod, at("fd00:96::20", 80)), v6(), "IPv6 ClusterIP");
    }
    // The IPv6-only Service over IPv4 has no endpoint of that family: the
    // nodePort refuses IPv4 clients (upstream's IPv4 proxier has no such
    // Service).
    assert_ne!(
        seen(&ext, at("10.239.2.1", 30130)),
        v6(),
        "IPv4 client of an IPv6-only Service"
    );
    proxy.stop();
}
