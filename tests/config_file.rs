//! `--config`: the binary run as kubeadm's DaemonSet runs kube-proxy
//! (`--config=FILE --hostname-override=NODE`) on kubeadm's own
//! `config.conf` and `kubeconfig.conf` (tests/fixtures/kubeadm), against the
//! fake API server over TLS; and a bad file exits 64 naming file and field.

mod common;
#[path = "common/fake_api.rs"]
mod fake_api;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::procs::free_port;
use common::*;
use fake_api::{node_port_service, slice, FakeApi, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_kube-userspace-proxy");

/// kubeadm's `config.conf`, verbatim.
const KUBEADM_CONFIG: &str = include_str!("fixtures/kubeadm/config.conf");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeadms_config_and_hostname_override_start_and_serve() {
    let echo = echo_backend().await;
    let api = FakeApi::tls().await;
    let node_port = free_port();
    api.apply(node_port_service("ns", "web", "10.96.0.10", 80, node_port));
    api.apply(slice(
        "ns",
        "web-a",
        "web",
        echo.port(),
        &[("127.0.0.1", true, None)],
    ));
    let dir = tempfile::tempdir().unwrap();
    // The ConfigMap's two keys, as mounted at /var/lib/kube-proxy, with
    // this server and these paths in place of the cluster's.
    let kubeconfig = api.kubeadm_kubeconfig(dir.path());
    let config = dir.path().join("config.conf");
    std::fs::write(
        &config,
        KUBEADM_CONFIG.replace(
            "/var/lib/kube-proxy/kubeconfig.conf",
            &kubeconfig.display().to_string(),
        ),
    )
    .unwrap();
    let (healthz, metrics) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        // kubeadm's command, then what a test on a shared host needs.
        .arg(format!("--config={}", config.display()))
        .arg("--hostname-override=node-a")
        .args(["--iptables", "off", "--bind-address", "127.0.0.1"])
        .arg(format!("--healthz-bind-address=127.0.0.1:{healthz}"))
        .arg(format!("--metrics-bind-address=127.0.0.1:{metrics}"))
        .arg("--handover-socket")
        .arg(dir.path().join("handover.sock"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBECONFIG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _proxy = Proxy(child);
    let lines = lines_of(stderr);

    let ready = async {
        loop {
            if tokio::net::TcpStream::connect(localhost(healthz))
                .await
                .is_ok()
                && http(localhost(healthz), "GET", "/readyz").await.0 == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), ready)
        .await
        .is_err()
    {
        let seen: Vec<String> = lines.try_iter().collect();
        panic!("not ready within 20 s: {seen:#?}");
    }
    // Served: through the listener on the nodePort, to the endpoint.
    let mut conn = tokio::net::TcpStream::connect(localhost(node_port))
        .await
        .unwrap();
    conn.write_all(b"kubeadm").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut echoed = String::new();
    conn.read_to_string(&mut echoed).await.unwrap();
    assert_eq!(echoed, "kubeadm");
    // The node name from --hostname-override picks this node's Node.
    assert!(
        api.selectors(Kind::Node)
            .iter()
            .any(|(_, s)| s.as_deref() == Some("metadata.name=node-a")),
        "{:?}",
        api.selectors(Kind::Node)
    );

    // Logged: what the file set; nothing of kubeadm's zeros is "ignored".
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen: Vec<String> = lines.try_iter().collect();
    let applied = seen
        .iter()
        .find(|l| l.contains("configuration file applied"))
        .unwrap_or_else(|| panic!("{seen:#?}"));
    assert!(
        applied.contains("clientConnection.kubeconfig") && applied.contains("clusterCIDR"),
        "{applied}"
    );
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("field ignored") || l.contains("ERROR")),
        "{seen:#?}"
    );
}

/// Runs the binary on `text` as its `--config`; exit code and stderr.
fn run_with(text: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.conf");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(BIN)
        .arg(format!("--config={}", config.display()))
        .arg("--hostname-override=node-a")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBECONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("still running with a bad config file");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err, config.display().to_string())
}

#[test]
fn a_bad_file_exits_64_naming_the_file_and_the_field() {
    let iptables = "  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs";
    for (to, field) in [
        (
            KUBEADM_CONFIG.replace(iptables, "  minSyncPeriod: 0s\n  syncPeriod: abc\nipvs"),
            r#"iptables.syncPeriod: invalid duration "abc""#,
        ),
        (
            KUBEADM_CONFIG.replace("  masqueradeAll: false\n  masqueradeBit: null\n  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs", "  masqueradeAll: false\n  masquerade: null\n  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs"),
            "iptables.masquerade: unknown field `masquerade`",
        ),
        (
            KUBEADM_CONFIG.replace(iptables, "  minSyncPeriod: 0s\n  syncPeriod: 30\nipvs"),
            "iptables.syncPeriod: invalid type: integer `30`",
        ),
        (
            KUBEADM_CONFIG.replace("kind: KubeProxyConfiguration", "kind: KubeletConfiguration"),
            "kind: \"KubeletConfiguration\" is not \"KubeProxyConfiguration\"",
        ),
        (
            KUBEADM_CONFIG.replace("clusterCIDR: 10.244.0.0/16", "clusterCIDR: 10.244.0.0/33"),
            "clusterCIDR: \"10.244.0.0/33\" is not a CIDR",
        ),
    ] {
        let (code, err, path) = run_with(&to);
        assert_eq!(code, Some(64), "{err}");
        let want = format!("error: {path}: {field}");
        assert!(err.starts_with(&want), "want {want}\n got {err}");
        assert_eq!(err.lines().count(), 1, "one line, nothing started: {err}");
    }
}
