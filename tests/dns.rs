//! A real resolver through the proxy: `dig` asks a DNS responder behind a
//! UDP service port.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use kube_userspace_proxy::demo::{dns_server, DNS_ANSWER};
use kube_userspace_proxy::proxy::{Proxier, ProxyConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_resolves_a_name_through_a_udp_service() {
    if Command::new("dig").arg("-v").output().is_err() {
        if std::env::var_os("CI").is_some() {
            panic!("dig is missing: .ci/run installs bind9-dnsutils");
        }
        eprintln!("SKIPPED dig_resolves_a_name_through_a_udp_service: dig is not installed");
        return;
    }
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let resolver = socket.local_addr().unwrap();
    tokio::spawn(dns_server(socket, DNS_ANSWER));
    let mut p = Proxier::new(ProxyConfig {
        bind_address: [127, 0, 0, 1].into(),
        udp_timeout: Duration::from_secs(2),
        ..ProxyConfig::default()
    });
    p.sync(&udp_snapshot("dns", &[resolver]));
    let port = p.listener_port(&udp_name("dns")).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "hello.demo",
                "A",
                "+short",
                "+tries=1",
                "+time=3",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        DNS_ANSWER.to_string(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
