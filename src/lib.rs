//! kube-userspace-proxy: Kubernetes' userspace service proxy, rebuilt.
//!
//! # Layout
//! - [`model`]: the desired state ([`model::Snapshot`]), pure data.
//! - [`discovery`]: Kubernetes objects → snapshot ([`discovery::manifests`]).
//! - [`proxy`]: the proxier and the data path (listeners, balancer, dial
//!   with retry, splice).
//! - [`iptables`]: the redirect of service addresses to the listeners.
//! - [`cli`], [`run`], [`demo`]: the binary's entry points; `main.rs` only
//!   parses and dispatches.

#![deny(unsafe_code)]

pub mod cli;
pub mod demo;
pub mod discovery;
pub mod iptables;
pub mod model;
pub mod proxy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

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

fn discovery_source(args: &RunArgs) -> Result<manifests::Source, ConfigError> {
    if args.kubeconfig.is_some() || args.master.is_some() {
        return Err(ConfigError(
            "--kubeconfig/--master: Kubernetes discovery is not in this build yet; use --manifests DIR"
                .into(),
        ));
    }
    match &args.manifests {
        Some(dir) if !dir.is_dir() => Err(ConfigError(format!(
            "--manifests {}: not a directory",
            dir.display()
        ))),
        Some(dir) => Ok(manifests::Source::Dir(dir.clone())),
        None => Ok(manifests::Source::Embedded),
    }
}

fn proxy_config(args: &RunArgs) -> ProxyConfig {
    ProxyConfig {
        bind_address: args.bind_address,
        port_range: args.proxy_port_range,
        dial_timeouts: args.dial_timeouts.0.clone(),
        copy_mode: args.copy_mode,
    }
}

/// Runs the proxy until SIGTERM/SIGINT: listeners close, rules are removed,
/// open connections drain for `--shutdown-grace`; a second signal exits at
/// once. With `--cleanup`, only removes rules.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.cleanup {
        iptables::cleanup_all(args.iptables_backend).await?;
        tracing::info!("--cleanup: iptables chains and jumps of kube-userspace-proxy removed");
        return Ok(());
    }
    let source = discovery_source(&args)?;
    match raise_fd_limit() {
        Ok(n) => tracing::info!(limit = n, "RLIMIT_NOFILE raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    if matches!(source, manifests::Source::Embedded) {
        tracing::info!("no --manifests and no cluster: serving the embedded example manifests");
    }
    let rules = Iptables::setup(args.iptables, args.iptables_backend, args.bind_address)
        .await
        .map_err(|e| ConfigError(format!("--iptables on: {e}")))?
        .map(|iptables| RuleSync {
            iptables,
            min_period: args.iptables_min_sync_period,
            period: args.iptables_sync_period,
        });
    let stop_discovery = CancellationToken::new();
    let snapshots = manifests::spawn(source, stop_discovery.clone())
        .await
        .map_err(|e| ConfigError(e.to_string()))?;
    let proxier = Proxier::new(proxy_config(&args));
    let (mut proxier, rules) = serve(proxier, rules, snapshots, shutdown_signal()).await;
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
    tokio::select! {
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
    }
}

/// `rules`: prints the payload for the discovery source, changes nothing.
pub async fn rules(args: RunArgs) -> anyhow::Result<()> {
    let source = discovery_source(&args)?;
    let (snapshot, problems) = manifests::load(&source).map_err(|e| ConfigError(e.to_string()))?;
    for p in &problems {
        tracing::warn!("skipped: {p}");
    }
    let mut proxier = Proxier::new(proxy_config(&args));
    proxier.sync(&snapshot);
    print!(
        "{}",
        iptables::preview(&iptables::portals(&proxier), args.bind_address)
    );
    proxier.shutdown(Duration::ZERO).await;
    Ok(())
}

/// Applies every snapshot to the proxier, and the resulting portals to the
/// rules (at most once per min period, at least once per period), until
/// `stop` resolves; returns both for shutdown.
pub async fn serve(
    mut proxier: Proxier,
    mut rules: Option<RuleSync>,
    mut snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    stop: impl std::future::Future<Output = ()>,
) -> (Proxier, Option<RuleSync>) {
    tokio::pin!(stop);
    let mut current = snapshots.borrow_and_update().clone();
    let mut source_open = true;
    let mut resync = true;
    let mut rules_dirty = true;
    let mut rules_last: Option<Instant> = None;
    let mut next_repair = Instant::now() + rules.as_ref().map_or(Duration::MAX / 4, |r| r.period);
    loop {
        if resync {
            let started = Instant::now();
            let r = proxier.sync(&current);
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
            rules_dirty |= r.opened + r.closed > 0 || r.spec_changed > 0;
            resync = false;
        }
        if let Some(r) = rules.as_mut() {
            let now = Instant::now();
            let due = rules_last.is_none_or(|t| now >= t + r.min_period);
            let repair = now >= next_repair;
            if (rules_dirty && due) || repair {
                let portals = iptables::portals(&proxier);
                match r.iptables.sync(&portals, repair).await {
                    Ok(()) => {
                        tracing::info!(portals = portals.len(), repair, took = ?r.iptables.stats.last_duration, "iptables synced")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "iptables sync failed; previous rules stay")
                    }
                }
                rules_dirty = false;
                rules_last = Some(Instant::now());
                next_repair = Instant::now() + r.period;
            }
        }
        let rules_wake = match (&rules, rules_dirty, rules_last) {
            (None, _, _) => None,
            (Some(r), true, Some(t)) => Some((t + r.min_period).min(next_repair)),
            (Some(_), _, _) => Some(next_repair),
        };
        let retry = proxier.has_pending();
        tokio::select! {
            _ = &mut stop => return (proxier, rules),
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
            _ = sleep_until_opt(rules_wake) => {}
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
