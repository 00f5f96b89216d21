//! Least privilege, as deploy/ runs it: the binary with file capabilities
//! `cap_net_admin,cap_net_bind_service+ep`, started as uid 65532 with a
//! bounding set of just those two, inside a namespace the test makes. It
//! must hold exactly those capabilities, apply its iptables rules (the
//! iptables children get NET_ADMIN as an ambient capability), serve a
//! port below 1024, and remove its rules on SIGTERM.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use common::netns::{require_root, require_tools, sh, wait_for, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_kube-userspace-proxy");

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

#[test]
fn runs_as_non_root_with_exactly_net_admin_and_net_bind_service() {
    if !require_root("runs_as_non_root_with_exactly_net_admin_and_net_bind_service") {
        return;
    }
    require_tools(
        "runs_as_non_root",
        &["setcap", "setpriv", "ss"],
        "libcap2-bin, util-linux and iproute2",
    );
    // A world-readable copy of the binary with file capabilities, as the
    // container image has it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("kube-userspace-proxy");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    sh(&[
        "setcap",
        "cap_net_admin,cap_net_bind_service+ep",
        bin.to_str().unwrap(),
    ]);
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::set_permissions(&manifests, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        manifests.join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 80}]\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [\"127.0.0.1\"]}]\n",
    )
    .unwrap();
    std::fs::set_permissions(
        manifests.join("web.yaml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();

    let ns = Netns::new("nonroot");
    let mut child = ns
        .command(&[
            "setpriv",
            "--reuid=65532",
            "--regid=65532",
            "--clear-groups",
            "--bounding-set=-all,+net_admin,+net_bind_service",
            "--",
            bin.to_str().unwrap(),
            "--manifests",
            manifests.to_str().unwrap(),
            "--iptables",
            "on",
            "--metrics-bind-address",
            "127.0.0.1:0",
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // `ip netns exec` execs setpriv, which execs the proxy: same pid.
    let pid = child.id();
    wait_for("the rules", Duration::from_secs(10), || {
        ns.nat()
            .contains("-d 10.96.0.10/32 -p tcp -m tcp --dport 80")
    });
    assert!(
        status_field(pid, "Uid:").starts_with("65532"),
        "runs as 65532"
    );
    // CAP_NET_BIND_SERVICE is bit 10, CAP_NET_ADMIN bit 12.
    assert_eq!(
        status_field(pid, "CapEff:"),
        "0000000000001400",
        "exactly the two capabilities"
    );
    assert_eq!(
        status_field(pid, "CapAmb:"),
        "0000000000001000",
        "NET_ADMIN passed on to iptables"
    );
    // Port 80 is below 1024: NET_BIND_SERVICE at work.
    let listening = ns.run(&["ss", "-Htln", "sport = :80"]);
    assert!(listening.contains(":80"), "{listening}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("exit", Duration::from_secs(15), || {
        child.try_wait().unwrap().is_some()
    });
    assert!(
        !ns.nat().contains("10.96.0.10"),
        "rules removed as non-root too"
    );
}
