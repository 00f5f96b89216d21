//! fd hygiene: a client that resets mid-transfer leaves nothing open.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use kube_userspace_proxy::proxy::CopyMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client that resets mid-transfer: both sockets closed, nothing leaks.
async fn client_reset_leaks_nothing(mode: CopyMode) {
    let backend = bulk_backend().await;
    let mut p = proxier(mode);
    let addr = serve(&mut p, &snapshot("reset", &[backend], None), "reset");
    let stats = service(&p, "reset");
    let pipes = || p.context().pipes.idle();

    // Warm up once so lazily created things (pipes) exist before counting.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"source 1000000\n").await.unwrap();
    let mut sink = Vec::new();
    s.read_to_end(&mut sink).await.unwrap();
    drop(s);
    assert!(
        eventually(Duration::from_secs(2), || stats.stats.active.load(Relaxed)
            == 0)
        .await
    );
    let before = fd_count() - 2 * pipes();

    for _ in 0..20 {
        let s = TcpStream::connect(addr).await.unwrap();
        let mut s = s;
        s.write_all(b"source 1000000000\n").await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < 1_000_000 {
            got += s.read(&mut buf).await.unwrap();
        }
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s); // RST mid-transfer
    }
    assert!(
        eventually(Duration::from_secs(5), || stats.stats.active.load(Relaxed)
            == 0)
        .await,
        "{mode}: connections not closed after client reset"
    );
    // Give the backend tasks a moment to notice their resets too.
    assert!(
        eventually(Duration::from_secs(5), || fd_count() - 2 * pipes()
            <= before)
        .await,
        "{mode}: fds leaked: before {before}, after {}",
        fd_count() - 2 * pipes()
    );
}

// One test in this binary: the fd count is process-wide, so nothing may
// run beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_mid_transfer_leaks_no_fds_in_either_mode() {
    client_reset_leaks_nothing(CopyMode::Splice).await;
    client_reset_leaks_nothing(CopyMode::Copy).await;
}
