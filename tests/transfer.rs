//! Byte moving in both modes: bulk integrity, half-close, resets, fd hygiene.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use kube_userspace_proxy::proxy::CopyMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BULK: usize = 100 * 1024 * 1024;

async fn bulk_both_ways(mode: CopyMode) {
    let backend = bulk_backend().await;
    let mut p = proxier(mode);
    let addr = serve(&mut p, &snapshot("bulk", &[backend], None), "bulk");

    // client → backend: the backend hashes what arrived.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"sink\n").await.unwrap();
    let sent = send_pattern(&mut s, BULK).await.unwrap();
    s.shutdown().await.unwrap(); // half-close: the answer still comes back
    let mut got = [0u8; 8];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(
        u64::from_le_bytes(got),
        sent,
        "{mode}: client → backend corrupted"
    );

    // backend → client.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("source {BULK}\n").as_bytes())
        .await
        .unwrap();
    let mut h = StreamHash::default();
    let mut n = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let r = s.read(&mut buf).await.unwrap();
        if r == 0 {
            break;
        }
        std::hash::Hasher::write(&mut h, &buf[..r]);
        n += r;
    }
    assert_eq!(n, BULK);
    assert_eq!(
        std::hash::Hasher::finish(&h),
        pattern_hash(BULK),
        "{mode}: backend → client corrupted"
    );
    drop(s);

    let stats = &service(&p, "bulk").stats;
    assert!(eventually(Duration::from_secs(2), || stats.active.load(Relaxed) == 0).await);
    assert_eq!(
        stats.bytes_in.load(Relaxed),
        (BULK + 5 + format!("source {BULK}\n").len()) as u64
    );
    assert_eq!(stats.bytes_out.load(Relaxed), (BULK + 8) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_moves_100_mib_each_way_intact() {
    bulk_both_ways(CopyMode::Splice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_moves_100_mib_each_way_intact() {
    bulk_both_ways(CopyMode::Copy).await;
}

/// Client sends, shuts its write side; the server answers after EOF, then closes.
async fn half_close(mode: CopyMode) {
    let (l, backend) = listener().await;
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        let answer = format!("got {} bytes", req.len());
        s.write_all(answer.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut p = proxier(mode);
    let addr = serve(&mut p, &snapshot("half", &[backend], None), "half");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hello world").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "got 11 bytes", "{mode}");
}

#[tokio::test]
async fn splice_honours_half_close() {
    half_close(CopyMode::Splice).await;
}

#[tokio::test]
async fn copy_honours_half_close() {
    half_close(CopyMode::Copy).await;
}

#[tokio::test]
async fn idle_connections_hold_no_pipes() {
    let backend = echo_backend().await;
    let mut p = proxier(CopyMode::Splice);
    let addr = serve(&mut p, &snapshot("idle", &[backend], None), "idle");
    let mut conns = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        conns.push(s);
    }
    // 50 idle connections that have moved bytes: no pipe is held by any of
    // them; the pool created few (bytes were in flight one at a time).
    let created = p.context().pipes.created.load(Relaxed);
    assert!(
        created <= 4,
        "{created} pipes created for sequential traffic"
    );
    // The worker gives a pipe back once its splice finds the socket empty,
    // which may be just after the client read its byte.
    let pipes = &p.context().pipes;
    assert!(
        eventually(Duration::from_secs(2), || pipes.idle() as u64 == created).await,
        "every pipe is back in the pool: {} of {created} idle",
        pipes.idle()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_moves_100_mib_each_way_intact() {
    bulk_both_ways(CopyMode::Auto).await;
}

#[tokio::test]
async fn auto_honours_half_close() {
    half_close(CopyMode::Auto).await;
}

/// `auto` moves request-sized messages through user memory: no pipe is
/// created until a read fills its buffer.
#[tokio::test]
async fn auto_takes_no_pipe_for_small_messages() {
    let backend = echo_backend().await;
    let mut p = proxier(CopyMode::Auto);
    let addr = serve(&mut p, &snapshot("small", &[backend], None), "small");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 100];
    for i in 0..200u8 {
        s.write_all(&[i; 100]).await.unwrap();
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b, [i; 100]);
    }
    assert_eq!(p.context().pipes.created.load(Relaxed), 0);
    // Counted right after each send, on the worker: possibly just after
    // the client read the bytes.
    let stats = &service(&p, "small").stats;
    let counted =
        || stats.bytes_in.load(Relaxed) == 20_000 && stats.bytes_out.load(Relaxed) == 20_000;
    assert!(
        eventually(Duration::from_secs(2), counted).await,
        "bytes counted: {} in, {} out",
        stats.bytes_in.load(Relaxed),
        stats.bytes_out.load(Relaxed)
    );
}
