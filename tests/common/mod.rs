//! Fake peers and helpers for the integration tests: every address is on
//! 127.0.0.1; ports are chosen by the kernel, or by [`procs::free_port`]
//! for a port another process binds.
#![allow(dead_code)]

pub mod lab;
pub mod netns;
pub mod procs;

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kube_userspace_proxy::admin::{self, AdminState, Health};
use kube_userspace_proxy::model::{
    Affinity, Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, Snapshot,
};
use kube_userspace_proxy::proxy::CopyMode;
use kube_userspace_proxy::proxy::{Proxier, ProxyConfig, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Short dial timeouts so retry tests stay quick.
pub const FAST_TIMEOUTS: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
];

pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A listener on 127.0.0.1 with a kernel-chosen port.
pub async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Backend that writes `name` and closes, per connection.
pub async fn named_backend(name: &'static str) -> SocketAddr {
    let (l, a) = listener().await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
                // Wait for the client's close so the byte is never reset away.
                let mut buf = [0u8; 16];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    a
}

/// Backend that echoes every byte back, and half-closes when the client does.
pub async fn echo_backend() -> SocketAddr {
    let (l, a) = listener().await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

/// Backend for bulk checks. The client sends one command line:
/// `sink\n` then data until EOF: the backend answers with the 8-byte hash of
/// what it read, then closes; `source N\n`: the backend sends N bytes of
/// [`pattern`] and closes.
pub async fn bulk_backend() -> SocketAddr {
    let (l, a) = listener().await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
                    line.push(b[0]);
                }
                let line = String::from_utf8(line).unwrap_or_default();
                if line == "sink" {
                    let mut h = StreamHash::default();
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => h.write(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(&h.finish().to_le_bytes()).await;
                    let _ = s.shutdown().await;
                } else if let Some(n) = line.strip_prefix("source ") {
                    let n: usize = n.parse().unwrap_or(0);
                    let _ = send_pattern(&mut s, n).await;
                    let _ = s.shutdown().await;
                    let mut buf = [0u8; 16];
                    let _ = s.read(&mut buf).await;
                }
            });
        }
    });
    a
}

/// Deterministic bytes: chunk `i` of 64 KiB is filled from a seed of `i`.
pub fn pattern_chunk(i: usize, out: &mut [u8]) {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

pub const CHUNK: usize = 64 * 1024;

/// Writes `n` bytes of the pattern; returns its hash.
pub async fn send_pattern(s: &mut (impl AsyncWriteExt + Unpin), n: usize) -> std::io::Result<u64> {
    let mut h = StreamHash::default();
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0;
    let mut i = 0;
    while sent < n {
        let len = CHUNK.min(n - sent);
        pattern_chunk(i, &mut buf[..len]);
        h.write(&buf[..len]);
        s.write_all(&buf[..len]).await?;
        sent += len;
        i += 1;
    }
    Ok(h.finish())
}

/// The hash of `n` bytes of the pattern.
pub fn pattern_hash(n: usize) -> u64 {
    let mut h = StreamHash::default();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    let mut i = 0;
    while done < n {
        let len = CHUNK.min(n - done);
        pattern_chunk(i, &mut buf[..len]);
        h.write(&buf[..len]);
        done += len;
        i += 1;
    }
    h.finish()
}

/// FNV-1a-64 over a stream; independent of how the stream is chunked.
#[derive(Clone, Copy)]
pub struct StreamHash(u64);

impl Default for StreamHash {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for StreamHash {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A listener that completes no handshake: backlog 0, filled by held
/// connections, so further SYNs are dropped and dials time out.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<socket2::Socket>,
}

pub fn blackhole() -> Blackhole {
    use socket2::{Domain, Socket, Type};
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    l.bind(&localhost(0).into()).unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        match s.connect_timeout(&addr.into(), Duration::from_millis(300)) {
            Ok(()) => fillers.push(s),
            Err(_) => {
                return Blackhole {
                    addr,
                    _listener: l,
                    _fillers: fillers,
                }
            }
        }
    }
    panic!("could not fill the blackhole's backlog");
}

/// A port on which nothing listens ([`procs::free_port`]).
pub fn refusing_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], procs::free_port()))
}

pub fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint {
        addr,
        ready: true,
        serving: true,
        terminating: false,
        node_name: None,
        zone: None,
        hints_zones: Vec::new(),
        hints_nodes: Vec::new(),
    }
}

pub fn svc_name(name: &str) -> ServicePortName {
    ServicePortName {
        namespace: "test".into(),
        name: name.into(),
        port_name: "p".into(),
        protocol: Protocol::Tcp,
    }
}

/// Categorizes every entry again for the snapshot's node, as discovery
/// does: call it after a test changed an entry's spec or endpoints.
pub fn recategorize(mut snap: Snapshot) -> Snapshot {
    for e in snap.services.values_mut() {
        let port = std::mem::take(&mut e.port);
        let endpoints = std::mem::take(&mut e.endpoints);
        *e = kube_userspace_proxy::discovery::topology::entry(port, endpoints, &snap.node);
    }
    snap
}

/// A snapshot with one TCP service port `name` over `endpoints`.
pub fn snapshot(name: &str, endpoints: &[SocketAddr], affinity: Option<Affinity>) -> Snapshot {
    let mut services = BTreeMap::new();
    services.insert(
        svc_name(name),
        ServiceEntry {
            port: ServicePort {
                cluster_ips: vec![IpAddr::from([10, 96, 0, 1])],
                port: 80,
                affinity,
                ..ServicePort::default()
            },
            endpoints: endpoints.iter().copied().map(endpoint).collect(),
            ..ServiceEntry::default()
        },
    );
    recategorize(Snapshot {
        services,
        ..Snapshot::default()
    })
}

/// A proxier on 127.0.0.1 with fast dial timeouts.
pub fn proxier(mode: CopyMode) -> Proxier {
    Proxier::new(ProxyConfig {
        bind_address: IpAddr::from([127, 0, 0, 1]),
        dial_timeouts: FAST_TIMEOUTS.to_vec(),
        copy_mode: mode,
        ..ProxyConfig::default()
    })
}

/// Syncs `snap` and returns the listener address of service `name`.
pub fn serve(p: &mut Proxier, snap: &Snapshot, name: &str) -> SocketAddr {
    p.sync(snap);
    localhost(p.listener_port(&svc_name(name)).expect("listener bound"))
}

/// The data-path state of service `name`.
pub fn service(p: &Proxier, name: &str) -> Arc<Service> {
    p.services()
        .find(|(s, _, _)| s.name == svc_name(name))
        .map(|(s, _, _)| Arc::clone(s))
        .expect("service served")
}

/// Connects and reads everything until EOF.
pub async fn read_all(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// A plain HTTP/1.1 request; returns (status line, lower-cased head, body).
pub async fn http_raw(addr: SocketAddr, method: &str, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// A plain HTTP/1.1 request; returns (status code, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_raw(addr, method, path).await;
    let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body)
}

/// What the admin servers of proxier `p` read, with `health`.
pub fn admin_state(p: &Proxier, health: Arc<Health>) -> AdminState {
    AdminState {
        handle: kube_userspace_proxy::metrics::install(),
        services: p.published(),
        health,
        ctx: Arc::clone(p.context()),
        health_checks: Default::default(),
    }
}

/// Serves `p`'s metrics router (after one sync pass of its health) on a
/// free 127.0.0.1 port; cancel the token to stop it.
pub async fn serve_metrics(p: &Proxier) -> (SocketAddr, CancellationToken) {
    let state = admin_state(p, Arc::new(Health::new(Duration::from_secs(30))));
    state.health.updated();
    let stop = CancellationToken::new();
    let addr = admin::spawn(
        localhost(0),
        admin::AdminListener::Metrics,
        admin::metrics_router(state),
        stop.clone(),
    )
    .await
    .unwrap();
    (addr, stop)
}

/// Parses Prometheus text exposition into `series{labels}` → value
/// (comments skipped, label order as rendered).
pub fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "duplicate series {series}"
        );
    }
    out
}

/// The UDP twin of [`svc_name`].
pub fn udp_name(name: &str) -> ServicePortName {
    ServicePortName {
        protocol: Protocol::Udp,
        ..svc_name(name)
    }
}

/// A snapshot with one UDP service port `name` over `endpoints`.
pub fn udp_snapshot(name: &str, endpoints: &[SocketAddr]) -> Snapshot {
    let services = snapshot(name, endpoints, None)
        .services
        .into_values()
        .map(|e| (udp_name(name), e))
        .collect();
    Snapshot {
        services,
        ..Snapshot::default()
    }
}

/// A UDP backend answering every datagram with `name` + ":" + the datagram.
pub async fn udp_echo_backend(name: &'static str) -> SocketAddr {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let a = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                continue;
            };
            let mut out = format!("{name}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from).await;
        }
    });
    a
}

/// A process of the proxy binary; killed on drop.
pub struct Proxy(pub std::process::Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines `stderr` prints, as they come, read on a thread of their own.
pub fn lines_of(stderr: std::process::ChildStderr) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}
