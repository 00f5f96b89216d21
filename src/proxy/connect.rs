//! Dialing a backend with retry, as upstream: each attempt picks the next
//! endpoint with a longer timeout (`--dial-timeouts`, default 250ms, 500ms,
//! 1s, 2s). Only connect-phase failures are retried: nothing has been
//! forwarded yet, so a dead pod costs the client a delay, never an error,
//! while another endpoint works.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::balancer::{Backend, Balancer};
use super::ServiceStats;

/// Upstream's `EndpointDialTimeouts`.
pub const DEFAULT_DIAL_TIMEOUTS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// Why one dial failed; the variant names are the metric label values.
/// Declaration order is [`DialResult::ALL`]'s: `as usize` indexes counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialResult {
    /// Connected.
    Ok,
    /// RST: nothing listens there.
    Refused,
    /// No answer within the attempt's timeout.
    Timeout,
    /// No route (EHOSTUNREACH, ENETUNREACH).
    Unreachable,
    /// Anything else.
    Other,
    /// The proxy itself was out of fds, memory or local ports: not the
    /// backend's fault, so it is neither ejected nor retried elsewhere.
    Local,
}

impl DialResult {
    /// Every value, for metrics and status output.
    pub const ALL: [DialResult; 6] = [
        Self::Ok,
        Self::Refused,
        Self::Timeout,
        Self::Unreachable,
        Self::Other,
        Self::Local,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Other => "other",
            Self::Local => "local",
        }
    }

    fn of(e: &io::Error) -> Self {
        if super::is_local_exhaustion(e) {
            return Self::Local;
        }
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => Self::Refused,
            Some(libc::ETIMEDOUT) => Self::Timeout,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => Self::Unreachable,
            _ => Self::Other,
        }
    }
}

/// Why a client connection could not be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service has no usable endpoint.
    #[error("no endpoints")]
    NoEndpoints,
    /// The proxy could not make a socket (fds, memory or local ports).
    #[error("out of local resources: {0}")]
    Local(io::Error),
    /// Every attempt failed.
    #[error("{attempts} dial attempts failed, last to {last_addr}: {last}")]
    AllFailed {
        /// Attempts made.
        attempts: usize,
        /// The endpoint of the last attempt.
        last_addr: SocketAddr,
        /// Its error.
        last: io::Error,
    },
}

/// A connected backend.
pub struct Dialed {
    /// The connection, TCP_NODELAY set.
    pub stream: TcpStream,
    /// The backend it goes to.
    pub backend: Arc<Backend>,
    /// How many of the client's first bytes the look right after
    /// `connect` already sent (see [`connect_once`]).
    pub sent: usize,
}

/// A dial in flight, counted in [`Backend::pending`] until dropped (also
/// when the connection task is cancelled mid-dial).
struct InFlight<'a>(&'a Backend);

impl<'a> InFlight<'a> {
    fn new(b: &'a Backend) -> Self {
        b.pending.fetch_add(1, Relaxed);
        Self(b)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Relaxed);
    }
}

/// One non-blocking connect to `addr` within `timeout`, `TCP_NODELAY` set
/// before the SYN; returns the stream and how many bytes of `first` it
/// already sent. tokio's `TcpStream::connect` asks `SO_ERROR` after every
/// connect; here the first event says it: writable alone is established,
/// and only an error or hang-up (a refused or unreachable dial) costs the
/// `getsockopt` that names the errno.
///
/// `look_first` ([`Backend::look_first`]): a look right after `connect`,
/// before any event; whether the handshake had completed (established or
/// not) goes to `observe`. To a backend on this host the kernel has
/// usually run the whole handshake inside `connect`, so the connection
/// goes on within this task's run instead of after the next event-loop
/// turn (HAProxy sends on a fresh connection at once, `tcp_connect_server`
/// then the stream's first `snd_buf`, without waiting for a poller
/// event). With client bytes to send (`first`), the look is their `send`:
/// a connect in flight answers `EAGAIN` (`sk_stream_wait_connect` with no
/// time to wait) and a failed one its errno, so the look costs no system
/// call of its own. Without, it is a zero-timeout `poll`. A remote
/// backend's handshake is a round trip away: after a few looks that find
/// it in flight, it is rarely looked at.
async fn connect_once(
    addr: SocketAddr,
    timeout: Duration,
    look_first: bool,
    first: &[u8],
    observe: impl FnOnce(bool),
) -> io::Result<(TcpStream, usize)> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    if look_first {
        let look = look(&stream, first);
        observe(!matches!(look, Look::InFlight));
        match look {
            Look::InFlight => {}
            Look::Established(sent) => return Ok((stream, sent)),
            Look::Failed(e) => return Err(e),
        }
    }
    match tokio::time::timeout(timeout, stream.ready(Interest::WRITABLE)).await {
        Ok(Ok(ready)) if !ready.is_error() && !ready.is_write_closed() => Ok((stream, 0)),
        Ok(Ok(_)) => Err(failure(&stream)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
    }
}

/// What a look right after `connect` found ([`look`]).
enum Look {
    /// The handshake is still in flight: the event will say.
    InFlight,
    /// Established; this many of the first bytes were sent.
    Established(usize),
    /// The dial failed (refused, unreachable).
    Failed(io::Error),
}

/// Looks at a connect in progress without waiting: sends `first` when
/// there is any, else asks a zero-timeout `poll`.
fn look(stream: &TcpStream, first: &[u8]) -> Look {
    if !first.is_empty() {
        return match rustix::net::send(stream, first, rustix::net::SendFlags::NOSIGNAL) {
            Ok(sent) => Look::Established(sent),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Look::InFlight,
            Err(e) => Look::Failed(e.into()),
        };
    }
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(stream, PollFlags::OUT)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(1) if fds[0].revents() == PollFlags::OUT => Look::Established(0),
        Ok(1) => Look::Failed(failure(stream)),
        _ => Look::InFlight,
    }
}

/// Why a dial that completed was not established: the socket's pending
/// error (`SO_ERROR`), or a reset when it has none (a hang-up).
fn failure(stream: &TcpStream) -> io::Error {
    match stream.take_error() {
        Ok(e) => e.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ECONNRESET)),
        Err(e) => e,
    }
}

/// Dials the service's next endpoint for `client`, moving on to another one
/// (with the next, longer timeout) on every failure. `first` (the client's
/// bytes read so far; empty when a PROXY header must precede them) may
/// go out with the dial's look: [`Dialed::sent`] says how much did.
pub async fn dial(
    balancer: &Balancer,
    stats: &ServiceStats,
    client: IpAddr,
    timeouts: &[Duration],
    first: &[u8],
) -> Result<Dialed, Error> {
    let started = std::time::Instant::now();
    // Allocated only by a failed attempt.
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last = None;
    let mut attempts = 0;
    // Out of local fds/ports, a client waits (as in the backlog) for up to
    // the whole dial budget, retrying, rather than being reset at once.
    let mut local_budget: Duration = timeouts.iter().sum();
    let mut local_backoff = Duration::from_millis(10);
    for (attempt, &timeout) in timeouts.iter().enumerate() {
        let Some(backend) = balancer.pick(client, &tried) else {
            break;
        };
        attempts += 1;
        if attempt > 0 {
            stats.retries.fetch_add(1, Relaxed);
        }
        // Counted as load while in flight, for the load-aware schedulers.
        let in_flight = InFlight::new(&backend);
        // The first attempt starts with the dial: one clock read less.
        let mut attempt_started = if attempt == 0 {
            started
        } else {
            std::time::Instant::now()
        };
        let look = |completed| backend.observe_look(completed);
        let mut result =
            connect_once(backend.addr, timeout, backend.look_first(), first, look).await;
        while let Err(e) = &result {
            if !super::is_local_exhaustion(e) || local_budget.is_zero() {
                break;
            }
            stats.count_dial(DialResult::Local);
            let pause = local_backoff.min(local_budget);
            tokio::time::sleep(pause).await;
            local_budget -= pause;
            local_backoff = (local_backoff * 2).min(Duration::from_millis(500));
            attempt_started = std::time::Instant::now();
            result = connect_once(backend.addr, timeout, backend.look_first(), first, look).await;
        }
        drop(in_flight);
        match result {
            Ok((stream, sent)) => {
                stats.count_dial(DialResult::Ok);
                let took = started.elapsed();
                stats.connect_latency.observe(took);
                backend.observe_connect(if attempt_started == started {
                    took
                } else {
                    attempt_started.elapsed()
                });
                balancer.report_success(&backend);
                return Ok(Dialed {
                    stream,
                    backend,
                    sent,
                });
            }
            Err(e) => {
                let result = DialResult::of(&e);
                stats.count_dial(result);
                if result == DialResult::Local {
                    return Err(Error::Local(e));
                }
                balancer.report_failure(&backend);
                tracing::debug!(backend = %backend.addr, attempt, result = result.as_str(), error = %e, "dial failed");
                if !tried.contains(&backend.addr) {
                    tried.push(backend.addr);
                }
                last = Some((backend.addr, e));
            }
        }
    }
    match last {
        None => Err(Error::NoEndpoints),
        Some((last_addr, last)) => Err(Error::AllFailed {
            attempts,
            last_addr,
            last,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On loopback the kernel runs the whole handshake inside `connect`
    /// (unless its softirqs were deferred to `ksoftirqd` under load, so a
    /// few tries): the look finds it established, and a refused one
    /// completed, with the errno named.
    #[tokio::test]
    async fn a_look_after_connect_finds_a_loopback_handshake_done() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut seen = Vec::new();
        for _ in 0..50 {
            let (s, sent) = connect_once(addr, Duration::from_secs(5), true, &[], |done| {
                seen.push(done)
            })
            .await
            .unwrap();
            assert_eq!((s.peer_addr().unwrap(), sent), (addr, 0));
            drop(l.accept().unwrap());
            if seen.contains(&true) {
                break;
            }
        }
        assert!(seen.contains(&true), "{seen:?}");

        drop(l);
        let e = connect_once(addr, Duration::from_secs(5), true, &[], |_| {})
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");

        // Not looked at: the event says it, as before, and nothing is sent.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (s, sent) = connect_once(
            l.local_addr().unwrap(),
            Duration::from_secs(5),
            false,
            b"not sent",
            |_| panic!("not looked at"),
        )
        .await
        .unwrap();
        assert_eq!(s.peer_addr().unwrap(), l.local_addr().unwrap());
        assert_eq!(sent, 0);
    }

    /// With client bytes to send, the look is their `send`: a completed
    /// handshake takes them at once, one still in flight (`EAGAIN`) sends
    /// nothing and leaves them to the caller, and a refused dial names
    /// its errno with nothing sent.
    #[tokio::test]
    async fn with_first_bytes_the_look_is_their_send() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut seen = Vec::new();
        for _ in 0..50 {
            let mut done = None;
            let (_s, sent) = connect_once(addr, Duration::from_secs(5), true, b"hello", |d| {
                done = Some(d)
            })
            .await
            .unwrap();
            let done = done.expect("looked at");
            seen.push(done);
            let (mut a, _) = l.accept().unwrap();
            if done {
                assert_eq!(sent, 5);
                let mut got = [0u8; 5];
                a.read_exact(&mut got).unwrap();
                assert_eq!(&got, b"hello");
                break;
            }
            assert_eq!(sent, 0, "in flight: nothing sent");
        }
        assert!(seen.contains(&true), "{seen:?}");

        drop(l);
        let e = connect_once(addr, Duration::from_secs(5), true, b"hello", |_| {})
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
    }
}
