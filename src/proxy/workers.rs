//! The data path's threads: one event loop per thread, nothing shared
//! between them per message.
//!
//! Each worker is a single-threaded tokio runtime on a thread of its own.
//! A busy TCP service port has one listening socket per worker, all bound
//! to the same port with `SO_REUSEPORT` ([`super::listener`]), so the
//! kernel spreads new connections across the workers. A connection is
//! placed on a worker once, at accept ([`super::dealer`]: the accepting
//! worker unless another holds fewer of the port's connections), and
//! lives and dies there: its readiness events, its timers and its byte
//! moves never wake another thread, and no task is stolen.
//!
//! The control plane (discovery, the run loop, the admin servers, UDP)
//! runs on the process's main runtime.

use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The default number of workers: the CPUs this process may use (affinity
/// and cgroup quota taken into account).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The period of each worker's anchor timer ([`anchor`]): no longer
/// than the default first dial timeout, so that no dial arms the
/// earliest timer.
const ANCHOR_PERIOD: Duration = Duration::from_millis(250);

/// Keeps one timer pending on the worker for ever. tokio wakes its own
/// event loop (an `eventfd` write, and an `epoll_wait` that returns at
/// once) whenever a timer is armed earlier than every pending one, and
/// with none pending every timer is: a connection's dial timeout and its
/// half-close timeout each cost that wake-up (`TimerEntry::reset` →
/// `reregister`). A timer that is always due within [`ANCHOR_PERIOD`]
/// makes the later ones free, for 4 idle wake-ups a second per worker.
async fn anchor() {
    let mut tick = tokio::time::interval(ANCHOR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// The running workers. They run until [`Workers::stop`] (the proxier
/// calls it when dropped), which drops whatever tasks are still on them.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` workers (at least one), named `kusp-worker-N`.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count.max(1));
        for i in 0..count.max(1) {
            // I/O and timers only: no signal or process driver to poll at
            // every park.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("kusp-worker-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        tokio::select! {
                            biased;
                            () = stop.cancelled() => {}
                            () = anchor() => {}
                        }
                    })
                })?;
        }
        Ok(Self { handles, stop })
    }

    /// The workers' runtimes.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops every worker: their threads end and their tasks are dropped.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}
