//! iptables payload rendering (criterion): 100 and 5,000 service ports,
//! the cost paid on every rules sync.

use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use kube_userspace_proxy::detect_local::Detector;
use kube_userspace_proxy::iptables::render::{
    render, Disposition, InternalListener, JumpState, Portal, PortalKind, Rules,
};
use kube_userspace_proxy::model::Protocol;

/// `n` ClusterIP service ports, each with its internal listener.
fn portals(n: usize) -> Rules {
    let port = |i: usize| 32768 + (i % 28000) as u16;
    let comment = |i: usize| format!("ns-{}/svc-{i}:http", i % 50);
    Rules {
        portals: (0..n)
            .map(|i| Portal {
                ip: IpAddr::from([10, 96, (i >> 8) as u8, i as u8]),
                port: 80,
                protocol: Protocol::Tcp,
                listener_port: port(i),
                kind: PortalKind::ClusterIp,
                comment: comment(i),
                disposition: Disposition::Redirect,
                source_ranges: Vec::new(),
            })
            .collect(),
        listeners: (0..n)
            .map(|i| InternalListener {
                port: port(i),
                protocol: Protocol::Tcp,
                comment: comment(i),
            })
            .collect(),
        ..Rules::default()
    }
}

fn bench(c: &mut Criterion) {
    let bind = IpAddr::from([0, 0, 0, 0]);
    for n in [100, 5000] {
        let p = portals(n);
        c.bench_function(&format!("render/{n}"), |b| {
            b.iter(|| render(&p, false, bind, &Detector::default(), &JumpState::default()))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
