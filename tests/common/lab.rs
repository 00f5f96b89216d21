//! The proxy binary in a "node" namespace and the clients around it, for
//! the tests of our iptables rules: start and stop it, connect (TCP) or
//! ask (UDP) from a namespace and say what was seen, read rule counters,
//! link an outside client, read `/debug/services`.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::netns::{require_tools, veth, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_kube-userspace-proxy");

/// The proxy's metrics address, inside its namespace.
pub const METRICS: &str = "127.0.0.1:10249";

/// Panics unless we are root with the tools: these tests must run.
pub fn require_root_and_tools(test: &str) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "{test}: needs root (network namespaces, iptables); run it as root"
    );
    require_tools(
        test,
        &[
            "ip",
            "iptables",
            "iptables-save",
            "iptables-restore",
            "sysctl",
        ],
        "iproute2, iptables and procps",
    );
}

/// The proxy binary running inside `ns` on the manifests in `dir`, rules
/// on, metrics on [`METRICS`]; SIGKILLed on drop if still alive.
pub struct Proxy(pub Child);

impl Proxy {
    /// The command, not yet started, with `extra` flags (`--iptables on`, a
    /// 100 ms min sync period, warnings only; healthz on loopback unless
    /// `extra` names it).
    pub fn command(ns: &Netns, dir: &Path, extra: &[&str]) -> std::process::Command {
        let mut cmd = ns.command(&[BIN, "--manifests"]);
        cmd.arg(dir).args([
            "--iptables",
            "on",
            "--iptables-min-sync-period",
            "100ms",
            "--log-level",
            "warn",
            "--metrics-bind-address",
            METRICS,
        ]);
        if !extra.contains(&"--healthz-bind-address") {
            cmd.args(["--healthz-bind-address", "127.0.0.1:0"]);
        }
        cmd.args(extra)
            .arg("--handover-socket")
            .arg(dir.join("handover.sock"))
            .stdout(Stdio::null());
        cmd
    }

    /// Starts [`Self::command`].
    pub fn start(ns: &Netns, dir: &Path, extra: &[&str]) -> Self {
        Proxy(Self::command(ns, dir, extra).spawn().unwrap())
    }

    /// SIGTERM, then asserts a clean exit (status 0) within 15 s.
    pub fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Some(status) = self.0.try_wait().unwrap() {
                assert_eq!(status.code(), Some(0), "proxy exit status");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the proxy did not stop within 15 s of SIGTERM");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a client saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// The answer (TCP: everything until EOF).
    Answer(String),
    /// ECONNREFUSED (RST or ICMP port unreachable).
    Refused,
    /// Nothing within the timeout.
    TimedOut,
    /// Anything else.
    Other(String),
}

/// What an I/O error means to a client.
pub fn seen_error(e: &std::io::Error) -> Seen {
    match e.kind() {
        ErrorKind::ConnectionRefused => Seen::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Seen::TimedOut,
        _ => Seen::Other(e.to_string()),
    }
}

/// Connects over TCP from inside `ns` and reads until EOF; how long the
/// connect took.
pub fn tcp(ns: &Netns, addr: SocketAddr, timeout: Duration) -> (Seen, Duration) {
    ns.spawn(move || {
        let t0 = Instant::now();
        let mut s = match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => s,
            Err(e) => return (seen_error(&e), t0.elapsed()),
        };
        let took = t0.elapsed();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) => (Seen::Answer(out), took),
            Err(e) => (Seen::Other(format!("read: {e}")), took),
        }
    })
    .join()
    .unwrap()
}

/// Sends "query" from a connected UDP socket inside `ns` and waits for
/// the answer (an ICMP port unreachable shows as ECONNREFUSED); how long
/// it took.
pub fn udp(ns: &Netns, addr: SocketAddr, timeout: Duration) -> (Seen, Duration) {
    ns.spawn(move || {
        let any = match addr {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let s = UdpSocket::bind(SocketAddr::new(any, 0)).unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        s.connect(addr).unwrap();
        let t0 = Instant::now();
        // From the node itself, a REJECT in OUTPUT also fails the send
        // (EPERM); its ICMP port unreachable still reaches the socket.
        match s.send(b"query") {
            Err(e) if e.raw_os_error() != Some(libc::EPERM) => {
                return (seen_error(&e), t0.elapsed())
            }
            _ => {}
        }
        let mut buf = [0u8; 2048];
        match s.recv(&mut buf) {
            Ok(n) => (
                Seen::Answer(String::from_utf8_lossy(&buf[..n]).into_owned()),
                t0.elapsed(),
            ),
            Err(e) => (seen_error(&e), t0.elapsed()),
        }
    })
    .join()
    .unwrap()
}

/// Asserts `seen` is a refusal (TCP, or UDP with ICMP) within 100 ms.
pub fn assert_refused_fast(what: &str, seen: (Seen, Duration)) {
    assert_eq!(seen.0, Seen::Refused, "{what}");
    assert!(
        seen.1 < Duration::from_millis(100),
        "{what}: refused only after {:?}",
        seen.1
    );
}

/// `iptables-save -c -t filter` inside `ns`: the packet count of the one
/// rule containing `needle`.
pub fn packets(ns: &Netns, needle: &str) -> u64 {
    packets_of(&ns.run(&["iptables-save", "-c", "-t", "filter"]), needle)
}

/// [`packets`] of the IPv6 `filter` table (`ip6tables-save`).
pub fn packets6(ns: &Netns, needle: &str) -> u64 {
    packets_of(&ns.run(&["ip6tables-save", "-c", "-t", "filter"]), needle)
}

fn packets_of(saved: &str, needle: &str) -> u64 {
    let lines: Vec<&str> = saved.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "one rule with {needle:?}:\n{saved}");
    lines[0]
        .strip_prefix('[')
        .and_then(|l| l.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counters in {:?}", lines[0]))
}

/// How many lines of `haystack` contain `needle`.
pub fn count(haystack: &str, needle: &str) -> usize {
    haystack.lines().filter(|l| l.contains(needle)).count()
}

/// An "ext" namespace linked to `node` on `subnet`: node `.1`, ext `.2`,
/// and with `subnet6` ("fd00:1:2") `::1` and `::2` (`/64`, no duplicate
/// address detection), each family routed via the node; returns it and the
/// node's IPv4 address on the link.
pub fn external_client(node: &Netns, subnet: &str, subnet6: Option<&str>) -> (Netns, String) {
    let ext = Netns::new("ext");
    let (node_if, ext_if) = veth(
        node,
        &format!("{subnet}.1/24"),
        &ext,
        &format!("{subnet}.2/24"),
    );
    ext.run(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        &format!("{subnet}.1"),
    ]);
    if let Some(net6) = subnet6 {
        for (ns, dev, host) in [(node, &node_if, 1), (&ext, &ext_if, 2)] {
            let addr = format!("{net6}::{host}/64");
            ns.run(&["ip", "-6", "addr", "add", &addr, "dev", dev, "nodad"]);
        }
        let via = format!("{net6}::1");
        ext.run(&["ip", "-6", "route", "add", "default", "via", &via]);
    }
    (ext, format!("{subnet}.1"))
}

/// `/debug/services` of the proxy in `ns` (metrics on [`METRICS`]);
/// `Null` when it does not answer.
pub fn debug_services(ns: &Netns) -> serde_json::Value {
    let metrics: SocketAddr = METRICS.parse().unwrap();
    let body = ns
        .spawn(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&metrics, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /debug/services HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .join()
        .unwrap()
        .unwrap_or_default();
    let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(json).unwrap_or(serde_json::Value::Null)
}
