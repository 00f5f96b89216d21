//! Moving bytes between the client and the backend.
//!
//! `splice` mode: socket → pipe → socket with `splice(2)`, so payload never
//! enters user memory. Each direction waits for readiness with tokio
//! (`readable()` / `try_io`), takes a pipe from the [`PipePool`] only once
//! bytes are there, drains it into the other socket and gives it back: an
//! idle connection holds its two sockets and nothing more.
//!
//! `copy` mode: `tokio::io::copy_bidirectional`, the reference.
//!
//! Both modes propagate half-close (EOF one way becomes `shutdown(Write)` on
//! the other socket while the reverse direction goes on), and an error on
//! either side resets both (SO_LINGER 0), so a truncated transfer never looks
//! like a clean end.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// How bytes are moved (`--copy-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum CopyMode {
    /// Zero-copy through a pipe with `splice(2)`.
    #[default]
    Splice,
    /// Through user memory with `tokio::io::copy_bidirectional`.
    Copy,
}

impl std::fmt::Display for CopyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Splice => "splice",
            Self::Copy => "copy",
        })
    }
}

/// Requested pipe capacity: large enough that one splice moves a big chunk,
/// small enough that thousands in flight stay cheap (pages are only
/// allocated while bytes sit in the pipe).
pub const PIPE_SIZE: usize = 256 * 1024;

/// Bytes counted as they move, for live metrics.
#[derive(Clone, Copy)]
pub struct Counters<'a> {
    /// Client → backend counters (service and backend).
    pub to_backend: [&'a AtomicU64; 2],
    /// Backend → client counters (service and backend).
    pub to_client: [&'a AtomicU64; 2],
}

/// A pipe (read end, write end).
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// Pipes ready for reuse. Pipes are taken only while bytes are in flight, so
/// the number alive is bounded by concurrent transfers; at most `max_idle`
/// are kept when the load drops.
#[derive(Debug)]
pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    max_idle: usize,
    size: AtomicUsize,
    /// Pipes created since start, for observability.
    pub created: AtomicU64,
}

impl PipePool {
    /// A pool keeping at most `max_idle` idle pipes.
    pub fn new(max_idle: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            max_idle,
            size: AtomicUsize::new(PIPE_SIZE),
            created: AtomicU64::new(0),
        }
    }

    fn take(&self) -> io::Result<Pipe> {
        if let Some(p) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let want = self.size.load(Relaxed);
        if want > 0 {
            if let Err(e) = fcntl(&w, FcntlArg::F_SETPIPE_SZ(want as i32)) {
                // Above /proc/sys/fs/pipe-max-size or the per-user limit: keep
                // the default size and stop asking.
                tracing::debug!(error = %e, "F_SETPIPE_SZ refused; using default pipe size");
                self.size.store(0, Relaxed);
            }
        }
        self.created.fetch_add(1, Relaxed);
        Ok(Pipe { r, w })
    }

    fn give(&self, pipe: Pipe) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.max_idle {
            free.push(pipe);
        }
    }

    /// Idle pipes held now.
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A pipe on loan; returned to the pool on drop only when empty.
struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
    pending: usize,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pipe.take() {
            if self.pending == 0 {
                self.pool.give(p);
            }
        }
    }
}

fn splice_io(from: impl AsFd, to: impl AsFd, len: usize, more: bool) -> io::Result<usize> {
    let mut flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    if more {
        flags |= SpliceFFlags::SPLICE_F_MORE;
    }
    splice(from, None, to, None, len, flags).map_err(io::Error::from)
}

/// One direction: `src` → `dst` until EOF, then `shutdown(Write)` on `dst`.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    pool: &PipePool,
    counters: [&AtomicU64; 2],
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let mut lease = Lease {
            pool,
            pipe: Some(pool.take()?),
            pending: 0,
        };
        // Keep the pipe while data keeps coming; give it back when the
        // source runs dry.
        loop {
            let pipe = lease.pipe.as_ref().expect("lease holds a pipe");
            let n = match src.try_io(Interest::READABLE, || {
                splice_io(src, &pipe.w, PIPE_SIZE, false)
            }) {
                Ok(0) => {
                    half_close(dst);
                    return Ok(total);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            lease.pending = n;
            while lease.pending > 0 {
                dst.writable().await?;
                let len = lease.pending;
                match dst.try_io(Interest::WRITABLE, || splice_io(&pipe.r, dst, len, false)) {
                    Ok(m) => {
                        lease.pending -= m;
                        total += m as u64;
                        for c in counters {
                            c.fetch_add(m as u64, Relaxed);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// `shutdown(SHUT_WR)`: the peer sees EOF, the reverse direction goes on.
/// A peer that is already gone (ENOTCONN) is not an error here.
fn half_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).shutdown(Shutdown::Write);
}

/// Makes the next close send RST instead of FIN.
fn reset_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Proxies both directions until both have ended; returns bytes
/// (client → backend, backend → client). On error both sockets are set to
/// reset on close.
pub async fn proxy(
    mode: CopyMode,
    client: &mut TcpStream,
    backend: &mut TcpStream,
    pool: &PipePool,
    counters: Counters<'_>,
) -> io::Result<(u64, u64)> {
    let result = match mode {
        CopyMode::Splice => {
            let (c, b) = (&*client, &*backend);
            tokio::try_join!(
                pump(c, b, pool, counters.to_backend),
                pump(b, c, pool, counters.to_client)
            )
        }
        CopyMode::Copy => {
            let r = tokio::io::copy_bidirectional(client, backend).await;
            if let Ok((up, down)) = r {
                for c in counters.to_backend {
                    c.fetch_add(up, Relaxed);
                }
                for c in counters.to_client {
                    c.fetch_add(down, Relaxed);
                }
            }
            r
        }
    };
    if result.is_err() {
        reset_on_close(client);
        reset_on_close(backend);
    }
    result
}
