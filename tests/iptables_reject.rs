//! Upstream's REJECT and DROP, for real, inside network namespaces the
//! tests create: a "node" namespace runs the proxy binary, a "pod"
//! namespace holds a backend (and is a pod client: its source is in
//! `--cluster-cidr`), an "ext" namespace is a client outside the cluster,
//! routed to the node over a veth pair. The host's own rules are never
//! touched. Root and the tools are required: without them these tests
//! fail, they never skip.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::lab::{
    assert_refused_fast, count, external_client, packets, require_root_and_tools, tcp, udp, Proxy,
    Seen,
};
use common::netns::{node_and_pod, require_tools, veth, wait_for, Netns};

/// A TCP backend answering "NAME\n" and a UDP one answering
/// "udp:" + the datagram, in `ns`.
fn backends(ns: &Netns, tcp_addr: SocketAddr, udp_addr: SocketAddr, name: &'static str) {
    ns.name_backend(tcp_addr, name);
    ns.udp_backend(udp_addr, "udp:");
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\n\
    spec:\n  type: NodePort\n  clusterIP: 10.96.0.50\n  ports:\n\
    \x20 - {name: http, port: 80, nodePort: 30080}\n\
    \x20 - {name: dns, port: 53, protocol: UDP, nodePort: 30053}\n";

/// The slice of `web`: one endpoint at `ip` (TCP 8080, UDP 8081), ready
/// or neither ready nor serving.
fn slice(ip: &str, ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: dns, port: 8081, protocol: UDP}}]\n\
         endpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: {ready}, serving: {ready}, terminating: false}}}}]\n"
    )
}

#[test]
fn no_endpoints_is_refused_everywhere_until_endpoints_appear() {
    require_root_and_tools("no_endpoints_is_refused_everywhere_until_endpoints_appear");
    let (node, pod, _) = node_and_pod("rj", "10.235.1");
    // A pod's ClusterIP traffic without a nat rule is forwarded, as on a
    // real node: out of another interface (the default route's), so the
    // node sends no ICMP redirect (which would use up the per-host ICMP
    // rate limit before REJECT's port unreachable).
    node.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    node.run(&[
        "ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
    ]);
    node.run(&["ip", "link", "set", "uplink0", "up"]);
    node.run(&["ip", "link", "set", "uplink1", "up"]);
    node.run(&["ip", "route", "replace", "10.96.0.0/16", "dev", "uplink0"]);
    let (ext, node_ip) = external_client(&node, "10.235.2", None);
    backends(
        &pod,
        "10.235.1.2:8080".parse().unwrap(),
        "10.235.1.2:8081".parse().unwrap(),
        "pod-backend",
    );

    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("web.yaml");
    std::fs::write(
        &manifest,
        format!("{SERVICE}---\n{}", slice("10.235.1.2", false)),
    )
    .unwrap();
    let proxy = Proxy::start(&node, dir.path(), &[]);
    wait_for("REJECT rules for ns/web", Duration::from_secs(10), || {
        count(&node.filter(), "has no endpoints\" -j REJECT") == 4
    });
    let filter = node.filter();
    assert!(
        !node.nat().contains("ns/web:"),
        "no nat rule for a port without endpoints"
    );
    assert_eq!(count(&filter, "-j KUSP-SERVICES"), 2, "{filter}");
    assert_eq!(count(&filter, "-j KUSP-EXTERNAL-SERVICES"), 2, "{filter}");

    let vip: SocketAddr = "10.96.0.50:80".parse().unwrap();
    let dns_vip: SocketAddr = "10.96.0.50:53".parse().unwrap();
    let node_port: SocketAddr = format!("{node_ip}:30080").parse().unwrap();
    let udp_node_port: SocketAddr = format!("{node_ip}:30053").parse().unwrap();
    let t = Duration::from_secs(2);
    let tcp_node_port_before = packets(&node, "--dport 30080 ");
    assert_refused_fast("node → ClusterIP (TCP)", tcp(&node, vip, t));
    assert_refused_fast("node → ClusterIP (UDP)", udp(&node, dns_vip, t));
    assert_refused_fast("pod → ClusterIP (TCP)", tcp(&pod, vip, t));
    assert_refused_fast("pod → ClusterIP (UDP)", udp(&pod, dns_vip, t));
    assert_refused_fast("ext → nodePort (TCP)", tcp(&ext, node_port, t));
    assert_refused_fast("ext → nodePort (UDP)", udp(&ext, udp_node_port, t));
    // The refusals are our REJECTs (the listener may refuse on its own).
    assert!(packets(&node, "10.96.0.50/32 -p tcp") >= 2);
    assert!(packets(&node, "10.96.0.50/32 -p udp") >= 2);
    assert!(packets(&node, "--dport 30080 ") > tcp_node_port_before);
    assert!(packets(&node, "--dport 30053 ") >= 1);

    // Endpoints appear: the same addresses answer once the rules follow.
    std::fs::write(
        &manifest,
        format!("{SERVICE}---\n{}", slice("10.235.1.2", true)),
    )
    .unwrap();
    wait_for("REJECT rules gone", Duration::from_secs(5), || {
        let filter = node.filter();
        !filter.contains("ns/web") && filter.contains(":KUSP-SERVICES")
    });
    wait_for("nat rules for ns/web", Duration::from_secs(5), || {
        count(&node.nat(), "ns/web:") == 4
    });
    let answer = |s: &str| Seen::Answer(s.to_string());
    assert_eq!(
        tcp(&node, vip, t).0,
        answer("pod-backend\n"),
        "node → ClusterIP"
    );
    assert_eq!(
        tcp(&pod, vip, t).0,
        answer("pod-backend\n"),
        "pod → ClusterIP"
    );
    assert_eq!(
        udp(&pod, dns_vip, t).0,
        answer("udp:query"),
        "pod → ClusterIP (UDP)"
    );
    assert_eq!(
        udp(&node, dns_vip, t).0,
        answer("udp:query"),
        "node → ClusterIP (UDP)"
    );
    assert_eq!(
        tcp(&ext, node_port, t).0,
        answer("pod-backend\n"),
        "ext → nodePort"
    );
    assert_eq!(
        udp(&ext, udp_node_port, t).0,
        answer("udp:query"),
        "ext → nodePort (UDP)"
    );

    // And vanish again: refused again.
    std::fs::write(&manifest, SERVICE).unwrap();
    wait_for("REJECT rules back", Duration::from_secs(5), || {
        count(&node.filter(), "has no endpoints\" -j REJECT") == 4
    });
    assert_refused_fast("ext → nodePort (UDP), again", udp(&ext, udp_node_port, t));
    assert_refused_fast("pod → ClusterIP (TCP), again", tcp(&pod, vip, t));

    // A clean stop removes both tables' chains and jumps.
    proxy.stop();
    let (nat, filter) = (node.nat(), node.filter());
    assert!(
        !nat.contains("KUSP") && !filter.contains("KUSP"),
        "left:\n{nat}{filter}"
    );
}

#[test]
fn external_policy_local_without_local_endpoints_drops_outside_clients_only() {
    require_root_and_tools(
        "external_policy_local_without_local_endpoints_drops_outside_clients_only",
    );
    external_policy_local_case("etp", false);
}

#[test]
fn external_policy_local_tells_pods_by_their_bridge_interface() {
    require_root_and_tools("external_policy_local_tells_pods_by_their_bridge_interface");
    external_policy_local_case("etpbr", true);
}

/// eTP Local with a remote endpoint only, pods told by `--cluster-cidr`
/// or (`bridge`) by the node's interface towards them.
fn external_policy_local_case(tag: &str, bridge: bool) {
    let node = Netns::new(&format!("{tag}node"));
    let pod = Netns::new(&format!("{tag}pod"));
    let (node_if, _) = veth(&node, "10.236.1.1/24", &pod, "10.236.1.2/24");
    pod.run(&["ip", "route", "add", "default", "via", "10.236.1.1"]);
    // The service range is routed, as a real node's default route would.
    node.run(&["ip", "route", "add", "10.96.0.0/16", "dev", &node_if]);
    let (ext, node_ip) = external_client(&node, "10.236.2", None);
    // The external IP is one of the node's addresses (as with an L2 LB).
    node.run(&["ip", "addr", "add", "198.18.0.9/32", "dev", "lo"]);
    // The endpoint runs on another node (it is reached from the pod
    // namespace): this node has no local endpoint.
    backends(
        &pod,
        "10.236.1.2:8080".parse().unwrap(),
        "10.236.1.2:8081".parse().unwrap(),
        "remote-backend",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.0.60\n  externalTrafficPolicy: Local\n\
         \x20 externalIPs: [198.18.0.9]\n  ports: [{name: http, port: 80, nodePort: 30090}]\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}]\n\
         endpoints: [{addresses: [\"10.236.1.2\"], nodeName: node-b}]\n",
    )
    .unwrap();
    let mut args = vec!["--hostname-override", "node-a"];
    let (pods_match, not_pods_match) = if bridge {
        args.extend([
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            &node_if,
        ]);
        (
            format!("-d 198.18.0.9/32 -i {node_if} -p tcp"),
            format!("! -i {node_if} -p tcp"),
        )
    } else {
        args.extend(["--cluster-cidr", "10.236.1.0/24"]);
        (
            "-s 10.236.1.0/24 -d 198.18.0.9/32 -p tcp".to_string(),
            "! -s 10.236.1.0/24 -p tcp".to_string(),
        )
    };
    let proxy = Proxy::start(&node, dir.path(), &args);
    wait_for("DROP rules for ns/web", Duration::from_secs(10), || {
        count(&node.filter(), "has no local endpoints\" -j DROP") == 2
    });
    let (nat, filter) = (node.nat(), node.filter());
    assert!(
        nat.contains(&format!("-A KUSP-PORTALS-CONTAINER {pods_match}")),
        "{nat}"
    );
    assert!(
        nat.contains("-A KUSP-PORTALS-HOST -d 198.18.0.9/32 -p tcp"),
        "{nat}"
    );
    assert!(
        filter.contains(&format!("-A KUSP-EXTERNAL-SERVICES {not_pods_match} -m addrtype --dst-type LOCAL -m addrtype ! --src-type LOCAL -m tcp --dport 30090 -m conntrack ! --ctstate DNAT")),
        "{filter}"
    );

    let node_port: SocketAddr = format!("{node_ip}:30090").parse().unwrap();
    let external_ip: SocketAddr = "198.18.0.9:80".parse().unwrap();
    let short = Duration::from_millis(300);
    let t = Duration::from_secs(3);
    let answer = Seen::Answer("remote-backend\n".into());
    // From outside: dropped, neither refused nor answered.
    assert_eq!(
        tcp(&ext, node_port, short).0,
        Seen::TimedOut,
        "ext → nodePort"
    );
    assert_eq!(
        tcp(&ext, external_ip, short).0,
        Seen::TimedOut,
        "ext → externalIP"
    );
    // From the host: short-circuited to the (remote) endpoint.
    assert_eq!(tcp(&node, node_port, t).0, answer, "node → nodePort");
    assert_eq!(tcp(&node, external_ip, t).0, answer, "node → externalIP");
    // From a pod of this node (source in --cluster-cidr): the same.
    let pod_node_port: SocketAddr = "10.236.1.1:30090".parse().unwrap();
    assert_eq!(tcp(&pod, pod_node_port, t).0, answer, "pod → nodePort");
    assert_eq!(tcp(&pod, external_ip, t).0, answer, "pod → externalIP");
    // ClusterIP traffic (REDIRECTed to the listener, i.e. to the nodePort)
    // is not external: served, from the pod and the host.
    let vip: SocketAddr = "10.96.0.60:80".parse().unwrap();
    assert_eq!(tcp(&pod, vip, t).0, answer, "pod → ClusterIP");
    assert_eq!(tcp(&node, vip, t).0, answer, "node → ClusterIP");
    // The outside clients were dropped by our rules.
    assert!(packets(&node, "--dport 30090 ") >= 1);
    assert!(packets(&node, "-d 198.18.0.9/32") >= 1);

    proxy.stop();
    let (nat, filter) = (node.nat(), node.filter());
    assert!(
        !nat.contains("KUSP") && !filter.contains("KUSP"),
        "left:\n{nat}{filter}"
    );
}

#[test]
fn every_disposition_is_accepted_by_both_families_and_cleaned_up() {
    use kube_userspace_proxy::detect_local::Detector;
    use kube_userspace_proxy::iptables::exec::Tool;
    use kube_userspace_proxy::iptables::render::{
        find_jumps, render, render_cleanup, Disposition, InternalListener, NodePort, Portal,
        PortalKind, Rules,
    };
    use kube_userspace_proxy::model::Protocol;

    require_root_and_tools("every_disposition_is_accepted_by_both_families_and_cleaned_up");
    require_tools(
        "every_disposition_is_accepted_by_both_families_and_cleaned_up",
        &["ip6tables-save", "ip6tables-restore"],
        "iptables",
    );
    let mut portals = Vec::new();
    let mut node_ports = Vec::new();
    let source_ranges: Vec<ipnet::IpNet> = [
        "10.244.1.0/24",
        "203.0.113.0/24",
        "fd00:10:0:1::/64",
        "2001:db8::/32",
    ]
    .iter()
    .map(|r| r.parse().unwrap())
    .collect();
    let dispositions = [
        Disposition::Redirect,
        Disposition::RedirectLocalOnly,
        Disposition::Drop,
        Disposition::Reject,
    ];
    for (i, d) in dispositions.into_iter().enumerate() {
        let i = i as u16;
        for (ip, kind) in [
            (format!("10.96.0.{}", 10 + i), PortalKind::ClusterIp),
            (format!("198.18.0.{}", 10 + i), PortalKind::ExternalIp),
            (format!("192.0.2.{}", 10 + i), PortalKind::LoadBalancerIp),
            (format!("fd00::{}", 10 + i), PortalKind::LoadBalancerIp),
        ] {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                portals.push(Portal {
                    ip: ip.parse().unwrap(),
                    port: 80,
                    protocol,
                    listener_port: 31000 + i,
                    kind,
                    comment: format!("ns/svc{i}:p"),
                    disposition: d,
                    source_ranges: if kind == PortalKind::LoadBalancerIp {
                        source_ranges.clone()
                    } else {
                        Vec::new()
                    },
                });
            }
        }
        node_ports.push(NodePort {
            port: 30000 + i,
            protocol: Protocol::Tcp,
            comment: format!("ns/svc{i}:p"),
            disposition: d,
        });
    }
    // LB IPs of both families behind source ranges of both (one inside
    // the detector's pod CIDR, one outside), the node in a range of each
    // (allowFromNode): the firewall rules of both payloads are applied too,
    // and so are the internal listeners' (each family's REJECT answer).
    let listeners = [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .map(|protocol| InternalListener {
            port: 40000,
            protocol,
            comment: "ns/svc:p".into(),
        })
        .collect();
    let rules = Rules {
        portals,
        node_ports,
        listeners,
        node_ips: vec![
            "203.0.113.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ],
        // --nodeport-addresses of both families.
        node_port_addresses: [
            Some(vec!["203.0.113.0/24".parse().unwrap()]),
            Some(vec!["2001:db8::/64".parse().unwrap()]),
        ],
        node_port_listeners: vec![(30080, Protocol::Tcp), (30080, Protocol::Udp)],
    };
    let detectors = [
        Detector::Cidrs(vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10::/48".parse().unwrap(),
        ]),
        Detector::Bridge("cbr0".into()),
        Detector::Prefix("veth".into()),
        Detector::default(),
    ];
    let node = Netns::new("syntax");
    let failures = node
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut failures = Vec::new();
                for v6 in [false, true] {
                    let (base, bind) = if v6 {
                        ("ip6tables", "::")
                    } else {
                        ("iptables", "0.0.0.0")
                    };
                    let tool = Tool {
                        restore: format!("{base}-restore"),
                        save: format!("{base}-save"),
                    };
                    for d in &detectors {
                        let saved = tool.save_ours().await.unwrap();
                        let payload =
                            render(&rules, v6, bind.parse().unwrap(), d, &find_jumps(&saved));
                        if let Err(e) = tool.restore(&payload).await {
                            failures.push(format!("{base} {d:?}: {e}"));
                            continue;
                        }
                        let saved = tool.save_ours().await.unwrap();
                        let jumps = find_jumps(&saved);
                        if jumps.found.iter().any(|f| f.len() != 1) {
                            failures.push(format!("{base} {d:?}: jumps {jumps:?}"));
                        }
                        // One rule per rendered rule line.
                        let want = payload.lines().filter(|l| l.starts_with("-A ")).count();
                        let have = saved.lines().filter(|l| l.starts_with("-A KUSP-")).count();
                        if want != have {
                            failures.push(format!("{base} {d:?}: {have} rules, want {want}"));
                        }
                    }
                    let saved = tool.save_ours().await.unwrap();
                    if let Some(cleanup) = render_cleanup(&saved) {
                        if let Err(e) = tool.restore(&cleanup).await {
                            failures.push(format!("{base} cleanup: {e}"));
                        }
                    }
                    let left = tool.save_ours().await.unwrap();
                    if left.contains("KUSP") {
                        failures.push(format!("{base}: left after cleanup:\n{left}"));
                    }
                }
                failures
            })
        })
        .join()
        .unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
}
