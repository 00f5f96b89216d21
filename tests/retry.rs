//! Retry and passive ejection: dead pods cost clients nothing visible.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use kube_userspace_proxy::proxy::connect::DialResult;
use kube_userspace_proxy::proxy::CopyMode;
use kube_userspace_proxy::proxy::{Proxier, ProxyConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_and_blackholed_endpoints_cost_clients_nothing() {
    let live = named_backend("live").await;
    let refused = refusing_addr();
    let hole = blackhole();
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(
        &mut p,
        &snapshot("retry", &[live, refused, hole.addr], None),
        "retry",
    );

    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 300 / CLIENTS + 1;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..PER_CLIENT {
                if read_all(addr).await.ok().as_deref() == Some("live") {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(
        ok,
        CLIENTS * PER_CLIENT,
        "every client connection reached the live pod"
    );

    let stats = &service(&p, "retry").stats;
    let failed = stats.failed_dials();
    assert!(stats.dials(DialResult::Refused) >= 1);
    assert!(stats.dials(DialResult::Timeout) >= 1);
    // Without ejection two thirds of ~300 first dials would fail (~200).
    // With it, each dead endpoint fails once per back-off window (1s, 2s,
    // 4s, ...) plus the dials already in flight when it was ejected.
    assert!(
        failed <= 3 * CLIENTS as u64 * 2,
        "{failed} failed dials: ejection did not bound them"
    );
    assert_eq!(stats.failed.load(Relaxed), 0);
}

#[tokio::test]
async fn single_endpoint_is_retried_with_longer_timeouts() {
    // One endpoint that refuses: all attempts fail, the client is reset
    // after trying every timeout, and the failure is counted once.
    let refused = refusing_addr();
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(&mut p, &snapshot("one", &[refused], None), "one");
    let r = read_all(addr).await;
    assert!(r.map(|s| s.is_empty()).unwrap_or(true));
    let stats = &service(&p, "one").stats;
    assert!(eventually(Duration::from_secs(3), || stats.failed.load(Relaxed) == 1).await);
    assert_eq!(stats.dials(DialResult::Refused), FAST_TIMEOUTS.len() as u64);
    assert_eq!(stats.retries.load(Relaxed), FAST_TIMEOUTS.len() as u64 - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_dial_never_delays_accepting_others() {
    // Only a blackhole at first: connections wait in their own tasks.
    let hole = blackhole();
    let live = named_backend("live").await;
    // One long attempt: were dials made in the accept loop (as upstream),
    // the four stuck clients would hold the next one up for 4 x 3 s.
    let mut p = Proxier::new(ProxyConfig {
        bind_address: [127, 0, 0, 1].into(),
        dial_timeouts: vec![Duration::from_secs(3)],
        ..ProxyConfig::default()
    });
    let addr = serve(&mut p, &snapshot("slow", &[hole.addr], None), "slow");
    let mut stuck = Vec::new();
    for _ in 0..4 {
        stuck.push(tokio::spawn(read_all(addr)));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A live endpoint arrives: a new client is served at once even though
    // earlier dials are still waiting on the blackhole.
    serve(&mut p, &snapshot("slow", &[live], None), "slow");
    let t = std::time::Instant::now();
    assert_eq!(read_all(addr).await.unwrap(), "live");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "accept was held up: {:?}",
        t.elapsed()
    );
    for s in stuck {
        let _ = s.await;
    }
}
