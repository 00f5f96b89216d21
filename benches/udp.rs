//! UDP datagrams/s through the proxy vs direct to the backend, 64-byte and
//! 1400-byte payloads, measured in one run (a timed bench, not criterion:
//! it reports a rate). 4 client sockets keep 32 datagrams in flight each
//! against an echo backend on 127.0.0.1, for `UDP_BENCH_SECONDS` (2).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube_userspace_proxy::discovery::topology;
use kube_userspace_proxy::model::{
    Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, Snapshot,
};
use kube_userspace_proxy::proxy::{Proxier, ProxyConfig};
use tokio::net::UdpSocket;

const CLIENTS: usize = 4;
const WINDOW: usize = 32;

async fn echo_backend() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let a = s.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    a
}

/// Replies per second from `target` with `size`-byte datagrams.
async fn rate(target: SocketAddr, size: usize, secs: u64) -> f64 {
    let done = Arc::new(AtomicBool::new(false));
    let replies = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (done, replies) = (Arc::clone(&done), Arc::clone(&replies));
        tasks.push(tokio::spawn(async move {
            let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            s.connect(target).await.expect("connect");
            let msg = vec![7u8; size];
            let mut buf = vec![0u8; 65536];
            for _ in 0..WINDOW {
                let _ = s.send(&msg).await;
            }
            while !done.load(Relaxed) {
                match tokio::time::timeout(Duration::from_millis(50), s.recv(&mut buf)).await {
                    Ok(Ok(_)) => {
                        replies.fetch_add(1, Relaxed);
                        let _ = s.send(&msg).await;
                    }
                    // A lost datagram: refill the window.
                    _ => {
                        let _ = s.send(&msg).await;
                    }
                }
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let n = replies.load(Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    done.store(true, Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / elapsed
}

fn main() {
    let secs: u64 = std::env::var("UDP_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let backend = echo_backend().await;
        let name = ServicePortName {
            namespace: "bench".into(),
            name: "udp".into(),
            port_name: String::new(),
            protocol: Protocol::Udp,
        };
        let mut snapshot = Snapshot::default();
        snapshot.services.insert(
            name.clone(),
            topology::entry(
                ServicePort {
                    port: 53,
                    ..ServicePort::default()
                },
                vec![Endpoint {
                    addr: backend,
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: None,
                    zone: None,
                    hints_zones: Vec::new(),
                    hints_nodes: Vec::new(),
                }],
                &NodeInfo::default(),
            ),
        );
        let mut p = Proxier::new(ProxyConfig {
            bind_address: [127, 0, 0, 1].into(),
            udp_timeout: Duration::from_secs(30),
            ..ProxyConfig::default()
        });
        p.sync(&snapshot);
        let port = p.listener_port(&name).expect("listener");
        let proxy: SocketAddr = ([127, 0, 0, 1], port).into();
        println!(
            "# {CLIENTS} clients x {WINDOW} in flight, {secs}s each, echo backend on 127.0.0.1"
        );
        println!(
            "{:<8} {:>14} {:>14} {:>8}",
            "payload", "direct dgram/s", "proxy dgram/s", "ratio"
        );
        for size in [64usize, 1400] {
            let direct = rate(backend, size, secs).await;
            let proxied = rate(proxy, size, secs).await;
            println!(
                "{:<8} {:>14.0} {:>14.0} {:>8.2}",
                size,
                direct,
                proxied,
                proxied / direct
            );
        }
    });
}
