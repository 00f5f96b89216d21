//! UDP service ports: sessions per client, round-robin by session, retry
//! on ICMP refused, idle expiry, 64 KiB datagrams, the session cap.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kube_userspace_proxy::proxy::{Proxier, ProxyConfig, Service};
use tokio::net::UdpSocket;

fn udp_proxier(timeout: Duration, max_sessions: usize) -> Proxier {
    Proxier::new(ProxyConfig {
        bind_address: [127, 0, 0, 1].into(),
        udp_timeout: timeout,
        udp_max_sessions: max_sessions,
        ..ProxyConfig::default()
    })
}

fn serve_udp(
    p: &mut Proxier,
    snap: &kube_userspace_proxy::model::Snapshot,
    name: &str,
) -> (SocketAddr, Arc<Service>) {
    p.sync(snap);
    let port = p
        .listener_port(&udp_name(name))
        .expect("udp listener bound");
    let svc = p
        .services()
        .find(|(s, _, _)| s.name == udp_name(name))
        .map(|(s, _, _)| Arc::clone(s))
        .unwrap();
    (localhost(port), svc)
}

/// Sends `msg` and waits for one answer (None on timeout).
async fn ask(sock: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    sock.send_to(msg, to).await.unwrap();
    let mut buf = vec![0u8; 70000];
    match tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            assert_eq!(from, to, "reply comes from the service address");
            Some(buf[..n].to_vec())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_round_robin_and_every_query_is_answered() {
    let backends = [
        udp_echo_backend("a").await,
        udp_echo_backend("b").await,
        udp_echo_backend("c").await,
    ];
    let mut p = udp_proxier(Duration::from_secs(5), 1000);
    let (addr, svc) = serve_udp(&mut p, &udp_snapshot("dns", &backends), "dns");
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    for round in 0..10 {
        for (i, c) in clients.iter().enumerate() {
            let q = format!("q{round}-{i}");
            let a = ask(c, addr, q.as_bytes()).await.expect("answered");
            let a = String::from_utf8(a).unwrap();
            let (who, echoed) = a.split_once(':').unwrap();
            assert_eq!(echoed, q);
            *per_backend.entry(who.to_string()).or_default() += 1;
        }
    }
    assert_eq!(per_backend.values().sum::<usize>(), 300);
    for (who, n) in &per_backend {
        assert_eq!(
            *n, 100,
            "{who}: sessions stick to one backend, spread evenly: {per_backend:?}"
        );
    }
    assert_eq!(
        svc.stats.accepted.load(Relaxed),
        30,
        "one session per client"
    );
    assert_eq!(svc.stats.datagrams_in.load(Relaxed), 300);
    assert_eq!(svc.stats.datagrams_out.load(Relaxed), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_backend_port_costs_no_query_and_is_ejected() {
    let a = udp_echo_backend("a").await;
    let b = udp_echo_backend("b").await;
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let mut p = udp_proxier(Duration::from_secs(5), 1000);
    let (addr, svc) = serve_udp(&mut p, &udp_snapshot("dns", &[a, b, dead]), "dns");
    let mut answered = 0;
    for i in 0..30 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if ask(&c, addr, format!("x{i}").as_bytes()).await.is_some() {
            answered += 1;
        }
    }
    assert_eq!(answered, 30, "every query answered through retry");
    let ejections: u64 = svc
        .balancer
        .endpoints()
        .iter()
        .filter(|(e, _)| e.addr == dead)
        .map(|(_, b)| b.ejections.load(Relaxed))
        .sum();
    assert!(ejections >= 1, "the dead backend was ejected");
    assert!(svc.stats.retries.load(Relaxed) >= 1);
    // Ejection keeps later sessions off it: far fewer refusals than 1 in 3.
    assert!(
        svc.stats
            .dials(kube_userspace_proxy::proxy::connect::DialResult::Refused)
            <= 3
    );
}

#[tokio::test]
async fn idle_sessions_expire() {
    let a = udp_echo_backend("a").await;
    let mut p = udp_proxier(Duration::from_millis(200), 1000);
    let (addr, svc) = serve_udp(&mut p, &udp_snapshot("dns", &[a]), "dns");
    for _ in 0..5 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert!(ask(&c, addr, b"hi").await.is_some());
    }
    assert_eq!(svc.stats.active.load(Relaxed), 5);
    assert!(
        eventually(Duration::from_secs(3), || svc.stats.active.load(Relaxed)
            == 0)
        .await
    );
    assert_eq!(svc.stats.sessions_expired.load(Relaxed), 5);
}

#[tokio::test]
async fn a_64_kib_datagram_passes_intact() {
    let a = udp_echo_backend("a").await;
    let mut p = udp_proxier(Duration::from_secs(5), 1000);
    let (addr, _) = serve_udp(&mut p, &udp_snapshot("big", &[a]), "big");
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // The largest IPv4 UDP payload, less the backend's 2-byte "a:" prefix.
    let mut msg = vec![0u8; 65507 - 2];
    pattern_chunk(7, &mut msg);
    let got = ask(&c, addr, &msg).await.expect("answered");
    assert_eq!(got.len(), 65507);
    assert_eq!(&got[2..], &msg[..]);
}

#[tokio::test]
async fn the_session_cap_drops_new_clients_only() {
    let a = udp_echo_backend("a").await;
    let mut p = udp_proxier(Duration::from_secs(5), 3);
    let (addr, svc) = serve_udp(&mut p, &udp_snapshot("cap", &[a]), "cap");
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert!(ask(&c, addr, b"in").await.is_some());
        clients.push(c);
    }
    let extra = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    extra.send_to(b"over", addr).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), extra.recv_from(&mut buf))
            .await
            .is_err(),
        "over the cap: dropped"
    );
    assert_eq!(svc.stats.sessions_dropped.load(Relaxed), 1);
    for c in &clients {
        assert!(
            ask(c, addr, b"still").await.is_some(),
            "existing sessions keep working"
        );
    }
}

#[tokio::test]
async fn removing_an_endpoint_closes_its_sessions_and_removing_the_service_the_listener() {
    let a = udp_echo_backend("a").await;
    let b = udp_echo_backend("b").await;
    let mut p = udp_proxier(Duration::from_secs(30), 1000);
    let (addr, svc) = serve_udp(&mut p, &udp_snapshot("rm", &[a, b]), "rm");
    let c1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let c2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let first = ask(&c1, addr, b"1").await.unwrap();
    ask(&c2, addr, b"2").await.unwrap();
    assert_eq!(svc.stats.active.load(Relaxed), 2);
    // Keep only the other backend: the session on the removed one ends.
    let keep = if first.starts_with(b"a:") { b } else { a };
    p.sync(&udp_snapshot("rm", &[keep]));
    assert!(
        eventually(Duration::from_secs(2), || svc.stats.active.load(Relaxed)
            == 1)
        .await
    );
    let again = ask(&c1, addr, b"3").await.unwrap();
    assert!(
        !again.starts_with(&first[..2]),
        "moved to the remaining backend"
    );
    p.sync(&Default::default());
    assert!(
        eventually(Duration::from_secs(2), || svc.stats.active.load(Relaxed)
            == 0)
        .await
    );
    assert!(ask(&c2, addr, b"4").await.is_none(), "listener closed");
}
