//! The README's first command: `demo` shows round-robin and retry.

use std::process::Command;

#[test]
fn demo_shows_round_robin_and_a_retry() {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-userspace-proxy"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("answered: backend-a ×6, backend-b ×6"),
        "{stdout}"
    );
    assert!(stdout.contains("refused → retried"), "{stdout}");
    assert!(
        stdout.contains("0 failed; dials: 1 failed, 1 retries"),
        "{stdout}"
    );
    assert!(stdout.contains("UDP: hello.demo A 192.0.2.53"), "{stdout}");
}
