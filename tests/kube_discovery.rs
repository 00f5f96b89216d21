//! Kubernetes discovery against an in-process fake API server speaking the
//! real list/watch protocol, driven by the real `kube::Client` through a
//! kubeconfig (bearer token): initial list, add/modify/delete, slice merge,
//! skipping, traffic policy, debouncing, 410 relists, relists after a
//! restored or fresh store (too-large versions, versions going backwards),
//! undecodable objects, API server down at start and restarted mid-run,
//! `/readyz`, this node's Node (labels and pod CIDRs, field selector, 403),
//! kube-proxy's metrics (upstream's names, types and help texts; network
//! programming latency from a slice's trigger time; syncs with `--iptables
//! off`), and one end-to-end run with backends in a network namespace.

mod common;
#[path = "common/fake_api.rs"]
mod fake_api;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{node_and_pod, require_root, wait_for, Netns};
use common::*;
use fake_api::{node, node_port_service, service, slice, FakeApi, Kind, TooLarge, Trust};
use kube_userspace_proxy::discovery::{self, Options};
use kube_userspace_proxy::model::{NodeObject, Protocol, ServicePortName, Snapshot, Topology};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_kube-userspace-proxy");

fn key(ns: &str, name: &str) -> ServicePortName {
    ServicePortName {
        namespace: ns.into(),
        name: name.into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
    }
}

/// A running Kubernetes source against `api`.
struct Source {
    rx: watch::Receiver<Arc<Snapshot>>,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn client_for(api: &FakeApi, dir: &tempfile::TempDir) -> kube::Client {
    let kc = api.kubeconfig(dir.path());
    let config = discovery::kube::config(Some(&kc), None).await.unwrap();
    discovery::kube::client(config).unwrap()
}

async fn source(api: &FakeApi, options: Options) -> Source {
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(api, &dir).await;
    let cancel = CancellationToken::new();
    let rx = tokio::time::timeout(
        Duration::from_secs(10),
        discovery::kube::spawn(client, options, cancel.clone()),
    )
    .await
    .expect("first snapshot within 10 s")
    .unwrap();
    Source {
        rx,
        cancel,
        _dir: dir,
    }
}

/// Waits (at most `timeout`) for a snapshot satisfying `f`; returns it.
async fn wait_snapshot(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    timeout: Duration,
    what: &str,
    f: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        let cur = rx.borrow_and_update().clone();
        if f(&cur) {
            return cur;
        }
        match tokio::time::timeout_at(end, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => panic!(
                "timed out waiting for {what}; last snapshot: {:#?}",
                cur.services.keys()
            ),
        }
    }
}

fn addrs(s: &Snapshot, k: &ServicePortName) -> Vec<String> {
    s.services[k]
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect()
}

#[tokio::test]
async fn initial_list_then_add_modify_delete_with_slices_merged() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.apply(slice(
        "ns",
        "web-a",
        "web",
        8080,
        &[("10.1.0.1", true, None), ("10.1.0.2", true, None)],
    ));
    api.apply(slice(
        "ns",
        "web-b",
        "web",
        8080,
        &[("10.1.0.2", true, None), ("10.1.0.3", false, None)],
    ));
    let mut src = source(&api, Options::default()).await;

    // Initial list: the two slices merged, the shared endpoint once.
    let snap = src.rx.borrow_and_update().clone();
    assert_eq!(
        addrs(&snap, &key("ns", "web")),
        ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]
    );
    let e3 = &snap.services[&key("ns", "web")].endpoints[2];
    assert!(!e3.ready && !e3.serving, "conditions carried");
    assert_eq!(snap.services[&key("ns", "web")].port.port, 80);

    // Add: a new Service and its slice are published promptly.
    let t = Instant::now();
    api.apply(service("ns", "db", "10.96.0.11", 5432));
    api.apply(slice("ns", "db-a", "db", 5432, &[("10.1.1.1", true, None)]));
    wait_snapshot(&mut src.rx, Duration::from_secs(5), "db added", |s| {
        s.services
            .get(&key("ns", "db"))
            .is_some_and(|e| e.endpoints.len() == 1)
    })
    .await;
    let took = t.elapsed();
    eprintln!("a new Service + EndpointSlice was published after {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // Modify a slice: the endpoint leaves.
    api.apply(slice(
        "ns",
        "web-b",
        "web",
        8080,
        &[("10.1.0.2", true, None)],
    ));
    wait_snapshot(&mut src.rx, Duration::from_secs(5), "web-b modified", |s| {
        addrs(s, &key("ns", "web")) == ["10.1.0.1:8080", "10.1.0.2:8080"]
    })
    .await;

    // Service type change: ClusterIP → NodePort → ClusterIP.
    api.apply(node_port_service("ns", "web", "10.96.0.10", 80, 30080));
    wait_snapshot(&mut src.rx, Duration::from_secs(5), "nodePort", |s| {
        s.services[&key("ns", "web")].port.node_port == Some(30080)
    })
    .await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    wait_snapshot(
        &mut src.rx,
        Duration::from_secs(5),
        "back to ClusterIP",
        |s| s.services[&key("ns", "web")].port.node_port.is_none(),
    )
    .await;

    // Delete: the Service goes, then its slice (no error either way).
    assert!(api.delete(Kind::Service, "ns", "db"));
    wait_snapshot(&mut src.rx, Duration::from_secs(5), "db deleted", |s| {
        !s.services.contains_key(&key("ns", "db"))
    })
    .await;
    assert!(api.delete(Kind::EndpointSlice, "ns", "web-a"));
    wait_snapshot(&mut src.rx, Duration::from_secs(5), "web-a deleted", |s| {
        addrs(s, &key("ns", "web")) == ["10.1.0.2:8080"]
    })
    .await;
}

#[tokio::test]
async fn a_burst_of_changes_is_coalesced_into_few_snapshots() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    let src = source(&api, Options::default()).await;
    let mut rx = src.rx.clone();
    let changes = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&changes);
    let mut counting = src.rx.clone();
    tokio::spawn(async move {
        while counting.changed().await.is_ok() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    for i in 0..300u32 {
        let ip = format!("10.2.{}.{}", i / 200, i % 200 + 1);
        api.apply(slice(
            "ns",
            &format!("web-{i}"),
            "web",
            8080,
            &[(&ip, true, None)],
        ));
    }
    wait_snapshot(&mut rx, Duration::from_secs(10), "300 endpoints", |s| {
        s.services[&key("ns", "web")].endpoints.len() == 300
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = changes.load(Ordering::Relaxed);
    // One, or a few when a slow machine takes longer than MAX_DELAY (1 s)
    // to take in the burst.
    assert!(
        (1..=3).contains(&n),
        "300 slices published as {n} snapshots"
    );
}

#[tokio::test]
async fn a_paged_relist_of_thousands_of_objects_is_one_snapshot() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    for i in 0..1200u32 {
        let ip = format!("10.5.{}.{}", i / 200, i % 200 + 1);
        api.apply(slice(
            "ns",
            &format!("web-{i}"),
            "web",
            8080,
            &[(&ip, true, None)],
        ));
    }
    // The watcher lists 500 per page: three pages, one snapshot.
    let src = source(&api, Options::default()).await;
    assert_eq!(
        src.rx.borrow().services[&key("ns", "web")].endpoints.len(),
        1200
    );
    let changes = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&changes);
    let mut counting = src.rx.clone();
    tokio::spawn(async move {
        while counting.changed().await.is_ok() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    // A relist with one change in it: one more snapshot, not 1,200.
    api.expire();
    api.delete(Kind::EndpointSlice, "ns", "web-0");
    let mut rx = src.rx.clone();
    wait_snapshot(&mut rx, Duration::from_secs(10), "relisted", |s| {
        s.services[&key("ns", "web")].endpoints.len() == 1199
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(changes.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn headless_externalname_and_other_proxies_services_are_skipped() {
    let api = FakeApi::new().await;
    let mut headless = service("ns", "headless", "None", 80);
    headless["spec"]["clusterIPs"] = json!(["None"]);
    api.apply(headless);
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "external", "namespace": "ns"},
        "spec": {"type": "ExternalName", "externalName": "example.com", "ports": [{"name": "http", "port": 80}]}
    }));
    let mut other = service("ns", "other", "10.96.0.20", 80);
    other["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"});
    api.apply(other);
    let mut mine = service("ns", "mine", "10.96.0.21", 80);
    mine["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "kusp"});
    api.apply(mine);
    api.apply(service("ns", "plain", "10.96.0.22", 80));
    api.apply(slice(
        "ns",
        "plain-1",
        "plain",
        8080,
        &[("10.3.0.1", true, None)],
    ));
    let mut hl = slice("ns", "plain-2", "plain", 8080, &[("10.3.0.2", true, None)]);
    hl["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    api.apply(hl);

    let src = source(
        &api,
        Options {
            node_name: None,
            service_proxy_name: Some("kusp".into()),
        },
    )
    .await;
    let snap = src.rx.borrow().clone();
    let names: Vec<&str> = snap.services.keys().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["mine", "plain"]);
    assert_eq!(addrs(&snap, &key("ns", "plain")), ["10.3.0.1:8080"]);

    // Without --service-proxy-name, a labelled service is never ours.
    let src = source(&api, Options::default()).await;
    let names: Vec<String> = src
        .rx
        .borrow()
        .services
        .keys()
        .map(|k| k.name.clone())
        .collect();
    assert_eq!(names, ["plain"]);
}

#[tokio::test]
async fn traffic_policy_local_keeps_only_this_nodes_endpoints() {
    let api = FakeApi::new().await;
    let eps = [
        ("10.4.0.1", true, Some("node-a")),
        ("10.4.0.2", true, Some("node-b")),
    ];
    let mut itp = service("ns", "itp", "10.96.0.30", 80);
    itp["spec"]["internalTrafficPolicy"] = json!("Local");
    api.apply(itp);
    api.apply(slice("ns", "itp-1", "itp", 8080, &eps));
    let mut etp = node_port_service("ns", "etp", "10.96.0.31", 80, 30031);
    etp["spec"]["externalTrafficPolicy"] = json!("Local");
    api.apply(etp);
    api.apply(slice("ns", "etp-1", "etp", 8080, &eps));
    let mut cluster = node_port_service("ns", "cluster", "10.96.0.32", 80, 30032);
    cluster["spec"]["externalTrafficPolicy"] = json!("Cluster");
    api.apply(cluster);
    api.apply(slice("ns", "cluster-1", "cluster", 8080, &eps));

    let src = source(
        &api,
        Options {
            node_name: Some("node-a".into()),
            service_proxy_name: None,
        },
    )
    .await;
    let snap = src.rx.borrow().clone();
    let strings = |eps: &[kube_userspace_proxy::model::Endpoint]| -> Vec<String> {
        eps.iter().map(|e| e.addr.to_string()).collect()
    };
    let internal =
        |k: &ServicePortName| strings(snap.services[k].choice.internal(&snap.services[k].port));
    let external =
        |k: &ServicePortName| strings(snap.services[k].choice.external(&snap.services[k].port));
    let (here, all) = (
        vec!["10.4.0.1:8080".to_string()],
        vec!["10.4.0.1:8080".to_string(), "10.4.0.2:8080".to_string()],
    );
    assert_eq!(internal(&key("ns", "itp")), here);
    assert_eq!(
        external(&key("ns", "itp")),
        Vec::<String>::new(),
        "no external traffic"
    );
    // eTP Local: external traffic to this node's endpoints only, ClusterIP
    // traffic to all of them, as kube-proxy.
    assert_eq!(internal(&key("ns", "etp")), all);
    assert_eq!(external(&key("ns", "etp")), here);
    assert_eq!(internal(&key("ns", "cluster")), all);
    assert_eq!(external(&key("ns", "cluster")), all);
}

fn node_a() -> Options {
    Options {
        node_name: Some("node-a".into()),
        service_proxy_name: None,
    }
}

const ZONE: &str = "topology.kubernetes.io/zone";

/// The cluster set's addresses and the hints that chose it.
fn cluster(s: &Snapshot, k: &ServicePortName) -> (Vec<String>, Topology) {
    let c = &s.services[k].choice;
    let addrs = c.cluster().iter().map(|e| e.addr.to_string()).collect();
    (addrs, c.topology.clone())
}

#[tokio::test]
async fn this_nodes_node_labels_reach_the_snapshot_and_drive_zone_hints() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    let mut s = slice(
        "ns",
        "web-1",
        "web",
        8080,
        &[("10.5.0.1", true, None), ("10.5.0.2", true, None)],
    );
    s["endpoints"][0]["hints"] = json!({"forZones": [{"name": "zone-a"}]});
    s["endpoints"][1]["hints"] = json!({"forZones": [{"name": "zone-b"}]});
    api.apply(s);
    api.apply(node(
        "node-a",
        &[(ZONE, "zone-a")],
        &["10.244.1.0/24", "fd00:1::/64"],
    ));
    // Another node's labels must never count (nor even be sent).
    api.apply(node("node-b", &[(ZONE, "zone-b")], &["10.244.2.0/24"]));

    let mut src = source(&api, node_a()).await;
    let snap = src.rx.borrow_and_update().clone();
    assert_eq!(snap.node.name.as_deref(), Some("node-a"));
    assert_eq!(snap.node.zone(), Some("zone-a"));
    assert_eq!(snap.node.pod_cidrs, ["10.244.1.0/24", "fd00:1::/64"]);
    assert_eq!(
        cluster(&snap, &key("ns", "web")),
        (
            vec!["10.5.0.1:8080".into()],
            Topology::SameZone("zone-a".into())
        )
    );
    // Every Node request, list and watch, selects this node by name.
    let sel = api.selectors(Kind::Node);
    assert!(sel.iter().any(|(watch, _)| !watch), "listed: {sel:?}");
    assert!(sel.iter().any(|(watch, _)| *watch), "watched: {sel:?}");
    for (_, s) in &sel {
        assert_eq!(s.as_deref(), Some("metadata.name=node-a"), "{sel:?}");
    }

    // The other node changing publishes nothing new about ours.
    api.apply(node("node-b", &[(ZONE, "zone-a")], &[]));
    // A label change on ours moves the cluster set to the other zone.
    let t = Instant::now();
    api.apply(node("node-a", &[(ZONE, "zone-b")], &["10.244.1.0/24"]));
    let snap = wait_snapshot(&mut src.rx, Duration::from_secs(5), "zone-b", |s| {
        s.node.zone() == Some("zone-b")
    })
    .await;
    eprintln!("a Node label change was published after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(snap.node.pod_cidrs, ["10.244.1.0/24"]);
    assert_eq!(
        cluster(&snap, &key("ns", "web")),
        (
            vec!["10.5.0.2:8080".into()],
            Topology::SameZone("zone-b".into())
        )
    );

    // Our Node deleted: no labels, hints for no zone are ignored.
    assert!(api.delete(Kind::Node, "", "node-a"));
    let snap = wait_snapshot(&mut src.rx, Duration::from_secs(5), "no labels", |s| {
        s.node.labels.is_empty()
    })
    .await;
    assert_eq!(snap.node.name.as_deref(), Some("node-a"));
    assert!(snap.node.pod_cidrs.is_empty());
    assert_eq!(
        cluster(&snap, &key("ns", "web")).0,
        ["10.5.0.1:8080", "10.5.0.2:8080"]
    );
}

/// Upstream's `NodeEligible` from a watched Node: the autoscaler's taint,
/// a deletion timestamp and the object's deletion all reach the snapshot
/// (and so `/healthz`).
#[tokio::test]
async fn this_nodes_taints_deletion_and_removal_reach_the_snapshot() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.apply(node("node-a", &[], &[]));
    let mut src = source(&api, node_a()).await;
    let snap = src.rx.borrow_and_update().clone();
    assert_eq!(snap.node.object, NodeObject::Present);
    assert_eq!(snap.node.ineligible(), None);

    let mut tainted = node("node-a", &[], &[]);
    tainted["spec"]["taints"] = json!([{"key": "ToBeDeletedByClusterAutoscaler", "value": "1764547200", "effect": "NoSchedule"}]);
    api.apply(tainted);
    wait_snapshot(&mut src.rx, Duration::from_secs(5), "tainted", |s| {
        s.node
            .ineligible()
            .is_some_and(|w| w.contains("ToBeDeletedByClusterAutoscaler"))
    })
    .await;
    let mut deleting = node("node-a", &[], &[]);
    deleting["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    api.apply(deleting);
    wait_snapshot(&mut src.rx, Duration::from_secs(5), "being deleted", |s| {
        s.node.deletion_timestamp.is_some() && s.node.taints.is_empty()
    })
    .await;
    assert!(api.delete(Kind::Node, "", "node-a"));
    let snap = wait_snapshot(&mut src.rx, Duration::from_secs(5), "deleted", |s| {
        s.node.object == NodeObject::Deleted
    })
    .await;
    assert!(snap.node.ineligible().is_some());
    api.apply(node("node-a", &[], &[]));
    wait_snapshot(&mut src.rx, Duration::from_secs(5), "back", |s| {
        s.node.object == NodeObject::Present && s.node.ineligible().is_none()
    })
    .await;
}

#[tokio::test]
async fn no_node_object_means_no_labels_and_no_node_name_means_no_node_requests() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.apply(node("node-b", &[(ZONE, "zone-b")], &[]));
    // No Node named node-a: the first snapshot does not wait for one.
    let t = Instant::now();
    let src = source(&api, node_a()).await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let snap = src.rx.borrow().clone();
    assert!(snap.services.contains_key(&key("ns", "web")));
    assert_eq!(snap.node.name.as_deref(), Some("node-a"));
    assert!(snap.node.labels.is_empty(), "{:?}", snap.node);
    assert!(!api.selectors(Kind::Node).is_empty());
    drop(src);

    // No node name: no Node loop at all.
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.apply(node("node-a", &[(ZONE, "zone-a")], &[]));
    let src = source(&api, Options::default()).await;
    let snap = src.rx.borrow().clone();
    assert!(snap.services.contains_key(&key("ns", "web")));
    assert_eq!(snap.node, Default::default());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(api.selectors(Kind::Node).is_empty());
    assert!(!api.selectors(Kind::Service).is_empty());
}

#[tokio::test]
async fn nodes_forbidden_still_serves_services_and_a_later_grant_is_picked_up() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.apply(slice(
        "ns",
        "web-1",
        "web",
        8080,
        &[("10.1.0.1", true, None)],
    ));
    api.apply(node("node-a", &[(ZONE, "zone-a")], &[]));
    api.forbid(Kind::Node, true);
    let mut src = source(&api, node_a()).await;
    let snap = src.rx.borrow_and_update().clone();
    assert_eq!(addrs(&snap, &key("ns", "web")), ["10.1.0.1:8080"]);
    assert!(snap.node.labels.is_empty());
    assert!(api.forbidden_sent() >= 1);

    // Services keep flowing while nodes stay forbidden.
    api.apply(service("ns", "db", "10.96.0.11", 5432));
    wait_snapshot(&mut src.rx, Duration::from_secs(5), "db added", |s| {
        s.services.contains_key(&key("ns", "db"))
    })
    .await;

    // RBAC fixed: the retries (back-off, at most 15 s apart) find the Node.
    api.forbid(Kind::Node, false);
    wait_snapshot(&mut src.rx, Duration::from_secs(20), "node labels", |s| {
        s.node.zone() == Some("zone-a")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_forbidden_is_one_clear_warning_and_the_proxy_gets_ready() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.forbid(Kind::Node, true);
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let (healthz, metrics) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .arg("--kubeconfig")
        .arg(&kc)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args([
            "--iptables",
            "off",
            "--bind-address",
            "127.0.0.1",
            "--metrics-bind-address",
            &format!("127.0.0.1:{metrics}"),
            "--healthz-bind-address",
            &format!("127.0.0.1:{healthz}"),
            "--hostname-override",
            "node-a",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _proxy = Proxy(child);
    let rx = lines_of(stderr);
    let mut ready = false;
    for _ in 0..200 {
        if try_get(healthz, "/readyz").await == Some(200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "/readyz 200 with nodes forbidden");
    // Let a few retries pass: still one warning.
    let end = Instant::now() + Duration::from_secs(10);
    while api.forbidden_sent() < 3 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(api.forbidden_sent() >= 3, "retried");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines: Vec<String> = rx.try_iter().collect();
    let warned: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("nodes: list/watch forbidden; topology hints and NodeCIDR need it"))
        .collect();
    assert_eq!(warned.len(), 1, "{lines:#?}");
    assert!(
        warned[0].contains("WARN") && warned[0].contains("Node"),
        "{}",
        warned[0]
    );
    let (_, body) = http(localhost(metrics), "GET", "/metrics").await;
    let counted = body
        .lines()
        .find(|l| l.starts_with("kusp_discovery_watch_errors_total{kind=\"Node\"}"));
    assert!(counted.is_some(), "{body}");
}

#[tokio::test]
async fn watch_expiry_410_relists_converges_and_never_drops_live_services() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.apply(slice(
        "ns",
        "web-a",
        "web",
        8080,
        &[("10.1.0.1", true, None)],
    ));
    api.apply(service("ns", "db", "10.96.0.11", 5432));
    let src = source(&api, Options::default()).await;
    let mut rx = src.rx.clone();

    // Every snapshot published from now on must still have web.
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    let mut watcher = src.rx.clone();
    tokio::spawn(async move {
        while watcher.changed().await.is_ok() {
            if !watcher.borrow().services.contains_key(&key("ns", "web")) {
                flag.store(true, Ordering::Relaxed);
            }
        }
    });

    let lists = api.lists();
    // Watches close and history is compacted; meanwhile the cluster changes.
    api.expire();
    assert!(api.delete(Kind::Service, "ns", "db"));
    api.apply(service("ns", "cache", "10.96.0.12", 6379));
    wait_snapshot(&mut rx, Duration::from_secs(10), "relist converged", |s| {
        !s.services.contains_key(&key("ns", "db")) && s.services.contains_key(&key("ns", "cache"))
    })
    .await;
    // Both kinds were listed again (410 on re-watch → relist).
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.lists() < lists + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        api.lists() >= lists + 2,
        "relisted: {} → {}",
        lists,
        api.lists()
    );
    assert_eq!(addrs(&rx.borrow(), &key("ns", "web")), ["10.1.0.1:8080"]);
    assert!(
        !dropped.load(Ordering::Relaxed),
        "a snapshot lacked web during the relist"
    );
}

#[tokio::test]
async fn an_undecodable_object_is_skipped_and_never_blocks_the_others() {
    let api = FakeApi::new().await;
    // Fails to decode: a port that is not a number.
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "broken", "namespace": "ns"},
        "spec": {"clusterIP": "10.96.0.40", "ports": [{"name": "http", "port": "eighty"}]}
    }));
    // Fails to decode in its metadata.
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "badmeta", "namespace": "ns", "labels": 7},
        "spec": {"clusterIP": "10.96.0.41", "ports": [{"name": "http", "port": 80}]}
    }));
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.apply(slice(
        "ns",
        "web-a",
        "web",
        8080,
        &[("10.1.0.1", true, None)],
    ));
    let mut bad_slice = slice("ns", "web-bad", "web", 8080, &[]);
    bad_slice["endpoints"] = json!([{"addresses": "10.1.0.9"}]);
    api.apply(bad_slice);

    let mut src = source(&api, Options::default()).await;
    let snap = src.rx.borrow_and_update().clone();
    let names: Vec<&str> = snap.services.keys().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["web"], "only the decodable service");
    assert_eq!(addrs(&snap, &key("ns", "web")), ["10.1.0.1:8080"]);

    // A watch event that does not decode keeps the last good version...
    let mut bad_web = service("ns", "web", "10.96.0.10", 80);
    bad_web["spec"]["ports"][0]["port"] = json!({"nested": true});
    api.apply(bad_web);
    // ...and the next good event still applies (the watch went on).
    api.apply(service("ns", "other", "10.96.0.12", 81));
    let snap = wait_snapshot(&mut src.rx, Duration::from_secs(5), "other added", |s| {
        s.services.contains_key(&key("ns", "other"))
    })
    .await;
    assert_eq!(snap.services[&key("ns", "web")].port.port, 80);
    api.apply(service("ns", "web", "10.96.0.10", 8081));
    wait_snapshot(&mut src.rx, Duration::from_secs(5), "web fixed", |s| {
        s.services[&key("ns", "web")].port.port == 8081
    })
    .await;
}

#[tokio::test]
async fn api_down_at_start_is_retried_until_it_answers() {
    let api = FakeApi::down().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&api, &dir).await;
    let cancel = CancellationToken::new();
    let first = tokio::spawn(discovery::kube::spawn(
        client,
        Options::default(),
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!first.is_finished(), "no snapshot without an API server");
    api.start().await;
    let rx = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("first snapshot after the API server came up")
        .unwrap()
        .unwrap();
    assert!(rx.borrow().services.contains_key(&key("ns", "web")));
    cancel.cancel();
}

#[tokio::test]
async fn master_alone_is_a_complete_configuration() {
    let api = FakeApi::with_token(None).await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    let config = discovery::kube::config(None, Some(&api.url()))
        .await
        .unwrap();
    let client = discovery::kube::client(config).unwrap();
    let cancel = CancellationToken::new();
    let rx = tokio::time::timeout(
        Duration::from_secs(10),
        discovery::kube::spawn(client, Options::default(), cancel.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(rx.borrow().services.contains_key(&key("ns", "web")));
    cancel.cancel();
}

#[tokio::test]
async fn a_wrong_token_is_not_served() {
    let api = FakeApi::new().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let text = std::fs::read_to_string(&kc)
        .unwrap()
        .replace(fake_api::TOKEN, "wrong");
    std::fs::write(&kc, text).unwrap();
    let config = discovery::kube::config(Some(&kc), None).await.unwrap();
    let client = discovery::kube::client(config).unwrap();
    let cancel = CancellationToken::new();
    let r = tokio::time::timeout(
        Duration::from_millis(1500),
        discovery::kube::spawn(client, Options::default(), cancel.clone()),
    )
    .await;
    assert!(r.is_err(), "401 must not count as a list");
    cancel.cancel();
}

#[tokio::test]
async fn tls_with_the_kubeconfigs_ca_or_insecure_skip_verify_and_a_token() {
    let api = FakeApi::tls().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    for trust in [Trust::Ca, Trust::Insecure] {
        let dir = tempfile::tempdir().unwrap();
        let kc = api.kubeconfig_with(dir.path(), trust);
        let config = discovery::kube::config(Some(&kc), None).await.unwrap();
        let client = discovery::kube::client(config).unwrap();
        let cancel = CancellationToken::new();
        let rx = tokio::time::timeout(
            Duration::from_secs(10),
            discovery::kube::spawn(client, Options::default(), cancel.clone()),
        )
        .await
        .unwrap_or_else(|_| panic!("{trust:?}: no snapshot over TLS"))
        .unwrap();
        assert!(rx.borrow().services.contains_key(&key("ns", "web")));
        cancel.cancel();
    }
    // An unknown CA is refused: no snapshot.
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig_with(dir.path(), Trust::Nothing);
    let config = discovery::kube::config(Some(&kc), None).await.unwrap();
    let client = discovery::kube::client(config).unwrap();
    let cancel = CancellationToken::new();
    let r = tokio::time::timeout(
        Duration::from_millis(1500),
        discovery::kube::spawn(client, Options::default(), cancel.clone()),
    )
    .await;
    assert!(
        r.is_err(),
        "a server certificate from an unknown CA was accepted"
    );
    cancel.cancel();
}

// === the binary ===

fn free_port() -> u16 {
    common::procs::free_port()
}

/// Starts the binary on the host: loopback only, no iptables.
fn proxy_on_host(kubeconfig: &std::path::Path, healthz: u16, via_env: bool) -> Proxy {
    proxy_on_host_with(kubeconfig, healthz, 0, via_env, &[])
}

/// A proxy on the host with its `/metrics` on `metrics`.
fn proxy_with_metrics(kubeconfig: &std::path::Path, metrics: u16) -> Proxy {
    proxy_on_host_with(kubeconfig, 0, metrics, false, &[])
}

/// As [`proxy_on_host`], with the metrics port (0: any) and `extra` flags.
fn proxy_on_host_with(
    kubeconfig: &std::path::Path,
    healthz: u16,
    metrics: u16,
    via_env: bool,
    extra: &[&str],
) -> Proxy {
    let mut cmd = Command::new(BIN);
    if via_env {
        cmd.env("KUBECONFIG", kubeconfig);
    } else {
        cmd.arg("--kubeconfig").arg(kubeconfig);
    }
    cmd.env_remove("KUBERNETES_SERVICE_HOST")
        .args([
            "--iptables",
            "off",
            "--bind-address",
            "127.0.0.1",
            "--metrics-bind-address",
            &format!("127.0.0.1:{metrics}"),
            "--healthz-bind-address",
            &format!("127.0.0.1:{healthz}"),
            "--hostname-override",
            "node-a",
            "--log-level",
            "warn",
        ])
        .args(extra)
        .stdout(Stdio::null());
    Proxy(cmd.spawn().unwrap())
}

/// GET `path` on 127.0.0.1:`port`; None while nothing listens.
async fn try_get(port: u16, path: &str) -> Option<u16> {
    tokio::net::TcpStream::connect(localhost(port)).await.ok()?;
    Some(http(localhost(port), "GET", path).await.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_the_first_list_then_200() {
    let api = FakeApi::down().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let healthz = free_port();
    // KUBECONFIG alone selects Kubernetes discovery. A short sync period:
    // /healthz would turn 503 after two of them if waiting counted as stale.
    let _proxy = proxy_on_host_with(&kc, healthz, 0, true, &["--iptables-sync-period", "1s"]);
    let mut code = None;
    for _ in 0..200 {
        code = try_get(healthz, "/readyz").await;
        if code.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(code, Some(503), "not ready while the API server is down");
    assert_eq!(try_get(healthz, "/livez").await, Some(200));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(try_get(healthz, "/readyz").await, Some(503));
    assert_eq!(
        try_get(healthz, "/healthz").await,
        Some(200),
        "alive while waiting for the API server"
    );
    api.start().await;
    let mut ready = false;
    for _ in 0..200 {
        if try_get(healthz, "/readyz").await == Some(200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "/readyz 200 after the first list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_restart_mid_run_keeps_open_connections_and_converges() {
    let echo = echo_backend().await;
    let api = FakeApi::new().await;
    let (np1, np2) = (free_port(), free_port());
    apply_echo_service(&api, "web", "10.96.0.10", np1, echo);
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let _proxy = proxy_on_host(&kc, free_port(), false);

    let web = localhost(np1);
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            web
        )
        .is_ok())
        .await,
        "listener on the nodePort"
    );
    let mut conn = tokio::net::TcpStream::connect(web).await.unwrap();
    let mut buf = [0u8; 5];
    conn.write_all(b"hello").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");

    // The API server crashes; the cluster changes while it is down.
    api.stop();
    tokio::time::sleep(Duration::from_millis(800)).await;
    conn.write_all(b"still").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still", "open connection survives the API outage");
    apply_echo_service(&api, "db", "10.96.0.11", np2, echo);
    api.start().await;

    let db = localhost(np2);
    assert!(
        eventually(Duration::from_secs(20), || std::net::TcpStream::connect(db)
            .is_ok())
        .await,
        "change made during the outage applied after the restart"
    );
    conn.write_all(b"again").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"again", "connection survives the relist");
    assert_eq!(read_echo(web).await, "fresh", "web still served");

    // A relist that no longer has a service removes it.
    api.stop();
    assert!(api.delete(Kind::Service, "ns", "db"));
    api.start().await;
    assert!(
        eventually(Duration::from_secs(20), || std::net::TcpStream::connect(db)
            .is_err())
        .await,
        "deleted service's listener closed"
    );
    conn.write_all(b"final").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"final");
}

/// Applies nodePort Service `ns/name` with one ready endpoint: `echo`
/// on 127.0.0.1.
fn apply_echo_service(
    api: &FakeApi,
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    echo: SocketAddr,
) {
    api.apply(node_port_service("ns", name, cluster_ip, 80, node_port));
    api.apply(slice(
        "ns",
        &format!("{name}-a"),
        name,
        echo.port(),
        &[("127.0.0.1", true, None)],
    ));
}

/// The value of the first `/metrics` line starting with `prefix`.
async fn metric(port: u16, prefix: &str) -> Option<f64> {
    let (_, body) = http(localhost(port), "GET", "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_fresh_store_serves_new_services_within_2s_and_closes_vanished_ones() {
    let echo = echo_backend().await;
    let api = FakeApi::new().await;
    let (np_web, np_old, np_new) = (free_port(), free_port(), free_port());
    apply_echo_service(&api, "web", "10.96.0.10", np_web, echo);
    apply_echo_service(&api, "old", "10.96.0.11", np_old, echo);
    // Versions the fresh store will not reach for a long time.
    for i in 0..50 {
        api.apply(service("churn", &format!("s{i}"), "10.96.1.1", 80));
    }
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let metrics = free_port();
    let _proxy = proxy_with_metrics(&kc, metrics);
    let (at_web, at_old, at_new) = (localhost(np_web), localhost(np_old), localhost(np_new));
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            at_old
        )
        .is_ok())
        .await,
        "old served before the restart"
    );
    let mut conn = tokio::net::TcpStream::connect(at_web).await.unwrap();
    let mut buf = [0u8; 5];
    conn.write_all(b"hello").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();

    // The API server crashes and comes back on an empty etcd at revision 5,
    // as after a restore; web is created again, old never is.
    api.start_fresh(5).await;
    let t = Instant::now();
    apply_echo_service(&api, "web", "10.96.0.10", np_web, echo);
    apply_echo_service(&api, "new", "10.96.0.12", np_new, echo);
    let served = eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(at_new).is_ok()
    })
    .await;
    let took = t.elapsed();
    eprintln!("Service created after the restart served after {took:?}");
    assert!(served, "new Service served");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(read_echo(at_new).await, "fresh");
    assert!(
        eventually(Duration::from_secs(2), || std::net::TcpStream::connect(
            at_old
        )
        .is_err())
        .await,
        "vanished Service's listener closed"
    );
    conn.write_all(b"still").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still", "a live Service keeps its connections");
    let regressions = metric(
        metrics,
        "kusp_discovery_resource_version_regressions_total{kind=\"Service\"}",
    )
    .await;
    assert!(
        regressions.is_some_and(|n| n >= 1.0),
        "regression counted: {regressions:?}"
    );
    assert!(api.probes() >= 1, "found by the probe");
}

/// kube-proxy's series (`pkg/proxy/metrics/metrics.go`, 1.33+) outside its
/// iptables mode: name, type, help text as upstream's `/metrics` shows them.
const KUBE_PROXY_SERIES: [(&str, &str, &str); 11] = [
    (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "histogram",
        "SyncProxyRules latency in seconds",
    ),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        "The last time proxy rules were successfully synced",
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        "The last time a sync of proxy rules was queued",
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        "In Cluster Network Programming Latency in seconds",
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
        "Pending proxy rules Endpoint changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        "Cumulative proxy rules Endpoint changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
        "Pending proxy rules Service changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        "Cumulative proxy rules Service changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        "Number of services with a Local traffic policy and no endpoints",
    ),
    (
        "kubeproxy_proxy_healthz_total",
        "counter",
        "Cumulative proxy healthz HTTP status",
    ),
    (
        "kubeproxy_proxy_livez_total",
        "counter",
        "Cumulative proxy livez HTTP status",
    ),
];

/// The seconds from `a` to `b` (negative when `b` is earlier).
fn secs_between(a: std::time::SystemTime, b: std::time::SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxys_series_are_upstreams_and_a_trigger_time_is_observed_once() {
    use std::time::SystemTime;
    const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";
    const PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";
    let echo = echo_backend().await;
    let api = FakeApi::new().await;
    let np = free_port();
    apply_echo_service(&api, "web", "10.96.0.10", np, echo);
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let (metrics, healthz) = (free_port(), free_port());
    // A periodic pass every second: it must not count a change again.
    let extra = ["--iptables-sync-period", "1s"];
    let _proxy = proxy_on_host_with(&kc, healthz, metrics, false, &extra);
    let web = localhost(np);
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            web
        )
        .is_ok())
        .await,
        "served"
    );
    assert_eq!(try_get(healthz, "/healthz").await, Some(200));
    assert_eq!(try_get(healthz, "/livez").await, Some(200));

    // Every upstream series, typed and described as upstream's (with
    // component-base's stability prefix); none of the iptables mode's.
    let (_, body) = http(localhost(metrics), "GET", "/metrics").await;
    for (name, kind, help) in KUBE_PROXY_SERIES {
        let head = format!("# HELP {name} [ALPHA] {help}\n# TYPE {name} {kind}\n");
        assert!(body.contains(&head), "{head} in {body}");
    }
    for name in [
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    ] {
        assert!(!body.contains(name), "{name} is iptables mode's");
    }
    // Syncs are the reconciles: timed and stamped without iptables.
    let family = "{ip_family=\"IPv4\"}";
    let syncs = metric(
        metrics,
        &format!("kubeproxy_sync_proxy_rules_duration_seconds_count{family}"),
    )
    .await;
    assert!(syncs.is_some_and(|n| n >= 1.0), "syncs: {syncs:?}");
    let last = metric(
        metrics,
        &format!("kubeproxy_sync_proxy_rules_last_timestamp_seconds{family}"),
    )
    .await;
    let now = secs_between(SystemTime::UNIX_EPOCH, SystemTime::now());
    assert!(
        last.is_some_and(|t| (now - t).abs() < 10.0),
        "last sync {last:?}, now {now}"
    );
    for (series, le) in [
        ("bucket", "0"),
        ("bucket", "0.25"),
        ("bucket", "59"),
        ("bucket", "300"),
        ("count", ""),
    ] {
        let line = match le {
            "" => format!("{PROGRAMMING}_{series}{family} 0"),
            le => format!("{PROGRAMMING}_{series}{{ip_family=\"IPv4\",le=\"{le}\"}} 0"),
        };
        assert!(body.lines().any(|l| l == line), "{line} in {body}");
    }
    let count_v4 = format!("{PROGRAMMING}_count{family}");
    let count = || metric(metrics, &count_v4);

    // A change triggered a second ago (after the start): observed once,
    // about the second plus the time it took to be served.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let applied = SystemTime::now();
    let triggered = applied - Duration::from_secs(1);
    let mut changed = slice(
        "ns",
        "web-a",
        "web",
        echo.port(),
        &[("127.0.0.1", true, None), ("127.0.0.2", false, None)],
    );
    changed["metadata"]["annotations"] =
        json!({TRIGGER: humantime::format_rfc3339_nanos(triggered).to_string()});
    api.apply(changed);
    let end = Instant::now() + Duration::from_secs(10);
    while count().await != Some(1.0) && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let by = SystemTime::now();
    assert_eq!(count().await, Some(1.0), "one observation");
    let sum = metric(metrics, &format!("{PROGRAMMING}_sum{family}"))
        .await
        .unwrap_or(-1.0);
    let most = secs_between(triggered, by);
    assert!((1.0..=most).contains(&sum), "latency {sum}, at most {most}");
    assert_eq!(
        metric(
            metrics,
            &format!("{PROGRAMMING}_count{{ip_family=\"IPv6\"}}")
        )
        .await,
        Some(0.0),
        "an IPv4 slice's change is IPv4's"
    );

    // A malformed trigger time is ignored; the change is served all the
    // same, and periodic passes count nothing again.
    let changes = || metric(metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_total");
    let before = changes().await.unwrap_or(0.0);
    let mut malformed = slice(
        "ns",
        "web-a",
        "web",
        echo.port(),
        &[("127.0.0.1", true, None)],
    );
    malformed["metadata"]["annotations"] = json!({TRIGGER: "not a time"});
    api.apply(malformed);
    let end = Instant::now() + Duration::from_secs(10);
    while changes().await.unwrap_or(0.0) <= before && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        changes().await.unwrap_or(0.0) > before,
        "the change arrived"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(count().await, Some(1.0), "still one observation");
    assert_eq!(read_echo(web).await, "fresh", "still served");
    for pending in ["service", "endpoint"] {
        let v = metric(
            metrics,
            &format!("kubeproxy_sync_proxy_rules_{pending}_changes_pending "),
        )
        .await;
        assert_eq!(v, Some(0.0), "{pending} changes pending at rest");
    }
    let services = metric(metrics, "kubeproxy_sync_proxy_rules_service_changes_total").await;
    assert_eq!(services, Some(1.0), "web, from the first list");
}

/// A store restored below our version while the server runs; watches are
/// closed cleanly and the re-watch is refused as too large in `form`.
async fn too_large_on_re_watch_relists(form: TooLarge) {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.apply(slice(
        "ns",
        "web-a",
        "web",
        8080,
        &[("10.1.0.1", true, None)],
    ));
    // Refused before the client's probe would notice: the error path.
    api.set_too_large(form, Duration::from_millis(100));
    let mut src = source(&api, Options::default()).await;
    let (lists, probes) = (api.lists(), api.probes());
    api.restore(5);
    let t = Instant::now();
    api.apply(service("ns", "new", "10.96.0.12", 80));
    wait_snapshot(
        &mut src.rx,
        Duration::from_secs(2),
        "new served, web gone",
        |s| {
            s.services.contains_key(&key("ns", "new"))
                && !s.services.contains_key(&key("ns", "web"))
        },
    )
    .await;
    eprintln!("{form:?}: converged after {:?}", t.elapsed());
    assert!(api.too_large_sent() >= 1, "the too-large answer was sent");
    assert!(api.lists() > lists, "relisted");
    assert_eq!(api.probes(), probes, "relisted on the error, not the probe");
}

#[tokio::test]
async fn a_too_large_version_as_an_http_504_relists_from_scratch() {
    too_large_on_re_watch_relists(TooLarge::Http).await;
}

#[tokio::test]
async fn a_too_large_version_as_a_watch_error_event_relists_from_scratch() {
    too_large_on_re_watch_relists(TooLarge::Event).await;
}

#[tokio::test]
async fn a_list_ahead_of_the_store_gets_kube_apiservers_too_large_status() {
    use kube::api::{Api, ListParams, VersionMatch};
    use kube_userspace_proxy::discovery::list_watch::{unusable, Unusable};
    let api = FakeApi::new().await;
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&api, &dir).await;
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::all(client);
    let lp = ListParams {
        resource_version: Some("999".into()),
        version_match: Some(VersionMatch::NotOlderThan),
        ..ListParams::default()
    };
    let t = Instant::now();
    let err = services.list(&lp).await.unwrap_err();
    assert!(
        t.elapsed() >= fake_api::BLOCK_TIMEOUT,
        "waited for the store first"
    );
    let kube::Error::Api(status) = err else {
        panic!("not a Status: {err}");
    };
    assert_eq!(status.code, 504);
    assert_eq!(status.reason, "Timeout");
    assert_eq!(
        status.message,
        "Timeout: Too large resource version: 999, current: 100"
    );
    let cause = &status.details.as_ref().unwrap().causes[0];
    assert_eq!(cause.reason, "ResourceVersionTooLarge");
    assert_eq!(cause.message, "Too large resource version");
    assert_eq!(unusable(&status), Some(Unusable::TooLarge));
    assert_eq!(api.too_large_sent(), 1);
}

#[tokio::test]
async fn versions_going_backwards_on_an_open_watch_relist_without_any_error() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.apply(service("ns", "db", "10.96.0.11", 5432));
    let mut src = source(&api, Options::default()).await;
    let lists = api.lists();
    // The store goes back to revision 5 under the open watches; db is
    // written again, web is not.
    api.rewind(5);
    let t = Instant::now();
    api.apply(service("ns", "db", "10.96.0.11", 5432));
    api.apply(service("ns", "new", "10.96.0.12", 80));
    wait_snapshot(
        &mut src.rx,
        Duration::from_secs(2),
        "relisted: new served, web gone",
        |s| {
            s.services.contains_key(&key("ns", "new"))
                && s.services.contains_key(&key("ns", "db"))
                && !s.services.contains_key(&key("ns", "web"))
        },
    )
    .await;
    eprintln!("converged after {:?}", t.elapsed());
    assert!(api.lists() > lists, "relisted");
    assert_eq!(api.too_large_sent(), 0, "no error was involved");
    assert_eq!(api.probes(), 0, "found in the watch events, not by a probe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_object_is_logged_by_kind_name_and_field_and_counted() {
    let api = FakeApi::new().await;
    api.apply(service("ns", "web", "10.96.0.10", 80));
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "broken", "namespace": "ns"},
        "spec": {"clusterIP": "10.96.0.40", "ports": [{"name": "http", "port": "eighty"}]}
    }));
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let metrics = free_port();
    let mut child = Command::new(BIN)
        .arg("--kubeconfig")
        .arg(&kc)
        .args([
            "--iptables",
            "off",
            "--bind-address",
            "127.0.0.1",
            "--metrics-bind-address",
            &format!("127.0.0.1:{metrics}"),
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _proxy = Proxy(child);
    let rx = lines_of(stderr);
    let end = Instant::now() + Duration::from_secs(10);
    let mut logged = None;
    while logged.is_none() && Instant::now() < end {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if line.contains("cannot decode object") {
                logged = Some(line);
            }
        }
    }
    let line = logged.expect("a warning for the undecodable object");
    for part in ["Service", "ns/broken", "spec.ports[0].port"] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    let mut counted = String::new();
    for _ in 0..100 {
        if let Some(200) = try_get(metrics, "/metrics").await {
            let (_, body) = http(localhost(metrics), "GET", "/metrics").await;
            if let Some(l) = body
                .lines()
                .find(|l| l.starts_with("kusp_discovery_decode_errors_total{kind=\"Service\"}"))
            {
                counted = l.to_string();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(counted.ends_with(" 1"), "counter: {counted:?}");
}

#[test]
fn rules_prints_the_payload_for_the_clusters_services() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(FakeApi::new());
    api.apply(service("ns", "web", "10.96.0.10", 80));
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let out = Command::new(BIN)
        .arg("rules")
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["--bind-address", "127.0.0.1", "--log-level", "warn"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("10.96.0.10/32") && text.contains("ns/web:http"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_is_served_within_a_second_and_type_changes_re_home_it() {
    let echo = echo_backend().await;
    let api = FakeApi::new().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let _proxy = proxy_on_host(&kc, free_port(), false);
    let (np1, np2) = (free_port(), free_port());
    let (at1, at2) = (localhost(np1), localhost(np2));
    // Let the proxy finish its first (empty) list.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let t = Instant::now();
    apply_echo_service(&api, "web", "10.96.0.10", np1, echo);
    let mut served = false;
    while t.elapsed() < Duration::from_secs(10) {
        if tokio::net::TcpStream::connect(at1).await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = t.elapsed();
    eprintln!("new Service + EndpointSlice served on its nodePort after {took:?}");
    assert!(served, "nodePort listener");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(read_echo(at1).await, "fresh");

    // NodePort → LoadBalancer on another nodePort: the listener moves.
    let mut lb = node_port_service("ns", "web", "10.96.0.10", 80, np2);
    lb["spec"]["type"] = json!("LoadBalancer");
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.18.0.9"}]}});
    api.apply(lb);
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect(at2)
            .is_ok())
        .await,
        "re-homed on the new nodePort"
    );
    assert_eq!(read_echo(at2).await, "fresh");
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect(at1)
            .is_err())
        .await,
        "old nodePort released"
    );
    // Back to ClusterIP: no nodePort any more.
    api.apply(service("ns", "web", "10.96.0.10", 80));
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect(at2)
            .is_err())
        .await,
        "nodePort released"
    );
}

async fn read_echo(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"fresh").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

// === end to end, in network namespaces ===

/// The fake API server running on its own runtime inside `ns` (its
/// 127.0.0.1 is the namespace's); stops when dropped.
struct NsApi {
    api: Arc<FakeApi>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl NsApi {
    fn start(ns: &Netns) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let api = Arc::new(FakeApi::new().await);
                tx.send(Arc::clone(&api)).unwrap();
                let _ = stop_rx.await;
                api.stop();
            });
        });
        let api = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        NsApi {
            api,
            stop: Some(stop_tx),
        }
    }
}

impl Drop for NsApi {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[test]
fn backends_on_veth_addresses_in_another_namespace_are_reached_through_the_proxy() {
    let test = "backends_on_veth_addresses_in_another_namespace_are_reached_through_the_proxy";
    if !require_root(test) {
        return;
    }
    // node: the proxy and the API server; pods: the backends. Linked by a
    // veth made inside the two namespaces; the host is never touched.
    let (node, pods, pods_if) = node_and_pod("k", "10.252.7");
    pods.run(&["ip", "addr", "add", "10.252.7.3/24", "dev", &pods_if]);
    let a: SocketAddr = "10.252.7.2:8080".parse().unwrap();
    let b: SocketAddr = "10.252.7.3:8080".parse().unwrap();
    pods.name_backend(a, "pod-a");
    pods.name_backend(b, "pod-b");

    let api = NsApi::start(&node);
    let node_port = 30777;
    api.api
        .apply(node_port_service("ns", "web", "10.96.7.10", 80, node_port));
    api.api.apply(slice(
        "ns",
        "web-a",
        "web",
        8080,
        &[
            ("10.252.7.2", true, Some("n1")),
            ("10.252.7.3", true, Some("n1")),
        ],
    ));
    let dir = tempfile::tempdir().unwrap();
    let kc = api.api.kubeconfig(dir.path());
    let child = node
        .command(&[BIN])
        .arg("--kubeconfig")
        .arg(&kc)
        .args([
            "--iptables",
            "on",
            "--iptables-min-sync-period",
            "100ms",
            "--hostname-override",
            "n1",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _proxy = Proxy(child);

    // Through the nodePort, round-robin over both pods.
    let via_node_port: SocketAddr = format!("127.0.0.1:{node_port}").parse().unwrap();
    wait_for("the nodePort listener", Duration::from_secs(15), || {
        node.fetch(via_node_port).is_ok()
    });
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(node.fetch(via_node_port).unwrap());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["pod-a\n", "pod-b\n"]);

    // Through the cluster IP (iptables REDIRECT inside the node namespace),
    // from the node and from a pod.
    let via_cluster_ip: SocketAddr = "10.96.7.10:80".parse().unwrap();
    wait_for("the cluster IP redirect", Duration::from_secs(15), || {
        node.fetch(via_cluster_ip)
            .is_ok_and(|s| s.starts_with("pod-"))
    });
    assert!(
        pods.fetch(via_cluster_ip).unwrap().starts_with("pod-"),
        "pod → ClusterIP"
    );

    // An endpoint change through the API is followed.
    api.api.apply(slice(
        "ns",
        "web-a",
        "web",
        8080,
        &[("10.252.7.3", true, Some("n1"))],
    ));
    wait_for("only pod-b", Duration::from_secs(10), || {
        (0..3).all(|_| node.fetch(via_node_port).is_ok_and(|s| s == "pod-b\n"))
    });

    // externalTrafficPolicy: Local with pod-b on another node: ClusterIP
    // traffic reaches both, and so does the node's own nodePort traffic
    // (upstream short-circuits traffic from the host to the cluster set;
    // external clients are in tests/endpoint_choice.rs).
    let mut local = node_port_service("ns", "web", "10.96.7.10", 80, node_port);
    local["spec"]["externalTrafficPolicy"] = json!("Local");
    api.api.apply(local);
    api.api.apply(slice(
        "ns",
        "web-a",
        "web",
        8080,
        &[
            ("10.252.7.2", true, Some("n1")),
            ("10.252.7.3", true, Some("n2")),
        ],
    ));
    wait_for("both pods again", Duration::from_secs(10), || {
        let seen: std::collections::BTreeSet<_> = (0..6)
            .filter_map(|_| node.fetch(via_node_port).ok())
            .collect();
        seen.len() == 2
    });
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(pods.fetch(via_cluster_ip).unwrap());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["pod-a\n", "pod-b\n"],
        "ClusterIP traffic is not restricted by externalTrafficPolicy"
    );
}
