//! PROXY protocol headers as a backend sees them: parsed here (v1 text and
//! v2 binary, written from HAProxy's spec), checked for the client's real
//! address and port, for the destination it dialled, and for arriving in the
//! same read as the client's first bytes; in splice and copy mode; with a
//! silent client (server speaks first); and, in network namespaces, behind
//! the iptables REDIRECT of a ClusterIP.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::netns::{node_and_pod, require_root, Netns};
use common::*;
use kube_userspace_proxy::model::{ProxyProtocol, Setting, Snapshot};
use kube_userspace_proxy::proxy::CopyMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// A parsed header: (version, source, destination).
#[derive(Debug, PartialEq, Eq)]
struct Header {
    version: u8,
    src: SocketAddr,
    dst: SocketAddr,
}

/// Parses a PROXY header at the start of `buf`; returns it and its length.
fn parse_header(buf: &[u8]) -> Result<(Header, usize), String> {
    const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    if buf.starts_with(b"PROXY ") {
        let end = buf
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("v1: no CRLF")?;
        if end + 2 > 107 {
            return Err("v1: longer than 107 bytes".into());
        }
        let line = std::str::from_utf8(&buf[..end]).map_err(|e| e.to_string())?;
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 6 {
            return Err(format!("v1: {} fields in {line:?}", f.len()));
        }
        let ip = |s: &str| s.parse::<IpAddr>().map_err(|e| format!("{s}: {e}"));
        let port = |s: &str| s.parse::<u16>().map_err(|e| format!("{s}: {e}"));
        let (src, dst) = (ip(f[2])?, ip(f[3])?);
        match (f[1], src, dst) {
            ("TCP4", IpAddr::V4(_), IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_), IpAddr::V6(_)) => {}
            _ => return Err(format!("v1: family {} does not match {line:?}", f[1])),
        }
        return Ok((
            Header {
                version: 1,
                src: SocketAddr::new(src, port(f[4])?),
                dst: SocketAddr::new(dst, port(f[5])?),
            },
            end + 2,
        ));
    }
    if buf.len() < 16 || &buf[..12] != SIG {
        return Err(format!("no PROXY header: {:?}", &buf[..buf.len().min(16)]));
    }
    if buf[12] != 0x21 {
        return Err(format!("v2: version/command byte {:#x}", buf[12]));
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let body = buf.get(16..16 + len).ok_or("v2: truncated")?;
    let (src, dst) = match buf[13] {
        0x11 if len >= 12 => {
            let a = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[o],
                    body[o + 1],
                    body[o + 2],
                    body[o + 3],
                ))
            };
            let p = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (SocketAddr::new(a(0), p(8)), SocketAddr::new(a(4), p(10)))
        }
        0x21 if len >= 36 => {
            let a = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&body[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let p = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (SocketAddr::new(a(0), p(32)), SocketAddr::new(a(16), p(34)))
        }
        f => return Err(format!("v2: family/protocol byte {f:#x}, length {len}")),
    };
    Ok((
        Header {
            version: 2,
            src,
            dst,
        },
        16 + len,
    ))
}

/// A backend that requires a PROXY header. Its first `read` must hold the
/// header; it answers `"{header:?}|{rest of that first read}\n"` (or
/// `"error: ...\n"`), then echoes everything else.
async fn pp_backend() -> SocketAddr {
    pp_backend_on("127.0.0.1:0").await
}

/// [`pp_backend`] bound on `bind`.
async fn pp_backend_on(bind: &str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind(bind).await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let answer = match parse_header(&buf[..n]) {
                    Ok((h, len)) => {
                        format!("{h:?}|{}\n", String::from_utf8_lossy(&buf[len..n]))
                    }
                    Err(e) => format!("error: {e}\n"),
                };
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

fn pp_snapshot(name: &str, backends: &[SocketAddr], v: ProxyProtocol) -> Snapshot {
    let mut snap = snapshot(name, backends, None);
    for e in snap.services.values_mut() {
        e.port.proxy_protocol = Setting::Set(v);
    }
    recategorize(snap)
}

/// Reads one `\n`-terminated line.
async fn line(s: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .expect("answer in time")
        .is_ok()
        && b[0] != b'\n'
    {
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_sees_client_address_and_port_in_v1_and_v2_with_the_first_bytes() {
    let backend = pp_backend().await;
    for mode in [CopyMode::Splice, CopyMode::Copy] {
        for v in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let mut p = proxier(mode);
            let addr = serve(&mut p, &pp_snapshot("pp", &[backend], v), "pp");
            let sock = TcpSocket::new_v4().unwrap();
            sock.bind("127.0.0.7:0".parse().unwrap()).unwrap();
            let mut c = sock.connect(addr).await.unwrap();
            let me = c.local_addr().unwrap();
            c.write_all(b"PING first bytes").await.unwrap();
            let got = line(&mut c).await;
            let want = Header {
                version: if v == ProxyProtocol::V1 { 1 } else { 2 },
                src: me,
                // Not redirected: the address the client dialled is the listener's.
                dst: addr,
            };
            // Header and first client bytes arrive in the backend's first read:
            // one write, one segment.
            assert_eq!(got, format!("{want:?}|PING first bytes"), "{mode} {v:?}");
            // The stream after the header is intact both ways.
            let sent = send_and_echo(&mut c, 300_000).await;
            assert!(sent, "{mode} {v:?}: echo mismatch");
            let svc = service(&p, "pp");
            drop(c);
            assert!(
                eventually(Duration::from_secs(3), || svc
                    .stats
                    .completed
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 1)
                .await
            );
            // Client bytes are counted, the header is not.
            assert_eq!(
                svc.stats
                    .bytes_in
                    .load(std::sync::atomic::Ordering::Relaxed),
                16 + 300_000,
                "{mode} {v:?}"
            );
            p.close_listeners();
        }
    }
}

/// Sends `n` pattern bytes and reads them back from the echo.
async fn send_and_echo(c: &mut tokio::net::TcpStream, n: usize) -> bool {
    let (mut r, mut w) = c.split();
    let write = async {
        let h = send_pattern(&mut w, n).await.unwrap();
        h
    };
    let read = async {
        let mut got = vec![0u8; n];
        r.read_exact(&mut got).await.unwrap();
        let mut h = StreamHash::default();
        std::hash::Hasher::write(&mut h, &got);
        std::hash::Hasher::finish(&h)
    };
    let (a, b) = tokio::join!(write, read);
    a == b && a == pattern_hash(n)
}

#[tokio::test]
async fn a_silent_client_still_gets_the_header_to_the_backend() {
    // Server-speaks-first protocols: the header goes alone after a short
    // wait, and the backend's greeting reaches the client.
    let backend = pp_backend().await;
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(
        &mut p,
        &pp_snapshot("pp", &[backend], ProxyProtocol::V2),
        "pp",
    );
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let me = c.local_addr().unwrap();
    let t = Instant::now();
    let got = line(&mut c).await;
    assert_eq!(
        got,
        format!(
            "{:?}|",
            Header {
                version: 2,
                src: me,
                dst: addr
            }
        )
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[tokio::test]
async fn without_the_annotation_no_header_is_sent() {
    let backend = pp_backend().await;
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(&mut p, &snapshot("plain", &[backend], None), "plain");
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    assert!(line(&mut c).await.starts_with("error: no PROXY header"));
}

// === In network namespaces: the ClusterIP as destination ===

const BIN: &str = env!("CARGO_BIN_EXE_kube-userspace-proxy");

/// The proxy binary inside `ns`; killed on drop.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_proxy(ns: &Netns, dir: &Path) -> Proxy {
    let child = ns
        .command(&[BIN, "--manifests"])
        .arg(dir)
        .args([
            "--iptables",
            "on",
            "--iptables-min-sync-period",
            "100ms",
            "--log-level",
            "warn",
            "--metrics-bind-address",
            "127.0.0.1:0",
            "--healthz-bind-address",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Proxy(child)
}

/// A blocking PROXY-header backend in `ns`: answers each connection with
/// the parsed header (`{header:?}` or `error: ...`).
fn ns_pp_backend(ns: &Netns, addr: SocketAddr) {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let l = std::net::TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        for s in l.incoming().take(100) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let answer = match parse_header(&buf[..n]) {
                Ok((h, _)) => format!("{h:?}"),
                Err(e) => format!("error: {e}"),
            };
            let _ = s.write_all(answer.as_bytes());
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

#[test]
fn behind_the_redirect_the_header_names_the_cluster_ip_the_client_dialled() {
    if !require_root("behind_the_redirect_the_header_names_the_cluster_ip_the_client_dialled") {
        return;
    }
    let (node, pod, _) = node_and_pod("pp", "10.235.1");
    let backend: SocketAddr = "10.235.1.2:8080".parse().unwrap();
    ns_pp_backend(&pod, backend);
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::new();
    for (name, ip, v) in [("pp1", "10.96.0.41", "v1"), ("pp2", "10.96.0.42", "v2")] {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: ns\n  annotations:\n    kube-userspace-proxy.io/proxy-protocol: {v}\n\
             spec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n---\n",
            backend.port(),
            backend.ip()
        ));
    }
    std::fs::write(dir.path().join("pp.yaml"), yaml).unwrap();
    let _proxy = start_proxy(&node, dir.path());
    let end = Instant::now() + Duration::from_secs(10);
    while !(node.nat().contains("ns/pp1:http") && node.nat().contains("ns/pp2:http")) {
        assert!(
            Instant::now() < end,
            "rules never appeared:\n{}",
            node.nat()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    // From a pod (PREROUTING) and from the node itself (OUTPUT).
    let cases = [
        (&pod, 1u8, "10.96.0.41:80"),
        (&pod, 2, "10.96.0.42:80"),
        (&node, 1, "10.96.0.41:80"),
        (&node, 2, "10.96.0.42:80"),
    ];
    for (ns, v, vip) in cases {
        let vip: SocketAddr = vip.parse().unwrap();
        let (me, got) = ns
            .spawn(move || {
                let mut s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let me = s.local_addr()?;
                s.write_all(b"hi")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok::<_, std::io::Error>((me, out))
            })
            .join()
            .unwrap()
            .unwrap();
        let want = Header {
            version: v,
            src: me,
            dst: vip,
        };
        assert_eq!(
            got,
            format!("{want:?}"),
            "v{v} through the ClusterIP from {}",
            ns.name
        );
    }
}

#[tokio::test]
async fn ipv6_clients_get_a_tcp6_header_and_ipv4_ones_on_a_dual_stack_listener_tcp4() {
    use kube_userspace_proxy::proxy::{Proxier, ProxyConfig};
    // One backend per family: each client goes to its own family's.
    let backends = [pp_backend().await, pp_backend_on("[::1]:0").await];
    for v in [ProxyProtocol::V1, ProxyProtocol::V2] {
        let mut p = Proxier::new(ProxyConfig {
            bind_address: "::".parse().unwrap(),
            dial_timeouts: FAST_TIMEOUTS.to_vec(),
            ..ProxyConfig::default()
        });
        p.sync(&pp_snapshot("pp6", &backends, v));
        let port = p.listener_port(&svc_name("pp6")).unwrap();
        let version = if v == ProxyProtocol::V1 { 1 } else { 2 };
        for target in ["[::1]", "127.0.0.1"] {
            let addr: SocketAddr = format!("{target}:{port}").parse().unwrap();
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"x").await.unwrap();
            let want = Header {
                version,
                // The listener sees IPv4 clients as ::ffff:a.b.c.d; the
                // header carries them as plain IPv4.
                src: c.local_addr().unwrap(),
                dst: addr,
            };
            assert_eq!(line(&mut c).await, format!("{want:?}|x"), "{v:?} {target}");
        }
        p.close_listeners();
    }
}
