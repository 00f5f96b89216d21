//! kube-userspace-proxy: Kubernetes' userspace service proxy, rebuilt.
//!
//! # Layout
//! - [`model`]: the desired state ([`model::Snapshot`]), pure data.
//! - [`discovery`]: Kubernetes objects → snapshot ([`discovery::kube`] from
//!   the API server, [`discovery::manifests`] from files).
//! - [`proxy`]: the proxier and the data path (listeners, balancer, dial
//!   with retry, splice).
//! - [`iptables`]: the redirect of service addresses to the listeners.
//! - [`cli`], [`run`], [`demo`]: the binary's entry points; `main.rs` only
//!   parses and dispatches.

#![deny(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod demo;
pub mod discovery;
pub mod iptables;
pub mod metrics;
pub mod model;
pub mod privileges;
pub mod proxy;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use admin::{AdminState, Health, RulesState};
use cli::{LogArgs, LogFormat, RunArgs};
use discovery::manifests;
use iptables::Iptables;
use model::Snapshot;
use proxy::{Proxier, ProxyConfig};

/// A configuration error: the process exits 64 (EX_USAGE) with its message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Sets up `tracing` output from the logging flags (`RUST_LOG` wins);
/// `default_level` applies when neither is given.
pub fn init_logging(args: &LogArgs, default_level: &str) -> Result<(), ConfigError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => tracing_subscriber::EnvFilter::try_new(&v)
            .map_err(|e| ConfigError(format!("RUST_LOG={v:?}: {e}")))?,
        _ => {
            let level = args.log_level.as_deref().unwrap_or(default_level);
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| ConfigError(format!("--log-level {level:?}: {e}")))?
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

/// The default `--max-connections` for an fd limit: two fds a connection,
/// after a reserve for listeners, pipes and UDP sessions (a quarter of the
/// limit, 32 to 1024) plus the admin servers' capped connections
/// ([`admin::RESERVED_FDS`]).
pub fn connections_for_fd_limit(limit: u64) -> usize {
    let reserve = (limit / 4).clamp(32, 1024) + admin::RESERVED_FDS;
    (limit.saturating_sub(reserve) / 2).max(1) as usize
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (each proxied
/// connection costs two descriptors) and returns the new value.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

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
}

/// Where snapshots come from, as the flags and environment choose.
enum Source {
    /// `--manifests DIR`, or the embedded examples.
    Manifests(manifests::Source),
    /// The Kubernetes API, with this node's options.
    Kube(Box<::kube::Client>, discovery::Options),
}

/// `--manifests` wins; else the API when a kubeconfig, `--master` or
/// in-cluster configuration is there; else the embedded manifests.
async fn discovery_source(args: &RunArgs) -> Result<Source, ConfigError> {
    match &args.manifests {
        Some(dir) if !dir.is_dir() => Err(ConfigError(format!(
            "--manifests {}: not a directory",
            dir.display()
        ))),
        Some(dir) => Ok(Source::Manifests(manifests::Source::Dir(dir.clone()))),
        None if discovery::kube::configured(args.kubeconfig.as_deref(), args.master.as_deref()) => {
            let config =
                discovery::kube::config(args.kubeconfig.as_deref(), args.master.as_deref())
                    .await
                    .map_err(|e| ConfigError(e.to_string()))?;
            tracing::info!(server = %config.cluster_url, "Kubernetes discovery");
            let client = discovery::kube::client(config).map_err(|e| ConfigError(e.to_string()))?;
            Ok(Source::Kube(Box::new(client), discovery_options(args)))
        }
        None => Ok(Source::Manifests(manifests::Source::Embedded)),
    }
}

/// Node name and proxy name, as kube-proxy takes them: `--hostname-override`
/// or the hostname, lower-cased.
fn discovery_options(args: &RunArgs) -> discovery::Options {
    let node_name = args
        .hostname_override
        .clone()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty());
    if node_name.is_none() {
        tracing::warn!(
            "no node name (--hostname-override): traffic policy Local keeps all endpoints"
        );
    }
    discovery::Options {
        node_name,
        service_proxy_name: args.service_proxy_name.clone(),
    }
}

fn proxy_config(args: &RunArgs, fd_limit: u64) -> ProxyConfig {
    ProxyConfig {
        bind_address: args.bind_address,
        port_range: args.proxy_port_range,
        dial_timeouts: args.dial_timeouts.0.clone(),
        copy_mode: args.copy_mode,
        udp_timeout: args.udp_timeout,
        udp_max_sessions: args.udp_max_sessions,
        max_connections: args
            .max_connections
            .unwrap_or_else(|| connections_for_fd_limit(fd_limit)),
        tcp_fin_timeout: args.tcp_fin_timeout,
        scheduler: args.scheduler,
    }
}

/// Runs the proxy until SIGTERM/SIGINT: listeners close, rules are removed,
/// open connections drain for `--shutdown-grace`; a second signal exits at
/// once. With `--cleanup`, only removes rules.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        let passed = privileges::pass_to_children();
        tracing::info!(uid = %nix::unistd::geteuid(), capabilities = ?passed, "not root: capabilities passed on to iptables");
    }
    if args.cleanup {
        iptables::cleanup_all(args.iptables_backend).await?;
        tracing::info!("--cleanup: iptables chains and jumps of kube-userspace-proxy removed");
        return Ok(());
    }
    let source = discovery_source(&args).await?;
    let fd_limit = match raise_fd_limit() {
        Ok(n) => {
            tracing::info!(limit = n, "RLIMIT_NOFILE raised to the hard limit");
            n
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE");
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(1024, |(soft, _)| soft)
        }
    };
    let config = proxy_config(&args, fd_limit);
    match config.max_connections {
        0 => tracing::info!("--max-connections 0: no connection limit"),
        n => tracing::info!(max_connections = n, "connection limit"),
    }
    if matches!(source, Source::Manifests(manifests::Source::Embedded)) {
        tracing::info!("no --manifests and no cluster: serving the embedded example manifests");
    }
    let handle = metrics::install();
    let health = Arc::new(Health::new(args.iptables_sync_period));
    let rules = Iptables::setup(args.iptables, args.iptables_backend, args.bind_address)
        .await
        .map_err(|e| ConfigError(format!("--iptables on: {e}")))?
        .map(|iptables| RuleSync {
            iptables,
            min_period: args.iptables_min_sync_period,
            period: args.iptables_sync_period,
        });
    if rules.is_some() {
        health.set_rules(RulesState::Pending);
    }
    let proxier = Proxier::new(config);
    let stop_admin = CancellationToken::new();
    let state = AdminState {
        handle,
        services: proxier.published(),
        health: Arc::clone(&health),
        ctx: Arc::clone(proxier.context()),
    };
    for (addr, router, what) in [
        (
            args.metrics_bind_address,
            admin::metrics_router(state.clone()),
            admin::AdminListener::Metrics,
        ),
        (
            args.healthz_bind_address,
            admin::healthz_router(state),
            admin::AdminListener::Healthz,
        ),
    ] {
        match admin::spawn(addr, what, router, stop_admin.clone()).await {
            Ok(bound) => tracing::info!(address = %bound, "{} server listening", what.as_str()),
            // The proxy itself still works; the probe or scrape will say so.
            Err(e) => {
                tracing::error!(address = %addr, error = %e, "cannot serve {}", what.as_str())
            }
        }
    }
    let stop_discovery = CancellationToken::new();
    let snapshots = match source {
        Source::Manifests(source) => manifests::spawn(source, stop_discovery.clone())
            .await
            .map_err(|e| ConfigError(e.to_string()))?,
        Source::Kube(client, options) => {
            // The admin servers already answer: /readyz is 503 until the
            // first complete list is applied.
            let first = discovery::kube::spawn(*client, options, stop_discovery.clone());
            let stop = shutdown_signal();
            tokio::pin!(first, stop);
            // While waiting, /healthz stays healthy (nothing is stale yet).
            let mut alive = tokio::time::interval(
                (args.iptables_sync_period / 2).max(Duration::from_millis(100)),
            );
            loop {
                tokio::select! {
                    r = &mut first => break r?,
                    _ = alive.tick() => health.starting_at(std::time::SystemTime::now()),
                    _ = &mut stop => {
                        tracing::info!("stopped before the first list");
                        stop_discovery.cancel();
                        if let Some(r) = rules {
                            if let Err(e) = r.iptables.cleanup().await {
                                tracing::error!(error = %e, "cannot remove iptables rules; run --cleanup");
                            }
                        }
                        stop_admin.cancel();
                        return Ok(());
                    }
                }
            }
        }
    };
    let run_loop = Loop {
        proxier,
        rules,
        health,
        sync_period: args.iptables_sync_period,
    };
    let Loop {
        mut proxier, rules, ..
    } = run_loop.serve(snapshots, shutdown_signal()).await;
    stop_discovery.cancel();
    tracing::info!(grace = ?args.shutdown_grace, "shutting down: listeners closed, draining connections");
    proxier.close_listeners();
    let finish = async {
        if let Some(r) = rules {
            match r.iptables.cleanup().await {
                Ok(()) => tracing::info!("iptables rules removed"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot remove iptables rules; run --cleanup")
                }
            }
        }
        proxier.shutdown(args.shutdown_grace).await
    };
    let result = tokio::select! {
        left = finish => {
            if left > 0 {
                tracing::warn!(connections = left, "grace period over; closing the rest");
            }
            Ok(())
        }
        _ = shutdown_signal() => {
            tracing::warn!("second signal: exiting at once");
            std::process::exit(1);
        }
    };
    stop_admin.cancel();
    result
}

/// `rules`: prints the payload for the discovery source, changes nothing.
pub async fn rules(args: RunArgs) -> anyhow::Result<()> {
    let snapshot = match discovery_source(&args).await? {
        Source::Manifests(source) => {
            let (snapshot, problems) =
                manifests::load(&source).map_err(|e| ConfigError(e.to_string()))?;
            for p in &problems {
                tracing::warn!("skipped: {p}");
            }
            snapshot
        }
        Source::Kube(client, options) => {
            let stop = CancellationToken::new();
            let rx = tokio::select! {
                r = discovery::kube::spawn(*client, options, stop.clone()) => r?,
                _ = shutdown_signal() => return Ok(()),
            };
            let snapshot = Snapshot::clone(&rx.borrow());
            stop.cancel();
            snapshot
        }
    };
    // Listeners live only while rendering: any fd limit will do.
    let mut proxier = Proxier::new(proxy_config(&args, 1024));
    proxier.sync(&snapshot);
    print!(
        "{}",
        iptables::preview(&iptables::portals(&proxier), args.bind_address)
    );
    proxier.shutdown(Duration::ZERO).await;
    Ok(())
}

/// The control loop: the proxier, the rules and their health.
pub struct Loop {
    /// Listeners and balancers.
    pub proxier: Proxier,
    /// The iptables redirect, when managed.
    pub rules: Option<RuleSync>,
    /// Updated after every sync pass.
    pub health: Arc<Health>,
    /// A sync pass runs at least this often, even with no change.
    pub sync_period: Duration,
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
        let mut next_repair = Instant::now() + self.sync_period;
        loop {
            if resync {
                let started = Instant::now();
                let r = self.proxier.sync(&current);
                tracing::info!(
                    services = current.services.len(),
                    listening = r.listening,
                    pending = r.pending,
                    opened = r.opened,
                    closed = r.closed,
                    endpoints_changed = r.endpoints_changed,
                    took = ?started.elapsed(),
                    "synced"
                );
                let service_changes = r.opened + r.closed + r.spec_changed;
                ::metrics::counter!(metrics::SERVICE_CHANGES).increment(service_changes as u64);
                ::metrics::counter!(metrics::ENDPOINT_CHANGES)
                    .increment(r.endpoints_changed as u64);
                if service_changes > 0 {
                    rules_dirty = true;
                    ::metrics::gauge!(metrics::SYNC_LAST_QUEUED).set(unix_now());
                }
                resync = false;
            }
            if let Some(r) = self.rules.as_mut() {
                let now = Instant::now();
                let due = rules_last.is_none_or(|t| now >= t + r.min_period);
                let repair = now >= next_repair;
                if (rules_dirty && due) || repair {
                    let portals = iptables::portals(&self.proxier);
                    let result = r.iptables.sync(&portals, repair).await;
                    let took = r.iptables.stats.last_duration;
                    ::metrics::histogram!(metrics::SYNC_DURATION).record(took.as_secs_f64());
                    match result {
                        Ok(()) => {
                            ::metrics::gauge!(metrics::SYNC_LAST_TIMESTAMP).set(unix_now());
                            self.health.set_rules(RulesState::Synced);
                            tracing::info!(portals = portals.len(), repair, took = ?took, "iptables synced");
                        }
                        Err(e) => {
                            ::metrics::counter!(metrics::RESTORE_FAILURES).increment(1);
                            self.health.set_rules(RulesState::Failed);
                            tracing::error!(error = %e, "iptables sync failed; previous rules stay");
                        }
                    }
                    rules_dirty = false;
                    rules_last = Some(Instant::now());
                }
            }
            if Instant::now() >= next_repair {
                next_repair = Instant::now() + self.sync_period;
            }
            self.health.synced();
            let wake = match (&self.rules, rules_dirty, rules_last) {
                (Some(r), true, Some(t)) => (t + r.min_period).min(next_repair),
                _ => next_repair,
            };
            let retry = self.proxier.has_pending();
            tokio::select! {
                _ = &mut stop => return self,
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

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::connections_for_fd_limit;

    #[test]
    fn connection_limit_follows_the_fd_limit() {
        // The admin servers' 68 fds come on top of the quarter.
        assert_eq!(connections_for_fd_limit(64), 1);
        assert_eq!(connections_for_fd_limit(134), 16);
        assert_eq!(connections_for_fd_limit(1024), 350);
        assert_eq!(connections_for_fd_limit(20_000), 9454);
        assert_eq!(connections_for_fd_limit(1 << 20), 523_742);
        assert_eq!(connections_for_fd_limit(0), 1);
    }
}
