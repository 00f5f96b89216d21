//! Network namespaces made by a test and deleted on drop. Nothing here
//! touches the host namespace: veth pairs are created directly inside the
//! test's namespaces.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// True when the test may use namespaces. Without root: fails in CI (the
/// test must run there), skips with a printed reason locally.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        require_tools(
            test,
            &["ip", "iptables-save", "iptables-restore"],
            "iproute2 and iptables",
        );
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root (network namespaces, iptables) and CI must run it");
    }
    eprintln!("SKIPPED {test}: needs root for network namespaces");
    false
}

/// Panics unless every one of `tools` is on PATH (`packages` say where
/// they come from).
pub fn require_tools(test: &str, tools: &[&str], packages: &str) {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(found, "{test}: `{tool}` is missing (install {packages})");
    }
}

/// Polls `f` until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(f(), "timed out waiting for {what}");
}

/// Runs a command and panics with its output when it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace owned by the test.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace with loopback up.
    pub fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("kusp-{tag}-{}-{n}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec NAME args...`, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs `args` inside, panicking on failure; returns stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Connects from inside and returns what the server sent until EOF.
    pub fn fetch(&self, addr: std::net::SocketAddr) -> std::io::Result<String> {
        self.spawn(move || {
            use std::io::Read;
            let timeout = std::time::Duration::from_secs(3);
            let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .join()
        .unwrap()
    }

    /// The interface inside holding address `ip`.
    pub fn link_of(&self, ip: &str) -> String {
        let out = self.run(&["ip", "-o", "addr", "show", "to", ip]);
        out.split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("no interface holds {ip} in {}", self.name))
            .to_string()
    }

    /// `iptables-save -t nat` inside.
    pub fn nat(&self) -> String {
        self.run(&["iptables-save", "-t", "nat"])
    }

    /// `iptables-save -t filter` inside.
    pub fn filter(&self) -> String {
        self.run(&["iptables-save", "-t", "filter"])
    }

    /// A TCP backend in this namespace on `addr`, answering "NAME\n" to
    /// each of its first 2,000 connections; returns once it listens.
    pub fn name_backend(&self, addr: std::net::SocketAddr, name: &'static str) {
        use std::io::Write;
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn(move || {
            let l = std::net::TcpListener::bind(addr).unwrap();
            tx.send(()).unwrap();
            for s in l.incoming().take(2000) {
                let Ok(mut s) = s else { continue };
                let _ = s.write_all(format!("{name}\n").as_bytes());
            }
        });
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    }

    /// A UDP backend in this namespace on `addr`, answering `prefix` + the
    /// datagram to each of its first 1,000 datagrams; returns once bound.
    pub fn udp_backend(&self, addr: std::net::SocketAddr, prefix: &'static str) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn(move || {
            let s = std::net::UdpSocket::bind(addr).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            for _ in 0..1000 {
                let Ok((n, from)) = s.recv_from(&mut buf) else {
                    continue;
                };
                let mut out = prefix.as_bytes().to_vec();
                out.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&out, from);
            }
        });
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it
    /// creates live here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Links two namespaces with a veth pair: `a_cidr` on `a`'s end,
/// `b_cidr` on `b`'s (e.g. "10.234.7.1/24", "10.234.7.2/24"); returns the
/// interface names (in `a`, in `b`).
pub fn veth(a: &Netns, a_cidr: &str, b: &Netns, b_cidr: &str) -> (String, String) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (ea, eb) = (format!("kv{n}a"), format!("kv{n}b"));
    sh(&[
        "ip", "-n", &a.name, "link", "add", &ea, "type", "veth", "peer", "name", &eb, "netns",
        &b.name,
    ]);
    sh(&["ip", "-n", &a.name, "addr", "add", a_cidr, "dev", &ea]);
    sh(&["ip", "-n", &b.name, "addr", "add", b_cidr, "dev", &eb]);
    sh(&["ip", "-n", &a.name, "link", "set", &ea, "up"]);
    sh(&["ip", "-n", &b.name, "link", "set", &eb, "up"]);
    (ea, eb)
}

/// A "node" and a "pod" namespace joined by a veth on `subnet` ("10.234.1"):
/// the node is `.1`, the pod `.2`; the pod routes everything via the node,
/// and the node routes the service range 10.96.0.0/16 out of the veth, as a
/// real node's default route would. Returns (node, pod, pod's interface).
pub fn node_and_pod(tag: &str, subnet: &str) -> (Netns, Netns, String) {
    let node = Netns::new(&format!("{tag}node"));
    let pod = Netns::new(&format!("{tag}pod"));
    let (node_if, pod_if) = veth(
        &node,
        &format!("{subnet}.1/24"),
        &pod,
        &format!("{subnet}.2/24"),
    );
    pod.run(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        &format!("{subnet}.1"),
    ]);
    node.run(&["ip", "route", "add", "10.96.0.0/16", "dev", &node_if]);
    (node, pod, pod_if)
}

/// IPv6 on the link [`node_and_pod`] made on `subnet` ("10.234.1"): the
/// node `{subnet6}::1`, the pod `{subnet6}::2` (`/64`, no duplicate address
/// detection), the pod routed through the node.
pub fn pod_ipv6(node: &Netns, pod: &Netns, pod_if: &str, subnet: &str, subnet6: &str) {
    let node_if = node.link_of(&format!("{subnet}.1"));
    for (ns, dev, host) in [(node, node_if.as_str(), 1), (pod, pod_if, 2)] {
        let addr = format!("{subnet6}::{host}/64");
        ns.run(&["ip", "-6", "addr", "add", &addr, "dev", dev, "nodad"]);
    }
    let via = format!("{subnet6}::1");
    pod.run(&["ip", "-6", "route", "add", "default", "via", &via]);
}
