//! kube-userspace-proxy: Kubernetes' userspace service proxy, rebuilt.
//!
//! # Layout
//! - [`model`]: the desired state ([`model::Snapshot`]), pure data.
//! - [`discovery`]: Kubernetes objects → snapshot ([`discovery::manifests`]).
//! - [`proxy`]: the proxier and the data path (listeners, balancer, dial
//!   with retry, splice).
//! - [`cli`], [`run`], [`demo`]: the binary's entry points; `main.rs` only
//!   parses and dispatches.

#![deny(unsafe_code)]

pub mod cli;
pub mod demo;
pub mod discovery;
pub mod model;
pub mod proxy;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use cli::{LogArgs, LogFormat, RunArgs};
use discovery::manifests;
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
const RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the proxy until SIGTERM/SIGINT, then drains for `--shutdown-grace`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.kubeconfig.is_some() || args.master.is_some() {
        return Err(ConfigError(
            "--kubeconfig/--master: Kubernetes discovery is not in this build yet; use --manifests DIR"
                .into(),
        )
        .into());
    }
    match raise_fd_limit() {
        Ok(n) => tracing::info!(limit = n, "RLIMIT_NOFILE raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let source = match &args.manifests {
        Some(dir) => {
            if !dir.is_dir() {
                return Err(
                    ConfigError(format!("--manifests {}: not a directory", dir.display())).into(),
                );
            }
            manifests::Source::Dir(dir.clone())
        }
        None => {
            tracing::info!("no --manifests and no cluster: serving the embedded example manifests");
            manifests::Source::Embedded
        }
    };
    let stop_discovery = CancellationToken::new();
    let snapshots = manifests::spawn(source, stop_discovery.clone())
        .await
        .map_err(|e| ConfigError(e.to_string()))?;
    let proxier = Proxier::new(ProxyConfig {
        bind_address: args.bind_address,
        port_range: args.proxy_port_range,
        dial_timeouts: args.dial_timeouts.0.clone(),
        copy_mode: args.copy_mode,
    });
    let proxier = serve(proxier, snapshots, shutdown_signal()).await;
    stop_discovery.cancel();
    tracing::info!(grace = ?args.shutdown_grace, "shutting down: listeners closed, draining connections");
    let drain = proxier.shutdown(args.shutdown_grace);
    tokio::select! {
        left = drain => {
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

/// Applies every snapshot to the proxier until `stop` resolves (or the
/// discovery source goes away); returns the proxier for shutdown.
pub async fn serve(
    mut proxier: Proxier,
    mut snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    stop: impl std::future::Future<Output = ()>,
) -> Proxier {
    tokio::pin!(stop);
    let mut current = snapshots.borrow_and_update().clone();
    loop {
        let started = std::time::Instant::now();
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
        let retry = async {
            if proxier.has_pending() {
                tokio::time::sleep(RETRY_INTERVAL).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = &mut stop => return proxier,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    // Source gone: keep serving the last state until stopped.
                    stop.await;
                    return proxier;
                }
                current = snapshots.borrow_and_update().clone();
            }
            _ = retry => {}
        }
    }
}
