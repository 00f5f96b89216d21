//! The life of each TCP connection once accepted (the sockets that accept
//! them are [`super::listener`]'s): its first bytes read → pick → dial
//! with retry (in the connection's own task, so a slow backend never
//! delays accepting) → the first bytes sent → move bytes until both sides
//! are done.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::balancer::now_ms;
use super::conn::{first_bytes, Connection, CopyMode, Flow, Stopped};
use super::dealer::Slot;
use super::listener::set_keepalive;
use super::proxy_protocol;
use super::{connect, Context, Service};
use crate::model::ProxyProtocol;

/// Minimum interval between two "no backend" log lines of one service.
const FAIL_LOG_INTERVAL_MS: u64 = 10_000;

/// Serves an accepted connection (non-blocking, not yet registered) on
/// runtime `rt`: it is registered with that runtime's event loop and
/// stays there. `held` (its connection permit, if any, and its place in
/// the worker's count) is released when it ends.
pub(super) fn serve_on(
    rt: &tokio::runtime::Handle,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    ctx: &Arc<Context>,
    held: (Option<OwnedSemaphorePermit>, Slot),
) {
    let ctx2 = Arc::clone(ctx);
    // Boxed: the future is ~2.4 KB, and tokio moves a task's stage (the
    // future, then its output) whole, three times over a task's life;
    // a boxed one is moved once, into its box.
    rt.spawn(Box::pin(ctx.tracker.track_future(async move {
        serve_std(stream, peer, service, &ctx2).await;
        drop(held);
    })));
}

/// Reads an accepted socket's first bytes, registers it with the current
/// runtime and serves it.
///
/// The first bytes are read before the socket is registered, as HAProxy
/// does (`session_accept_fd`, then the stream's first `recv`, before the
/// fd is polled): a client usually sends its request right after the
/// handshake, so it is queued by now, and a socket registered with an
/// empty queue reports nothing stale (registered first, the queued
/// request is an event the next event-loop turn delivers after the read
/// took it, and the connection would wait that turn for the request).
/// Not with a PROXY header to send (it reads the first bytes itself, to
/// send them with the header) nor in `splice` mode (every byte through a
/// pipe); the PROXY setting is read once, so both decisions agree.
async fn serve_std(
    stream: std::net::TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    ctx: &Context,
) {
    let header = service.proxy_protocol();
    let first = if header.is_none() && ctx.config.copy_mode != CopyMode::Splice {
        first_bytes(&stream)
    } else {
        Ok(Vec::new())
    };
    match TcpStream::from_std(stream) {
        Ok(stream) => serve(stream, peer, service, ctx, header, first).await,
        Err(e) => {
            tracing::debug!(service = %service.name, error = %e, "cannot register a connection")
        }
    }
}

/// Serves one accepted client connection to its end: `header` is the
/// PROXY header to send, `first` what was read from the client already
/// (an error: the client reset before its first byte, and no backend
/// needs to hear of it).
async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    ctx: &Context,
    header: Option<ProxyProtocol>,
    first: io::Result<Vec<u8>>,
) {
    let stats = &service.stats;
    stats.accepted.fetch_add(1, Relaxed);
    stats.active.fetch_add(1, Relaxed);
    match first {
        Ok(first) => dial_and_drive(client, peer, &service, ctx, header, &first).await,
        Err(e) => {
            tracing::debug!(service = %service.name, peer = %peer, error = %e, "client connection failed before its first byte")
        }
    }
    stats.active.fetch_sub(1, Relaxed);
    ctx.closed_since_release.fetch_add(1, Relaxed);
}

/// Dials a backend for `client`, sends it the PROXY header and `first`,
/// and drives the connection; a client no backend takes is reset.
async fn dial_and_drive(
    client: TcpStream,
    peer: SocketAddr,
    service: &Arc<Service>,
    ctx: &Context,
    header: Option<ProxyProtocol>,
    first: &[u8],
) {
    let stats = &service.stats;
    // A PROXY header goes first: no client byte may leave with the dial.
    let early = if header.is_some() { &[][..] } else { first };
    let dialed = connect::dial(
        service.balancer_for(&client, peer.ip(), &ctx.origin),
        stats,
        peer.ip(),
        &ctx.config.dial_timeouts,
        early,
    )
    .await;
    match dialed {
        Ok(connect::Dialed {
            stream,
            backend,
            sent: sent_early,
        }) => {
            // A new socket has keepalive off: only turning it on costs a syscall.
            if let Some(k) = &ctx.config.tcp_keepalive {
                if let Err(e) = set_keepalive(&stream, Some(k)) {
                    tracing::debug!(service = %service.name, error = %e, "cannot set TCP keepalive on the backend socket");
                }
            }
            let conn = Connection::new(client, stream, peer, Arc::clone(service), backend);
            // The PROXY header, when the service wants one, precedes any client byte.
            let sent = match proxy_protocol::send(header, &conn).await {
                Ok(()) => conn.send_first(first, sent_early).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(()) => drive(conn, ctx).await,
                Err(e) => {
                    tracing::debug!(service = %service.name, backend = %conn.endpoint.addr, error = %e, "connection ended with an error")
                }
            }
        }
        Err(e) => {
            stats.failed.fetch_add(1, Relaxed);
            let now = now_ms();
            let last = stats.last_fail_log_ms.load(Relaxed);
            if (last == 0 || now.saturating_sub(last) >= FAIL_LOG_INTERVAL_MS)
                && stats
                    .last_fail_log_ms
                    .compare_exchange(last, now, Relaxed, Relaxed)
                    .is_ok()
            {
                tracing::warn!(service = %service.name, error = %e, failed_total = stats.failed.load(Relaxed), "no backend reachable; closing client connections (logged at most every 10s)");
            }
            // Reset rather than FIN: the client must not mistake this for an empty answer.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        }
    }
}

/// Runs a connection to its end, or until a hand-over parks it and takes
/// it (when no hand-over collects it any more, it runs on here).
async fn drive(conn: Connection, ctx: &Context) {
    let config = &ctx.config;
    let (mode, fin) = (config.copy_mode, config.tcp_fin_timeout);
    let r = match conn.run_parkable(mode, &ctx.pipes, fin, &ctx.park).await {
        Ok(Stopped::Done) => return,
        Ok(Stopped::Parked) => match ctx.hand_over(conn) {
            Ok(()) => return,
            Err(conn) => {
                if let Err(e) = conn.run(mode, &ctx.pipes, fin).await {
                    ended_with(&conn, &e);
                }
                return;
            }
        },
        Err(e) => e,
    };
    ended_with(&conn, &r);
}

/// Notes a connection that ended with an error: `ETIMEDOUT` on an
/// established connection is TCP keepalive (or retransmission) giving up
/// on a peer that vanished, counted on the service.
fn ended_with(conn: &Connection, e: &io::Error) {
    if e.raw_os_error() == Some(libc::ETIMEDOUT) {
        conn.service.stats.peers_dead.fetch_add(1, Relaxed);
        tracing::debug!(service = %conn.service.name, backend = %conn.endpoint.addr, peer = %conn.peer, "peer found dead (keepalive or retransmission timeout); connection closed");
    } else {
        tracing::debug!(service = %conn.service.name, backend = %conn.endpoint.addr, error = %e, "connection ended with an error");
    }
}

/// Runs a connection handed over by the previous process (or given back
/// by a failed hand-over) on one of the workers: both sockets, its
/// service port and endpoint, its flows as they were. It counts in the
/// service's open connections and takes a `--max-connections` permit if
/// one is free (it is served either way).
#[allow(clippy::too_many_arguments)]
pub fn resume(
    client: std::net::TcpStream,
    backend: std::net::TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    endpoint: Arc<super::balancer::Backend>,
    up: Flow,
    down: Flow,
    ctx: &Arc<Context>,
) -> io::Result<()> {
    client.set_nonblocking(true)?;
    backend.set_nonblocking(true)?;
    let runtimes = ctx.runtimes()?;
    let rt = &runtimes[usize::from(peer.port()) % runtimes.len()];
    let (client, backend) = {
        let _entered = rt.enter();
        (TcpStream::from_std(client)?, TcpStream::from_std(backend)?)
    };
    let permit = ctx
        .fds
        .connections()
        .and_then(|l| Arc::clone(l).try_acquire_owned().ok());
    let conn = Connection::resume(
        client,
        backend,
        peer,
        Arc::clone(&service),
        endpoint,
        up,
        down,
    );
    service.stats.active.fetch_add(1, Relaxed);
    let ctx2 = Arc::clone(ctx);
    rt.spawn(ctx.tracker.track_future(async move {
        drive(conn, &ctx2).await;
        drop(permit);
        service.stats.active.fetch_sub(1, Relaxed);
        ctx2.closed_since_release.fetch_add(1, Relaxed);
    }));
    Ok(())
}

/// Runs `conn` to its end on a worker (a parked connection no hand-over
/// could take): it counts in the service's open connections again.
pub fn run_here(conn: Connection, ctx: &Arc<Context>) {
    let rt = match &ctx.workers {
        Some(w) => w.handles().first().cloned(),
        None => tokio::runtime::Handle::try_current().ok(),
    };
    let Some(rt) = rt else {
        return; // no runtime left: the connection closes
    };
    let service = Arc::clone(&conn.service);
    service.stats.active.fetch_add(1, Relaxed);
    let ctx2 = Arc::clone(ctx);
    rt.spawn(ctx.tracker.track_future(async move {
        let config = &ctx2.config;
        if let Err(e) = conn
            .run(config.copy_mode, &ctx2.pipes, config.tcp_fin_timeout)
            .await
        {
            ended_with(&conn, &e);
        }
        drop(conn);
        service.stats.active.fetch_sub(1, Relaxed);
    }));
}
