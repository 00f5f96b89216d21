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
//! A worker that runs out of work may yield its CPU once before it sleeps
//! ([`Idle::Yield`]). A worker that sleeps the moment its last task is
//! done is woken for the first event while the client and the backend on
//! the same CPUs are still producing the next ones; after a yield they
//! have run, and the next `epoll_wait` returns a batch without sleeping:
//! a fifth of the `epoll_wait`s and half the reads per pipelined request.
//! With one request in flight per connection the yield is two context
//! switches for nothing, on a quiet machine a fifth more CPU a request
//! (`benches/README.md`). So by default ([`Idle::Auto`]) each worker
//! measures both and keeps to the cheaper ([`super::idle`]). It is not
//! busy-polling: the worker still sleeps, one syscall later; with nothing
//! else runnable on its CPU the yield returns at once.
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

/// What a worker does when it has no task to run (`--worker-idle`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Idle {
    /// Each worker measures its CPU time per byte moved under `yield` and
    /// under `sleep`, and keeps to the cheaper ([`super::idle`]).
    #[default]
    Auto,
    /// Give the CPU to the threads waiting for it (`sched_yield(2)`), then
    /// sleep in `epoll_wait`: with clients or backends on the same CPUs,
    /// they run first and the worker wakes to a fuller batch of events.
    Yield,
    /// Sleep in `epoll_wait` at once.
    Sleep,
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
    /// Starts `count` workers (at least one), named `kusp-worker-N`, that
    /// do `idle` when they run out of work.
    pub fn start(count: usize, idle: Idle) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count.max(1));
        for i in 0..count.max(1) {
            // I/O and timers only: no signal or process driver to poll at
            // every park.
            let mut b = tokio::runtime::Builder::new_current_thread();
            b.enable_io().enable_time();
            match idle {
                Idle::Auto => b.on_thread_park(super::idle::on_park),
                Idle::Yield => b.on_thread_park(std::thread::yield_now),
                Idle::Sleep => &mut b,
            };
            let rt = b.build()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A ping-pong between two workers over loopback, in each idle mode:
    /// every message makes both workers run out of work and wait.
    #[test]
    fn both_idle_modes_carry_a_ping_pong_between_workers() {
        for idle in [Idle::Auto, Idle::Yield, Idle::Sleep] {
            let workers = Workers::start(2, idle).unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            workers.handles()[0].spawn(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let (mut s, _) = listener.accept().await.unwrap();
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).await.is_ok() {
                    s.write_all(&b).await.unwrap();
                }
            });
            let (done, finished) = std::sync::mpsc::channel();
            workers.handles()[1].spawn(async move {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                for i in 0..2_000u32 {
                    let byte = [i as u8];
                    c.write_all(&byte).await.unwrap();
                    let mut back = [0u8; 1];
                    c.read_exact(&mut back).await.unwrap();
                    assert_eq!(back, byte);
                }
                done.send(()).unwrap();
            });
            // A panic on the worker drops `done`: an error here, not a hang.
            let result = finished.recv_timeout(Duration::from_secs(20));
            workers.stop();
            assert_eq!(result, Ok(()), "{idle:?}");
        }
    }
}
