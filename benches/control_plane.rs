//! Control plane at scale, a timed bench (it reports durations and memory,
//! not a criterion statistic): a snapshot of 5,000 services × 10 endpoints
//! applied from scratch (5,000 listeners bound, the iptables payload
//! rendered), then a one-endpoint change re-applied and re-rendered.
//! Targets (issue 8): < 1 s and < 100 MiB RSS for the first, < 10 ms for
//! the second. Run: `cargo bench --bench control_plane`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use kube_userspace_proxy::discovery::topology;
use kube_userspace_proxy::iptables::{self, render};
use kube_userspace_proxy::model::{
    Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, Snapshot,
};
use kube_userspace_proxy::proxy::{Proxier, ProxyConfig};

const SERVICES: usize = 5000;
const ENDPOINTS: usize = 10;

fn snapshot(bump: usize) -> Snapshot {
    let mut services = BTreeMap::new();
    for s in 0..SERVICES {
        let name = ServicePortName {
            namespace: format!("ns-{}", s % 50),
            name: format!("svc-{s}"),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
        };
        let endpoints = (0..ENDPOINTS)
            .map(|e| {
                // `bump` moves one endpoint of service 0: a one-endpoint change.
                let last = if s == 0 && e == 0 { bump } else { e };
                Endpoint {
                    addr: SocketAddr::from(([10, 128 + (s >> 8) as u8, s as u8, last as u8], 8080)),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: None,
                    zone: None,
                    hints_zones: Vec::new(),
                    hints_nodes: Vec::new(),
                }
            })
            .collect();
        let port = ServicePort {
            cluster_ips: vec![IpAddr::from([10, 96, (s >> 8) as u8, s as u8])],
            port: 80,
            ..ServicePort::default()
        };
        let entry = topology::entry(port, endpoints, &NodeInfo::default());
        services.insert(name, entry);
    }
    Snapshot {
        services,
        ..Snapshot::default()
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What the run loop does with a snapshot: sync, then render the rules
/// only when a service port (not just its endpoints) changed.
fn apply(p: &mut Proxier, snap: &Snapshot) -> (Duration, usize) {
    let t0 = Instant::now();
    let r = p.sync(snap);
    let mut bytes = 0;
    if r.opened + r.closed + r.spec_changed > 0 {
        let portals = iptables::portals(p);
        let any = IpAddr::from([0, 0, 0, 0]);
        let detector = p.detector();
        bytes = render::render(
            &portals,
            false,
            any,
            &detector,
            &render::JumpState::default(),
        )
        .len();
    }
    (t0.elapsed(), bytes)
}

fn main() {
    if let Err(e) = kube_userspace_proxy::raise_fd_limit() {
        eprintln!("cannot raise the fd limit: {e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let rss0 = rss_kib();
    let first = snapshot(0);
    let mut p = Proxier::new(ProxyConfig {
        bind_address: IpAddr::from([127, 0, 0, 1]),
        ..ProxyConfig::default()
    });
    let (took, bytes) = apply(&mut p, &first);
    let rss1 = rss_kib();
    let listening = p.services().filter(|(_, _, port)| port.is_some()).count();
    println!(
        "initial: {SERVICES} services x {ENDPOINTS} endpoints: {listening} listeners + {bytes} B of rules in {took:?}; RSS {} MiB (+{} MiB for the snapshot and the proxier)",
        rss1 / 1024,
        rss1.saturating_sub(rss0) / 1024
    );
    let mut changes = Vec::new();
    for i in 1..=50 {
        let next = snapshot(100 + i % 2);
        let (took, bytes) = apply(&mut p, &next);
        assert_eq!(bytes, 0, "an endpoint change needs no rules");
        changes.push(took);
    }
    changes.sort();
    println!(
        "one-endpoint change (sync; rules untouched), 50 runs: median {:?}, max {:?}",
        changes[changes.len() / 2],
        changes[changes.len() - 1]
    );
    let mut changes = Vec::new();
    for i in 1..=20 {
        let mut next = snapshot(100);
        if let Some(e) = next.services.values_mut().next() {
            e.port.port = 80 + (i % 2) as u16;
        }
        let (took, bytes) = apply(&mut p, &next);
        assert!(bytes > 0, "a service change re-renders");
        changes.push(took);
    }
    changes.sort();
    println!(
        "one-service change (sync + render of all {SERVICES}), 20 runs: median {:?}, max {:?}",
        changes[changes.len() / 2],
        changes[changes.len() - 1]
    );
    rt.block_on(p.shutdown(Duration::ZERO));
}
