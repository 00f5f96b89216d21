//! The listening sockets of a service port, and who owns them.
//!
//! A port starts with **one** socket, living on one worker (ports are
//! dealt out round-robin), whatever the worker count: 10,000 idle Service
//! ports hold 10,000 fds. Once the port accepts [`GROW_ACCEPTS`]
//! connections within [`GROW_WINDOW`] it **grows**: one more
//! `SO_REUSEPORT` socket per other worker, each with its own accept loop,
//! so the kernel spreads new connections. Either way, each accepted
//! connection runs on the worker [`Dealer`] picks: the accepting one
//! unless another holds fewer of the port's connections (HAProxy's rule),
//! so even a few long connections use every worker and a skewed hash
//! does not load one. A grown port stays grown until it is removed:
//! closing a `SO_REUSEPORT` socket would reset the connections in its
//! accept queue.
//!
//! No duplicate of a socket is kept for the hand-over: an export shares
//! the sockets ([`SharedFd`]) and the kernel copies them into the message.
//! Every socket is counted in the fd budget.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::carry::SharedFd;
use super::config::Keepalive;
use super::dealer::{Dealer, Slot};
use super::fds::FdLease;
use super::{origin, tcp, udp, Context, Service};
use crate::model::Protocol;

/// Accepts within [`GROW_WINDOW`] that make a port grow a socket per worker.
pub const GROW_ACCEPTS: u32 = 64;

/// The window [`GROW_ACCEPTS`] are counted in.
pub const GROW_WINDOW: Duration = Duration::from_secs(1);

/// Listen backlog: large, as connections are accepted and dialed
/// concurrently; the kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: i32 = 4096;

/// Where listeners bind for `--bind-address`: `0.0.0.0` (the default, and
/// kubeadm's `bindAddress`) means every address of both families, so `::`
/// with IPv4 mapped in, when the kernel has IPv6; any other address is
/// itself.
pub fn listen_address(bind: std::net::IpAddr) -> std::net::IpAddr {
    let any6 = std::net::IpAddr::from([0u16; 8]);
    if bind != std::net::IpAddr::from([0u8; 4]) {
        return bind;
    }
    let dual =
        socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).and_then(|s| {
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::new(any6, 0).into())
        });
    if dual.is_ok() {
        any6
    } else {
        bind
    }
}

/// Binds a TCP listening socket (SO_REUSEADDR, SO_REUSEPORT, TCP_NODELAY,
/// non-blocking) for a service port; a busy port binds one more to the
/// same port per extra worker.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
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

/// Whether no other socket serves `addr`, by a probe closed at once. TCP:
/// a bind with `SO_REUSEADDR` and without `SO_REUSEPORT` fails with
/// `EADDRINUSE` on any listener there, whatever its options, and passes
/// over connections in `TIME_WAIT` or still open on the port (a
/// predecessor's). UDP: a plain bind fails on any socket bound there.
fn port_is_free(proto: Protocol, addr: SocketAddr) -> io::Result<()> {
    let domain = socket2::Domain::for_address(addr);
    let probe = if proto == Protocol::Udp {
        socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?
    } else {
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s
    };
    if addr.is_ipv6() {
        probe.set_only_v6(false)?;
    }
    probe.bind(&addr.into())
}

/// Sets (or clears) TCP keepalive on a socket. On a listening socket,
/// accepted connections inherit it (Linux copies the options and starts
/// their keepalive timer, `tcp_create_openreq_child`): no syscall per
/// client socket.
pub fn set_keepalive(s: impl AsFd, keepalive: Option<&Keepalive>) -> io::Result<()> {
    let s = socket2::SockRef::from(&s);
    match keepalive {
        Some(k) => s.set_tcp_keepalive(&k.socket2()),
        None => s.set_keepalive(false),
    }
}

/// A bound, not yet running, listening socket (TCP: all the sockets of
/// one port) with its fds in the budget.
pub(super) struct Bound {
    sockets: Sockets,
    lease: FdLease,
}

enum Sockets {
    Tcp(Vec<std::net::TcpListener>),
    Udp(std::net::UdpSocket),
}

impl Bound {
    /// Binds one socket for `proto` at `addr`, its fd taken from `lease`.
    /// A port another socket holds is refused (`EADDRINUSE`), even where
    /// our socket options would let us share it (another `SO_REUSEPORT`
    /// group of our uid, a UDP socket with `SO_REUSEADDR`): sharing would
    /// split its traffic with another proxier, or a predecessor.
    pub(super) fn bind(proto: Protocol, addr: SocketAddr, lease: FdLease) -> io::Result<Self> {
        port_is_free(proto, addr)?;
        let sockets = match proto {
            Protocol::Udp => Sockets::Udp(udp::bind(addr)?),
            _ => Sockets::Tcp(vec![bind_tcp(addr)?]),
        };
        Ok(Self { sockets, lease })
    }

    /// Sockets handed over by the previous process (already open: their
    /// fds are counted in `lease`).
    pub(super) fn inherited_tcp(sockets: Vec<std::net::TcpListener>, lease: FdLease) -> Self {
        Self {
            sockets: Sockets::Tcp(sockets),
            lease,
        }
    }

    /// A UDP socket handed over by the previous process.
    pub(super) fn inherited_udp(socket: std::net::UdpSocket, lease: FdLease) -> Self {
        Self {
            sockets: Sockets::Udp(socket),
            lease,
        }
    }

    /// The port it is bound to.
    pub(super) fn port(&self) -> io::Result<u16> {
        match &self.sockets {
            Sockets::Tcp(l) => match l.first() {
                Some(l) => l.local_addr().map(|a| a.port()),
                None => Err(io::ErrorKind::InvalidInput.into()),
            },
            Sockets::Udp(l) => l.local_addr().map(|a| a.port()),
        }
    }

    /// Starts serving `service` on it.
    pub(super) fn spawn(self, service: Arc<Service>, ctx: Arc<Context>) -> io::Result<Listener> {
        match self.sockets {
            Sockets::Tcp(l) => spawn_tcp(l, self.lease, service, ctx).map(Listener::Tcp),
            Sockets::Udp(l) => udp::spawn(l, self.lease, service, ctx).map(Listener::Udp),
        }
    }
}

/// A running listener of either protocol; dropping it stops it.
#[derive(Debug)]
pub(super) enum Listener {
    Tcp(TcpListenerHandle),
    Udp(udp::UdpHandle),
}

impl Listener {
    /// The port it listens on.
    pub(super) fn port(&self) -> u16 {
        match self {
            Self::Tcp(h) => h.port,
            Self::Udp(h) => h.port,
        }
    }

    /// Refuses clients while the port has no endpoint anywhere (TCP: the
    /// sockets stop listening), or serves again.
    pub(super) fn set_refusing(&self, refusing: bool) {
        match self {
            Self::Tcp(h) => h.set_paused(refusing),
            Self::Udp(_) => {} // refused by the rules' REJECT only
        }
    }

    /// Its sockets, shared, for a hand-over.
    pub(super) fn sockets(&self) -> Vec<SharedFd> {
        match self {
            Self::Tcp(h) => h.sockets(),
            Self::Udp(h) => vec![h.socket()],
        }
    }
}

/// A running TCP listener; dropping it stops accepting (open connections
/// go on).
#[derive(Debug)]
pub struct TcpListenerHandle {
    /// The port it listens on.
    pub port: u16,
    group: Arc<Group>,
}

impl TcpListenerHandle {
    /// Every socket of the port, shared (no fd is duplicated).
    pub fn sockets(&self) -> Vec<SharedFd> {
        self.group
            .lock()
            .sockets
            .iter()
            .map(|(s, _)| Arc::clone(s) as SharedFd)
            .collect()
    }

    /// Stops listening while the port has no endpoints (clients are
    /// refused), or listens again.
    pub fn set_paused(&self, paused: bool) {
        self.group.set_paused(paused);
    }
}

impl Drop for TcpListenerHandle {
    fn drop(&mut self) {
        self.group.stop.cancel();
    }
}

/// The sockets of one TCP port and what their accept loops share. The
/// sockets close when the last accept loop has ended.
#[derive(Debug)]
struct Group {
    service: Arc<Service>,
    ctx: Arc<Context>,
    local: SocketAddr,
    /// The runtimes connections may run on (the workers).
    runtimes: Vec<Handle>,
    /// The runtime of the first socket.
    home: usize,
    /// Whether every worker has a socket of its own.
    grown: AtomicBool,
    /// Which worker each accepted connection runs on.
    dealer: Arc<Dealer>,
    stop: CancellationToken,
    held: Mutex<Held>,
    /// Not listening, so that the kernel refuses clients (no endpoints).
    paused: AtomicBool,
    /// Bumped at each pause and resume: an accept loop of an older
    /// generation ends (its registration may hold a stale hang-up).
    generation: AtomicUsize,
}

#[derive(Debug, Default)]
struct Held {
    /// Each socket with the worker its accept loop runs on.
    sockets: Vec<(Arc<Listening>, usize)>,
    leases: Vec<FdLease>,
}

/// A listening socket registered with one worker's event loop: readiness
/// is awaited apart from `accept`, so that a connection permit is taken
/// only once a client waits (an idle port holds no permit).
type Listening = AsyncFd<socket2::Socket>;

impl Group {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `socket` with runtime `rt` and starts its accept loop.
    fn add(self: &Arc<Self>, socket: std::net::TcpListener, rt: usize) -> io::Result<()> {
        set_keepalive(&socket, self.ctx.config.tcp_keepalive.as_ref())?;
        if self.ctx.config.detect_local.needs_interface() {
            origin::record_interface(&socket, self.local.is_ipv6())?;
        }
        let socket = socket2::Socket::from(socket);
        // A handed-over socket may come paused; listening again is harmless.
        socket.listen(BACKLOG)?;
        self.register(socket, rt)?;
        self.service.stats.sockets.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Registers a listening `socket` with runtime `rt`, holds it and
    /// starts its accept loop.
    #[allow(unsafe_code)] // tokio asks the caller to vouch for the fd
    fn register(self: &Arc<Self>, socket: socket2::Socket, rt: usize) -> io::Result<()> {
        let handle = &self.runtimes[rt];
        let listener = {
            let _entered = handle.enter();
            // SAFETY: the socket owns its fd, which stays open and the same
            // for as long as the `AsyncFd` that owns the socket.
            let registered = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) };
            Arc::new(registered.map_err(io::Error::from)?)
        };
        self.lock().sockets.push((Arc::clone(&listener), rt));
        let generation = self.generation.load(Relaxed);
        handle.spawn(accept_loop(Arc::clone(self), listener, rt, generation));
        Ok(())
    }

    /// Stops listening (`paused`: the kernel then refuses new clients
    /// with a reset, as upstream's REJECT does for a Service without
    /// endpoints; clients in the accept queue are reset too) or listens
    /// again. The sockets and their port are kept. A socket that stopped
    /// listening reports a hang-up that its registration keeps for good,
    /// so listening again registers a duplicate of it with a fresh accept
    /// loop, and the old registration ends with its loop.
    fn set_paused(self: &Arc<Self>, paused: bool) {
        if self.paused.swap(paused, Relaxed) == paused {
            return;
        }
        // Every running accept loop ends at its next wake-up.
        self.generation.fetch_add(1, Relaxed);
        let mut held = self.lock();
        if paused {
            for (s, _) in &held.sockets {
                // On a listening socket, SHUT_RD stops listening (Linux
                // `inet_shutdown` → `tcp_disconnect`); the bound port stays.
                if let Err(e) = s.get_ref().shutdown(std::net::Shutdown::Read) {
                    tracing::debug!(service = %self.service.name, error = %e, "cannot stop listening");
                }
            }
            tracing::info!(service = %self.service.name, "no endpoints: listener paused, clients are refused");
            return;
        }
        let old = std::mem::take(&mut held.sockets);
        drop(held);
        for (s, rt) in old {
            let again = s
                .get_ref()
                .listen(BACKLOG)
                .and_then(|()| s.get_ref().try_clone())
                .and_then(|dup| self.register(dup, rt));
            if let Err(e) = again {
                tracing::warn!(service = %self.service.name, error = %e, "cannot listen again");
                self.lock().sockets.push((s, rt));
            }
        }
        tracing::info!(service = %self.service.name, "endpoints again: listening");
    }

    /// One more socket per worker without one (once): the port is busy.
    fn grow(self: &Arc<Self>) {
        if self.grown.swap(true, Relaxed) {
            return;
        }
        let mut added = 0;
        // A busy port's sockets come before connection slots: room is
        // made and taken at once.
        let mut leases = self
            .ctx
            .fds
            .try_take_listeners(self.runtimes.len() - 1)
            .into_iter();
        for rt in (0..self.runtimes.len()).filter(|&rt| rt != self.home) {
            if self.stop.is_cancelled() {
                return;
            }
            let Some(lease) = leases.next() else {
                tracing::warn!(service = %self.service.name, added, "busy port: the fd budget holds no more sockets for it; it stays on fewer workers");
                break;
            };
            let bound = bind_tcp(self.local).and_then(|s| self.add(s, rt));
            if let Err(e) = bound {
                tracing::warn!(service = %self.service.name, error = %e, "busy port: cannot add a socket for a worker");
                break;
            }
            self.lock().leases.push(lease);
            added += 1;
        }
        tracing::debug!(service = %self.service.name, added, "busy port: grown to a listening socket per worker");
    }

    /// The runtime a connection accepted on runtime `here` runs on, and
    /// its place in that worker's count ([`Dealer::deal`]).
    fn deal(&self, here: usize) -> (&Handle, Slot) {
        let slot = self.dealer.deal(here);
        (&self.runtimes[slot.worker()], slot)
    }
}

impl Drop for Group {
    /// The sockets close here, after the last accept loop.
    fn drop(&mut self) {
        let n = self.lock().sockets.len() as u64;
        self.service.stats.sockets.fetch_sub(n, Relaxed);
    }
}

/// Starts accepting for `service` on `listeners` (bound to one port: one
/// from [`bind_tcp`], or all those handed over by the previous process,
/// each of which keeps an accept loop: closing one would reset the
/// connections in its queue).
fn spawn_tcp(
    listeners: Vec<std::net::TcpListener>,
    lease: FdLease,
    service: Arc<Service>,
    ctx: Arc<Context>,
) -> io::Result<TcpListenerHandle> {
    let Some(first) = listeners.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no socket"));
    };
    let local = first.local_addr()?;
    let runtimes = ctx.runtimes()?;
    let home = ctx.next_home.fetch_add(1, Relaxed) % runtimes.len();
    let grown = runtimes.len() == 1 || listeners.len() > 1;
    let dealer = Dealer::new(runtimes.len());
    service.stats.dealer.store(Some(Arc::clone(&dealer)));
    let group = Arc::new(Group {
        stop: ctx.shutdown.child_token(),
        service,
        ctx,
        local,
        home,
        grown: AtomicBool::new(grown),
        dealer,
        held: Mutex::new(Held {
            sockets: Vec::new(),
            leases: vec![lease],
        }),
        runtimes,
        paused: AtomicBool::new(false),
        generation: AtomicUsize::new(0),
    });
    let n = group.runtimes.len();
    for (i, socket) in listeners.into_iter().enumerate() {
        if let Err(e) = group.add(socket, (home + i) % n) {
            group.stop.cancel();
            return Err(e);
        }
    }
    Ok(TcpListenerHandle {
        port: local.port(),
        group,
    })
}

/// Counts accepts in a window, to tell a busy port.
struct Rate {
    since: Instant,
    accepts: u32,
}

impl Rate {
    /// Counts one accept; true when the window holds [`GROW_ACCEPTS`].
    fn busy(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.since) > GROW_WINDOW {
            self.since = now;
            self.accepts = 0;
        }
        self.accepts += 1;
        self.accepts >= GROW_ACCEPTS
    }
}

/// Accepts on one socket of `group` (on runtime `here`) until stopped.
///
/// With a connection limit, a permit is taken once a client waits and
/// before it is accepted: at the limit, clients wait in the backlog
/// instead of being accepted, and an idle port holds no permit (10,000
/// idle ports would otherwise hold 10,000 of them).
async fn accept_loop(group: Arc<Group>, listener: Arc<Listening>, here: usize, generation: usize) {
    let (service, ctx, stop) = (&group.service, &group.ctx, &group.stop);
    let mut backoff = Duration::from_millis(5);
    let mut rate = Rate {
        since: Instant::now(),
        accepts: 0,
    };
    let mut permit = None;
    // The stop is polled after the listener, so only when it has nothing:
    // polled first, at each accept, it took the token's lock twice a
    // connection (register, then drop), on a line every worker's loop of
    // this service writes; unpolled, it is dropped without the lock. A
    // stop while connections keep coming is seen by the flag. (Pinned
    // once for the loop instead, it grew every accept loop by ~125 bytes:
    // 1.2 MiB at 10,000 ports, `benches/scale.py`.)
    loop {
        if stop.is_cancelled() {
            break;
        }
        let mut ready = tokio::select! {
            biased;
            r = listener.readable() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(service = %service.name, error = %e, "listener failed");
                    break;
                }
            },
            _ = stop.cancelled() => break,
        };
        if group.generation.load(Relaxed) != generation {
            break; // paused, or listening again on a fresh registration
        }
        if permit.is_none() {
            if let Some(limit) = ctx.fds.connections() {
                permit = match Arc::clone(limit).try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        ctx.limit_waits.fetch_add(1, Relaxed);
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
            }
        }
        let accepted = match ready.try_io(|l| {
            l.get_ref()
                .accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
        }) {
            Ok(r) => r,
            Err(_would_block) => continue, // readiness cleared; the permit stays for the next
        };
        match accepted {
            Ok((socket, addr)) => {
                backoff = Duration::from_millis(5);
                let Some(peer) = addr.as_socket() else {
                    continue;
                };
                // An IPv4 client of a dual-stack socket, as itself.
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                if !group.grown.load(Relaxed) && rate.busy() {
                    group.grow();
                }
                let stream = std::net::TcpStream::from(socket);
                let permit = permit.take();
                let (rt, slot) = group.deal(here);
                tcp::serve_on(rt, stream, peer, Arc::clone(service), ctx, (permit, slot));
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
