//! The proxier: reconciles the desired [`Snapshot`] with running listeners.
//!
//! Each TCP service port gets a [`Service`] (balancer + counters) and a
//! listener on its nodePort, or on a port from `--proxy-port-range`.
//! A new snapshot opens listeners for new ports, swaps endpoint lists into
//! existing balancers in place (open connections untouched), re-homes a
//! listener whose nodePort changed, and closes listeners of deleted ports
//! while their open connections finish. A port that cannot be bound is
//! reported and retried on the next sync; it never affects other services.

pub mod balancer;
pub mod conn;
pub mod connect;
pub mod ports;
pub mod proxy_protocol;
pub mod splice;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod workers;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::model::{
    Protocol, ProxyProtocol, Scheduler, ServicePort, ServicePortName, Setting, Snapshot,
    ANNOTATION_PROXY_PROTOCOL, ANNOTATION_SCHEDULER,
};
use balancer::Balancer;
pub use conn::{Connection, CopyMode};
use connect::DialResult;
use ports::{PortAllocator, PortRange};
use splice::PipePool;
use stats::LatencyHistogram;
use workers::Workers;

/// Data-path settings, fixed for the life of the process.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Address listeners bind to (`--bind-address`).
    pub bind_address: IpAddr,
    /// Where ports of services without a nodePort come from.
    pub port_range: PortRange,
    /// One dial attempt per entry, each with its timeout.
    pub dial_timeouts: Vec<Duration>,
    /// How bytes are moved (`--copy-mode`).
    pub copy_mode: CopyMode,
    /// Idle time after which a UDP session ends (`--udp-timeout`).
    pub udp_timeout: Duration,
    /// Most UDP sessions per service port (`--udp-max-sessions`).
    pub udp_max_sessions: usize,
    /// Most TCP client connections open at once, all services together
    /// (`--max-connections`); 0 is no limit. Beyond it, new connections
    /// wait in the listen backlog.
    pub max_connections: usize,
    /// Once one direction of a connection has ended, the other is closed
    /// after this long without a byte (`--tcp-fin-timeout`).
    pub tcp_fin_timeout: Duration,
    /// Scheduler of services without a valid scheduler annotation (`--scheduler`).
    pub scheduler: Scheduler,
    /// Threads moving TCP bytes, each with its own event loop and its own
    /// listening socket per service port (`--worker-threads`).
    pub workers: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            bind_address: IpAddr::from([0, 0, 0, 0]),
            port_range: PortRange::Ephemeral,
            dial_timeouts: connect::DEFAULT_DIAL_TIMEOUTS.to_vec(),
            copy_mode: CopyMode::Auto,
            udp_timeout: DEFAULT_UDP_TIMEOUT,
            udp_max_sessions: DEFAULT_UDP_MAX_SESSIONS,
            max_connections: 0,
            tcp_fin_timeout: DEFAULT_TCP_FIN_TIMEOUT,
            scheduler: Scheduler::Rr,
            workers: workers::default_count(),
        }
    }
}

/// Upstream's `--udp-timeout`: short, because a session holds a socket.
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_millis(250);
/// Default `--tcp-fin-timeout`: the kernel's `tcp_fin_timeout`.
pub const DEFAULT_TCP_FIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `--udp-max-sessions` per service port.
pub const DEFAULT_UDP_MAX_SESSIONS: usize = 65536;

/// What every listener and connection task shares.
#[derive(Debug)]
pub struct Context {
    /// Data-path settings.
    pub config: ProxyConfig,
    /// Pipes for splice mode.
    pub pipes: PipePool,
    /// Every connection task, to drain them at shutdown.
    pub tracker: TaskTracker,
    /// Cancelled at shutdown: every listener stops accepting.
    pub shutdown: CancellationToken,
    /// Permits for `--max-connections`, when set.
    pub connection_limit: Option<Arc<Semaphore>>,
    /// Times a listener found `--max-connections` reached and waited.
    pub limit_waits: AtomicU64,
    /// TCP connections ended since freed memory was last released.
    pub closed_since_release: AtomicU64,
    /// The data path's threads (none: TCP runs on the caller's runtime).
    pub workers: Option<Workers>,
    /// Raised to hand the connections over: each parks at a safe point
    /// and goes to `parked`.
    pub park: conn::Park,
    /// Where parked connections go while a hand-over collects them; none:
    /// a parked connection runs on here.
    pub parked: std::sync::Mutex<Option<std::sync::mpsc::Sender<Connection>>>,
}

impl Context {
    /// Starts a connection hand-over: every connection parks at its next
    /// safe point and arrives on the returned receiver, until
    /// [`Self::stop_parking`].
    pub fn start_parking(&self) -> std::sync::mpsc::Receiver<Connection> {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Ok(mut p) = self.parked.lock() {
            *p = Some(tx);
        }
        self.park.raise();
        rx
    }

    /// Ends the collection: connections parking later run on here.
    pub fn stop_parking(&self) {
        if let Ok(mut p) = self.parked.lock() {
            *p = None;
        }
    }

    /// Gives a parked connection to the hand-over; back when none collects.
    #[allow(clippy::result_large_err)] // returned once per connection, at most
    fn hand_over(&self, conn: Connection) -> Result<(), Connection> {
        let Ok(p) = self.parked.lock() else {
            return Err(conn);
        };
        match p.as_ref() {
            Some(tx) => tx.send(conn).map_err(|e| e.0),
            None => Err(conn),
        }
    }
}

/// Whether an error means the proxy itself ran out of fds, memory or local
/// ports: back off or fail the one connection, never blame a backend.
pub(crate) fn is_local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Idle pipes kept for reuse: enough for a burst, little memory.
const MAX_IDLE_PIPES: usize = 256;
/// Most pipes alive at once (2 fds each): bytes in flight beyond this many
/// transfers are copied through user memory instead, so pipes never take
/// the fds that connections need.
const MAX_LIVE_PIPES: usize = 1024;

/// Counters of one service port; read by status and metrics.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Client connections accepted.
    pub accepted: AtomicU64,
    /// Client connections open now.
    pub active: AtomicU64,
    /// Connections that reached a backend and ended.
    pub completed: AtomicU64,
    /// Connections closed because no backend could be reached.
    pub failed: AtomicU64,
    /// Dial attempts by [`DialResult`], in [`DialResult::ALL`] order.
    pub dials: [AtomicU64; DialResult::ALL.len()],
    /// Attempts after the first one of a connection.
    pub retries: AtomicU64,
    /// Bytes client → backend.
    pub bytes_in: AtomicU64,
    /// Bytes backend → client.
    pub bytes_out: AtomicU64,
    /// Failed attempts to bind the listener.
    pub bind_failures: AtomicU64,
    /// Accept errors from resource exhaustion (EMFILE, ENFILE, ...).
    pub accept_errors: AtomicU64,
    /// When "no backend" was last logged ([`balancer::now_ms`]).
    pub last_fail_log_ms: AtomicU64,
    /// Time from accept to a connected backend.
    pub connect_latency: LatencyHistogram,
    /// UDP: datagrams from clients.
    pub datagrams_in: AtomicU64,
    /// UDP: datagrams to clients.
    pub datagrams_out: AtomicU64,
    /// UDP: sessions ended by `--udp-timeout`.
    pub sessions_expired: AtomicU64,
    /// UDP: new clients dropped at `--udp-max-sessions`.
    pub sessions_dropped: AtomicU64,
    /// Unknown annotation values seen, by [`CONFIG_ANNOTATIONS`] entry.
    pub config_errors: [AtomicU64; 2],
}

/// The annotations whose unknown values are counted, as metric label values.
pub const CONFIG_ANNOTATIONS: [&str; 2] = ["scheduler", "proxy-protocol"];

impl ServiceStats {
    /// Counts one dial attempt.
    pub fn count_dial(&self, r: DialResult) {
        self.dials[r as usize].fetch_add(1, Relaxed);
    }

    /// Dial attempts with result `r`.
    pub fn dials(&self, r: DialResult) -> u64 {
        self.dials[r as usize].load(Relaxed)
    }

    /// Failed dial attempts, all reasons.
    pub fn failed_dials(&self) -> u64 {
        self.dials.iter().skip(1).map(|d| d.load(Relaxed)).sum()
    }
}

/// The data-path state of one service port, shared by its listener and
/// its connections (which outlive the listener when the port is removed).
#[derive(Debug)]
pub struct Service {
    /// Which service port.
    pub name: ServicePortName,
    /// Its endpoints and how to choose among them.
    pub balancer: Balancer,
    /// The endpoints for external traffic (nodePort, external IPs, LB IPs)
    /// when `externalTrafficPolicy` gives it its own set (see
    /// [`crate::model::ServiceEntry::external_endpoints`]).
    pub external: Balancer,
    /// Whether `external` is in use.
    split: std::sync::atomic::AtomicBool,
    /// ClusterIPs: a connection REDIRECTed from one of them is internal.
    cluster_ips: ArcSwap<Vec<IpAddr>>,
    /// Its counters.
    pub stats: ServiceStats,
    /// PROXY protocol header for backends: 0 off, 1 v1, 2 v2; switched in
    /// place like the scheduler (new connections follow, open ones keep theirs).
    proxy_protocol: AtomicU8,
}

// === impl Service ===

impl Service {
    /// A service port with no endpoints yet, round-robin, no PROXY header.
    pub fn new(name: ServicePortName) -> Self {
        Self {
            name,
            balancer: Balancer::default(),
            external: Balancer::default(),
            split: std::sync::atomic::AtomicBool::new(false),
            cluster_ips: ArcSwap::from_pointee(Vec::new()),
            stats: ServiceStats::default(),
            proxy_protocol: AtomicU8::new(0),
        }
    }

    /// The PROXY protocol version sent to backends, if any.
    pub fn proxy_protocol(&self) -> Option<ProxyProtocol> {
        match self.proxy_protocol.load(Relaxed) {
            1 => Some(ProxyProtocol::V1),
            2 => Some(ProxyProtocol::V2),
            _ => None,
        }
    }

    /// Sets the PROXY protocol version for new connections.
    pub fn set_proxy_protocol(&self, v: Option<ProxyProtocol>) {
        let n = match v {
            None => 0,
            Some(ProxyProtocol::V1) => 1,
            Some(ProxyProtocol::V2) => 2,
        };
        self.proxy_protocol.store(n, Relaxed);
    }

    /// The balancer for a client connection: the external one when the
    /// service has one and the client did not come REDIRECTed from a
    /// ClusterIP (it dialled the nodePort, an external IP or an LB IP).
    pub fn balancer_for(&self, client: &tokio::net::TcpStream) -> &Balancer {
        if !self.split.load(Relaxed) {
            return &self.balancer;
        }
        let internal = proxy_protocol::original_dst(client)
            .is_ok_and(|dst| self.cluster_ips.load().contains(&dst.ip().to_canonical()));
        if internal {
            &self.balancer
        } else {
            &self.external
        }
    }

    /// Swaps in the endpoints of `entry` (both traffic views); true when
    /// they changed.
    fn update_endpoints(&self, entry: &crate::model::ServiceEntry) -> bool {
        let affinity = entry.port.affinity;
        let external = entry.external_endpoints.as_deref();
        let changed = self.balancer.update(&entry.endpoints, affinity);
        let external_changed = self.external.update(external.unwrap_or(&[]), affinity);
        self.split.store(external.is_some(), Relaxed);
        changed || external_changed
    }

    /// Applies the annotation settings of `spec` in place (`default`: the
    /// `--scheduler` flag). Unknown values are logged and counted, and the
    /// default applies; the service is served either way.
    pub fn apply_settings(&self, spec: &ServicePort, default: Scheduler) {
        if let Setting::Invalid(v) = &spec.scheduler {
            self.stats.config_errors[0].fetch_add(1, Relaxed);
            tracing::warn!(service = %self.name, annotation = ANNOTATION_SCHEDULER, value = %v, default = %default,
                "unknown scheduler (want rr, lc, sh, sed, nq, p2c or random); using the default");
        }
        if let Setting::Invalid(v) = &spec.proxy_protocol {
            self.stats.config_errors[1].fetch_add(1, Relaxed);
            tracing::warn!(service = %self.name, annotation = ANNOTATION_PROXY_PROTOCOL, value = %v,
                "unknown PROXY protocol version (want v1, v2 or off); no header is sent");
        }
        let scheduler = spec.scheduler.or(default);
        self.cluster_ips.store(Arc::new(spec.cluster_ips.clone()));
        self.external.set_scheduler(scheduler);
        if self.balancer.set_scheduler(scheduler) {
            tracing::info!(service = %self.name, scheduler = %scheduler, "scheduler in force");
        }
        // TCP only: a UDP port of the same Service sends no header.
        let pp = match &spec.proxy_protocol {
            Setting::Set(v) if self.name.protocol == Protocol::Tcp => Some(*v),
            _ => None,
        };
        if pp != self.proxy_protocol() {
            tracing::info!(service = %self.name, proxy_protocol = pp.map_or("off", |p| p.as_str()), "PROXY protocol header");
            self.set_proxy_protocol(pp);
        }
    }
}

/// A service port as status and metrics see it: live counters, spec, port.
#[derive(Clone, Debug)]
pub struct ServiceView {
    /// Live state and counters.
    pub service: Arc<Service>,
    /// The spec in force.
    pub spec: ServicePort,
    /// The listener's port, once bound.
    pub listener_port: Option<u16>,
}

/// The served service ports, republished after every sync, for readers on
/// other tasks (admin HTTP).
pub type Published = Arc<ArcSwap<Vec<ServiceView>>>;

/// Whether the proxy serves a protocol (SCTP is parsed, never served).
fn served_protocol(p: Protocol) -> bool {
    matches!(p, Protocol::Tcp | Protocol::Udp)
}

/// Index of a protocol's port allocator.
fn proto_index(p: Protocol) -> usize {
    usize::from(p == Protocol::Udp)
}

/// A bound, not yet running, listening socket (TCP: all the sockets of
/// one port).
enum Bound {
    Tcp(Vec<std::net::TcpListener>),
    Udp(std::net::UdpSocket),
}

impl Bound {
    fn bind(proto: Protocol, addr: SocketAddr) -> std::io::Result<Self> {
        match proto {
            Protocol::Udp => udp::bind(addr).map(Self::Udp),
            _ => tcp::bind(addr).map(|l| Self::Tcp(vec![l])),
        }
    }

    fn port(&self) -> std::io::Result<u16> {
        match self {
            Self::Tcp(l) => match l.first() {
                Some(l) => l.local_addr().map(|a| a.port()),
                None => Err(std::io::ErrorKind::InvalidInput.into()),
            },
            Self::Udp(l) => l.local_addr().map(|a| a.port()),
        }
    }

    fn spawn(self, service: Arc<Service>, ctx: Arc<Context>) -> std::io::Result<Listener> {
        match self {
            Self::Tcp(l) => tcp::spawn(l, service, ctx).map(Listener::Tcp),
            Self::Udp(l) => udp::spawn(l, service, ctx).map(Listener::Udp),
        }
    }
}

/// A running listener of either protocol; dropping it stops it.
#[derive(Debug)]
enum Listener {
    Tcp(tcp::ListenerHandle),
    Udp(udp::UdpHandle),
}

impl Listener {
    fn port(&self) -> u16 {
        match self {
            Self::Tcp(h) => h.port,
            Self::Udp(h) => h.port,
        }
    }

    fn duplicate(&self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        match self {
            Self::Tcp(h) => h.duplicate(),
            Self::Udp(h) => h.duplicate().map(|fd| vec![fd]),
        }
    }
}

/// A served service port in the proxier's table.
struct Served {
    spec: ServicePort,
    service: Arc<Service>,
    listener: Option<Listener>,
    /// The port taken from the allocator (not a nodePort), to give back.
    allocated: Option<u16>,
}

/// Outcome of one [`Proxier::sync`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Service ports served with a listener.
    pub listening: usize,
    /// Service ports whose listener could not be bound (retried next sync).
    pub pending: usize,
    /// Listeners opened in this sync.
    pub opened: usize,
    /// Listeners closed in this sync.
    pub closed: usize,
    /// Balancers whose endpoint set changed.
    pub endpoints_changed: usize,
    /// Service ports whose addresses or ports changed (rules must follow).
    pub spec_changed: usize,
}

/// Reconciles snapshots into listeners; owned by the run loop.
pub struct Proxier {
    ctx: Arc<Context>,
    served: BTreeMap<ServicePortName, Served>,
    /// Port allocators for TCP and UDP (independent port spaces).
    ports: [PortAllocator; 2],
    /// Non-TCP ports already reported as not served, to log them once.
    unserved: BTreeSet<ServicePortName>,
    published: Published,
    /// Sockets handed over by the previous process, adopted by the first
    /// sync that serves their service port.
    inherited: crate::handover::Inherited,
}

impl Proxier {
    /// A proxier serving nothing yet.
    pub fn new(config: ProxyConfig) -> Self {
        let ports = [
            PortAllocator::new(config.port_range),
            PortAllocator::new(config.port_range),
        ];
        let connection_limit =
            (config.max_connections > 0).then(|| Arc::new(Semaphore::new(config.max_connections)));
        let workers = match Workers::start(config.workers) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot start worker threads; TCP runs on the main runtime");
                None
            }
        };
        let ctx = Arc::new(Context {
            config,
            workers,
            pipes: PipePool::new(MAX_IDLE_PIPES, MAX_LIVE_PIPES),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            connection_limit,
            limit_waits: AtomicU64::new(0),
            closed_since_release: AtomicU64::new(0),
            park: conn::Park::default(),
            parked: std::sync::Mutex::new(None),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(housekeeping(Arc::downgrade(&ctx)));
        }
        Self {
            ctx,
            served: BTreeMap::new(),
            ports,
            unserved: BTreeSet::new(),
            published: Published::default(),
            inherited: crate::handover::Inherited::default(),
        }
    }

    /// Takes the service ports' sockets handed over by the previous
    /// process: the next [`Self::sync`] serves each of them from its
    /// socket (same port) instead of binding, and starts its counters
    /// from the old totals. Call [`Self::drop_unadopted`] after it.
    pub fn adopt(&mut self, inherited: &mut crate::handover::Inherited) {
        self.inherited.tcp = std::mem::take(&mut inherited.tcp);
        self.inherited.udp = std::mem::take(&mut inherited.udp);
    }

    /// Closes handed-over sockets no service port took (the service is
    /// gone, or its nodePort changed); returns how many.
    pub fn drop_unadopted(&mut self) -> usize {
        let left = self.inherited.len();
        for name in self.inherited.tcp.keys().chain(self.inherited.udp.keys()) {
            tracing::info!(service = %name, "handed-over listener not adopted: closed");
        }
        self.inherited = crate::handover::Inherited::default();
        left
    }

    /// Duplicates of every listening socket with its description and
    /// counters, for a hand-over to the next process.
    pub fn export(&self) -> Vec<crate::handover::Exported> {
        use crate::handover::{Counters, Exported, Kind, ListenerDesc};
        let mut out = Vec::new();
        for (name, s) in &self.served {
            let Some(listener) = &s.listener else {
                continue;
            };
            let fds = match listener.duplicate() {
                Ok(fds) => fds,
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "cannot duplicate the listener for the hand-over");
                    continue;
                }
            };
            let st = &s.service.stats;
            out.push(Exported {
                desc: ListenerDesc {
                    kind: match listener {
                        Listener::Tcp(_) => Kind::Tcp,
                        Listener::Udp(_) => Kind::Udp,
                    },
                    service: Some(name.clone()),
                    port: listener.port(),
                    counters: Counters {
                        accepted: st.accepted.load(Relaxed),
                        completed: st.completed.load(Relaxed),
                        failed: st.failed.load(Relaxed),
                        bytes_in: st.bytes_in.load(Relaxed),
                        bytes_out: st.bytes_out.load(Relaxed),
                        datagrams_in: st.datagrams_in.load(Relaxed),
                        datagrams_out: st.datagrams_out.load(Relaxed),
                    },
                    backends: s
                        .service
                        .balancer
                        .endpoints()
                        .into_iter()
                        .map(|(_, b)| crate::handover::BackendCounters {
                            addr: b.addr,
                            total: b.total.load(Relaxed),
                            dial_failures: b.dial_failures.load(Relaxed),
                            bytes_in: b.bytes_in.load(Relaxed),
                            bytes_out: b.bytes_out.load(Relaxed),
                        })
                        .collect(),
                },
                fds,
            });
        }
        out
    }

    /// The handed-over socket of `name`, if it fits the spec (a nodePort
    /// must match), with its counters; a misfit is closed.
    fn take_inherited(
        &mut self,
        name: &ServicePortName,
        node_port: Option<u16>,
    ) -> Option<(Bound, u16, crate::handover::Carried)> {
        let (bound, port, counters) = match name.protocol {
            Protocol::Udp => {
                let (port, s, c) = self.inherited.udp.remove(name)?;
                (Bound::Udp(s), port, c)
            }
            _ => {
                let (port, ls, c) = self.inherited.tcp.remove(name)?;
                (Bound::Tcp(ls), port, c)
            }
        };
        if node_port.is_some_and(|np| np != port) {
            tracing::info!(service = %name, port, "handed-over listener is not on the nodePort now: closed");
            return None;
        }
        Some((bound, port, counters))
    }

    /// The served service ports, kept current: hand this to readers.
    pub fn published(&self) -> Published {
        Arc::clone(&self.published)
    }

    fn publish(&self) {
        let views = self
            .served
            .values()
            .map(|s| ServiceView {
                service: Arc::clone(&s.service),
                spec: s.spec.clone(),
                listener_port: s.listener.as_ref().map(Listener::port),
            })
            .collect();
        self.published.store(Arc::new(views));
    }

    /// The shared data-path context (pipes, tracker).
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The listener port of a service port, once bound.
    pub fn listener_port(&self, name: &ServicePortName) -> Option<u16> {
        self.served.get(name)?.listener.as_ref().map(Listener::port)
    }

    /// Every served service port with its state and listener port.
    pub fn services(&self) -> impl Iterator<Item = (&Arc<Service>, &ServicePort, Option<u16>)> {
        self.served
            .values()
            .map(|s| (&s.service, &s.spec, s.listener.as_ref().map(Listener::port)))
    }

    /// Whether some listener failed to bind and wants a retry.
    pub fn has_pending(&self) -> bool {
        self.served.values().any(|s| s.listener.is_none())
    }

    /// Makes the running state match `snapshot`.
    pub fn sync(&mut self, snapshot: &Snapshot) -> SyncReport {
        let mut report = SyncReport::default();
        let wanted = |name: &ServicePortName| {
            served_protocol(name.protocol) && snapshot.services.contains_key(name)
        };

        // Deleted first, so their ports are free for newcomers.
        let gone: Vec<ServicePortName> =
            self.served.keys().filter(|n| !wanted(n)).cloned().collect();
        for name in gone {
            if let Some(s) = self.served.remove(&name) {
                report.closed += usize::from(s.listener.is_some());
                self.close(s);
                tracing::info!(service = %name, "service port removed; open connections drain");
            }
        }
        self.unserved.retain(|n| snapshot.services.contains_key(n));

        // Node ports of every service port: never handed out from the range.
        let node_ports: BTreeSet<u16> = snapshot
            .services
            .values()
            .filter_map(|e| e.port.node_port)
            .collect();

        for (name, entry) in &snapshot.services {
            if !served_protocol(name.protocol) {
                if self.unserved.insert(name.clone()) {
                    tracing::info!(service = %name, protocol = %name.protocol, "not served: only TCP and UDP service ports are proxied");
                }
                continue;
            }
            let mut settings_due = false;
            let served = self.served.entry(name.clone()).or_insert_with(|| {
                settings_due = true;
                Served {
                    spec: entry.port.clone(),
                    service: Arc::new(Service::new(name.clone())),
                    listener: None,
                    allocated: None,
                }
            });
            if served.spec.node_port != entry.port.node_port && served.listener.is_some() {
                tracing::info!(service = %name, from = ?served.spec.node_port, to = ?entry.port.node_port, "nodePort changed: re-homing the listener");
                served.listener = None;
                report.closed += 1;
                if let Some(p) = served.allocated.take() {
                    self.ports[proto_index(name.protocol)].release(p);
                }
            }
            if served.spec != entry.port {
                report.spec_changed += 1;
                served.spec = entry.port.clone();
                settings_due = true;
            }
            if settings_due {
                // New or changed spec: scheduler and PROXY header swap in place.
                served
                    .service
                    .apply_settings(&entry.port, self.ctx.config.scheduler);
            }
            if served.service.update_endpoints(entry) {
                report.endpoints_changed += 1;
            }
        }

        // Bind what is not listening yet (new, re-homed, or failed before).
        let names: Vec<ServicePortName> = self
            .served
            .iter()
            .filter(|(_, s)| s.listener.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if self.open(&name, &node_ports) {
                report.opened += 1;
            }
        }
        report.listening = self
            .served
            .values()
            .filter(|s| s.listener.is_some())
            .count();
        report.pending = self.served.len() - report.listening;
        self.publish();
        report
    }

    /// Binds the listener of `name`; false (reported) when it cannot.
    fn open(&mut self, name: &ServicePortName, node_ports: &BTreeSet<u16>) -> bool {
        let bind_ip = self.ctx.config.bind_address;
        let proto = name.protocol;
        let Some(node_port) = self.served.get(name).map(|s| s.spec.node_port) else {
            return false;
        };
        let inherited = self.take_inherited(name, node_port);
        let Some(served) = self.served.get(name) else {
            return false;
        };
        let result = if let Some((bound, port, (c, backends))) = inherited {
            let st = &served.service.stats;
            let ours = served.service.balancer.endpoints();
            for b in &backends {
                if let Some((_, e)) = ours.iter().find(|(_, e)| e.addr == b.addr) {
                    e.total.fetch_add(b.total, Relaxed);
                    e.dial_failures.fetch_add(b.dial_failures, Relaxed);
                    e.bytes_in.fetch_add(b.bytes_in, Relaxed);
                    e.bytes_out.fetch_add(b.bytes_out, Relaxed);
                }
            }
            for (counter, v) in [
                (&st.accepted, c.accepted),
                (&st.completed, c.completed),
                (&st.failed, c.failed),
                (&st.bytes_in, c.bytes_in),
                (&st.bytes_out, c.bytes_out),
                (&st.datagrams_in, c.datagrams_in),
                (&st.datagrams_out, c.datagrams_out),
            ] {
                counter.fetch_add(v, Relaxed);
            }
            tracing::info!(service = %name, port, "serving from the handed-over listener");
            Ok((bound, node_port.is_none().then_some(port)))
        } else if let Some(np) = served.spec.node_port {
            let taken = self.served.iter().find(|(n, s)| {
                *n != name
                    && n.protocol == proto
                    && s.listener.as_ref().is_some_and(|l| l.port() == np)
            });
            if let Some((other, _)) = taken {
                Err(format!(
                    "nodePort {np}/{proto} is already served for {other}"
                ))
            } else {
                Bound::bind(proto, SocketAddr::new(bind_ip, np))
                    .map(|l| (l, None))
                    .map_err(|e| format!("cannot listen on nodePort {bind_ip}:{np}/{proto}: {e}"))
            }
        } else {
            let mut last = String::from("no free port left in --proxy-port-range");
            let mut bound = None;
            for port in self.ports[proto_index(proto)].candidates(node_ports) {
                match Bound::bind(proto, SocketAddr::new(bind_ip, port)) {
                    Ok(l) => {
                        bound = Some(l);
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                        last = format!("port {port}/{proto} in use");
                    }
                    Err(e) => {
                        last = format!("cannot listen on {bind_ip}:{port}/{proto}: {e}");
                        break;
                    }
                }
            }
            bound.ok_or(last).and_then(|l| {
                let port = l.port().map_err(|e| e.to_string())?;
                Ok((l, Some(port)))
            })
        };
        let served = self.served.get_mut(name).expect("looked up above");
        let spawned = result.and_then(|(l, allocated)| {
            l.spawn(Arc::clone(&served.service), Arc::clone(&self.ctx))
                .map(|h| (h, allocated))
                .map_err(|e| e.to_string())
        });
        match spawned {
            Ok((handle, allocated)) => {
                if let Some(p) = allocated {
                    self.ports[proto_index(proto)].hold(p);
                }
                tracing::info!(service = %name, port = handle.port(), endpoints = served.service.balancer.usable_len(), "listening");
                served.allocated = allocated;
                served.listener = Some(handle);
                true
            }
            Err(e) => {
                served.service.stats.bind_failures.fetch_add(1, Relaxed);
                tracing::warn!(service = %name, error = %e, "listener not bound; retrying on the next sync");
                false
            }
        }
    }

    fn close(&mut self, s: Served) {
        if let Some(p) = s.allocated {
            self.ports[proto_index(s.service.name.protocol)].release(p);
        }
        drop(s.listener);
    }

    /// Stops every listener at once; open connections go on.
    pub fn close_listeners(&mut self) {
        self.ctx.shutdown.cancel();
        let served = std::mem::take(&mut self.served);
        for (_, s) in served {
            self.close(s);
        }
        self.publish();
    }

    /// Stops every listener, then waits up to `grace` for open connections
    /// to finish. Returns the number still open when the grace ran out
    /// (they are closed when the proxier is dropped).
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        self.close_listeners();
        self.ctx.tracker.close();
        match tokio::time::timeout(grace, self.ctx.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.ctx.tracker.len(),
        }
    }
}

impl Drop for Proxier {
    /// Stops the worker threads; connections still open on them close.
    fn drop(&mut self) {
        if let Some(w) = &self.ctx.workers {
            w.stop();
        }
    }
}

/// Connections that must have closed since the last release before freed
/// heap is handed back to the kernel.
const RELEASE_AFTER_CLOSED: u64 = 512;

/// Every [`splice::PIPE_TRIM_PERIOD`] while the context lives: closes idle
/// pipes, and once many connections have closed, returns the allocator's
/// free memory to the kernel, so fds and RSS come back to their baseline
/// after a burst.
async fn housekeeping(ctx: std::sync::Weak<Context>) {
    let mut tick = tokio::time::interval(splice::PIPE_TRIM_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(ctx) = ctx.upgrade() else { return };
        let n = ctx.pipes.trim();
        if n > 0 {
            tracing::debug!(closed = n, "idle pipes trimmed");
        }
        if ctx.closed_since_release.load(Relaxed) >= RELEASE_AFTER_CLOSED {
            ctx.closed_since_release.store(0, Relaxed);
            release_free_memory();
        }
    }
}

/// Hands the allocator's free pages back to the kernel (glibc keeps freed
/// memory of its arenas otherwise: 8,000 closed connections left ~17 MiB).
#[allow(unsafe_code)] // one libc call with no arguments to uphold
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
