//! The proxy binary and test peers as processes of their own, for tests
//! that count a process's fds and memory or need more fds than one
//! process may hold. Peers are this test binary run again in a "role"
//! (see [`role`]), so nothing beyond the test itself is needed.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// The proxy binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_kube-userspace-proxy");

/// Env var that makes a re-run test binary act as a peer.
const ROLE_ENV: &str = "KUSP_TEST_ROLE";

/// A free port on 127.0.0.1 (TCP and UDP), for a process to bind later.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`),
/// never one the kernel chose: a port bound then released in that range
/// could be handed to any socket (another test's `bind(0)` or `connect`)
/// before the process binds it, which failed a test one run in forty
/// ("cannot serve metrics: Address already in use"). Ports are dealt in
/// turn from a start set by the process id, so two tests of one binary
/// never get the same one, and each is checked free before it is given.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    // Above kube-proxy's own 10249 and 10256, below the NodePorts.
    const WINDOW: std::ops::Range<u32> = 11_000..30_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    let len = WINDOW.end - WINDOW.start;
    let start = std::process::id().wrapping_mul(7919) % len;
    let _ = NEXT.compare_exchange(u32::MAX, start, Relaxed, Relaxed);
    for _ in 0..len {
        let port = WINDOW.start + NEXT.fetch_add(1, Relaxed) % len;
        if (low..=high).contains(&port) {
            continue;
        }
        let addr = ("127.0.0.1", port as u16);
        if std::net::TcpListener::bind(addr).is_ok() && std::net::UdpSocket::bind(addr).is_ok() {
            return port as u16;
        }
    }
    // The ephemeral range covers the window: what the kernel gives.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Raises this process's RLIMIT_NOFILE soft limit to the hard one.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

/// A NodePort Service `ns/name` (port `web`) on `node_port`, with one
/// ready endpoint per address.
pub fn service_manifest(name: &str, node_port: u16, endpoints: &[SocketAddr]) -> String {
    let port = endpoints.first().map_or(80, |a| a.port());
    let eps: String = endpoints
        .iter()
        .map(|a| format!("  - addresses: [\"{}\"]\n", a.ip()))
        .collect();
    assert!(
        endpoints.iter().all(|a| a.port() == port),
        "one port per slice"
    );
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: ns\nspec:\n  type: NodePort\n  ports:\n    - name: web\n      port: 80\n      nodePort: {node_port}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: ns\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - name: web\n    port: {port}\nendpoints:\n{eps}"
    )
}

/// A running proxy process; killed on drop.
pub struct ProxyProc {
    pub child: Child,
    /// Its manifests directory.
    pub dir: tempfile::TempDir,
    /// Where its service listens.
    pub addr: SocketAddr,
    /// Its `/metrics` server.
    pub metrics: SocketAddr,
}

impl ProxyProc {
    /// Starts the proxy on a manifests directory holding `manifest`, with
    /// `--iptables off`, admin servers on ephemeral ports (unless `extra`
    /// names `--healthz-bind-address`), and `extra` flags; waits until
    /// `listener_port` accepts. `nofile` caps its fds (soft and hard, so
    /// the raise at start-up cannot lift it).
    pub fn start(manifest: &str, listener_port: u16, extra: &[&str], nofile: Option<u64>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.yaml"), manifest).unwrap();
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Self::spawn(dir.path(), metrics, extra, nofile);
        let p = Self {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], listener_port)),
            metrics,
        };
        p.wait_listening(Duration::from_secs(10));
        p
    }

    /// Spawns the binary on `dir` (no waiting).
    pub fn spawn(dir: &Path, metrics: SocketAddr, extra: &[&str], nofile: Option<u64>) -> Child {
        let mut cmd = Command::new(BIN);
        cmd.arg("--manifests")
            .arg(dir)
            .arg("--metrics-bind-address")
            .arg(metrics.to_string())
            .args([
                "--bind-address",
                "127.0.0.1",
                "--iptables",
                "off",
                "--log-level",
                "warn",
            ])
            .args(extra)
            .stdout(Stdio::null());
        // A hand-over socket of its own (next to its manifests, so a
        // restart on the same directory takes over) unless the test names one.
        if !extra.contains(&"--handover-socket") {
            cmd.arg("--handover-socket").arg(dir.join("handover.sock"));
        }
        // An ephemeral port unless the test names one.
        if !extra.contains(&"--healthz-bind-address") {
            cmd.args(["--healthz-bind-address", "127.0.0.1:0"]);
        }
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                        .map_err(std::io::Error::from)
                });
            }
        }
        cmd.spawn().unwrap()
    }

    /// Waits until the service listener accepts; panics after `timeout`.
    pub fn wait_listening(&self, timeout: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if std::net::TcpStream::connect(self.addr).is_ok() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("proxy not listening on {} after {timeout:?}", self.addr);
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// One sample of its `/metrics`, by series (name with labels).
    pub async fn scrape(&self) -> std::collections::BTreeMap<String, f64> {
        let (code, body) = super::http(self.metrics, "GET", "/metrics").await;
        assert_eq!(code, 200, "{body}");
        super::parse_exposition(&body)
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open fds of process `pid`.
pub fn fds_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Resident memory of process `pid`, KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// CPU time (user + system) of process `pid`, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    f[11] + f[12]
}

/// When this binary was started as a peer (`KUSP_TEST_ROLE=name`), the
/// role's name.
pub fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// A peer process: this test binary re-run with only `test` selected and
/// `KUSP_TEST_ROLE=role`. The peer reports its address on a stdout line
/// `ADDR <socket address>`; killed on drop.
pub struct Peer {
    pub child: Child,
    pub addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts `test` of this binary as peer `role` and waits for its address.
    pub fn start(test: &str, role: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                test,
                "--exact",
                "--nocapture",
                "--ignored",
                "--test-threads=1",
            ])
            .env(ROLE_ENV, role)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "peer {role} exited");
            // libtest may have written "test NAME ... " on the same line.
            if let Some((_, a)) = line.trim().split_once("ADDR ") {
                break a.parse().unwrap();
            }
        };
        Self {
            child,
            addr,
            _stdout: out,
        }
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Announces a peer's address to [`Peer::start`].
pub fn announce(addr: SocketAddr) {
    use std::io::Write;
    println!("ADDR {addr}");
    let _ = std::io::stdout().flush();
}
