//! Load: 8,000 concurrent proxied connections held for 10 s, each echoing a
//! line at the start and at the end; none fails, and the proxy's fds and
//! RSS return to their baseline afterwards. Client (this test), backend and
//! proxy are three processes: the fd limit is per process (20,000 here), so
//! the proxy must hold two sockets per idle connection and nothing more.

mod common;

use std::time::{Duration, Instant};

use common::procs::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const CONNECTIONS: usize = 8000;
const HOLD: Duration = Duration::from_secs(10);

/// Peer role: echoes lines, one task per connection, until EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a peer process of the load test, started by it"]
async fn echo_peer() {
    if role().is_none() {
        return;
    }
    raise_nofile();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(4096).unwrap();
    socket.set_nonblocking(true).unwrap();
    let l = TcpListener::from_std(socket.into()).unwrap();
    announce(l.local_addr().unwrap());
    loop {
        let Ok((s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends `line` and reads it back.
async fn echo(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    line: &str,
) -> Result<(), String> {
    w.write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    match lines.next_line().await {
        Ok(Some(got)) if got == line => Ok(()),
        other => Err(format!("echo of {line}: {other:?}")),
    }
}

/// Polls `f` for up to `timeout` until it holds.
fn settles(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

type Conn = (
    tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    tokio::net::tcp::OwnedWriteHalf,
);

/// Opens `n` connections that each echo a line, in waves of 500 so the
/// SYN backlog never overflows; panics on any failure.
async fn open_all(addr: std::net::SocketAddr, n: usize) -> Vec<Conn> {
    let mut conns = Vec::with_capacity(n);
    for wave in 0..n.div_ceil(500) {
        let tasks: Vec<_> = (wave * 500..n.min(wave * 500 + 500))
            .map(|i| {
                tokio::spawn(async move {
                    let s = TcpStream::connect(addr)
                        .await
                        .map_err(|e| format!("connect {i}: {e}"))?;
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    echo(&mut lines, &mut w, &format!("hello {i}")).await?;
                    Ok::<_, String>((lines, w))
                })
            })
            .collect();
        for t in tasks {
            conns.push(t.await.unwrap().unwrap());
        }
    }
    conns
}

/// Echoes a last line on each connection, then closes it cleanly; panics
/// if any fails.
async fn close_all(conns: Vec<Conn>) {
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(n, (mut lines, mut w))| {
            tokio::spawn(async move {
                echo(&mut lines, &mut w, &format!("bye {n}")).await?;
                w.shutdown().await.map_err(|e| e.to_string())?;
                match lines.next_line().await {
                    Ok(None) => Ok(()),
                    other => Err(format!("close of {n}: {other:?}")),
                }
            })
        })
        .collect();
    let mut failed = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_thousand_connections_held_then_closed_leave_no_trace() {
    let limit = raise_nofile();
    assert!(
        limit as usize > CONNECTIONS + 100,
        "this test needs RLIMIT_NOFILE > {CONNECTIONS} (hard limit is {limit})"
    );
    let backend = Peer::start("echo_peer", "echo");
    let port = free_port();
    let proxy = ProxyProc::start(
        &service_manifest("load", port, &[backend.addr]),
        port,
        &[],
        None,
    );
    let pid = proxy.pid();

    // Warm up with a smaller burst (lazily made things exist, thread stacks
    // are touched), then let idle pipes and freed memory be released.
    close_all(open_all(proxy.addr, 1000).await).await;
    std::thread::sleep(Duration::from_secs(5));
    let (fds0, rss0) = (fds_of(pid), rss_kib(pid));
    eprintln!("baseline: {fds0} fds, {rss0} KiB RSS");

    let start = Instant::now();
    let conns = open_all(proxy.addr, CONNECTIONS).await;
    let opened = start.elapsed();
    let (fds_peak, rss_peak) = (fds_of(pid), rss_kib(pid));
    eprintln!(
        "{CONNECTIONS} open and echoed in {opened:?}: proxy {fds_peak} fds, {rss_peak} KiB RSS"
    );
    assert!(
        fds_peak >= fds0 + 2 * CONNECTIONS,
        "every connection is proxied: {fds_peak} fds"
    );
    assert!(
        fds_peak <= fds0 + 2 * CONNECTIONS + 64,
        "an idle connection costs two sockets and nothing more: {fds_peak} fds for {CONNECTIONS}"
    );
    tokio::time::sleep(HOLD).await;
    close_all(conns).await;

    let fds_ok = |f: usize| f <= fds0 + (fds0 / 20).max(1);
    let rss_ok = |r: u64| r <= rss0 + rss0 / 20;
    let back = settles(Duration::from_secs(20), || {
        fds_ok(fds_of(pid)) && rss_ok(rss_kib(pid))
    });
    let (fds1, rss1) = (fds_of(pid), rss_kib(pid));
    eprintln!("after: {fds1} fds (baseline {fds0}), {rss1} KiB RSS (baseline {rss0})");
    assert!(
        back,
        "fds {fds0} → {fds1}, RSS {rss0} → {rss1} KiB: not back to baseline ±5%"
    );
}
