//! Endpoint choice in the data path, for real, in network namespaces the
//! test creates: a "node" namespace runs the proxy binary, a "pod"
//! namespace is a pod on this node (its source in `--cluster-cidr`, its
//! veth the pods' interface), an "ext" namespace is a client outside the
//! cluster. Upstream's rules (`CategorizeEndpoints` and the iptables
//! proxier's short-circuit of local traffic) are the reference:
//! - `externalTrafficPolicy: Local`: external clients reach this node's
//!   endpoints only; this node's pods and the host reach every endpoint;
//! - no endpoints: clients are refused at once.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::lab::{debug_services, METRICS};
use common::netns::{require_root, veth, wait_for, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_kube-userspace-proxy");
const NODE_PORT: u16 = 30_080;

/// A NodePort Service with `externalTrafficPolicy: policy` and the given
/// endpoints (address, nodeName).
fn manifest(policy: &str, endpoints: &[(&str, &str)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(ip, node)| format!("  - {{addresses: [\"{ip}\"], nodeName: {node}}}\n"))
        .collect();
    let eps = if eps.is_empty() {
        " []\n".to_string()
    } else {
        format!("\n{eps}")
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: ns}}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.7.7\n  externalTrafficPolicy: {policy}\n  ports: [{{name: http, port: 80, nodePort: {NODE_PORT}}}]\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 9001}}]\nendpoints:{eps}"
    )
}

/// The proxy binary in `ns`; killed on drop.
struct Proxy(Child);

impl Proxy {
    fn start(ns: &Netns, dir: &Path, extra: &[&str]) -> Self {
        let mut cmd = ns.command(&[BIN, "--manifests"]);
        cmd.arg(dir)
            .args(["--iptables", "off", "--log-level", "warn"])
            .args(["--hostname-override", "node-1"])
            .args(["--metrics-bind-address", METRICS])
            .args(["--healthz-bind-address", "127.0.0.1:0"])
            .arg("--handover-socket")
            .arg(dir.join("handover.sock"))
            .args(extra)
            .stdout(Stdio::null());
        Proxy(cmd.spawn().unwrap())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The names answered to `n` connections from inside `ns` to `to`, each
/// without its newline (errors as `error: ...`).
fn names(ns: &Netns, to: SocketAddr, n: usize) -> std::collections::BTreeSet<String> {
    ns.spawn(move || {
        (0..n)
            .map(|_| {
                let r =
                    TcpStream::connect_timeout(&to, Duration::from_secs(2)).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        let mut out = String::new();
                        s.read_to_string(&mut out)?;
                        Ok(out.trim_end_matches('\n').to_string())
                    });
                r.unwrap_or_else(|e| format!("error: {e}"))
            })
            .collect()
    })
    .join()
    .unwrap()
}

/// How long a TCP connect from `ns` to `to` takes to be refused, or the
/// error when it is not refused.
fn refused_in(ns: &Netns, to: SocketAddr) -> Result<Duration, String> {
    ns.spawn(move || {
        let start = Instant::now();
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(start.elapsed()),
            Err(e) => Err(format!("not refused: {e}")),
            Ok(_) => Err("connected".into()),
        }
    })
    .join()
    .unwrap()
}

struct Lab {
    node: Netns,
    pod: Netns,
    ext: Netns,
    /// The node's interface towards the pod.
    pod_if: String,
}

/// node ⇄ pod on 10.236.1.0/24 and node ⇄ ext on 10.236.2.0/24 (node .1);
/// backends "here" in the node (nodeName node-1) and "away" in the pod
/// namespace (nodeName node-2), both on port 9001.
fn lab(tag: &str) -> Lab {
    let node = Netns::new(&format!("{tag}n"));
    let pod = Netns::new(&format!("{tag}p"));
    let ext = Netns::new(&format!("{tag}x"));
    let (pod_if, _) = veth(&node, "10.236.1.1/24", &pod, "10.236.1.2/24");
    veth(&node, "10.236.2.1/24", &ext, "10.236.2.2/24");
    pod.run(&["ip", "route", "add", "default", "via", "10.236.1.1"]);
    ext.run(&["ip", "route", "add", "default", "via", "10.236.2.1"]);
    node.name_backend("10.236.2.1:9001".parse().unwrap(), "here");
    pod.name_backend("10.236.1.2:9001".parse().unwrap(), "away");
    Lab {
        node,
        pod,
        ext,
        pod_if,
    }
}

fn set(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

const ENDPOINTS: [(&str, &str); 2] = [("10.236.2.1", "node-1"), ("10.236.1.2", "node-2")];

/// The nodePort at `ip` (the node's address towards a client).
fn node_port(ip: &str) -> SocketAddr {
    format!("{ip}:{NODE_PORT}").parse().unwrap()
}

/// Starts the proxy in the lab's node on `manifest` with `extra` flags;
/// returns it with its manifests directory (keep both alive).
fn serve(lab: &Lab, manifest: &str, extra: &[&str]) -> (Proxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), manifest).unwrap();
    (Proxy::start(&lab.node, dir.path(), extra), dir)
}

/// `externalTrafficPolicy: Local` as upstream: the external client reaches
/// this node's endpoint only, a pod of this node every endpoint.
fn assert_external_local(lab: &Lab) {
    let (from_ext, from_pod) = (node_port("10.236.2.1"), node_port("10.236.1.1"));
    wait_for("the nodePort serves", Duration::from_secs(10), || {
        names(&lab.ext, from_ext, 1) == set(&["here"])
    });
    assert_eq!(names(&lab.ext, from_ext, 12), set(&["here"]));
    assert_eq!(names(&lab.pod, from_pod, 12), set(&["here", "away"]));
}

#[test]
fn external_policy_local_short_circuits_pods_and_host_and_shows_the_choice() {
    if !require_root("external_policy_local_short_circuits_pods_and_host_and_shows_the_choice") {
        return;
    }
    let lab = lab("etp");
    let extra = ["--cluster-cidr", "10.236.1.0/24"];
    let _proxy = serve(&lab, &manifest("Local", &ENDPOINTS), &extra);
    // Outside the node: this node's endpoints only; a pod of this node
    // (source in --cluster-cidr) and the host: all.
    assert_external_local(&lab);
    let from_host = node_port("127.0.0.1");
    assert_eq!(names(&lab.node, from_host, 12), set(&["here", "away"]));

    let doc = debug_services(&lab.node);
    let svc = &doc["services"][0];
    assert_eq!(
        svc["internal_endpoints"],
        serde_json::json!(["10.236.1.2:9001", "10.236.2.1:9001"])
    );
    assert_eq!(
        svc["external_endpoints"],
        serde_json::json!(["10.236.2.1:9001"])
    );
    assert_eq!(
        svc["endpoint_choice"],
        "internal: all endpoints; external: node-local"
    );
}

#[test]
fn pods_are_told_by_their_interface_in_bridge_mode() {
    if !require_root("pods_are_told_by_their_interface_in_bridge_mode") {
        return;
    }
    let lab = lab("brg");
    let extra = [
        "--detect-local-mode",
        "BridgeInterface",
        "--pod-bridge-interface",
        &lab.pod_if,
    ];
    let _proxy = serve(&lab, &manifest("Local", &ENDPOINTS), &extra);
    assert_external_local(&lab);
}

#[test]
fn no_endpoints_refuses_at_once_and_serves_when_they_come_back() {
    if !require_root("no_endpoints_refuses_at_once_and_serves_when_they_come_back") {
        return;
    }
    let lab = lab("none");
    let (_proxy, dir) = serve(&lab, &manifest("Cluster", &[]), &[]);
    let file = dir.path().join("svc.yaml");
    let to = node_port("10.236.2.1");
    wait_for("the service is known", Duration::from_secs(10), || {
        debug_services(&lab.node)["services"][0]["endpoint_choice"] == "no endpoints"
    });
    for _ in 0..5 {
        let took = refused_in(&lab.ext, to).expect("refused");
        assert!(took < Duration::from_millis(100), "refused after {took:?}");
    }

    std::fs::write(&file, manifest("Cluster", &ENDPOINTS)).unwrap();
    wait_for("endpoints serve", Duration::from_secs(10), || {
        names(&lab.ext, to, 1)
            .iter()
            .all(|n| n == "here" || n == "away")
    });

    std::fs::write(&file, manifest("Cluster", &[])).unwrap();
    wait_for("refused again", Duration::from_secs(10), || {
        refused_in(&lab.ext, to).is_ok()
    });
    let took = refused_in(&lab.ext, to).expect("refused");
    assert!(took < Duration::from_millis(100), "refused after {took:?}");
}
