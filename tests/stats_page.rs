//! The stats page's data contract, without a browser: the assets and their
//! headers, and the `/debug/services` JSON the page polls (every field the
//! script reads is there, an ejected endpoint has its time left, counters
//! and the clock move between two polls).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kube_userspace_proxy::proxy::CopyMode;
use kube_userspace_proxy::stats_page;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One client connection: sends `hi`, reads the answer to the end.
async fn hit(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hi").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The names the script reads from a document (`doc.x`), a service
/// (`s.x`) and an endpoint (`e.x`).
fn fields_read_by_script(js: &str) -> [Vec<String>; 3] {
    let mut out: [Vec<String>; 3] = Default::default();
    for (i, prefix) in ["doc.", "s.", "e."].iter().enumerate() {
        let mut rest = js;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `s` is also a series (an array) in two helpers.
            if !name.is_empty() && name != "length" && !out[i].contains(&name) {
                out[i].push(name);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_services_carries_what_the_stats_page_draws() {
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let dead = refusing_addr();
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(&mut p, &snapshot("m", &[a, b, dead], None), "m");
    let (admin_addr, stop) = serve_metrics(&p).await;
    let get = || async {
        let (status, head, body) = http_raw(admin_addr, "GET", "/debug/services").await;
        assert!(status.contains(" 200 "), "{status}");
        assert!(head.contains("content-type: application/json"), "{head}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let svc = |doc: &Value| doc["services"][0].clone();
    let endpoint = |doc: &Value, at: std::net::SocketAddr| {
        svc(doc)["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == at.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("no endpoint {at} in {doc}"))
    };

    // A connection's counters are final once the proxy has seen both ends
    // close, a moment after the client has.
    let stats = service(&p, "m");
    let settled = |n: u64| {
        let stats = Arc::clone(&stats);
        async move {
            let done = || {
                stats
                    .stats
                    .completed
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == n
            };
            assert!(
                eventually(Duration::from_secs(5), done).await,
                "{n} completed"
            );
        }
    };
    for _ in 0..10 {
        let got = hit(addr).await;
        assert!(got == "a" || got == "b", "{got}");
    }
    settled(10).await;
    let first = get().await;

    // Every field the script reads is in the document.
    let [doc_fields, svc_fields, ep_fields] =
        fields_read_by_script(include_str!("../src/stats/stats.js"));
    assert!(
        svc_fields.len() > 15 && ep_fields.len() > 8,
        "{svc_fields:?} {ep_fields:?}"
    );
    for f in &doc_fields {
        assert!(
            first.get(f).is_some(),
            "document has no `{f}` the page reads"
        );
    }
    for f in &svc_fields {
        assert!(
            svc(&first).get(f).is_some(),
            "service has no `{f}` the page reads"
        );
    }
    for f in &ep_fields {
        assert!(
            endpoint(&first, a).get(f).is_some(),
            "endpoint has no `{f}` the page reads"
        );
    }

    // Top: iptables state, last sync, the clock rates are computed on.
    assert_eq!(first["iptables"], "off");
    let now1 = first["now_ms"].as_u64().unwrap();
    let sync = first["last_sync_ms"].as_u64().unwrap();
    assert!(sync > 0 && sync <= now1, "last sync {sync}, now {now1}");
    // Flags and listener.
    let s1 = svc(&first);
    assert_eq!(s1["namespace"], "test");
    assert_eq!(s1["listener_port"], addr.port());
    assert_eq!(s1["scheduler"], "rr");
    assert_eq!(s1["proxy_protocol"], "off");
    assert!(s1["affinity_seconds"].is_null());
    // Connect-time histogram: cumulative buckets matching the bounds.
    let le = first["connect_buckets_le"].as_array().unwrap();
    let buckets = s1["connect_buckets"].as_array().unwrap();
    assert_eq!(le.len(), buckets.len());
    assert!(!le.is_empty());
    let counts: Vec<u64> = buckets.iter().map(|b| b.as_u64().unwrap()).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    assert_eq!(s1["connect_count"], 10);
    assert_eq!(*counts.last().unwrap(), 10, "loopback connects take < 2 s");
    // The dead endpoint: refused once, ejected, with time left.
    let d1 = endpoint(&first, dead);
    let left1 = d1["ejected_for_ms"].as_u64().unwrap();
    assert!(left1 > 0 && left1 <= 1000, "ejected for {left1} ms");
    assert_eq!(d1["dial_failures"], 1);
    assert_eq!(d1["ejections"], 1);
    assert_eq!(s1["retries"], 1);
    assert_eq!(endpoint(&first, a)["ejected_for_ms"], 0);
    assert!(endpoint(&first, a)["connect_us"].as_u64().unwrap() > 0);

    // Counters and the clock move; the ejection counts down.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..10 {
        hit(addr).await;
    }
    settled(20).await;
    let second = get().await;
    let s2 = svc(&second);
    assert!(second["now_ms"].as_u64().unwrap() > now1);
    for (field, by) in [
        ("accepted", 10),
        ("completed", 10),
        ("bytes_in", 20),
        ("bytes_out", 10),
    ] {
        let (x, y) = (s1[field].as_u64().unwrap(), s2[field].as_u64().unwrap());
        assert_eq!(y, x + by, "{field}: {x} then {y}");
    }
    let total = |d: &Value| {
        endpoint(d, a)["total"].as_u64().unwrap() + endpoint(d, b)["total"].as_u64().unwrap()
    };
    assert_eq!(total(&second), total(&first) + 10);
    let d2 = endpoint(&second, dead);
    let left2 = d2["ejected_for_ms"].as_u64().unwrap();
    // Unless a slow machine let the back-off end and the dead endpoint be
    // tried (and ejected again, for longer), the time left went down.
    if d2["ejections"] == 1 {
        assert!(
            left2 < left1,
            "ejection did not count down: {left1} then {left2}"
        );
    } else {
        assert!(left2 > 0, "re-ejected: {d2}");
    }
    stop.cancel();
}

#[tokio::test]
async fn page_and_assets_are_served_with_a_strict_csp_and_get_only() {
    let p = proxier(CopyMode::Splice);
    let (admin_addr, stop) = serve_metrics(&p).await;
    let csp = format!(
        "content-security-policy: {}",
        stats_page::CSP.to_ascii_lowercase()
    );
    for (path, kind, needle) in [
        ("/", "text/html", "/stats.js"),
        (
            stats_page::SCRIPT_PATH,
            "text/javascript",
            "/debug/services",
        ),
        (stats_page::STYLE_PATH, "text/css", ".svc"),
    ] {
        let (status, head, body) = http_raw(admin_addr, "GET", path).await;
        assert!(status.contains(" 200 "), "{path}: {status}");
        assert!(
            head.contains(&format!("content-type: {kind}")),
            "{path}: {head}"
        );
        assert!(head.contains(&csp), "{path}: {head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{path}");
        assert!(body.contains(needle), "{path}");
        let (status, _, _) = http_raw(admin_addr, "POST", path).await;
        assert!(status.contains(" 405 "), "POST {path}: {status}");
    }
    // Nothing from another origin is allowed, nothing inline.
    let policy = stats_page::CSP;
    assert!(policy.starts_with("default-src 'none'"));
    for directive in policy.split(';') {
        let d = directive.trim();
        assert!(
            !d.contains("unsafe") && !d.contains('*') && !d.contains(':'),
            "{d}"
        );
    }
    stop.cancel();
}
