//! Zero-copy plumbing: pipes for `splice(2)` and the pool that lends them.
//!
//! A direction takes a pipe from the [`PipePool`] only once bytes are
//! there, drains it into the other socket and gives it back, so an idle
//! connection holds no pipe. At most `max_live` pipes exist; beyond that
//! (or when `pipe2` fails for want of fds) the mover copies that chunk
//! through user memory instead. The movers themselves are in
//! [`super::conn`].

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

use super::fds::{FdBudget, FdLease};

/// Requested pipe capacity: large enough that one splice moves a big chunk,
/// small enough that thousands in flight stay cheap (pages are only
/// allocated while bytes sit in the pipe).
pub const PIPE_SIZE: usize = 256 * 1024;

/// A pipe (read end, write end).
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Its two fds in the budget.
    _fds: FdLease,
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
    budget: Arc<FdBudget>,
    /// Pipes created since start, for observability.
    pub created: AtomicU64,
    /// Chunks copied through user memory because no pipe could be had
    /// (`max_live` reached, or `pipe2` failed for want of fds).
    pub fallbacks: AtomicU64,
}

impl PipePool {
    /// A pool of at most `max_live` pipes, keeping at most `max_idle` idle,
    /// each pipe's fds taken from `budget`.
    pub fn new(max_idle: usize, max_live: usize, budget: Arc<FdBudget>) -> Self {
        Self {
            budget,
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
    pub(super) fn take(&self) -> Option<Pipe> {
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
        let Some(fds) = self.budget.try_take(2) else {
            self.live.fetch_sub(1, Relaxed);
            return None;
        };
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
                Some(Pipe { r, w, _fds: fds })
            }
            Err(e) => {
                self.live.fetch_sub(1, Relaxed);
                tracing::debug!(error = %e, "cannot create a pipe; copying this chunk");
                None
            }
        }
    }

    /// Returns an empty pipe for reuse (or closes it when enough are idle).
    pub(super) fn give(&self, pipe: Pipe) {
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
pub(super) struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
    /// Bytes sitting in the pipe.
    pub(super) pending: usize,
}

impl<'a> Lease<'a> {
    /// Lends `pipe`, taken from `pool`, until dropped.
    pub(super) fn new(pool: &'a PipePool, pipe: Pipe) -> Self {
        Self {
            pool,
            pipe: Some(pipe),
            pending: 0,
        }
    }

    fn pipe(&self) -> &Pipe {
        // Only `drop` takes the pipe out.
        self.pipe
            .as_ref()
            .expect("a lease holds its pipe until dropped")
    }

    /// The end bytes are spliced into.
    pub(super) fn write_end(&self) -> &OwnedFd {
        &self.pipe().w
    }

    /// The end bytes are spliced out of.
    pub(super) fn read_end(&self) -> &OwnedFd {
        &self.pipe().r
    }
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

/// One non-blocking `splice(2)` of up to `len` bytes (`EAGAIN` as
/// `WouldBlock`).
pub(super) fn splice_io(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    splice(from, None, to, None, len, flags).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_caps_live_pipes_and_trims_the_unused() {
        let pool = PipePool::new(4, 3, FdBudget::unlimited());
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
        let pool = PipePool::new(1, 8, FdBudget::unlimited());
        let (a, b) = (pool.take().expect("a"), pool.take().expect("b"));
        pool.give(a);
        pool.give(b);
        assert_eq!((pool.idle(), pool.live()), (1, 1));
    }
}
