//! `loadBalancerSourceRanges` and `ipMode`, for real, in network
//! namespaces the test creates: a "node" namespace runs the proxy binary
//! and holds the LB IPs (IPv4 and IPv6, as a VIP-mode load balancer's
//! addresses routed to it), a "pod" namespace holds the backend, and two
//! outside clients are linked to the node, one inside the source ranges
//! and one outside. Upstream's `syncProxyRules` (the firewall chain,
//! `allowFromNode`, `KUBE-PROXY-FIREWALL`) and `newBaseServiceInfo`
//! (`IsVIPMode`, the ranges by family) are the reference. Root and the
//! tools are required: without them the test fails, it never skips.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::lab::{
    count, debug_services, external_client, packets, require_root_and_tools, tcp, Proxy, Seen,
};
use common::netns::{node_and_pod, pod_ipv6, require_tools, wait_for, Netns};

const LB4: &str = "198.18.0.20";
const LB6: &str = "fd00:198::20";
/// An ingress in `ipMode: Proxy`: never captured.
const LB_PROXIED: &str = "198.18.0.21";

/// The dual-stack LoadBalancer Service `ns/lb` with `ranges` (YAML flow
/// items) and its backend of each family in the pod namespace (each
/// family's traffic goes to endpoints of its own, as upstream's).
fn manifest(ranges: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: ns}}\n\
         spec:\n  type: LoadBalancer\n  clusterIPs: [10.96.0.70, \"fd00:96::70\"]\n\
         \x20 ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n\
         \x20 loadBalancerSourceRanges: [{ranges}]\n\
         \x20 ports: [{{name: http, port: 80, nodePort: 30100}}]\n\
         status:\n  loadBalancer:\n    ingress:\n\
         \x20   - {{ip: {LB4}}}\n\
         \x20   - {{ip: \"{LB6}\", ipMode: VIP}}\n\
         \x20   - {{ip: {LB_PROXIED}, ipMode: Proxy}}\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: lb-1, namespace: ns, labels: {{kubernetes.io/service-name: lb}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints: [{{addresses: [\"10.237.1.2\"]}}]\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: lb-2, namespace: ns, labels: {{kubernetes.io/service-name: lb}}}}\n\
         addressType: IPv6\nports: [{{name: http, port: 8080}}]\n\
         endpoints: [{{addresses: [\"fd00:237:1::2\"]}}]\n"
    )
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// `ip6tables-save -t TABLE` inside `ns`.
fn save6(ns: &Netns, table: &str) -> String {
    ns.run(&["ip6tables-save", "-t", table])
}

#[test]
fn source_ranges_admit_listed_clients_and_drop_the_others_on_both_families() {
    const TEST: &str = "source_ranges_admit_listed_clients_and_drop_the_others_on_both_families";
    require_root_and_tools(TEST);
    require_tools(TEST, &["ip6tables-save", "ip6tables-restore"], "iptables");
    let (node, pod, pod_if) = node_and_pod("lbr", "10.237.1");
    // IPv6 on the pod link too, for the IPv6 backend.
    pod_ipv6(&node, &pod, &pod_if, "10.237.1", "fd00:237:1");
    let (allowed, _) = external_client(&node, "10.237.2", Some("fd00:237:2"));
    let (refused, refused_gw) = external_client(&node, "10.237.3", Some("fd00:237:3"));
    // The node holds the LB IPs: without our DROP, a client the ranges
    // leave out would reach nothing on port 80 and be reset at once.
    node.run(&["ip", "addr", "add", &format!("{LB4}/32"), "dev", "lo"]);
    node.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{LB6}/128"),
        "dev",
        "lo",
    ]);
    pod.name_backend(at("10.237.1.2", 8080), "backend");
    pod.name_backend(at("fd00:237:1::2", 8080), "backend");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    // The ranges hold the node's 10.237.2.1 and fd00:237:2::1:
    // allowFromNode in both families.
    std::fs::write(
        &file,
        manifest("' 10.237.2.0/24', bogus, 'fd00:237:2::/64'"),
    )
    .unwrap();
    let proxy = Proxy::start(&node, dir.path(), &["--bind-address", "::"]);
    wait_for("firewall rules of ns/lb", Duration::from_secs(10), || {
        count(&node.filter(), "-A KUSP-FIREWALL ") == 1
            && count(&save6(&node, "filter"), "-A KUSP-FIREWALL ") == 1
    });

    // The rules, as iptables-save reads them back: per family its own
    // ranges; the LB IPs in allowFromNode; nothing for the Proxy-mode
    // ingress; ClusterIP and nodePort unfiltered.
    let (nat, filter) = (node.nat(), node.filter());
    let (nat6, filter6) = (save6(&node, "nat"), save6(&node, "filter"));
    for chain in ["KUSP-PORTALS-CONTAINER", "KUSP-PORTALS-HOST"] {
        for source in ["10.237.2.0/24", &format!("{LB4}/32")] {
            let rule = format!("-A {chain} -s {source} -d {LB4}/32 -p tcp -m tcp --dport 80 ");
            assert!(nat.contains(&rule), "{rule}\n{nat}");
        }
        for source in ["fd00:237:2::/64", &format!("{LB6}/128")] {
            let rule = format!("-A {chain} -s {source} -d {LB6}/128 -p tcp -m tcp --dport 80 ");
            assert!(nat6.contains(&rule), "{rule}\n{nat6}");
        }
        assert!(
            nat.contains(&format!("-A {chain} -d 10.96.0.70/32 -p tcp")),
            "{nat}"
        );
    }
    assert_eq!(count(&nat, &format!("-d {LB4}/32")), 4, "{nat}");
    assert_eq!(count(&nat6, &format!("-d {LB6}/128")), 4, "{nat6}");
    assert!(
        !nat.contains("fd00") && !nat6.contains("10.237"),
        "families apart"
    );
    assert!(!nat.contains(LB_PROXIED) && !filter.contains(LB_PROXIED));
    assert!(filter.contains(&format!("-A KUSP-FIREWALL -d {LB4}/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/lb:http traffic not accepted by loadBalancerSourceRanges\" -j DROP")), "{filter}");
    assert!(
        filter6.contains(&format!("-A KUSP-FIREWALL -d {LB6}/128 -p tcp")),
        "{filter6}"
    );
    for jump in ["INPUT", "OUTPUT", "FORWARD"] {
        let rule = format!("-A {jump} -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy load balancer firewall\" -j KUSP-FIREWALL");
        assert_eq!(count(&filter, &rule), 1, "{filter}");
        assert_eq!(count(&filter6, &rule), 1, "{filter6}");
    }
    // The malformed range is shown on the port, which is served.
    let doc = debug_services(&node);
    let port = &doc["services"][0];
    assert_eq!(port["name"], "lb", "{doc}");
    assert_eq!(
        port["load_balancer_source_ranges"],
        serde_json::json!(["10.237.2.0/24", "fd00:237:2::/64"])
    );
    assert_eq!(
        port["invalid_load_balancer_source_ranges"],
        serde_json::json!(["bogus"])
    );

    let t = Duration::from_secs(3);
    let short = Duration::from_millis(400);
    let answer = || Seen::Answer("backend\n".into());
    let lb4 = at(LB4, 80);
    let lb6 = at(LB6, 80);
    assert_eq!(tcp(&allowed, lb4, t).0, answer(), "allowed → LB IPv4");
    assert_eq!(tcp(&allowed, lb6, t).0, answer(), "allowed → LB IPv6");
    let dropped_before = packets(&node, "-A KUSP-FIREWALL ");
    assert_eq!(
        tcp(&refused, lb4, short).0,
        Seen::TimedOut,
        "refused → LB IPv4"
    );
    assert_eq!(
        tcp(&refused, lb6, short).0,
        Seen::TimedOut,
        "refused → LB IPv6"
    );
    assert_eq!(tcp(&pod, lb4, short).0, Seen::TimedOut, "pod → LB IPv4");
    assert!(
        packets(&node, "-A KUSP-FIREWALL ") >= dropped_before + 2,
        "dropped by KUSP-FIREWALL"
    );
    // Neither the nodePort nor the ClusterIP is filtered.
    let node_port = at(&refused_gw, 30100);
    assert_eq!(
        tcp(&refused, node_port, t).0,
        answer(),
        "refused → nodePort"
    );
    assert_eq!(
        tcp(&refused, at("fd00:237:3::1", 30100), t).0,
        answer(),
        "refused → nodePort (IPv6)"
    );
    assert_eq!(
        tcp(&pod, at("10.96.0.70", 80), t).0,
        answer(),
        "pod → ClusterIP"
    );
    // The node reaches the VIP it holds (its source is the VIP itself).
    assert_eq!(
        tcp(&node, lb4, t).0,
        answer(),
        "node → LB IPv4 (allowFromNode)"
    );

    // Narrower ranges, holding no node address: the node is dropped too,
    // the allowed client still served.
    std::fs::write(&file, manifest("10.237.2.2/32, 'fd00:237:2::2/128'")).unwrap();
    wait_for("narrower ranges", Duration::from_secs(5), || {
        let nat = node.nat();
        nat.contains("-s 10.237.2.2/32") && !nat.contains(&format!("-s {LB4}/32"))
    });
    assert_eq!(tcp(&node, lb4, short).0, Seen::TimedOut, "node → LB IPv4");
    assert_eq!(
        tcp(&allowed, lb4, t).0,
        answer(),
        "allowed → LB IPv4, again"
    );
    assert_eq!(
        tcp(&allowed, lb6, t).0,
        answer(),
        "allowed → LB IPv6, again"
    );

    // A clean stop removes the firewall chain and its jumps, both families.
    proxy.stop();
    for saved in [
        node.nat(),
        node.filter(),
        save6(&node, "nat"),
        save6(&node, "filter"),
    ] {
        assert!(!saved.contains("KUSP"), "left:\n{saved}");
    }
}
