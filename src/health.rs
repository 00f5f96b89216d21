//! The proxy's health, as upstream's `ProxyHealthServer`
//! (`pkg/proxy/healthcheck/proxy_health.go`) keeps it: an update queued
//! and not applied within twice the sync period makes the proxy unhealthy
//! (`QueuedUpdate`, `Updated`, `Health`), and so, here, does a failed
//! apply of the rules. `/healthz` also asks whether the node should get
//! traffic at all (`NodeEligible`); `/livez` does not. Pure state: the
//! admin routes and the health-check node ports read it.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::model::NodeInfo;

/// State of the iptables redirect, for status and health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RulesState {
    /// Not managed.
    Off = 0,
    /// Managed, not applied yet.
    Pending = 1,
    /// Last apply succeeded.
    Synced = 2,
    /// Last apply failed (previous rules stay).
    Failed = 3,
}

impl RulesState {
    /// The spelling of status documents.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Pending => "pending",
            Self::Synced => "synced",
            Self::Failed => "failed",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Pending,
            2 => Self::Synced,
            3 => Self::Failed,
            _ => Self::Off,
        }
    }
}

/// The IP families one sync pass serves (upstream keeps a proxier, and a
/// `status` entry, per family; our one loop serves both).
const FAMILIES: [&str; 2] = crate::model::IP_FAMILIES;

#[derive(Debug, Default)]
struct Times {
    /// The last pass that applied everything queued (upstream's `Updated`).
    last_updated: Option<SystemTime>,
    /// The oldest change not applied yet (upstream's `oldestPendingQueued`).
    oldest_pending: Option<SystemTime>,
}

/// The proxy's health and the node's eligibility (see the module doc).
#[derive(Debug)]
pub struct Health {
    /// Twice the sync period (upstream's `healthTimeout`).
    timeout: Duration,
    times: Mutex<Times>,
    ready: AtomicBool,
    rules: AtomicU8,
    /// Why the node should get no traffic; `None`: eligible.
    ineligible: Mutex<Option<String>>,
}

/// The verdict at one moment (upstream's `ProxyHealth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The proxy applies what it is given, in time.
    pub healthy: bool,
    /// Why not, for people.
    pub why: Option<String>,
    /// The last complete pass.
    pub last_updated: Option<SystemTime>,
    /// When the verdict was taken.
    pub current_time: SystemTime,
}

impl Health {
    /// Health of a loop that syncs at least every `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            timeout: 2 * period,
            times: Mutex::new(Times::default()),
            ready: AtomicBool::new(false),
            rules: AtomicU8::new(RulesState::Off as u8),
            ineligible: Mutex::new(None),
        }
    }

    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records at `at` that a change arrived and waits to be applied
    /// (upstream's `QueuedUpdate`: only the oldest counts).
    pub fn queued_update_at(&self, at: SystemTime) {
        self.times().oldest_pending.get_or_insert(at);
    }

    /// Records at `at` that everything queued is applied (upstream's
    /// `Updated`); the first one makes us ready.
    pub fn updated_at(&self, at: SystemTime) {
        let mut t = self.times();
        t.oldest_pending = None;
        t.last_updated = Some(at);
        self.ready.store(true, Relaxed);
    }

    /// [`Self::queued_update_at`] now.
    pub fn queued_update(&self) {
        self.queued_update_at(SystemTime::now());
    }

    /// [`Self::updated_at`] now.
    pub fn updated(&self) {
        self.updated_at(SystemTime::now());
    }

    /// Whether the first snapshot has been applied (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed)
    }

    /// When the last complete pass ended (Unix milliseconds; 0 = none yet).
    pub fn last_updated_ms(&self) -> u64 {
        self.times().last_updated.map_or(0, unix_ms)
    }

    /// Records the iptables state.
    pub fn set_rules(&self, s: RulesState) {
        self.rules.store(s as u8, Relaxed);
    }

    /// The iptables state.
    pub fn rules(&self) -> RulesState {
        RulesState::from_u8(self.rules.load(Relaxed))
    }

    /// Takes this node's eligibility from its Node object (upstream's
    /// `NodeEligible`); returns the reason when it changed.
    pub fn set_node(&self, node: &NodeInfo) -> Option<Option<String>> {
        let why = node.ineligible();
        let mut cur = self.ineligible.lock().unwrap_or_else(|e| e.into_inner());
        (*cur != why).then(|| {
            *cur = why.clone();
            why
        })
    }

    /// Why the node should get no traffic; `None`: it should.
    pub fn ineligible(&self) -> Option<String> {
        self.ineligible
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The proxy's health at `now` (upstream's `Health`, node ignored):
    /// unhealthy while the last apply of the rules failed, or while a change
    /// queued twice the sync period ago or earlier is not applied.
    pub fn verdict_at(&self, now: SystemTime) -> Verdict {
        let t = self.times();
        let late = t
            .oldest_pending
            .and_then(|q| now.duration_since(q).ok())
            .filter(|waited| *waited >= self.timeout);
        let why = if self.rules() == RulesState::Failed {
            Some("the last apply of the rules failed".to_string())
        } else {
            late.map(|w| format!("a change queued {}s ago is not applied", w.as_secs()))
        };
        Verdict {
            healthy: why.is_none(),
            why,
            last_updated: t.last_updated,
            current_time: now,
        }
    }

    /// Whether the proxy is healthy now (what a health-check node port
    /// reports as `serviceProxyHealthy`).
    pub fn is_healthy(&self) -> bool {
        self.verdict_at(SystemTime::now()).healthy
    }

    /// `/healthz` at `now`: the verdict (healthy and the node eligible) and
    /// upstream's JSON body, `extra` fields appended.
    pub fn healthz_at(&self, now: SystemTime, extra: Map<String, Value>) -> (bool, String) {
        let ineligible = self.ineligible();
        self.answer(now, Some(ineligible), extra)
    }

    /// `/livez` at `now`: the proxy's health only, and upstream's body.
    pub fn livez_at(&self, now: SystemTime) -> (bool, String) {
        self.answer(now, None, Map::new())
    }

    /// Upstream's `healthzHandler` / `livezHandler` body: `lastUpdated` is
    /// `currentTime` when the answer is 200 (upstream keeps that older
    /// meaning), `nodeEligible` only for `/healthz`, `status` per family.
    fn answer(
        &self,
        now: SystemTime,
        node: Option<Option<String>>,
        extra: Map<String, Value>,
    ) -> (bool, String) {
        let v = self.verdict_at(now);
        let eligible = node.as_ref().is_none_or(Option::is_none);
        let ok = v.healthy && eligible;
        let last = if ok { Some(now) } else { v.last_updated };
        let mut body = Map::new();
        body.insert("lastUpdated".into(), go_time(last).into());
        body.insert("currentTime".into(), go_time(Some(now)).into());
        if let Some(why) = &node {
            body.insert("nodeEligible".into(), why.is_none().into());
        }
        body.insert("healthy".into(), v.healthy.into());
        if let Some(updated) = v.last_updated {
            let family = json!({"lastUpdated": go_time(Some(updated)), "healthy": v.healthy});
            let status: Map<String, Value> = FAMILIES
                .iter()
                .map(|f| (f.to_string(), family.clone()))
                .collect();
            body.insert("status".into(), status.into());
        }
        let reasons: Vec<&String> = v.why.iter().chain(node.iter().flatten()).collect();
        if !reasons.is_empty() {
            body.insert("reasons".into(), json!(reasons));
        }
        body.extend(extra);
        (ok, Value::Object(body).to_string())
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A time as Go's `encoding/json` writes a `time.Time` (RFC 3339 with
/// nanoseconds; the zero time for none).
fn go_time(t: Option<SystemTime>) -> String {
    t.map_or_else(
        || "0001-01-01T00:00:00Z".to_string(),
        |t| humantime::format_rfc3339_nanos(t).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NodeObject, TAINT_TO_BE_DELETED};

    fn body(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    /// Upstream's `TestHealthzServer`: healthy while starting and once
    /// updated; a queued update is fine until the timeout, then 503 until
    /// the next `Updated`.
    #[test]
    fn a_queued_update_turns_unhealthy_only_after_twice_the_period() {
        let h = Health::new(Duration::from_secs(30));
        let t0 = SystemTime::now();
        assert!(h.healthz_at(t0, Map::new()).0, "healthy while starting");
        h.updated_at(t0);
        h.queued_update_at(t0 + Duration::from_secs(10));
        // Only the oldest queued update counts.
        h.queued_update_at(t0 + Duration::from_secs(50));
        assert!(h.verdict_at(t0 + Duration::from_secs(69)).healthy);
        let (ok, b) = h.healthz_at(t0 + Duration::from_secs(70), Map::new());
        assert!(!ok);
        let b = body(&b);
        assert_eq!(b["healthy"], false);
        assert_eq!(b["nodeEligible"], true);
        assert_eq!(b["lastUpdated"], go_time(Some(t0)));
        assert_eq!(b["status"]["IPv4"]["healthy"], false);
        assert!(!h.livez_at(t0 + Duration::from_secs(70)).0);
        h.updated_at(t0 + Duration::from_secs(71));
        let (ok, b) = h.healthz_at(t0 + Duration::from_secs(72), Map::new());
        assert!(ok);
        // 200: lastUpdated is the current time, as upstream.
        assert_eq!(body(&b)["lastUpdated"], body(&b)["currentTime"]);
    }

    #[test]
    fn failed_rules_are_unhealthy_at_once() {
        let h = Health::new(Duration::from_secs(30));
        let t0 = SystemTime::now();
        h.updated_at(t0);
        h.set_rules(RulesState::Failed);
        let (ok, b) = h.livez_at(t0);
        assert!(!ok);
        assert!(body(&b).get("nodeEligible").is_none(), "{b}");
        h.set_rules(RulesState::Synced);
        assert!(h.livez_at(t0).0);
    }

    /// Upstream's `NodeEligible` in `/healthz` only: `/livez` stays 200.
    #[test]
    fn an_ineligible_node_fails_healthz_not_livez() {
        let h = Health::new(Duration::from_secs(30));
        let t0 = SystemTime::now();
        h.updated_at(t0);
        let mut node = NodeInfo {
            name: Some("n1".into()),
            object: NodeObject::Present,
            taints: vec![TAINT_TO_BE_DELETED.into()],
            ..NodeInfo::default()
        };
        assert!(h.set_node(&node).is_some());
        assert_eq!(h.set_node(&node), None, "no change");
        let (ok, b) = h.healthz_at(t0, Map::new());
        assert!(!ok);
        let b = body(&b);
        assert_eq!(
            (b["nodeEligible"].clone(), b["healthy"].clone()),
            (false.into(), true.into())
        );
        assert!(h.livez_at(t0).0);
        node.taints.clear();
        assert_eq!(h.set_node(&node), Some(None));
        assert!(h.healthz_at(t0, Map::new()).0);
    }
}
