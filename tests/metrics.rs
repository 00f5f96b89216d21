//! Observability: exact counters on /metrics, series removed with their
//! service, health and readiness endpoints, read-only admin.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use kube_userspace_proxy::admin::{self, Health};
use kube_userspace_proxy::proxy::CopyMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const LABELS: &str = "namespace=\"test\",service=\"m\",port=\"p\",protocol=\"TCP\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_and_vanish_with_their_service() {
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let dead = refusing_addr();
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(&mut p, &snapshot("m", &[a, b, dead], None), "m");
    let (admin_addr, stop) = serve_metrics(&p).await;

    const N: usize = 30;
    for _ in 0..N {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"hi!").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out == "a" || out == "b", "{out}");
    }
    let scrape = || async {
        let (code, body) = http(admin_addr, "GET", "/metrics").await;
        assert_eq!(code, 200);
        parse_exposition(&body)
    };
    let svc = service(&p, "m");
    // A connection counts as completed when its `Connection` drops and stops
    // being active a moment later, when its task ends: wait for both.
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(3), || load(&svc.stats.completed)
            == N as u64
            && load(&svc.stats.active) == 0)
        .await
    );
    let m = scrape().await;
    let get = |name: &str, extra: &str| {
        let key = if extra.is_empty() {
            format!("{name}{{{LABELS}}}")
        } else {
            format!("{name}{{{LABELS},{extra}}}")
        };
        *m.get(&key).unwrap_or_else(|| panic!("missing {key}"))
    };
    assert_eq!(get("kusp_connections_accepted_total", ""), N as f64);
    assert_eq!(get("kusp_connections_completed_total", ""), N as f64);
    assert_eq!(get("kusp_connections_active", ""), 0.0);
    assert_eq!(get("kusp_connections_failed_total", ""), 0.0);
    assert_eq!(get("kusp_dial_attempts_total", "result=\"ok\""), N as f64);
    // The dead endpoint fails once, then sits out its 1 s ejection.
    assert_eq!(get("kusp_dial_attempts_total", "result=\"refused\""), 1.0);
    assert_eq!(get("kusp_dial_retries_total", ""), 1.0);
    assert_eq!(
        get("kusp_bytes_total", "direction=\"client_to_backend\""),
        3.0 * N as f64
    );
    assert_eq!(
        get("kusp_bytes_total", "direction=\"backend_to_client\""),
        N as f64
    );
    assert_eq!(get("kusp_connect_duration_seconds_count", ""), N as f64);
    assert_eq!(
        get("kusp_connect_duration_seconds_bucket", "le=\"+Inf\""),
        N as f64
    );
    let per_backend = |e: std::net::SocketAddr| {
        get(
            "kusp_backend_connections_total",
            &format!("endpoint=\"{e}\""),
        )
    };
    assert_eq!(per_backend(a) + per_backend(b), N as f64);
    assert!((per_backend(a) - per_backend(b)).abs() <= 1.0);
    assert_eq!(
        get(
            "kusp_backend_dial_failures_total",
            &format!("endpoint=\"{dead}\"")
        ),
        1.0
    );
    assert_eq!(
        get(
            "kusp_backend_ejections_total",
            &format!("endpoint=\"{dead}\"")
        ),
        1.0
    );
    assert!(
        m.keys()
            .all(|k| !k.contains("127.0.0.1:") || k.contains("endpoint=")),
        "no client addresses"
    );
    assert!(m.contains_key("process_open_fds"));
    // Workers in `auto` (the default) say how long each idle policy ran.
    for policy in ["sleep", "yield"] {
        let k = format!("kusp_worker_idle_policy_seconds_total{{policy=\"{policy}\"}}");
        assert!(m.contains_key(&k), "{k}");
    }
    assert!(m.contains_key("kusp_worker_idle_switches_total"));

    // Delete the service: every series of it is gone from the next scrape.
    p.sync(&Default::default());
    let m = scrape().await;
    assert!(m.keys().all(|k| !k.contains("service=\"m\"")), "{m:#?}");

    // /debug/services is GET-only.
    let (code, _) = http(admin_addr, "POST", "/metrics").await;
    assert_eq!(code, 405);
    let (code, _) = http(admin_addr, "DELETE", "/debug/services").await;
    assert_eq!(code, 405);
    stop.cancel();
}

#[tokio::test]
async fn healthz_and_readyz_follow_the_sync_loop() {
    let p = proxier(CopyMode::Splice);
    let health = Arc::new(Health::new(Duration::from_secs(1)));
    let state = admin_state(&p, Arc::clone(&health));
    let stop = CancellationToken::new();
    let addr = admin::spawn(
        localhost(0),
        admin::AdminListener::Healthz,
        admin::healthz_router(state),
        stop.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        http(addr, "GET", "/readyz").await.0,
        503,
        "not ready before a snapshot"
    );
    assert_eq!(http(addr, "GET", "/livez").await.0, 200);
    health.updated();
    assert_eq!(http(addr, "GET", "/readyz").await.0, 200);
    let (code, body) = http(addr, "GET", "/healthz").await;
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    for key in ["lastUpdated", "currentTime", "nodeEligible", "healthy"] {
        assert!(doc.get(key).is_some(), "{key} in {body}");
    }
    // A change queued and not applied within twice the period: 503, on
    // /livez too; applied: 200 again.
    health.queued_update_at(SystemTime::now() - Duration::from_secs(3));
    assert_eq!(http(addr, "GET", "/healthz").await.0, 503);
    assert_eq!(http(addr, "GET", "/livez").await.0, 503);
    health.updated();
    assert_eq!(http(addr, "GET", "/healthz").await.0, 200);
    assert_eq!(http(addr, "GET", "/livez").await.0, 200);
    assert_eq!(http(addr, "PUT", "/healthz").await.0, 405);
    stop.cancel();
}
