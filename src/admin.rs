//! Admin HTTP (axum): `/metrics`, `/debug/services` and the live stats
//! page (`/`, see [`crate::stats_page`]) on
//! `--metrics-bind-address` (127.0.0.1 by default: nothing there is for
//! the network), `/healthz`, `/readyz` and `/livez` on
//! `--healthz-bind-address`. Everything is GET-only and read-only; other
//! methods get 405. How connections are served, and bounded, is
//! [`serve`]'s part.

pub mod serve;

pub use serve::{
    spawn, AdminListener, HEADER_READ_TIMEOUT, IDLE_TIMEOUT, MAX_BODY_BYTES, MAX_CONNECTIONS,
    MAX_HEADER_BYTES, RESERVED_FDS, RESPONSE_TIMEOUT,
};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use tokio_util::sync::CancellationToken;

use crate::proxy::{Context, Published, UnservedReason};
use crate::{stats_page, status};

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
    fn as_str(self) -> &'static str {
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

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Liveness of the sync loop and readiness of the proxy, as kube-proxy's
/// healthz server reports them.
#[derive(Debug)]
pub struct Health {
    /// Start-up, or the last moment we were still legitimately starting
    /// (waiting for the first list): the liveness reference before any sync.
    started_ms: AtomicU64,
    last_sync_ms: AtomicU64,
    ready: AtomicBool,
    rules: AtomicU8,
    period: Duration,
}

impl Health {
    /// Health for a loop that syncs at least every `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            started_ms: AtomicU64::new(unix_ms(SystemTime::now())),
            last_sync_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            rules: AtomicU8::new(RulesState::Off as u8),
            period,
        }
    }

    /// Records a completed sync at `at`; the first one makes us ready.
    pub fn synced_at(&self, at: SystemTime) {
        self.last_sync_ms.store(unix_ms(at), Relaxed);
        self.ready.store(true, Relaxed);
    }

    /// Records that the proxy is still waiting for its first snapshot (the
    /// API server is unreachable, say) at `at`: nothing is stale yet, so
    /// `/healthz` stays healthy, as kube-proxy's does while starting;
    /// `/readyz` stays 503.
    pub fn starting_at(&self, at: SystemTime) {
        self.started_ms.store(unix_ms(at), Relaxed);
    }

    /// Records a completed sync now.
    pub fn synced(&self) {
        self.synced_at(SystemTime::now());
    }

    /// When the last sync completed (Unix milliseconds; 0 = none yet).
    pub fn last_sync_ms(&self) -> u64 {
        self.last_sync_ms.load(Relaxed)
    }

    /// Whether the first snapshot has been applied.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed)
    }

    /// Records the iptables state.
    pub fn set_rules(&self, s: RulesState) {
        self.rules.store(s as u8, Relaxed);
    }

    /// The iptables state.
    pub fn rules(&self) -> RulesState {
        RulesState::from_u8(self.rules.load(Relaxed))
    }

    /// `/healthz` at `now`: healthy while the last sync (or start-up, before
    /// the first) is fresher than twice the sync period. Returns the verdict
    /// and kube-proxy's JSON body.
    pub fn check(&self, now: SystemTime) -> (bool, String) {
        self.check_with(now, &Unserved::default())
    }

    /// As [`Self::check`], the body also counting the service ports that
    /// have no listener, by reason (the verdict does not change: the
    /// other Service ports are served).
    pub fn check_with(&self, now: SystemTime, unserved: &Unserved) -> (bool, String) {
        let last = self.last_sync_ms.load(Relaxed);
        let reference = if last == 0 {
            self.started_ms.load(Relaxed)
        } else {
            last
        };
        let now_ms = unix_ms(now);
        let healthy = now_ms.saturating_sub(reference) < 2 * self.period.as_millis() as u64;
        let fmt = |ms: u64| {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        };
        let updated = if last == 0 { "".to_string() } else { fmt(last) };
        let body = format!(
            "{{\"lastUpdated\": \"{updated}\",\"currentTime\": \"{}\",\"unservedServicePorts\": {{\"fd_limit\": {},\"bind\": {}}}}}",
            fmt(now_ms),
            unserved.fd_limit,
            unserved.bind,
        );
        (healthy, body)
    }
}

/// Service ports without a listener, by reason, as `/healthz` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unserved {
    /// The fd budget holds no more listeners.
    pub fd_limit: usize,
    /// The port could not be bound.
    pub bind: usize,
}

impl Unserved {
    /// Counts the unserved ports of `services`.
    pub fn of(services: &[crate::proxy::ServiceView]) -> Self {
        let [fd_limit, bind] = UnservedReason::count(services);
        Self { fd_limit, bind }
    }
}

/// What the handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The facade metrics' renderer.
    pub handle: PrometheusHandle,
    /// The live services.
    pub services: Published,
    /// Sync health.
    pub health: Arc<Health>,
    /// Data-path context (pipe pool figures).
    pub ctx: Arc<Context>,
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let mut body = s.handle.render();
    body.push_str(&crate::metrics::render_services(&s.services.load()));
    body.push_str(&crate::metrics::render_process(&s.ctx));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn debug_services(State(s): State<AdminState>) -> Json<status::StatusDoc> {
    let mut doc = status::collect(&s.services.load(), s.health.rules().as_str());
    doc.last_sync_ms = s.health.last_sync_ms();
    Json(doc)
}

async fn healthz(State(s): State<AdminState>) -> Response {
    let unserved = Unserved::of(&s.services.load());
    let (ok, body) = s.health.check_with(SystemTime::now(), &unserved);
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.health.is_ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no snapshot applied yet\n")
    }
}

/// Routes of the metrics address.
pub fn metrics_router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/debug/services", get(debug_services))
        .route("/", get(stats_page::index))
        .route(stats_page::SCRIPT_PATH, get(stats_page::script))
        .route(stats_page::STYLE_PATH, get(stats_page::style))
        .with_state(state)
}

/// Routes of the healthz address.
pub fn healthz_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/livez", get(|| async { "ok\n" }))
        .with_state(state)
}

/// Binds an admin listener at `addr` (not yet served; see [`spawn_on`]).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    serve::bind_std(addr)
}

/// Serves `router` on `socket`, a listening socket already bound (handed
/// over by the previous process), as [`spawn`] does; returns its address.
pub async fn spawn_on(
    socket: std::net::TcpListener,
    listener: AdminListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    socket.set_nonblocking(true)?;
    let socket = tokio::net::TcpListener::from_std(socket)?;
    serve::spawn_on(socket, listener, router, stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_turns_503_when_syncs_stop_and_200_again_after() {
        let h = Health::new(Duration::from_secs(30));
        let t0 = SystemTime::now();
        assert!(h.check(t0).0, "healthy during start-up");
        h.synced_at(t0);
        assert!(h.check(t0 + Duration::from_secs(59)).0);
        let (ok, body) = h.check(t0 + Duration::from_secs(61));
        assert!(!ok, "stale sync");
        assert!(body.contains("\"lastUpdated\"") && body.contains("\"currentTime\""));
        h.synced_at(t0 + Duration::from_secs(62));
        assert!(h.check(t0 + Duration::from_secs(63)).0, "healthy again");
    }

    #[test]
    fn waiting_for_the_first_snapshot_is_healthy_but_not_ready() {
        let h = Health::new(Duration::from_secs(30));
        let t0 = SystemTime::now();
        assert!(!h.check(t0 + Duration::from_secs(61)).0, "stuck start-up");
        h.starting_at(t0 + Duration::from_secs(60));
        assert!(h.check(t0 + Duration::from_secs(61)).0);
        assert!(!h.is_ready());
    }
}
