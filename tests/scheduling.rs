//! Schedulers through real sockets: load-aware ones steer new connections
//! away from a backend holding many, `sh` keeps a client IP on one backend,
//! every scheduler retries past a dead endpoint, and the annotation is
//! applied, swapped in place and falls back when unknown.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use kube_userspace_proxy::discovery::manifests;
use kube_userspace_proxy::model::{Scheduler, Setting, Snapshot};
use kube_userspace_proxy::proxy::CopyMode;
use kube_userspace_proxy::proxy::{Proxier, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// `snapshot` with the scheduler annotation set to `s`.
fn sched_snapshot(name: &str, endpoints: &[SocketAddr], s: Scheduler) -> Snapshot {
    let mut snap = snapshot(name, endpoints, None);
    for e in snap.services.values_mut() {
        e.port.scheduler = Setting::Set(s);
    }
    recategorize(snap)
}

/// Connects to `to` from the loopback address 127.0.0.`last`: a distinct
/// client IP without any setup (all of 127/8 is local).
async fn connect_from(last: u8, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from(([127, 0, 0, last], 0)))?;
    s.connect(to).await
}

/// Reads the 4-byte backend name a [`named_backend`] or [`holding_backend`] sends.
async fn name_of(mut s: TcpStream) -> String {
    read_name(&mut s).await
}

/// As [`name_of`], the connection kept.
async fn read_name(s: &mut TcpStream) -> String {
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("backend answered in time")
        .expect("backend answered");
    String::from_utf8_lossy(&buf).into_owned()
}

/// A backend that sends `name` and then holds the connection for `hold`:
/// a slow backend, busy with long requests.
async fn holding_backend(name: &'static str, hold: Duration) -> SocketAddr {
    let (l, a) = listener().await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                tokio::time::sleep(hold).await;
            });
        }
    });
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_aware_schedulers_send_fewer_new_connections_to_a_backend_holding_many() {
    const N: usize = 40;
    let mut slow_share = BTreeMap::new();
    for s in [
        Scheduler::Rr,
        Scheduler::Lc,
        Scheduler::Sed,
        Scheduler::Nq,
        Scheduler::P2c,
    ] {
        // Fresh backends per scheduler: nothing held from the previous round.
        let slow = holding_backend("slow", Duration::from_secs(5)).await;
        let fast = named_backend("fast").await;
        let mut p = proxier(CopyMode::Splice);
        let addr = serve(&mut p, &sched_snapshot("lc", &[slow, fast], s), "lc");
        let mut slow_n = 0;
        for _ in 0..N {
            let c = TcpStream::connect(addr).await.unwrap();
            if name_of(c).await == "slow" {
                slow_n += 1;
            }
            // Let the fast backend's connection finish before the next one.
            let svc = service(&p, "lc");
            eventually(Duration::from_secs(2), || {
                svc.balancer
                    .endpoints()
                    .iter()
                    .find(|(e, _)| e.addr == fast)
                    .is_some_and(|(_, b)| b.active.load(Relaxed) == 0)
            })
            .await;
        }
        slow_share.insert(s.as_str(), slow_n);
        p.close_listeners();
    }
    // Round-robin ignores load: half go to the slow backend.
    assert_eq!(slow_share["rr"], N / 2, "{slow_share:?}");
    // lc, nq and p2c decide on counts alone: the busy backend gets one at
    // most (the first, when both are idle).
    for s in ["lc", "nq", "p2c"] {
        assert!(
            slow_share[s] <= 2,
            "{s} sent {} of {N} to the busy backend: {slow_share:?}",
            slow_share[s]
        );
    }
    // sed also weighs measured connect times, which jitter on a loaded
    // machine (a slow loopback connect can make the idle backend look far
    // away): fewer than round-robin. The unit tests pin its arithmetic.
    assert!(slow_share["sed"] < N / 2, "{slow_share:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sh_keeps_each_client_ip_on_one_backend_and_spreads_ips() {
    let backends = [
        named_backend("aaaa").await,
        named_backend("bbbb").await,
        named_backend("cccc").await,
    ];
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(
        &mut p,
        &sched_snapshot("sh", &backends, Scheduler::Sh),
        "sh",
    );
    let mut by_ip: BTreeMap<u8, BTreeSet<String>> = BTreeMap::new();
    for round in 0..3 {
        for last in 2..42u8 {
            let c = connect_from(last, addr).await.unwrap();
            by_ip.entry(last).or_default().insert(name_of(c).await);
        }
        assert!(round < 3);
    }
    for (ip, names) in &by_ip {
        assert_eq!(names.len(), 1, "127.0.0.{ip} went to {names:?}");
    }
    let used: BTreeSet<&String> = by_ip.values().flatten().collect();
    assert_eq!(
        used.len(),
        3,
        "40 client IPs reach every backend: {by_ip:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reaches_every_backend() {
    let backends = [
        named_backend("aaaa").await,
        named_backend("bbbb").await,
        named_backend("cccc").await,
    ];
    let mut p = proxier(CopyMode::Copy);
    let addr = serve(
        &mut p,
        &sched_snapshot("rnd", &backends, Scheduler::Random),
        "rnd",
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..90 {
        let c = TcpStream::connect(addr).await.unwrap();
        *counts.entry(name_of(c).await).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|n| *n >= 10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scheduler_retries_past_a_dead_backend_without_client_errors() {
    for s in Scheduler::ALL {
        let live = [named_backend("live").await, named_backend("live").await];
        let dead = refusing_addr();
        let mut p = proxier(CopyMode::Splice);
        let addr = serve(
            &mut p,
            &sched_snapshot("retry", &[live[0], dead, live[1]], s),
            "retry",
        );
        let mut held = Vec::new();
        for i in 0..30u8 {
            // Many client IPs, so `sh` hashes some of them to the dead one.
            let mut c = connect_from(2 + i, addr).await.unwrap();
            assert_eq!(read_name(&mut c).await, "live", "{s}: client {i}");
            // Open until the next one is: least-loaded schedulers (lc,
            // nq, sed) see a busy endpoint whatever the timing, and turn
            // to the others, the dead one among them.
            held.push(c);
            if held.len() > 1 {
                held.remove(0);
            }
        }
        let stats = &service(&p, "retry").stats;
        assert_eq!(stats.failed.load(Relaxed), 0, "{s}");
        assert!(
            stats.failed_dials() >= 1,
            "{s}: the dead endpoint was never tried, the test proves nothing"
        );
        p.close_listeners();
    }
}

fn manifest(annotations: &[(&str, &str)], backend: SocketAddr) -> Vec<(String, String)> {
    let ann: String = annotations
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: test\n  annotations:\n{ann}\
         spec:\n  clusterIP: 10.96.0.9\n  ports: [{{name: p, port: 80}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: test, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: p, port: {}}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n",
        backend.port(),
        backend.ip()
    );
    vec![("web.yaml".into(), yaml)]
}

#[test]
fn discovery_reads_the_annotations_and_keeps_unknown_values_for_the_report() {
    let backend: SocketAddr = "10.0.0.1:80".parse().unwrap();
    type Annotations<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Annotations, Setting<Scheduler>); 4] = [
        (&[], Setting::Default),
        (
            &[("kube-userspace-proxy.io/scheduler", "")],
            Setting::Default,
        ),
        (
            &[("kube-userspace-proxy.io/scheduler", "Sh")],
            Setting::Set(Scheduler::Sh),
        ),
        (
            &[("kube-userspace-proxy.io/scheduler", "wrr")],
            Setting::Invalid("wrr".into()),
        ),
    ];
    for (ann, want) in cases {
        let (snap, problems) =
            manifests::parse(&manifest(ann, backend), &mut manifests::LastGood::default());
        assert!(
            problems.is_empty(),
            "an unknown value never skips the Service: {problems:?}"
        );
        let port = &snap.services.values().next().expect("served").port;
        assert_eq!(port.scheduler, want, "{ann:?}");
    }
    let (snap, _) = manifests::parse(
        &manifest(
            &[("kube-userspace-proxy.io/proxy-protocol", "off")],
            backend,
        ),
        &mut manifests::LastGood::default(),
    );
    assert_eq!(
        snap.services.values().next().unwrap().port.proxy_protocol,
        Setting::Default
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_annotation_applies_swaps_live_and_unknown_values_fall_back() {
    use kube_userspace_proxy::model::ProxyProtocol;
    use kube_userspace_proxy::proxy::ServiceView;

    let echo = echo_backend().await;
    let mut p = Proxier::new(ProxyConfig {
        bind_address: IpAddr::from([127, 0, 0, 1]),
        scheduler: Scheduler::P2c, // --scheduler p2c
        ..ProxyConfig::default()
    });
    let parse = |ann: &[(&str, &str)]| {
        let (snap, problems) =
            manifests::parse(&manifest(ann, echo), &mut manifests::LastGood::default());
        assert!(problems.is_empty(), "{problems:?}");
        snap
    };
    const SCHED: &str = "kube-userspace-proxy.io/scheduler";
    const PP: &str = "kube-userspace-proxy.io/proxy-protocol";

    // No annotation: the flag's default.
    let addr = serve(&mut p, &parse(&[]), "web");
    let svc = service(&p, "web");
    assert_eq!(svc.balancer.scheduler(), Scheduler::P2c);

    // An annotation wins; a connection opened now stays up across changes.
    serve(&mut p, &parse(&[(SCHED, "sh")]), "web");
    assert_eq!(svc.balancer.scheduler(), Scheduler::Sh);
    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    open.read_exact(&mut buf).await.unwrap();

    serve(&mut p, &parse(&[(SCHED, " LC "), (PP, "v1")]), "web");
    assert_eq!(svc.balancer.scheduler(), Scheduler::Lc);
    assert_eq!(svc.proxy_protocol(), Some(ProxyProtocol::V1));
    assert!(
        std::sync::Arc::ptr_eq(&svc, &service(&p, "web")),
        "swapped in place"
    );
    // The open connection was not touched and gets no header mid-stream.
    open.write_all(b"two").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two");

    // Unknown values: reported (counted, logged), the default applies, the
    // service keeps serving.
    serve(&mut p, &parse(&[(SCHED, "wlc"), (PP, "v3")]), "web");
    assert_eq!(svc.balancer.scheduler(), Scheduler::P2c);
    assert_eq!(svc.proxy_protocol(), None);
    assert_eq!(svc.stats.config_errors[0].load(Relaxed), 1);
    assert_eq!(svc.stats.config_errors[1].load(Relaxed), 1);
    // Re-syncing the same snapshot does not count it again.
    serve(&mut p, &parse(&[(SCHED, "wlc"), (PP, "v3")]), "web");
    assert_eq!(svc.stats.config_errors[0].load(Relaxed), 1);
    open.write_all(b"three").await.unwrap();
    let mut b5 = [0u8; 5];
    open.read_exact(&mut b5).await.unwrap();
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    fresh.write_all(b"new").await.unwrap();
    fresh.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"new", "a new connection is served, with no header");

    let views: Vec<ServiceView> = p.published().load().to_vec();
    let text = kube_userspace_proxy::metrics::render_services(&views);
    let series = parse_exposition(&text);
    let labels = "namespace=\"test\",service=\"web\",port=\"p\",protocol=\"TCP\"";
    assert_eq!(
        series[&format!("kusp_service_config_errors_total{{{labels},annotation=\"scheduler\"}}")],
        1.0
    );
    assert_eq!(
        series[&format!(
            "kusp_service_config_errors_total{{{labels},annotation=\"proxy-protocol\"}}"
        )],
        1.0
    );
    assert_eq!(
        series[&format!("kusp_service_info{{{labels},scheduler=\"p2c\",proxy_protocol=\"off\"}}")],
        1.0
    );
    let doc = kube_userspace_proxy::status::collect(&views, "off");
    assert_eq!(doc.services[0].scheduler, "p2c");
    assert_eq!(doc.services[0].proxy_protocol, "off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sh_applies_to_udp_sessions_too() {
    // Every new session (a new source port) of one client IP lands on the
    // same backend; round-robin would rotate them.
    let backends = [
        udp_echo_backend("a").await,
        udp_echo_backend("b").await,
        udp_echo_backend("c").await,
    ];
    let mut snap = udp_snapshot("udp-sh", &backends);
    for e in snap.services.values_mut() {
        e.port.scheduler = Setting::Set(Scheduler::Sh);
    }
    let mut p = proxier(CopyMode::Splice);
    p.sync(&snap);
    let addr = localhost(p.listener_port(&udp_name("udp-sh")).expect("bound"));
    let mut by_ip: BTreeMap<u8, BTreeSet<String>> = BTreeMap::new();
    for last in 2..22u8 {
        for _ in 0..3 {
            let s = tokio::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, last], 0)))
                .await
                .unwrap();
            s.send_to(b"q", addr).await.unwrap();
            let mut buf = [0u8; 64];
            let (n, _) = tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf))
                .await
                .expect("answered")
                .unwrap();
            let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
            by_ip.entry(last).or_default().insert(answer);
        }
    }
    assert!(by_ip.values().all(|b| b.len() == 1), "{by_ip:?}");
    let used: BTreeSet<&String> = by_ip.values().flatten().collect();
    assert!(used.len() >= 2, "{by_ip:?}");
}
