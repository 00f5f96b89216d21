//! What a cloud load balancer sees, for real, in network namespaces the
//! tests create: a "node" namespace runs the proxy binary on manifests
//! (this node is `n1`), an "ext" namespace plays the load balancer's
//! prober, routed to the node over a veth pair. It probes the
//! health-check node ports (upstream's `ServiceHealthServer`) and
//! `/healthz` (upstream's `ProxyHealthServer`) as endpoints, the Node
//! object and the rules change. Root and the tools are required: without
//! them these tests fail, they never skip.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::lab::{debug_services, external_client, require_root_and_tools, Proxy, METRICS};
use common::netns::{wait_for, Netns};

/// A response: status, headers (lowercased names), body.
#[derive(Debug)]
struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// `GET path` from inside `ns`, `Connection: close`; `None` when the
/// connection fails (refused, timed out).
fn get(ns: &Netns, addr: SocketAddr, path: &str) -> Option<Answer> {
    let path = path.to_string();
    ns.spawn(move || {
        let timeout = Duration::from_secs(2);
        let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
        s.set_read_timeout(Some(timeout)).ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        let mut lines = head.lines();
        let code = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Some(Answer {
            code,
            headers,
            body: body.to_string(),
        })
    })
    .join()
    .unwrap()
}

/// Waits until `GET addr/` from `ns` answers `code`; returns the answer.
fn wait_code(ns: &Netns, addr: SocketAddr, path: &str, code: u16) -> Answer {
    let mut last = None;
    wait_for(
        &format!("{code} from {addr}{path}"),
        Duration::from_secs(10),
        || {
            last = get(ns, addr, path);
            last.as_ref().is_some_and(|a| a.code == code)
        },
    );
    last.unwrap()
}

/// Waits until nothing listens at `addr` (refused).
fn wait_closed(ns: &Netns, addr: SocketAddr) {
    wait_for(&format!("{addr} closed"), Duration::from_secs(10), || {
        get(ns, addr, "/").is_none()
    });
}

/// `ns/lb`: a LoadBalancer Service (LB IP 198.18.0.60, nodePort 30080) with
/// `externalTrafficPolicy: etp` and `healthCheckNodePort: hc`.
fn service(hc: u16, etp: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: ns}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.60\n  externalTrafficPolicy: {etp}\n\
         \x20 healthCheckNodePort: {hc}\n  ports: [{{name: http, port: 80, nodePort: 30080}}]\n\
         status: {{loadBalancer: {{ingress: [{{ip: 198.18.0.60}}]}}}}\n"
    )
}

/// An endpoint of `ns/lb`: IP, node, and its conditions.
struct Ep(&'static str, &'static str, Cond);

#[derive(Clone, Copy)]
enum Cond {
    Ready,
    Terminating,
}

/// The EndpointSlice of `ns/lb` (port 8080).
fn slice(eps: &[Ep]) -> String {
    let eps: Vec<String> = eps
        .iter()
        .map(|Ep(ip, node, cond)| {
            let (ready, serving, terminating) = match cond {
                Cond::Ready => (true, true, false),
                Cond::Terminating => (false, true, true),
            };
            format!("{{addresses: [\"{ip}\"], nodeName: {node}, conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}}}")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: lb-1, namespace: ns, labels: {{kubernetes.io/service-name: lb}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
        eps.join(", ")
    )
}

/// This node's Node object, `extra` YAML lines appended.
fn node_object(extra: &str) -> String {
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n{extra}")
}

fn write(dir: &Path, file: &str, text: &str) {
    // Written aside and renamed: the proxy never reads half a file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(file)).unwrap();
}

/// A node namespace with a backend answering "b1" on 127.0.0.1:8080 and an
/// external prober; the node's address as the prober sees it.
fn lab(tag: &str, subnet: &str) -> (Netns, Netns, String) {
    let node = Netns::new(&format!("{tag}node"));
    let (ext, node_ip) = external_client(&node, subnet, None);
    node.name_backend("127.0.0.1:8080".parse().unwrap(), "b1");
    (node, ext, node_ip)
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Upstream's body, byte for byte.
fn upstream_body(local: usize, healthy: bool) -> String {
    format!("{{\n\t\"service\": {{\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"lb\"\n\t}},\n\t\"localEndpoints\": {local},\n\t\"serviceProxyHealthy\": {healthy}\n}}")
}

#[test]
fn the_health_check_port_follows_this_nodes_ready_endpoints() {
    require_root_and_tools("the_health_check_port_follows_this_nodes_ready_endpoints");
    let (node, ext, node_ip) = lab("hc", "10.237.2");
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "node.yaml", &node_object(""));
    write(dir.path(), "svc.yaml", &service(32100, "Local"));
    write(dir.path(), "slice.yaml", &slice(&[]));
    let proxy = Proxy::start(&node, dir.path(), &["--hostname-override", "n1"]);
    let hc = at(&node_ip, 32100);

    // No endpoint: 503, as upstream words it.
    let a = wait_code(&ext, hc, "/", 503);
    assert_eq!(a.body, upstream_body(0, true));
    assert_eq!(a.header("x-load-balancing-endpoint-weight"), Some("0"));
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header("x-content-type-options"), Some("nosniff"));

    // A ready endpoint here: 200, on any path.
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[Ep("127.0.0.1", "n1", Cond::Ready)]),
    );
    let a = wait_code(&ext, hc, "/any/path", 200);
    assert_eq!(a.body, upstream_body(1, true));
    assert_eq!(a.header("x-load-balancing-endpoint-weight"), Some("1"));
    // Traffic through the node port reaches it (eTP=Local, local endpoint)
    // once the rules caught up (they no longer REJECT: endpoints exist).
    wait_for("the node port served", Duration::from_secs(10), || {
        ext.fetch(at(&node_ip, 30080)).is_ok_and(|a| a == "b1\n")
    });

    // Two here, one elsewhere: the weight counts this node's.
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[
            Ep("127.0.0.1", "n1", Cond::Ready),
            Ep("127.0.0.2", "n1", Cond::Ready),
            Ep("10.9.9.9", "n2", Cond::Ready),
        ]),
    );
    wait_for("two local endpoints", Duration::from_secs(10), || {
        get(&ext, hc, "/")
            .is_some_and(|a| a.header("x-load-balancing-endpoint-weight") == Some("2"))
    });

    // Only remote endpoints: 503 (the LB must skip this node).
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[Ep("10.9.9.9", "n2", Cond::Ready)]),
    );
    assert_eq!(wait_code(&ext, hc, "/", 503).body, upstream_body(0, true));

    // A local endpoint that terminates still serves, but fails the check.
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[Ep("127.0.0.1", "n1", Cond::Ready)]),
    );
    wait_code(&ext, hc, "/", 200);
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[Ep("127.0.0.1", "n1", Cond::Terminating)]),
    );
    let a = wait_code(&ext, hc, "/", 503);
    assert_eq!(a.body, upstream_body(0, true));

    // The slice vanishes: 503.
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[Ep("127.0.0.1", "n1", Cond::Ready)]),
    );
    wait_code(&ext, hc, "/", 200);
    std::fs::remove_file(dir.path().join("slice.yaml")).unwrap();
    wait_code(&ext, hc, "/", 503);

    // The port moves with the Service, and closes with eTP=Cluster.
    write(dir.path(), "svc.yaml", &service(32101, "Local"));
    wait_code(&ext, at(&node_ip, 32101), "/", 503);
    wait_closed(&ext, hc);
    write(dir.path(), "svc.yaml", &service(32101, "Cluster"));
    wait_closed(&ext, at(&node_ip, 32101));
    proxy.stop();
}

#[test]
fn a_taken_health_check_port_is_reported_and_the_service_still_served() {
    require_root_and_tools("a_taken_health_check_port_is_reported_and_the_service_still_served");
    let (node, ext, node_ip) = lab("hctaken", "10.237.3");
    let squatter = node
        .spawn(|| std::net::TcpListener::bind("0.0.0.0:32200").unwrap())
        .join()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", &service(32200, "Local"));
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[Ep("127.0.0.1", "n1", Cond::Ready)]),
    );
    let log = dir.path().join("proxy.log");
    let mut cmd = Proxy::command(&node, dir.path(), &["--hostname-override", "n1"]);
    cmd.stderr(std::fs::File::create(&log).unwrap());
    let proxy = Proxy(cmd.spawn().unwrap());

    wait_for(
        "the log names the Service and the port",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log).unwrap().lines().any(|l| {
                l.contains("health-check node port not served")
                    && l.contains("ns/lb")
                    && l.contains("32200")
            })
        },
    );
    // The Service is served all the same.
    wait_for("the node port served", Duration::from_secs(10), || {
        ext.fetch(at(&node_ip, 30080)).is_ok_and(|a| a == "b1\n")
    });
    let doc = debug_services(&node);
    let check = &doc["services"][0]["health_check"];
    assert_eq!(check["port"], 32200, "{doc}");
    assert_eq!(check["listening"], false, "{doc}");
    assert!(check["error"].as_str().unwrap().contains("32200"), "{doc}");

    // Freed: bound at the next retry (every second).
    drop(squatter);
    assert_eq!(
        wait_code(&ext, at(&node_ip, 32200), "/", 200).body,
        upstream_body(1, true)
    );
    proxy.stop();
}

#[test]
fn healthz_fails_on_failed_rules_and_on_a_node_being_removed() {
    require_root_and_tools("healthz_fails_on_failed_rules_and_on_a_node_being_removed");
    let (node, ext, node_ip) = lab("hz", "10.237.4");
    let dir = tempfile::tempdir().unwrap();
    // iptables-restore that fails while a flag file exists.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let flag = dir.path().join("fail-restore");
    let real = common::netns::sh(&["sh", "-c", "command -v iptables-restore"]);
    let real = String::from_utf8(real.stdout).unwrap();
    let wrapper = bin.join("iptables-restore");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ -e {} ]; then echo 'iptables-restore: simulated failure' >&2; exit 1; fi\nexec {} \"$@\"\n",
            flag.display(),
            real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());

    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "node.yaml", &node_object(""));
    write(&manifests, "svc.yaml", &service(32300, "Local"));
    write(
        &manifests,
        "slice.yaml",
        &slice(&[Ep("127.0.0.1", "n1", Cond::Ready)]),
    );
    let mut cmd = Proxy::command(
        &node,
        &manifests,
        &[
            "--hostname-override",
            "n1",
            "--healthz-bind-address",
            "0.0.0.0:10256",
        ],
    );
    cmd.env("PATH", path);
    let proxy = Proxy(cmd.spawn().unwrap());
    let healthz = at(&node_ip, 10256);
    let hc = at(&node_ip, 32300);

    let a = wait_code(&ext, healthz, "/healthz", 200);
    let doc = a.json();
    assert_eq!(
        (doc["nodeEligible"].clone(), doc["healthy"].clone()),
        (true.into(), true.into()),
        "{doc}"
    );
    assert_eq!(doc["lastUpdated"], doc["currentTime"], "{doc}");
    wait_code(&ext, hc, "/", 200);

    // The autoscaler is about to delete the node: /healthz 503, /livez
    // and the Service's own check unaffected (as upstream).
    let taint = "spec:\n  taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1764547200\", effect: NoSchedule}]\n";
    write(&manifests, "node.yaml", &node_object(taint));
    let doc = wait_code(&ext, healthz, "/healthz", 503).json();
    assert_eq!(
        (doc["nodeEligible"].clone(), doc["healthy"].clone()),
        (false.into(), true.into()),
        "{doc}"
    );
    assert_eq!(get(&ext, healthz, "/livez").unwrap().code, 200);
    assert_eq!(get(&ext, hc, "/").unwrap().code, 200);
    write(&manifests, "node.yaml", &node_object(""));
    wait_code(&ext, healthz, "/healthz", 200);

    // Being deleted, then gone: 503 until it is back.
    let deleting = "  deletionTimestamp: \"2026-12-01T00:00:00Z\"\n";
    write(&manifests, "node.yaml", &node_object(deleting));
    wait_code(&ext, healthz, "/healthz", 503);
    std::fs::remove_file(manifests.join("node.yaml")).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(get(&ext, healthz, "/healthz").unwrap().code, 503);
    write(&manifests, "node.yaml", &node_object(""));
    wait_code(&ext, healthz, "/healthz", 200);

    // Rules that cannot be applied: unhealthy at once, and the LB's
    // check with it; healthy again once they apply.
    std::fs::write(&flag, "").unwrap();
    write(
        &manifests,
        "svc.yaml",
        &service(32300, "Local").replace("10.96.0.60", "10.96.0.61"),
    );
    let doc = wait_code(&ext, healthz, "/healthz", 503).json();
    assert_eq!(doc["healthy"], false, "{doc}");
    assert_eq!(get(&ext, healthz, "/livez").unwrap().code, 503);
    assert_eq!(wait_code(&ext, hc, "/", 503).body, upstream_body(1, false));
    let metrics = get(&node, METRICS.parse().unwrap(), "/metrics")
        .unwrap()
        .body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kubeproxy_proxy_healthz_total{code=\"503\"}")),
        "{metrics}"
    );
    // kube-proxy's iptables mode: failures by family, every sync a full
    // one, no partial one.
    let value = |prefix: &str| sample(&metrics, prefix);
    let v4 = "{ip_family=\"IPv4\"}";
    let failures = value(&format!(
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{v4}"
    ));
    assert!(failures.is_some_and(|n| n >= 1.0), "{metrics}");
    let syncs = value(&format!(
        "kubeproxy_sync_proxy_rules_duration_seconds_count{v4}"
    ));
    let full = value(&format!(
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count{v4}"
    ));
    assert!(
        syncs.is_some_and(|n| n >= 2.0) && full == syncs,
        "{metrics}"
    );
    assert_eq!(
        value(&format!(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{v4}"
        )),
        Some(0.0)
    );
    std::fs::remove_file(&flag).unwrap();
    wait_code(&ext, healthz, "/healthz", 200);
    wait_code(&ext, hc, "/", 200);
    assert!(node.nat().contains("10.96.0.61"), "rules applied");

    // A change that needs the rules (its port's only local endpoint moves
    // away) is served once they are applied: its network programming
    // latency is observed then, not before.
    let programming = "kubeproxy_network_programming_duration_seconds";
    let scrape = || {
        get(&node, METRICS.parse().unwrap(), "/metrics")
            .unwrap()
            .body
    };
    std::fs::write(&flag, "").unwrap();
    let triggered = std::time::SystemTime::now() - Duration::from_secs(1);
    let annotation = format!(
        "namespace: ns, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{}\"}},",
        humantime::format_rfc3339_nanos(triggered)
    );
    let moved =
        slice(&[Ep("127.0.0.1", "n2", Cond::Ready)]).replacen("namespace: ns,", &annotation, 1);
    write(&manifests, "slice.yaml", &moved);
    wait_code(&ext, hc, "/", 503);
    wait_code(&ext, healthz, "/healthz", 503);
    let count = format!("{programming}_count{v4}");
    assert_eq!(sample(&scrape(), &count), Some(0.0), "not served yet");
    std::fs::remove_file(&flag).unwrap();
    wait_code(&ext, healthz, "/healthz", 200);
    let body = scrape();
    assert_eq!(sample(&body, &count), Some(1.0), "served: {body}");
    let sum = sample(&body, &format!("{programming}_sum{v4}"));
    assert!(sum.is_some_and(|s| s >= 1.0), "latency {sum:?}");
    proxy.stop();
}

/// The value of the first sample of `body` whose line starts with `prefix`.
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn the_health_check_port_goes_over_with_a_hand_over() {
    require_root_and_tools("the_health_check_port_goes_over_with_a_hand_over");
    let (node, ext, node_ip) = lab("hcho", "10.237.5");
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", &service(32400, "Local"));
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[Ep("127.0.0.1", "n1", Cond::Ready)]),
    );
    let args = ["--hostname-override", "n1"];
    let mut old = Proxy::start(&node, dir.path(), &args);
    let hc = at(&node_ip, 32400);
    wait_code(&ext, hc, "/", 200);
    // The load balancer probes all along: not one probe may fail.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed, new) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok + failed.len() < 5_000 {
                match get(&ext, hc, "/") {
                    Some(a) if a.code == 200 => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        });
        std::thread::sleep(Duration::from_millis(300));
        let new = Proxy::start(&node, dir.path(), &args);
        let mut exited = None;
        wait_for(
            "the old process exits after the hand-over",
            Duration::from_secs(15),
            || {
                exited = old.0.try_wait().unwrap();
                exited.is_some()
            },
        );
        assert_eq!(exited.and_then(|s| s.code()), Some(0));
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = prober.join().unwrap();
        (ok, failed, new)
    });
    assert!(
        ok > 0 && failed.is_empty(),
        "{ok} probes ok, failed: {failed:?}"
    );
    assert_eq!(get(&ext, hc, "/").unwrap().code, 200);
    new.stop();
}

/// `--nodeport-addresses` (upstream's `NodePortAddresses`): nodePorts and
/// health-check node ports answer on the listed node addresses only.
#[test]
fn node_port_addresses_limit_node_ports_and_health_checks() {
    require_root_and_tools("node_port_addresses_limit_node_ports_and_health_checks");
    let (node, ext, node_ip) = lab("npa", "10.237.6");
    // A second node address on the same link, outside the list.
    let dev = node.link_of("10.237.6.1");
    node.run(&["ip", "addr", "add", "10.237.6.3/24", "dev", &dev]);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", &service(32500, "Local"));
    write(
        dir.path(),
        "slice.yaml",
        &slice(&[Ep("127.0.0.1", "n1", Cond::Ready)]),
    );
    let allowed = format!("{node_ip}/32");
    let proxy = Proxy::start(
        &node,
        dir.path(),
        &[
            "--hostname-override",
            "n1",
            "--nodeport-addresses",
            &allowed,
        ],
    );
    wait_for("the listed address served", Duration::from_secs(10), || {
        ext.fetch(at(&node_ip, 30080)).is_ok_and(|a| a == "b1\n")
    });
    wait_for("the other address refused", Duration::from_secs(10), || {
        ext.fetch(at("10.237.6.3", 30080)).is_err()
    });
    assert_eq!(wait_code(&ext, at(&node_ip, 32500), "/", 200).code, 200);
    assert!(get(&ext, at("10.237.6.3", 32500), "/").is_none());
    // Loopback is not in the list either (upstream: only when listed).
    assert!(node.fetch(at("127.0.0.1", 30080)).is_err());
    // The ClusterIP is not a nodePort: still served.
    assert_eq!(ext.fetch(at("10.96.0.60", 80)).unwrap(), "b1\n");
    proxy.stop();
}
