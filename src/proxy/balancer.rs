//! Per-service-port endpoint choice: a [`Scheduler`] over ready endpoints,
//! ClientIP affinity, and passive ejection of endpoints whose dial failed.
//!
//! The data path reads the endpoint set without locks (an [`ArcSwap`]
//! swapped only when the set changes); the round-robin cursor is one atomic,
//! so picks stay exactly fair under concurrency. Affinity, when enabled, is
//! the only lock, and only for services that ask for it. The scheduler is
//! one more atomic: changing it never touches open connections.
//!
//! Every scheduler sees the same candidates, in tiers: untried and healthy
//! endpoints; else untried but ejected ones (all are ejected); else tried
//! ones, healthy first (fewer endpoints than attempts). Affinity, when set,
//! decides the first attempt before any scheduler does.
//!
//! - `rr`: one cursor step per pick (the fast path, unchanged).
//! - `lc`: fewest open connections + dials in flight ([`Backend::load`]);
//!   ties go round the ring.
//! - `sed`: least `(load + 1) × smoothed connect time`; endpoints have no
//!   weights in Kubernetes, so the measured connect time stands in for
//!   IPVS's `1 / weight`.
//! - `nq`: an idle endpoint (load 0) if any, round the ring; else `sed`.
//! - `sh`: rendezvous (highest random weight) hashing of the client IP with
//!   each endpoint's address: removing an endpoint moves only its own
//!   clients, adding one takes ~1/n from each, and retries walk the same
//!   client's next-highest scores. Deterministic across proxies.
//! - `p2c`: two distinct random candidates, the less loaded one wins.
//! - `random`: uniform among the candidates.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::model::{Affinity, Endpoint, Scheduler};

/// First ejection after a failed dial; doubles on each further failure.
pub const EJECT_BASE: Duration = Duration::from_secs(1);
/// Longest ejection: a dead pod is re-probed at least this often.
pub const EJECT_MAX: Duration = Duration::from_secs(30);

/// Milliseconds since the first call: a cheap monotonic clock for atomics.
pub fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One backend address and its live state, kept across endpoint updates for
/// as long as the address stays in the set.
#[derive(Debug)]
pub struct Backend {
    /// Where to dial.
    pub addr: SocketAddr,
    /// Connections open to it now.
    pub active: AtomicU64,
    /// Connections ever established to it.
    pub total: AtomicU64,
    /// Dials that failed (any reason).
    pub dial_failures: AtomicU64,
    /// Bytes sent to it (client → backend).
    pub bytes_in: AtomicU64,
    /// Bytes received from it (backend → client).
    pub bytes_out: AtomicU64,
    /// Times it was ejected.
    pub ejections: AtomicU64,
    /// Ejected until this [`now_ms`] instant; 0 when healthy.
    ejected_until: AtomicU64,
    /// Consecutive failures, for the doubling back-off.
    failures: AtomicU32,
    /// Dials in flight to it: load from the pick on, so a burst of accepts
    /// does not pile onto the one least-loaded backend before any connects.
    pub pending: AtomicU64,
    /// Smoothed connect time in microseconds (EWMA, 1/8); 0 until measured.
    pub connect_us: AtomicU64,
    /// Dials in a row whose handshake had not completed when `connect`
    /// returned: 0 for a backend on this host, where it always has
    /// ([`Backend::look_first`]).
    late_connects: AtomicU32,
    /// Stable hash of the address: its rendezvous key for `sh`.
    key: u64,
}

/// Dials in a row that find a backend's handshake still in flight before
/// [`Backend::look_first`] stops looking.
const LATE_CONNECTS: u32 = 4;

/// How often (in connections) a backend that stopped being looked at is
/// looked at again.
const LATE_RELOOK: u64 = 64;

/// Connect times below this count as equal for `sed`/`nq`: loopback and
/// same-zone jitter must not decide, only real differences in distance
/// (another zone) or in how fast a backend accepts (a full accept queue).
pub const SED_FLOOR_US: u64 = 500;

impl Backend {
    /// A backend outside any endpoint set: the endpoint of a connection
    /// handed over after the endpoint left its service.
    pub fn detached(addr: SocketAddr) -> Self {
        Self::new(addr)
    }

    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            pending: AtomicU64::new(0),
            connect_us: AtomicU64::new(0),
            late_connects: AtomicU32::new(0),
            key: addr_key(addr),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            dial_failures: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        }
    }

    /// Whether the backend is in its ejection back-off at `now` ([`now_ms`]).
    pub fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Relaxed)
    }

    /// Milliseconds of ejection left, for status output.
    pub fn ejected_for_ms(&self) -> u64 {
        self.ejected_until.load(Relaxed).saturating_sub(now_ms())
    }

    /// What `lc`, `nq`, `sed` and `p2c` compare: open connections plus dials
    /// in flight.
    pub fn load(&self) -> u64 {
        self.active.load(Relaxed) + self.pending.load(Relaxed)
    }

    /// Folds one successful connect time into [`Backend::connect_us`].
    pub fn observe_connect(&self, d: Duration) {
        let sample = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.connect_us.load(Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.connect_us.store(new.max(1), Relaxed);
    }

    /// Whether a dial should send the client's first bytes right after
    /// `connect`, betting that the handshake already completed, instead
    /// of waiting for its event first (`connect::connect_once`): yes
    /// until [`LATE_CONNECTS`] dials in a row found it still in flight (a
    /// remote backend, a round trip away), then one dial in
    /// [`LATE_RELOOK`], so a backend on this host that was slow for a
    /// moment (its SYN queue, softirqs deferred under load) is tried
    /// again.
    pub fn look_first(&self) -> bool {
        self.late_connects.load(Relaxed) < LATE_CONNECTS
            || self.total.load(Relaxed).is_multiple_of(LATE_RELOOK)
    }

    /// Notes what an early send found: the handshake completed (`true`:
    /// the bytes went, or the dial failed) or still in flight (`EAGAIN`).
    pub fn observe_look(&self, completed: bool) {
        let late = self.late_connects.load(Relaxed);
        let new = if completed { 0 } else { late.saturating_add(1) };
        if new != late {
            self.late_connects.store(new, Relaxed);
        }
    }

    /// `sed`'s expected delay of one more connection.
    fn expected_delay(&self) -> u64 {
        (self.load() + 1).saturating_mul(self.connect_us.load(Relaxed).max(SED_FLOOR_US))
    }
}

/// splitmix64's finaliser: a bijective mix with full avalanche.
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a over bytes, then mixed: a hash that is the same in every process
/// (so every node's proxy sends a client to the same endpoint).
fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    mix64(h)
}

fn addr_key(addr: SocketAddr) -> u64 {
    let mut buf = [0u8; 18];
    let ip = match addr.ip().to_canonical() {
        IpAddr::V4(v4) => {
            buf[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            buf[..16].copy_from_slice(&v6.octets());
            16
        }
    };
    buf[ip..ip + 2].copy_from_slice(&addr.port().to_be_bytes());
    stable_hash(&buf[..ip + 2])
}

/// The `sh` key of a client: its IP only (IPv4-mapped IPv6 as IPv4).
pub fn client_key(client: IpAddr) -> u64 {
    match client.to_canonical() {
        IpAddr::V4(v4) => stable_hash(&v4.octets()),
        IpAddr::V6(v6) => stable_hash(&v6.octets()),
    }
}

/// The rendezvous score of a backend for a client: the highest wins.
fn score(client: u64, backend: u64) -> u64 {
    mix64(client ^ backend)
}

/// Two distinct random endpoints passing `ok`, by direct draws (the common
/// case: few are ejected or tried); `None` after a few misses, when the
/// caller counts the candidates instead.
fn sample_two<'a>(
    usable: &'a [Arc<Backend>],
    ok: &impl Fn(&Backend) -> bool,
) -> Option<(&'a Arc<Backend>, &'a Arc<Backend>)> {
    let n = usable.len();
    if n < 2 {
        return None;
    }
    for _ in 0..4 {
        let i = rand_below(n);
        let mut j = rand_below(n - 1);
        if j >= i {
            j += 1;
        }
        let (a, b) = (&usable[i], &usable[j]);
        if ok(a) && ok(b) {
            return Some((a, b));
        }
    }
    None
}

/// A uniform index below `n` (> 0) from a per-thread xorshift generator.
fn rand_below(n: usize) -> usize {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(now_ms());
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        ((u128::from(x) * n as u128) >> 64) as usize
    })
}

/// The endpoint set in force, as the data path sees it.
#[derive(Debug, Default)]
struct EndpointSet {
    /// All endpoints with their conditions, sorted by address.
    all: Vec<(Endpoint, Arc<Backend>)>,
    /// The ones eligible for new connections: ready ones, else serving ones
    /// (e.g. terminating but still serving), else none.
    usable: Vec<Arc<Backend>>,
    /// `usable` by IP family (`[IPv4, IPv6]`): a connection only ever goes
    /// to an endpoint of its own family, as upstream's one proxier per
    /// family.
    by_family: [Vec<Arc<Backend>>; 2],
}

#[derive(Debug)]
struct AffinityTable {
    timeout: Duration,
    clients: HashMap<IpAddr, (SocketAddr, Instant)>,
}

/// Chooses endpoints for one service port.
#[derive(Debug, Default)]
pub struct Balancer {
    set: ArcSwap<EndpointSet>,
    cursor: AtomicUsize,
    /// Whether `affinity` is set: lets plain round-robin skip the lock.
    has_affinity: AtomicBool,
    affinity: Mutex<Option<AffinityTable>>,
    /// The [`Scheduler`] in force, as its index in [`Scheduler::ALL`].
    scheduler: AtomicU8,
}

/// `Scheduler::Rr` as stored in [`Balancer::scheduler`].
const RR: u8 = 0;

impl Balancer {
    /// Installs a new endpoint list and affinity setting; returns whether the
    /// usable set changed. Usable: the ready endpoints, else the serving
    /// ones. Open connections are not touched; the live state of addresses
    /// that stay is kept.
    pub fn update(&self, endpoints: &[Endpoint], affinity: Option<Affinity>) -> bool {
        let mut usable: Vec<Endpoint> = endpoints.iter().filter(|e| e.ready).cloned().collect();
        if usable.is_empty() {
            usable = endpoints.iter().filter(|e| e.serving).cloned().collect();
        }
        self.set_affinity(affinity);
        if self.holds(endpoints, &usable) {
            return false;
        }
        self.install(&Self::with_backends(endpoints, &self.backends()), &usable);
        true
    }

    /// Whether the set in force is exactly `endpoints`, of which `usable`
    /// take new connections (nothing to install).
    pub fn holds(&self, endpoints: &[Endpoint], usable: &[Endpoint]) -> bool {
        let cur = self.set.load();
        cur.all.len() == endpoints.len()
            && cur.all.iter().zip(endpoints).all(|((e, _), n)| e == n)
            && cur.usable.len() == usable.len()
            && cur.usable.iter().zip(usable).all(|(b, u)| b.addr == u.addr)
    }

    /// The live state of every endpoint, by address (to carry it over to
    /// the next set).
    pub fn backends(&self) -> HashMap<SocketAddr, Arc<Backend>> {
        self.set
            .load()
            .all
            .iter()
            .map(|(e, b)| (e.addr, Arc::clone(b)))
            .collect()
    }

    /// Pairs `endpoints` with their live state from `backends`, or a new one.
    pub fn with_backends(
        endpoints: &[Endpoint],
        backends: &HashMap<SocketAddr, Arc<Backend>>,
    ) -> Vec<(Endpoint, Arc<Backend>)> {
        endpoints
            .iter()
            .map(|e| {
                let b = backends
                    .get(&e.addr)
                    .map(Arc::clone)
                    .unwrap_or_else(|| Arc::new(Backend::new(e.addr)));
                (e.clone(), b)
            })
            .collect()
    }

    /// Installs `all` (every endpoint of the port, shown in status) of
    /// which `usable` are chosen for new connections (already decided:
    /// `discovery::topology`). Callers skip it when [`Self::holds`].
    pub fn install(&self, all: &[(Endpoint, Arc<Backend>)], usable: &[Endpoint]) {
        let by_addr: HashMap<SocketAddr, &Arc<Backend>> =
            all.iter().map(|(e, b)| (e.addr, b)).collect();
        let usable: Vec<Arc<Backend>> = usable
            .iter()
            .filter_map(|u| by_addr.get(&u.addr).map(|b| Arc::clone(b)))
            .collect();
        if let Some(table) = self
            .affinity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            table
                .clients
                .retain(|_, (addr, _)| usable.iter().any(|b| b.addr == *addr));
        }
        let of = |v6: bool| -> Vec<Arc<Backend>> {
            usable
                .iter()
                .filter(|b| b.addr.ip().is_ipv6() == v6)
                .cloned()
                .collect()
        };
        let by_family = [of(false), of(true)];
        self.set.store(Arc::new(EndpointSet {
            all: all.to_vec(),
            usable,
            by_family,
        }));
    }

    /// Switches the scheduler in place; returns whether it changed. Open
    /// connections and the affinity table are not touched.
    pub fn set_scheduler(&self, s: Scheduler) -> bool {
        let i = Scheduler::ALL.iter().position(|x| *x == s).unwrap_or(0) as u8;
        self.scheduler.swap(i, Relaxed) != i
    }

    /// The scheduler in force.
    pub fn scheduler(&self) -> Scheduler {
        Scheduler::ALL
            .get(usize::from(self.scheduler.load(Relaxed)))
            .copied()
            .unwrap_or_default()
    }

    /// Switches ClientIP affinity on (with its timeout) or off.
    pub fn set_affinity(&self, affinity: Option<Affinity>) {
        self.has_affinity.store(affinity.is_some(), Relaxed);
        let mut table = self.affinity.lock().unwrap_or_else(|e| e.into_inner());
        match (affinity, table.as_mut()) {
            (None, _) => *table = None,
            (Some(a), Some(t)) => t.timeout = a.timeout,
            (Some(a), None) => {
                *table = Some(AffinityTable {
                    timeout: a.timeout,
                    clients: HashMap::new(),
                })
            }
        }
    }

    /// Every endpoint with its conditions and live state, for status output.
    pub fn endpoints(&self) -> Vec<(Endpoint, Arc<Backend>)> {
        self.set.load().all.clone()
    }

    /// The addresses eligible for new connections.
    pub fn usable(&self) -> Vec<SocketAddr> {
        self.set.load().usable.iter().map(|b| b.addr).collect()
    }

    /// Number of endpoints eligible for new connections.
    pub fn usable_len(&self) -> usize {
        self.set.load().usable.len()
    }

    /// Picks the backend for a client's next dial by the scheduler in force,
    /// avoiding those in `tried` (earlier attempts of this connection).
    /// Affinity applies to the first attempt only, as upstream, and wins
    /// over the scheduler. Preference: untried and healthy, then
    /// untried but ejected (every endpoint ejected), then tried ones (fewer
    /// endpoints than attempts). Only endpoints of the client's IP family
    /// are candidates (an IPv4-mapped client is IPv4). `None` when no
    /// endpoint of the family is usable.
    pub fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let set = self.set.load();
        let usable = &set.by_family[usize::from(client.to_canonical().is_ipv6())];
        if usable.is_empty() {
            return None;
        }
        let now = now_ms();
        let sched = self.scheduler.load(Relaxed);
        if !self.has_affinity.load(Relaxed) {
            return self.schedule(sched, usable, client, tried, now);
        }
        let mut affinity = self.affinity.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(table) = affinity.as_mut() {
            if tried.is_empty() {
                if let Some((addr, last)) = table.clients.get_mut(&client) {
                    if last.elapsed() < table.timeout {
                        let hit = usable.iter().find(|b| b.addr == *addr);
                        if let Some(b) = hit.filter(|b| !b.is_ejected(now)) {
                            *last = Instant::now();
                            return Some(Arc::clone(b));
                        }
                    }
                }
            }
        } else {
            drop(affinity);
            return self.schedule(sched, usable, client, tried, now);
        }
        let chosen = self.schedule(sched, usable, client, tried, now)?;
        if let Some(table) = affinity.as_mut() {
            table.clients.insert(client, (chosen.addr, Instant::now()));
        }
        Some(chosen)
    }

    #[inline]
    fn schedule(
        &self,
        sched: u8,
        usable: &[Arc<Backend>],
        client: IpAddr,
        tried: &[SocketAddr],
        now: u64,
    ) -> Option<Arc<Backend>> {
        if sched == RR {
            return self.round_robin(usable, tried, now);
        }
        self.schedule_other(sched, usable, client, tried, now)
    }

    /// Every scheduler but `rr`, kept out of line so the rr path stays small.
    #[inline(never)]
    fn schedule_other(
        &self,
        sched: u8,
        usable: &[Arc<Backend>],
        client: IpAddr,
        tried: &[SocketAddr],
        now: u64,
    ) -> Option<Arc<Backend>> {
        let sched = Scheduler::ALL
            .get(usize::from(sched))
            .copied()
            .unwrap_or_default();
        let key = if sched == Scheduler::Sh {
            client_key(client)
        } else {
            0
        };
        // Tiers: untried healthy, untried (all ejected), tried healthy, any.
        for tier in 0..4u8 {
            let ok = |b: &Backend| {
                let (t, e) = (tried.contains(&b.addr), b.is_ejected(now));
                match tier {
                    0 => !t && !e,
                    1 => !t,
                    2 => !e,
                    _ => true,
                }
            };
            if let Some(b) = self.choose(sched, usable, key, &ok) {
                return Some(Arc::clone(b));
            }
        }
        None
    }

    /// One scheduler's choice among the `usable` endpoints that pass `ok`.
    fn choose<'a>(
        &self,
        sched: Scheduler,
        usable: &'a [Arc<Backend>],
        key: u64,
        ok: &impl Fn(&Backend) -> bool,
    ) -> Option<&'a Arc<Backend>> {
        match sched {
            Scheduler::Rr | Scheduler::Lc => self.least(usable, ok, Backend::load),
            Scheduler::Sed => self.least(usable, ok, Backend::expected_delay),
            Scheduler::Nq => {
                let start = self.cursor.fetch_add(1, Relaxed);
                let n = usable.len();
                (0..n)
                    .map(|k| &usable[(start.wrapping_add(k)) % n])
                    .find(|b| ok(b) && b.load() == 0)
                    .or_else(|| self.least(usable, ok, Backend::expected_delay))
            }
            Scheduler::Sh => usable
                .iter()
                .filter(|b| ok(b))
                .max_by_key(|b| score(key, b.key)),
            Scheduler::P2c => {
                if let Some((a, b)) = sample_two(usable, ok) {
                    return Some(if b.load() < a.load() { b } else { a });
                }
                let k = usable.iter().filter(|b| ok(b)).count();
                match k {
                    0 => None,
                    1 => usable.iter().find(|b| ok(b)),
                    _ => {
                        let i = rand_below(k);
                        let mut j = rand_below(k - 1);
                        if j >= i {
                            j += 1;
                        }
                        let a = usable.iter().filter(|b| ok(b)).nth(i)?;
                        let b = usable.iter().filter(|b| ok(b)).nth(j)?;
                        Some(if b.load() < a.load() { b } else { a })
                    }
                }
            }
            Scheduler::Random => {
                // Usually the first draw passes; count only when it does not.
                let b = &usable[rand_below(usable.len())];
                if ok(b) {
                    return Some(b);
                }
                let k = usable.iter().filter(|b| ok(b)).count();
                if k == 0 {
                    return None;
                }
                usable.iter().filter(|b| ok(b)).nth(rand_below(k))
            }
        }
    }

    /// The endpoint passing `ok` with the smallest `cost`; ties are broken
    /// by a rotating start, so equally loaded endpoints share new work.
    fn least<'a>(
        &self,
        usable: &'a [Arc<Backend>],
        ok: &impl Fn(&Backend) -> bool,
        cost: impl Fn(&Backend) -> u64,
    ) -> Option<&'a Arc<Backend>> {
        let n = usable.len();
        let start = self.cursor.fetch_add(1, Relaxed);
        let mut best: Option<(u64, &Arc<Backend>)> = None;
        for k in 0..n {
            let b = &usable[(start.wrapping_add(k)) % n];
            if !ok(b) {
                continue;
            }
            let c = cost(b);
            if best.is_none_or(|(bc, _)| c < bc) {
                best = Some((c, b));
            }
        }
        best.map(|(_, b)| b)
    }

    fn round_robin(
        &self,
        usable: &[Arc<Backend>],
        tried: &[SocketAddr],
        now: u64,
    ) -> Option<Arc<Backend>> {
        let n = usable.len();
        // Each step takes a cursor slot, so skipping an ejected endpoint does
        // not hand its share to the one after it.
        for _ in 0..n {
            let b = &usable[self.cursor.fetch_add(1, Relaxed) % n];
            if !b.is_ejected(now) && !tried.contains(&b.addr) {
                return Some(Arc::clone(b));
            }
        }
        let start = self.cursor.load(Relaxed);
        let rank = |b: &Arc<Backend>| (tried.contains(&b.addr), b.is_ejected(now));
        (0..n)
            .map(|k| &usable[(start.wrapping_add(k)) % n])
            .min_by_key(|b| rank(b))
            .cloned()
    }

    /// Records a failed dial: ejects the backend for a back-off that starts
    /// at [`EJECT_BASE`] and doubles up to [`EJECT_MAX`]. Failures seen while
    /// it is already ejected (dials that were in flight) do not extend it.
    pub fn report_failure(&self, b: &Backend) {
        b.dial_failures.fetch_add(1, Relaxed);
        let now = now_ms();
        if b.is_ejected(now) {
            return;
        }
        let failures = b.failures.fetch_add(1, Relaxed).min(16);
        let backoff = EJECT_BASE
            .saturating_mul(1 << failures)
            .min(EJECT_MAX)
            .as_millis() as u64;
        b.ejected_until.store(now + backoff, Relaxed);
        b.ejections.fetch_add(1, Relaxed);
    }

    /// Records a successful dial: the backend is healthy again.
    pub fn report_success(&self, b: &Backend) {
        if b.failures.load(Relaxed) != 0 {
            b.failures.store(0, Relaxed);
            b.ejected_until.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16, ready: bool, serving: bool) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            ready,
            serving,
            terminating: !ready,
            node_name: None,
            zone: None,
            hints_zones: Vec::new(),
            hints_nodes: Vec::new(),
        }
    }

    fn client(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    /// Upstream keeps one proxier per IP family: a connection only goes to
    /// endpoints of its own family (an IPv4-mapped client is IPv4), and a
    /// family without endpoints has none to pick.
    #[test]
    fn each_family_picks_its_own_endpoints() {
        let b = Balancer::default();
        let v6 = Endpoint {
            addr: "[fd00::2]:80".parse().unwrap(),
            ..ep(80, true, true)
        };
        b.update(&[ep(1, true, true), v6.clone()], None);
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        for _ in 0..4 {
            assert_eq!(b.pick(client(1), &[]).unwrap().addr.port(), 1);
            assert_eq!(b.pick(mapped, &[]).unwrap().addr.port(), 1);
            assert_eq!(
                b.pick("fd00::9".parse().unwrap(), &[]).unwrap().addr,
                v6.addr
            );
        }
        b.update(&[ep(1, true, true)], None);
        assert!(b.pick("fd00::9".parse().unwrap(), &[]).is_none());
        assert_eq!(b.usable_len(), 1);
    }

    #[test]
    fn round_robin_is_exact() {
        let b = Balancer::default();
        b.update(
            &[ep(1, true, true), ep(2, true, true), ep(3, true, true)],
            None,
        );
        let mut counts = HashMap::new();
        for i in 0..300 {
            let p = b.pick(client(i as u8), &[]).unwrap();
            *counts.entry(p.addr.port()).or_insert(0) += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![100; 3]);
    }

    #[test]
    fn falls_back_to_serving_when_none_ready() {
        let b = Balancer::default();
        b.update(&[ep(1, false, true), ep(2, false, false)], None);
        for _ in 0..4 {
            assert_eq!(b.pick(client(1), &[]).unwrap().addr.port(), 1);
        }
        b.update(&[ep(2, false, false)], None);
        assert!(b.pick(client(1), &[]).is_none());
    }

    #[test]
    fn ejected_backend_is_skipped_without_unfairness() {
        let b = Balancer::default();
        b.update(
            &[ep(1, true, true), ep(2, true, true), ep(3, true, true)],
            None,
        );
        let dead = b.endpoints()[2].1.clone();
        b.report_failure(&dead);
        assert!(dead.is_ejected(now_ms()));
        let mut counts: HashMap<u16, u32> = HashMap::new();
        for _ in 0..100 {
            *counts
                .entry(b.pick(client(1), &[]).unwrap().addr.port())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.get(&3), None);
        assert!(counts[&1].abs_diff(counts[&2]) <= 1, "{counts:?}");
        b.report_success(&dead);
        assert!(!dead.is_ejected(now_ms()));
    }

    #[test]
    fn all_ejected_still_picks_and_tried_ones_go_last() {
        let b = Balancer::default();
        b.update(&[ep(1, true, true), ep(2, true, true)], None);
        for (_, be) in b.endpoints() {
            b.report_failure(&be);
        }
        let first = b.pick(client(1), &[]).unwrap();
        let second = b.pick(client(1), &[first.addr]).unwrap();
        assert_ne!(first.addr, second.addr);
        // Both tried: still an answer (retry with a longer timeout, as upstream).
        assert!(b.pick(client(1), &[first.addr, second.addr]).is_some());
    }

    #[test]
    fn ejection_backs_off_exponentially() {
        let b = Balancer::default();
        b.update(&[ep(1, true, true)], None);
        let be = b.endpoints()[0].1.clone();
        b.report_failure(&be);
        let first = be.ejected_for_ms();
        be.ejected_until.store(0, Relaxed); // back-off expired
        b.report_failure(&be);
        let second = be.ejected_for_ms();
        assert!(
            first <= 1000 && second > 1000 && second <= 2000,
            "{first} {second}"
        );
        assert_eq!(be.ejections.load(Relaxed), 2);
    }

    #[test]
    fn affinity_sticks_and_follows_removal() {
        let b = Balancer::default();
        let aff = Some(Affinity {
            timeout: Duration::from_secs(60),
        });
        b.update(
            &[ep(1, true, true), ep(2, true, true), ep(3, true, true)],
            aff,
        );
        let first = b.pick(client(7), &[]).unwrap().addr;
        for _ in 0..10 {
            assert_eq!(b.pick(client(7), &[]).unwrap().addr, first);
        }
        let rest: Vec<_> = [ep(1, true, true), ep(2, true, true), ep(3, true, true)]
            .into_iter()
            .filter(|e| e.addr != first)
            .collect();
        b.update(&rest, aff);
        let moved = b.pick(client(7), &[]).unwrap().addr;
        assert_ne!(moved, first);
        assert_eq!(b.pick(client(7), &[]).unwrap().addr, moved);
    }

    #[test]
    fn live_state_survives_updates() {
        let b = Balancer::default();
        b.update(&[ep(1, true, true)], None);
        b.endpoints()[0].1.total.fetch_add(5, Relaxed);
        assert!(b.update(&[ep(1, true, true), ep(2, true, true)], None));
        assert!(!b.update(&[ep(1, true, true), ep(2, true, true)], None));
        assert_eq!(b.endpoints()[0].1.total.load(Relaxed), 5);
    }
    fn eps(n: u16) -> Vec<Endpoint> {
        (1..=n).map(|p| ep(p, true, true)).collect()
    }

    fn with(s: Scheduler, n: u16) -> Balancer {
        let b = Balancer::default();
        b.update(&eps(n), None);
        b.set_scheduler(s);
        b
    }

    fn many_clients() -> impl Iterator<Item = IpAddr> {
        (0..1000u32).map(|i| IpAddr::from((0x0a00_0000 + i * 7919).to_be_bytes()))
    }

    #[test]
    fn scheduler_swaps_in_place() {
        let b = with(Scheduler::Rr, 3);
        assert_eq!(b.scheduler(), Scheduler::Rr);
        assert!(b.set_scheduler(Scheduler::Sh));
        assert!(!b.set_scheduler(Scheduler::Sh));
        assert_eq!(b.scheduler(), Scheduler::Sh);
    }

    #[test]
    fn lc_prefers_the_least_loaded_and_counts_dials_in_flight() {
        let b = with(Scheduler::Lc, 3);
        let all = b.endpoints();
        all[0].1.active.store(5, Relaxed);
        all[1].1.active.store(2, Relaxed);
        all[2].1.active.store(2, Relaxed);
        all[2].1.pending.store(1, Relaxed);
        assert_eq!(b.pick(client(1), &[]).unwrap().addr.port(), 2);
        // Equal loads share the work.
        all[2].1.pending.store(0, Relaxed);
        let ports: std::collections::BTreeSet<u16> = (0..10)
            .map(|_| b.pick(client(1), &[]).unwrap().addr.port())
            .collect();
        assert_eq!(ports, [2, 3].into());
    }

    #[test]
    fn sed_weighs_load_by_connect_time_and_nq_takes_idle_first() {
        let b = with(Scheduler::Sed, 2);
        let all = b.endpoints();
        all[0].1.observe_connect(Duration::from_millis(10)); // far away
        all[1].1.observe_connect(Duration::from_millis(1));
        all[1].1.active.store(3, Relaxed); // 4 x 1ms < 1 x 10ms
        assert_eq!(b.pick(client(1), &[]).unwrap().addr.port(), 2);
        all[1].1.active.store(20, Relaxed); // 21 x 1ms > 10ms
        assert_eq!(b.pick(client(1), &[]).unwrap().addr.port(), 1);
        // nq: the idle endpoint wins whatever its connect time.
        b.set_scheduler(Scheduler::Nq);
        all[1].1.active.store(0, Relaxed);
        all[0].1.active.store(1, Relaxed);
        assert_eq!(b.pick(client(1), &[]).unwrap().addr.port(), 2);
    }

    #[test]
    fn p2c_and_random_spread_and_p2c_avoids_the_loaded() {
        let b = with(Scheduler::P2c, 4);
        b.endpoints()[0].1.active.store(100, Relaxed);
        let mut counts: HashMap<u16, u32> = HashMap::new();
        for _ in 0..4000 {
            *counts
                .entry(b.pick(client(1), &[]).unwrap().addr.port())
                .or_default() += 1;
        }
        assert_eq!(
            counts.get(&1),
            None,
            "the loaded one never wins a pair: {counts:?}"
        );
        b.set_scheduler(Scheduler::Random);
        counts.clear();
        for _ in 0..4000 {
            *counts
                .entry(b.pick(client(1), &[]).unwrap().addr.port())
                .or_default() += 1;
        }
        for p in 1..=4 {
            let c = counts.get(&p).copied().unwrap_or(0);
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn sh_is_stable_balanced_and_remaps_only_the_removed_endpoints_clients() {
        let b = with(Scheduler::Sh, 10);
        let before: Vec<u16> = many_clients()
            .map(|c| b.pick(c, &[]).unwrap().addr.port())
            .collect();
        // Stable: the same answer every time.
        for (c, p) in many_clients().zip(&before) {
            assert_eq!(b.pick(c, &[]).unwrap().addr.port(), *p);
        }
        let mut per: HashMap<u16, u32> = HashMap::new();
        for p in &before {
            *per.entry(*p).or_default() += 1;
        }
        assert!(per.values().all(|n| (50..=150).contains(n)), "{per:?}");
        // Remove endpoint 4: only its clients move (~1/n), all others stay.
        let rest: Vec<Endpoint> = eps(10).into_iter().filter(|e| e.addr.port() != 4).collect();
        b.update(&rest, None);
        let mut moved = 0;
        for (c, p) in many_clients().zip(&before) {
            let now = b.pick(c, &[]).unwrap().addr.port();
            if *p == 4 {
                assert_ne!(now, 4);
                moved += 1;
            } else {
                assert_eq!(now, *p, "a client of a remaining endpoint moved");
            }
        }
        assert!((50..=150).contains(&moved), "{moved} of 1000 moved");
        // Adding it back moves ~1/n back, again nobody else.
        b.update(&eps(10), None);
        let back: usize = many_clients()
            .zip(&before)
            .filter(|(c, p)| {
                let now = b.pick(*c, &[]).unwrap().addr.port();
                assert_eq!(now, **p);
                now == 4
            })
            .count();
        assert_eq!(back, moved);
    }

    #[test]
    fn sh_is_the_same_in_every_proxy() {
        // Keys come from a fixed hash: another process picks the same.
        let a = with(Scheduler::Sh, 5);
        let b = with(Scheduler::Sh, 5);
        for c in many_clients().take(100) {
            assert_eq!(a.pick(c, &[]).unwrap().addr, b.pick(c, &[]).unwrap().addr);
        }
        assert_eq!(
            client_key(client(1)),
            client_key("::ffff:10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn every_scheduler_retries_untried_skips_ejected_and_keeps_affinity() {
        for s in Scheduler::ALL {
            let b = with(s, 3);
            // Retry: three attempts reach three distinct endpoints.
            let mut tried = Vec::new();
            for _ in 0..3 {
                let p = b.pick(client(9), &tried).unwrap();
                assert!(!tried.contains(&p.addr), "{s}: tried twice");
                tried.push(p.addr);
            }
            assert!(b.pick(client(9), &tried).is_some(), "{s}: all tried");
            // Ejection: an ejected endpoint gets nothing while others are up.
            let dead = b.endpoints()[1].1.clone();
            b.report_failure(&dead);
            for i in 0..50 {
                assert_ne!(b.pick(client(i), &[]).unwrap().addr, dead.addr, "{s}");
            }
            // All ejected: still an answer.
            for (_, be) in b.endpoints() {
                b.report_failure(&be);
            }
            assert!(b.pick(client(1), &[]).is_some(), "{s}");
            // Readiness: a not-ready endpoint is never chosen while one is ready.
            let b = with(s, 0);
            b.update(
                &[ep(1, false, false), ep(2, true, true), ep(3, false, true)],
                None,
            );
            for i in 0..20 {
                assert_eq!(b.pick(client(i), &[]).unwrap().addr.port(), 2, "{s}");
            }
            // Affinity wins over the scheduler.
            let b = Balancer::default();
            b.update(
                &eps(3),
                Some(Affinity {
                    timeout: Duration::from_secs(60),
                }),
            );
            b.set_scheduler(s);
            let first = b.pick(client(7), &[]).unwrap().addr;
            b.endpoints()
                .iter()
                .filter(|(e, _)| e.addr != first)
                .for_each(|(_, be)| be.active.store(0, Relaxed));
            for (e, be) in b.endpoints() {
                if e.addr == first {
                    be.active.store(1000, Relaxed);
                }
            }
            for _ in 0..10 {
                assert_eq!(b.pick(client(7), &[]).unwrap().addr, first, "{s}");
            }
        }
    }

    /// `look_first` as a table over a backend's dials: looked at while its
    /// handshakes complete inside `connect`; after `LATE_CONNECTS` late
    /// ones in a row, only one connection in `LATE_RELOOK`; one completed
    /// handshake found there starts it over.
    #[test]
    fn a_backend_is_looked_at_until_its_handshakes_are_late_four_times_running() {
        let b = Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)));
        assert!(b.look_first(), "unknown: looked at");
        b.observe_look(true);
        for late in 0..LATE_CONNECTS {
            assert!(b.look_first(), "after {late} late");
            b.observe_look(false);
        }
        b.total.store(1, Relaxed);
        assert!(!b.look_first(), "four late in a row");
        b.total.store(LATE_RELOOK, Relaxed);
        assert!(b.look_first(), "one connection in LATE_RELOOK");
        b.observe_look(false);
        b.total.store(LATE_RELOOK + 1, Relaxed);
        assert!(!b.look_first(), "still late");
        b.total.store(2 * LATE_RELOOK, Relaxed);
        b.observe_look(true);
        b.total.store(2 * LATE_RELOOK + 1, Relaxed);
        assert!(b.look_first(), "completed again: looked at every time");
    }
}
