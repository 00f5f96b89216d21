//! The manifests source: bad input is skipped and named, the rest applies,
//! edits re-sync, and the binary serves a directory end to end.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use kube_userspace_proxy::discovery::manifests::{self, Source};
use kube_userspace_proxy::model::{Protocol, ServicePortName};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_kube-userspace-proxy");

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
    let _child = Child(
        Command::new(BIN)
            .args(["--manifests"])
            .arg(dir.path())
            .args([
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
            ])
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
