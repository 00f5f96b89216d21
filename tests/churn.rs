//! Churn: endpoints flap every 50 ms while 50 clients loop for 5 s. No
//! panic, no connection to a removed endpoint started after its removal
//! was applied, open connections to removed endpoints are not cut (the
//! legacy behaviour), and no completed connection loses a byte.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kube_userspace_proxy::proxy::CopyMode;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BACKENDS: usize = 6;
/// Endpoints absent at each step: each one is out for this many steps.
const ABSENT: usize = 3;
const STEP: Duration = Duration::from_millis(50);
const RUN: Duration = Duration::from_secs(5);
/// A dial picked just before a removal may reach the backend just after:
/// accepts later than this after the removal count as violations.
const SLACK: Duration = Duration::from_millis(50);

/// An echo backend on its own OS threads (blocking accept), so accept
/// times are not delayed by the test's async runtime; returns its address
/// and the time of every accept.
fn threaded_echo_backend() -> (SocketAddr, Arc<Mutex<Vec<Instant>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let accepts = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&accepts);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            log.lock().unwrap().push(Instant::now());
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    if s.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    (addr, accepts)
}

/// One request/response exchange per line on a fresh connection.
async fn session(addr: SocketAddr, id: usize, lines: usize, pause: Duration) -> Result<(), String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{id}: connect: {e}"))?;
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::new(r).lines();
    for i in 0..lines {
        let line = format!("client {id} line {i} {}", "x".repeat(i * 37 % 500));
        w.write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|e| format!("{id}: write: {e}"))?;
        match r.next_line().await {
            Ok(Some(back)) if back == line => {}
            other => return Err(format!("{id}: line {i}: {other:?}")),
        }
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_endpoints_never_get_new_connections_and_lose_no_bytes() {
    let backends: Vec<_> = (0..BACKENDS).map(|_| threaded_echo_backend()).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|(a, _)| *a).collect();
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(&mut p, &snapshot("churn", &addrs, None), "churn");

    // Long connections opened before the flapping: they outlive removals.
    let long: Vec<_> = (0..5)
        .map(|id| tokio::spawn(session(addr, 1000 + id, 40, Duration::from_millis(100))))
        .collect();
    let end = Instant::now() + RUN;
    let clients: Vec<_> = (0..50)
        .map(|id| {
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < end {
                    session(addr, id, 3, Duration::from_millis(5)).await?;
                    done += 1;
                }
                Ok::<_, String>(done)
            })
        })
        .collect();

    // removals[i]: (applied at, re-added at) for backend i.
    let mut removals: Vec<Vec<(Instant, Option<Instant>)>> = vec![Vec::new(); BACKENDS];
    let mut absent = [false; BACKENDS];
    let mut step = 0;
    while Instant::now() < end {
        let out: Vec<usize> = (0..ABSENT).map(|k| (step + k) % BACKENDS).collect();
        let present: Vec<SocketAddr> = (0..BACKENDS)
            .filter(|i| !out.contains(i))
            .map(|i| addrs[i])
            .collect();
        let syncing = Instant::now();
        p.sync(&snapshot("churn", &present, None));
        let applied = Instant::now();
        for i in 0..BACKENDS {
            match (absent[i], out.contains(&i)) {
                (false, true) => removals[i].push((applied, None)),
                (true, false) => {
                    if let Some(last) = removals[i].last_mut() {
                        // Re-added: connections may start once sync begins.
                        last.1 = Some(syncing);
                    }
                }
                _ => {}
            }
            absent[i] = out.contains(&i);
        }
        step += 1;
        tokio::time::sleep(STEP).await;
    }

    let mut completed = 0;
    let mut errors = Vec::new();
    for c in clients {
        match c.await.expect("no panic") {
            Ok(n) => completed += n,
            Err(e) => errors.push(e),
        }
    }
    for c in long {
        if let Err(e) = c.await.expect("no panic") {
            errors.push(format!("long connection cut: {e}"));
        }
    }
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );

    let mut violations = Vec::new();
    let mut checked = 0;
    for (i, (_, accepts)) in backends.iter().enumerate() {
        let accepts = accepts.lock().unwrap();
        for &(removed, readded) in &removals[i] {
            let from = removed + SLACK;
            let to = readded.unwrap_or_else(Instant::now);
            checked += 1;
            for &t in accepts.iter() {
                if t > from && t < to {
                    violations.push(format!(
                        "backend {i}: accepted {:?} after its removal",
                        t - removed
                    ));
                }
            }
        }
    }
    eprintln!(
        "{step} endpoint changes, {checked} removals checked, {completed} sessions completed, {} violations",
        violations.len()
    );
    assert!(completed > 100, "clients made progress: {completed}");
    assert!(violations.is_empty(), "{violations:?}");
}
