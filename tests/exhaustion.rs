//! Out of fds and at `--max-connections`: accept errors back off instead of
//! spinning or crashing, clients wait instead of being reset, a metric
//! counts it, and service resumes when fds free up. The proxy runs as a
//! process of its own, with its fd limit capped.

mod common;

use std::time::Duration;

use common::procs::*;
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// A client that sends a line and waits for its echo (up to `wait`); the
/// connection is handed back open.
fn client(
    addr: std::net::SocketAddr,
    n: usize,
    wait: Duration,
) -> JoinHandle<Result<TcpStream, String>> {
    tokio::spawn(async move {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {n}: {e}"))?;
        s.write_all(format!("hello {n}\n").as_bytes())
            .await
            .map_err(|e| format!("write {n}: {e}"))?;
        let mut line = String::new();
        let mut r = BufReader::new(&mut s);
        match tokio::time::timeout(wait, r.read_line(&mut line)).await {
            Ok(Ok(m)) if m > 0 && line == format!("hello {n}\n") => Ok(s),
            Ok(other) => Err(format!("echo {n}: {other:?} {line:?}")),
            Err(_) => Err(format!("echo {n}: no answer in {wait:?}")),
        }
    })
}

fn sum(m: &std::collections::BTreeMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// How many of `clients` were answered by now.
fn answered(clients: &[JoinHandle<Result<TcpStream, String>>]) -> usize {
    clients.iter().filter(|c| c.is_finished()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_fds_with_no_limit_backs_off_without_spinning_and_resumes() {
    let backend = echo_backend().await;
    let port = free_port();
    let proxy = ProxyProc::start(
        &service_manifest("fds", port, &[backend]),
        port,
        &["--max-connections", "0"],
        Some(64),
    );
    let pid = proxy.pid();
    let base = fds_of(pid);
    eprintln!("proxy starts with {base} of 64 fds");

    // Far more clients than 64 fds can hold: accept fails with EMFILE.
    let clients: Vec<_> = (0..60)
        .map(|n| client(proxy.addr, n, Duration::from_secs(30)))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        eventually(Duration::from_secs(5), || fds_of(pid) >= 60).await,
        "the proxy runs out of fds: {}",
        fds_of(pid)
    );

    // Out of fds for 2 s: the accept loop must sleep, not spin.
    let t0 = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - t0;
    eprintln!("CPU while out of fds: {used} ticks in 2 s");
    assert!(
        used < 50,
        "the proxy spins while out of fds: {used} ticks in 2 s"
    );
    assert!(proxy_alive(&proxy), "the proxy survived fd exhaustion");

    // The clients leave: fds free up and service resumes.
    for c in &clients {
        c.abort();
    }
    drop(clients);
    let mut resumed = false;
    for n in 100..200 {
        if client(proxy.addr, n, Duration::from_secs(2))
            .await
            .unwrap()
            .is_ok()
        {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "service resumes once fds are free");
    for n in 200..220 {
        drop(
            client(proxy.addr, n, Duration::from_secs(5))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let m = proxy.scrape().await;
    let accept_errors = sum(&m, "kusp_accept_errors_total");
    eprintln!("accept errors counted: {accept_errors}");
    assert!(accept_errors > 0.0, "EMFILE on accept is counted");
    assert!(
        eventually(Duration::from_secs(10), || fds_of(pid) <= base + 2).await,
        "fds back to {base}: {}",
        fds_of(pid)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_fd_limit_caps_connections_so_clients_wait_instead_of_failing() {
    let backend = echo_backend().await;
    let port = free_port();
    // 134 fds: the default limit is 25 connections (half the limit for
    // the process itself, a headroom of 16 for pipes and UDP sessions,
    // one listener: see proxy::fds).
    let proxy = ProxyProc::start(
        &service_manifest("capped", port, &[backend]),
        port,
        &[],
        Some(134),
    );
    let mut clients: Vec<_> = (0..40)
        .map(|n| client(proxy.addr, n, Duration::from_secs(60)))
        .collect();
    assert!(eventually(Duration::from_secs(5), || answered(&clients) == 25).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(answered(&clients), 25, "25 at once under 134 fds");
    let m = proxy.scrape().await;
    assert_eq!(m.get("kusp_connection_limit"), Some(&25.0));
    assert_eq!(
        sum(&m, "kusp_accept_errors_total"),
        0.0,
        "the limit keeps accept from EMFILE"
    );
    release_all(&mut clients).await;
}

/// Releases answered clients as they come until all were answered;
/// none may fail.
async fn release_all(clients: &mut Vec<JoinHandle<Result<TcpStream, String>>>) {
    let total = clients.len();
    let mut served = 0;
    while !clients.is_empty() {
        let done: Vec<usize> = (0..clients.len())
            .filter(|&i| clients[i].is_finished())
            .collect();
        for i in done.into_iter().rev() {
            let s = clients.remove(i).await.unwrap().expect("served, not reset");
            drop(s);
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served, total);
}

fn proxy_alive(p: &ProxyProc) -> bool {
    std::path::Path::new(&format!("/proc/{}/stat", p.pid())).exists()
        && !std::fs::read_to_string(format!("/proc/{}/stat", p.pid()))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_leaves_clients_in_the_backlog_not_reset() {
    let backend = echo_backend().await;
    let port = free_port();
    let proxy = ProxyProc::start(
        &service_manifest("cap", port, &[backend]),
        port,
        &["--max-connections", "5"],
        None,
    );
    let mut clients: Vec<_> = (0..20)
        .map(|n| client(proxy.addr, n, Duration::from_secs(30)))
        .collect();
    assert!(eventually(Duration::from_secs(5), || answered(&clients) == 5).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(answered(&clients), 5, "at most 5 served at once");
    let m = proxy.scrape().await;
    assert_eq!(m.get("kusp_connection_limit"), Some(&5.0));
    assert_eq!(m.get("kusp_connection_limit_available"), Some(&0.0));
    assert!(
        m.get("kusp_connection_limit_waits_total")
            .copied()
            .unwrap_or(0.0)
            >= 1.0
    );

    // Release them as they are answered: the waiting ones follow.
    release_all(&mut clients).await;
}
