//! `--worker-idle auto`: the workers measure which idle policy costs the
//! process less and keep to that one.
//!
//! Yielding before sleeping ([`super::workers::Idle::Yield`]) pays where
//! the client and the backend on the same CPUs fill the worker's next
//! batch while it waits for the CPU (pipelined HTTP: half the reads a
//! request and two thirds of the CPU), and costs where they do not
//! (one request in flight a connection: the yield becomes two context
//! switches, a fifth more CPU a request). Which one wins depends on the
//! traffic and on what else the machine runs, and both change while a
//! proxy runs, so neither is a good fixed default (`benches/README.md`
//! has the figures).
//!
//! So the workers work in windows of [`WINDOW`] and, at the first park
//! after a window ends, one of them divides the CPU time the process used
//! by the bytes its connections moved: the cost of that window's policy.
//! They keep to the cheaper one (yielding only while it pays by a margin:
//! a tie goes to sleep) and try the other now and then (after [`EXPLORE`]
//! windows, less often while the tries confirm the choice), and at once
//! when its cost was off by more than [`CHANGE`] two windows running (the
//! traffic changed). The first window after a switch is a shorter
//! warm-up, not judged. A window in which the workers ran less than
//! [`MIN_BUSY`] of the time (idle) is skipped: it judges nothing and ends
//! a try, and what was learned stands. Traffic that comes back after a
//! pause is most often the traffic that paused; other traffic is told by
//! its cost, as it is without a pause.
//!
//! One choice for the process, not one a worker: a worker's yield pays
//! in the others' batches as much as in its own. Judged a worker at a
//! time, a worker's own CPU time a byte came out the same under both
//! policies on new connections (medians 405 and 421 ns a byte, windows
//! ±12%), while all workers yielding cost 13% less a connection than all
//! sleeping (`benches/README.md`). The cost to a worker of a park: a
//! thread-local count of bytes added to a shared one, a clock read, and
//! a load of the policy; once a window, one worker takes the chooser
//! (`try_lock`: none waits for it) and reads the process' CPU time.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How long a policy runs before it is judged.
const WINDOW: Duration = Duration::from_millis(100);

/// The unjudged start of a policy's run, after the other policy's.
const WARM_UP: Duration = Duration::from_millis(50);

/// After this many judged windows the policy that is not the cheaper one
/// is tried; each try that confirms the choice doubles the wait, up to
/// [`EXPLORE_MAX`], and one that overturns it starts it again from here.
const EXPLORE: u32 = 8;

/// The longest wait between two tries.
const EXPLORE_MAX: u32 = 64;

/// A change of a policy's cost by more than this fraction from one of its
/// windows to the next counts as a change of traffic.
const CHANGE: f64 = 0.4;

/// How much cheaper yielding must look than sleeping to be taken.
const MARGIN: f64 = 0.1;

/// How much cheaper yielding must stay to be kept: a tie goes to sleep.
/// At equal cost the two are not equal: a yielding worker is runnable, so
/// an event for it waits out the turns of the threads it yielded to
/// (keep-alive p99 3.6 ms or more yielding, 2.75 sleeping, at equal rates
/// and CPU: `benches/README.md`).
const KEEP: f64 = 0.05;

/// A window in which the workers ran less than this share of its time
/// (of one CPU's) is not judged: too little work for its CPU time to say
/// anything. A share of the time, so that the half-length warm-up is held
/// to the same bar; of CPU time, not of bytes, so that traffic of few
/// bytes a unit of work is judged too. A bar of 256 KiB a window missed
/// both: keep-alive HTTP (~190 bytes a request both ways) moved that in a
/// 50-ms warm-up only above 27.6k requests a second a worker, and a new
/// connection a request (~250 bytes) never did, so that traffic kept
/// whatever policy it found.
const MIN_BUSY: f64 = 0.05;

/// Weight of a new window in the running cost of its policy, within a run
/// of windows of that policy.
const WEIGHT: f64 = 0.25;

thread_local! {
    /// Bytes moved by this thread's connections since it last parked.
    static PENDING: Cell<u64> = const { Cell::new(0) };
}

/// Bytes moved by all workers' connections, up to their last park.
static MOVED: AtomicU64 = AtomicU64::new(0);

/// Where the process' time is counted from: [`DUE`] is nanoseconds after it.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// When the running window ends, in nanoseconds after [`EPOCH`]: parks
/// before it only read [`YIELDING`].
static DUE: AtomicU64 = AtomicU64::new(0);

/// The policy in place, for every `auto` worker.
static YIELDING: AtomicBool = AtomicBool::new(true);

/// The process' one chooser, taken by the first worker to park after
/// [`DUE`] (the others go on with the policy in place).
static CHOOSER: LazyLock<Mutex<Chooser>> =
    LazyLock::new(|| Mutex::new(Chooser::new(*EPOCH, 0, process_cpu())));

/// Nanoseconds the `auto` workers spent in windows that moved traffic,
/// under `[sleep, yield]`: wall-clock time, warm-ups included.
static POLICY_NANOS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Times the `auto` workers changed their policy.
static SWITCHES: AtomicU64 = AtomicU64::new(0);

/// Seconds the `auto` workers spent moving traffic while sleeping at once
/// and while yielding first (`[sleep, yield]`), wall clock.
pub fn policy_seconds() -> [f64; 2] {
    POLICY_NANOS
        .each_ref()
        .map(|n| n.load(Relaxed) as f64 / 1e9)
}

/// Times the `auto` workers changed their idle policy.
pub fn switches() -> u64 {
    SWITCHES.load(Relaxed)
}

/// Counts `n` bytes moved by a connection on this thread.
#[inline]
pub fn moved(n: u64) {
    PENDING.with(|m| m.set(m.get().wrapping_add(n)));
}

/// The park hook of an `auto` worker: adds its bytes to the process',
/// judges the window when it is over, then yields or not as the policy in
/// place says.
pub fn on_park() {
    let pending = PENDING.with(|m| m.replace(0));
    if pending != 0 {
        MOVED.fetch_add(pending, Relaxed);
    }
    let now = Instant::now();
    if nanos(now) >= DUE.load(Relaxed) {
        // One worker judges; one that finds the chooser taken goes on.
        if let Ok(mut c) = CHOOSER.try_lock() {
            judge(&mut c, now);
        }
    }
    if YIELDING.load(Relaxed) {
        std::thread::yield_now();
    }
}

/// Ends the chooser's window if it is over (another worker may have ended
/// it since this one read [`DUE`]) and publishes the next one.
fn judge(c: &mut Chooser, now: Instant) {
    let ran = now.saturating_duration_since(c.since);
    if ran >= c.length() {
        let before = c.yielding;
        if c.judge(now, MOVED.load(Relaxed), process_cpu()) {
            let n = u64::try_from(ran.as_nanos()).unwrap_or(u64::MAX);
            POLICY_NANOS[usize::from(before)].fetch_add(n, Relaxed);
        }
        if c.yielding != before {
            SWITCHES.fetch_add(1, Relaxed);
        }
    }
    YIELDING.store(c.yielding, Relaxed);
    DUE.store(nanos(c.since + c.length()), Relaxed);
}

/// `at` in nanoseconds after [`EPOCH`].
fn nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*EPOCH).as_nanos()).unwrap_or(u64::MAX)
}

/// CPU time the process has used, all its threads; zero if the clock
/// cannot be read (the windows then judge nothing).
///
/// glibc's `clock_gettime`, not rustix's: rustix finds the vDSO itself,
/// which valgrind (`benches/callgrind.py`) does not survive.
fn process_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec for the call's duration.
    #[allow(unsafe_code)]
    let r = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// The workers' choice between yielding and sleeping.
#[derive(Debug)]
struct Chooser {
    /// The policy of the running window.
    yielding: bool,
    /// The running window is the first of its policy's run, not judged:
    /// the traffic still carries the other policy's batches (the first
    /// window of sleep after a run of yields cost a fifth more than the
    /// ones after it, enough to keep the dearer policy for ever).
    warming: bool,
    /// Where the running window began: wall clock, bytes moved, CPU used.
    since: Instant,
    moved: u64,
    cpu: Duration,
    /// Running CPU nanoseconds a byte of each policy: `[sleep, yield]`.
    cost: [Option<f64>; 2],
    /// The policy of the last window judged.
    last: Option<bool>,
    /// Windows judged since the other policy was last tried.
    windows: u32,
    /// Judged windows between two tries of the other policy.
    every: u32,
    /// The running window's policy is a try of the dearer one.
    trying: bool,
    /// Whether the last window's cost was beyond [`CHANGE`] of the
    /// running one: 1 above, -1 below, 0 neither.
    drift: i8,
}

impl Chooser {
    /// A chooser whose first judged window yields (the second one sleeps).
    fn new(now: Instant, moved: u64, cpu: Duration) -> Self {
        Self {
            yielding: true,
            warming: false,
            since: now,
            moved,
            cpu,
            cost: [None, None],
            last: None,
            windows: 0,
            every: EXPLORE,
            trying: false,
            drift: 0,
        }
    }

    /// How long the running window lasts.
    fn length(&self) -> Duration {
        if self.warming {
            WARM_UP
        } else {
            WINDOW
        }
    }

    /// Ends the running window with `moved` bytes and `cpu` time counted
    /// so far, and picks the next window's policy; false when the window
    /// was idle (it judged nothing).
    fn judge(&mut self, now: Instant, moved: u64, cpu: Duration) -> bool {
        let bytes = moved.wrapping_sub(self.moved);
        let ran = now.saturating_duration_since(self.since);
        let used = cpu.saturating_sub(self.cpu);
        let idle = bytes == 0 || used.as_secs_f64() < MIN_BUSY * ran.as_secs_f64();
        if idle {
            // Skipped. A try ends unjudged (the policy in place is back), and
            // so does a warm-up: the batches it waited out have drained.
            // Forgetting instead cost each burst of the same traffic a
            // measure of both policies afresh and the tries' schedule
            // from its start: on pipelined traffic, 150 ms of sleeping at
            // 1.4 to 2 times yielding's cost, and a try 0.8 s later.
            if std::mem::take(&mut self.trying) {
                self.yielding = !self.yielding;
            }
            self.warming = false;
        } else if self.warming {
            self.warming = false;
        } else {
            let sample = used.as_nanos() as f64 / bytes as f64;
            let next = self.next(sample);
            self.warming = next != self.yielding;
            self.yielding = next;
        }
        self.since = now;
        self.moved = moved;
        self.cpu = cpu;
        !idle
    }

    /// Adds a judged window's cost to its policy's and says which policy
    /// runs next.
    fn next(&mut self, sample: f64) -> bool {
        // Averaged only over an unbroken run of the policy's windows: a
        // cost from before the other policy ran may be of other traffic,
        // and a try after a change of traffic must be believed at once.
        // A cost beyond `CHANGE` of the running one, twice running and
        // the same way, says the traffic changed (once is a window's
        // noise): the running cost restarts from this window, which is of
        // the new traffic, and the other policy is tried next.
        let mut changed = false;
        let mut drift = 0;
        let slot = &mut self.cost[usize::from(self.yielding)];
        *slot = Some(match *slot {
            Some(old) if self.last == Some(self.yielding) => {
                if (sample - old).abs() > CHANGE * old {
                    drift = if sample > old { 1 } else { -1 };
                    changed = drift == self.drift;
                }
                if changed {
                    sample
                } else {
                    old + WEIGHT * (sample - old)
                }
            }
            _ => sample,
        });
        self.drift = if changed { 0 } else { drift };
        self.last = Some(self.yielding);
        self.windows += 1;
        let tried = std::mem::take(&mut self.trying);
        match self.cost {
            [Some(sleep), Some(yielding)] => {
                // Yielding is taken only when it is cheaper by `MARGIN`,
                // and kept while it stays cheaper by `KEEP`: one window's
                // noise (a fifth either way on pipelined traffic) must not
                // flip a choice the averaged cost made, and a tie goes to
                // sleep. The policy in place is the one a try was made
                // against.
                let in_place = self.yielding != tried;
                let bar = if in_place { KEEP } else { MARGIN };
                let cheaper = yielding < sleep * (1.0 - bar);
                if tried {
                    self.every = if cheaper == self.yielding {
                        EXPLORE
                    } else {
                        (self.every * 2).min(EXPLORE_MAX)
                    };
                }
                if changed {
                    // The other policy is measured on the new traffic: a
                    // try while the costs still favour this one (the
                    // other's is of the old traffic), a switch if not.
                    self.every = EXPLORE;
                    self.windows = 0;
                    self.trying = cheaper == self.yielding;
                    !self.yielding
                } else if self.windows >= self.every {
                    self.windows = 0;
                    self.trying = true;
                    !cheaper
                } else {
                    cheaper
                }
            }
            // Each policy is measured once before any is preferred.
            [None, _] => false,
            [_, None] => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a chooser windows in which yielding costs `yield_cost` and
    /// sleeping `sleep_cost` CPU nanoseconds a byte (10 MB a window, so
    /// that even a cost of 5 keeps the thread half busy);
    /// returns the policy of each judged window (warm-ups left out).
    fn run(chooser: &mut Chooser, windows: usize, sleep_cost: u64, yield_cost: u64) -> Vec<bool> {
        let mut policies = Vec::new();
        while policies.len() < windows {
            if !chooser.warming {
                policies.push(chooser.yielding);
            }
            step(chooser, sleep_cost, yield_cost);
        }
        policies
    }

    /// Ends the running window (a warm-up or not) as [`run`] does.
    fn step(chooser: &mut Chooser, sleep_cost: u64, yield_cost: u64) {
        let cost = if chooser.yielding {
            yield_cost
        } else {
            sleep_cost
        };
        let now = chooser.since + chooser.length();
        let cpu = chooser.cpu + Duration::from_nanos(cost * 10_000_000);
        chooser.judge(now, chooser.moved + 10_000_000, cpu);
    }

    /// Tries of the dearer policy (`false` where yielding is cheaper),
    /// after the two first windows.
    fn tries(p: &[bool], cheaper: bool) -> Vec<usize> {
        (2..p.len()).filter(|&i| p[i] != cheaper).collect()
    }

    #[test]
    fn measures_both_then_keeps_to_the_cheaper_trying_the_other_less_and_less() {
        let mut c = Chooser::new(Instant::now(), 0, Duration::ZERO);
        let p = run(&mut c, 200, 10, 7);
        assert_eq!(&p[..2], &[true, false], "yield once, then sleep once");
        // Tries after 6 kept windows, then 15, 31, 63, 63.
        assert_eq!(tries(&p, true), [8, 24, 56, 120, 184], "{p:?}");

        let mut c = Chooser::new(Instant::now(), 0, Duration::ZERO);
        let p = run(&mut c, 200, 7, 10);
        assert_eq!(
            tries(&p, false),
            [8, 24, 56, 120, 184],
            "the other way round"
        );
    }

    #[test]
    fn follows_the_traffic_when_the_cheaper_policy_changes() {
        let mut c = Chooser::new(Instant::now(), 0, Duration::ZERO);
        run(&mut c, 40, 10, 5);
        // Now sleeping is the cheaper: yielding's lasting jump in cost has
        // it tried after two windows, and kept; yielding is then tried
        // after eight.
        let p = run(&mut c, 12, 5, 10);
        assert!(p[1] && !p[2], "{p:?}");
        assert_eq!(tries(&p, false), [10], "{p:?}");
    }

    /// Sleeping was measured on one traffic, yielding keeps being cheaper
    /// on the next: one try of yielding on the new traffic is enough.
    #[test]
    fn a_try_is_believed_over_a_cost_measured_on_other_traffic() {
        let mut c = Chooser::new(Instant::now(), 0, Duration::ZERO);
        run(&mut c, 40, 10, 50);
        let p = run(&mut c, EXPLORE_MAX as usize + 4, 12, 8);
        assert!(p[p.len() - 3..].iter().all(|y| *y), "{p:?}");
    }

    /// The kept policy's cost jumps and stays up (new traffic): the other
    /// one is tried after the second such window, not up to sixteen
    /// windows later.
    #[test]
    fn a_lasting_jump_in_cost_tries_the_other_policy_soon() {
        let mut c = Chooser::new(Instant::now(), 0, Duration::ZERO);
        run(&mut c, 20, 10, 40);
        run(&mut c, 1, 10, 40);
        let p = run(&mut c, 4, 30, 12);
        assert!(!p[1], "one window off is noise: {p:?}");
        assert!(p[2], "two are a change, the other is tried: {p:?}");
        assert!(p[3], "and kept: {p:?}");
    }

    /// A yielding worker whose yielding stops paying (its cost comes within
    /// `KEEP` of sleeping's) sleeps, and the ties that follow stay asleep.
    #[test]
    fn a_tie_goes_to_sleep() {
        let mut c = Chooser::new(Instant::now(), 0, Duration::ZERO);
        let p = run(&mut c, 40, 100, 85);
        assert!(p[30..].iter().all(|y| *y), "yielding pays: {p:?}");
        let p = run(&mut c, 40, 100, 98);
        assert!(
            p[10..].iter().filter(|y| !**y).count() >= 28,
            "at 98 against 100, sleep: {p:?}"
        );
    }

    /// Sleeping in place is left only for yielding cheaper by `MARGIN`.
    #[test]
    fn sleeping_is_left_only_for_yielding_cheaper_by_the_margin() {
        let mut c = Chooser::new(Instant::now(), 0, Duration::ZERO);
        let p = run(&mut c, 40, 100, 95);
        assert_eq!(
            tries(&p, false),
            [8, 24],
            "sleep, measured second, stays: {p:?}"
        );
        let p = run(&mut c, 40, 100, 85);
        assert!(
            p[16..].iter().filter(|y| **y).count() >= 22,
            "beyond it, yield from the next try: {p:?}"
        );
    }

    #[test]
    fn an_idle_window_judges_nothing() {
        let start = Instant::now();
        let mut c = Chooser::new(start, 0, Duration::ZERO);
        // 4 ms of CPU in 100 ms: under `MIN_BUSY`, however many bytes.
        c.judge(start + WINDOW, 1_000_000, Duration::from_millis(4));
        assert_eq!((c.cost, c.windows, c.yielding), ([None, None], 0, true));
        assert_eq!(c.moved, 1_000_000, "the next window starts here");
        c.judge(start + 2 * WINDOW, 1_000_000, Duration::from_millis(40));
        assert_eq!(c.cost, [None, None], "no bytes: nothing to divide by");
    }

    /// Idle is a share of the time: a warm-up half a window long is busy
    /// with the CPU time that leaves a full window idle.
    #[test]
    fn idle_is_a_share_of_the_time_so_a_warm_up_is_held_to_the_same_bar() {
        let start = Instant::now();
        let mut c = Chooser::new(start, 0, Duration::ZERO);
        c.judge(start + WINDOW, 1_000_000, Duration::from_millis(10));
        assert!(!c.yielding && c.warming);
        let judged = c.judge(
            start + WINDOW + WARM_UP,
            1_100_000,
            Duration::from_millis(13),
        );
        assert!(judged && !c.yielding && !c.warming, "warmed up, sleeping");
        let at = start + WINDOW + WARM_UP + WINDOW;
        let judged = c.judge(at, 1_200_000, Duration::from_millis(16));
        assert!(!judged, "the same over a full window is idle");
        assert_eq!(c.cost, [None, Some(10.0)], "nothing forgotten");
    }

    /// A pause (an idle window) keeps what was learned, and a try of the
    /// dearer policy that it interrupts ends, unjudged.
    #[test]
    fn a_pause_keeps_what_was_learned_and_ends_a_try() {
        let mut c = Chooser::new(Instant::now(), 0, Duration::ZERO);
        run(&mut c, 30, 100, 60);
        let (cost, every) = (c.cost, c.every);
        assert!(c.yielding && !c.trying);
        let pause = |c: &mut Chooser| c.judge(c.since + WINDOW, c.moved, c.cpu);
        assert!(!pause(&mut c));
        assert_eq!((c.cost, c.every, c.yielding), (cost, every, true));
        while !c.trying {
            step(&mut c, 100, 60);
        }
        assert!(!c.yielding && c.warming, "a try of sleep begins");
        pause(&mut c);
        assert!(c.yielding && !c.trying && !c.warming, "yield is back");
        assert_eq!(c.cost, cost, "the try judged nothing");
    }

    /// A lasting change of cost is new traffic: the running cost restarts
    /// from it instead of blending the old traffic's in.
    #[test]
    fn a_change_of_traffic_restarts_the_running_cost() {
        let mut c = Chooser::new(Instant::now(), 0, Duration::ZERO);
        run(&mut c, 20, 300, 20);
        assert!(c.yielding);
        run(&mut c, 2, 300, 100);
        assert_eq!(c.cost[1], Some(100.0), "{:?}", c.cost);
    }

    /// The first window after a switch is a shorter warm-up whose cost,
    /// however high, counts for nothing.
    #[test]
    fn the_window_after_a_switch_is_not_judged() {
        let start = Instant::now();
        let mut c = Chooser::new(start, 0, Duration::ZERO);
        c.judge(start + WINDOW, 1_000_000, Duration::from_millis(10));
        assert!(!c.yielding && c.warming, "sleep is tried next, warming up");
        assert_eq!(c.length(), WARM_UP);
        c.judge(
            start + WINDOW + WARM_UP,
            2_000_000,
            Duration::from_millis(500),
        );
        assert!(!c.yielding && !c.warming);
        assert_eq!(c.cost, [None, Some(10.0)]);
    }

    #[test]
    fn the_park_hook_runs_on_any_thread() {
        moved(1);
        on_park();
        on_park();
    }

    /// A worker's bytes reach the count the chooser reads at its next
    /// park, whichever worker judges.
    #[test]
    fn a_park_adds_the_workers_bytes_to_the_process_count() {
        let before = MOVED.load(Relaxed);
        std::thread::spawn(|| {
            moved(1_000);
            on_park();
            assert_eq!(PENDING.with(Cell::get), 0);
        })
        .join()
        .expect("the worker thread");
        assert!(MOVED.load(Relaxed) >= before + 1_000);
    }
}
