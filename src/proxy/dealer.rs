//! Which worker a newly accepted connection runs on.
//!
//! HAProxy's rule (`listener_accept()` in its `src/listener.c`, the
//! multi-queue accept): each listener counts its open connections per
//! thread (`thr_conn`); an accepted connection goes to the less loaded of
//! two candidate threads, and stays on the accepting thread when that one
//! is as good a deal (no migration, better locality). Here the two
//! candidates are the accepting worker and the next one in rotation.
//!
//! Why it matters: once a busy port has one `SO_REUSEPORT` socket per
//! worker, the kernel spreads connections by a hash of their addresses,
//! which is even only on average: 32 long connections (pipelined clients,
//! connection pools) gave two workers 91 and 118 ticks of CPU in one run,
//! 120 and 89 in the next. Counting open connections per port and worker
//! evens them out at accept time, while short connections, whose counts
//! stay level, mostly stay where the kernel put them.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// One port's open connections on each worker, and the rotation that
/// names the second candidate.
#[derive(Debug)]
pub struct Dealer {
    /// Each worker's count: it changes at every accept dealt to that
    /// worker and at every close there. Not padded to cache lines: every
    /// Service port has a dealer, idle or not, and 64-byte counts cost 64
    /// bytes × workers a port (41 MB at 10,000 ports × 64 workers,
    /// `benches/scale.py`) to spare a busy port's workers a shared line.
    counts: Box<[AtomicUsize]>,
    next: AtomicUsize,
}

impl Dealer {
    /// A dealer over `workers` workers (at least one), none loaded.
    pub fn new(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// Picks the worker for a connection accepted on worker `here` and
    /// counts it there until the returned [`Slot`] is dropped.
    pub fn deal(self: &Arc<Self>, here: usize) -> Slot {
        let n = self.counts.len();
        let here = here % n;
        let worker = if n == 1 {
            here
        } else {
            // The next worker in rotation that is not this one.
            let step = 1 + self.next.fetch_add(1, Relaxed) % (n - 1);
            let other = (here + step) % n;
            choose(here, self.load(here), other, self.load(other))
        };
        self.counts[worker].fetch_add(1, Relaxed);
        Slot {
            dealer: Arc::clone(self),
            worker,
        }
    }

    /// Open connections counted on `worker`.
    pub fn load(&self, worker: usize) -> usize {
        self.counts[worker].load(Relaxed)
    }

    /// Open connections on each worker, in worker order.
    pub fn loads(&self) -> Vec<usize> {
        (0..self.counts.len()).map(|w| self.load(w)).collect()
    }
}

/// The choice between the accepting worker and another candidate, given
/// their open connections: the other only when it holds fewer (HAProxy:
/// "if in the end the current thread appears to be as good of a deal,
/// we'll prefer it over a foreign one").
pub fn choose(here: usize, here_load: usize, other: usize, other_load: usize) -> usize {
    if other_load < here_load {
        other
    } else {
        here
    }
}

/// A connection counted on its worker; dropping it (when the connection's
/// task ends) takes it off the count.
#[derive(Debug)]
pub struct Slot {
    dealer: Arc<Dealer>,
    worker: usize,
}

impl Slot {
    /// The worker the connection was dealt to.
    pub fn worker(&self) -> usize {
        self.worker
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.dealer.counts[self.worker].fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `choose` as a table: (here, its load, other, its load) → worker.
    #[test]
    fn the_accepting_worker_keeps_a_connection_unless_the_other_holds_fewer() {
        for (here, hl, other, ol, want) in [
            (0, 0, 1, 0, 0),  // tie: stay (no migration)
            (0, 5, 1, 5, 0),  // tie under load: stay
            (0, 6, 1, 5, 1),  // the other holds fewer: move
            (1, 3, 0, 4, 1),  // this one holds fewer: stay
            (2, 10, 0, 0, 0), // an idle worker takes it
            (1, 1, 3, 0, 3),  // by one is enough (HAProxy's q1 < q2)
        ] {
            assert_eq!(
                choose(here, hl, other, ol),
                want,
                "{here}:{hl} vs {other}:{ol}"
            );
        }
    }

    /// Long connections accepted all on one worker (the kernel's hash
    /// being unkind) end up even, and a connection that closes is
    /// uncounted.
    #[test]
    fn connections_accepted_on_one_worker_spread_evenly() {
        let dealer = Dealer::new(2);
        let slots: Vec<Slot> = (0..32).map(|_| dealer.deal(0)).collect();
        assert_eq!((dealer.load(0), dealer.load(1)), (16, 16));
        let on_one = slots.iter().filter(|s| s.worker() == 1).count();
        assert_eq!(on_one, 16);
        drop(slots);
        assert_eq!((dealer.load(0), dealer.load(1)), (0, 0));

        // Four workers, all accepts on worker 2: each ends with a quarter.
        let dealer = Dealer::new(4);
        let _slots: Vec<Slot> = (0..400).map(|_| dealer.deal(2)).collect();
        let loads = dealer.loads();
        assert!(loads.iter().all(|&l| (90..=110).contains(&l)), "{loads:?}");
    }

    /// Short connections (each closed before the next arrives) never move.
    #[test]
    fn short_connections_stay_on_the_accepting_worker() {
        let dealer = Dealer::new(2);
        for here in [0, 1, 1, 0, 1] {
            let slot = dealer.deal(here);
            assert_eq!(slot.worker(), here);
        }
    }
}
