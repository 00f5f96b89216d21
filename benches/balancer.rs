//! Balancer pick cost (ns/pick): every scheduler at 3 and 100 endpoints,
//! and round-robin with ClientIP affinity.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use kube_userspace_proxy::model::{Affinity, Endpoint, Scheduler};
use kube_userspace_proxy::proxy::balancer::Balancer;

fn endpoints(n: u16) -> Vec<Endpoint> {
    (0..n)
        .map(|i| Endpoint {
            addr: SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8080)),
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            hints_zones: Vec::new(),
            hints_nodes: Vec::new(),
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let client = IpAddr::from([192, 168, 0, 1]);
    for s in Scheduler::ALL {
        for n in [3u16, 100] {
            let b = Balancer::default();
            b.update(&endpoints(n), None);
            b.set_scheduler(s);
            c.bench_function(&format!("pick/{s}/{n}"), |bench| {
                bench.iter(|| b.pick(std::hint::black_box(client), &[]))
            });
        }
    }
    let b = Balancer::default();
    b.update(
        &endpoints(3),
        Some(Affinity {
            timeout: Duration::from_secs(60),
        }),
    );
    c.bench_function("pick/affinity/3", |bench| {
        bench.iter(|| b.pick(std::hint::black_box(client), &[]))
    });
}

criterion_group!(benches, pick);
criterion_main!(benches);
