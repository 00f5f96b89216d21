//! kube-userspace-proxy: Kubernetes' userspace service proxy, rebuilt.
//!
//! # Layout
//! - [`model`]: the desired state ([`model::Snapshot`]), pure data;
//!   [`changes`]: what differs between two snapshots, Service by Service.
//! - [`discovery`]: Kubernetes objects → snapshot ([`discovery::kube`] from
//!   the API server, [`discovery::manifests`] from files).
//! - [`proxy`]: the proxier and the data path (listeners, balancer, dial
//!   with retry, splice).
//! - [`iptables`]: the redirect of service addresses to the listeners.
//! - [`admin`]: the admin HTTP servers; [`status`] is `/debug/services`
//!   and the `status` table, [`stats_page`] the live page that polls it.
//! - [`cli`], [`run()`], [`rules()`], [`demo`], [`status`]: the binary's
//!   entry points; `main.rs` only parses and dispatches. The run loop is
//!   [`Loop`]. [`config_file`] applies `--config` (kube-proxy's
//!   `KubeProxyConfiguration`) to the parsed flags.

#![deny(unsafe_code)]

pub mod admin;
pub mod allocator;
pub mod changes;
pub mod cli;
pub mod config_file;
pub mod demo;
pub mod detect_local;
pub mod discovery;
pub mod handover;
pub mod health;
pub mod iptables;
pub mod metrics;
pub mod model;
pub mod privileges;
pub mod proxy;
mod run;
mod runloop;
pub mod stats_page;
pub mod status;

use cli::{LogArgs, LogFormat};

pub use run::{rules, run};
pub use runloop::{Applied, Loop, RuleSync};

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
