//! The manifests source: bad input is skipped and named, the rest applies,
//! edits re-sync, and the binary serves a directory end to end.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use kube_userspace_proxy::discovery::manifests::{self, Source};
use kube_userspace_proxy::discovery::Options;
use kube_userspace_proxy::model::{Protocol, ServicePortName, Topology};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_kube-userspace-proxy");

/// The proxy serving `dir` on 127.0.0.1, quietly, with no iptables and
/// admin servers on free ports.
fn proxy_on(dir: &std::path::Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--manifests").arg(dir).args([
        "--bind-address",
        "127.0.0.1",
        "--log-level",
        "warn",
        "--iptables",
        "off",
        "--metrics-bind-address",
        "127.0.0.1:0",
        "--healthz-bind-address",
        "127.0.0.1:0",
    ]);
    c
}

fn service_yaml(name: &str, port: &str, node_port: Option<u16>) -> String {
    let np = node_port
        .map(|p| format!("\n      nodePort: {p}"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: ns\nspec:\n  ports:\n    - name: http\n      port: {port}{np}\n"
    )
}

fn slice_yaml(name: &str, service: &str, addr_type: &str, addrs: &[&str], port: u16) -> String {
    let eps: String = addrs
        .iter()
        .map(|a| format!("  - addresses: [\"{a}\"]\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: ns\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {addr_type}\nports:\n  - name: http\n    port: {port}\nendpoints:\n{eps}"
    )
}

fn key(name: &str) -> ServicePortName {
    ServicePortName {
        namespace: "ns".into(),
        name: name.into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
    }
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

#[test]
fn every_bad_input_is_skipped_named_and_the_rest_applies() {
    let dir = tempfile::tempdir().unwrap();
    let good = format!(
        "{}---\n{}---\n{}",
        service_yaml("good", "80", None),
        slice_yaml("good-1", "good", "IPv4", &["10.1.0.1", "10.1.0.2"], 8080),
        slice_yaml("good-2", "good", "IPv4", &["10.1.0.2", "10.1.0.3"], 8080),
    );
    write(dir.path(), "a-good.yaml", &good);
    write(
        dir.path(),
        "b-broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
    );
    write(
        dir.path(),
        "c-noports.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: noports\n  namespace: ns\nspec:\n  type: ClusterIP\n",
    );
    write(
        dir.path(),
        "d-range.yaml",
        &service_yaml("range", "70000", None),
    );
    write(
        dir.path(),
        "e-slice.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("fqdn", "80", None),
            slice_yaml("weird-1", "fqdn", "Carrier-Pigeon", &["10.2.0.1"], 80)
        ),
    );
    write(dir.path(), "f-typo.yaml", "apiVersion: v1\nkind: Service\nmetadata:\n  name: typo\nspec:\n  ports:\n    - port: \"eighty\"\n");
    write(dir.path(), "notes.txt", "not a manifest");

    let (snap, problems) = manifests::load(&Source::Dir(dir.path().into())).unwrap();
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    let has = |file: &str, object: &str, field: &str| {
        problems.iter().any(|p| {
            p.origin.contains(file) && p.object.contains(object) && p.field.contains(field)
        })
    };
    assert!(has("b-broken.yaml", "document", "-"), "{text:#?}");
    assert!(
        has("c-noports.yaml", "Service ns/noports", "spec.ports"),
        "{text:#?}"
    );
    assert!(
        has("d-range.yaml", "Service ns/range", "spec.ports[0].port"),
        "{text:#?}"
    );
    assert!(
        has("e-slice.yaml", "EndpointSlice ns/weird-1", "addressType"),
        "{text:#?}"
    );
    assert!(
        has("f-typo.yaml", "Service default/typo", "spec.ports[0].port"),
        "{text:#?}"
    );
    assert_eq!(problems.len(), 5, "{text:#?}");

    // The good service applies, its two slices merged and deduplicated.
    let good = &snap.services[&key("good")];
    let addrs: Vec<String> = good.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(addrs, ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]);
    // The service whose slice was bad still exists, with no endpoints.
    assert!(snap.services[&key("fqdn")].endpoints.is_empty());
    assert_eq!(snap.services.len(), 2);
}

#[test]
fn udp_ports_are_kept_for_later_and_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "dns.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dns\n  namespace: ns\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n    - {name: dns, port: 53, protocol: UDP}\n    - {name: dns-tcp, port: 53, protocol: TCP}\n",
    );
    let (snap, problems) = manifests::load(&Source::Dir(dir.path().into())).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(snap.services.len(), 2);
}

#[tokio::test]
async fn editing_a_file_resyncs_and_a_broken_edit_keeps_the_last_good_state() {
    let dir = tempfile::tempdir().unwrap();
    let file = "svc.yaml";
    let body = |addrs: &[&str]| {
        format!(
            "{}---\n{}",
            service_yaml("web", "80", None),
            slice_yaml("web-1", "web", "IPv4", addrs, 8080)
        )
    };
    write(dir.path(), file, &body(&["10.0.0.1"]));
    let cancel = CancellationToken::new();
    let mut rx = manifests::spawn(Source::Dir(dir.path().into()), cancel.clone())
        .await
        .unwrap();
    assert_eq!(
        rx.borrow_and_update().services[&key("web")].endpoints.len(),
        1
    );

    write(dir.path(), file, &body(&["10.0.0.1", "10.0.0.2"]));
    tokio::time::timeout(Duration::from_secs(2), rx.changed())
        .await
        .expect("change seen within 2 s")
        .unwrap();
    assert_eq!(
        rx.borrow_and_update().services[&key("web")].endpoints.len(),
        2
    );

    // Half-written file: the last good version keeps serving.
    write(
        dir.path(),
        file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns\n",
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(rx.borrow().services[&key("web")].endpoints.len(), 2);

    // An edit that breaks one field of the Service: the service keeps its last good state.
    write(
        dir.path(),
        file,
        &body(&["10.0.0.1", "10.0.0.2"]).replace("port: 80", "port: 0"),
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(rx.borrow().services[&key("web")].endpoints.len(), 2);

    // Removing the file removes the service.
    std::fs::remove_file(dir.path().join(file)).unwrap();
    tokio::time::timeout(Duration::from_secs(2), rx.changed())
        .await
        .expect("removal seen within 2 s")
        .unwrap();
    assert!(rx.borrow().services.is_empty());
    cancel.cancel();
}

#[test]
fn a_missing_manifests_directory_fails_start_up_clearly() {
    let out = Command::new(BIN)
        .args(["--manifests", "/nonexistent/kusp-manifests"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--manifests /nonexistent/kusp-manifests"),
        "{err}"
    );
}

/// Kills the child on drop.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_a_directory_and_follows_edits() {
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let node_port = refusing_addr().port(); // a free port for the listener
    let dir = tempfile::tempdir().unwrap();
    let body = |port: u16| {
        format!(
            "{}---\n{}",
            service_yaml("web", "80", Some(node_port)),
            slice_yaml("web-1", "web", "IPv4", &["127.0.0.1"], port)
        )
    };
    write(dir.path(), "web.yaml", &body(a.port()));
    let _child = Child(proxy_on(dir.path()).stdout(Stdio::null()).spawn().unwrap());
    let addr = localhost(node_port);
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            addr
        )
        .is_ok())
        .await,
        "listener on the nodePort"
    );
    assert_eq!(read_all(addr).await.unwrap(), "a");
    write(dir.path(), "web.yaml", &body(b.port()));
    let mut switched = false;
    for _ in 0..40 {
        if read_all(addr).await.unwrap() == "b" {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(switched, "the edit was applied within 2 s");
}

/// Files that attack the parser: (file name, contents). Each nests, expands
/// or repeats far past a limit; none may stall anything.
fn hostile_files() -> Vec<(&'static str, String)> {
    const LEVELS: usize = 100_000;
    let head = "apiVersion: v1\nkind: Service\nmetadata: ";
    let laughs = {
        let mut s = String::from("apiVersion: v1\nkind: Service\nmetadata:\n  name: lol\na0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let p = i - 1;
            s.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        s
    };
    vec![
        (
            "deep-seq.yaml",
            format!("{head}{}{}\n", "[".repeat(LEVELS), "]".repeat(LEVELS)),
        ),
        (
            "deep-map.yaml",
            format!("{head}{}x{}\n", "{a: ".repeat(LEVELS), "}".repeat(LEVELS)),
        ),
        (
            "deep-block.yaml",
            format!("{head}\n  {}x\n", "- ".repeat(LEVELS)),
        ),
        ("alias-bomb.yaml", laughs),
    ]
}

#[test]
fn pathological_documents_are_rejected_naming_the_limit_and_the_rest_applies() {
    let mut files: Vec<(String, String)> = hostile_files()
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    files.push(("good.yaml".into(), service_yaml("good", "80", None)));
    let (snap, problems) = manifests::parse(&files, &mut manifests::LastGood::default());
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    for (name, _) in hostile_files() {
        let p = problems.iter().find(|p| p.origin.starts_with(name));
        let p = p.unwrap_or_else(|| panic!("{name} not reported: {text:#?}"));
        let limit = if name.starts_with("deep-") {
            "MAX_DEPTH"
        } else {
            "limit"
        };
        assert!(p.message.contains(limit), "{name}: {p}");
    }
    assert_eq!(problems.len(), hostile_files().len(), "{text:#?}");
    assert!(snap.services.contains_key(&key("good")));
}

/// Collects a child's stderr lines on a thread of its own.
fn collect_lines(
    stderr: std::process::ChildStderr,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = std::sync::Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            out.lock().unwrap().push(line);
        }
    });
    lines
}

/// Requests to `addr` one after the other until `stop`, each bounded by
/// `STALL` (a stall detector, not a speed check); returns the answers in
/// order with the time each arrived, and every failure.
async fn traffic(
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<(std::time::Instant, String)>, Vec<String>) {
    const STALL: Duration = Duration::from_secs(1);
    let mut answers = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..100_000 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        match tokio::time::timeout(STALL, read_all(addr)).await {
            Ok(Ok(a)) if !a.is_empty() => answers.push((std::time::Instant::now(), a)),
            Ok(Ok(_)) => failures.push("empty answer".to_string()),
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push(format!("no answer within {STALL:?}")),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (answers, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_files_stall_neither_traffic_nor_the_other_files() {
    use common::procs::{free_port, service_manifest};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let grow_backend = named_backend("g").await;
    let (web_port, grow_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "svc.yaml",
        &service_manifest("web", web_port, &[a]),
    );
    // Present from the start: the proxy must still serve the good file.
    let (first_name, first) = hostile_files().remove(0);
    write(dir.path(), &format!("start-{first_name}"), &first);
    // Good at first, then appended to past the size limit: its service
    // keeps its last good state.
    let grow_head = service_manifest("grow", grow_port, &[grow_backend]);
    write(dir.path(), "growing.yaml", &grow_head);

    let mut child = proxy_on(dir.path())
        .args([
            // One worker: anything that blocks it in the manifests path
            // stops the data path too, so the test catches it for sure.
            "--worker-threads",
            "1",
        ])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs = collect_lines(child.stderr.take().unwrap());
    let _child = Child(child);
    let (web, grow) = (localhost(web_port), localhost(grow_port));
    for addr in [web, grow] {
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
                addr
            )
            .is_ok())
            .await,
            "listener on {addr} with a hostile file in the directory from the start"
        );
    }
    assert_eq!(read_all(grow).await.unwrap(), "g");

    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(traffic(web, stop.clone()));
    let grow_load = tokio::spawn(traffic(grow, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Drop every hostile file, start the appender, and make a good change
    // at the same moment. Big writes run off the runtime's workers.
    let path = dir.path().to_owned();
    let writer = std::thread::spawn(move || {
        for (name, text) in hostile_files() {
            std::fs::write(path.join(name), text).unwrap();
        }
        // Tens of MB.
        let line = format!("# {}\n", "x".repeat(1021));
        let mut huge = String::from("apiVersion: v1\nkind: Service\nmetadata:\n  name: huge\n");
        huge.push_str(&line.repeat(30 << 10));
        std::fs::write(path.join("huge.yaml"), huge).unwrap();
    });
    let path = dir.path().join("growing.yaml");
    let appender = std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        let chunk = format!("# {}\n", "y".repeat(1021)).repeat(256);
        let over = manifests::MAX_FILE_BYTES / chunk.len() as u64 + 4;
        for _ in 0..over {
            f.write_all(chunk.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    let second_slice = slice_yaml("web-2", "web", "IPv4", &["127.0.0.1"], b.port())
        .replace("name: http", "name: web");
    write(dir.path(), "web-more.yaml", &second_slice);
    let changed_at = Instant::now();

    // Each bad file is reported with the limit it broke.
    let expect = [
        ("start-deep-seq.yaml", "MAX_DEPTH"),
        ("deep-seq.yaml", "MAX_DEPTH"),
        ("deep-map.yaml", "MAX_DEPTH"),
        ("deep-block.yaml", "MAX_DEPTH"),
        ("alias-bomb.yaml", "limit"),
        ("huge.yaml", "MAX_FILE_BYTES"),
        ("growing.yaml", "MAX_FILE_BYTES"),
    ];
    let reported = |file: &str, limit: &str| {
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(&format!("/{file}")) && l.contains(limit) && l.contains("WARN"))
    };
    for (file, limit) in expect {
        assert!(
            eventually(Duration::from_secs(15), || reported(file, limit)).await,
            "{file}: no warning naming {limit}; log:\n{}",
            logs.lock().unwrap().join("\n")
        );
    }
    writer.join().unwrap();
    appender.join().unwrap();
    // One more poll after the last append, with traffic still going.
    tokio::time::sleep(manifests::POLL_INTERVAL * 3).await;
    stop.store(true, Ordering::Relaxed);
    let (answers, failures) = load.await.unwrap();
    let (grow_answers, grow_failures) = grow_load.await.unwrap();

    assert!(failures.is_empty(), "web: failed requests: {failures:?}");
    assert!(
        grow_failures.is_empty(),
        "grow: failed requests: {grow_failures:?}"
    );
    let first_b = answers.iter().find(|(_, a)| a == "b").map(|(t, _)| *t);
    let first_b = first_b.expect("the added endpoint never answered");
    assert!(
        first_b.saturating_duration_since(changed_at) < Duration::from_secs(2),
        "the good change was applied after {:?}",
        first_b.saturating_duration_since(changed_at)
    );
    assert!(
        grow_answers.iter().all(|(_, a)| a == "g") && !grow_answers.is_empty(),
        "the grown file's service kept its last good state"
    );
    assert_eq!(read_all(grow).await.unwrap(), "g");
}

fn node_yaml(name: &str, zone: &str, pod_cidr: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    topology.kubernetes.io/zone: {zone}\nspec:\n  podCIDR: {pod_cidr}\n  podCIDRs: [{pod_cidr}]\n"
    )
}

/// `web` with one endpoint per zone, each hinted for its zone and on the
/// node of that zone, and `local` (internalTrafficPolicy Local) on the
/// same endpoints.
fn zoned_services() -> String {
    let slice = |name: &str, svc: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: ns\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n  - name: http\n    port: 8080\nendpoints:\n  - addresses: [\"10.6.0.1\"]\n    nodeName: node-a\n    hints: {{forZones: [{{name: zone-a}}]}}\n  - addresses: [\"10.6.0.2\"]\n    nodeName: node-b\n    hints: {{forZones: [{{name: zone-b}}]}}\n"
        )
    };
    format!(
        "{}---\n{}---\n{}  internalTrafficPolicy: Local\n---\n{}",
        service_yaml("web", "80", None),
        slice("web-1", "web"),
        service_yaml("local", "81", None),
        slice("local-1", "local"),
    )
}

fn for_node(name: &str) -> Options {
    Options {
        node_name: Some(name.into()),
        service_proxy_name: None,
    }
}

fn cluster_set(
    snap: &kube_userspace_proxy::model::Snapshot,
    name: &str,
) -> (Vec<String>, Topology) {
    let c = &snap.services[&key(name)].choice;
    let addrs = c.cluster().iter().map(|e| e.addr.to_string()).collect();
    (addrs, c.topology.clone())
}

#[test]
fn a_node_document_named_like_this_node_gives_its_labels_others_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a-services.yaml", &zoned_services());
    write(
        dir.path(),
        "b-nodes.yaml",
        &format!(
            "{}---\n{}---\n{}",
            node_yaml("node-a", "zone-a", "10.244.1.0/24"),
            node_yaml("node-b", "zone-b", "10.244.2.0/24"),
            // A bad Node: named by file, object and field, and skipped.
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-c\n  labels: [zone-c]\n"
        ),
    );
    let source = Source::Dir(dir.path().into());

    for (node, zone, cidr, ep) in [
        ("node-a", "zone-a", "10.244.1.0/24", "10.6.0.1:8080"),
        ("node-b", "zone-b", "10.244.2.0/24", "10.6.0.2:8080"),
    ] {
        let (snap, problems) = manifests::load_with(&source, &for_node(node)).unwrap();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 1, "{text:#?}");
        let p = &problems[0];
        assert!(p.origin.contains("b-nodes.yaml"), "{text:#?}");
        assert_eq!(p.object, "Node node-c", "{text:#?}");
        assert_eq!(p.field, "metadata.labels", "{text:#?}");

        assert_eq!(snap.node.name.as_deref(), Some(node));
        assert_eq!(snap.node.zone(), Some(zone));
        assert_eq!(snap.node.pod_cidrs, [cidr]);
        // The zone label picks the hinted endpoint; traffic policy Local
        // keeps the node's own.
        assert_eq!(
            cluster_set(&snap, "web"),
            (vec![ep.to_string()], Topology::SameZone(zone.into()))
        );
        let local = &snap.services[&key("local")].choice;
        let local: Vec<String> = local.local().iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(local, [ep]);
    }

    // A node with no Node document: no labels, every endpoint.
    let (snap, _) = manifests::load_with(&source, &for_node("node-z")).unwrap();
    assert_eq!(snap.node.name.as_deref(), Some("node-z"));
    assert!(snap.node.labels.is_empty());
    assert_eq!(
        cluster_set(&snap, "web").0,
        ["10.6.0.1:8080", "10.6.0.2:8080"]
    );
    // Without options (no node name), as before: no node at all.
    let (snap, _) = manifests::load(&source).unwrap();
    assert_eq!(snap.node, Default::default());
}

#[tokio::test]
async fn editing_this_nodes_node_document_resyncs_its_labels() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a-services.yaml", &zoned_services());
    write(
        dir.path(),
        "node.yaml",
        &node_yaml("node-a", "zone-a", "10.244.1.0/24"),
    );
    let cancel = CancellationToken::new();
    let mut rx = manifests::spawn_with(
        Source::Dir(dir.path().into()),
        for_node("node-a"),
        cancel.clone(),
    )
    .await
    .unwrap();
    assert_eq!(rx.borrow_and_update().node.zone(), Some("zone-a"));
    write(
        dir.path(),
        "node.yaml",
        &node_yaml("node-a", "zone-b", "10.244.1.0/24"),
    );
    tokio::time::timeout(Duration::from_secs(3), rx.changed())
        .await
        .expect("re-synced within 3 s")
        .unwrap();
    let snap = rx.borrow_and_update().clone();
    assert_eq!(snap.node.zone(), Some("zone-b"));
    assert_eq!(
        cluster_set(&snap, "web"),
        (
            vec!["10.6.0.2:8080".to_string()],
            Topology::SameZone("zone-b".into())
        )
    );
    cancel.cancel();
}

#[tokio::test]
async fn the_binary_reads_its_node_by_hostname_override_and_follows_its_zone() {
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let node_port = refusing_addr().port();
    let dir = tempfile::tempdir().unwrap();
    // One endpoint per zone (two slices: the backends' ports differ).
    let hinted = |name: &str, port: u16, zone: &str| {
        format!(
            "{}    hints: {{forZones: [{{name: {zone}}}]}}\n",
            slice_yaml(name, "web", "IPv4", &["127.0.0.1"], port)
        )
    };
    write(
        dir.path(),
        "web.yaml",
        &format!(
            "{}---\n{}---\n{}",
            service_yaml("web", "80", Some(node_port)),
            hinted("web-a", a.port(), "zone-a"),
            hinted("web-b", b.port(), "zone-b"),
        ),
    );
    write(
        dir.path(),
        "node.yaml",
        &format!(
            "{}---\n{}",
            node_yaml("node-a", "zone-a", "10.244.1.0/24"),
            node_yaml("node-b", "zone-b", "10.244.2.0/24")
        ),
    );
    let _child = Child(
        proxy_on(dir.path())
            .args(["--hostname-override", "node-a"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = localhost(node_port);
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            addr
        )
        .is_ok())
        .await,
        "listener on the nodePort"
    );
    for _ in 0..4 {
        assert_eq!(read_all(addr).await.unwrap(), "a", "zone-a's endpoint only");
    }
    // This node moves to zone-b: its endpoint only, within 2 s.
    write(
        dir.path(),
        "node.yaml",
        &node_yaml("node-a", "zone-b", "10.244.1.0/24"),
    );
    let mut switched = false;
    for _ in 0..40 {
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(read_all(addr).await.unwrap());
        }
        if got.iter().all(|g| g == "b") {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(switched, "the Node edit was applied within 2 s");
}
