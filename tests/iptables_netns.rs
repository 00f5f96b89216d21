//! The iptables redirect, for real, inside network namespaces the tests
//! create: a "node" namespace runs the proxy binary, a "pod" namespace
//! holds the client and the backend. The host's own rules are never touched.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::netns::{node_and_pod, require_root, sh, wait_for, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_kube-userspace-proxy");

fn manifest(cluster_ip: &str, backend: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: ns}}\n\
         spec:\n  clusterIP: {cluster_ip}\n  externalIPs: [198.18.0.7]\n  ports: [{{name: http, port: 80}}, {{name: dns, port: 53, protocol: UDP}}]\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}}}, {{name: dns, port: {}, protocol: UDP}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n",
        backend.port(),
        backend.port() + 1,
        backend.ip()
    )
}

/// The proxy binary running inside `ns`; SIGKILLed on drop if still alive.
struct Proxy(Child);

impl Proxy {
    fn start(ns: &Netns, dir: &Path) -> Self {
        Self::start_with(ns, dir, &[])
    }

    fn start_with(ns: &Netns, dir: &Path, extra: &[&str]) -> Self {
        let mut cmd = ns.command(&[BIN, "--manifests"]);
        cmd.arg(dir)
            .args([
                "--iptables",
                "on",
                "--iptables-min-sync-period",
                "100ms",
                "--log-level",
                "warn",
            ])
            .args(extra)
            .stdout(Stdio::null());
        // A hand-over socket of the test's own, never the node's default.
        if !extra.contains(&"--handover-socket") {
            cmd.arg("--handover-socket").arg(dir.join("handover.sock"));
        }
        Proxy(cmd.spawn().unwrap())
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), sig).unwrap();
    }

    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends "query" over UDP from inside `ns`; the answer must come back from
/// the address asked (conntrack reverses the REDIRECT).
fn ask_udp(ns: &Netns, addr: SocketAddr) -> std::io::Result<String> {
    ns.spawn(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.connect(addr)?;
        s.send(b"query")?;
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .join()
    .unwrap()
}

/// Splits an iptables-save rule into arguments, honouring double quotes.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn cluster_ip_is_reached_from_a_pod_and_from_the_node_and_follows_the_service() {
    if !require_root("cluster_ip_is_reached_from_a_pod_and_from_the_node") {
        return;
    }
    let (node, pod, _) = node_and_pod("", "10.234.1");
    let backend_addr: SocketAddr = "10.234.1.2:8080".parse().unwrap();
    pod.name_backend(backend_addr, "pod-backend");
    pod.udp_backend(
        SocketAddr::new(backend_addr.ip(), backend_addr.port() + 1),
        "udp-backend:",
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        manifest("10.96.0.10", backend_addr),
    )
    .unwrap();
    let mut proxy = Proxy::start(&node, dir.path());
    wait_for("rules for ns/web", Duration::from_secs(10), || {
        node.nat().contains("ns/web:http")
    });

    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    assert_eq!(pod.fetch(vip).unwrap(), "pod-backend\n", "pod → ClusterIP");
    assert_eq!(
        node.fetch(vip).unwrap(),
        "pod-backend\n",
        "node → ClusterIP"
    );
    let dns_vip: SocketAddr = "10.96.0.10:53".parse().unwrap();
    assert_eq!(
        ask_udp(&pod, dns_vip).unwrap(),
        "udp-backend:query",
        "pod → UDP ClusterIP"
    );
    assert_eq!(
        ask_udp(&node, dns_vip).unwrap(),
        "udp-backend:query",
        "node → UDP ClusterIP"
    );
    let external: SocketAddr = "198.18.0.7:80".parse().unwrap();
    sh(&[
        "ip",
        "-n",
        &pod.name,
        "route",
        "add",
        "198.18.0.7/32",
        "via",
        "10.234.1.1",
    ]);
    assert_eq!(
        pod.fetch(external).unwrap(),
        "pod-backend\n",
        "pod → externalIP"
    );

    let nat = node.nat();
    assert_eq!(count(&nat, "-j KUSP-PORTALS-CONTAINER"), 1, "{nat}");
    assert_eq!(count(&nat, "-j KUSP-PORTALS-HOST"), 1, "{nat}");

    // Removing the service removes its rules (the chains stay, empty).
    std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
    wait_for("rules of ns/web removed", Duration::from_secs(5), || {
        !node.nat().contains("ns/web:http")
    });
    assert!(node.nat().contains(":KUSP-PORTALS-CONTAINER"));

    // A clean SIGTERM removes everything of ours.
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(proxy.wait(Duration::from_secs(15)), Some(0));
    let (nat, filter) = (node.nat(), node.filter());
    assert!(
        !nat.contains("KUSP") && !filter.contains("KUSP"),
        "rules left after SIGTERM:\n{nat}{filter}"
    );
}

#[test]
fn kill_9_then_restart_keeps_one_jump_and_cleanup_removes_all() {
    if !require_root("kill_9_then_restart_keeps_one_jump_and_cleanup_removes_all") {
        return;
    }
    let node = Netns::new("node");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        manifest("10.96.0.20", "127.0.0.1:9".parse().unwrap()),
    )
    .unwrap();
    // A rule of someone else's in the same chains must survive us.
    node.run(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "203.0.113.9/32",
        "-j",
        "ACCEPT",
    ]);

    let mut first = Proxy::start(&node, dir.path());
    wait_for("first rules", Duration::from_secs(10), || {
        node.nat().contains("ns/web:http")
    });
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait(Duration::from_secs(5));
    assert!(node.nat().contains("KUSP"), "kill -9 leaves rules behind");
    // A duplicate filter jump (as from two runs racing): the next run keeps one.
    node.run(&[
        "iptables",
        "-I",
        "FORWARD",
        "1",
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "comment",
        "--comment",
        "kube-userspace-proxy service portals",
        "-j",
        "KUSP-SERVICES",
    ]);
    assert_eq!(count(&node.filter(), "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy service portals\" -j KUSP-SERVICES"), 2);

    let mut second = Proxy::start_with(&node, dir.path(), &["--iptables-sync-period", "1s"]);
    std::thread::sleep(Duration::from_millis(500));
    wait_for("rules after restart", Duration::from_secs(10), || {
        node.nat().contains("ns/web:http")
    });
    let nat = node.nat();
    assert_eq!(count(&nat, "-j KUSP-PORTALS-CONTAINER"), 1, "{nat}");
    assert_eq!(count(&nat, "-j KUSP-PORTALS-HOST"), 1, "{nat}");
    let filter = node.filter();
    assert_eq!(count(&filter, "-j KUSP-SERVICES"), 2, "{filter}");
    assert_eq!(count(&filter, "-j KUSP-EXTERNAL-SERVICES"), 2, "{filter}");
    assert_eq!(
        count(&nat, "ns/web:http"),
        4,
        "one rule per chain and address: {nat}"
    );

    // Someone flushes our chain and deletes a jump: the periodic sync repairs both.
    node.run(&["iptables", "-t", "nat", "-F", "KUSP-PORTALS-CONTAINER"]);
    let jump = nat
        .lines()
        .find(|l| l.starts_with("-A PREROUTING") && l.contains("KUSP-PORTALS-CONTAINER"))
        .unwrap()
        .replacen("-A ", "-D ", 1);
    let mut del = vec!["iptables", "-t", "nat"];
    let words = shell_words(&jump);
    del.extend(words.iter().map(String::as_str));
    node.run(&del);
    wait_for("repair", Duration::from_secs(5), || {
        let nat = node.nat();
        count(&nat, "ns/web:http") == 4 && count(&nat, "-j KUSP-PORTALS-CONTAINER") == 1
    });

    second.signal(nix::sys::signal::Signal::SIGKILL);
    second.wait(Duration::from_secs(5));
    let out = node.command(&[BIN, "--cleanup"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nat = node.nat();
    assert!(!nat.contains("KUSP"), "--cleanup left:\n{nat}");
    let filter = node.filter();
    assert!(!filter.contains("KUSP"), "--cleanup left:\n{filter}");
    assert!(
        nat.contains("-A OUTPUT -d 203.0.113.9/32 -j ACCEPT"),
        "a foreign rule was removed:\n{nat}"
    );
}

#[test]
fn iptables_on_without_privileges_fails_start_up_clearly() {
    // Not root-only: as non-root, `--iptables on` must fail with a clear
    // message; as root, run it with the tool missing from PATH instead.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["--iptables", "on", "--manifests"])
        .arg(dir.path())
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--iptables on"), "{err}");
}

#[test]
fn a_failed_restore_names_the_line_and_keeps_the_previous_rules() {
    use kube_userspace_proxy::detect_local::Detector;
    use kube_userspace_proxy::iptables::exec::Tool;
    use kube_userspace_proxy::iptables::render::{
        render, Disposition, JumpState, Portal, PortalKind,
    };
    use kube_userspace_proxy::iptables::Error;
    use kube_userspace_proxy::model::Protocol;

    if !require_root("a_failed_restore_names_the_line_and_keeps_the_previous_rules") {
        return;
    }
    let node = Netns::new("node");
    let result = node
        .spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let tool = Tool {
                    restore: "iptables-restore".into(),
                    save: "iptables-save".into(),
                };
                let good = render(
                    &vec![Portal {
                        ip: "10.96.0.30".parse().unwrap(),
                        port: 80,
                        protocol: Protocol::Tcp,
                        listener_port: 31000,
                        kind: PortalKind::ClusterIp,
                        comment: "ns/good:http".into(),
                        disposition: Disposition::Redirect,
                        source_ranges: Vec::new(),
                    }]
                    .into(),
                    false,
                    "0.0.0.0".parse().unwrap(),
                    &Detector::default(),
                    &JumpState::default(),
                );
                tool.restore(&good).await.unwrap();
                let bad = good.replace("REDIRECT --to-ports 31000", "NO-SUCH-TARGET");
                tool.restore(&bad).await
            })
        })
        .join()
        .unwrap();
    match result {
        // legacy names the bad rule's line, nft the COMMIT line; both say why.
        Err(Error::Failed {
            line: Some(_),
            stderr,
            ..
        }) => assert!(stderr.contains("NO-SUCH-TARGET"), "{stderr}"),
        other => panic!("expected a failure naming the line, got {other:?}"),
    }
    let nat = node.nat();
    assert_eq!(
        count(&nat, "ns/good:http"),
        2,
        "previous rules kept:\n{nat}"
    );
}

/// An echo backend in `ns` on `addr`, a thread per connection.
fn echo_backend(ns: &Netns, addr: SocketAddr) {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let l = TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        for s in l.incoming().take(100_000) {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || {
                let Ok(mut r) = s.try_clone() else { return };
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

/// One message echoed over `s`.
fn echo_once(s: &mut std::net::TcpStream, msg: &[u8]) -> std::io::Result<()> {
    use std::io::Read;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

#[test]
fn a_hand_over_keeps_the_rules_and_cluster_ip_connections() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Arc;
    if !require_root("a_hand_over_keeps_the_rules_and_cluster_ip_connections") {
        return;
    }
    let (node, pod, _) = node_and_pod("ho", "10.234.3");
    let backend_addr: SocketAddr = "10.234.3.2:8080".parse().unwrap();
    echo_backend(&pod, backend_addr);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        manifest("10.96.0.30", backend_addr),
    )
    .unwrap();
    let mut old = Proxy::start_with(&node, dir.path(), &["--shutdown-grace", "30s"]);
    wait_for("rules for ns/web", Duration::from_secs(10), || {
        count(&node.nat(), "ns/web:http") == 4
    });
    let vip: SocketAddr = "10.96.0.30:80".parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Long-lived ClusterIP connections from the pod, talking every 50 ms.
    let longs: Vec<_> = (0..20)
        .map(|i| {
            let stop = Arc::clone(&stop);
            pod.spawn(move || -> Result<usize, String> {
                let mut s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(3))
                    .map_err(|e| format!("{i}: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut n = 0;
                while !stop.load(Relaxed) {
                    echo_once(&mut s, format!("{i}:{n:08}").as_bytes())
                        .map_err(|e| format!("{i} after {n}: {e}"))?;
                    n += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(n)
            })
        })
        .collect();
    // Short ClusterIP connections in a loop.
    let shorts = {
        let stop = Arc::clone(&stop);
        pod.spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Relaxed) {
                let r = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(3))
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(3)))?;
                        echo_once(&mut s, b"short")
                    });
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    // The rules, sampled throughout.
    let sampler = {
        let stop = Arc::clone(&stop);
        let name = node.name.clone();
        std::thread::spawn(move || {
            let (mut samples, mut missing) = (0, Vec::new());
            while !stop.load(Relaxed) {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &name, "iptables-save", "-t", "nat"])
                    .output()
                    .unwrap();
                let nat = String::from_utf8_lossy(&out.stdout).into_owned();
                samples += 1;
                if count(&nat, "ns/web:http") != 4
                    || count(&nat, "-j KUSP-PORTALS-CONTAINER") != 1
                    || count(&nat, "-j KUSP-PORTALS-HOST") != 1
                {
                    missing.push(nat);
                }
            }
            (samples, missing)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let new = Proxy::start_with(&node, dir.path(), &["--shutdown-grace", "30s"]);
    assert_eq!(
        old.wait(Duration::from_secs(15)),
        Some(0),
        "the old process exits 0 after the hand-over"
    );
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Relaxed);
    let (samples, missing) = sampler.join().unwrap();
    let (ok, failed) = shorts.join().unwrap();
    let mut errors: Vec<String> = failed;
    for l in longs {
        if let Err(e) = l.join().unwrap() {
            errors.push(e);
        }
    }
    eprintln!(
        "hand-over in a netns: {samples} iptables-save samples, {} without our rules; {ok} short ClusterIP connections ok, {} errors",
        missing.len(),
        errors.len()
    );
    assert!(missing.is_empty(), "rules missing:\n{}", missing[0]);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(ok > 0);
    // The new one owns the rules now: a plain stop removes them.
    let mut new = new;
    new.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(new.wait(Duration::from_secs(15)), Some(0));
    assert!(!node.nat().contains("KUSP"), "rules left after SIGTERM");
}
