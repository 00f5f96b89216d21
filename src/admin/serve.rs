//! How the admin routers are served: one accept loop per listener, bounded
//! so that no amount of traffic to `/healthz` (on `0.0.0.0` by default,
//! reachable from every pod) or `/metrics` can take the data path's fds
//! or stall it, while a fresh probe or scrape still gets an answer.
//!
//! - **Cap.** At most [`MAX_CONNECTIONS`] connections per listener are
//!   served; the accept loop admits one more only once it has a slot for
//!   it. Both caps, the connections being admitted and the two listening
//!   sockets are [`RESERVED_FDS`], kept out of `--max-connections`.
//! - **Shedding.** When a connection is accepted and every slot is
//!   taken, the oldest connection that is not being answered
//!   (it has not delivered a complete request yet, or it is idle in
//!   keep-alive) is closed to make room, as nginx reuses idle keep-alive
//!   connections. A flood of idle or slow connections therefore only
//!   evicts itself: the newest arrival (a kubelet probe, a scrape) is the
//!   last in line to be shed, and is answered at once. Only when every slot
//!   is busy answering does a new connection wait in the backlog.
//! - **Deadlines,** from the connection's last change of phase: a complete
//!   request head within [`HEADER_READ_TIMEOUT`] of the accept, the
//!   response written within [`RESPONSE_TIMEOUT`], the next request within
//!   [`IDLE_TIMEOUT`] of the last response.
//! - **Size.** Request heads are read into at most [`MAX_HEADER_BYTES`]
//!   (hyper answers 431 beyond); bodies are refused (413) beyond
//!   [`MAX_BODY_BYTES`] (every route is GET-only and reads none).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::metrics as m;

/// Connections one admin listener holds at once. Legitimate clients are a
/// handful (the kubelet's probes, one or two Prometheus servers, `status`),
/// and shedding keeps a slot for a fresh one however many arrive: 32 is
/// ample for them, and small next to the data path's share of fds.
pub const MAX_CONNECTIONS: usize = 32;

/// Time from accept to a complete request head. Probes and scrapes send
/// theirs at once; a few seconds is plenty even for a loaded node, and
/// ends slow-loris connections long before they matter.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a keep-alive connection may sit between requests. Above the usual
/// 15 s and 30 s scrape intervals, so Prometheus keeps its connection; an
/// idle connection is shed first at the cap anyway.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Time from a complete request head to the response fully written: a
/// client that never reads its `/metrics` body is closed after this.
/// Above Prometheus' longest usual scrape timeout.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes hyper buffers while reading a request head (its minimum is 8 KiB;
/// real probes and scrapes send a few hundred bytes).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Largest request body accepted: no route reads one (all are GET-only).
pub const MAX_BODY_BYTES: usize = 4 * 1024;

/// How long a connection accepted just before its listener stops may take
/// to send its request (a probe sends it with the connect).
const STOP_GRACE: Duration = Duration::from_millis(200);

/// Accept queue of each admin listener (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). Queued connections cost no fd;
/// when the queue overflows, the kernel drops SYNs, and a probe caught in
/// a burst would wait for its 1 s SYN retransmit. Twice tokio's 1024.
pub const BACKLOG: i32 = 4096;

/// Connections all health-check node ports together hold at once (one
/// pool: a load balancer probes every node port of every Service from a
/// few sources, each probe a short request). Taken from the fd budget while
/// some port is open, with each port's socket and the connection it admits.
pub const SERVICE_HEALTH_CONNECTIONS: usize = 64;

/// Fds the two admin listeners may hold: for each, its cap, the connection
/// being admitted and the listening socket. Kept out of the default
/// `--max-connections`.
pub const RESERVED_FDS: u64 = 2 * (MAX_CONNECTIONS as u64 + 2);

/// Which admin listener, as its metrics label says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminListener {
    /// `--metrics-bind-address`: `/metrics`, `/debug/services`.
    Metrics,
    /// `--healthz-bind-address`: `/healthz`, `/readyz`, `/livez`.
    Healthz,
    /// The health-check node ports of `externalTrafficPolicy: Local`
    /// LoadBalancer Services.
    ServiceHealth,
}

impl AdminListener {
    /// The `listener` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Metrics => "metrics",
            Self::Healthz => "healthz",
            Self::ServiceHealth => "service-health",
        }
    }
}

/// Where a connection stands, for its deadline and for shedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Accepted, no complete request head yet.
    Head,
    /// A request is being answered: never shed.
    Busy,
    /// Answered, waiting for the next request.
    Idle,
}

impl Phase {
    fn timeout(self) -> Duration {
        match self {
            Self::Head => HEADER_READ_TIMEOUT,
            Self::Busy => RESPONSE_TIMEOUT,
            Self::Idle => IDLE_TIMEOUT,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Head => "header",
            Self::Busy => "response",
            Self::Idle => "idle",
        }
    }
}

/// One accepted connection, as the listener's registry sees it.
#[derive(Debug)]
struct Slot {
    /// Requests whose response is not fully written yet.
    in_flight: AtomicU32,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// Last change of phase, µs after the listener's epoch (a burst admits
    /// many connections a millisecond: finer keeps their order).
    since_us: AtomicU64,
    /// Until its task has first read the socket. Not shed then: its
    /// request may be sitting in the socket buffer, complete (a probe
    /// sends it with the connect), and a burst could otherwise shed it
    /// before it was even looked at.
    fresh: AtomicBool,
    /// Cancelled to shed the connection.
    close: CancellationToken,
}

impl Slot {
    fn phase(&self) -> Phase {
        if self.in_flight.load(Relaxed) > 0 {
            Phase::Busy
        } else if self.requests.load(Relaxed) == 0 {
            Phase::Head
        } else {
            Phase::Idle
        }
    }
}

/// Marks its connection busy while it lives: from a complete request head
/// until the response body is written (hyper drops the body then).
struct Busy {
    slot: Arc<Slot>,
    epoch: Instant,
}

impl Busy {
    fn start(slot: &Arc<Slot>, epoch: Instant) -> Self {
        slot.requests.fetch_add(1, Relaxed);
        slot.in_flight.fetch_add(1, Relaxed);
        slot.since_us.store(us_since(epoch), Relaxed);
        Self {
            slot: Arc::clone(slot),
            epoch,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // The idle clock starts when the last response is done.
        self.slot.since_us.store(us_since(self.epoch), Relaxed);
        self.slot.in_flight.fetch_sub(1, Relaxed);
    }
}

fn us_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// What [`Registry::shed_oldest`] did.
#[derive(Debug, PartialEq, Eq)]
enum Shed {
    /// Closed one: its slot comes back when its fd is closed.
    One,
    /// Nothing to shed before the fresh connections have been read.
    NotYet,
    /// Every connection is being answered.
    AllBusy,
}

/// The connections of one listener.
struct Registry {
    listener: AdminListener,
    epoch: Instant,
    slots: Mutex<Vec<Arc<Slot>>>,
}

// === impl Registry ===

impl Registry {
    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, close: CancellationToken) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            since_us: AtomicU64::new(us_since(self.epoch)),
            fresh: AtomicBool::new(true),
            close,
        });
        self.slots().push(Arc::clone(&slot));
        slot
    }

    fn remove(&self, slot: &Arc<Slot>) {
        self.slots().retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// Closes the connection that has waited longest without being
    /// answered (no complete request yet, or idle), unless its task has
    /// not read the socket yet.
    fn shed_oldest(&self) -> Shed {
        let slots = self.slots();
        let victim = slots
            .iter()
            .filter(|s| s.phase() != Phase::Busy && !s.close.is_cancelled())
            .filter(|s| !s.fresh.load(Relaxed))
            .min_by_key(|s| s.since_us.load(Relaxed));
        if let Some(s) = victim {
            s.close.cancel();
            Shed::One
        } else if slots.iter().any(|s| s.fresh.load(Relaxed)) {
            Shed::NotYet
        } else {
            Shed::AllBusy
        }
    }

    /// When `slot`'s current phase runs out.
    fn deadline(&self, slot: &Slot) -> (Phase, Instant) {
        let phase = slot.phase();
        let since = self.epoch + Duration::from_micros(slot.since_us.load(Relaxed));
        (phase, since + phase.timeout())
    }
}

/// Binds `addr` and serves `router` there with the limits above until
/// `stop`; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    listener: AdminListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    spawn_on(bind(addr)?, listener, router, stop).await
}

/// As [`spawn`], on a socket already listening (e.g. handed over by the
/// previous process).
pub async fn spawn_on(
    socket: tokio::net::TcpListener,
    listener: AdminListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    serve_in(
        Arc::new(socket),
        &Pool::new(listener, MAX_CONNECTIONS),
        router,
        stop,
    )
}

/// Connection slots, with their cap, shedding and deadlines, shared by
/// the listeners served in it (one per admin address; one for every
/// health-check node port).
#[derive(Clone)]
pub struct Pool {
    registry: Arc<Registry>,
    permits: Arc<Semaphore>,
}

impl Pool {
    /// A pool of `cap` connections for listeners of `listener`'s kind (its
    /// metrics label).
    pub fn new(listener: AdminListener, cap: usize) -> Self {
        let label = listener.as_str();
        for phase in [Phase::Head, Phase::Busy, Phase::Idle] {
            metrics::counter!(m::ADMIN_TIMED_OUT, "listener" => label, "phase" => phase.as_str())
                .absolute(0);
        }
        metrics::counter!(m::ADMIN_SHED, "listener" => label).absolute(0);
        metrics::counter!(m::ADMIN_WAITS, "listener" => label).absolute(0);
        metrics::counter!(m::ADMIN_ACCEPTED, "listener" => label).absolute(0);
        metrics::gauge!(m::ADMIN_ACTIVE, "listener" => label).set(0.0);
        Self {
            registry: Arc::new(Registry {
                listener,
                epoch: Instant::now(),
                slots: Mutex::new(Vec::new()),
            }),
            permits: Arc::new(Semaphore::new(cap)),
        }
    }
}

impl Pool {
    /// Waits until no connection of the pool is open, at most `within`.
    pub async fn drained(&self, within: Duration) {
        let end = Instant::now() + within;
        while !self.registry.slots().is_empty() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Serves `router` on `socket` within `pool` until `stop` (which also
/// closes the connections it accepted); returns the bound address. The
/// socket is shared so that a hand-over can send it meanwhile.
pub fn serve_in(
    socket: Arc<tokio::net::TcpListener>,
    pool: &Pool,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let bound = socket.local_addr()?;
    let pool = pool.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = accept_loop(socket, pool, router, stop.clone()) => {}
            _ = stop.cancelled() => {}
        }
    });
    Ok(bound)
}

/// A listening socket with room for a burst in its accept queue.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::from_std(bind_std(addr)?)
}

/// A listening socket (non-blocking) with room for a burst in its accept
/// queue, not yet served.
pub fn bind_std(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.ip().is_unspecified() && addr.is_ipv6() {
        // `::` takes both families, as the service listeners do.
        socket.set_only_v6(false)?;
    }
    // As tokio's and std's bind do: a restart finds the port free.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Accepts a connection, takes a slot for it (shedding the oldest
/// unanswered connection when all are taken), and serves it. Only the one
/// connection being admitted holds an fd outside the slots.
async fn accept_loop(
    socket: Arc<tokio::net::TcpListener>,
    pool: Pool,
    router: Router,
    stop: CancellationToken,
) {
    let Pool { registry, permits } = pool;
    let label = registry.listener.as_str();
    let mut backoff = Duration::from_millis(5);
    loop {
        let stream = match socket.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(5);
                stream
            }
            Err(e) => {
                // Out of fds or memory: back off as the data path does.
                tracing::warn!(error = %e, listener = label, "admin accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        metrics::counter!(m::ADMIN_ACCEPTED, "listener" => label).increment(1);
        let permit = take_slot(&registry, &permits).await;
        let slot = registry.add(CancellationToken::new());
        let stop = stop.clone();
        let (registry, router) = (Arc::clone(&registry), router.clone());
        tokio::spawn(async move {
            serve_connection(stream, &registry, &slot, router, &stop).await;
            registry.remove(&slot);
            drop(permit);
        });
    }
}

/// A slot for a connection just accepted: a free one, else the one of the
/// oldest unanswered connection, shed; when every connection is busy
/// answering, the next to finish (new connections wait in the backlog
/// meanwhile).
async fn take_slot(registry: &Registry, permits: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    let label = registry.listener.as_str();
    let mut waited = false;
    loop {
        if let Ok(p) = Arc::clone(permits).try_acquire_owned() {
            return p;
        }
        match registry.shed_oldest() {
            Shed::One => metrics::counter!(m::ADMIN_SHED, "listener" => label).increment(1),
            Shed::NotYet => {
                // Let the fresh connections' tasks read their sockets.
                tokio::task::yield_now().await;
                continue;
            }
            Shed::AllBusy if !waited => {
                metrics::counter!(m::ADMIN_WAITS, "listener" => label).increment(1);
                waited = true;
            }
            Shed::AllBusy => {}
        }
        // The shed connection's task frees its slot once its fd is closed;
        // a busy one frees it when its response is done or times out.
        // Re-check now and then: a busy connection may turn idle (sheddable)
        // without ending.
        tokio::select! {
            p = Arc::clone(permits).acquire_owned() => {
                if let Ok(p) = p {
                    return p;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// Serves one connection until it ends, is shed, or misses its deadline.
/// Once `stop` (the listener stops: a hand-over, a Service gone), it ends
/// gracefully: a request being answered still gets its response, an idle
/// connection closes.
async fn serve_connection(
    stream: TcpStream,
    registry: &Registry,
    slot: &Arc<Slot>,
    router: Router,
    stop: &CancellationToken,
) {
    let label = registry.listener.as_str();
    let gauge = metrics::gauge!(m::ADMIN_ACTIVE, "listener" => label);
    gauge.increment(1.0);
    let epoch = registry.epoch;
    let svc_slot = Arc::clone(slot);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let busy = Busy::start(&svc_slot, epoch);
        let router = router.clone();
        async move {
            let response = answer(router, req).await;
            // The slot stays busy until hyper has written the body and
            // drops it.
            Ok::<_, Infallible>(response.map(move |body| {
                Body::new(body.map_frame(move |frame| {
                    let _busy = &busy;
                    frame
                }))
            }))
        }
    });
    {
        let conn = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEADER_BYTES)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        // Once stopped: when to end gracefully (hyper answers the request
        // in flight, then closes). A connection accepted just before the
        // stop gets `STOP_GRACE` for its request first: hyper would take
        // it for idle and close it unanswered.
        let mut stop_at: Option<Instant> = None;
        let mut stopped = false;
        loop {
            let (phase, deadline) = registry.deadline(slot);
            let first_read = std::future::poll_fn(|cx| {
                let r = conn.as_mut().poll(cx);
                // hyper has read the socket, and called the service if a
                // complete request head was there.
                slot.fresh.store(false, Relaxed);
                r
            });
            tokio::select! {
                r = first_read => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, listener = label, "admin connection ended");
                    }
                    break;
                }
                _ = slot.close.cancelled() => break,
                _ = stop.cancelled(), if stop_at.is_none() => {
                    let unread = slot.requests.load(Relaxed) == 0;
                    stop_at = Some(Instant::now() + if unread { STOP_GRACE } else { Duration::ZERO });
                }
                _ = tokio::time::sleep_until(stop_at.unwrap_or_else(Instant::now)), if stop_at.is_some() && !stopped => {
                    conn.as_mut().graceful_shutdown();
                    stopped = true;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // The phase may have moved on meanwhile: re-check.
                    let (now_phase, now_deadline) = registry.deadline(slot);
                    if now_phase == phase && now_deadline <= Instant::now() {
                        metrics::counter!(m::ADMIN_TIMED_OUT, "listener" => label, "phase" => phase.as_str())
                            .increment(1);
                        break;
                    }
                }
            }
        }
        // `conn` (and the socket) is dropped here, before the slot is freed.
    }
    gauge.decrement(1.0);
}

/// Refuses bodies over [`MAX_BODY_BYTES`], else asks the router.
async fn answer(router: Router, req: Request<Incoming>) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            [(header::CONNECTION, "close")],
            "request body too large\n",
        )
            .into_response();
    }
    let req = req.map(|b| Body::new(http_body_util::Limited::new(b, MAX_BODY_BYTES)));
    match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry {
            listener: AdminListener::Healthz,
            epoch: Instant::now(),
            slots: Mutex::new(Vec::new()),
        }
    }

    /// A slot already read, whose phase last changed `at_us` after the
    /// epoch.
    fn slot_at(r: &Registry, at_us: u64) -> Arc<Slot> {
        let s = r.add(CancellationToken::new());
        s.since_us.store(at_us, Relaxed);
        s.fresh.store(false, Relaxed);
        s
    }

    #[test]
    fn the_oldest_unanswered_connection_is_shed_never_a_busy_one() {
        let r = registry();
        let (oldest, middle, newest) = (slot_at(&r, 10), slot_at(&r, 20), slot_at(&r, 30));
        // The two oldest are being answered: the newest goes.
        let answering = Busy::start(&oldest, r.epoch);
        let other = Busy::start(&middle, r.epoch);
        assert_eq!(r.shed_oldest(), Shed::One);
        assert!(newest.close.is_cancelled() && !oldest.close.is_cancelled());
        // Every remaining one busy: nothing to shed, the next waits.
        assert_eq!(r.shed_oldest(), Shed::AllBusy);
        // A fresh one is not shed before its task has read it.
        let fresh = r.add(CancellationToken::new());
        assert_eq!(r.shed_oldest(), Shed::NotYet);
        r.remove(&fresh);
        // Answered: idle, sheddable again, the longest idle first.
        drop(other);
        drop(answering);
        assert_eq!(oldest.phase(), Phase::Idle);
        middle.since_us.store(40, Relaxed);
        oldest.since_us.store(50, Relaxed);
        assert_eq!(r.shed_oldest(), Shed::One);
        assert!(middle.close.is_cancelled() && !oldest.close.is_cancelled());
        r.remove(&middle);
        r.remove(&newest);
        assert_eq!(r.slots().len(), 1);
    }

    #[test]
    fn each_phase_has_its_deadline() {
        let r = registry();
        let s = slot_at(&r, 1000);
        let at = |us: u64, d: Duration| r.epoch + Duration::from_micros(us) + d;
        assert_eq!(r.deadline(&s), (Phase::Head, at(1000, HEADER_READ_TIMEOUT)));
        let busy = Busy::start(&s, r.epoch);
        s.since_us.store(2000, Relaxed);
        assert_eq!(r.deadline(&s), (Phase::Busy, at(2000, RESPONSE_TIMEOUT)));
        drop(busy);
        s.since_us.store(3000, Relaxed);
        assert_eq!(r.deadline(&s), (Phase::Idle, at(3000, IDLE_TIMEOUT)));
    }
}
