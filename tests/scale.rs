//! Cost that grows with load, not with workers × Services: an idle
//! Service port holds one socket whatever `--worker-threads` says, a busy
//! one grows a socket per worker, listeners come first in the fd budget,
//! and ports the fd limit cannot hold are reported, never silently lost.
//! The proxy runs as a process of its own with its fd limit capped.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::procs::*;
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// `n` ClusterIP-only Services (no nodePort), one TCP port each, each
/// with `backend` as its endpoint, in one file.
fn write_services(dir: &Path, prefix: &str, n: usize, backend: SocketAddr) {
    let mut y = String::new();
    for i in 0..n {
        let name = format!("{prefix}-{i}");
        y.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: scale}}\n\
             spec:\n  clusterIP: 10.{}.{}.{}\n  ports: [{{name: tcp, port: 80}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: scale, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [\"{}\"], conditions: {{ready: true}}}}]\n\
             ports: [{{name: tcp, port: {}}}]\n---\n",
            100 + i / 65_536,
            (i / 256) % 256,
            i % 256,
            backend.ip(),
            backend.port()
        ));
    }
    std::fs::write(dir.join(format!("{prefix}.yaml")), y).unwrap();
}

/// `/debug/services` as JSON.
async fn services(metrics: SocketAddr) -> Vec<serde_json::Value> {
    let (_, body) = http(metrics, "GET", "/debug/services").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["services"].as_array().cloned().unwrap_or_default()
}

/// Polls `/debug/services` until `n` services are listed and every one is
/// either listening or reported unserved; returns them.
async fn settled(metrics: SocketAddr, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        // Not up yet is refused: checked first, so that no panic's
        // backtrace per try buries a real failure in the output.
        let fetched = if TcpStream::connect(metrics).await.is_ok() {
            tokio::time::timeout(
                Duration::from_secs(5),
                tokio::spawn(async move { http(metrics, "GET", "/debug/services").await }),
            )
            .await
            .ok()
            .and_then(Result::ok)
        } else {
            None
        };
        if let Some((_, body)) = fetched {
            let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let s = doc["services"].as_array().cloned().unwrap_or_default();
            let done = s
                .iter()
                .filter(|v| !v["listener_port"].is_null() || !v["unserved"].is_null())
                .count();
            if s.len() == n && done == n {
                return s;
            }
        }
        assert!(
            start.elapsed() < timeout,
            "{n} service ports not settled within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends a line through `port` and waits for its echo.
async fn echoes(port: u16) -> bool {
    echo_error(port).await.is_none()
}

/// Sends a line through `port` and waits for its echo; says what went
/// wrong, if anything.
async fn echo_error(port: u16) -> Option<String> {
    let mut s = match tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Some(format!("connect: {e}")),
        Err(_) => return Some("connect: timed out".into()),
    };
    if let Err(e) = s.write_all(b"ping\n").await {
        return Some(format!("write: {e}"));
    }
    let mut line = String::new();
    let mut r = BufReader::new(&mut s);
    match tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await {
        Ok(Ok(5)) if line == "ping\n" => None,
        Ok(Ok(n)) => Some(format!("read {n} bytes: {line:?}")),
        Ok(Err(e)) => Some(format!("read: {e}")),
        Err(_) => Some("read: timed out".into()),
    }
}

fn listener_ports(s: &[serde_json::Value]) -> Vec<u16> {
    s.iter()
        .filter_map(|v| v["listener_port"].as_u64())
        .map(|p| p as u16)
        .collect()
}

struct Proxy {
    child: std::process::Child,
    metrics: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(dir: tempfile::TempDir, extra: &[&str], nofile: u64) -> Self {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = ProxyProc::spawn(dir.path(), metrics, extra, Some(nofile));
        Self {
            child,
            metrics,
            _dir: dir,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    async fn scrape(&self) -> BTreeMap<String, f64> {
        parse_exposition(&http(self.metrics, "GET", "/metrics").await.1)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_ports_on_sixteen_workers_hold_about_one_fd_each() {
    let backend = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    write_services(dir.path(), "idle", 2_000, backend);
    let proxy = Proxy::start(dir, &["--worker-threads", "16"], 20_000);
    let s = settled(proxy.metrics, 2_000, Duration::from_secs(30)).await;
    let ports = listener_ports(&s);
    assert_eq!(ports.len(), 2_000, "every port served");
    assert!(s.iter().all(|v| v["listener_sockets"] == 1));
    let fds = fds_of(proxy.pid());
    // One socket per port, plus the process itself (16 workers: 4 each).
    assert!(fds <= 2_000 * 105 / 100 + 200, "{fds} fds for 2,000 ports");
    for p in ports.iter().step_by(97) {
        assert!(echoes(*p).await, "port {p} answers");
    }
    let m = proxy.scrape().await;
    assert_eq!(
        m.get("kusp_service_ports_unserved{reason=\"fd_limit\"}"),
        Some(&0.0)
    );
    eprintln!(
        "2,000 ports × 16 workers: {fds} fds, RSS {} KiB, connection limit {:?}",
        rss_kib(proxy.pid()),
        m.get("kusp_connection_limit")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_grows_a_socket_per_worker_and_an_idle_one_does_not() {
    let backend = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    write_services(dir.path(), "busy", 1, backend);
    write_services(dir.path(), "idle", 1, backend);
    let mut proxy = Proxy::start(dir, &["--worker-threads", "4"], 4_096);
    let s = settled(proxy.metrics, 2, Duration::from_secs(10)).await;
    let port_of = |s: &[serde_json::Value], name: &str| {
        let view = s.iter().find(|v| v["name"] == name);
        view.and_then(|v| v["listener_port"].as_u64())
            .unwrap_or_else(|| panic!("{name} has no listener: {view:?}")) as u16
    };
    let busy = port_of(&s, "busy-0");
    // Far more than 64 connections within a second, every one answered,
    // those accepted before the growth and those after.
    let clients: Vec<_> = (0..200).map(|_| tokio::spawn(echo_error(busy))).collect();
    let mut failed = Vec::new();
    for c in clients {
        failed.extend(c.await.unwrap());
    }
    let exited = proxy.child.try_wait().ok().flatten();
    assert!(
        exited.is_none(),
        "the proxy exited: {exited:?}; clients: {failed:?}"
    );
    let s = services(proxy.metrics).await;
    let busy_view = s.iter().find(|v| v["name"] == "busy-0");
    assert!(
        failed.is_empty(),
        "every connection answered; {} did not: {:?}; the port: {busy_view:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let sockets = |name: &str| {
        s.iter()
            .find(|v| v["name"] == name)
            .map(|v| v["listener_sockets"].clone())
    };
    assert_eq!(
        sockets("busy-0"),
        Some(4.into()),
        "one per worker; the port: {busy_view:?}; metrics: {:?}",
        proxy
            .scrape()
            .await
            .range("kusp_fd".to_string()..)
            .take(8)
            .collect::<Vec<_>>()
    );
    assert_eq!(sockets("idle-0"), Some(1.into()));
    assert_eq!(port_of(&s, "busy-0"), busy, "same port");
    let m = proxy.scrape().await;
    assert_eq!(m.get("kusp_listener_sockets{namespace=\"scale\",service=\"busy-0\",port=\"tcp\",protocol=\"TCP\"}"), Some(&4.0));
    // Still answers after growing.
    assert!(echoes(busy).await);

    // Long connections are dealt evenly over the workers, however the
    // kernel's hash spread them over the sockets (HAProxy's thr_conn rule),
    // and counted off again when they close.
    let loads = || worker_connections(proxy.metrics, "busy-0");
    let idle = || async {
        let start = Instant::now();
        while loads().await != [0, 0, 0, 0] {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "closed connections still counted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    idle().await;
    let mut long = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(("127.0.0.1", busy)).await.unwrap();
        s.write_all(b"held\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line).await.unwrap();
        assert_eq!(line, "held\n");
        long.push(s);
    }
    let held = loads().await;
    assert_eq!(held.len(), 4, "{held:?}");
    assert_eq!(held.iter().sum::<u64>(), 40, "{held:?}");
    assert!(
        held.iter().all(|&n| (8..=12).contains(&n)),
        "uneven: {held:?}"
    );
    drop(long);
    idle().await;
}

/// The open connections of service `name`'s port on each worker.
async fn worker_connections(metrics: SocketAddr, name: &str) -> Vec<u64> {
    let s = services(metrics).await;
    let v = s.iter().find(|v| v["name"] == name).unwrap();
    v["worker_connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_the_fd_limit_cannot_hold_are_reported_and_the_rest_served() {
    let backend = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    write_services(dir.path(), "many", 600, backend);
    // 400 fds: 140 for the process (2 workers, admin caps), a headroom of
    // 50 kept for pipes and UDP sessions, a floor of 25 connections: 160
    // listeners fit.
    let proxy = Proxy::start(dir, &["--worker-threads", "2"], 400);
    let s = settled(proxy.metrics, 600, Duration::from_secs(30)).await;
    let ports = listener_ports(&s);
    let unserved: Vec<&str> = s.iter().filter_map(|v| v["unserved"].as_str()).collect();
    assert_eq!(ports.len() + unserved.len(), 600);
    assert!(ports.len() == 160, "{} served under 400 fds", ports.len());
    assert!(
        unserved.iter().all(|u| u.starts_with("fd_limit: ")),
        "{unserved:?}"
    );

    // Reported: metric, /healthz, status.
    let m = proxy.scrape().await;
    assert_eq!(
        m.get("kusp_service_ports_unserved{reason=\"fd_limit\"}"),
        Some(&(unserved.len() as f64))
    );
    assert_eq!(m.get("kusp_connection_limit"), Some(&25.0));
    let (_, body) = http(proxy.metrics, "GET", "/debug/services").await;
    assert!(
        body.contains("fd_limit: fd limit: RLIMIT_NOFILE 400"),
        "{body:.300}"
    );

    // The served ports work, and so do connections held open meanwhile.
    let mut held = Vec::new();
    for p in ports.iter().take(10) {
        let s = TcpStream::connect(("127.0.0.1", *p)).await.unwrap();
        held.push(s);
        assert!(echoes(*p).await, "port {p} answers");
    }
    let cpu = cpu_ticks(proxy.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(proxy.pid()) - cpu;
    assert!(
        used < 100,
        "no busy loop while ports stay unserved: {used} ticks in 2 s"
    );
    assert!(fds_of(proxy.pid()) < 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_names_the_unserved_ports() {
    let backend = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    write_services(dir.path(), "many", 300, backend);
    let healthz = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let h = healthz.to_string();
    let proxy = Proxy::start(
        dir,
        &["--worker-threads", "2", "--healthz-bind-address", &h],
        300,
    );
    let s = settled(proxy.metrics, 300, Duration::from_secs(30)).await;
    let unserved = s.iter().filter(|v| !v["unserved"].is_null()).count();
    assert!(unserved > 0);
    let (code, body) = http(healthz, "GET", "/healthz").await;
    assert_eq!(code, 200, "the served ports are healthy: {body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["unservedServicePorts"]["fd_limit"], unserved, "{body}");
}

#[test]
fn an_explicit_connection_limit_the_fd_limit_cannot_hold_is_refused_at_start_up() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kube-userspace-proxy"));
    cmd.arg("--manifests")
        .arg(dir.path())
        .args(["--iptables", "off", "--worker-threads", "2"])
        .args(["--max-connections", "1000"])
        .args(["--metrics-bind-address", "127.0.0.1:0"])
        .args(["--healthz-bind-address", "127.0.0.1:0"])
        .arg("--handover-socket")
        .arg(dir.path().join("h.sock"));
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between
    // fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 1000, 1000)
                .map_err(std::io::Error::from)
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "a configuration error: {err}");
    // 1,000 fds: 140 for the process, 16 kept for listeners: 422 fit.
    for n in [
        "--max-connections 1000",
        "2000 fds",
        "RLIMIT_NOFILE is 1000",
        "140",
        "422",
    ] {
        assert!(err.contains(n), "{n:?} in {err}");
    }
}
