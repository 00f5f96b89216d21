//! The TCP listener of one service port and the life of each connection:
//! accept → pick → dial with retry (in the connection's own task, so a slow
//! backend never delays accepting) → move bytes until both sides are done.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::balancer::now_ms;
use super::conn::{Connection, Flow, Stopped};
use super::{connect, proxy_protocol, Context, Service};

/// Listen backlog: large, as connections are accepted and dialed
/// concurrently; the kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: i32 = 4096;

/// Minimum interval between two "no backend" log lines of one service.
const FAIL_LOG_INTERVAL_MS: u64 = 10_000;

/// Binds a listening socket (SO_REUSEADDR, SO_REUSEPORT, TCP_NODELAY,
/// non-blocking) for a service port; [`spawn`] binds one more to the same
/// port per extra worker.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit it: one setsockopt less per connection.
    socket.set_tcp_nodelay(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// A running listener; dropping it stops accepting (open connections go on).
#[derive(Debug)]
pub struct ListenerHandle {
    /// The port it listens on.
    pub port: u16,
    /// Duplicates of its sockets, for a hand-over to the next process.
    sockets: Vec<std::os::fd::OwnedFd>,
    stop: CancellationToken,
}

impl ListenerHandle {
    /// New duplicates of every socket of this port (one per accept loop).
    pub fn duplicate(&self) -> io::Result<Vec<std::os::fd::OwnedFd>> {
        self.sockets.iter().map(|s| s.try_clone()).collect()
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts accepting for `service` on `listeners` (bound to one port; from
/// [`bind`], or handed over by the previous process): one accept loop per
/// socket, spread over the worker threads, and one more socket bound to
/// the same port for each worker left without one, so connections stay on
/// the thread that accepted them. Every socket handed over keeps its
/// accept loop, even beyond the worker count: closing one would reset the
/// connections in its accept queue. Without workers, the loops run on the
/// current runtime.
pub fn spawn(
    listeners: Vec<std::net::TcpListener>,
    service: Arc<Service>,
    ctx: Arc<Context>,
) -> io::Result<ListenerHandle> {
    let Some(first) = listeners.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no socket"));
    };
    let local = first.local_addr()?;
    let stop = ctx.shutdown.child_token();
    let runtimes = runtimes(&ctx)?;
    let mut sockets = listeners;
    while sockets.len() < runtimes.len() {
        sockets.push(bind(local)?);
    }
    let mut dups = Vec::with_capacity(sockets.len());
    for (i, socket) in sockets.into_iter().enumerate() {
        let rt = &runtimes[i % runtimes.len()];
        dups.push(std::os::fd::OwnedFd::from(socket.try_clone()?));
        // Registered with the worker's own event loop.
        let socket = {
            let _entered = rt.enter();
            TcpListener::from_std(socket)?
        };
        rt.spawn(accept_loop(
            socket,
            Arc::clone(&service),
            Arc::clone(&ctx),
            stop.clone(),
        ));
    }
    Ok(ListenerHandle {
        port: local.port(),
        sockets: dups,
        stop,
    })
}

/// The runtimes TCP connections run on: the workers, or without them the
/// current runtime.
fn runtimes(ctx: &Context) -> io::Result<Vec<tokio::runtime::Handle>> {
    match &ctx.workers {
        Some(w) => Ok(w.handles().to_vec()),
        None => Ok(vec![
            tokio::runtime::Handle::try_current().map_err(io::Error::other)?
        ]),
    }
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<Service>,
    ctx: Arc<Context>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        // With --max-connections, hold a permit before accepting: at the
        // limit, clients wait in the backlog instead of being accepted.
        let permit = match &ctx.connection_limit {
            None => None,
            Some(limit) => {
                if limit.available_permits() == 0 {
                    ctx.limit_waits.fetch_add(1, Relaxed);
                }
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    p = Arc::clone(limit).acquire_owned() => match p {
                        Ok(p) => Some(p),
                        Err(_) => break, // closed: shutting down
                    },
                }
            }
        };
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let (service, ctx2) = (Arc::clone(&service), Arc::clone(&ctx));
                ctx.tracker.spawn(async move {
                    serve(stream, peer, service, ctx2).await;
                    drop(permit);
                });
            }
            // Out of fds or memory: back off instead of spinning (upstream
            // panicked here).
            Err(e) if super::is_local_exhaustion(&e) => {
                service.stats.accept_errors.fetch_add(1, Relaxed);
                tracing::warn!(service = %service.name, error = %e, backoff = ?backoff, "accept failed: out of resources, backing off");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            // ECONNABORTED and friends: the client gave up; nothing to do.
            Err(e) => tracing::debug!(service = %service.name, error = %e, "accept failed"),
        }
    }
    tracing::debug!(service = %service.name, "listener closed");
}

/// Serves one accepted client connection to its end.
async fn serve(client: TcpStream, peer: SocketAddr, service: Arc<Service>, ctx: Arc<Context>) {
    let stats = &service.stats;
    stats.accepted.fetch_add(1, Relaxed);
    stats.active.fetch_add(1, Relaxed);
    let dialed = connect::dial(
        service.balancer_for(&client),
        stats,
        peer.ip(),
        &ctx.config.dial_timeouts,
    )
    .await;
    match dialed {
        Ok(connect::Dialed { stream, backend }) => {
            let conn = Connection::new(client, stream, peer, Arc::clone(&service), backend);
            // The PROXY header, when the service wants one, precedes any client byte.
            match proxy_protocol::send(service.proxy_protocol(), &conn).await {
                Ok(()) => drive(conn, &ctx).await,
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
    stats.active.fetch_sub(1, Relaxed);
    ctx.closed_since_release.fetch_add(1, Relaxed);
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
                let r = conn.run(mode, &ctx.pipes, fin).await;
                if let Err(e) = r {
                    tracing::debug!(service = %conn.service.name, backend = %conn.endpoint.addr, error = %e, "connection ended with an error");
                }
                return;
            }
        },
        Err(e) => e,
    };
    tracing::debug!(service = %conn.service.name, backend = %conn.endpoint.addr, error = %r, "connection ended with an error");
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
    let runtimes = runtimes(ctx)?;
    let rt = &runtimes[usize::from(peer.port()) % runtimes.len()];
    let (client, backend) = {
        let _entered = rt.enter();
        (TcpStream::from_std(client)?, TcpStream::from_std(backend)?)
    };
    let permit = ctx
        .connection_limit
        .as_ref()
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
            tracing::debug!(service = %service.name, error = %e, "connection ended with an error");
        }
        drop(conn);
        service.stats.active.fetch_sub(1, Relaxed);
    }));
}
