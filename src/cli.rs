//! Command line: kube-proxy's flag names where the meaning is the same.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::iptables::exec::BackendChoice;
use crate::iptables::Mode as IptablesMode;
use crate::model::Scheduler;
use crate::proxy::ports::PortRange;
use crate::proxy::workers::Idle;
use crate::proxy::CopyMode;

/// Port of `--healthz-bind-address` (kube-proxy's `ProxyHealthzPort`).
pub const HEALTHZ_PORT: u16 = 10256;

/// Port of `--metrics-bind-address` (kube-proxy's `ProxyStatusPort`).
pub const METRICS_PORT: u16 = 10249;

/// Default `--shutdown-grace`: long enough for typical requests to finish,
/// short enough for a rolling update of a DaemonSet.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "10s";

/// Kubernetes' userspace service proxy, rebuilt: per-Service listeners,
/// round-robin with retry, splice(2).
#[derive(Debug, Parser)]
#[command(
    name = "kube-userspace-proxy",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; the proxy itself when absent.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of the proxy when no subcommand is given.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run(RunArgs),
    /// Start three local backends (one dead) behind NodePort 30080 and show
    /// round-robin and retry.
    Demo(DemoArgs),
    /// Print the running proxy's services and backends as a table, like
    /// `ipvsadm -Ln --stats`.
    Status(StatusArgs),
    /// Print the iptables-restore payload the proxy would apply for its
    /// discovery source, and change nothing. Listeners are bound for the
    /// moment to learn their ports: ephemeral ones differ from a running
    /// proxy's unless `--proxy-port-range` is set.
    Rules(RunArgs),
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging flags, shared by every subcommand.
#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter, `RUST_LOG` syntax (e.g. `info,kube_userspace_proxy=debug`);
    /// `RUST_LOG` wins when set. Default: `info` (`warn` for `demo`).
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

/// Flags of the proxy. With `--config`, a flag given on the command line
/// wins over the file's field, which wins over the default.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// kube-proxy's configuration file (`KubeProxyConfiguration`,
    /// `kubeproxy.config.k8s.io/v1alpha1`, YAML or JSON), as kubeadm writes
    /// it: its fields set the flags below that have one, flags given on
    /// the command line win; fields without a use here are logged.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of Service and EndpointSlice YAML to serve (re-read on
    /// change). Without it and without a cluster, the embedded examples.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig of the cluster to watch (Kubernetes discovery). Without
    /// it, `KUBECONFIG` or in-cluster configuration (in a pod) is used.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// API server URL, overriding the kubeconfig's.
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// Node name, for traffic policy Local (defaults to the hostname).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// Services labelled `service.kubernetes.io/service-proxy-name` belong
    /// to another proxy unless the label's value is this name. Unlabelled
    /// services are always served.
    #[arg(long, value_name = "NAME")]
    pub service_proxy_name: Option<String>,
    /// The cluster's pod CIDRs (at most one per IP family, comma-separated):
    /// with `--detect-local-mode ClusterCIDR`, traffic from them counts as
    /// from this node's pods, which `externalTrafficPolicy: Local` lets reach
    /// every endpoint. Empty: pods are not told apart.
    #[arg(long, default_value = "", value_name = "CIDRS", value_parser = parse_cidrs)]
    pub cluster_cidr: Cidrs,
    /// How traffic from this node's pods is recognised: ClusterCIDR,
    /// NodeCIDR (the Node's `spec.podCIDRs`), BridgeInterface or
    /// InterfaceNamePrefix (as kube-proxy).
    #[arg(long, value_enum, default_value_t = crate::detect_local::Mode::ClusterCidr)]
    pub detect_local_mode: crate::detect_local::Mode,
    /// With `--detect-local-mode BridgeInterface`: the pods' bridge.
    #[arg(long, default_value = "", value_name = "NAME")]
    pub pod_bridge_interface: String,
    /// With `--detect-local-mode InterfaceNamePrefix`: the prefix of the
    /// pods' interfaces.
    #[arg(long, default_value = "", value_name = "PREFIX")]
    pub pod_interface_name_prefix: String,
    /// Address every listener binds to. `0.0.0.0` (the default) means every
    /// address of both families: listeners bind `::` with IPv4 mapped in
    /// when the kernel has IPv6.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// The node addresses nodePorts are served on (kube-proxy's): CIDRs,
    /// comma-separated, or `primary` alone (the Node's primary addresses);
    /// empty: all of them. Enforced by the rules (nodePorts and
    /// health-check node ports refuse other node addresses); not with
    /// `--iptables off`, which start-up says.
    #[arg(long, default_value = "", value_name = "CIDRS", value_parser = parse_nodeport_addresses)]
    pub nodeport_addresses: NodePortAddresses,
    /// Listener ports for service ports without a nodePort: `a-b`, `a+n`,
    /// or empty for kernel-chosen ephemeral ports (the default, as upstream).
    #[arg(long, default_value = "", value_parser = parse_port_range)]
    pub proxy_port_range: PortRange,
    /// Dial attempts and their timeouts, comma-separated (upstream's).
    #[arg(long, default_value = "250ms,500ms,1s,2s", value_parser = parse_durations)]
    pub dial_timeouts: Durations,
    /// How bytes are moved: `auto` (user memory for small messages,
    /// `splice` for bulk), always zero-copy `splice`, or plain `copy`.
    #[arg(long, value_enum, default_value_t = CopyMode::Auto)]
    pub copy_mode: CopyMode,
    /// Scheduler of services without a (valid) `kube-userspace-proxy.io/scheduler`
    /// annotation: rr, lc, sh, sed, nq, p2c or random.
    #[arg(long, value_enum, default_value_t = Scheduler::Rr)]
    pub scheduler: Scheduler,
    /// A UDP session ends after this long without a datagram either way.
    /// Upstream's 250ms keeps sockets few; raise it for backends slower to
    /// answer (a DNS server recursing for seconds), as each late answer is
    /// otherwise lost with its session.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub udp_timeout: Duration,
    /// Most UDP sessions per service port; datagrams of further new clients
    /// are dropped (and counted), existing sessions keep working.
    #[arg(long, default_value_t = crate::proxy::DEFAULT_UDP_MAX_SESSIONS)]
    pub udp_max_sessions: usize,
    /// Most TCP client connections open at once, all services together;
    /// further clients wait in the listen backlog. Default: what the fd
    /// limit (raised to its hard maximum at start-up) leaves after the
    /// process's own share, every Service port's listener and a headroom
    /// for pipes and UDP sessions, two fds a connection; it follows the
    /// number of Service ports. A value the fd limit cannot hold is
    /// refused at start-up. 0: no limit.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Once one side of a connection has closed, the other direction is
    /// closed after this long without a byte (a client that left while
    /// its backend never answers holds nothing for ever).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub tcp_fin_timeout: Duration,
    /// TCP keepalive on both sockets of every proxied connection: idle
    /// time before the first probe (`TCP_KEEPIDLE`). A client or backend
    /// that vanished without FIN or RST is found after time + probes ×
    /// interval, and its connection closed. Go's default, which upstream's
    /// userspace proxy had. 0 turns keepalive off.
    #[arg(long, default_value = "15s", value_parser = parse_keepalive_time)]
    pub tcp_keepalive_time: Duration,
    /// Time between keepalive probes (`TCP_KEEPINTVL`).
    #[arg(long, default_value = "15s", value_parser = parse_keepalive_interval)]
    pub tcp_keepalive_interval: Duration,
    /// Unanswered keepalive probes before the peer is declared dead
    /// (`TCP_KEEPCNT`).
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..=127))]
    pub tcp_keepalive_probes: u32,
    /// Threads moving TCP bytes, each with its own event loop and its own
    /// `SO_REUSEPORT` socket per service port: a connection stays on the
    /// thread that accepted it (HAProxy's `nbthread`). Default: the CPUs
    /// this process may use (affinity and cgroup quota).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
    /// What a worker does when it runs out of work: `yield` its CPU once
    /// to threads waiting for it, then sleep until an event (under load it
    /// wakes to a batch of events, not one), `sleep` at once, or `auto`:
    /// whichever of the two costs that worker less CPU per byte moved.
    #[arg(long, value_enum, default_value_t = Idle::Auto)]
    pub worker_idle: Idle,
    /// Manage the iptables redirect of ClusterIP, externalIP and LB-IP traffic.
    #[arg(long, value_enum, default_value_t = IptablesMode::Auto)]
    pub iptables: IptablesMode,
    /// iptables implementation: the one holding rules (auto), legacy or nft.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub iptables_backend: BackendChoice,
    /// Rules are re-applied at least this often, repairing manual deletions.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub iptables_sync_period: Duration,
    /// Rules are applied at most this often, however fast services change.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub iptables_min_sync_period: Duration,
    /// Remove our iptables chains and jumps (also a crashed run's) and exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Address of `/metrics`, `/debug/services` and the stats page `/`
    /// (keep it local: debug state is not for the network).
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT)))]
    pub metrics_bind_address: SocketAddr,
    /// Address of `/healthz`, `/readyz` and `/livez` (kubelet probes it).
    #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, HEALTHZ_PORT)))]
    pub healthz_bind_address: SocketAddr,
    /// How long open connections may finish after SIGTERM.
    #[arg(long, default_value = DEFAULT_SHUTDOWN_GRACE, value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Unix socket of the hand-over to the next process (upgrades): a new
    /// process started with the same path takes the listeners of the one
    /// running there, which then drains and exits without removing the
    /// rules. The directory must exist; empty disables it.
    #[arg(long, value_name = "PATH", default_value = crate::handover::DEFAULT_SOCKET)]
    pub handover_socket: PathBuf,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

impl RunArgs {
    /// The detector's flags (`--detect-local-mode` and the values it uses).
    pub fn detect_local(&self) -> crate::detect_local::Config {
        crate::detect_local::Config {
            mode: self.detect_local_mode,
            cluster_cidrs: self.cluster_cidr.0.clone(),
            bridge_interface: self.pod_bridge_interface.clone(),
            interface_name_prefix: self.pod_interface_name_prefix.clone(),
        }
    }
}

/// Flags of `demo`.
#[derive(Clone, Debug, Args)]
pub struct DemoArgs {
    /// Keep serving on 30080 after the requests, until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// Address the demo listener binds to.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_address: IpAddr,
    /// Address of `/metrics`, `/debug/services` and the stats page (`/`) while the demo runs.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,
    /// How bytes are moved.
    #[arg(long, value_enum, default_value_t = CopyMode::Auto)]
    pub copy_mode: CopyMode,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Output format of `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned table.
    #[default]
    Table,
    /// The raw `/debug/services` JSON.
    Json,
}

/// Flags of `status`.
#[derive(Clone, Debug, Args)]
pub struct StatusArgs {
    /// The proxy's `--metrics-bind-address`.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub admin: SocketAddr,
    /// Refresh every `--interval` until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Show rates per second (two samples `--interval` apart).
    #[arg(long)]
    pub rate: bool,
    /// Time between samples.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// A list of durations (`--dial-timeouts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Durations(pub Vec<Duration>);

/// The kernel's range of `TCP_KEEPIDLE` and `TCP_KEEPINTVL`, whole seconds.
const KEEPALIVE_MAX_SECS: u64 = 32_767;

/// `--tcp-keepalive-time`: 0 (off) or 1 s to 32,767 s, whole seconds.
fn parse_keepalive_time(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Ok(d);
    }
    parse_keepalive_interval(s)
}

/// `--tcp-keepalive-interval`: 1 s to 32,767 s, whole seconds.
fn parse_keepalive_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > KEEPALIVE_MAX_SECS {
        return Err(format!(
            "{s:?}: TCP keepalive takes whole seconds from 1s to {KEEPALIVE_MAX_SECS}s"
        ));
    }
    Ok(d)
}

/// CIDRs of a flag (`--cluster-cidr`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cidrs(pub Vec<ipnet::IpNet>);

/// `--nodeport-addresses` (and `nodePortAddresses`): CIDRs, or `primary`
/// alone; empty: every node address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePortAddresses(pub Vec<String>);

impl NodePortAddresses {
    /// Upstream's keyword for the Node's primary addresses.
    pub const PRIMARY: &'static str = "primary";

    /// Checks a list as upstream's `validateKubeProxyNodePortAddress`: each
    /// entry a CIDR, or `primary` as the only one. The error gives the
    /// entry's index.
    pub fn new(list: Vec<String>) -> Result<Self, (usize, String)> {
        for (i, a) in list.iter().enumerate() {
            if a == Self::PRIMARY {
                if list.len() != 1 {
                    return Err((i, "can't use both 'primary' and CIDRs".into()));
                }
            } else if let Err(e) = a.parse::<ipnet::IpNet>() {
                return Err((i, format!("{a:?} is not a CIDR ({e})")));
            }
        }
        Ok(Self(list))
    }

    /// The node addresses nodePorts answer on in one family (`v6`), as
    /// upstream's `NewNodePortAddresses` reads the list, with `primary`
    /// expanded as kube-proxy's server does (the node's IP of the family,
    /// `/32` or `/128`, unless unknown or loopback); `None`: every address
    /// (no CIDR of the family: upstream's `MatchAll`).
    pub fn for_family(
        &self,
        v6: bool,
        primary_ip: Option<std::net::IpAddr>,
    ) -> Option<Vec<ipnet::IpNet>> {
        let cidrs: Vec<ipnet::IpNet> = self
            .0
            .iter()
            .filter_map(|a| match a.as_str() {
                Self::PRIMARY => primary_ip
                    .filter(|ip| !ip.is_loopback())
                    .map(ipnet::IpNet::from),
                a => a.parse::<ipnet::IpNet>().ok().map(|n| n.trunc()),
            })
            .filter(|n| n.addr().is_ipv6() == v6)
            .collect();
        let all = cidrs.is_empty() || cidrs.iter().any(|n| n.prefix_len() == 0);
        (!all).then_some(cidrs)
    }
}

fn parse_nodeport_addresses(s: &str) -> Result<NodePortAddresses, String> {
    NodePortAddresses::new(
        s.split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect(),
    )
    .map_err(|(i, e)| format!("entry {}: {e}", i + 1))
}

fn parse_cidrs(s: &str) -> Result<Cidrs, String> {
    crate::detect_local::parse_cidrs(s).map(Cidrs)
}

fn parse_durations(s: &str) -> Result<Durations, String> {
    let v = s
        .split(',')
        .map(|d| humantime::parse_duration(d.trim()).map_err(|e| format!("{:?}: {e}", d.trim())))
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() || v.iter().any(Duration::is_zero) {
        return Err("need at least one non-zero timeout".into());
    }
    Ok(Durations(v))
}

fn parse_port_range(s: &str) -> Result<PortRange, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let cli = Cli::try_parse_from(["kube-userspace-proxy"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.dial_timeouts.0.len(), 4);
        assert_eq!(cli.run.proxy_port_range, PortRange::Ephemeral);
    }

    #[test]
    fn bad_flags_name_themselves() {
        let err = Cli::try_parse_from(["x", "--dial-timeouts", "1s,zz"]).unwrap_err();
        assert!(err.to_string().contains("--dial-timeouts"), "{err}");
        let err = Cli::try_parse_from(["x", "--proxy-port-range", "9-1"]).unwrap_err();
        assert!(err.to_string().contains("--proxy-port-range"), "{err}");
    }

    #[test]
    fn nodeport_addresses_per_family_as_upstream() {
        let of = |list: &[&str]| NodePortAddresses(list.iter().map(|s| s.to_string()).collect());
        let npa = of(&["10.0.0.0/8", "192.168.1.7/24", "fd00::/64"]);
        let v4: Vec<String> = npa
            .for_family(false, None)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(v4, ["10.0.0.0/8", "192.168.1.0/24"]);
        assert_eq!(npa.for_family(true, None).unwrap().len(), 1);
        // No CIDR of a family, or a zero CIDR: every address of it.
        assert_eq!(of(&["10.0.0.0/8"]).for_family(true, None), None);
        assert_eq!(
            of(&["0.0.0.0/0", "10.0.0.0/8"]).for_family(false, None),
            None
        );
        assert_eq!(of(&[]).for_family(false, None), None);
        // primary: the node's IP of the family, when known and not loopback.
        let primary = of(&["primary"]);
        let ip = "10.1.2.3".parse().ok();
        assert_eq!(
            primary.for_family(false, ip).unwrap()[0].to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(primary.for_family(true, ip), None);
        assert_eq!(primary.for_family(false, "127.0.0.1".parse().ok()), None);
    }

    #[test]
    fn nodeport_addresses_are_cidrs_or_primary_alone() {
        let parse = |s: &str| Cli::try_parse_from(["x", "--nodeport-addresses", s]);
        let cli = parse("10.0.0.0/8, fd00::/64").unwrap();
        assert_eq!(
            cli.run.nodeport_addresses.0,
            ["10.0.0.0/8".to_string(), "fd00::/64".to_string()]
        );
        assert_eq!(
            parse("primary").unwrap().run.nodeport_addresses.0,
            ["primary"]
        );
        assert!(parse("").unwrap().run.nodeport_addresses.0.is_empty());
        // Upstream's validation cases: a bare IP, a mix with `primary`.
        for bad in [
            "10.0.0.1",
            "primary,127.0.0.1/32",
            "127.0.0.1/32,primary",
            "2001:db8:xyz/64",
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("--nodeport-addresses"), "{bad}: {err}");
        }
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert!(cli.run.nodeport_addresses.0.is_empty());
        assert_eq!(cli.run.healthz_bind_address.to_string(), "0.0.0.0:10256");
        assert_eq!(cli.run.metrics_bind_address.to_string(), "127.0.0.1:10249");
    }
}
