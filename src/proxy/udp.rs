//! The UDP listener of one service port: a session per client address.
//!
//! The first datagram of a client picks a backend (same balancer: round-
//! robin, affinity, ejection) and opens a UDP socket connected to it; the
//! session's task relays the backend's replies to the client from the
//! listener's socket — from the very address the client targeted
//! (`IP_PKTINFO` / `IPV6_RECVPKTINFO`) when the listener is bound to the
//! wildcard, so conntrack can reverse a REDIRECT. A session ends after
//! `--udp-timeout` without traffic either way (a sweep task, off the receive
//! path), when its backend leaves the endpoint set, or with its listener.
//!
//! A backend that answers with ICMP port unreachable (`ECONNREFUSED` on the
//! connected socket) is ejected, the session moves to the next endpoint and
//! the client's last datagram is re-sent there once: no client waits on a
//! dead pod twice. Beyond `--udp-max-sessions`, datagrams of new clients are
//! dropped and counted; existing sessions keep working.

use std::collections::HashMap;
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::balancer::{now_ms, Backend};
use super::carry::SharedFd;
use super::connect::DialResult;
use super::fds::FdLease;
use super::origin::Origin;
use super::{Context, Service, Traffic};

/// Largest datagram relayed intact (the IPv4/IPv6 UDP maximum fits).
pub const MAX_DATAGRAM: usize = 65536;

/// Socket buffer asked for on listeners: DNS bursts must not be dropped by
/// a 4 KiB default (upstream's userspace proxy truncated at 4 KiB).
const SOCKET_BUFFER: usize = 4 << 20;

/// Binds a UDP listening socket; with a wildcard address, asks for the
/// packet-info control messages needed to reply from the right address.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(false)?;
    }
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    let s: std::net::UdpSocket = s.into();
    if addr.ip().is_unspecified() {
        if addr.is_ipv6() {
            setsockopt(&s, sockopt::Ipv6RecvPacketInfo, &true)?;
        }
        // A dual-stack socket also receives IPv4 (mapped) packets.
        let _ = setsockopt(&s, sockopt::Ipv4PacketInfo, &true);
    }
    Ok(s)
}

/// A running UDP listener; dropping it closes the listener and every session.
#[derive(Debug)]
pub struct UdpHandle {
    /// The port it listens on.
    pub port: u16,
    /// Its socket, shared with the receive loop (for a hand-over).
    socket: Arc<UdpSocket>,
    stop: CancellationToken,
}

impl UdpHandle {
    /// The listening socket, shared (not duplicated).
    pub fn socket(&self) -> SharedFd {
        Arc::clone(&self.socket) as SharedFd
    }
}

impl Drop for UdpHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The backend side of a session: a socket connected to one backend.
struct Conn {
    socket: UdpSocket,
    backend: Arc<Backend>,
}

/// One client's session.
struct Session {
    client: SocketAddr,
    /// The address the client sent to, when the listener is a wildcard.
    local: Option<IpAddr>,
    /// Which endpoint set the session draws from (and fails over within).
    traffic: Traffic,
    conn: ArcSwap<Conn>,
    /// [`now_ms`] of the last datagram either way.
    last_active: AtomicU64,
    /// The client's last datagram, re-sent once on ICMP refused.
    last_datagram: Mutex<Vec<u8>>,
    /// Whether `last_datagram` was already re-sent.
    resent: AtomicBool,
    /// Backends this session has tried.
    tried: Mutex<Vec<SocketAddr>>,
    /// Set once by [`close`], so counters drop exactly once.
    closed: AtomicBool,
    stop: CancellationToken,
    /// The session socket's fd in the budget.
    _fd: FdLease,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Arc<Session>>>>;

struct Shared {
    listener: Arc<UdpSocket>,
    /// The listener's fd in the budget.
    _fd: FdLease,
    pktinfo: bool,
    sessions: Sessions,
    service: Arc<Service>,
    ctx: Arc<Context>,
}

impl Drop for Shared {
    /// The listening socket closes here, after its tasks.
    fn drop(&mut self) {
        self.service.stats.sockets.fetch_sub(1, Relaxed);
    }
}

/// Starts the receive loop and the session sweeper of `socket`.
pub fn spawn(
    socket: std::net::UdpSocket,
    lease: FdLease,
    service: Arc<Service>,
    ctx: Arc<Context>,
) -> io::Result<UdpHandle> {
    let local = socket.local_addr()?;
    let listener = Arc::new(UdpSocket::from_std(socket)?);
    let stop = ctx.shutdown.child_token();
    let shared = Arc::new(Shared {
        listener: Arc::clone(&listener),
        _fd: lease,
        pktinfo: local.ip().is_unspecified(),
        sessions: Sessions::default(),
        service,
        ctx,
    });
    shared.service.stats.sockets.fetch_add(1, Relaxed);
    tokio::spawn(sweep(Arc::clone(&shared), stop.clone()));
    tokio::spawn(receive_loop(shared, stop.clone()));
    Ok(UdpHandle {
        port: local.port(),
        socket: listener,
        stop,
    })
}

/// Receives one datagram: (length, client, address it was sent to).
async fn receive(s: &Shared, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    if !s.pktinfo {
        let (n, from) = s.listener.recv_from(buf).await?;
        return Ok((n, from, None));
    }
    let fd = s.listener.as_raw_fd();
    s.listener
        .async_io(Interest::READABLE, || {
            let mut cmsg = nix::cmsg_space!(libc::in_pktinfo, libc::in6_pktinfo);
            let mut iov = [IoSliceMut::new(buf)];
            let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
                .map_err(io::Error::from)?;
            let mut local = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::Ipv4PacketInfo(i) => {
                            local =
                                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(i.ipi_addr.s_addr))))
                        }
                        ControlMessageOwned::Ipv6PacketInfo(i) => {
                            local = Some(IpAddr::from(i.ipi6_addr.s6_addr))
                        }
                        _ => {}
                    }
                }
            }
            let from = msg
                .address
                .and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                        .or_else(|| {
                            a.as_sockaddr_in6()
                                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                        })
                })
                .ok_or_else(|| io::Error::other("datagram without a source address"))?;
            Ok((msg.bytes, from, local))
        })
        .await
}

/// Sends a reply to the client, from the address it targeted if known.
async fn reply(s: &Shared, data: &[u8], to: SocketAddr, from: Option<IpAddr>) -> io::Result<usize> {
    let Some(local) = from.filter(|_| s.pktinfo) else {
        return s.listener.send_to(data, to).await;
    };
    // An IPv4 client of a dual-stack socket has a mapped IPv6 address: its
    // reply takes the mapped source in `IPV6_PKTINFO` (the kernel sends it
    // as IPv4). Without it the routing's source answers, which conntrack
    // cannot match to a REDIRECT to loopback (the node's own clients).
    let local = match (local, to) {
        (IpAddr::V4(ip), SocketAddr::V6(_)) => IpAddr::V6(ip.to_ipv6_mapped()),
        (local, _) => local,
    };
    let fd = s.listener.as_raw_fd();
    let dest = SockaddrStorage::from(to);
    s.listener
        .async_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(data)];
            let sent = match local {
                IpAddr::V4(ip) if to.is_ipv4() => {
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(ip).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    sendmsg(
                        fd,
                        &iov,
                        &[ControlMessage::Ipv4PacketInfo(&info)],
                        MsgFlags::empty(),
                        Some(&dest),
                    )
                }
                IpAddr::V6(ip) => {
                    let info = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: ip.octets(),
                        },
                        ipi6_ifindex: 0,
                    };
                    sendmsg(
                        fd,
                        &iov,
                        &[ControlMessage::Ipv6PacketInfo(&info)],
                        MsgFlags::empty(),
                        Some(&dest),
                    )
                }
                IpAddr::V4(_) => sendmsg(fd, &iov, &[], MsgFlags::empty(), Some(&dest)),
            };
            sent.map_err(io::Error::from)
        })
        .await
}

/// A UDP socket connected to `backend`.
async fn connect(backend: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if backend.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(backend).await?;
    Ok(socket)
}

/// Sends to the backend without holding up the receive loop for long: a
/// socket not yet known writable (new) or momentarily full gets a short wait,
/// then the datagram is dropped, as UDP may.
async fn send_to_backend(socket: &UdpSocket, data: &[u8]) -> io::Result<usize> {
    match socket.try_send(data) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            tokio::time::timeout(Duration::from_millis(50), socket.send(data))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::WouldBlock.into()))
        }
        r => r,
    }
}

fn is_refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECONNREFUSED)
}

async fn receive_loop(s: Arc<Shared>, stop: CancellationToken) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let stats = &s.service.stats;
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = receive(&s, &mut buf) => r,
        };
        let (n, client, local) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(service = %s.service.name, error = %e, "udp receive failed");
                continue;
            }
        };
        stats.datagrams_in.fetch_add(1, Relaxed);
        let existing = s
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client)
            .cloned();
        let session = match existing {
            Some(session) => session,
            None => match open_session(&s, client, local, &stop).await {
                Some(session) => session,
                None => continue,
            },
        };
        session.last_active.store(now_ms(), Relaxed);
        {
            let mut last = session
                .last_datagram
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            last.clear();
            last.extend_from_slice(&buf[..n]);
        }
        session.resent.store(false, Relaxed);
        let conn = session.conn.load_full();
        match send_to_backend(&conn.socket, &buf[..n]).await {
            Ok(m) => {
                stats.bytes_in.fetch_add(m as u64, Relaxed);
                conn.backend.bytes_in.fetch_add(m as u64, Relaxed);
            }
            // An earlier datagram drew ICMP port unreachable: move on.
            Err(e) if is_refused(&e) => failover(&s, &session, &conn).await,
            // Buffer full: UDP may drop, the client retries.
            Err(e) => {
                tracing::debug!(service = %s.service.name, error = %e, "udp send to backend failed")
            }
        }
    }
    // Listener closed: every session ends with it.
    let sessions: Vec<_> = s
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .collect();
    for (_, session) in sessions {
        close(&s, &session);
    }
}

/// The kind of a new UDP client's traffic. NAT hides which address it
/// dialled (`SO_ORIGINAL_DST` is TCP only), so its source decides: this
/// node's pods and the host send ClusterIP traffic (internal), others
/// external traffic. Exact unless `internalTrafficPolicy: Local` meets
/// external traffic from the node, or ClusterIPs are routed from outside.
/// The interface modes of `--detect-local-mode` are not asked here.
fn traffic_of(service: &Service, client: IpAddr, origin: &Origin) -> Traffic {
    if service.routing().one_set() {
        return Traffic::Internal;
    }
    if origin.is_local(client, || None) {
        Traffic::Internal
    } else {
        Traffic::External
    }
}

async fn open_session(
    s: &Arc<Shared>,
    client: SocketAddr,
    local: Option<IpAddr>,
    stop: &CancellationToken,
) -> Option<Arc<Session>> {
    let stats = &s.service.stats;
    let len = s.sessions.lock().unwrap_or_else(|e| e.into_inner()).len();
    if len >= s.ctx.config.udp_max_sessions {
        stats.sessions_dropped.fetch_add(1, Relaxed);
        return None;
    }
    let Some(fd) = s.ctx.fds.try_take(1) else {
        // The fd budget is spent: like the session cap, new clients wait.
        stats.sessions_dropped.fetch_add(1, Relaxed);
        return None;
    };
    let traffic = traffic_of(&s.service, client.ip(), &s.ctx.origin);
    let balancer = s.service.balancer_of(traffic);
    let mut tried = Vec::new();
    let conn = loop {
        let Some(backend) = balancer.pick(client.ip(), &tried) else {
            stats.failed.fetch_add(1, Relaxed);
            return None;
        };
        if tried.contains(&backend.addr) {
            stats.failed.fetch_add(1, Relaxed);
            return None;
        }
        match connect(backend.addr).await {
            Ok(socket) => break Conn { socket, backend },
            Err(e) => {
                stats.count_dial(DialResult::Other);
                tracing::debug!(backend = %backend.addr, error = %e, "udp connect failed");
                tried.push(backend.addr);
            }
        }
    };
    conn.backend.active.fetch_add(1, Relaxed);
    conn.backend.total.fetch_add(1, Relaxed);
    stats.accepted.fetch_add(1, Relaxed);
    stats.active.fetch_add(1, Relaxed);
    let session = Arc::new(Session {
        client,
        local,
        traffic,
        tried: Mutex::new(vec![conn.backend.addr]),
        conn: ArcSwap::from_pointee(conn),
        last_active: AtomicU64::new(now_ms()),
        last_datagram: Mutex::new(Vec::new()),
        resent: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        stop: stop.child_token(),
        _fd: fd,
    });
    s.sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(client, Arc::clone(&session));
    tokio::spawn(relay_replies(Arc::clone(s), Arc::clone(&session)));
    Some(session)
}

/// Ends a session: its task stops, its socket closes, counters follow.
fn close(s: &Shared, session: &Session) {
    if !session.closed.swap(true, Relaxed) {
        session.stop.cancel();
        s.service.stats.active.fetch_sub(1, Relaxed);
        session.conn.load().backend.active.fetch_sub(1, Relaxed);
    }
}

fn remove(s: &Shared, session: &Arc<Session>) {
    let mut map = s.sessions.lock().unwrap_or_else(|e| e.into_inner());
    if map
        .get(&session.client)
        .is_some_and(|cur| Arc::ptr_eq(cur, session))
    {
        map.remove(&session.client);
    }
    drop(map);
    close(s, session);
}

/// The backend of `session` refused: eject it, move the session to the next
/// endpoint not yet tried and re-send the client's last datagram there once;
/// with none left, end the session (the client's next datagram starts over).
async fn failover(s: &Arc<Shared>, session: &Arc<Session>, dead: &Arc<Conn>) {
    let stats = &s.service.stats;
    if !Arc::ptr_eq(&session.conn.load_full(), dead) {
        return; // already moved by the other task
    }
    stats.count_dial(DialResult::Refused);
    s.service.balancer.report_failure(&dead.backend);
    let tried = session
        .tried
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let next = s
        .service
        .balancer_of(session.traffic)
        .pick(session.client.ip(), &tried)
        .filter(|b| !tried.contains(&b.addr));
    let Some(backend) = next else {
        remove(s, session);
        return;
    };
    let socket = match connect(backend.addr).await {
        Ok(socket) => socket,
        Err(_) => {
            remove(s, session);
            return;
        }
    };
    stats.retries.fetch_add(1, Relaxed);
    session
        .tried
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(backend.addr);
    dead.backend.active.fetch_sub(1, Relaxed);
    backend.active.fetch_add(1, Relaxed);
    backend.total.fetch_add(1, Relaxed);
    tracing::debug!(service = %s.service.name, from = %dead.backend.addr, to = %backend.addr, "udp backend refused; session moved");
    let new = Arc::new(Conn { socket, backend });
    session.conn.store(Arc::clone(&new));
    if !session.resent.swap(true, Relaxed) {
        let last = session
            .last_datagram
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !last.is_empty() && send_to_backend(&new.socket, &last).await.is_ok() {
            stats.bytes_in.fetch_add(last.len() as u64, Relaxed);
            new.backend.bytes_in.fetch_add(last.len() as u64, Relaxed);
        }
    }
}

/// Relays the backend's replies to the client until the session ends.
async fn relay_replies(s: Arc<Shared>, session: Arc<Session>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let stats = &s.service.stats;
    loop {
        let conn = session.conn.load_full();
        let r = tokio::select! {
            biased;
            _ = session.stop.cancelled() => return,
            r = conn.socket.recv(&mut buf) => r,
        };
        match r {
            Ok(n) => {
                s.service.balancer.report_success(&conn.backend);
                session.last_active.store(now_ms(), Relaxed);
                match reply(&s, &buf[..n], session.client, session.local).await {
                    Ok(m) => {
                        stats.datagrams_out.fetch_add(1, Relaxed);
                        stats.bytes_out.fetch_add(m as u64, Relaxed);
                        conn.backend.bytes_out.fetch_add(m as u64, Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!(service = %s.service.name, error = %e, "udp reply failed")
                    }
                }
            }
            Err(e) if is_refused(&e) => {
                failover(&s, &session, &conn).await;
                if session.closed.load(Relaxed) {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(service = %s.service.name, error = %e, "udp receive from backend failed");
                remove(&s, &session);
                return;
            }
        }
    }
}

/// Expires idle sessions and those whose backend left the endpoint set.
async fn sweep(s: Arc<Shared>, stop: CancellationToken) {
    let timeout = s.ctx.config.udp_timeout;
    let every = (timeout / 2).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let idle_ms = timeout.as_millis() as u64;
        let live: Vec<SocketAddr> = s
            .service
            .balancer
            .endpoints()
            .iter()
            .map(|(e, _)| e.addr)
            .collect();
        let expired: Vec<(Arc<Session>, bool)> = {
            let mut map = s.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let mut out = Vec::new();
            map.retain(|_, session| {
                let idle = now.saturating_sub(session.last_active.load(Relaxed)) > idle_ms;
                let gone = !live.contains(&session.conn.load().backend.addr);
                if idle || gone {
                    out.push((Arc::clone(session), idle));
                }
                !(idle || gone)
            });
            out
        };
        for (session, idle) in expired {
            if idle {
                s.service.stats.sessions_expired.fetch_add(1, Relaxed);
            }
            close(&s, &session);
        }
    }
}
