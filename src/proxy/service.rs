//! One service port's live state ([`Service`]): its balancers, settings
//! and counters, shared by its listener and its connections, and the
//! read-only view of it that status and metrics get ([`ServiceView`]).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::balancer::Balancer;
use super::connect::DialResult;
use super::origin::{self, Origin};
use super::proxy_protocol;
use super::stats::LatencyHistogram;
use crate::model::{
    Protocol, ProxyProtocol, Scheduler, ServiceEntry, ServicePort, ServicePortName, Setting,
    ANNOTATION_PROXY_PROTOCOL, ANNOTATION_SCHEDULER,
};

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
    /// Listening sockets open now: 1, or one per worker once the port is
    /// busy (0 while unserved).
    pub sockets: AtomicU64,
    /// TCP: the port's open connections per worker, once it listens.
    pub dealer: arc_swap::ArcSwapOption<super::dealer::Dealer>,
    /// Connections closed because TCP keepalive found a peer dead
    /// (`ETIMEDOUT` on an established connection).
    pub peers_dead: AtomicU64,
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
    /// The cluster set ([`EndpointChoice::cluster`](crate::model::EndpointChoice::cluster)): traffic under
    /// `Cluster` policy, and external traffic from this node's pods or the
    /// host whatever the policy.
    pub balancer: Balancer,
    /// The node-local set ([`EndpointChoice::local`](crate::model::EndpointChoice::local)): traffic under a
    /// `Local` policy. Shares its endpoints' state with `balancer`.
    pub local: Balancer,
    /// Which set each kind of traffic uses, and why.
    routing: ArcSwap<Routing>,
    /// ClusterIPs: a connection REDIRECTed from one of them is internal.
    cluster_ips: ArcSwap<Vec<IpAddr>>,
    /// Its counters.
    pub stats: ServiceStats,
    /// PROXY protocol header for backends: 0 off, 1 v1, 2 v2; switched in
    /// place like the scheduler (new connections follow, open ones keep theirs).
    proxy_protocol: AtomicU8,
}

/// Which endpoint set each kind of a port's traffic uses (the policies of
/// its spec and what [`EndpointChoice`](crate::model::EndpointChoice) found), swapped with its endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    /// `internalTrafficPolicy: Local`: ClusterIP traffic uses the local set.
    pub internal_local: bool,
    /// The port takes external traffic (a nodePort, external IPs or LB
    /// IPs); without it every client is internal.
    pub externally_accessible: bool,
    /// `externalTrafficPolicy: Local` on a port with external traffic:
    /// external traffic from outside the node uses the local set.
    pub external_local: bool,
    /// Some endpoint anywhere is usable (upstream's `hasAnyEndpoints`);
    /// without one the port refuses connections (REJECT).
    pub has_any_endpoints: bool,
    /// ClusterIP traffic has an endpoint (upstream's
    /// `hasInternalEndpoints`); without one (but some elsewhere) it is
    /// dropped.
    pub has_internal: bool,
    /// External traffic from outside the node has an endpoint (upstream's
    /// `hasExternalEndpoints`); without one it is dropped, except from
    /// this node's pods and the host.
    pub has_external: bool,
    /// [`EndpointChoice::reason`](crate::model::EndpointChoice::reason).
    pub reason: String,
}

impl Routing {
    /// Whether every kind of traffic uses the cluster set (no `Local`
    /// policy in force): nothing about a client needs asking.
    pub fn one_set(&self) -> bool {
        !self.internal_local && !self.external_local
    }
}

/// The kinds of traffic a port tells apart to choose its endpoint set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// To a ClusterIP.
    Internal,
    /// To a nodePort, external IP or LB IP, from outside the node.
    External,
    /// To a nodePort, external IP or LB IP, from this node's pods or the
    /// host: upstream's short-circuit to the cluster set.
    ExternalFromNode,
}

// === impl Service ===

impl Service {
    /// A service port with no endpoints yet, round-robin, no PROXY header.
    pub fn new(name: ServicePortName) -> Self {
        Self {
            name,
            balancer: Balancer::default(),
            local: Balancer::default(),
            routing: ArcSwap::from_pointee(Routing::default()),
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

    /// Which set each kind of traffic uses now.
    pub fn routing(&self) -> arc_swap::Guard<Arc<Routing>> {
        self.routing.load()
    }

    /// The balancer for `traffic`.
    pub fn balancer_of(&self, traffic: Traffic) -> &Balancer {
        self.balancer_in(&self.routing.load(), traffic)
    }

    /// The balancer for `traffic` under routing `r`.
    fn balancer_in(&self, r: &Routing, traffic: Traffic) -> &Balancer {
        let local = match traffic {
            Traffic::Internal => r.internal_local,
            Traffic::External => r.external_local,
            Traffic::ExternalFromNode => false,
        };
        if local {
            &self.local
        } else {
            &self.balancer
        }
    }

    /// The balancer for a client connection accepted from `peer`: by what
    /// it dialled (`SO_ORIGINAL_DST`: a ClusterIP is internal traffic) and
    /// where it came from (`origin`). Ports whose every traffic uses the
    /// cluster set ask the socket nothing.
    pub fn balancer_for(
        &self,
        client: &tokio::net::TcpStream,
        peer: IpAddr,
        origin: &Origin,
    ) -> &Balancer {
        let r = self.routing.load();
        if r.one_set() {
            return &self.balancer;
        }
        let internal = !r.externally_accessible
            || proxy_protocol::original_dst(client)
                .is_ok_and(|dst| self.cluster_ips.load().contains(&dst.ip().to_canonical()));
        let traffic = if internal {
            Traffic::Internal
        } else if r.external_local && origin.is_local(peer, || origin::incoming_interface(client)) {
            Traffic::ExternalFromNode
        } else {
            Traffic::External
        };
        self.balancer_in(&r, traffic)
    }

    /// Swaps in the endpoints of `entry` (both sets, sharing each
    /// endpoint's live state) and its routing: whether the sets changed,
    /// and whether what the rules do with the port's traffic changed.
    pub(super) fn update_endpoints(&self, entry: &ServiceEntry) -> (bool, bool) {
        let (port, choice) = (&entry.port, &entry.choice);
        let (endpoints, cluster, local) = (&entry.endpoints, choice.cluster(), choice.local());
        self.balancer.set_affinity(port.affinity);
        self.local.set_affinity(port.affinity);
        let sets_changed =
            !(self.balancer.holds(endpoints, cluster) && self.local.holds(endpoints, local));
        if sets_changed {
            // Both balancers hold every endpoint with the same live state,
            // so either one's is all there is to carry over.
            let all = Balancer::with_backends(endpoints, &self.balancer.backends());
            self.balancer.install(&all, cluster);
            self.local.install(&all, local);
        }
        let routing = Routing {
            internal_local: port.internal_local,
            externally_accessible: port.externally_accessible(),
            external_local: port.external_local && port.externally_accessible(),
            has_any_endpoints: choice.has_any_endpoints,
            has_internal: !choice.internal(port).is_empty(),
            has_external: !choice.external(port).is_empty(),
            reason: choice.reason.clone(),
        };
        let old = self.routing.load_full();
        let rules_changed = (old.has_any_endpoints, old.has_internal, old.has_external)
            != (
                routing.has_any_endpoints,
                routing.has_internal,
                routing.has_external,
            );
        let routing_changed = *old != routing;
        if routing_changed {
            self.routing.store(Arc::new(routing));
        }
        (sets_changed || routing_changed, rules_changed)
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
        self.local.set_scheduler(scheduler);
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
    /// Why it has no listener, when it has none.
    pub unserved: Option<Unserved>,
}

/// Why a service port has no listener (reported on the Service, retried
/// at every sync).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unserved {
    /// The kind, a metric label.
    pub reason: UnservedReason,
    /// What happened, for people.
    pub detail: String,
}

/// The kinds of [`Unserved`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum UnservedReason {
    /// The fd budget holds no more listeners.
    FdLimit,
    /// The port could not be bound (in use, no free port in the range, ...).
    Bind,
}

impl UnservedReason {
    /// Every kind, in metric order.
    pub const ALL: [Self; 2] = [Self::FdLimit, Self::Bind];

    /// How many of `views` have no listener for each reason, in
    /// [`Self::ALL`] order.
    pub fn count(views: &[ServiceView]) -> [usize; 2] {
        let mut n = [0; 2];
        for u in views.iter().filter_map(|v| v.unserved.as_ref()) {
            n[u.reason as usize] += 1;
        }
        n
    }

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FdLimit => "fd_limit",
            Self::Bind => "bind",
        }
    }
}

/// The served service ports, republished after every sync, for readers on
/// other tasks (admin HTTP).
pub type Published = Arc<ArcSwap<Vec<ServiceView>>>;
