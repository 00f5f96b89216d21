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
/// `look_first` ([`Backend::look_first`]) with client bytes to send: they
/// are sent right after `connect`, before any event. To a backend on this
/// host the kernel has usually run the whole handshake inside `connect`,
/// so they go out within this task's run instead of after the next
/// event-loop turn. HAProxy does the same: `tcp_connect_server`, then
/// the stream's first `raw_sock_from_buf`, whose `send` succeeding is
/// what clears `CO_FL_WAIT_L4_CONN` ("a send succeeded, so we can
/// consider ourself connected"), before any poller event. A connect
/// still in flight answers `EAGAIN` (`sk_stream_wait_connect` with no
/// time to wait) and sends nothing; a failed one answers its errno.
/// Whether the handshake had completed goes to `observe`. A remote
/// backend's handshake is a round trip away: after a few sends that find
/// it in flight, it is rarely tried. With nothing to send there is
/// nothing to gain before the event, and HAProxy waits for it too.
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
    if look_first && !first.is_empty() {
        match rustix::net::send(&stream, first, rustix::net::SendFlags::NOSIGNAL) {
            Ok(sent) => {
                observe(true);
                return Ok((stream, sent));
            }
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => observe(false),
            Err(e) => {
                observe(true);
                return Err(e.into());
            }
        }
    }
    match tokio::time::timeout(timeout, stream.ready(Interest::WRITABLE)).await {
        Ok(Ok(ready)) if !ready.is_error() && !ready.is_write_closed() => Ok((stream, 0)),
        Ok(Ok(_)) => Err(stream
            .take_error()?
            .unwrap_or_else(|| io::Error::from_raw_os_error(libc::ECONNRESET))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
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
    /// few tries): client bytes sent right after it go out at once. A
    /// handshake still in flight (`EAGAIN`) sends nothing and leaves them
    /// to the caller; a refused dial names its errno with nothing sent.
    #[tokio::test]
    async fn first_bytes_go_out_with_a_loopback_dial() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut seen = Vec::new();
        for _ in 0..50 {
            let mut done = None;
            let (s, sent) = connect_once(addr, Duration::from_secs(5), true, b"hello", |d| {
                done = Some(d)
            })
            .await
            .unwrap();
            assert_eq!(s.peer_addr().unwrap(), addr);
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

    /// Nothing to send, or a backend no longer looked at: the event says
    /// the dial is established (or why not), and nothing is sent.
    #[tokio::test]
    async fn without_a_look_the_event_says_it() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        for (look_first, first) in [(true, &b""[..]), (false, &b"not sent"[..])] {
            let (s, sent) = connect_once(addr, Duration::from_secs(5), look_first, first, |_| {
                panic!("not looked at")
            })
            .await
            .unwrap();
            assert_eq!((s.peer_addr().unwrap(), sent), (addr, 0));
            drop(l.accept().unwrap());
        }
        drop(l);
        let e = connect_once(addr, Duration::from_secs(5), true, &[], |_| {})
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
    }
}
