//! Hand-over to the next process (`--handover-socket`): a second instance
//! started with the same socket path takes the listeners and the open
//! connections over while short connections loop and 1,000 long-lived ones
//! talk both ways (some through PROXY protocol, some half-closed), in each
//! copy mode; nothing is refused or cut, bytes are exact, counters
//! continue, the first one exits 0. Faults: `kill -9` of the new process
//! before and after it serves, of the old one mid hand-over, and a
//! predecessor speaking another version.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Long-lived connections carried through the hand-over.
const LONG: usize = 1000;
/// Every `HALF`-th long connection ends half-closed (client FIN first).
const HALF: usize = 10;

/// Starts a second instance on the same manifests, metrics address and
/// hand-over socket as `proxy`, logging at info; `stall_ms` stalls it
/// between receiving and serving the listeners. Returns the child and a
/// receiver of the instant it logged "serving".
fn successor(
    proxy: &ProxyProc,
    extra: &[&str],
    stall_ms: Option<u64>,
) -> (Child, std::sync::mpsc::Receiver<Instant>) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--manifests")
        .arg(proxy.dir.path())
        .arg("--metrics-bind-address")
        .arg(proxy.metrics.to_string())
        .args([
            "--bind-address",
            "127.0.0.1",
            "--iptables",
            "off",
            "--healthz-bind-address",
            "127.0.0.1:0",
        ])
        .arg("--handover-socket")
        .arg(socket_path(proxy.dir.path()))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(ms) = stall_ms {
        cmd.env("KUSP_HANDOVER_TEST_STALL_MS", ms.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if line.contains("hand-over: serving") || line.contains("serving anyway") {
                let _ = tx.send(Instant::now());
            }
            if line.contains("hand-over") || line.contains("ERROR") {
                eprintln!("successor: {line}");
            }
        }
    });
    (child, rx)
}

fn socket_path(dir: &Path) -> std::path::PathBuf {
    dir.join("handover.sock")
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Sum of every series of metric `name`.
fn total(m: &std::collections::BTreeMap<String, f64>, name: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// A long-lived connection: 1 KiB messages echoed every 200 ms until `stop`,
/// checked byte for byte; then (every `HALF`-th) a half-close whose echo
/// must still arrive in full. Returns (bytes echoed, longest round trip
/// begun after `since` was set).
async fn long_lived(
    addr: SocketAddr,
    i: usize,
    stop: Arc<AtomicBool>,
    pp: bool,
    since: Arc<std::sync::OnceLock<Instant>>,
) -> Result<(u64, Duration), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{i}: connect: {e}"))?;
    if pp {
        // The echo backend returns the PROXY header the proxy sent first.
        s.write_all(b"hi").await.map_err(|e| format!("{i}: {e}"))?;
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\nhi") {
            s.read_exact(&mut b)
                .await
                .map_err(|e| format!("{i}: PROXY header: {e}"))?;
            got.push(b[0]);
            if got.len() > 200 {
                return Err(format!("{i}: no PROXY header"));
            }
        }
        if !got.starts_with(b"PROXY TCP4 127.0.0.1 ") {
            return Err(format!("{i}: header {:?}", String::from_utf8_lossy(&got)));
        }
    }
    let mut total = 0u64;
    let mut longest = Duration::ZERO;
    let mut seq = 0u64;
    let mut back = vec![0u8; 1024];
    while !stop.load(Relaxed) {
        let msg: Vec<u8> = (0..1024u64)
            .map(|k| (k.wrapping_mul(31) ^ seq ^ i as u64) as u8)
            .collect();
        let t = Instant::now();
        s.write_all(&msg)
            .await
            .map_err(|e| format!("{i}: write after {total}: {e}"))?;
        s.read_exact(&mut back)
            .await
            .map_err(|e| format!("{i}: read after {total}: {e}"))?;
        // The longest round trip begun once the hand-over started.
        if since.get().is_some_and(|s| t >= *s) {
            longest = longest.max(t.elapsed());
        }
        if back != msg {
            return Err(format!("{i}: echo differs after {total}"));
        }
        total += 1024;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if i.is_multiple_of(HALF) {
        s.write_all(b"last words")
            .await
            .map_err(|e| format!("{i}: {e}"))?;
        s.shutdown().await.map_err(|e| format!("{i}: {e}"))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .await
            .map_err(|e| format!("{i}: half-closed read: {e}"))?;
        if rest != b"last words" {
            return Err(format!("{i}: half-closed echo {rest:?}"));
        }
    }
    Ok((total, longest))
}

/// `n` bytes of a fixed pattern.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Bytes a half-closed connection gets after its FIN.
const TAIL: usize = 40 * 1024;

/// Backend for half-closed connections: reads until the client's FIN,
/// then sends [`TAIL`] bytes of [`pattern`] 1 KiB every 50 ms (2 s, across
/// the hand-over) and closes.
async fn tail_backend() -> SocketAddr {
    let (l, a) = listener().await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let data = pattern(TAIL);
                for chunk in data.chunks(1024) {
                    if s.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    a
}

/// A connection half-closed by the client before the hand-over, whose
/// backend goes on sending through it.
async fn half_closed(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"bye").await.map_err(|e| e.to_string())?;
    s.shutdown().await.map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .await
        .map_err(|e| format!("half-closed after {} B: {e}", got.len()))?;
    if got != pattern(TAIL) {
        return Err(format!("half-closed: {} B, differs", got.len()));
    }
    Ok(())
}

/// Short connections in a loop until `stop`: (ok, failed).
async fn short_loop(addr: SocketAddr, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>) -> Vec<String> {
    let mut errors = Vec::new();
    while !stop.load(Relaxed) {
        let r = async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"ping").await?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await?;
            if &b != b"ping" {
                return Err(std::io::Error::other("bad echo"));
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        match r {
            Ok(()) => {
                ok.fetch_add(1, Relaxed);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_takes_over_under_traffic_auto() {
    takeover_under_traffic("auto").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_takes_over_under_traffic_copy() {
    takeover_under_traffic("copy").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_takes_over_under_traffic_splice() {
    takeover_under_traffic("splice").await
}

/// Long-lived connections and a loop of short ones through a hand-over in
/// `--copy-mode mode`: the old process hands everything over and exits 0.
async fn takeover_under_traffic(mode: &str) {
    raise_nofile();
    let backend = echo_backend().await;
    let tail = tail_backend().await;
    let (port, pp_port, tail_port) = (free_port(), free_port(), free_port());
    let pp_manifest = service_manifest("pp", pp_port, &[backend]).replacen(
        "  namespace: ns\n",
        "  namespace: ns\n  annotations:\n    kube-userspace-proxy.io/proxy-protocol: v1\n",
        1,
    );
    let manifest = format!(
        "{}\n---\n{pp_manifest}\n---\n{}",
        service_manifest("up", port, &[backend]),
        service_manifest("tail", tail_port, &[tail])
    );
    let mut old = ProxyProc::start(
        &manifest,
        port,
        &["--shutdown-grace", "60s", "--copy-mode", mode],
        None,
    );
    let addr = old.addr;
    let pp_addr = SocketAddr::from(([127, 0, 0, 1], pp_port));
    let tail_addr = SocketAddr::from(([127, 0, 0, 1], tail_port));
    let stop_long = Arc::new(AtomicBool::new(false));
    let since = Arc::new(std::sync::OnceLock::new());
    let stop_short = Arc::new(AtomicBool::new(false));
    let short_ok = Arc::new(AtomicU64::new(0));
    let longs: Vec<_> = (0..LONG)
        .map(|i| {
            // Every 5th through the PROXY-protocol service.
            let (a, pp) = if i % 5 == 1 {
                (pp_addr, true)
            } else {
                (addr, false)
            };
            tokio::spawn(long_lived(
                a,
                i,
                Arc::clone(&stop_long),
                pp,
                Arc::clone(&since),
            ))
        })
        .collect();
    let shorts: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(short_loop(
                addr,
                Arc::clone(&stop_short),
                Arc::clone(&short_ok),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = old.scrape().await;
    let accepted_before = total(&before, "kusp_connections_accepted_total");
    let bytes_before = total(&before, "kusp_bytes_total");
    let backend_bytes_before = total(&before, "kusp_backend_bytes_total");
    let backend_conns_before = total(&before, "kusp_backend_connections_total");
    assert!(accepted_before >= LONG as f64, "{accepted_before}");
    let old_fds = fds_of(old.pid());

    let halves: Vec<_> = (0..20)
        .map(|_| tokio::spawn(half_closed(tail_addr)))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let _ = since.set(t0);
    let (new_child, serving) = successor(&old, &["--copy-mode", mode], None);
    let mut new = ProxyProc {
        child: new_child,
        dir: tempfile::tempdir().unwrap(),
        addr,
        metrics: old.metrics,
    };
    let served_at = serving
        .recv_timeout(Duration::from_secs(20))
        .expect("successor serving");
    let to_serving = served_at - t0;
    // The old one hands its connections over and exits while they go on.
    let status = wait_exit(&mut old.child, Duration::from_secs(10)).expect("old process exits");
    let old_exited = t0.elapsed();
    let _ = old_fds;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = new.scrape().await;
    let accepted_after = total(&after, "kusp_connections_accepted_total");
    assert!(
        accepted_after > accepted_before,
        "counters continue in the new process: {accepted_before} → {accepted_after}"
    );
    assert!(total(&after, "kusp_bytes_total") >= bytes_before);
    assert!(total(&after, "kusp_backend_bytes_total") >= backend_bytes_before);
    assert!(
        total(&after, "kusp_backend_connections_total") >= backend_conns_before,
        "per-endpoint counters continue too"
    );
    assert!(
        total(&after, "kusp_connections_active") >= LONG as f64,
        "carried connections count as open in the new process"
    );

    stop_short.store(true, Relaxed);
    stop_long.store(true, Relaxed);
    let mut errors = Vec::new();
    for s in shorts {
        errors.extend(s.await.unwrap());
    }
    let short_failed = errors.len();
    for h in halves {
        if let Err(e) = h.await.unwrap() {
            errors.push(e);
        }
    }
    let (mut carried, mut bytes, mut longest) = (0, 0u64, Duration::ZERO);
    for l in longs {
        match l.await.unwrap() {
            Ok((b, t)) => {
                carried += 1;
                bytes += b;
                longest = longest.max(t);
            }
            Err(e) => errors.push(e),
        }
    }
    eprintln!(
        "hand-over ({mode}): serving {to_serving:?} after the new process started, old process exited {status} after {old_exited:?}; {} short connections ok, {short_failed} failed; {carried}/{LONG} long connections kept ({bytes} B echoed, longest round trip begun after the new process started {longest:?})",
        short_ok.load(Relaxed)
    );
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(status.code(), Some(0));
    assert_eq!(carried, LONG);
    // The new one serves on, alone.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"more").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"more");
    assert!(new.child.try_wait().unwrap().is_none());
    new.sigterm();
    let status = wait_exit(&mut new.child, Duration::from_secs(20)).expect("new process exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        !socket_path(old.dir.path()).exists(),
        "a plain stop removes the hand-over socket"
    );
}

/// Echoes one message on `s`.
async fn ping(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await?;
    assert_eq!(&b, b"ping");
    Ok(())
}

async fn connect_ok(addr: SocketAddr) -> bool {
    match TcpStream::connect(addr).await {
        Ok(mut s) => ping(&mut s).await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_new_process_before_it_serves_leaves_the_old_one_serving() {
    let backend = echo_backend().await;
    let port = free_port();
    let mut old = ProxyProc::start(
        &service_manifest("k1", port, &[backend]),
        port,
        &["--shutdown-grace", "30s"],
        None,
    );
    let mut long = TcpStream::connect(old.addr).await.unwrap();
    ping(&mut long).await.unwrap();
    // At several points: as it starts (connecting or receiving), while it
    // holds the listeners. It stalls before serving, so both are before.
    for (delay_ms, stall) in [(0, Some(5_000)), (5, Some(5_000)), (300, Some(5_000))] {
        let (mut child, _) = successor(&old, &[], stall);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            old.child.try_wait().unwrap().is_none(),
            "old process still runs"
        );
        assert!(
            connect_ok(old.addr).await,
            "old process serves after kill -9 at {delay_ms} ms"
        );
        ping(&mut long).await.unwrap();
    }
    // The hand-over socket still leads to the old one: a successor works.
    let (child, serving) = successor(&old, &[], None);
    let _new = ProxyProc {
        child,
        dir: tempfile::tempdir().unwrap(),
        addr: old.addr,
        metrics: old.metrics,
    };
    serving
        .recv_timeout(Duration::from_secs(20))
        .expect("successor serving");
    ping(&mut long).await.unwrap();
    assert!(connect_ok(old.addr).await);
    drop(long);
    let status = wait_exit(&mut old.child, Duration::from_secs(20)).expect("old exits");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_new_process_after_it_serves_a_restart_serves_again() {
    let backend = echo_backend().await;
    let port = free_port();
    let mut old = ProxyProc::start(
        &service_manifest("k2", port, &[backend]),
        port,
        &["--shutdown-grace", "30s"],
        None,
    );
    let mut long = TcpStream::connect(old.addr).await.unwrap();
    ping(&mut long).await.unwrap();
    let (mut child, serving) = successor(&old, &[], None);
    serving
        .recv_timeout(Duration::from_secs(20))
        .expect("successor serving");
    child.kill().unwrap();
    child.wait().unwrap();
    // Connections already handed over died with it; ones not yet sent
    // stay with the old process, which drains them.
    // Nobody listens until a restart: it finds a stale socket and binds.
    let (child, _) = successor(&old, &[], None);
    let restarted = ProxyProc {
        child,
        dir: tempfile::tempdir().unwrap(),
        addr: old.addr,
        metrics: old.metrics,
    };
    restarted.wait_listening(Duration::from_secs(10));
    // The old process may still be closing its copies of the listeners
    // (it heard `serving` just before the kill): a connection queued there
    // in those milliseconds is reset, so the restart must serve within 2 s.
    let mut served = false;
    for _ in 0..20 {
        if connect_ok(old.addr).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the restarted proxy serves");
    drop(long);
    let status = wait_exit(&mut old.child, Duration::from_secs(20)).expect("old exits");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_old_process_mid_hand_over_the_new_one_serves() {
    let backend = echo_backend().await;
    let port = free_port();
    let mut old = ProxyProc::start(&service_manifest("k3", port, &[backend]), port, &[], None);
    let (child, serving) = successor(&old, &[], Some(1_000));
    let new = ProxyProc {
        child,
        dir: tempfile::tempdir().unwrap(),
        addr: old.addr,
        metrics: old.metrics,
    };
    // Holding the listeners, not serving yet: the old one dies.
    tokio::time::sleep(Duration::from_millis(400)).await;
    old.child.kill().unwrap();
    old.child.wait().unwrap();
    serving
        .recv_timeout(Duration::from_secs(20))
        .expect("successor serves on its own");
    assert!(connect_ok(new.addr).await);
    let (code, _) = http(new.metrics, "GET", "/metrics").await;
    assert_eq!(code, 200, "admin listener handed over too");
}

#[test]
fn a_predecessor_speaking_another_version_keeps_the_port_and_the_new_process_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(dir.path());
    // A fake predecessor: answers every hello with version 99.
    let l = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).unwrap();
    l.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
    l.listen(4).unwrap();
    std::thread::spawn(move || {
        while let Ok((c, _)) = l.accept() {
            let mut buf = [std::mem::MaybeUninit::new(0u8); 4096];
            let _ = c.recv(&mut buf);
            let _ = c.send(br#"{"type":"welcome","version":99,"pid":1}"#);
        }
    });
    let port = free_port();
    std::fs::write(
        dir.path().join("svc.yaml"),
        service_manifest("v", port, &["127.0.0.1:9".parse().unwrap()]),
    )
    .unwrap();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = ProxyProc::spawn(dir.path(), metrics, &[], None);
    let status = wait_exit(&mut child, Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(1), "a failed hand-over exits 1");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing was bound"
    );
}
