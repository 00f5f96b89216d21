//! TCP keepalive on proxied connections: both of the proxy's sockets of a
//! connection (the accepted client socket, which inherits it from the
//! listener, and the backend socket) carry a keepalive timer unless
//! `--tcp-keepalive-time 0`; and a client that vanishes without FIN or RST
//! is found dead by the probes, its connection closed, its fds freed and
//! the death counted (`kusp_connections_peer_dead_total`, `peers_dead`).
//! The proxy runs as a process of its own; the vanishing client lives in a
//! network namespace the test makes, where an iptables rule drops what is
//! sent to it.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{require_root, require_tools, wait_for, Netns};
use common::procs::{fds_of, service_manifest, ProxyProc, BIN};
use common::{echo_backend, parse_exposition};
use kube_userspace_proxy::status::StatusDoc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// One established TCP socket as `ss -tnop` shows it.
#[derive(Clone, Debug)]
struct SsSocket {
    local: SocketAddr,
    peer: SocketAddr,
    /// The `users:(...)` field (empty when no process holds it).
    users: String,
    /// The `timer:(...)` field (empty when no timer runs).
    timer: String,
    line: String,
}

impl SsSocket {
    fn owned_by(&self, pid: i32) -> bool {
        self.users.contains(&format!("pid={pid},"))
    }

    /// The time left on a keepalive timer, if one runs.
    fn keepalive_left(&self) -> Option<Duration> {
        let inner = self.timer.strip_prefix("timer:(keepalive,")?;
        Some(ss_duration(inner.split(',').next()?))
    }
}

/// Parses ss's timer durations: "119min", "1min30sec", "14sec", "4.512ms"
/// (4.512 s: seconds then milliseconds), "512ms".
fn ss_duration(s: &str) -> Duration {
    let (mins, rest) = match s.split_once("min") {
        Some((m, r)) => (m.parse::<u64>().unwrap(), r),
        None => (0, s),
    };
    let ms = if let Some(sec) = rest.strip_suffix("sec") {
        sec.parse::<u64>().unwrap() * 1000
    } else if let Some(v) = rest.strip_suffix("ms") {
        match v.split_once('.') {
            Some((sec, ms)) => sec.parse::<u64>().unwrap() * 1000 + ms.parse::<u64>().unwrap(),
            None => v.parse::<u64>().unwrap(),
        }
    } else {
        assert!(rest.is_empty(), "unexpected ss timer {s:?}");
        0
    };
    Duration::from_millis(mins * 60_000 + ms)
}

/// Established TCP sockets of the current network namespace, with owners
/// and timers (`ss -tnopH state established`).
fn established() -> Vec<SsSocket> {
    let out = Command::new("ss")
        .args(["-tnopH", "state", "established"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // Recv-Q Send-Q Local Peer [users:(...)] [timer:(...)]
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(2)?.parse().ok()?;
            let peer = f.get(3)?.parse().ok()?;
            let field = |p: &str| {
                f.iter()
                    .find(|x| x.starts_with(p))
                    .map(|x| x.to_string())
                    .unwrap_or_default()
            };
            Some(SsSocket {
                local,
                peer,
                users: field("users:("),
                timer: field("timer:("),
                line: line.trim_end().to_string(),
            })
        })
        .collect()
}

/// The proxy's two sockets of the connection from `client` (its accepted
/// socket on `listener`, its socket to `backend`), once ss shows both
/// (with `timers`, both with a keepalive timer, for up to 5 s).
fn proxy_sockets(
    pid: i32,
    listener: SocketAddr,
    client: SocketAddr,
    backend: SocketAddr,
    timers: bool,
) -> (SsSocket, SsSocket) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let all = established();
        let mut accepted = None;
        let mut to_backend = Vec::new();
        for s in all.iter() {
            if s.local == listener && s.peer == client {
                accepted = Some(s);
            } else if s.peer == backend && s.owned_by(pid) {
                to_backend.push(s);
            }
        }
        if let (Some(a), [b]) = (accepted, to_backend.as_slice()) {
            // Waiting for timers, a sighting without one is looked at
            // again until the deadline: once, in a loaded full-suite run,
            // ss showed the accepted socket with no timer at all (not
            // reproduced in 15 runs after); the caller's assertion judges
            // the last sighting.
            let without = |s: &SsSocket| s.keepalive_left().is_none();
            if timers && (without(a) || without(b)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            assert!(
                a.owned_by(pid),
                "the accepted client socket belongs to the proxy (pid {pid}): {}",
                a.line
            );
            return (a.clone(), (*b).clone());
        }
        assert!(
            Instant::now() < end,
            "ss never showed the proxy's (pid {pid}) sockets of {client} → {listener} → {backend} \
             (accepted: {accepted:?}, to the backend: {to_backend:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free port on 127.0.0.1 below the kernel's ephemeral range, so no
/// `:0` bind (the proxy's healthz server, other tests' proxies and peers)
/// can take it between our check and the proxy's bind, as can happen to a
/// port from `free_port`.
fn unshared_port() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    assert!(low > 11_000, "ephemeral range starts at {low}");
    let span = u32::from(low - 10_000);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id();
    for i in 0..1000 {
        let port = 10_000 + ((seed.wrapping_add(i * 7919)) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {low}");
}

/// Starts the proxy in front of an echo backend with `extra` flags, passes
/// one line through it, and returns the proxy's two sockets of that
/// connection as ss shows them while it is open (`timers`: see
/// `proxy_sockets`).
async fn one_connection(extra: &[&str], timers: bool) -> (SsSocket, SsSocket) {
    let backend = echo_backend().await;
    let port = unshared_port();
    let proxy = ProxyProc::start(
        &service_manifest("keepalive", port, &[backend]),
        port,
        extra,
        None,
    );
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"hello\n").await.unwrap();
    let mut line = String::new();
    let mut r = tokio::io::BufReader::new(&mut client);
    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
        .await
        .expect("echo within 5 s")
        .unwrap();
    assert_eq!(line, "hello\n", "the echo through the proxy");
    let me = client.local_addr().unwrap();
    let (pid, listener) = (proxy.pid(), proxy.addr);
    let found =
        tokio::task::spawn_blocking(move || proxy_sockets(pid, listener, me, backend, timers))
            .await
            .unwrap();
    drop(client);
    drop(proxy);
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sockets_of_a_proxied_connection_carry_a_keepalive_timer() {
    require_tools(
        "both_sockets_of_a_proxied_connection_carry_a_keepalive_timer",
        &["ss"],
        "iproute2",
    );
    // The defaults: keepalive on, 15 s before the first probe. The
    // kernel's own default is 7200 s: 15 s proves TCP_KEEPIDLE is set.
    first_probes_within(
        &[],
        "the default 15 s",
        Duration::ZERO,
        Duration::from_secs(15),
    )
    .await;
    // A non-default time reaches both sockets too.
    first_probes_within(
        &["--tcp-keepalive-time", "300s"],
        "about 300 s",
        Duration::from_secs(200),
        Duration::from_secs(300),
    )
    .await;

    // 0: keepalive off on both.
    let (accepted, to_backend) = one_connection(&["--tcp-keepalive-time", "0"], false).await;
    eprintln!(
        "--tcp-keepalive-time 0:\n  {}\n  {}",
        accepted.line, to_backend.line
    );
    for (what, s) in [("accepted client", &accepted), ("backend", &to_backend)] {
        assert!(
            !s.timer.contains("keepalive"),
            "--tcp-keepalive-time 0, yet the {what} socket has a keepalive timer: {}",
            s.line
        );
    }
}

/// Opens one connection through a proxy started with `flags` and checks
/// that both of its sockets have a keepalive timer whose first probe is
/// more than `above` and at most `at_most` away (`want` says which).
async fn first_probes_within(flags: &[&str], want: &str, above: Duration, at_most: Duration) {
    let (accepted, to_backend) = one_connection(flags, true).await;
    eprintln!("{flags:?}:\n  {}\n  {}", accepted.line, to_backend.line);
    for (what, s) in [("accepted client", &accepted), ("backend", &to_backend)] {
        let left = s.keepalive_left().unwrap_or_else(|| {
            panic!(
                "the proxy's {what} socket has no keepalive timer: {}",
                s.line
            )
        });
        assert!(
            left > above && left <= at_most,
            "the {what} socket's first probe is {left:?} away, not within {want}: {}",
            s.line
        );
    }
}

/// An echo backend in `ns` on its loopback; a thread per connection.
fn echo_backend_in(ns: &Netns) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        tx.send(l.local_addr().unwrap()).unwrap();
        for s in l.incoming().take(1000) {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || {
                let Ok(mut r) = s.try_clone() else { return };
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap()
}

/// Connects from inside `ns` and passes one line through; the socket is
/// handed back open (it stays in `ns`).
fn client_in(ns: &Netns, addr: SocketAddr) -> std::io::Result<TcpStream> {
    ns.spawn(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"hello\n")?;
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line)?;
        if line != "hello\n" {
            return Err(std::io::Error::other(format!("echo: {line:?}")));
        }
        Ok(s)
    })
    .join()
    .unwrap()
}

/// `GET path` from inside `ns`; the body of a 200.
fn get_in(ns: &Netns, addr: SocketAddr, path: &'static str) -> String {
    ns.spawn(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        if !head.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!("GET {path}: {head}")));
        }
        Ok(body.to_string())
    })
    .join()
    .unwrap()
    .unwrap()
}

/// The `kusp_connections_peer_dead_total` sample of service `name`.
fn peers_dead_metric(m: &BTreeMap<String, f64>, name: &str) -> Option<f64> {
    let mut it = m.iter().filter(|(k, _)| {
        k.starts_with("kusp_connections_peer_dead_total{")
            && k.contains(&format!("service=\"{name}\""))
    });
    let (_, v) = it.next()?;
    assert!(it.next().is_none(), "one sample per service port");
    Some(*v)
}

/// The proxy binary inside a namespace; SIGKILLed on drop.
struct NsProxy(Child);

impl Drop for NsProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_client_that_vanishes_is_found_dead_and_its_fds_freed() {
    const TEST: &str = "a_client_that_vanishes_is_found_dead_and_its_fds_freed";
    if !require_root(TEST) {
        return;
    }
    require_tools(TEST, &["iptables"], "iptables");
    let ns = Netns::new("ka");
    let backend = echo_backend_in(&ns);
    let dir = tempfile::tempdir().unwrap();
    // The namespace is fresh: these ports are free in it.
    let port = 30080;
    let listener = SocketAddr::from(([127, 0, 0, 1], port));
    let metrics = SocketAddr::from(([127, 0, 0, 1], 10249));
    std::fs::write(
        dir.path().join("svc.yaml"),
        service_manifest("gone", port, &[backend]),
    )
    .unwrap();
    let mut cmd = ns.command(&[BIN, "--manifests"]);
    cmd.arg(dir.path())
        .arg("--handover-socket")
        .arg(dir.path().join("handover.sock"))
        .args([
            "--bind-address",
            "127.0.0.1",
            "--metrics-bind-address",
            &metrics.to_string(),
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--iptables",
            "off",
            "--log-level",
            "warn",
            "--tcp-keepalive-time",
            "1s",
            "--tcp-keepalive-interval",
            "1s",
            "--tcp-keepalive-probes",
            "2",
        ])
        .stdout(Stdio::null());
    let proxy = NsProxy(cmd.spawn().unwrap());
    let pid = proxy.0.id() as i32;
    // `ip netns exec` execs the command: the child becomes the proxy itself.
    wait_for(
        &format!("pid {pid} (ip netns exec) to exec the proxy"),
        Duration::from_secs(5),
        || {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.ends_with("kube-userspace-proxy"))
        },
    );
    wait_for("the proxy's listener", Duration::from_secs(10), || {
        client_in(&ns, listener).is_ok()
    });
    wait_for("/metrics", Duration::from_secs(5), || {
        peers_dead_metric(&parse_exposition(&get_in(&ns, metrics, "/metrics")), "gone").is_some()
    });
    assert_eq!(
        peers_dead_metric(&parse_exposition(&get_in(&ns, metrics, "/metrics")), "gone"),
        Some(0.0)
    );

    // Settle: the probe connections closed, lazily made things exist.
    let mut last = usize::MAX;
    wait_for("a steady fd count", Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(200));
        let now = fds_of(pid);
        std::mem::replace(&mut last, now) == now
    });
    let before = fds_of(pid);

    let client = client_in(&ns, listener).expect("a line through the proxy");
    let client_port = client.local_addr().unwrap().port();
    let mut open = 0;
    wait_for("the connection's two fds", Duration::from_secs(5), || {
        open = fds_of(pid);
        open >= before + 2
    });
    eprintln!("proxy fds: {before} before, {open} with the connection open");

    // The client vanishes: nothing sent to it arrives, and it sends nothing.
    // Only this connection's packets: a later `/metrics` poll may be given
    // the same ephemeral port, and its SYN-ACK must not be dropped.
    ns.run(&[
        "iptables",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--sport",
        &port.to_string(),
        "--dport",
        &client_port.to_string(),
        "-j",
        "DROP",
    ]);
    let t0 = Instant::now();
    // Idle 1 s, then 2 probes 1 s apart unanswered: dead after ~3 s.
    wait_for(
        "kusp_connections_peer_dead_total{service=\"gone\"} to reach 1",
        Duration::from_secs(10),
        || {
            peers_dead_metric(&parse_exposition(&get_in(&ns, metrics, "/metrics")), "gone")
                == Some(1.0)
        },
    );
    let found = t0.elapsed();
    wait_for("the connection's fds freed", Duration::from_secs(5), || {
        fds_of(pid) <= open - 2
    });
    let freed = t0.elapsed();
    let after = fds_of(pid);
    eprintln!(
        "client found dead {found:?} after it vanished, fds freed after {freed:?}: {open} → {after} (before the connection: {before})"
    );
    assert!(after <= before, "fds back to {before}: {after}");

    let doc: StatusDoc = serde_json::from_str(&get_in(&ns, metrics, "/debug/services")).unwrap();
    let svc = doc
        .services
        .iter()
        .find(|s| s.name == "gone")
        .expect("service gone in /debug/services");
    assert_eq!(svc.peers_dead, 1, "peers_dead in /debug/services");
    assert_eq!(svc.active, 0, "no connection left open");
    drop(client);
    drop(proxy);
}
