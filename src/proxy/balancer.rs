//! Per-service-port endpoint choice: round-robin over ready endpoints,
//! ClientIP affinity, and passive ejection of endpoints whose dial failed.
//!
//! The data path reads the endpoint set without locks (an [`ArcSwap`]
//! swapped only when the set changes); the round-robin cursor is one atomic,
//! so picks stay exactly fair under concurrency. Affinity, when enabled, is
//! the only lock, and only for services that ask for it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::model::{Affinity, Endpoint};

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
}

impl Backend {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
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
}

/// The endpoint set in force, as the data path sees it.
#[derive(Debug, Default)]
struct EndpointSet {
    /// All endpoints with their conditions, sorted by address.
    all: Vec<(Endpoint, Arc<Backend>)>,
    /// The ones eligible for new connections: ready ones, else serving ones
    /// (e.g. terminating but still serving), else none.
    usable: Vec<Arc<Backend>>,
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
}

impl Balancer {
    /// Installs a new endpoint list and affinity setting; returns whether the
    /// usable set changed. Open connections are not touched; the live state
    /// of addresses that stay is kept.
    pub fn update(&self, endpoints: &[Endpoint], affinity: Option<Affinity>) -> bool {
        let cur = self.set.load();
        let same = cur.all.len() == endpoints.len()
            && cur.all.iter().zip(endpoints).all(|((e, _), n)| e == n);
        self.set_affinity(affinity);
        if same {
            return false;
        }
        let old: HashMap<SocketAddr, &Arc<Backend>> =
            cur.all.iter().map(|(e, b)| (e.addr, b)).collect();
        let all: Vec<(Endpoint, Arc<Backend>)> = endpoints
            .iter()
            .map(|e| {
                let b = old
                    .get(&e.addr)
                    .map(|b| Arc::clone(b))
                    .unwrap_or_else(|| Arc::new(Backend::new(e.addr)));
                (e.clone(), b)
            })
            .collect();
        let pick = |f: fn(&Endpoint) -> bool| -> Vec<Arc<Backend>> {
            all.iter()
                .filter(|(e, _)| f(e))
                .map(|(_, b)| Arc::clone(b))
                .collect()
        };
        let mut usable = pick(|e| e.ready);
        if usable.is_empty() {
            usable = pick(|e| e.serving);
        }
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
        self.set.store(Arc::new(EndpointSet { all, usable }));
        true
    }

    fn set_affinity(&self, affinity: Option<Affinity>) {
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

    /// Number of endpoints eligible for new connections.
    pub fn usable_len(&self) -> usize {
        self.set.load().usable.len()
    }

    /// Picks the backend for a client's next dial, avoiding those in `tried`
    /// (earlier attempts of this connection). Affinity applies to the first
    /// attempt only, as upstream. Preference: untried and healthy, then
    /// untried but ejected (every endpoint ejected), then tried ones (fewer
    /// endpoints than attempts). `None` only when no endpoint is usable.
    pub fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let set = self.set.load();
        let n = set.usable.len();
        if n == 0 {
            return None;
        }
        let now = now_ms();
        if !self.has_affinity.load(Relaxed) {
            return self.round_robin(&set.usable, tried, now);
        }
        let mut affinity = self.affinity.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(table) = affinity.as_mut() {
            if tried.is_empty() {
                if let Some((addr, last)) = table.clients.get_mut(&client) {
                    if last.elapsed() < table.timeout {
                        let hit = set.usable.iter().find(|b| b.addr == *addr);
                        if let Some(b) = hit.filter(|b| !b.is_ejected(now)) {
                            *last = Instant::now();
                            return Some(Arc::clone(b));
                        }
                    }
                }
            }
        } else {
            drop(affinity);
            return self.round_robin(&set.usable, tried, now);
        }
        let chosen = self.round_robin(&set.usable, tried, now)?;
        if let Some(table) = affinity.as_mut() {
            table.clients.insert(client, (chosen.addr, Instant::now()));
        }
        Some(chosen)
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
            .map(|k| &usable[(start + k) % n])
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
        }
    }

    fn client(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
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
}
