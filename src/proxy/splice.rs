//! Moving bytes between the client and the backend.
//!
//! `splice` mode: socket → pipe → socket with `splice(2)`, so payload never
//! enters user memory. Each direction waits for readiness with tokio
//! (`readable()` / `try_io`), takes a pipe from the [`PipePool`] only once
//! bytes are there, drains it into the other socket and gives it back: an
//! idle connection holds its two sockets and nothing more.
//!
//! `copy` mode: through a 64 KiB buffer per direction, the reference. A
//! splice direction that cannot get a pipe (pool exhausted, no fds) moves
//! that chunk the same way.
//!
//! Both modes propagate half-close (EOF one way becomes `shutdown(Write)` on
//! the other socket while the reverse direction goes on, until it idles for
//! `--tcp-fin-timeout`), and an error on either side resets both (SO_LINGER
//! 0), so a truncated transfer never looks like a clean end.

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
    /// Through user memory (read, then write).
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

/// Idle pipes and the fewest that sat idle since the last [`PipePool::trim`].
#[derive(Debug, Default)]
struct Free {
    pipes: Vec<Pipe>,
    low_water: usize,
}

/// Pipes ready for reuse. Pipes are taken only while bytes are in flight, so
/// an idle connection holds none; at most `max_live` exist at once (beyond
/// that a chunk is copied through user memory, as HAProxy does), at most
/// `max_idle` are kept for reuse, and [`PipePool::trim`] closes those that
/// went unused for a whole trim period, so fds return to their baseline
/// after a burst.
#[derive(Debug)]
pub struct PipePool {
    free: Mutex<Free>,
    max_idle: usize,
    max_live: usize,
    live: AtomicUsize,
    size: AtomicUsize,
    /// Pipes created since start, for observability.
    pub created: AtomicU64,
    /// Chunks copied through user memory because no pipe could be had
    /// (`max_live` reached, or `pipe2` failed for want of fds).
    pub fallbacks: AtomicU64,
}

impl PipePool {
    /// A pool of at most `max_live` pipes, keeping at most `max_idle` idle.
    pub fn new(max_idle: usize, max_live: usize) -> Self {
        Self {
            free: Mutex::new(Free::default()),
            max_idle,
            max_live,
            live: AtomicUsize::new(0),
            size: AtomicUsize::new(PIPE_SIZE),
            created: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Free> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pipe from the pool or a new one; `None` when `max_live` are out or
    /// the kernel refuses one (the caller copies instead).
    fn take(&self) -> Option<Pipe> {
        {
            let mut free = self.free();
            if let Some(p) = free.pipes.pop() {
                free.low_water = free.low_water.min(free.pipes.len());
                return Some(p);
            }
        }
        if self.live.fetch_add(1, Relaxed) >= self.max_live {
            self.live.fetch_sub(1, Relaxed);
            return None;
        }
        match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok((r, w)) => {
                let want = self.size.load(Relaxed);
                if want > 0 {
                    if let Err(e) = fcntl(&w, FcntlArg::F_SETPIPE_SZ(want as i32)) {
                        // Above /proc/sys/fs/pipe-max-size or the per-user
                        // limit: keep the default size and stop asking.
                        tracing::debug!(error = %e, "F_SETPIPE_SZ refused; using default pipe size");
                        self.size.store(0, Relaxed);
                    }
                }
                self.created.fetch_add(1, Relaxed);
                Some(Pipe { r, w })
            }
            Err(e) => {
                self.live.fetch_sub(1, Relaxed);
                tracing::debug!(error = %e, "cannot create a pipe; copying this chunk");
                None
            }
        }
    }

    /// Returns an empty pipe for reuse (or closes it when enough are idle).
    fn give(&self, pipe: Pipe) {
        let mut free = self.free();
        if free.pipes.len() < self.max_idle {
            free.pipes.push(pipe);
        } else {
            drop(free);
            self.discard(pipe);
        }
    }

    /// Closes a pipe (one that may hold bytes, or one not worth keeping).
    fn discard(&self, pipe: Pipe) {
        drop(pipe);
        self.live.fetch_sub(1, Relaxed);
    }

    /// Closes the pipes that stayed idle since the previous call; returns
    /// how many. Call it periodically (the proxier does, every
    /// [`PIPE_TRIM_PERIOD`]).
    pub fn trim(&self) -> usize {
        let unused = {
            let mut free = self.free();
            // `pop` takes from the back: the front ones are those unused.
            let n = free.low_water.min(free.pipes.len());
            let unused: Vec<Pipe> = free.pipes.drain(..n).collect();
            free.low_water = free.pipes.len();
            unused
        };
        let n = unused.len();
        for p in unused {
            self.discard(p);
        }
        n
    }

    /// Idle pipes held now.
    pub fn idle(&self) -> usize {
        self.free().pipes.len()
    }

    /// Pipes open now, idle or in use.
    pub fn live(&self) -> usize {
        self.live.load(Relaxed)
    }
}

/// How often idle pipes are trimmed: a pipe unused for this long is closed.
pub const PIPE_TRIM_PERIOD: Duration = Duration::from_secs(2);

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
            } else {
                self.pool.discard(p);
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
/// `progress` follows the bytes moved, for the half-close timeout.
async fn pump(
    mode: CopyMode,
    src: &TcpStream,
    dst: &TcpStream,
    pool: &PipePool,
    counters: [&AtomicU64; 2],
    progress: &AtomicU64,
) -> io::Result<()> {
    let count = |m: usize| {
        progress.fetch_add(m as u64, Relaxed);
        for c in counters {
            c.fetch_add(m as u64, Relaxed);
        }
    };
    // Copy mode's buffer, allocated at the first byte.
    let mut buf = Vec::new();
    'pump: loop {
        src.readable().await?;
        let pipe = match mode {
            CopyMode::Splice => pool.take(),
            CopyMode::Copy => None,
        };
        let Some(pipe) = pipe else {
            if mode == CopyMode::Splice {
                pool.fallbacks.fetch_add(1, Relaxed);
            }
            match copy_chunk(src, dst, &mut buf).await? {
                0 => break 'pump,
                m => {
                    count(m);
                    continue;
                }
            }
        };
        let mut lease = Lease {
            pool,
            pipe: Some(pipe),
            pending: 0,
        };
        // Keep the pipe while data keeps coming; give it back when the
        // source runs dry.
        loop {
            let pipe = lease.pipe.as_ref().expect("lease holds a pipe");
            let n = match src.try_io(Interest::READABLE, || {
                splice_io(src, &pipe.w, PIPE_SIZE, false)
            }) {
                Ok(0) => break 'pump,
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
                        count(m);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    half_close(dst);
    Ok(())
}

/// Bytes moved through user memory at a time (copy mode, and splice mode
/// when no pipe can be had).
const COPY_CHUNK: usize = 64 * 1024;

/// Moves what `src` has now (at most [`COPY_CHUNK`]) to `dst` through
/// `buf`, which is sized at first use; returns 0 at EOF.
async fn copy_chunk(src: &TcpStream, dst: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.is_empty() {
        buf.resize(COPY_CHUNK, 0);
    }
    let n = loop {
        match src.try_read(buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => src.readable().await?,
            Err(e) => return Err(e),
        }
    };
    let mut sent = 0;
    while sent < n {
        dst.writable().await?;
        match dst.try_write(&buf[sent..n]) {
            Ok(m) => sent += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
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

/// Drives the direction still open after the other ended: it fails with
/// `TimedOut` once it moved no byte for a whole `fin_timeout`, so a peer
/// that vanished (a client gone while its backend never answers) does not
/// hold two sockets for ever.
async fn finish_half_closed(
    rest: impl std::future::Future<Output = io::Result<()>>,
    progress: &AtomicU64,
    fin_timeout: Duration,
) -> io::Result<()> {
    tokio::pin!(rest);
    loop {
        let seen = progress.load(Relaxed);
        tokio::select! {
            r = &mut rest => return r,
            _ = tokio::time::sleep(fin_timeout) => {
                if progress.load(Relaxed) == seen {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("half-closed connection idle for {fin_timeout:?}"),
                    ));
                }
            }
        }
    }
}

/// Proxies both directions until both have ended; returns bytes
/// (client → backend, backend → client). Half-close is passed on; once one
/// direction has ended, the other ends after `fin_timeout` without a byte.
/// On error both sockets are set to reset on close.
pub async fn proxy(
    mode: CopyMode,
    client: &TcpStream,
    backend: &TcpStream,
    pool: &PipePool,
    counters: Counters<'_>,
    fin_timeout: Duration,
) -> io::Result<(u64, u64)> {
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let up = pump(mode, client, backend, pool, counters.to_backend, &up_bytes);
    let down = pump(mode, backend, client, pool, counters.to_client, &down_bytes);
    tokio::pin!(up, down);
    let result = tokio::select! {
        r = &mut up => match r {
            Ok(_) => finish_half_closed(down, &down_bytes, fin_timeout).await,
            Err(e) => Err(e),
        },
        r = &mut down => match r {
            Ok(_) => finish_half_closed(up, &up_bytes, fin_timeout).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        reset_on_close(client);
        reset_on_close(backend);
        return Err(e);
    }
    Ok((up_bytes.load(Relaxed), down_bytes.load(Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_caps_live_pipes_and_trims_the_unused() {
        let pool = PipePool::new(4, 3);
        let a: Vec<Pipe> = (0..3).filter_map(|_| pool.take()).collect();
        assert_eq!(a.len(), 3);
        assert!(pool.take().is_none(), "max_live reached");
        assert_eq!(pool.live(), 3);
        for p in a {
            pool.give(p);
        }
        assert_eq!((pool.idle(), pool.live()), (3, 3));
        // First trim: the low-water mark was set before they were given.
        pool.trim();
        // One pipe is used during the next period: two stayed idle.
        let p = pool.take().expect("reuse");
        pool.give(p);
        assert_eq!(pool.trim(), 2);
        assert_eq!((pool.idle(), pool.live()), (1, 1));
        assert_eq!(pool.trim(), 1);
        assert_eq!((pool.idle(), pool.live()), (0, 0));
        assert_eq!(pool.created.load(Relaxed), 3);
    }

    #[test]
    fn pool_closes_pipes_beyond_max_idle() {
        let pool = PipePool::new(1, 8);
        let (a, b) = (pool.take().expect("a"), pool.take().expect("b"));
        pool.give(a);
        pool.give(b);
        assert_eq!((pool.idle(), pool.live()), (1, 1));
    }
}
