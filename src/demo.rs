//! `kube-userspace-proxy demo`: round-robin and retry in one command.
//!
//! Starts two HTTP backends on 127.0.0.1:18081 and :18082 that answer with
//! their name, leaves :18083 closed (a dead pod), serves the embedded
//! manifests (Service `demo/hello`, NodePort 30080 over all three), sends a
//! dozen requests through the proxy and prints who answered each and which
//! dials were retried. With `--serve` it keeps serving and prints the URL
//! of the live stats page ([`crate::stats_page`]).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::cli::DemoArgs;
use crate::discovery::manifests;
use crate::proxy::{Proxier, ProxyConfig};

/// The live demo backends: (port, name).
pub const LIVE_BACKENDS: [(u16, &str); 2] = [(18081, "backend-a"), (18082, "backend-b")];
/// The endpoint that refuses connections.
pub const DEAD_BACKEND: u16 = 18083;
/// The demo Service's nodePort.
pub const NODE_PORT: u16 = 30080;
const REQUESTS: usize = 12;
/// The demo DNS responder's port (UDP), behind nodePort 30053.
pub const DNS_BACKEND: u16 = 18053;
/// The demo DNS Service's nodePort.
pub const DNS_NODE_PORT: u16 = 30053;
/// What the demo DNS responder answers to every A query.
pub const DNS_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

/// Builds a DNS query for the A record of `name` (recursion desired).
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Answers a DNS query: one A record with `ip` for A/IN questions, an empty
/// answer otherwise; `None` for what is not a one-question query.
pub fn dns_answer(query: &[u8], ip: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[4..6] != [0, 1] {
        return None;
    }
    // Walk the question name to find where the question ends.
    let mut i = 12;
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        i += len;
    }
    let qtype = query.get(i..i + 2)?;
    let qclass = query.get(i + 2..i + 4)?;
    let question_end = i + 4;
    let is_a = qtype == [0, 1] && qclass == [0, 1];
    let mut r = Vec::with_capacity(question_end + 16);
    r.extend_from_slice(&query[0..2]);
    r.extend_from_slice(&[0x81 | (query[2] & 0x01), 0x80]); // response, RD copied, RA
    r.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    r.extend_from_slice(&query[12..question_end]);
    if is_a {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

/// The first A record of a DNS response.
pub fn dns_parse_a(resp: &[u8]) -> Option<Ipv4Addr> {
    if resp.len() < 12 || resp[6..8] == [0, 0] {
        return None;
    }
    let rdata = resp.get(resp.len() - 4..)?;
    Some(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]))
}

/// A DNS responder on `socket` answering every A query with `ip`.
pub async fn dns_server(socket: UdpSocket, ip: Ipv4Addr) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(answer) = dns_answer(&buf[..n], ip) {
            let _ = socket.send_to(&answer, from).await;
        }
    }
}

/// A minimal HTTP/1.1 server answering every request with `name`.
pub async fn http_backend(listener: TcpListener, name: &'static str) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            // Read the request head (up to the blank line), then answer.
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 65536 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!("{name}\n");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Sends `GET /` and returns the response body.
pub async fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => Ok(body.trim().to_string()),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed without an HTTP answer",
        )),
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    for (port, name) in LIVE_BACKENDS {
        let l = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| {
                format!("starting {name} on 127.0.0.1:{port} (is another demo running?)")
            })?;
        tokio::spawn(http_backend(l, name));
    }
    let dns = UdpSocket::bind(("127.0.0.1", DNS_BACKEND))
        .await
        .with_context(|| format!("starting the DNS responder on 127.0.0.1:{DNS_BACKEND}/udp"))?;
    tokio::spawn(dns_server(dns, DNS_ANSWER));
    if TcpStream::connect(("127.0.0.1", DEAD_BACKEND))
        .await
        .is_ok()
    {
        println!(
            "note: something listens on 127.0.0.1:{DEAD_BACKEND}; the 'dead' endpoint is alive"
        );
    }

    let (snapshot, problems) = manifests::load(&manifests::Source::Embedded)?;
    if let Some(p) = problems.first() {
        bail!("embedded manifests: {p}");
    }
    let (name, entry) = snapshot
        .services
        .iter()
        .find(|(_, e)| e.port.node_port == Some(NODE_PORT))
        .context("embedded manifests have no Service on nodePort 30080")?;
    let mut proxier = Proxier::new(ProxyConfig {
        bind_address: args.bind_address,
        copy_mode: args.copy_mode,
        ..ProxyConfig::default()
    });
    proxier.sync(&snapshot);
    let stop_admin = tokio_util::sync::CancellationToken::new();
    let state = crate::admin::AdminState {
        handle: crate::metrics::install(),
        services: proxier.published(),
        health: Arc::new(crate::admin::Health::new(Duration::from_secs(30))),
        ctx: Arc::clone(proxier.context()),
        health_checks: Default::default(),
    };
    state.health.updated();
    let metrics_at = crate::admin::spawn(
        args.metrics_bind_address,
        crate::admin::AdminListener::Metrics,
        crate::admin::metrics_router(state),
        stop_admin.clone(),
    )
    .await;
    if let Err(e) = &metrics_at {
        println!(
            "note: no metrics: cannot listen on {}: {e}",
            args.metrics_bind_address
        );
    }
    let port = proxier.listener_port(name).with_context(|| {
        format!(
            "cannot listen on {}:{NODE_PORT} (in use?)",
            args.bind_address
        )
    })?;
    let target = SocketAddr::new(
        if args.bind_address.is_unspecified() {
            [127, 0, 0, 1].into()
        } else {
            args.bind_address
        },
        port,
    );

    println!(
        "Service {name} (nodePort {port}, {} mode) over:",
        args.copy_mode
    );
    for ep in &entry.endpoints {
        let who = LIVE_BACKENDS
            .iter()
            .find(|(p, _)| *p == ep.addr.port())
            .map_or("dead: nothing listens", |(_, n)| n);
        println!("  {}  ({who})", ep.addr);
    }
    println!();

    let service = proxier
        .services()
        .find(|(s, _, _)| &s.name == name)
        .map(|(s, _, _)| Arc::clone(s))
        .context("service not served")?;
    let failures = || -> BTreeMap<SocketAddr, u64> {
        service
            .balancer
            .endpoints()
            .iter()
            .map(|(e, b)| (e.addr, b.dial_failures.load(Relaxed)))
            .collect()
    };
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=REQUESTS {
        let before = failures();
        let answer = http_get(target).await;
        let after = failures();
        let retried: Vec<String> = after
            .iter()
            .filter(|(a, n)| before.get(a).is_some_and(|b| *n > b))
            .map(|(a, _)| format!("{a} refused → retried"))
            .collect();
        let who = match answer {
            Ok(body) => body,
            Err(e) => format!("error: {e}"),
        };
        let note = if retried.is_empty() {
            String::new()
        } else {
            format!("   ({})", retried.join(", "))
        };
        println!("request {i:>2} → {who}{note}");
        *answered.entry(who).or_default() += 1;
    }
    let stats = &service.stats;
    println!();
    println!(
        "answered: {}",
        answered
            .iter()
            .map(|(k, v)| format!("{k} ×{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "connections: {} accepted, {} failed; dials: {} failed, {} retries",
        stats.accepted.load(Relaxed),
        stats.failed.load(Relaxed),
        stats.failed_dials(),
        stats.retries.load(Relaxed)
    );
    println!("The dead endpoint was ejected after its first refused dial (1s back-off, doubling),");
    println!("so one dead pod cost one retry, not one per connection.");

    // UDP: a DNS query through the demo/dns service.
    let resolver = UdpSocket::bind((target.ip(), 0)).await?;
    resolver
        .send_to(
            &dns_query(0x4b55, "hello.demo"),
            SocketAddr::new(target.ip(), DNS_NODE_PORT),
        )
        .await?;
    let mut buf = [0u8; 512];
    let answer = tokio::time::timeout(Duration::from_secs(2), resolver.recv_from(&mut buf)).await;
    match answer {
        Ok(Ok((n, _))) => match dns_parse_a(&buf[..n]) {
            Some(ip) => println!("\nUDP: hello.demo A {ip} (DNS through nodePort {DNS_NODE_PORT}/udp, a session per client)"),
            None => println!("\nUDP: the DNS answer had no A record"),
        },
        _ => println!("\nUDP: no DNS answer through nodePort {DNS_NODE_PORT}/udp"),
    }

    if args.serve {
        println!();
        println!("serving: curl http://{target}/   dig @{} -p {DNS_NODE_PORT} hello.demo   (Ctrl-C to stop)", target.ip());
        if let Ok(addr) = metrics_at {
            println!("stats:   http://{addr}/   (live page; with traffic, e.g. `while curl -s http://{target}/ >/dev/null; do sleep 0.2; done`, it shows round-robin, the dead endpoint ejected and retries counting)");
            println!("metrics: curl http://{addr}/metrics   status: kube-userspace-proxy status --admin {addr}");
        }
        crate::shutdown_signal().await;
    }
    proxier.shutdown(Duration::from_secs(1)).await;
    stop_admin.cancel();
    Ok(())
}
