//! Data-path settings ([`ProxyConfig`]) and their defaults.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::conn::CopyMode;
use super::fds::{self, FdBudget, TooManyConnections};
use super::ports::PortRange;
use super::{connect, workers};
use crate::model::Scheduler;

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
    /// (`--max-connections`): `Some(0)` no limit, `None` what the fd
    /// budget leaves beside the listeners. Beyond it, new connections
    /// wait in the listen backlog.
    pub max_connections: Option<usize>,
    /// `RLIMIT_NOFILE` the fd budget splits (0: no accounting).
    pub fd_limit: usize,
    /// Fds other parts of the process keep for themselves (the admin
    /// servers' capped connections), out of the budget.
    pub reserved_fds: usize,
    /// Once one direction of a connection has ended, the other is closed
    /// after this long without a byte (`--tcp-fin-timeout`).
    pub tcp_fin_timeout: Duration,
    /// TCP keepalive on both sockets of every proxied connection, so a
    /// peer that vanished is found (`--tcp-keepalive-*`); `None`: off.
    pub tcp_keepalive: Option<Keepalive>,
    /// Scheduler of services without a valid scheduler annotation (`--scheduler`).
    pub scheduler: Scheduler,
    /// Threads moving TCP bytes, each with its own event loop
    /// (`--worker-threads`).
    pub workers: usize,
    /// What a worker does when it runs out of work (`--worker-idle`).
    pub worker_idle: workers::Idle,
    /// How traffic from this node's pods is recognised
    /// (`--detect-local-mode` and its flags).
    pub detect_local: crate::detect_local::Config,
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
            max_connections: Some(0),
            fd_limit: 0,
            reserved_fds: 0,
            tcp_fin_timeout: DEFAULT_TCP_FIN_TIMEOUT,
            tcp_keepalive: Some(Keepalive::default()),
            scheduler: Scheduler::Rr,
            workers: workers::default_count(),
            worker_idle: workers::Idle::default(),
            detect_local: crate::detect_local::Config::default(),
        }
    }
}

impl ProxyConfig {
    /// The process's fd budget under these settings; an explicit
    /// `--max-connections` the fd limit cannot hold is an error giving
    /// the numbers.
    pub fn fd_budget(&self) -> Result<Arc<FdBudget>, TooManyConnections> {
        let fixed = fds::fixed_share(self.workers, self.reserved_fds, self.fd_limit);
        FdBudget::new(self.fd_limit, fixed, self.max_connections)
    }
}

/// TCP keepalive of proxied sockets: after `time` without a segment, a
/// probe every `interval`; `probes` unanswered ones end the connection
/// (`ETIMEDOUT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    pub time: Duration,
    /// Time between probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
    /// Unanswered probes before the peer is declared dead (`TCP_KEEPCNT`).
    pub probes: u32,
}

/// Go's defaults (`net.Dialer` and `net.ListenConfig`, Go 1.13+; 1.23 made
/// the count explicit), which upstream's userspace proxy inherited on
/// both sockets: a dead peer is found 15 s + 9 × 15 s = 2.5 min after the
/// last segment. The kernel's own (7,200 s) would keep a dead client's
/// fds for over two hours.
impl Default for Keepalive {
    fn default() -> Self {
        Self {
            time: Duration::from_secs(15),
            interval: Duration::from_secs(15),
            probes: 9,
        }
    }
}

impl Keepalive {
    /// The socket option set for socket2. `TCP_KEEPCNT` is left out
    /// where it equals the kernel's own default
    /// (`net.ipv4.tcp_keepalive_probes`, 9 unless changed, and ours): one
    /// `setsockopt` less for every dialled backend socket.
    pub fn socket2(&self) -> socket2::TcpKeepalive {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.time)
            .with_interval(self.interval);
        if Some(self.probes) == kernel_keepalive_probes() {
            keepalive
        } else {
            keepalive.with_retries(self.probes)
        }
    }
}

/// `net.ipv4.tcp_keepalive_probes` of this process's network namespace,
/// read once (`None` when it cannot be read).
fn kernel_keepalive_probes() -> Option<u32> {
    static PROBES: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *PROBES.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_keepalive_probes")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
}

/// Upstream's `--udp-timeout`: short, because a session holds a socket.
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_millis(250);
/// Default `--tcp-fin-timeout`: the kernel's `tcp_fin_timeout`.
pub const DEFAULT_TCP_FIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `--udp-max-sessions` per service port.
pub const DEFAULT_UDP_MAX_SESSIONS: usize = 65536;
