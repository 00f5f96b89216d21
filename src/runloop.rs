//! The control loop: snapshots in, proxier synced, rules applied (rate
//! limited and periodically repaired), health kept.
//!
//! **One sync** (upstream's `syncProxyRules`, for kube-proxy's sync
//! metrics) is a pass of the loop that reconciles the proxier with the
//! newest snapshot, or applies the rules, or both: with `--iptables off`
//! the reconcile; with rules managed, the reconcile plus the rule apply
//! when one runs in that pass (a change of service ports or of a port's
//! disposition, once the min period allows; the periodic repair; a retry).
//! Its duration covers both. It succeeded when nothing is left pending
//! after it (no rules waiting or failed): then the proxy is `Updated`
//! and the last-sync time is set. A change is served at the end of the
//! pass that reconciled it, or, when that pass left the rules to
//! re-apply, once they are applied: its network programming latency is
//! observed then.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::admin::{Health, RulesState};
use crate::changes::{self, Counts, Trigger};
use crate::iptables::{self, Iptables};
use crate::metrics;
use crate::model::Snapshot;
use crate::proxy::Proxier;

/// How often failed listener binds are retried when nothing else changes.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Changes kept waiting for the rules to serve them (a long outage of
/// `iptables-restore` under churn); later ones are not observed.
const MAX_AWAITING_RULES: usize = 65_536;

/// The snapshot the run loop last reconciled, shared with `mark_queued`:
/// what the newest published one changes beyond it is pending.
#[derive(Debug, Default)]
pub struct Applied(Mutex<Arc<Snapshot>>);

impl Applied {
    fn get(&self) -> Arc<Snapshot> {
        Arc::clone(&self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn set(&self, snapshot: Arc<Snapshot>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }
}

/// The rule manager with its sync periods, as the run loop drives it.
pub struct RuleSync {
    /// The manager.
    pub iptables: Iptables,
    /// `--iptables-min-sync-period`.
    pub min_period: Duration,
    /// `--iptables-sync-period`.
    pub period: Duration,
    /// `--nodeport-addresses`.
    pub node_port_addresses: crate::cli::NodePortAddresses,
}

/// The control loop: the proxier, the rules and their health.
pub struct Loop {
    /// Listeners and balancers.
    pub proxier: Proxier,
    /// The iptables redirect, when managed.
    pub rules: Option<RuleSync>,
    /// The health-check node ports.
    pub service_health: crate::admin::service_health::Server,
    /// Updated after every sync pass.
    pub health: Arc<Health>,
    /// A sync pass runs at least this often, even with no change.
    pub sync_period: Duration,
    /// Requests of the hand-over server: every listener, duplicated.
    pub exports: Option<tokio::sync::mpsc::Receiver<crate::handover::ExportRequest>>,
    /// What was last reconciled, shared with `mark_queued` (which made it).
    pub applied: Arc<Applied>,
}

impl Loop {
    /// Applies every snapshot to the proxier, and the resulting portals to
    /// the rules (at most once per min period, at least once per period),
    /// until `stop` resolves; returns itself for shutdown.
    pub async fn serve(
        mut self,
        mut snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Self {
        tokio::pin!(stop);
        let mut current = snapshots.borrow_and_update().clone();
        let mut source_open = true;
        let mut resync = true;
        let mut rules_dirty = true;
        let mut rules_last: Option<Instant> = None;
        // After a failed apply: the wait before the next try, doubling from
        // the min period up to the period.
        let mut rules_backoff: Option<Duration> = None;
        let mut next_repair = Instant::now() + self.sync_period;
        let mut unserved_logged = (0, 0);
        // Changes triggered before we started are not ours to time
        // (upstream's `trackerStartTime`).
        let since = SystemTime::now();
        // Changes reconciled whose rules are still to be applied.
        let mut awaiting_rules: Vec<Trigger> = Vec::new();
        metrics::register_sync(self.rules.is_some());
        loop {
            let pass = Instant::now();
            let mut synced = false;
            if resync {
                let started = Instant::now();
                if let Some(why) = self.health.set_node(&current.node) {
                    match why {
                        Some(why) => {
                            tracing::warn!(reason = %why, "this node should get no traffic: /healthz answers 503")
                        }
                        None => tracing::info!("this node is eligible for traffic again"),
                    }
                }
                let r = self.proxier.sync(&current);
                self.service_health.sync(&current);
                tracing::info!(
                    services = current.services.len(),
                    listening = r.listening,
                    pending = r.pending,
                    opened = r.opened,
                    closed = r.closed,
                    endpoints_changed = r.endpoints_changed,
                    connection_limit = r.connection_limit,
                    took = ?started.elapsed(),
                    "synced"
                );
                if (r.fd_limited, r.pending) != unserved_logged {
                    unserved_logged = (r.fd_limited, r.pending);
                    if r.fd_limited > 0 {
                        let fds = &self.proxier.context().fds;
                        tracing::warn!(
                            unserved = r.fd_limited,
                            fd_limit = fds.limit(),
                            held = fds.held(),
                            connection_limit = r.connection_limit,
                            "service ports unserved: the fd limit holds no more listeners (raise RLIMIT_NOFILE, or lower an explicit --max-connections); retried every second"
                        );
                    }
                    if r.pending > r.fd_limited {
                        tracing::warn!(
                            unserved = r.pending - r.fd_limited,
                            "service ports unserved: their port could not be bound (see the per-service warnings); retried every second"
                        );
                    }
                }
                metrics::set_no_local_endpoints(&self.proxier.published().load());
                let newest = snapshots.borrow().clone();
                let served = self.reconciled(&current, &newest, since);
                let rules_changed =
                    r.opened + r.closed + r.spec_changed + r.disposition_changed > 0;
                rules_dirty |= rules_changed;
                if rules_changed && self.rules.is_some() {
                    // Served once the rules are applied.
                    let room = MAX_AWAITING_RULES.saturating_sub(awaiting_rules.len());
                    awaiting_rules.extend(served.into_iter().take(room));
                } else {
                    metrics::observe_programming(&served);
                }
                resync = false;
                synced = true;
            }
            if let Some(r) = self.rules.as_mut() {
                let now = Instant::now();
                let wait = rules_backoff.unwrap_or(r.min_period);
                let due = rules_last.is_none_or(|t| now >= t + wait);
                let repair = now >= next_repair;
                if (rules_dirty && due) || repair {
                    let mut portals = iptables::portals(&self.proxier);
                    limit_node_ports(
                        &mut portals,
                        &r.node_port_addresses,
                        &current,
                        self.proxier.context().config.bind_address,
                        &self.service_health,
                    );
                    let detector = self.proxier.detector();
                    let result = r.iptables.sync(&portals, &detector, repair).await;
                    let took = r.iptables.stats.last_duration;
                    synced = true;
                    match result {
                        Ok(()) => {
                            self.health.set_rules(RulesState::Synced);
                            tracing::info!(portals = portals.len(), repair, took = ?took, "iptables synced");
                            rules_dirty = false;
                            rules_backoff = None;
                            metrics::observe_programming(&awaiting_rules);
                            awaiting_rules.clear();
                        }
                        Err(e) => {
                            // Unhealthy until an apply succeeds; retried
                            // with back-off (upstream retries after its
                            // sync period).
                            metrics::restore_failed(r.iptables.stats.failed_family);
                            self.health.set_rules(RulesState::Failed);
                            let next = rules_backoff
                                .map_or(r.min_period, |b| b * 2)
                                .clamp(RETRY_INTERVAL.min(r.period), r.period);
                            rules_backoff = Some(next);
                            tracing::error!(error = %e, retry_in = ?next, "iptables sync failed; previous rules stay");
                            rules_dirty = true;
                        }
                    }
                    rules_last = Some(Instant::now());
                }
            }
            if synced {
                metrics::record_sync(pass.elapsed(), self.rules.is_some());
            }
            if Instant::now() >= next_repair {
                next_repair = Instant::now() + self.sync_period;
            }
            // Everything queued is applied, unless rules wait for their
            // min period or failed (upstream's Updated).
            if !rules_dirty || self.rules.is_none() {
                self.health.updated();
                if synced {
                    metrics::set_synced_now();
                }
            }
            let wake = match (&self.rules, rules_dirty, rules_last) {
                (Some(r), true, Some(t)) => {
                    (t + rules_backoff.unwrap_or(r.min_period)).min(next_repair)
                }
                _ => next_repair,
            };
            let retry = self.proxier.has_pending() || self.service_health.has_pending();
            tokio::select! {
                _ = &mut stop => return self,
                req = async { self.exports.as_mut()?.recv().await }, if self.exports.is_some() => {
                    match req {
                        Some(reply) => {
                            let mut exported = self.proxier.export();
                            exported.extend(self.service_health.export());
                            let _ = reply.send(exported);
                        }
                        None => self.exports = None,
                    }
                }
                changed = snapshots.changed(), if source_open => {
                    match changed {
                        Ok(()) => {
                            current = snapshots.borrow_and_update().clone();
                            resync = true;
                        }
                        // Source gone: keep serving the last state until stopped.
                        Err(_) => source_open = false,
                    }
                }
                _ = tokio::time::sleep(RETRY_INTERVAL), if retry => resync = true,
                _ = tokio::time::sleep_until(wake.into()) => {
                    // The periodic pass: re-sync (retries binds, repairs rules).
                    resync = true;
                }
            }
        }
    }

    /// Records `current` as reconciled: the pending changes drop to what
    /// `newest` (published meanwhile) brings beyond it; returns the
    /// changes it served that are to be timed (see [`changes::triggers`]).
    fn reconciled(
        &self,
        current: &Arc<Snapshot>,
        newest: &Arc<Snapshot>,
        since: SystemTime,
    ) -> Vec<Trigger> {
        let before = self.applied.get();
        let served = changes::triggers(&changes::diff(&before, current), since);
        self.applied.set(Arc::clone(current));
        metrics::set_pending(Counts::between(current, newest));
        served
    }
}

/// Limits the ports bound for the node's addresses (nodePorts and the
/// health-check node ports) to `--nodeport-addresses`, `primary` being
/// `bind` (`--bind-address`) when specific, else the Node's IP of each
/// family (as kube-proxy's server picks its node IPs).
fn limit_node_ports(
    rules: &mut iptables::render::Rules,
    addresses: &crate::cli::NodePortAddresses,
    snapshot: &Snapshot,
    bind: std::net::IpAddr,
    health_checks: &crate::admin::service_health::Server,
) {
    for v6 in [false, true] {
        let primary = Some(bind)
            .filter(|b| !b.is_unspecified() && b.is_ipv6() == v6)
            .or_else(|| snapshot.node.primary_ip(v6));
        rules.node_port_addresses[usize::from(v6)] = addresses.for_family(v6, primary);
    }
    rules.node_port_listeners.extend(
        health_checks
            .ports()
            .map(|p| (p, crate::model::Protocol::Tcp)),
    );
}

/// Marks an update queued in `health` whenever discovery publishes a
/// snapshot (upstream's `QueuedUpdate` from its event handlers, and its
/// `Sync()`'s last-queued time), and counts the changes received and
/// pending, on a task of its own: a stuck run loop cannot hide a change it
/// never applied. Returns what the run loop shares with it ([`Loop::applied`]).
pub fn mark_queued(
    mut snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    health: Arc<Health>,
) -> Arc<Applied> {
    let applied = Arc::new(Applied::default());
    let shared = Arc::clone(&applied);
    // Upstream's SyncLoop: a queued time while the informers sync.
    metrics::set_queued_now();
    tokio::spawn(async move {
        // The first snapshot's Services arrive as changes too (upstream
        // counts the informers' initial adds).
        let mut seen = Arc::new(Snapshot::default());
        let mut new = snapshots.borrow_and_update().clone();
        loop {
            let (received, pending) = on_publish(&seen, &new, &shared.get());
            metrics::add_changes(received);
            metrics::set_pending(pending);
            seen = new;
            if snapshots.changed().await.is_err() {
                return;
            }
            health.queued_update();
            metrics::set_queued_now();
            new = snapshots.borrow_and_update().clone();
        }
    });
    applied
}

/// What a snapshot `new` published after `seen` brings, while `applied`
/// is what the loop last reconciled: the changes received (upstream's
/// `*_changes_total`) and those pending (`*_changes_pending`).
fn on_publish(seen: &Snapshot, new: &Snapshot, applied: &Snapshot) -> (Counts, Counts) {
    let received = Counts::between(seen, new);
    // The loop keeps up: what is pending is what just arrived.
    let pending = if std::ptr::eq(applied, seen) {
        received
    } else {
        Counts::between(applied, new)
    };
    (received, pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ServiceEntry, ServicePortName};

    fn with(names: &[&str]) -> Snapshot {
        let mut s = Snapshot::default();
        for n in names {
            s.services
                .insert(ServicePortName::first_of("ns", n), ServiceEntry::default());
        }
        s
    }

    #[test]
    fn pending_is_what_the_newest_snapshot_adds_to_the_applied_one() {
        let (s0, s1, s2) = (with(&[]), with(&["a"]), with(&["a", "b", "c"]));
        let n = |services| Counts {
            services,
            endpoints: 0,
        };
        // The loop keeps up: pending is what arrived.
        assert_eq!(on_publish(&s0, &s1, &s0), (n(1), n(1)));
        // The loop is still at s0: s1's change is pending too.
        assert_eq!(on_publish(&s1, &s2, &s0), (n(2), n(3)));
        // The loop already applied s2 (it reads the newest): nothing pending.
        assert_eq!(on_publish(&s1, &s2, &s2), (n(2), n(0)));
    }
}
