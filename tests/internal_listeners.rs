//! Internal listeners closed to direct traffic, for real, in network
//! namespaces the test creates: a "node" namespace runs the proxy binary
//! (listeners on `::`, so both families), a "pod" namespace holds the
//! backends and is a pod client, an "ext" namespace is a client outside
//! the cluster (IPv4 and IPv6). A ClusterIP-only Service's listener port
//! (read from `/debug/services`) answers only what our `nat` rules
//! redirected to it; a NodePort Service's listener, the nodePort, answers
//! anyone. Upstream opens no port for a ClusterIP; its userspace proxier
//! listened on `0.0.0.0:random` and was reachable there. Root and the
//! tools are required: without them the test fails, it never skips.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::lab::{
    assert_refused_fast, count, debug_services, external_client, packets, packets6,
    require_root_and_tools, tcp, udp, Proxy, Seen,
};
use common::netns::{node_and_pod, require_tools, wait_for, Netns};

const TEST: &str = "internal_listeners_answer_redirected_traffic_only_and_follow_the_service";
const CLUSTER_IP: &str = "10.96.0.90";
const CLUSTER_IP6: &str = "fd00:96::90";
const PUBLIC_IP: &str = "10.96.0.91";
const NODE_PORT: u16 = 30120;
const UDP_NODE_PORT: u16 = 30121;
/// The nodePort `ns/internal:http` moves to, and back from.
const MOVED_NODE_PORT: u16 = 30122;

/// `ns/internal` (dual-stack ClusterIP; `http` on `moved` as its nodePort
/// when given) and `ns/public` (NodePort), TCP `http` and UDP `dns` each,
/// all served by the pod's backends.
fn manifest(moved: Option<u16>) -> String {
    let slice = |name: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: dns, port: 8081, protocol: UDP}}]\n\
             endpoints: [{{addresses: [\"10.238.1.2\"]}}]\n"
        )
    };
    let (kind, http) = match moved {
        Some(np) => (
            "NodePort",
            format!("{{name: http, port: 80, nodePort: {np}}}"),
        ),
        None => ("ClusterIP", "{name: http, port: 80}".to_string()),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: internal, namespace: ns}}\n\
         spec:\n  type: {kind}\n  clusterIPs: [{CLUSTER_IP}, \"{CLUSTER_IP6}\"]\n\
         \x20 ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n\
         \x20 ports: [{http}, {{name: dns, port: 53, protocol: UDP}}]\n\
         ---\n{}---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: public, namespace: ns}}\n\
         spec:\n  type: NodePort\n  clusterIP: {PUBLIC_IP}\n\
         \x20 ports: [{{name: http, port: 80, nodePort: {NODE_PORT}}}, {{name: dns, port: 53, protocol: UDP, nodePort: {UDP_NODE_PORT}}}]\n\
         ---\n{}",
        slice("internal"),
        slice("public"),
    )
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The listener port of `ns/name:port_name` in `/debug/services`, once
/// bound.
fn listener_port(node: &Netns, name: &str, port_name: &str) -> Option<u16> {
    let doc = debug_services(node);
    doc["services"].as_array()?.iter().find_map(|s| {
        (s["name"] == name && s["port_name"] == port_name)
            .then(|| s["listener_port"].as_u64())
            .flatten()
            .and_then(|p| u16::try_from(p).ok())
    })
}

/// `ip6tables-save -t filter` inside `ns`.
fn filter6(ns: &Netns) -> String {
    ns.run(&["ip6tables-save", "-t", "filter"])
}

/// The rule closing listener `port` of `ns/internal:port_name`, as
/// `iptables-save` prints it.
fn closing_rule(proto: &str, port: u16, port_name: &str, answer: &str) -> String {
    format!("-A KUSP-INTERNAL-LISTENERS -p {proto} -m {proto} --dport {port} -m conntrack ! --ctstate DNAT -m comment --comment \"ns/internal:{port_name} takes redirected traffic only\" -j REJECT --reject-with {answer}")
}

/// Lines of our listeners' chain holding rules, in a `filter` save.
fn closing_rules(saved: &str) -> usize {
    count(saved, "-A KUSP-INTERNAL-LISTENERS ")
}

#[test]
fn internal_listeners_answer_redirected_traffic_only_and_follow_the_service() {
    require_root_and_tools(TEST);
    require_tools(TEST, &["ip6tables-save", "ip6tables-restore"], "iptables");
    let (node, pod, _) = node_and_pod("il", "10.238.1");
    let (ext, node_ip) = external_client(&node, "10.238.2", Some("fd00:238:2"));
    let node_ip6 = "fd00:238:2::1";
    // The IPv6 service range is routed, as a real node's default route
    // would (the host chain REDIRECTs before anything leaves).
    node.run(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd00:96::/64",
        "via",
        "fd00:238:2::2",
    ]);
    pod.name_backend(at("10.238.1.2", 8080), "backend");
    pod.udp_backend(at("10.238.1.2", 8081), "udp:");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("services.yaml");
    std::fs::write(&file, manifest(None)).unwrap();
    let proxy = Proxy::start(&node, dir.path(), &["--bind-address", "::"]);
    wait_for("internal listeners' rules", Duration::from_secs(10), || {
        closing_rules(&node.filter()) == 2 && closing_rules(&filter6(&node)) == 2
    });
    let http = listener_port(&node, "internal", "http").expect("listener of ns/internal:http");
    let dns = listener_port(&node, "internal", "dns").expect("listener of ns/internal:dns");
    assert_eq!(listener_port(&node, "public", "http"), Some(NODE_PORT));

    // The rules, as iptables-save reads them back: one per internal
    // listener in each family, jumped to once from INPUT; none for the
    // nodePorts.
    let (filter, v6) = (node.filter(), filter6(&node));
    let jump = "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy internal listeners\" -j KUSP-INTERNAL-LISTENERS";
    for (saved, icmp) in [
        (&filter, "icmp-port-unreachable"),
        (&v6, "icmp6-port-unreachable"),
    ] {
        assert_eq!(count(saved, jump), 1, "{saved}");
        for rule in [
            closing_rule("tcp", http, "http", "tcp-reset"),
            closing_rule("udp", dns, "dns", icmp),
        ] {
            assert_eq!(count(saved, &rule), 1, "{rule}\n{saved}");
        }
        assert_eq!(count(saved, "-j KUSP-INTERNAL-LISTENERS"), 1, "{saved}");
    }

    let t = Duration::from_secs(3);
    let answer = || Seen::Answer("backend\n".into());
    let udp_answer = || Seen::Answer("udp:query".into());
    // Redirected traffic is served: ClusterIP from a pod and from the
    // node (OUTPUT REDIRECT to loopback), TCP and UDP. (The endpoints are
    // IPv4 only, so the IPv6 ClusterIP has none: tests/dual_stack.rs.)
    let vip = at(CLUSTER_IP, 80);
    assert_eq!(tcp(&pod, vip, t).0, answer(), "pod → ClusterIP");
    assert_eq!(tcp(&node, vip, t).0, answer(), "node → ClusterIP");
    let dns_vip = at(CLUSTER_IP, 53);
    assert_eq!(
        udp(&pod, dns_vip, t).0,
        udp_answer(),
        "pod → ClusterIP (UDP)"
    );
    assert_eq!(
        udp(&node, dns_vip, t).0,
        udp_answer(),
        "node → ClusterIP (UDP)"
    );

    // Straight to the listener's port: refused at once from outside, from
    // a pod and from the node itself (loopback and its own addresses),
    // both families, as a closed port.
    let tcp_rule = format!("--dport {http} ");
    let udp_rule = format!("--dport {dns} ");
    let (tcp_before, udp_before) = (packets(&node, &tcp_rule), packets(&node, &udp_rule));
    let (tcp6_before, udp6_before) = (packets6(&node, &tcp_rule), packets6(&node, &udp_rule));
    for (what, ns, ip) in [
        ("ext", &ext, node_ip.as_str()),
        ("ext (IPv6)", &ext, node_ip6),
        ("pod", &pod, "10.238.1.1"),
        ("node", &node, "127.0.0.1"),
        ("node (IPv6)", &node, "::1"),
        ("node via its address", &node, node_ip.as_str()),
    ] {
        assert_refused_fast(
            &format!("{what} → listener {http}"),
            tcp(ns, at(ip, http), t),
        );
        assert_refused_fast(
            &format!("{what} → listener {dns} (UDP)"),
            udp(ns, at(ip, dns), t),
        );
    }
    // Our REJECTs did it (without them the listeners would have answered).
    assert_eq!(packets(&node, &tcp_rule), tcp_before + 4);
    assert_eq!(packets(&node, &udp_rule), udp_before + 4);
    assert_eq!(packets6(&node, &tcp_rule), tcp6_before + 2);
    assert_eq!(packets6(&node, &udp_rule), udp6_before + 2);

    // The nodePort is the NodePort Service's listener: open to all of its
    // family (the Service is IPv4-only: an IPv6 client finds no endpoint
    // of its family, as upstream's IPv6 proxier has no such Service).
    assert_ne!(
        tcp(&ext, at(node_ip6, NODE_PORT), t).0,
        answer(),
        "ext (IPv6) → IPv4-only nodePort"
    );
    for (what, ns, ip) in [
        ("ext", &ext, node_ip.as_str()),
        ("pod", &pod, "10.238.1.1"),
        ("node", &node, "127.0.0.1"),
    ] {
        assert_eq!(
            tcp(ns, at(ip, NODE_PORT), t).0,
            answer(),
            "{what} → nodePort"
        );
        assert_eq!(
            udp(ns, at(ip, UDP_NODE_PORT), t).0,
            udp_answer(),
            "{what} → nodePort (UDP)"
        );
    }
    assert_eq!(
        tcp(&pod, at(PUBLIC_IP, 80), t).0,
        answer(),
        "pod → ClusterIP of the NodePort Service"
    );

    // The rules follow the listener: on a nodePort it is open to all and
    // closes nothing; back on a port of its own it is closed again.
    std::fs::write(&file, manifest(Some(MOVED_NODE_PORT))).unwrap();
    wait_for("http on its nodePort", Duration::from_secs(10), || {
        listener_port(&node, "internal", "http") == Some(MOVED_NODE_PORT)
            && closing_rules(&node.filter()) == 1
            && closing_rules(&filter6(&node)) == 1
    });
    assert!(!node.filter().contains(&tcp_rule), "{}", node.filter());
    assert_eq!(
        tcp(&ext, at(&node_ip, MOVED_NODE_PORT), t).0,
        answer(),
        "ext → moved nodePort"
    );
    assert_eq!(tcp(&pod, vip, t).0, answer(), "pod → ClusterIP, moved");

    std::fs::write(&file, manifest(None)).unwrap();
    wait_for("http on a port of its own", Duration::from_secs(10), || {
        listener_port(&node, "internal", "http").is_some_and(|p| p != MOVED_NODE_PORT)
            && closing_rules(&node.filter()) == 2
            && closing_rules(&filter6(&node)) == 2
    });
    let back = listener_port(&node, "internal", "http").expect("listener of ns/internal:http");
    assert_eq!(
        count(
            &node.filter(),
            &closing_rule("tcp", back, "http", "tcp-reset")
        ),
        1
    );
    assert_refused_fast("ext → listener, back", tcp(&ext, at(&node_ip, back), t));
    assert_refused_fast("pod → listener, back", tcp(&pod, at("10.238.1.1", back), t));
    assert_eq!(tcp(&pod, vip, t).0, answer(), "pod → ClusterIP, back");
    assert_eq!(tcp(&node, vip, t).0, answer(), "node → ClusterIP, back");

    // A clean stop removes the chain and its jump, both families.
    proxy.stop();
    for saved in [node.nat(), node.filter(), filter6(&node)] {
        assert!(!saved.contains("KUSP"), "left:\n{saved}");
    }
}
