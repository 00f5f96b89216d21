//! Readiness and mover stress: 1,000 connections at once, in every copy
//! mode, each sending messages of random sizes (1 byte to 1 MiB) with
//! random pauses while the backend echoes them back, so both directions
//! move at once and reads come back short, full, and in between.
//!
//! Checked: every byte comes back exactly (compared with the sender's
//! stream, not a count), every connection finishes within a deadline (a
//! lost readiness edge would stall one for ever), half-close ends a
//! connection cleanly, and a reset on either side reaches the other one
//! instead of a clean end. Afterwards the proxy holds no connection and
//! every pipe is back in the pool.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use kube_userspace_proxy::proxy::{CopyMode, Proxier, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECTIONS: u64 = 1_000;
/// A connection that has not finished by then is stalled.
const DEADLINE: Duration = Duration::from_secs(90);

/// xorshift64*: the test's only source of randomness, seeded per connection.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let b = self.next().to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
    }
}

/// Message sizes: mostly request-sized, some bulk, up to 1 MiB.
fn message_size(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=4 => 1 + rng.below(512) as usize,
        5..=7 => 1 + rng.below(64 * 1024) as usize,
        _ => 1 << rng.below(21), // 1 B .. 1 MiB, log-uniform
    }
}

/// How a connection ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum End {
    /// The client half-closes after its last message and reads the echo to EOF.
    HalfClose,
    /// The client resets (SO_LINGER 0) in the middle.
    ClientReset,
    /// The backend resets after a number of bytes (the first message says how many).
    BackendReset,
}

/// Echoes everything back; a connection whose first byte is `R` is reset
/// by the backend after it echoed 8 KiB.
async fn echo_or_reset_backend() -> SocketAddr {
    // A backlog for 1,000 connections arriving at once.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = socket.local_addr().unwrap();
    let l = socket.listen(4096).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                let mut echoed = 0usize;
                let mut reset = None;
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if reset.is_none() {
                        reset = Some(buf[0] == b'R');
                    }
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    echoed += n;
                    if reset == Some(true) && echoed >= 8 * 1024 {
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        return;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    a
}

/// The bytes of message `i` of a connection: random, with the first byte
/// of the first message telling the backend whether to reset.
fn message(data: &mut Rng, i: usize, size: usize, end: End, out: &mut Vec<u8>) {
    out.resize(size, 0);
    data.fill(out);
    if i == 0 {
        out[0] = if end == End::BackendReset { b'R' } else { b'N' };
    }
}

/// One connection's life; returns an error text when something was wrong.
async fn client(addr: SocketAddr, seed: u64) -> Result<End, String> {
    let mut plan = Rng::new(seed);
    let end = match plan.below(10) {
        0 => End::ClientReset,
        1 => End::BackendReset,
        _ => End::HalfClose,
    };
    let mut sizes: Vec<usize> = (0..1 + plan.below(12))
        .map(|_| message_size(&mut plan))
        .collect();
    if end == End::BackendReset {
        sizes.push(16 * 1024); // enough for the backend to reset mid-way
    }
    let total: usize = sizes.iter().sum();
    let pauses: Vec<u64> = sizes.iter().map(|_| plan.below(4)).collect();
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if end == End::ClientReset {
        // Closed before its end: a reset.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    let (mut r, mut w) = stream.into_split();
    let data_seed = seed ^ 0xDA7A;

    let written = sizes.clone();
    let writer = async move {
        let mut data = Rng::new(data_seed);
        let mut buf = Vec::new();
        for (i, size) in written.iter().enumerate() {
            message(&mut data, i, *size, end, &mut buf);
            w.write_all(&buf).await?;
            if pauses[i] > 0 {
                tokio::time::sleep(Duration::from_millis(pauses[i])).await;
            }
        }
        if end == End::HalfClose {
            w.shutdown().await?;
        }
        Ok::<_, std::io::Error>(w)
    };

    // Reads the echo and compares it with the stream the writer made;
    // returns (bytes seen, whether it ended with an error).
    let reader = async move {
        let mut expect = Rng::new(data_seed);
        let mut want: Vec<u8> = Vec::new();
        let mut at = 0; // position in `want`
        let mut next = 0; // next message to regenerate
        let mut got = vec![0u8; 64 * 1024];
        let mut seen = 0usize;
        loop {
            let k = match r.read(&mut got).await {
                Ok(0) => return Ok((seen, false)),
                Ok(k) => k,
                Err(_) => return Ok((seen, true)),
            };
            for (i, b) in got[..k].iter().enumerate() {
                if at == want.len() {
                    let Some(size) = sizes.get(next) else {
                        return Err(format!("more bytes echoed than sent ({})", seen + k));
                    };
                    message(&mut expect, next, *size, end, &mut want);
                    next += 1;
                    at = 0;
                }
                if want[at] != *b {
                    return Err(format!("byte {} of {total} differs", seen + i));
                }
                at += 1;
            }
            seen += k;
        }
    };

    match end {
        End::HalfClose => {
            let (w, r) = tokio::join!(writer, reader);
            let _w = w.map_err(|e| format!("write: {e}"))?;
            let (seen, reset) = r?;
            if reset {
                return Err(format!("reset after {seen} of {total} bytes"));
            }
            if seen != total {
                return Err(format!("clean end after {seen} of {total} bytes"));
            }
        }
        End::ClientReset => {
            // Send part, then reset: the proxy must let go of both sides.
            let w = tokio::spawn(writer);
            tokio::time::sleep(Duration::from_millis(1 + seed % 5)).await;
            w.abort();
            let _ = w.await;
            drop(reader); // the last half: the socket closes with a reset
        }
        End::BackendReset => {
            let (w, r) = tokio::join!(writer, reader);
            let (seen, reset) = r?;
            // The reset must arrive as a reset, never as a clean end; a
            // write may fail first, which is as good.
            if !reset && w.is_ok() {
                return Err(format!("clean end after {seen} bytes of a reset backend"));
            }
        }
    }
    Ok(end)
}

async fn stress(mode: CopyMode) {
    let _ = kube_userspace_proxy::raise_fd_limit();
    let backend = echo_or_reset_backend().await;
    // The default dial timeouts: this test is about moving bytes.
    let mut p = Proxier::new(ProxyConfig {
        bind_address: [127, 0, 0, 1].into(),
        copy_mode: mode,
        ..ProxyConfig::default()
    });
    let addr = serve(&mut p, &snapshot("stress", &[backend], None), "stress");
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|seed| tokio::spawn(tokio::time::timeout(DEADLINE, client(addr, seed))))
        .collect();
    let mut failures = Vec::new();
    let mut ends = [0usize; 3];
    for (seed, t) in tasks.into_iter().enumerate() {
        match t.await.expect("client task") {
            Err(_) => failures.push(format!("connection {seed}: stalled past {DEADLINE:?}")),
            Ok(Err(e)) => failures.push(format!("connection {seed}: {e}")),
            Ok(Ok(end)) => ends[end as usize] += 1,
        }
    }
    let stats = &service(&p, "stress").stats;
    assert!(
        failures.is_empty(),
        "{mode}: {} of {CONNECTIONS} failed ({} found no backend): {:?}",
        failures.len(),
        stats.failed.load(Relaxed),
        &failures[..failures.len().min(10)]
    );
    assert!(
        ends.iter().all(|n| *n > 0),
        "{mode}: every ending was tried: {ends:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || stats.active.load(Relaxed) == 0).await,
        "{mode}: {} connections still open",
        stats.active.load(Relaxed)
    );
    let pipes = &p.context().pipes;
    assert_eq!(
        pipes.idle(),
        pipes.live(),
        "{mode}: every pipe is back in the pool"
    );
    eprintln!(
        "{mode}: {CONNECTIONS} connections ({ends:?} half-close/client reset/backend reset), \
         {} bytes up, {} down, {} pipes created",
        stats.bytes_in.load(Relaxed),
        stats.bytes_out.load(Relaxed),
        pipes.created.load(Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_survives_1000_random_connections() {
    stress(CopyMode::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_mode_survives_1000_random_connections() {
    stress(CopyMode::Splice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_mode_survives_1000_random_connections() {
    stress(CopyMode::Copy).await;
}
