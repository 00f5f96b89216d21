//! Admin HTTP (axum): `/metrics`, `/debug/services` and the live stats
//! page (`/`, see [`crate::stats_page`]) on
//! `--metrics-bind-address` (127.0.0.1 by default: nothing there is for
//! the network), `/healthz`, `/readyz` and `/livez` on
//! `--healthz-bind-address`. Everything is GET-only and read-only; other
//! methods get 405. How connections are served, and bounded, is
//! [`serve`]'s part.

pub mod serve;
pub mod service_health;

pub use serve::{
    spawn, AdminListener, HEADER_READ_TIMEOUT, IDLE_TIMEOUT, MAX_BODY_BYTES, MAX_CONNECTIONS,
    MAX_HEADER_BYTES, RESERVED_FDS, RESPONSE_TIMEOUT,
};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use tokio_util::sync::CancellationToken;

use crate::proxy::{Context, Published, UnservedReason};
use crate::{stats_page, status};

pub use crate::health::{Health, RulesState};

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
    /// The health-check node ports, as last synced.
    pub health_checks: Arc<arc_swap::ArcSwap<service_health::HealthChecks>>,
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
    doc.last_sync_ms = s.health.last_updated_ms();
    doc.attach_health_checks(&s.health_checks.load());
    Json(doc)
}

/// `/healthz`, as upstream's `healthzHandler`: 200 while the proxy is
/// healthy and the node eligible, else 503; counted by code.
async fn healthz(State(s): State<AdminState>) -> Response {
    let unserved = Unserved::of(&s.services.load());
    let mut extra = serde_json::Map::new();
    extra.insert(
        "unservedServicePorts".into(),
        serde_json::json!({"fd_limit": unserved.fd_limit, "bind": unserved.bind}),
    );
    let (ok, body) = s.health.healthz_at(SystemTime::now(), extra);
    health_answer(crate::metrics::PROXY_HEALTHZ, ok, body)
}

/// `/livez`, as upstream's `livezHandler`: the proxy's health only.
async fn livez(State(s): State<AdminState>) -> Response {
    let (ok, body) = s.health.livez_at(SystemTime::now());
    health_answer(crate::metrics::PROXY_LIVEZ, ok, body)
}

fn health_answer(counter: &'static str, ok: bool, body: String) -> Response {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    ::metrics::counter!(counter, "code" => code.as_str().to_owned()).increment(1);
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
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
        .route("/livez", get(livez))
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
