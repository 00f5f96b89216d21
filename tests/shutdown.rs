//! Graceful shutdown of the binary: SIGTERM while 100 bulk transfers run
//! closes the listeners at once and lets every transfer finish, then exits
//! 0; a second SIGTERM exits at once; after kill -9 a restart listens
//! again at once. (Rule removal on SIGTERM and a single set of rules after
//! kill -9 are covered in tests/iptables_netns.rs.)

mod common;

use std::time::{Duration, Instant};

use common::procs::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TRANSFERS: usize = 100;
const BYTES: usize = 4_000_000;

/// Waits for `child` to exit, up to `timeout`; its status.
fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_listeners_at_once_and_lets_100_transfers_finish() {
    let backend = bulk_backend().await;
    let port = free_port();
    let mut proxy = ProxyProc::start(
        &service_manifest("bulk", port, &[backend]),
        port,
        &["--shutdown-grace", "60s"],
        None,
    );
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(TRANSFERS);
    let transfers: Vec<_> = (0..TRANSFERS)
        .map(|_| {
            let (mut go, ready) = (go_rx.clone(), ready_tx.clone());
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                s.write_all(format!("source {BYTES}\n").as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut h = StreamHash::default();
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0;
                // Part of it, then wait: the transfer is mid-flight at SIGTERM.
                while got < 256 * 1024 {
                    let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err(format!("EOF after {got}"));
                    }
                    std::hash::Hasher::write(&mut h, &buf[..n]);
                    got += n;
                }
                let _ = ready.send(()).await;
                let _ = go.wait_for(|go| *go).await;
                loop {
                    let n = s
                        .read(&mut buf)
                        .await
                        .map_err(|e| format!("after {got}: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    std::hash::Hasher::write(&mut h, &buf[..n]);
                    got += n;
                }
                if got != BYTES || std::hash::Hasher::finish(&h) != pattern_hash(BYTES) {
                    return Err(format!("{got} bytes, hash mismatch or short"));
                }
                Ok(())
            })
        })
        .collect();
    for _ in 0..TRANSFERS {
        ready_rx.recv().await.unwrap();
    }

    proxy.sigterm();
    let t0 = Instant::now();
    let mut refused_after = None;
    while t0.elapsed() < Duration::from_secs(5) {
        // Reset: it was in the backlog as the listener closed.
        if let Err(e) = TcpStream::connect(proxy.addr).await {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                refused_after = Some(t0.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused_after = refused_after.expect("listener closed after SIGTERM");
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "still draining the transfers"
    );

    go_tx.send(true).unwrap();
    let mut errors = Vec::new();
    for t in transfers {
        if let Err(e) = t.await.unwrap() {
            errors.push(e);
        }
    }
    assert!(
        errors.is_empty(),
        "{} transfers broken: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let status =
        wait_exit(&mut proxy.child, Duration::from_secs(30)).expect("exits after the drain");
    let exited_after = t0.elapsed();
    eprintln!(
        "SIGTERM: listener refused after {refused_after:?}; {TRANSFERS} × {BYTES} B finished; exit {status} after {exited_after:?}"
    );
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let (l, backend) = listener().await;
    // A backend that holds every connection open and silent.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let port = free_port();
    let mut proxy = ProxyProc::start(
        &service_manifest("held", port, &[backend]),
        port,
        &["--shutdown-grace", "60s"],
        None,
    );
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.sigterm();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "draining for up to 60 s"
    );
    proxy.sigterm();
    let t0 = Instant::now();
    let status =
        wait_exit(&mut proxy.child, Duration::from_secs(5)).expect("second SIGTERM exits at once");
    eprintln!("second SIGTERM: exit {status} after {:?}", t0.elapsed());
    drop(s);
}

#[test]
fn after_kill_9_a_restart_listens_again_at_once() {
    let (l, backend) = std::net::TcpListener::bind("127.0.0.1:0")
        .map(|l| {
            let a = l.local_addr().unwrap();
            (l, a)
        })
        .unwrap();
    let port = free_port();
    let mut proxy = ProxyProc::start(
        &service_manifest("again", port, &[backend]),
        port,
        &[],
        None,
    );
    proxy.child.kill().unwrap();
    proxy.child.wait().unwrap();
    let t0 = Instant::now();
    proxy.child = ProxyProc::spawn(proxy.dir.path(), proxy.metrics, &[], None);
    let took = proxy.wait_listening(Duration::from_secs(10));
    eprintln!(
        "restart after kill -9: listening after {took:?} ({:?} since spawn)",
        t0.elapsed()
    );
    assert!(took < Duration::from_secs(5), "listening again: {took:?}");
    drop(l);
}
