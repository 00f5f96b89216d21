//! iptables payload rendering (criterion): 100 and 5,000 service ports,
//! the cost paid on every rules sync.

use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use kube_userspace_proxy::detect_local::Detector;
use kube_userspace_proxy::iptables::render::{
    render, Disposition, JumpState, Portal, PortalKind, Rules,
};
use kube_userspace_proxy::model::Protocol;

fn portals(n: usize) -> Rules {
    (0..n)
        .map(|i| Portal {
            ip: IpAddr::from([10, 96, (i >> 8) as u8, i as u8]),
            port: 80,
            protocol: Protocol::Tcp,
            listener_port: 30000 + (i % 2700) as u16,
            kind: PortalKind::ClusterIp,
            comment: format!("ns-{}/svc-{i}:http", i % 50),
            disposition: Disposition::Redirect,
            source_ranges: Vec::new(),
        })
        .collect::<Vec<_>>()
        .into()
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
