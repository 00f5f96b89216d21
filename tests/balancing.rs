//! Round-robin, affinity and endpoint updates through real sockets.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kube_userspace_proxy::model::Affinity;
use kube_userspace_proxy::proxy::CopyMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_is_exact_under_concurrency() {
    let backends = [
        named_backend("a").await,
        named_backend("b").await,
        named_backend("c").await,
    ];
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(&mut p, &snapshot("rr", &backends, None), "rr");

    let counts = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let counts = Arc::clone(&counts);
        tasks.push(tokio::spawn(async move {
            for _ in 0..3000 / 16 + 1 {
                let who = read_all(addr).await.unwrap();
                *counts.lock().unwrap().entry(who).or_default() += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    let total: usize = counts.values().sum();
    assert_eq!(total, 16 * (3000 / 16 + 1));
    for (who, n) in &counts {
        assert!(
            n.abs_diff(total / 3) <= 1,
            "{who} got {n} of {total}: {counts:?}"
        );
    }
    assert_eq!(service(&p, "rr").stats.failed_dials(), 0);
}

#[tokio::test]
async fn client_ip_affinity_sticks() {
    let backends = [
        named_backend("a").await,
        named_backend("b").await,
        named_backend("c").await,
    ];
    let mut p = proxier(CopyMode::Splice);
    let aff = Some(Affinity {
        timeout: Duration::from_secs(30),
    });
    let addr = serve(&mut p, &snapshot("aff", &backends, aff), "aff");
    let first = read_all(addr).await.unwrap();
    for _ in 0..20 {
        assert_eq!(read_all(addr).await.unwrap(), first);
    }
}

#[tokio::test]
async fn endpoint_updates_apply_without_dropping_open_connections() {
    let a = echo_backend().await;
    let b = echo_backend().await;
    let c = named_backend("c").await;
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(&mut p, &snapshot("upd", &[a, b], None), "upd");
    let port_before = addr.port();

    // Two open connections, one on each endpoint.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        open.push(s);
    }

    // Replace both endpoints with `c`.
    let addr2 = serve(&mut p, &snapshot("upd", &[c], None), "upd");
    assert_eq!(addr2.port(), port_before, "listener kept");
    for _ in 0..10 {
        assert_eq!(
            read_all(addr).await.unwrap(),
            "c",
            "removed endpoints get no new traffic"
        );
    }
    // The old connections still work.
    for s in &mut open {
        s.write_all(b"pong").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    // An added endpoint starts getting traffic.
    let d = named_backend("d").await;
    serve(&mut p, &snapshot("upd", &[c, d], None), "upd");
    let mut seen = HashMap::<String, usize>::new();
    for _ in 0..10 {
        *seen.entry(read_all(addr).await.unwrap()).or_default() += 1;
    }
    assert_eq!(seen.get("c"), Some(&5));
    assert_eq!(seen.get("d"), Some(&5));

    // Removing the service closes the listener; open connections go on.
    p.sync(&Default::default());
    assert!(
        eventually(Duration::from_secs(2), || std::net::TcpStream::connect(
            addr
        )
        .is_err())
        .await
    );
    for s in &mut open {
        s.write_all(b"last").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"last");
    }
}

/// No endpoint anywhere: the listener stops listening, so the kernel
/// refuses clients as upstream's REJECT does; endpoints coming back make
/// it listen again on the same port.
#[tokio::test]
async fn no_endpoints_refuses_the_client_until_endpoints_come() {
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(&mut p, &snapshot("empty", &[], None), "empty");
    for _ in 0..3 {
        let e = read_all(addr).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    assert_eq!(service(&p, "empty").routing().reason, "no endpoints");
    let backend = named_backend("back").await;
    assert_eq!(
        serve(&mut p, &snapshot("empty", &[backend], None), "empty"),
        addr
    );
    for _ in 0..3 {
        assert_eq!(read_all(addr).await.unwrap(), "back");
    }
    p.sync(&snapshot("empty", &[], None));
    let e = read_all(addr).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
}

/// Every endpoint dead (but present): clients are accepted, every dial
/// fails, and the client is reset, counted as failed.
#[tokio::test]
async fn dead_endpoints_reset_the_client() {
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(&mut p, &snapshot("dead", &[refusing_addr()], None), "dead");
    let r = read_all(addr).await;
    match r {
        Ok(s) => assert!(s.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    let svc = service(&p, "dead");
    assert!(
        eventually(Duration::from_secs(2), || svc.stats.failed.load(Relaxed)
            == 1)
        .await
    );
}

#[tokio::test]
async fn unbindable_node_port_is_reported_and_retried() {
    let (blocker, taken) = listener().await;
    let backend = named_backend("a").await;
    let mut snap = snapshot("np", &[backend], None);
    snap.services.values_mut().next().unwrap().port.node_port = Some(taken.port());
    let mut p = proxier(CopyMode::Splice);
    let other = snapshot("other", &[backend], None);
    snap.services.extend(other.services);
    let r = p.sync(&snap);
    assert_eq!(r.pending, 1, "the blocked nodePort waits");
    assert_eq!(r.listening, 1, "other services are unaffected");
    assert_eq!(service(&p, "np").stats.bind_failures.load(Relaxed), 1);
    drop(blocker);
    let r = p.sync(&snap);
    assert_eq!(r.pending, 0);
    assert_eq!(p.listener_port(&svc_name("np")), Some(taken.port()));
    assert_eq!(read_all(localhost(taken.port())).await.unwrap(), "a");
}

/// `internalTrafficPolicy: Local` (upstream's `CategorizeEndpoints`):
/// ClusterIP traffic reaches this node's endpoints only; a client that
/// dialled the listener itself on a port with a nodePort is external
/// traffic, served from every endpoint (`externalTrafficPolicy: Cluster`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_policy_local_keeps_clusterip_traffic_on_this_node() {
    let here = named_backend("here").await;
    let there = named_backend("ther").await;
    let mut p = proxier(CopyMode::Splice);
    let split = |node_port: Option<u16>| {
        let mut snap = snapshot("split", &[here, there], None);
        snap.node.name = Some("n1".into());
        for e in snap.services.values_mut() {
            e.port.internal_local = true;
            e.port.node_port = node_port;
            for ep in &mut e.endpoints {
                ep.node_name = Some(if ep.addr == here { "n1" } else { "n2" }.into());
            }
        }
        recategorize(snap)
    };
    // ClusterIP only: every client is internal traffic.
    let addr = serve(&mut p, &split(None), "split");
    for _ in 0..6 {
        assert_eq!(read_all(addr).await.unwrap(), "here");
    }
    let v = service(&p, "split");
    assert_eq!(v.routing().reason, "node-local");
    // With a nodePort, the listener's own port is external traffic.
    let np = procs::free_port();
    let addr = serve(&mut p, &split(Some(np)), "split");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(read_all(addr).await.unwrap());
    }
    assert_eq!(seen, ["here".to_string(), "ther".to_string()].into());
}
