//! A proxied TCP connection ([`Connection`]) and the movers that drive it.
//!
//! A `Connection` is the one owner of everything a proxied connection is:
//! both sockets, the client's address, the service port and endpoint it
//! belongs to (and so the counters it adds to), and per direction a
//! [`Flow`]: bytes moved and whether its end was passed on. Every way of
//! moving bytes drives this type; nothing else keeps connection state.
//!
//! Movers, per direction (`--copy-mode`):
//! - `auto` (default): `recv`/`send` through a per-thread scratch buffer
//!   while messages are small; a read that fills [`SMALL_CHUNK`] marks the
//!   flow as bulk and it moves to `splice(2)` through a leased pipe, until a
//!   splice brings less than [`SMALL_CHUNK`]. This is HAProxy's splice-auto,
//!   done per direction and per connection.
//! - `splice`: always through a pipe ([`super::splice`]); a chunk that
//!   cannot get a pipe is copied.
//! - `copy`: always through user memory, [`COPY_CHUNK`] at a time.
//!
//! A short `recv` on a TCP socket means its receive queue was empty at
//! that instant, so the socket's readiness is cleared right there instead
//! of asking again for an `EAGAIN`. tokio clears readiness only if no new
//! event arrived since it was read (tick-guarded), and keeps the closed
//! bits, so an edge (data, FIN or RST) that arrives meanwhile is never lost.
//! A short `splice` proves nothing (the pipe may be full), so splice reads
//! go on until `EAGAIN`.
//!
//! Bytes read but not yet written (the other socket's buffer was full) are
//! held by the direction, outside the shared scratch buffer: an idle
//! connection holds its two sockets and no buffer, no pipe.
//!
//! Half-close: EOF one way becomes `shutdown(SHUT_WR)` on the other socket
//! while the reverse direction goes on, until it idles for
//! `--tcp-fin-timeout` (when both directions end cleanly, the last one
//! skips the `shutdown`: closing the socket sends the same FIN). Bytes
//! that the peer's FIN already follows in the receive queue are sent with
//! `MSG_MORE`, so they and the FIN passed on leave in one segment. An
//! error on either side resets both sockets (SO_LINGER 0), so a truncated
//! transfer never looks like a clean end.
//!
//! Parking ([`Connection::run_parkable`]): for a hand-over to the next
//! process, each direction stops where it holds nothing (waiting for its
//! source to become readable, or between two reads once everything read
//! was written; never with bytes held or a pipe leased). The connection
//! is then just its two sockets and its [`Flow`]s, which
//! [`Connection::resume`] rebuilds in the new process.

use std::cell::RefCell;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use rustix::net::{RecvFlags, SendFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::balancer::Backend;
use super::splice::{splice_io, Lease, PipePool, PIPE_SIZE};
use super::Service;

/// How bytes are moved (`--copy-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum CopyMode {
    /// Through user memory while messages are small, `splice(2)` for bulk.
    #[default]
    Auto,
    /// Always zero-copy, through a pipe with `splice(2)`.
    Splice,
    /// Always through user memory (read, then write).
    Copy,
}

impl std::fmt::Display for CopyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Splice => "splice",
            Self::Copy => "copy",
        })
    }
}

/// `auto` reads at most this much through user memory; a read that fills
/// it means bulk, and the flow moves to splice. HAProxy's buffer size:
/// request/response messages fit, a stream does not.
pub const SMALL_CHUNK: usize = 16 * 1024;

/// Bytes moved through user memory at a time in `copy` mode (and by a
/// `splice` direction that cannot get a pipe).
pub const COPY_CHUNK: usize = 64 * 1024;

thread_local! {
    /// One read buffer per worker thread, shared by every connection the
    /// thread runs: a read is written out before the next await, so no
    /// connection keeps it.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; COPY_CHUNK]);
}

/// The hand-over's signal to every connection: stop at the next safe
/// point. Checking it is one atomic load; a connection registers its task
/// once to be woken when it is raised, not at every wait for bytes.
///
/// The tasks to wake are kept in [`PARK_SHARDS`] lists, a connection in
/// its thread's: each worker thread registers and unregisters its
/// connections under a lock and on a cache line no other worker touches
/// (one list for all was two lock round trips a connection on a line
/// both workers wrote).
#[derive(Debug, Default)]
pub struct Park {
    raised: AtomicBool,
    shards: [Padded<Notify>; PARK_SHARDS],
}

/// How many wake-up lists a [`Park`] keeps; threads beyond share them.
const PARK_SHARDS: usize = 16;

/// A value on cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl Park {
    /// Raises it: every connection parks at its next safe point.
    pub fn raise(&self) {
        self.raised.store(true, SeqCst);
        for shard in &self.shards {
            shard.0.notify_waiters();
        }
    }

    /// Whether it was raised.
    pub fn is_raised(&self) -> bool {
        self.raised.load(SeqCst)
    }

    /// The wake-up list of the calling thread.
    fn here(&self) -> &Notify {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Relaxed) % PARK_SHARDS;
        }
        &self.shards[SHARD.with(|s| *s)].0
    }
}

/// Which way bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client → backend.
    Up,
    /// Backend → client.
    Down,
}

/// One direction of a connection.
#[derive(Debug, Default)]
pub struct Flow {
    /// Bytes written to the receiving side so far.
    bytes: AtomicU64,
    /// EOF was read and passed on (or the connection is closing).
    ended: AtomicBool,
}

impl Flow {
    /// A flow that already moved `bytes` and, if `ended`, passed its end
    /// on (a connection handed over by the previous process).
    pub fn resumed(bytes: u64, ended: bool) -> Self {
        Self {
            bytes: AtomicU64::new(bytes),
            ended: AtomicBool::new(ended),
        }
    }

    /// Bytes moved this way so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    /// Whether this direction has ended.
    pub fn ended(&self) -> bool {
        self.ended.load(Relaxed)
    }
}

/// A proxied TCP connection: both sockets, whose it is, and the state of
/// each direction. Counted in its endpoint's open connections while it
/// lives; dropping it closes both sockets.
#[derive(Debug)]
pub struct Connection {
    /// The accepted client socket.
    pub client: TcpStream,
    /// The socket dialled to the endpoint.
    pub backend: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// The service port it was accepted for.
    pub service: Arc<Service>,
    /// The endpoint it was dialled to.
    pub endpoint: Arc<Backend>,
    /// Client → backend.
    pub up: Flow,
    /// Backend → client.
    pub down: Flow,
}

/// How [`Connection::run_parkable`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Both directions ended.
    Done,
    /// Asked to park: both directions stopped at a safe point (no byte
    /// held in user memory or in a pipe; every byte read was written), so
    /// the connection can be handed over as its two sockets and its
    /// [`Flow`]s, and resumed with [`Connection::run`].
    Parked,
}

/// What one `auto`/`copy` read brought.
enum Read {
    /// Asked to park, waiting for bytes with none held.
    Parked,
    /// End of stream.
    Eof,
    /// This many bytes, all passed on or held.
    Moved(usize),
    /// Bytes passed on or held, and then end of stream: the peer's FIN
    /// was already queued behind them.
    Last,
}

impl Connection {
    /// Takes ownership of a dialled pair and counts it on its endpoint.
    pub fn new(
        client: TcpStream,
        backend: TcpStream,
        peer: SocketAddr,
        service: Arc<Service>,
        endpoint: Arc<Backend>,
    ) -> Self {
        endpoint.active.fetch_add(1, Relaxed);
        endpoint.total.fetch_add(1, Relaxed);
        Self {
            client,
            backend,
            peer,
            service,
            endpoint,
            up: Flow::default(),
            down: Flow::default(),
        }
    }

    /// Rebuilds a connection handed over by the previous process: both
    /// sockets, its flows as they were, counted on its endpoint again.
    pub fn resume(
        client: TcpStream,
        backend: TcpStream,
        peer: SocketAddr,
        service: Arc<Service>,
        endpoint: Arc<Backend>,
        up: Flow,
        down: Flow,
    ) -> Self {
        let mut c = Self::new(client, backend, peer, service, endpoint);
        // Open here, but established (and counted in the carried totals)
        // by the previous process.
        c.endpoint.total.fetch_sub(1, Relaxed);
        c.up = up;
        c.down = down;
        c
    }

    /// Duplicates of both sockets (client, backend), to hand the
    /// connection over; dropping the connection afterwards closes only its
    /// own descriptors, not the connections.
    pub fn duplicate_sockets(&self) -> io::Result<[std::os::fd::OwnedFd; 2]> {
        let c = socket2::SockRef::from(&self.client).try_clone()?;
        let b = socket2::SockRef::from(&self.backend).try_clone()?;
        Ok([c.into(), b.into()])
    }

    /// The direction's flow.
    pub fn flow(&self, dir: Dir) -> &Flow {
        match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        }
    }

    /// (source, destination) sockets of a direction.
    fn ends(&self, dir: Dir) -> (&TcpStream, &TcpStream) {
        match dir {
            Dir::Up => (&self.client, &self.backend),
            Dir::Down => (&self.backend, &self.client),
        }
    }

    /// Adds `n` bytes moved in `dir` to the flow, the service port and the
    /// endpoint.
    pub fn count(&self, dir: Dir, n: usize) {
        let n = n as u64;
        let stats = &self.service.stats;
        let (service, endpoint) = match dir {
            Dir::Up => (&stats.bytes_in, &self.endpoint.bytes_in),
            Dir::Down => (&stats.bytes_out, &self.endpoint.bytes_out),
        };
        self.flow(dir).bytes.fetch_add(n, Relaxed);
        super::idle::moved(n);
        service.fetch_add(n, Relaxed);
        endpoint.fetch_add(n, Relaxed);
    }

    /// Sends `first` (the client's bytes read by [`first_bytes`]) to the
    /// backend before the movers start, after the `sent` bytes of it that
    /// the dial's look already sent; all of it is counted as moved up.
    /// Sent without asking tokio first: a connect that the look saw
    /// complete has had no event yet. What the socket does not take now
    /// is flushed on its event. On error both sockets are set to reset on
    /// close.
    pub async fn send_first(&self, first: &[u8], sent: usize) -> io::Result<()> {
        let mut off = sent;
        while off < first.len() {
            match rustix::net::send(&self.backend, &first[off..], SendFlags::NOSIGNAL) {
                Ok(m) => off += m,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    self.reset_on_close();
                    return Err(e.into());
                }
            }
        }
        self.count(Dir::Up, off);
        if off == first.len() {
            return Ok(());
        }
        let r = self.flush(Dir::Up, &mut first[off..].to_vec()).await;
        if r.is_err() {
            self.reset_on_close();
        }
        r
    }

    /// Makes the next close of both sockets send RST instead of FIN.
    pub fn reset_on_close(&self) {
        for s in [&self.client, &self.backend] {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }

    /// Moves bytes both ways until both have ended. Half-close is passed
    /// on; once one direction has ended, the other ends after
    /// `fin_timeout` without a byte. On error both sockets are set to
    /// reset on close. A direction whose flow had already ended (a
    /// resumed connection) stays ended.
    pub async fn run(
        &self,
        mode: CopyMode,
        pipes: &PipePool,
        fin_timeout: Duration,
    ) -> io::Result<()> {
        self.run_parkable(mode, pipes, fin_timeout, &Park::default())
            .await
            .map(|_| ())
    }

    /// As [`Self::run`], but once `park` is raised each direction stops
    /// at its next safe point (see [`Stopped::Parked`]) and the connection
    /// is given back instead of finishing.
    pub async fn run_parkable(
        &self,
        mode: CopyMode,
        pipes: &PipePool,
        fin_timeout: Duration,
        park: &Park,
    ) -> io::Result<Stopped> {
        let pump = |dir: Dir| async move {
            if self.flow(dir).ended() {
                Ok(Stopped::Done)
            } else {
                self.pump(dir, mode, pipes, park).await
            }
        };
        // Registered once for the whole connection: a raise wakes this
        // task wherever it waits, and each wait checks the flag.
        let raised = park.here().notified();
        tokio::pin!(raised);
        std::future::poll_fn(|cx| {
            let _ = std::future::Future::poll(raised.as_mut(), cx);
            Poll::Ready(())
        })
        .await;
        let up = pump(Dir::Up);
        let down = pump(Dir::Down);
        tokio::pin!(up, down);
        let result = tokio::select! {
            biased;
            r = &mut up => match r {
                Ok(Stopped::Done) => finish_half_closed(down, &self.down, fin_timeout).await,
                Ok(Stopped::Parked) => down.await.map(|_| Stopped::Parked),
                Err(e) => Err(e),
            },
            r = &mut down => match r {
                Ok(Stopped::Done) => finish_half_closed(up, &self.up, fin_timeout).await,
                Ok(Stopped::Parked) => up.await.map(|_| Stopped::Parked),
                Err(e) => Err(e),
            },
        };
        if result.is_err() {
            self.up.ended.store(true, Relaxed);
            self.down.ended.store(true, Relaxed);
            self.reset_on_close();
        }
        result
    }

    /// One direction until EOF, then its end is passed on; or until
    /// `park`, at a safe point.
    async fn pump(
        &self,
        dir: Dir,
        mode: CopyMode,
        pipes: &PipePool,
        park: &Park,
    ) -> io::Result<Stopped> {
        let mut held = Vec::new();
        let mut bulk = mode == CopyMode::Splice;
        // The last small read emptied the source (see `read_through`).
        let mut drained = false;
        loop {
            // Nothing held here: every byte read so far was written.
            if park.is_raised() {
                return Ok(Stopped::Parked);
            }
            if bulk {
                match self
                    .splice_burst(dir, pipes, mode == CopyMode::Auto, park)
                    .await?
                {
                    Burst::Parked => return Ok(Stopped::Parked),
                    Burst::Eof => break,
                    Burst::Small => bulk = false,
                    Burst::Drained => {}
                    Burst::NoPipe => {
                        pipes.fallbacks.fetch_add(1, Relaxed);
                        match self
                            .read_through(dir, COPY_CHUNK, &mut held, park, false)
                            .await?
                        {
                            Read::Eof | Read::Last => break,
                            Read::Parked => return Ok(Stopped::Parked),
                            Read::Moved(_) => {}
                        }
                    }
                }
                continue;
            }
            let cap = if mode == CopyMode::Copy {
                COPY_CHUNK
            } else {
                SMALL_CHUNK
            };
            match self
                .read_through(dir, cap, &mut held, park, drained)
                .await?
            {
                Read::Eof | Read::Last => break,
                Read::Parked => return Ok(Stopped::Parked),
                Read::Moved(n) => {
                    drained = n < cap;
                    bulk = mode == CopyMode::Auto && n == cap;
                }
            }
        }
        self.flow(dir).ended.store(true, Relaxed);
        let other = match dir {
            Dir::Up => &self.down,
            Dir::Down => &self.up,
        };
        // Both ways done: the close that follows sends the FIN.
        if !other.ended() {
            let (_, dst) = self.ends(dir);
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
        }
        Ok(Stopped::Done)
    }

    /// Reads what the source has (at most `cap`) through the scratch
    /// buffer and writes it on; what the destination cannot take now is
    /// held and written before returning. `drained`: the last read took
    /// less than it asked for, so the source's readiness is already
    /// cleared and the read starts by waiting for it (a read tried first
    /// would only find it clear: a request and its reply each paid that).
    ///
    /// Bytes that the peer's FIN already follows (a short read from a
    /// socket tokio saw read-closed, and a second read that finds the end)
    /// are written with `MSG_MORE`, so the `shutdown` or close that passes
    /// the end on sends them and the FIN in one segment: the receiver
    /// then acknowledges both with its own FIN instead of acknowledging
    /// the bytes alone (two segments fewer for a reply that ends its
    /// connection, as HAProxy sends it: `sc_conn_send` sets
    /// `CO_SFL_MSG_MORE` when a shutdown is wanted after the data).
    async fn read_through(
        &self,
        dir: Dir,
        cap: usize,
        held: &mut Vec<u8>,
        park: &Park,
        drained: bool,
    ) -> io::Result<Read> {
        let (src, dst) = self.ends(dir);
        if drained && !readable(src, park).await? {
            return Ok(Read::Parked);
        }
        loop {
            let mut got = 0;
            let read = SCRATCH.with_borrow_mut(|buf| -> io::Result<Option<Read>> {
                let buf = &mut buf[..cap];
                let r = src.try_io(Interest::READABLE, || {
                    got = recv(src, buf)?;
                    if got > 0 && got < cap {
                        // A short read drained the queue: clear readiness
                        // now rather than with a read bound to fail.
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(got)
                    }
                });
                match r {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if got == 0 {
                            return Ok(None);
                        }
                    }
                    Err(e) => return Err(e),
                }
                if got == 0 {
                    return Ok(Some(Read::Eof));
                }
                // A short read just cleared the readable bit: readiness
                // left is tokio's read-closed bit, set before the read, so
                // these bytes reach the FIN. The read that would have
                // found the end anyway is made now, before the write, so
                // that the write knows the end follows; a reset shows
                // here as an error, never as an end.
                let mut last = false;
                if got < cap && still_ready(src) {
                    match recv(src, &mut buf[got..]) {
                        Ok(0) => last = true,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                let more = if last {
                    SendFlags::MORE
                } else {
                    SendFlags::empty()
                };
                let sent = write_now(dst, &buf[..got], more)?;
                self.count(dir, sent);
                held.extend_from_slice(&buf[sent..got]);
                Ok(Some(if last { Read::Last } else { Read::Moved(got) }))
            })?;
            match read {
                // Waiting for bytes with none held: a safe point.
                None => {
                    if !readable(src, park).await? {
                        return Ok(Read::Parked);
                    }
                }
                Some(Read::Eof) => return Ok(Read::Eof),
                Some(moved) => {
                    // Entered only with bytes held: a call that finds
                    // nothing to write is ~70 instructions a request.
                    if !held.is_empty() {
                        self.flush(dir, held).await?;
                    }
                    return Ok(moved);
                }
            }
        }
    }

    /// Writes `held` out completely, waiting for the destination.
    async fn flush(&self, dir: Dir, held: &mut Vec<u8>) -> io::Result<()> {
        let (_, dst) = self.ends(dir);
        let mut off = 0;
        while off < held.len() {
            writable(dst).await?;
            let m = write_now(dst, &held[off..], SendFlags::empty())?;
            self.count(dir, m);
            off += m;
        }
        held.clear();
        Ok(())
    }

    /// Splices while the source has bytes, through one leased pipe.
    async fn splice_burst(
        &self,
        dir: Dir,
        pipes: &PipePool,
        auto: bool,
        park: &Park,
    ) -> io::Result<Burst> {
        let (src, dst) = self.ends(dir);
        // No pipe taken yet: a safe point.
        if !readable(src, park).await? {
            return Ok(Burst::Parked);
        }
        let Some(pipe) = pipes.take() else {
            return Ok(Burst::NoPipe);
        };
        let mut lease = Lease::new(pipes, pipe);
        loop {
            let n = match src.try_io(Interest::READABLE, || {
                splice_io(src, lease.write_end(), PIPE_SIZE)
            }) {
                Ok(0) => return Ok(Burst::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
                Err(e) => return Err(e),
            };
            lease.pending = n;
            while lease.pending > 0 {
                let len = lease.pending;
                match dst.try_io(Interest::WRITABLE, || splice_io(lease.read_end(), dst, len)) {
                    Ok(m) => {
                        lease.pending -= m;
                        self.count(dir, m);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(dst).await?,
                    Err(e) => return Err(e),
                }
            }
            if auto && n < SMALL_CHUNK {
                return Ok(Burst::Small);
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Relaxed);
        self.service.stats.completed.fetch_add(1, Relaxed);
    }
}

/// How a splice burst ended.
enum Burst {
    /// Asked to park before a pipe was taken.
    Parked,
    /// End of stream.
    Eof,
    /// The source ran dry (`EAGAIN`); the pipe went back to the pool.
    Drained,
    /// `auto`: a splice brought less than [`SMALL_CHUNK`]; back to reads
    /// through user memory.
    Small,
    /// No pipe could be had: copy this chunk.
    NoPipe,
}

/// Reads what an accepted client socket has queued (at most
/// [`SMALL_CHUNK`]), before the socket is registered with the event loop
/// (see `tcp::serve_std`): empty when nothing is queued yet or the client
/// already sent its FIN (the movers find that end again). An error (the
/// client reset) is returned: read once, it would not be reported again.
pub fn first_bytes(client: &std::net::TcpStream) -> io::Result<Vec<u8>> {
    SCRATCH.with_borrow_mut(|buf| {
        match rustix::net::recv(client, &mut buf[..SMALL_CHUNK], RecvFlags::empty()) {
            Ok((n, _)) => Ok(buf[..n].to_vec()),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    })
}

/// Waits until `src` is readable (true) or `park` is raised (false).
/// `poll_read_ready` keeps one waker slot per socket instead of a waiter
/// list entry per wait; only this direction reads `src`.
///
/// One task moves both directions, so every wake-up polls both, and the
/// direction that was not woken would take the socket's waiter lock
/// again only to store the same waker. Once a `Pending` has stored this
/// task's waker (and not the coop budget: it stores none), the slot keeps
/// it until the socket turns readable or read-closed, which sets the
/// readiness a lock-free look sees; until then a poll only looks. (The
/// driver's shutdown wakes without readiness, but a runtime drops its
/// tasks before it shuts its driver down.)
async fn readable(src: &TcpStream, park: &Park) -> io::Result<bool> {
    let mut armed = false;
    std::future::poll_fn(|cx| {
        if park.is_raised() {
            return Poll::Ready(Ok(false));
        }
        if armed {
            return if still_ready(src) {
                Poll::Ready(Ok(true))
            } else {
                Poll::Pending
            };
        }
        let polled = src.poll_read_ready(cx).map_ok(|()| true);
        // Out of budget, the `Pending` stored no waker on the socket (it
        // rescheduled the task): the next poll asks the socket again.
        armed = polled.is_pending() && tokio::task::coop::has_budget_remaining();
        polled
    })
    .await
}

/// Whether `src` shows readiness, looked up without a system call and
/// without clearing it: `try_io` runs its closure only when some is set.
fn still_ready(src: &TcpStream) -> bool {
    match src.try_io(Interest::READABLE, || Ok(())) {
        Ok(()) => true,
        Err(e) => {
            // tokio's `ErrorKind::WouldBlock.into()`: nothing to free, and
            // its drop is an out-of-line call.
            std::mem::forget(e);
            false
        }
    }
}

/// Waits until `dst` is writable; only the other direction writes it.
async fn writable(dst: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| dst.poll_write_ready(cx)).await
}

/// `recv(2)` on a non-blocking socket (`EAGAIN` as `WouldBlock`).
///
/// `recv` and `send` here are rustix's raw system calls, not glibc's:
/// glibc's are cancellation points, and in a threaded process each call
/// is bracketed by two atomic updates of the thread's cancellation state
/// (~30 instructions and two locked operations a call, four calls a
/// proxied request) that a Rust program never uses.
fn recv(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    rustix::net::recv(s, buf, RecvFlags::empty())
        .map(|(got, _)| got)
        .map_err(io::Error::from)
}

/// Writes as much of `buf` as the socket takes now, without waiting;
/// `flags` beyond `MSG_NOSIGNAL` (`MSG_MORE`) go with every `send`.
fn write_now(dst: &TcpStream, buf: &[u8], flags: SendFlags) -> io::Result<usize> {
    let mut off = 0;
    while off < buf.len() {
        let r = dst.try_io(Interest::WRITABLE, || {
            rustix::net::send(dst, &buf[off..], flags | SendFlags::NOSIGNAL)
                .map_err(io::Error::from)
        });
        match r {
            Ok(m) => off += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(off)
}

/// Drives the direction still open after the other ended: it fails with
/// `TimedOut` once it moved no byte for a whole `fin_timeout`, so a peer
/// that vanished (a client gone while its backend never answers) does not
/// hold two sockets for ever.
async fn finish_half_closed(
    rest: impl std::future::Future<Output = io::Result<Stopped>>,
    flow: &Flow,
    fin_timeout: Duration,
) -> io::Result<Stopped> {
    tokio::pin!(rest);
    loop {
        let seen = flow.bytes();
        tokio::select! {
            biased;
            r = &mut rest => return r,
            _ = tokio::time::sleep(fin_timeout) => {
                if flow.bytes() == seen {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("half-closed connection idle for {fin_timeout:?}"),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connection over loopback, with the client's and the backend's
    /// far ends.
    async fn connection() -> (Connection, TcpStream, TcpStream) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client_end = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (client, peer) = front.accept().await.unwrap();
        let backend = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (backend_end, _) = back.accept().await.unwrap();
        let service = Arc::new(Service::new(ServicePortName {
            namespace: "ns".into(),
            name: "park".into(),
            port_name: String::new(),
            protocol: Protocol::Tcp,
        }));
        let endpoint = Arc::new(Backend::detached(back.local_addr().unwrap()));
        let conn = Connection::new(client, backend, peer, service, endpoint);
        (conn, client_end, backend_end)
    }

    /// A small pipe pool outside any fd budget, for the connections here.
    fn pipe_pool() -> Arc<PipePool> {
        Arc::new(PipePool::new(
            4,
            16,
            super::super::fds::FdBudget::unlimited(),
        ))
    }

    /// One message each way through whatever drives `conn`.
    async fn exchange(client: &mut TcpStream, backend: &mut TcpStream) {
        let mut buf = [0; 4];
        client.write_all(b"ping").await.unwrap();
        backend.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        backend.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    /// Runs `conn` parkably on a task of its own, as `tcp::drive` does:
    /// only a raise (not the test's own task) can wake it.
    fn spawn_parkable(
        conn: Arc<Connection>,
        mode: CopyMode,
        pipes: &Arc<PipePool>,
        park: &Arc<Park>,
    ) -> tokio::task::JoinHandle<io::Result<Stopped>> {
        let (pipes, park) = (Arc::clone(pipes), Arc::clone(park));
        tokio::spawn(async move {
            conn.run_parkable(mode, &pipes, Duration::from_secs(60), &park)
                .await
        })
    }

    /// A wait whose first poll finds the task out of coop budget stored no
    /// waker on the socket: it must ask the socket again, not only look at
    /// the readiness, or bytes that arrive later never wake it.
    #[tokio::test]
    async fn a_wait_begun_out_of_budget_still_wakes_on_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (src, _) = listener.accept().await.unwrap();
        // No bytes yet, and the readiness the registration began with
        // cleared: only an event can set it again.
        let probe = src.try_read(&mut [0; 1]).unwrap_err();
        assert_eq!(probe.kind(), io::ErrorKind::WouldBlock);
        // On a task of its own: nothing but the socket (or coop) wakes it.
        let task = tokio::spawn(async move {
            let park = Park::default();
            let waiting = readable(&src, &park);
            tokio::pin!(waiting);
            std::future::poll_fn(|cx| {
                // Spend the task's budget, as a busy task would have.
                while let Poll::Ready(spent) = tokio::task::coop::poll_proceed(cx) {
                    spent.made_progress();
                }
                assert!(std::future::Future::poll(waiting.as_mut(), cx).is_pending());
                Poll::Ready(())
            })
            .await;
            waiting.await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.write_all(b"x").await.unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("bytes arrived but the wait was never woken");
        assert!(woke.unwrap().unwrap());
    }

    /// The hand-over must reach a connection that waits for bytes and will
    /// get none: its task is woken by the raise, not by traffic.
    #[tokio::test]
    async fn an_idle_connection_parks_when_the_park_is_raised_and_runs_on_after() {
        let pipes = pipe_pool();
        for mode in [CopyMode::Auto, CopyMode::Splice, CopyMode::Copy] {
            let (conn, mut client, mut backend) = connection().await;
            let conn = Arc::new(conn);
            let park = Arc::new(Park::default());
            let task = spawn_parkable(Arc::clone(&conn), mode, &pipes, &park);
            exchange(&mut client, &mut backend).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            park.raise();
            let stopped = tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .unwrap_or_else(|_| panic!("{mode}: an idle connection did not park"));
            assert_eq!(stopped.unwrap().unwrap(), Stopped::Parked, "{mode}");
            assert_eq!((conn.up.bytes(), conn.down.bytes()), (4, 4), "{mode}");
            assert!(!conn.up.ended() && !conn.down.ended(), "{mode}");

            // Resumed (as the next process does), it carries on.
            let run = conn.run(mode, &pipes, Duration::from_secs(60));
            let more = async {
                exchange(&mut client, &mut backend).await;
                drop(client);
                drop(backend);
            };
            let (done, ()) =
                tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(run, more) })
                    .await
                    .unwrap_or_else(|_| panic!("{mode}: the resumed connection did not end"));
            assert!(done.is_ok(), "{mode}: {done:?}");
            assert_eq!((conn.up.bytes(), conn.down.bytes()), (8, 8), "{mode}");
        }
    }

    /// A park raised before the connection runs, and one raised while a
    /// direction is already half-closed, both park at once.
    #[tokio::test]
    async fn a_park_raised_early_or_on_a_half_closed_connection_parks() {
        let pipes = pipe_pool();

        let (conn, _client, _backend) = connection().await;
        let park = Arc::new(Park::default());
        park.raise();
        let task = spawn_parkable(Arc::new(conn), CopyMode::Auto, &pipes, &park);
        let stopped = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("parks at once");
        assert_eq!(stopped.unwrap().unwrap(), Stopped::Parked);

        let (conn, mut client, mut backend) = connection().await;
        let conn = Arc::new(conn);
        let park = Arc::new(Park::default());
        let task = spawn_parkable(Arc::clone(&conn), CopyMode::Auto, &pipes, &park);
        exchange(&mut client, &mut backend).await;
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        park.raise();
        let stopped = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("a half-closed connection parks");
        assert_eq!(stopped.unwrap().unwrap(), Stopped::Parked);
        assert!(conn.up.ended() && !conn.down.ended());
    }

    /// Segments the socket has received so far (`tcpi_segs_in`).
    #[allow(unsafe_code)]
    fn segments_in(s: &TcpStream) -> u32 {
        use std::os::fd::AsRawFd;
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `tcp_info` is a plain C struct, valid all zeroes, and the
        // kernel writes at most `len` bytes of it.
        let (rc, info) = unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let rc = libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            );
            (rc, info)
        };
        assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
        info.tcpi_segs_in
    }

    /// A reply the backend ended with its FIN before we read it reaches
    /// the client as one segment carrying the bytes and the FIN, as from
    /// HAProxy (`sc_conn_send`'s `CO_SFL_MSG_MORE` before a shutdown), in
    /// every mode that reads small replies through user memory.
    #[tokio::test]
    async fn a_reply_followed_by_its_fin_leaves_with_the_fin() {
        for mode in [CopyMode::Auto, CopyMode::Copy] {
            let (conn, mut client, mut backend) = connection().await;
            backend.write_all(b"reply").await.unwrap();
            backend.shutdown().await.unwrap();
            // Both edges reach the runtime's readiness before the first read.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let before = segments_in(&client);
            let pipes = pipe_pool();
            let run = spawn_parkable(Arc::new(conn), mode, &pipes, &Arc::default());
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"reply", "{mode}");
            assert_eq!(
                segments_in(&client) - before,
                1,
                "{mode}: bytes and FIN apart"
            );
            // The half-close went on as before: the client's end follows.
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            backend.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            run.await.unwrap().unwrap();
        }
    }

    /// A reply cut short by a reset is never passed on as a clean end:
    /// the early look at the end confirms it with a read, which finds the
    /// reset, and the client is reset too.
    #[tokio::test]
    async fn a_reply_followed_by_a_reset_is_not_passed_on_as_an_end() {
        let (conn, mut client, backend) = connection().await;
        let mut backend = backend.into_std().unwrap();
        std::io::Write::write_all(&mut backend, b"reply").unwrap();
        socket2::SockRef::from(&backend)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(backend);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let pipes = pipe_pool();
        let run = spawn_parkable(Arc::new(conn), CopyMode::Auto, &pipes, &Arc::default());
        let mut got = Vec::new();
        let read = client.read_to_end(&mut got).await;
        assert_eq!(
            read.map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::ConnectionReset),
            "read {got:?}"
        );
        assert!(run.await.unwrap().is_err());
    }

    /// A connected loopback pair of std sockets, the accepted end
    /// non-blocking and registered with nothing, as `tcp::serve_std` gets it.
    fn accepted_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        (accepted, client)
    }

    /// Waits (bounded) until `s` has bytes, a FIN or an error queued.
    fn wait_queued(s: &std::net::TcpStream) {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = [PollFd::new(s, PollFlags::IN)];
        let t = rustix::event::Timespec {
            tv_sec: 5,
            tv_nsec: 0,
        };
        assert_eq!(poll(&mut fds, Some(&t)).unwrap(), 1, "nothing arrived");
    }

    /// `tcp::serve_std`'s first read, before registration: what is queued,
    /// nothing (not yet sent, or a FIN: the movers find that end again),
    /// or the reset as an error (read once, a reset is not reported again).
    #[test]
    fn first_bytes_are_what_is_queued_and_a_reset_is_an_error() {
        use std::io::Write;
        let (accepted, mut client) = accepted_pair();
        assert_eq!(first_bytes(&accepted).unwrap(), b"");
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        wait_queued(&accepted);
        assert_eq!(first_bytes(&accepted).unwrap(), b"GET / HTTP/1.1\r\n\r\n");

        let (accepted, client) = accepted_pair();
        client.shutdown(Shutdown::Write).unwrap();
        wait_queued(&accepted);
        assert_eq!(first_bytes(&accepted).unwrap(), b"");
        let mut one = [0u8; 1];
        assert_eq!(
            rustix::net::recv(&accepted, &mut one, RecvFlags::empty())
                .unwrap()
                .0,
            0,
            "the FIN is still there"
        );

        let (accepted, client) = accepted_pair();
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
        wait_queued(&accepted);
        let e = first_bytes(&accepted).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET), "{e}");
    }

    /// Bytes read before the movers start reach the backend first,
    /// counted, and the connection then runs as any other.
    #[tokio::test]
    async fn first_bytes_go_before_the_rest_and_are_counted() {
        let (conn, mut client_end, mut backend_end) = connection().await;
        conn.send_first(b"first ", 0).await.unwrap();
        assert_eq!(conn.flow(Dir::Up).bytes(), 6);
        assert_eq!(conn.service.stats.bytes_in.load(Relaxed), 6);
        let pipes = pipe_pool();
        let run = tokio::spawn(async move {
            conn.run(CopyMode::Auto, &pipes, Duration::from_secs(5))
                .await
        });
        client_end.write_all(b"second").await.unwrap();
        client_end.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"first second");
        drop(backend_end);
        let mut rest = Vec::new();
        client_end.read_to_end(&mut rest).await.unwrap();
        run.await.unwrap().unwrap();
    }
}
