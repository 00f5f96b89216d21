//! One fd budget for the whole process.
//!
//! `RLIMIT_NOFILE` is split once, here, between what the process needs to
//! run at all ([`FdBudget::fixed`]: stdio, the workers' event loops, the
//! admin servers' capped connections, the control plane) and what the data
//! path holds: listening sockets, pipes, UDP sessions (taken one by one
//! with [`FdBudget::try_take`], never waited for) and proxied connections
//! (two fds each, behind the connection limit, which waits in the backlog).
//!
//! Listeners come first (a busy port's extra sockets too). Without an
//! explicit `--max-connections`, the connection limit is whatever the
//! listeners and a headroom for pipes and UDP sessions leave
//! ([`FdBudget::rebalance`], at every sync and when a port grows), never
//! below [`min_connections`]: 10,000 idle Service ports under 20,000 fds
//! are all served, and connections get the rest. A limit shrinks only by permits nobody
//! holds; the rest is taken back as connections close. What does not fit
//! is refused at once and reported on the Service, and retried at the
//! next sync (each second), never in a busy loop.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// Fds of the process itself, before any worker: stdio, the main runtime,
/// the hand-over and discovery sockets, `iptables-restore` pipes, logs.
pub const BASE_FDS: usize = 64;

/// Fds per worker thread, as measured: two epoll instances, an eventfd
/// and a unix socket of tokio's runtime.
pub const FDS_PER_WORKER: usize = 4;

/// The least headroom left beside listeners and connections, for pipes
/// and UDP sessions.
pub const MIN_HEADROOM: usize = 16;

/// The most headroom: beyond it pipes fall back to copying, which costs
/// some CPU and no fds.
pub const MAX_HEADROOM: usize = 4096;

/// Fds a connection holds: the client's and the backend's.
pub const FDS_PER_CONNECTION: usize = 2;

/// The headroom for an fd limit: an eighth of it, within
/// [`MIN_HEADROOM`]..=[`MAX_HEADROOM`].
pub fn headroom(limit: usize) -> usize {
    (limit / 8).clamp(MIN_HEADROOM, MAX_HEADROOM)
}

/// The fewest connections a derived limit keeps, however many listeners
/// want fds: a sixteenth of the limit (at least one). Listeners beyond
/// that are reported unserved: a listener that may accept nothing serves
/// nobody.
pub fn min_connections(limit: usize) -> usize {
    (limit / 16).max(1)
}

/// The fixed share of a process with `workers` worker threads and
/// `admin` fds for the admin servers, under an fd `limit`: at most half
/// of it (the admin servers' caps are a worst case; under a tiny limit
/// the process runs in about 25 fds).
pub fn fixed_share(workers: usize, admin: usize, limit: usize) -> usize {
    let share = BASE_FDS + FDS_PER_WORKER * workers.max(1) + admin;
    if limit == 0 {
        share
    } else {
        share.min(limit / 2)
    }
}

/// Why a connection limit cannot be granted.
#[derive(Debug, thiserror::Error)]
#[error(
    "--max-connections {asked} needs {need} fds ({FDS_PER_CONNECTION} per connection), but \
     RLIMIT_NOFILE is {limit}: {fixed} are the process's own and at least {MIN_HEADROOM} are kept \
     for listeners, so at most {most} connections fit; lower --max-connections or raise the fd limit"
)]
pub struct TooManyConnections {
    /// `--max-connections` as asked.
    pub asked: usize,
    /// Fds those connections need.
    pub need: usize,
    /// `RLIMIT_NOFILE`.
    pub limit: usize,
    /// The process's fixed share.
    pub fixed: usize,
    /// The most connections that fit.
    pub most: usize,
}

/// The process's fd accountant (see the module doc).
#[derive(Debug)]
pub struct FdBudget {
    /// `RLIMIT_NOFILE`; 0: no accounting (every take succeeds).
    limit: usize,
    /// The process's own share, never handed out.
    fixed: usize,
    /// Held by listeners, pipes and UDP sessions.
    held: AtomicUsize,
    /// Set aside for connections: [`FDS_PER_CONNECTION`] × the limit in force.
    for_connections: AtomicUsize,
    /// Permits of the connection limit, `None`: no limit.
    conns: Option<Arc<Semaphore>>,
    /// The limit in force and what it still owes, when derived.
    cap: Mutex<Cap>,
    /// `--max-connections` when given (fixed limit).
    explicit: bool,
    /// Takes refused because the budget was spent.
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct Cap {
    /// Connections allowed now (permits in the semaphore, free or held).
    in_force: usize,
    /// Permits to take back as connections close.
    owed: usize,
}

/// Fds taken from the budget; given back when dropped.
#[derive(Debug)]
pub struct FdLease {
    budget: Arc<FdBudget>,
    n: usize,
}

impl Drop for FdLease {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.n, Relaxed);
    }
}

// === impl FdBudget ===

impl FdBudget {
    /// A budget for `limit` fds (0: none kept) with `fixed` of them the
    /// process's own. `max_connections`: `Some(0)` no connection limit,
    /// `Some(n)` exactly `n` (refused when the limit cannot hold it),
    /// `None` derived from what listeners leave.
    pub fn new(
        limit: usize,
        fixed: usize,
        max_connections: Option<usize>,
    ) -> Result<Arc<Self>, TooManyConnections> {
        let most = if limit == 0 {
            usize::MAX
        } else {
            limit.saturating_sub(fixed + MIN_HEADROOM) / FDS_PER_CONNECTION
        };
        let (in_force, explicit) = match max_connections {
            Some(0) => (0, true),
            Some(n) if n > most => {
                return Err(TooManyConnections {
                    asked: n,
                    need: n.saturating_mul(FDS_PER_CONNECTION),
                    limit,
                    fixed,
                    most,
                })
            }
            Some(n) => (n, true),
            None if limit == 0 => (0, false),
            None => (
                limit.saturating_sub(fixed + headroom(limit)) / FDS_PER_CONNECTION,
                false,
            ),
        };
        let limited = in_force > 0 || (!explicit && limit > 0);
        Ok(Arc::new(Self {
            limit,
            fixed,
            held: AtomicUsize::new(0),
            for_connections: AtomicUsize::new(in_force * FDS_PER_CONNECTION),
            conns: limited.then(|| Arc::new(Semaphore::new(in_force))),
            cap: Mutex::new(Cap { in_force, owed: 0 }),
            explicit,
            refused: AtomicU64::new(0),
        }))
    }

    /// A budget that counts nothing and limits nothing (tests, benches).
    pub fn unlimited() -> Arc<Self> {
        Self::new(0, 0, Some(0)).unwrap_or_else(|_| unreachable!("no limit cannot be exceeded"))
    }

    /// Takes `n` fds for a pipe or a UDP session, if they fit beside what
    /// is held and what connections may hold.
    pub fn try_take(self: &Arc<Self>, n: usize) -> Option<FdLease> {
        self.take_within(n, 0)
    }

    /// Takes one fd for a listening socket, if it fits and leaves the
    /// headroom to pipes and UDP sessions.
    pub fn try_take_listener(self: &Arc<Self>) -> Option<FdLease> {
        self.try_take_listener_fds(1)
    }

    /// Takes `n` fds for a listening socket and what it holds beside it
    /// (a health-check port's admitted connection), as
    /// [`Self::try_take_listener`].
    pub fn try_take_listener_fds(self: &Arc<Self>, n: usize) -> Option<FdLease> {
        self.take_within(n, headroom(self.limit))
    }

    fn take_within(self: &Arc<Self>, n: usize, keep: usize) -> Option<FdLease> {
        if self.limit > 0 {
            let room = self.limit.saturating_sub(self.fixed + keep);
            let taken = self.held.fetch_update(Relaxed, Relaxed, |held| {
                let conns = self.for_connections.load(Relaxed);
                (held + n + conns <= room).then_some(held + n)
            });
            if taken.is_err() {
                self.refused.fetch_add(1, Relaxed);
                return None;
            }
        } else {
            self.held.fetch_add(n, Relaxed);
        }
        Some(FdLease {
            budget: Arc::clone(self),
            n,
        })
    }

    /// Counts `n` fds that are open already (sockets handed over by the
    /// previous process), even beyond the budget.
    pub fn take_held(self: &Arc<Self>, n: usize) -> FdLease {
        self.held.fetch_add(n, Relaxed);
        FdLease {
            budget: Arc::clone(self),
            n,
        }
    }

    /// Makes room for `wanted` more fds of listeners (ports not bound yet)
    /// by lowering a derived connection limit, or raises it when fds came
    /// free; an explicit limit never moves. Returns the limit in force.
    pub fn rebalance(&self, wanted: usize) -> usize {
        let Ok(mut cap) = self.cap.lock() else {
            return 0;
        };
        self.rebalance_locked(&mut cap, wanted)
    }

    /// Makes room for `k` more listening sockets ([`Self::rebalance`])
    /// and takes up to `k` leases of one fd, under the same lock: a
    /// rebalance elsewhere in between (the run loop's, after each sync)
    /// would otherwise give the room back to connections first.
    pub fn try_take_listeners(self: &Arc<Self>, k: usize) -> Vec<FdLease> {
        let Ok(mut cap) = self.cap.lock() else {
            return Vec::new();
        };
        self.rebalance_locked(&mut cap, k);
        (0..k).map_while(|_| self.try_take_listener()).collect()
    }

    /// [`Self::rebalance`] with its lock held.
    fn rebalance_locked(&self, cap: &mut Cap, wanted: usize) -> usize {
        let Some(conns) = self.conns.as_ref().filter(|_| !self.explicit) else {
            return cap.in_force;
        };
        let spare = self
            .limit
            .saturating_sub(self.fixed + headroom(self.limit))
            .saturating_sub(self.held.load(Relaxed) + wanted);
        let target = (spare / FDS_PER_CONNECTION).max(min_connections(self.limit));
        let allowed = cap.in_force - cap.owed;
        if target > allowed {
            // Cancel what is owed first, then add.
            let mut more = target - allowed;
            let cancel = more.min(cap.owed);
            cap.owed -= cancel;
            more -= cancel;
            conns.add_permits(more);
            cap.in_force += more;
        } else {
            cap.owed += allowed - target;
        }
        // Take back what nobody holds now; the rest as connections close.
        let back = conns.forget_permits(cap.owed);
        cap.owed -= back;
        cap.in_force -= back;
        self.for_connections
            .store(cap.in_force * FDS_PER_CONNECTION, Relaxed);
        cap.in_force - cap.owed
    }

    /// The connection limit's permits, when there is a limit.
    pub fn connections(&self) -> Option<&Arc<Semaphore>> {
        self.conns.as_ref()
    }

    /// The connection limit in force (0: none).
    pub fn connection_limit(&self) -> usize {
        self.cap.lock().map_or(0, |c| c.in_force - c.owed)
    }

    /// `RLIMIT_NOFILE` as accounted (0: not accounted).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The process's own share.
    pub fn fixed(&self) -> usize {
        self.fixed
    }

    /// Fds held by listeners, pipes and UDP sessions.
    pub fn held(&self) -> usize {
        self.held.load(Relaxed)
    }

    /// Fds that can still be taken by [`Self::try_take`].
    pub fn available(&self) -> usize {
        if self.limit == 0 {
            return usize::MAX;
        }
        self.limit
            .saturating_sub(self.fixed + self.for_connections.load(Relaxed) + self.held())
    }

    /// Takes refused because the budget was spent.
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_come_before_a_derived_connection_limit() {
        // 20,000 fds, 64 workers, the admin servers' 68.
        let fixed = fixed_share(64, 68, 20_000);
        assert_eq!(fixed, 388);
        assert_eq!(fixed_share(2, 68, 134), 67, "at most half of a tiny limit");
        let b = FdBudget::new(20_000, fixed, None).unwrap();
        assert_eq!(b.connection_limit(), (20_000 - 388 - 2_500) / 2);
        // 10,000 ports want a listener each: the limit makes room.
        let limit = b.rebalance(10_000);
        assert_eq!(limit, (20_000 - 388 - 2_500 - 10_000) / 2);
        let leases: Vec<_> = (0..10_000)
            .map(|_| b.try_take_listener().unwrap())
            .collect();
        assert_eq!(b.held(), 10_000);
        // Headroom is left for pipes and UDP sessions, never to listeners.
        assert_eq!(b.available(), 2_500);
        assert!(b.try_take_listener().is_none());
        drop(b.try_take(2_500).unwrap());
        // Connections keep their floor, however many listeners want fds.
        assert_eq!(b.rebalance(100_000), min_connections(20_000));
        assert_eq!(b.rebalance(0), limit);
        assert_eq!(b.rebalance(0), limit, "stable once bound");
        drop(leases);
        assert_eq!(b.rebalance(0), (20_000 - 388 - 2_500) / 2, "fds came back");
    }

    #[test]
    fn listeners_taken_with_their_room_survive_a_rebalance_elsewhere() {
        let b = FdBudget::new(4_096, 100, None).unwrap();
        b.rebalance(0);
        // Room made, then given back by another thread's rebalance before
        // the take: nothing fits (what a busy port's growth once met).
        b.rebalance(3);
        b.rebalance(0);
        assert!(b.try_take_listener().is_none());
        // Made and taken under one lock: all three are held, and a
        // rebalance after cannot take them back.
        let leases = b.try_take_listeners(3);
        assert_eq!(leases.len(), 3);
        let limit = b.rebalance(0);
        assert!(limit * FDS_PER_CONNECTION + b.held() + 100 + headroom(4_096) <= 4_096);
        drop(leases);
        assert!(b.rebalance(0) >= limit, "fds came back");
    }

    #[test]
    fn a_held_connection_permit_is_taken_back_when_it_is_released() {
        let b = FdBudget::new(1_000, 100, None).unwrap();
        let before = b.connection_limit();
        assert_eq!(before, (1_000 - 100 - 125) / 2);
        let sem = Arc::clone(b.connections().unwrap());
        let held = Arc::clone(&sem)
            .try_acquire_many_owned(before as u32)
            .unwrap();
        // All permits are held: the limit owes what listeners need.
        assert_eq!(b.rebalance(100), before - 50);
        // Only the headroom is free while connections hold theirs.
        assert!(b.try_take(127).is_none(), "still held by connections");
        drop(held);
        assert_eq!(b.rebalance(100), before - 50);
        assert_eq!(sem.available_permits(), before - 50);
        assert!(b.try_take(127).is_some());
    }

    #[test]
    fn an_explicit_limit_the_fds_cannot_hold_is_refused_with_the_numbers() {
        let e = FdBudget::new(20_000, 388, Some(10_000)).unwrap_err();
        assert_eq!((e.need, e.most), (20_000, 9_798));
        let msg = e.to_string();
        for n in ["10000", "20000", "388", "9798"] {
            assert!(msg.contains(n), "{msg}");
        }
        let b = FdBudget::new(20_000, 388, Some(9_000)).unwrap();
        assert_eq!(b.rebalance(10_000), 9_000, "an explicit limit never moves");
        assert_eq!(b.available(), 20_000 - 388 - 18_000);
    }

    #[test]
    fn no_limit_counts_but_never_refuses() {
        let b = FdBudget::unlimited();
        let l = b.try_take(1_000_000).unwrap();
        assert_eq!(b.held(), 1_000_000);
        drop(l);
        assert_eq!(b.held(), 0);
        assert!(b.connections().is_none());
    }
}
