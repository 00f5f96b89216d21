//! Hand-over of the listening sockets to the next process (upgrades and
//! restarts without a refused connection or a missing rule).
//!
//! The running proxy listens on a unix `SOCK_SEQPACKET` socket at
//! `--handover-socket` (mode 0600; peers must have our uid or be root,
//! checked with `SO_PEERCRED`). A new process started with the same path
//! connects before binding anything, and the two speak a versioned,
//! message-per-packet protocol (one JSON object per packet, file
//! descriptors attached with `SCM_RIGHTS`):
//!
//! 1. new → old: `hello {version, pid}`;
//! 2. old → new: `welcome {version, pid}` or `refuse {reason}`;
//! 3. old → new: one `listener` per listening socket (a TCP service port
//!    with all its `SO_REUSEPORT` sockets, a UDP service port, a Service's
//!    health-check node port, the metrics and healthz listeners), its fds
//!    attached, with the service port's
//!    counters so the new metrics go on from the old totals; then `done`;
//! 4. the new process adopts those sockets for the same service ports
//!    (same ports, so the iptables rules stay valid and are never
//!    removed), runs its first sync, and sends `serving {pid}`;
//! 5. only then the old process stops accepting: it closes its copies of
//!    the sockets (the kernel objects, with their accept queues, live on
//!    in the new process) and keeps the iptables rules;
//! 6. old → new: its TCP connections. Each one parks at a safe point
//!    ([`crate::proxy::conn::Stopped::Parked`]: no byte held in user memory
//!    or a pipe) within [`PARK_TIMEOUT`], and goes over as its two sockets
//!    and a [`ConnDesc`] (service port, endpoint, client, bytes and end of
//!    each direction), 100 per `connections` message, then
//!    `end`. The new process rebuilds each [`Connection`] and runs it with
//!    the same movers. A connection that parks too late, or that cannot be
//!    sent, runs on in the old process, which drains it for
//!    `--shutdown-grace` and exits 0. The new process takes the socket
//!    path over for its own successor. UDP sessions are not sent: the new
//!    process opens new ones on the clients' next datagrams.
//!
//! Failures: a version mismatch, a refusal, a timeout or an old process
//! that goes away before `done` makes the new process exit with an error
//! (status 1) without binding anything, so that the old one keeps serving
//! alone; a new process that goes away or stays silent before `serving`
//! leaves the old one serving (the sockets it sent were copies). An
//! unreachable socket (no file, or nobody listening: a stale file after
//! `kill -9`) means no predecessor: the new process starts as usual.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::model::ServicePortName;
pub use crate::proxy::carry::{
    BackendCounters, Carried, Counters, Exported, Inherited, Kind, ListenerDesc, SharedFd,
};
use crate::proxy::{Connection, Context};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// The protocol version spoken; a peer with another one is refused.
pub const VERSION: u32 = 1;

/// The default `--handover-socket`.
pub const DEFAULT_SOCKET: &str = "/run/kube-userspace-proxy/handover.sock";

/// For fault tests only: milliseconds the new process waits between
/// receiving the listeners and serving them.
pub const TEST_STALL_ENV: &str = "KUSP_HANDOVER_TEST_STALL_MS";

/// How long either side waits for the other's next message.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest message; listener descriptions are far smaller.
const MAX_MESSAGE: usize = 64 * 1024;

/// Most fds attached to one message (the kernel's `SCM_MAX_FD` is 253).
const MAX_FDS: usize = 253;

/// A TCP connection handed over: its fds (client, backend) travel beside
/// it; what else the new process needs to go on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnDesc {
    /// The service port it was accepted for.
    pub service: ServicePortName,
    /// The endpoint it was dialled to.
    pub endpoint: SocketAddr,
    /// The client's address.
    pub peer: SocketAddr,
    /// Bytes moved client → backend so far.
    pub up_bytes: u64,
    /// Whether the client's end was passed on (half-closed).
    pub up_ended: bool,
    /// Bytes moved backend → client so far.
    pub down_bytes: u64,
    /// Whether the backend's end was passed on (half-closed).
    pub down_ended: bool,
}

impl ConnDesc {
    fn of(c: &Connection) -> Self {
        Self {
            service: c.service.name.clone(),
            endpoint: c.endpoint.addr,
            peer: c.peer,
            up_bytes: c.up.bytes(),
            up_ended: c.up.ended(),
            down_bytes: c.down.bytes(),
            down_ended: c.down.ended(),
        }
    }
}

/// Connections per message: two fds each, within `SCM_MAX_FD`.
const CONN_BATCH: usize = 100;

/// How long the old process waits for its connections to park.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(2);

/// One message of the protocol.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Msg {
    Hello { version: u32, pid: u32 },
    Welcome { version: u32, pid: u32 },
    Refuse { reason: String },
    Listener(ListenerDesc),
    Done { listeners: usize },
    Serving { pid: u32 },
    Connections { conns: Vec<ConnDesc> },
    End { connections: usize },
}

/// A request from the hand-over server to the run loop: export every
/// listener now.
pub type ExportRequest = oneshot::Sender<Vec<Exported>>;

/// Errors of a hand-over.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket call failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol, refused, or spoke another version.
    #[error("{0}")]
    Protocol(String),
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Self::Io(e.into())
    }
}

/// Sends one message with `fds` attached.
fn send(sock: &socket2::Socket, msg: &Msg, fds: &[RawFd]) -> Result<(), Error> {
    let body = serde_json::to_vec(msg).map_err(|e| Error::Protocol(e.to_string()))?;
    let iov = [IoSlice::new(&body)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    // A socket with a send timeout fails with EINTR at any signal, even
    // one installed with SA_RESTART (signal(7)): SIGCHLD of an
    // iptables-restore child broke a hand-over that way.
    let n = loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    if n != body.len() {
        return Err(Error::Protocol(format!(
            "short send: {n} of {}",
            body.len()
        )));
    }
    Ok(())
}

/// Receives one message and the fds attached to it (waits at most the
/// socket's read timeout).
fn recv(sock: &socket2::Socket) -> Result<(Msg, Vec<OwnedFd>), Error> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, raw, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        // EINTR at any signal, as in `send`.
        let msg = loop {
            match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r?,
            }
        };
        let mut raw = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                raw.extend(fds);
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, raw, truncated)
    };
    let fds = adopt_fds(raw);
    if n == 0 {
        return Err(Error::Protocol("peer closed the hand-over socket".into()));
    }
    if truncated {
        return Err(Error::Protocol("message or fds truncated".into()));
    }
    let msg = serde_json::from_slice(&buf[..n])
        .map_err(|e| Error::Protocol(format!("bad message: {e}")))?;
    Ok((msg, fds))
}

/// Takes ownership of fds just received with `SCM_RIGHTS`.
#[allow(unsafe_code)]
fn adopt_fds(raw: Vec<RawFd>) -> Vec<OwnedFd> {
    use std::os::fd::FromRawFd;
    raw.into_iter()
        // SAFETY: the kernel installed these fds in this process for this
        // message (SCM_RIGHTS); nothing else knows or owns them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Whether the peer of `sock` runs as our user or as root.
fn check_peer(sock: &socket2::Socket) -> Result<u32, Error> {
    let cred = getsockopt(sock, sockopt::PeerCredentials)?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != me && cred.uid() != 0 {
        return Err(Error::Protocol(format!(
            "peer pid {} runs as uid {}, not {me} or root",
            cred.pid(),
            cred.uid()
        )));
    }
    Ok(u32::try_from(cred.pid()).unwrap_or(0))
}

fn seqpacket() -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
    s.set_read_timeout(Some(STEP_TIMEOUT))?;
    s.set_write_timeout(Some(STEP_TIMEOUT))?;
    Ok(s)
}

/// A hand-over in progress, seen from the new process: the sockets, and
/// the connection on which `serving` is to be sent.
#[derive(Debug)]
pub struct Takeover {
    /// What the old process sent.
    pub inherited: Inherited,
    /// The old process's pid.
    pub old_pid: u32,
    sock: socket2::Socket,
}

impl Takeover {
    /// Tells the old process we serve: it stops accepting and hands its
    /// connections over.
    pub fn serving(&self) -> Result<(), Error> {
        send(
            &self.sock,
            &Msg::Serving {
                pid: std::process::id(),
            },
            &[],
        )
    }

    /// Receives the old process's connections (after [`Self::serving`])
    /// until it says it sent them all; `resume` runs each one (client fd,
    /// backend fd). Returns how many were received.
    pub fn receive_connections(
        self,
        mut resume: impl FnMut(ConnDesc, OwnedFd, OwnedFd),
    ) -> Result<usize, Error> {
        let mut got = 0;
        loop {
            match recv(&self.sock)? {
                (Msg::Connections { conns }, fds) => {
                    if fds.len() != 2 * conns.len() {
                        return Err(Error::Protocol(format!(
                            "{} connections with {} fds",
                            conns.len(),
                            fds.len()
                        )));
                    }
                    let mut fds = fds.into_iter();
                    for d in conns {
                        if let (Some(c), Some(b)) = (fds.next(), fds.next()) {
                            got += 1;
                            resume(d, c, b);
                        }
                    }
                }
                (Msg::End { connections }, _) if connections == got => return Ok(got),
                (Msg::End { connections }, _) => {
                    return Err(Error::Protocol(format!(
                        "{connections} connections announced, {got} received"
                    )))
                }
                (other, _) => return Err(Error::Protocol(format!("unexpected {other:?}"))),
            }
        }
    }
}

/// New process: finds the running proxy at `path` and receives its
/// listeners. `Ok(None)`: nobody there (no file, or a stale one, removed),
/// start as usual. `Err`: a predecessor answered but the hand-over failed;
/// it keeps serving, and we must not start.
pub fn take_over(path: &Path) -> Result<Option<Takeover>, Error> {
    let sock = seqpacket()?;
    let addr = socket2::SockAddr::unix(path)?;
    if let Err(e) = sock.connect(&addr) {
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            Some(libc::ECONNREFUSED) => {
                // A file nobody listens on: left by a process killed with -9.
                tracing::info!(path = %path.display(), "stale hand-over socket: no predecessor");
                let _ = std::fs::remove_file(path);
                Ok(None)
            }
            _ => Err(e.into()),
        };
    }
    let peer = check_peer(&sock)?;
    send(
        &sock,
        &Msg::Hello {
            version: VERSION,
            pid: std::process::id(),
        },
        &[],
    )?;
    let old_pid = match recv(&sock)?.0 {
        Msg::Welcome { version, pid } if version == VERSION => pid,
        Msg::Welcome { version, .. } => {
            return Err(Error::Protocol(format!(
                "predecessor speaks version {version}, we speak {VERSION}"
            )))
        }
        Msg::Refuse { reason } => return Err(Error::Protocol(format!("refused: {reason}"))),
        other => return Err(Error::Protocol(format!("unexpected {other:?}"))),
    };
    tracing::info!(old_pid, peer_pid = peer, path = %path.display(), "hand-over: predecessor found, receiving listeners");
    let mut inherited = Inherited::default();
    let mut count = 0;
    loop {
        match recv(&sock)? {
            (Msg::Listener(desc), fds) => {
                count += 1;
                adopt(&mut inherited, desc, fds)?;
            }
            (Msg::Done { listeners }, _) if listeners == count => break,
            (Msg::Done { listeners }, _) => {
                return Err(Error::Protocol(format!(
                    "done after {count} listeners, {listeners} announced"
                )))
            }
            (other, _) => return Err(Error::Protocol(format!("unexpected {other:?}"))),
        }
    }
    Ok(Some(Takeover {
        inherited,
        old_pid,
        sock,
    }))
}

/// Files a received listener in `inherited` by kind, checking its fds are
/// sockets of the right type.
fn adopt(inherited: &mut Inherited, desc: ListenerDesc, fds: Vec<OwnedFd>) -> Result<(), Error> {
    let check = |fd: &OwnedFd, ty: socket2::Type| -> Result<socket2::Socket, Error> {
        let s = socket2::Socket::from(fd.try_clone()?);
        if s.r#type()? != ty {
            return Err(Error::Protocol(format!(
                "{:?}: wrong socket type",
                desc.kind
            )));
        }
        s.set_nonblocking(true)?;
        Ok(s)
    };
    match (desc.kind, desc.service) {
        (Kind::Tcp, Some(name)) => {
            let mut ls = Vec::with_capacity(fds.len());
            for fd in &fds {
                ls.push(check(fd, socket2::Type::STREAM)?.into());
            }
            if ls.is_empty() {
                return Err(Error::Protocol(format!("{name}: no socket")));
            }
            inherited
                .tcp
                .insert(name, (desc.port, ls, (desc.counters, desc.backends)));
        }
        (Kind::Udp, Some(name)) => {
            let Some(fd) = fds.first() else {
                return Err(Error::Protocol(format!("{name}: no socket")));
            };
            let s = check(fd, socket2::Type::DGRAM)?;
            inherited
                .udp
                .insert(name, (desc.port, s.into(), (desc.counters, desc.backends)));
        }
        (Kind::HealthCheck, Some(name)) => {
            let Some(fd) = fds.first() else {
                return Err(Error::Protocol(format!("{name}: no health-check socket")));
            };
            let s = check(fd, socket2::Type::STREAM)?;
            inherited.health_checks.insert(name, (desc.port, s.into()));
        }
        (kind @ (Kind::Metrics | Kind::Healthz), None) => {
            let Some(fd) = fds.first() else {
                return Err(Error::Protocol(format!("{kind:?}: no socket")));
            };
            inherited
                .admin
                .push((kind, check(fd, socket2::Type::STREAM)?.into()));
        }
        (kind, _) => return Err(Error::Protocol(format!("{kind:?}: bad description"))),
    }
    Ok(())
}

/// The listening end of the hand-over socket, owned by the serving process.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    /// Inode of the socket file we created: removed at a plain stop only
    /// if it is still ours (a successor replaces it).
    ino: u64,
    sock: socket2::Socket,
}

impl Server {
    /// Creates the socket at `path` (mode 0600), replacing a stale file.
    /// The directory must exist.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
        // Replace whatever is there: a successor takes the path over from
        // its predecessor, whose socket stays open (and unreachable).
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        sock.bind(&socket2::SockAddr::unix(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        sock.listen(4)?;
        let ino = std::fs::metadata(path)?.ino();
        Ok(Self {
            path: path.to_owned(),
            ino,
            sock,
        })
    }

    /// Serves hand-over requests on a thread of its own: each successor
    /// gets every listener (asked of the run loop through `export`). On
    /// the first one that reports `serving`, `handed_over` gets its pid
    /// and the thread ends; failed attempts are logged and the process
    /// keeps serving.
    ///
    /// `admin` are the admin listeners (kind, port, a duplicate), sent
    /// beside the service ports'.
    ///
    /// Once the successor serves, every connection of `ctx` parks and is
    /// sent to it; `connections_sent` fires when that is over (sent, or
    /// given back to run here).
    pub fn spawn(
        self,
        export: mpsc::Sender<ExportRequest>,
        handed_over: oneshot::Sender<u32>,
        admin: Vec<(Kind, u16, OwnedFd)>,
        ctx: Arc<Context>,
        connections_sent: oneshot::Sender<usize>,
    ) -> io::Result<ServerHandle> {
        let handle = ServerHandle {
            path: self.path.clone(),
            ino: self.ino,
        };
        let listening = self.sock;
        std::thread::Builder::new()
            .name("kusp-handover".into())
            .spawn(move || loop {
                let conn = match listening.accept() {
                    Ok((c, _)) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "hand-over socket: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match serve_one(&conn, &export, &admin) {
                    Ok(pid) => {
                        tracing::info!(
                            new_pid = pid,
                            "hand-over: successor serving; stop accepting, hand connections over (rules kept)"
                        );
                        // Nobody else may start a hand-over with us now.
                        drop(listening);
                        let _ = handed_over.send(pid);
                        let sent = hand_connections(&conn, &ctx);
                        let _ = connections_sent.send(sent);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "hand-over failed: keep serving"),
                }
            })?;
        Ok(handle)
    }
}

/// What is left of a [`Server`] once its thread runs: enough to remove
/// the socket file at a plain stop.
#[derive(Debug)]
pub struct ServerHandle {
    path: PathBuf,
    ino: u64,
}

impl ServerHandle {
    /// Removes the socket file if it is still the one we created (a
    /// successor may have replaced it).
    pub fn remove(&self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One hand-over, seen from the old process: the successor's pid once it
/// reports serving.
fn serve_one(
    conn: &socket2::Socket,
    export: &mpsc::Sender<ExportRequest>,
    admin: &[(Kind, u16, OwnedFd)],
) -> Result<u32, Error> {
    conn.set_read_timeout(Some(STEP_TIMEOUT))?;
    conn.set_write_timeout(Some(STEP_TIMEOUT))?;
    let peer = check_peer(conn).inspect_err(|e| {
        let _ = send(
            conn,
            &Msg::Refuse {
                reason: e.to_string(),
            },
            &[],
        );
    })?;
    match recv(conn)?.0 {
        Msg::Hello { version, .. } if version == VERSION => {}
        Msg::Hello { version, pid } => {
            let reason = format!("version {version} of pid {pid}; we speak {VERSION}");
            let _ = send(
                conn,
                &Msg::Refuse {
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(Error::Protocol(reason));
        }
        other => return Err(Error::Protocol(format!("unexpected {other:?}"))),
    }
    tracing::info!(
        peer_pid = peer,
        "hand-over: successor connected; sending listeners"
    );
    send(
        conn,
        &Msg::Welcome {
            version: VERSION,
            pid: std::process::id(),
        },
        &[],
    )?;
    let (tx, rx) = oneshot::channel();
    export
        .blocking_send(tx)
        .map_err(|_| Error::Protocol("run loop gone".into()))?;
    let mut listeners = rx
        .blocking_recv()
        .map_err(|_| Error::Protocol("run loop gone".into()))?;
    for (kind, port, fd) in admin {
        listeners.push(Exported {
            desc: ListenerDesc {
                kind: *kind,
                service: None,
                port: *port,
                counters: Counters::default(),
                backends: Vec::new(),
            },
            fds: vec![Arc::new(fd.try_clone()?) as SharedFd],
        });
    }
    let mut sent = 0;
    for l in &listeners {
        if l.fds.len() > MAX_FDS {
            return Err(Error::Protocol(format!(
                "{:?} port {}: {} sockets, more than one message carries",
                l.desc.kind,
                l.desc.port,
                l.fds.len()
            )));
        }
        let raw: Vec<RawFd> = l.fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
        send(conn, &Msg::Listener(l.desc.clone()), &raw)?;
        sent += 1;
    }
    send(conn, &Msg::Done { listeners: sent }, &[])?;
    // Our copies of the duplicates close here; the listeners go on.
    drop(listeners);
    match recv(conn)?.0 {
        Msg::Serving { pid } => Ok(pid),
        other => Err(Error::Protocol(format!("unexpected {other:?}"))),
    }
}

/// Old process, once the successor serves: parks every connection (each
/// at its next safe point, at most [`PARK_TIMEOUT`]), sends them in
/// batches, and gives back to this process the ones that could not be
/// sent. Returns how many were sent.
fn hand_connections(sock: &socket2::Socket, ctx: &Arc<Context>) -> usize {
    let started = Instant::now();
    let rx = ctx.start_parking();
    let mut parked = Vec::new();
    let deadline = started + PARK_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(c) => parked.push(c),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if ctx.tracker.is_empty() || Instant::now() >= deadline {
            break;
        }
    }
    ctx.stop_parking();
    parked.extend(rx.try_iter());
    let parked_in = started.elapsed();
    let left = ctx.tracker.len();
    let mut sent = 0;
    let mut failed: Option<Error> = None;
    let mut rest = parked.into_iter().peekable();
    while rest.peek().is_some() {
        let batch: Vec<Connection> = rest.by_ref().take(CONN_BATCH).collect();
        if failed.is_some() {
            batch
                .into_iter()
                .for_each(|c| crate::proxy::tcp::run_here(c, ctx));
            continue;
        }
        let mut descs = Vec::with_capacity(batch.len());
        let mut fds = Vec::with_capacity(2 * batch.len());
        let mut kept = Vec::with_capacity(batch.len());
        for c in batch {
            match c.duplicate_sockets() {
                Ok([a, b]) => {
                    descs.push(ConnDesc::of(&c));
                    fds.push(a);
                    fds.push(b);
                    kept.push(c);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "hand-over: cannot duplicate a connection's sockets; it stays here");
                    crate::proxy::tcp::run_here(c, ctx);
                }
            }
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let n = descs.len();
        match send(sock, &Msg::Connections { conns: descs }, &raw) {
            // Our descriptors close; the connections live on over there.
            Ok(()) => sent += n,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over: cannot send connections; the rest stay here");
                kept.into_iter()
                    .for_each(|c| crate::proxy::tcp::run_here(c, ctx));
                failed = Some(e);
            }
        }
    }
    if failed.is_none() {
        if let Err(e) = send(sock, &Msg::End { connections: sent }, &[]) {
            tracing::warn!(error = %e, "hand-over: end of connections not sent");
        }
    }
    tracing::info!(sent, not_parked = left, parked_in = ?parked_in, took = ?started.elapsed(), "hand-over: connections sent");
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signal while a step waits (a successor's SIGCHLD of an
    /// iptables-restore, say) does not end the step: sockets with a
    /// timeout fail with EINTR even under SA_RESTART.
    #[test]
    #[allow(unsafe_code)]
    fn a_signal_during_a_step_does_not_end_it() {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        extern "C" fn nothing(_: libc::c_int) {}
        let action = SigAction::new(
            SigHandler::Handler(nothing),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, which is async-signal-safe.
        unsafe { sigaction(Signal::SIGURG, &action) }.unwrap();
        let (a, b) =
            socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
            s.set_write_timeout(Some(STEP_TIMEOUT)).unwrap();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            // SAFETY: plain FFI call without arguments.
            tx.send(unsafe { libc::pthread_self() }).unwrap();
            recv(&b).map(|(m, _)| m)
        });
        let thread = rx.recv().unwrap();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(5));
            // SAFETY: the reader thread is alive until it has a message.
            assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGURG) }, 0);
        }
        send(&a, &Msg::End { connections: 7 }, &[]).unwrap();
        let got = reader.join().unwrap();
        assert!(matches!(got, Ok(Msg::End { connections: 7 })), "{got:?}");
    }
}
