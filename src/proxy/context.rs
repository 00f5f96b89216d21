//! What every listener and connection task shares ([`Context`]), and the
//! housekeeping that runs beside them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::ProxyConfig;
use super::conn::{self, Connection};
use super::fds::FdBudget;
use super::splice::{self, PipePool};
use super::workers::Workers;

/// What every listener and connection task shares.
#[derive(Debug)]
pub struct Context {
    /// Data-path settings.
    pub config: ProxyConfig,
    /// Pipes for splice mode.
    pub pipes: PipePool,
    /// Every connection task, to drain them at shutdown.
    pub tracker: TaskTracker,
    /// Cancelled at shutdown: every listener stops accepting.
    pub shutdown: CancellationToken,
    /// The process's fd budget; its semaphore is the connection limit.
    pub fds: Arc<FdBudget>,
    /// Times a listener found the connection limit reached and waited.
    pub limit_waits: AtomicU64,
    /// TCP connections ended since freed memory was last released.
    pub closed_since_release: AtomicU64,
    /// The data path's threads (none: TCP runs on the caller's runtime).
    pub workers: Option<Workers>,
    /// The worker the next new listener lives on (round-robin).
    pub next_home: AtomicUsize,
    /// Raised to hand the connections over: each parks at a safe point
    /// and goes to `parked`.
    pub park: conn::Park,
    /// Where parked connections go while a hand-over collects them; none:
    /// a parked connection runs on here.
    pub parked: std::sync::Mutex<Option<std::sync::mpsc::Sender<Connection>>>,
    /// Tells this node's pods and the host from other clients.
    pub origin: super::origin::Origin,
}

impl Context {
    /// Starts a connection hand-over: every connection parks at its next
    /// safe point and arrives on the returned receiver, until
    /// [`Self::stop_parking`].
    pub fn start_parking(&self) -> std::sync::mpsc::Receiver<Connection> {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Ok(mut p) = self.parked.lock() {
            *p = Some(tx);
        }
        self.park.raise();
        rx
    }

    /// The runtimes TCP connections run on: the workers, or without them
    /// the current runtime.
    pub fn runtimes(&self) -> std::io::Result<Vec<tokio::runtime::Handle>> {
        match &self.workers {
            Some(w) => Ok(w.handles().to_vec()),
            None => Ok(vec![
                tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?
            ]),
        }
    }

    /// Ends the collection: connections parking later run on here.
    pub fn stop_parking(&self) {
        if let Ok(mut p) = self.parked.lock() {
            *p = None;
        }
    }

    /// Gives a parked connection to the hand-over; back when none collects.
    #[allow(clippy::result_large_err)] // returned once per connection, at most
    pub(super) fn hand_over(&self, conn: Connection) -> Result<(), Connection> {
        let Ok(p) = self.parked.lock() else {
            return Err(conn);
        };
        match p.as_ref() {
            Some(tx) => tx.send(conn).map_err(|e| e.0),
            None => Err(conn),
        }
    }
}

/// Whether an error means the proxy itself ran out of fds, memory or local
/// ports: back off or fail the one connection, never blame a backend.
pub(crate) fn is_local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Idle pipes kept for reuse: enough for a burst, little memory.
pub(super) const MAX_IDLE_PIPES: usize = 256;
/// Most pipes alive at once (2 fds each): bytes in flight beyond this many
/// transfers are copied through user memory instead, so pipes never take
/// the fds that connections need.
pub(super) const MAX_LIVE_PIPES: usize = 1024;
/// Connections that must have closed since the last release before freed
/// heap is handed back to the kernel.
const RELEASE_AFTER_CLOSED: u64 = 512;

/// Every [`splice::PIPE_TRIM_PERIOD`] while the context lives: closes idle
/// pipes, and once many connections have closed, returns the allocator's
/// free memory to the kernel, so fds and RSS come back to their baseline
/// after a burst.
pub(super) async fn housekeeping(ctx: std::sync::Weak<Context>) {
    let mut tick = tokio::time::interval(splice::PIPE_TRIM_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(ctx) = ctx.upgrade() else { return };
        ctx.origin.refresh_host();
        let n = ctx.pipes.trim();
        if n > 0 {
            tracing::debug!(closed = n, "idle pipes trimmed");
        }
        if ctx.closed_since_release.load(Relaxed) >= RELEASE_AFTER_CLOSED {
            ctx.closed_since_release.store(0, Relaxed);
            release_free_memory();
        }
    }
}

/// Hands the allocator's free pages back to the kernel (glibc keeps freed
/// memory of its arenas otherwise: 8,000 closed connections left ~17 MiB).
#[allow(unsafe_code)] // one libc call with no arguments to uphold
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
