//! The control loop: snapshots in, proxier synced, rules applied (rate
//! limited and periodically repaired), health kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admin::{Health, RulesState};
use crate::iptables::{self, Iptables};
use crate::metrics;
use crate::model::Snapshot;
use crate::proxy::Proxier;

/// How often failed listener binds are retried when nothing else changes.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

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
        loop {
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
                let service_changes = r.opened + r.closed + r.spec_changed;
                ::metrics::counter!(metrics::SERVICE_CHANGES).increment(service_changes as u64);
                ::metrics::counter!(metrics::ENDPOINT_CHANGES)
                    .increment(r.endpoints_changed as u64);
                if service_changes + r.disposition_changed > 0 {
                    rules_dirty = true;
                    ::metrics::gauge!(metrics::SYNC_LAST_QUEUED).set(unix_now());
                }
                resync = false;
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
                    ::metrics::histogram!(metrics::SYNC_DURATION).record(took.as_secs_f64());
                    match result {
                        Ok(()) => {
                            ::metrics::gauge!(metrics::SYNC_LAST_TIMESTAMP).set(unix_now());
                            self.health.set_rules(RulesState::Synced);
                            tracing::info!(portals = portals.len(), repair, took = ?took, "iptables synced");
                            rules_dirty = false;
                            rules_backoff = None;
                        }
                        Err(e) => {
                            // Unhealthy until an apply succeeds; retried
                            // with back-off (upstream retries after its
                            // sync period).
                            ::metrics::counter!(metrics::RESTORE_FAILURES).increment(1);
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
            if Instant::now() >= next_repair {
                next_repair = Instant::now() + self.sync_period;
            }
            // Everything queued is applied, unless rules wait for their
            // min period or failed (upstream's Updated).
            if !rules_dirty || self.rules.is_none() {
                self.health.updated();
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
/// snapshot (upstream's `QueuedUpdate` from its event handlers), on a task
/// of its own: a stuck run loop cannot hide a change it never applied.
pub fn mark_queued(
    mut snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    health: Arc<Health>,
) {
    tokio::spawn(async move {
        while snapshots.changed().await.is_ok() {
            health.queued_update();
        }
    });
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
