//! The desired state, as discovery sees it: every service port with its
//! endpoints. Pure data, no sockets; both discovery sources produce a
//! [`Snapshot`] and the proxier consumes it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

/// Transport protocol of a service port.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    /// TCP: served by `proxy::tcp`.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP: parsed, not yet served.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP: parsed, never served by a userspace proxy.
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`); absent means TCP.
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("TCP") => Some(Self::Tcp),
            Some("UDP") => Some(Self::Udp),
            Some("SCTP") => Some(Self::Sctp),
            Some(_) => None,
        }
    }

    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of one port of one Service: the unit the proxy serves
/// (one listener, one balancer).
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ServicePortName {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Name of the port within the Service; empty for a single unnamed port.
    pub port_name: String,
    /// Protocol of the port (TCP and UDP of one number are distinct ports).
    pub protocol: Protocol,
}

impl ServicePortName {
    /// The smallest key of a service, to range over all its ports.
    pub fn first_of(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            port_name: String::new(),
            protocol: Protocol::Tcp,
        }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

/// ClientIP session affinity of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Affinity {
    /// How long a client IP sticks to its endpoint after its last connection.
    pub timeout: Duration,
}

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours), as Kubernetes.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// Everything the proxy needs to know about one service port, besides its endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    /// ClusterIPs (one per family); empty for a Service from a manifest with none.
    pub cluster_ips: Vec<IpAddr>,
    /// The Service port clients dial on the cluster IPs.
    pub port: u16,
    /// The node port, if the Service is NodePort or LoadBalancer.
    pub node_port: Option<u16>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of the VIP-mode ingresses
    /// (`ipMode` absent or `VIP`; upstream's `LoadBalancerVIPs`).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` that parse (both families, host bits
    /// cleared): the only sources that may reach the LB IPs (upstream's
    /// `LoadBalancerSourceRanges`); empty: every source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<ipnet::IpNet>,
    /// The entries of `spec.loadBalancerSourceRanges` that do not parse,
    /// verbatim: ignored (each reported as a discovery problem).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub invalid_load_balancer_source_ranges: Vec<String>,
    /// ClientIP affinity, when `sessionAffinity: ClientIP`.
    pub affinity: Option<Affinity>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `spec.healthCheckNodePort` of a `type: LoadBalancer` Service with
    /// `externalTrafficPolicy: Local` (upstream's `NeedsHealthCheck`),
    /// where load balancers ask whether this node has local endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// Annotation [`ANNOTATION_SCHEDULER`]: how endpoints are chosen.
    pub scheduler: Setting<Scheduler>,
    /// Annotation [`ANNOTATION_PROXY_PROTOCOL`]: PROXY header to backends.
    pub proxy_protocol: Setting<ProxyProtocol>,
}

impl ServicePort {
    /// Whether the port takes traffic other than ClusterIP's: a nodePort,
    /// external IPs or LB IPs (upstream's `ExternallyAccessible`).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// Service annotation choosing the scheduler of every port of the Service.
pub const ANNOTATION_SCHEDULER: &str = "kube-userspace-proxy.io/scheduler";
/// Service annotation turning the PROXY protocol header on (`v1` or `v2`).
pub const ANNOTATION_PROXY_PROTOCOL: &str = "kube-userspace-proxy.io/proxy-protocol";

/// A per-Service setting read from an annotation. Discovery only parses;
/// the proxier resolves [`Setting::Default`] against its flags and reports
/// [`Setting::Invalid`] (which then also means the default).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Setting<T> {
    /// Annotation absent or empty: the proxy-wide default.
    #[default]
    Default,
    /// A valid value.
    Set(T),
    /// An unknown value, kept verbatim for the report.
    Invalid(String),
}

impl<T: Copy> Setting<T> {
    /// The value in force: the annotation's when valid, else `default`.
    pub fn or(&self, default: T) -> T {
        match self {
            Self::Set(v) => *v,
            Self::Default | Self::Invalid(_) => default,
        }
    }
}

/// How a service port chooses among its usable endpoints (names as `ipvsadm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Round-robin.
    #[default]
    Rr,
    /// Least active connections.
    Lc,
    /// Source-IP hash, consistent (rendezvous hashing).
    Sh,
    /// Shortest expected delay: (active + 1) × smoothed connect time.
    Sed,
    /// Never queue: an idle endpoint if any, else shortest expected delay.
    Nq,
    /// Power of two choices: the less loaded of two random endpoints.
    P2c,
    /// Uniformly random.
    Random,
}

impl Scheduler {
    /// Every scheduler, in the order of the documentation.
    pub const ALL: [Scheduler; 7] = [
        Self::Rr,
        Self::Lc,
        Self::Sh,
        Self::Sed,
        Self::Nq,
        Self::P2c,
        Self::Random,
    ];

    /// The annotation / flag spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rr => "rr",
            Self::Lc => "lc",
            Self::Sh => "sh",
            Self::Sed => "sed",
            Self::Nq => "nq",
            Self::P2c => "p2c",
            Self::Random => "random",
        }
    }

    /// Parses the annotation spelling (exact, lowercase).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Version of the PROXY protocol header sent to backends (HAProxy's spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// Human-readable text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// Binary header.
    V2,
}

impl ProxyProtocol {
    /// The annotation spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }

    /// Parses the annotation spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "v1" => Some(Self::V1),
            "v2" => Some(Self::V2),
            _ => None,
        }
    }
}

/// One backend of a service port, with its EndpointSlice conditions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Endpoint {
    /// Address and port the proxy dials.
    pub addr: SocketAddr,
    /// `conditions.ready` (absent counts as ready, as the API says).
    pub ready: bool,
    /// `conditions.serving` (absent: same as ready).
    pub serving: bool,
    /// `conditions.terminating` (absent: false).
    pub terminating: bool,
    /// `nodeName`, for traffic policy Local.
    pub node_name: Option<String>,
    /// `zone`, informational.
    pub zone: Option<String>,
    /// `hints.forZones[].name`: the zones this endpoint should serve
    /// (topology aware routing), sorted and deduplicated; empty: no hint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hints_zones: Vec<String>,
    /// `hints.forNodes[].name` (Kubernetes 1.33+, `PreferSameNode`): the
    /// nodes this endpoint should serve, sorted and deduplicated; empty: no hint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hints_nodes: Vec<String>,
}

/// Label of a Node naming its zone (upstream's `v1.LabelTopologyZone`).
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// This node, as endpoint choice sees it: its name and its Node object's
/// labels (of which only [`LABEL_TOPOLOGY_ZONE`] is read).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    /// The node's name (`--hostname-override`, else the hostname); `None`:
    /// unknown, so no endpoint is local and no node hint matches.
    pub name: Option<String>,
    /// The labels of this node's Node object.
    pub labels: BTreeMap<String, String>,
    /// `spec.podCIDRs` of this node's Node object (for
    /// `--detect-local-mode NodeCIDR`), as written there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,
    /// Whether the Node object was seen, and whether it is still there.
    pub object: NodeObject,
    /// `metadata.deletionTimestamp`, when the Node is being deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    /// `status.addresses` of type `InternalIP`, then `ExternalIP`, in
    /// order (upstream's `GetNodeHostIPs`: the first of a family is the
    /// node's IP of that family).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// The keys of `spec.taints`, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<String>,
}

/// The taint the cluster autoscaler puts on a node it is about to delete
/// (upstream's `healthcheck.ToBeDeletedTaint`).
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// What discovery knows of this node's Node object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeObject {
    /// Never seen (not listed yet, not readable, or no such document).
    #[default]
    Unknown,
    /// Seen, and there now.
    Present,
    /// Seen once, and gone since: the node was deleted.
    Deleted,
}

impl NodeInfo {
    /// The node's IP of a family (`v6`): the first of [`Self::addresses`].
    pub fn primary_ip(&self, v6: bool) -> Option<IpAddr> {
        self.addresses.iter().copied().find(|ip| ip.is_ipv6() == v6)
    }

    /// Why load balancers should stop sending traffic to this node
    /// (upstream's `ProxyHealthServer.NodeEligible`): it is being deleted
    /// (`deletionTimestamp`, or its Node object is gone) or carries the
    /// [`TAINT_TO_BE_DELETED`] taint. `None`: eligible, as a node whose
    /// object was never seen is (upstream, while it starts).
    pub fn ineligible(&self) -> Option<String> {
        if self.object == NodeObject::Deleted {
            return Some("the Node object was deleted".into());
        }
        if let Some(t) = &self.deletion_timestamp {
            return Some(format!("the Node is being deleted (deletionTimestamp {t})"));
        }
        self.taints
            .iter()
            .any(|t| t == TAINT_TO_BE_DELETED)
            .then(|| format!("the Node has the {TAINT_TO_BE_DELETED} taint"))
    }

    /// The node's zone: label [`LABEL_TOPOLOGY_ZONE`], `None` when absent or empty.
    pub fn zone(&self) -> Option<&str> {
        self.labels
            .get(LABEL_TOPOLOGY_ZONE)
            .map(String::as_str)
            .filter(|z| !z.is_empty())
    }
}

/// Which topology hints narrowed a port's cluster set (upstream's `topologyMode`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase", tag = "mode", content = "for")]
pub enum Topology {
    /// No hints applied: every ready endpoint (upstream's `""`).
    #[default]
    None,
    /// `forNodes` hints naming this node (upstream's `PreferSameNode`).
    SameNode(String),
    /// `forZones` hints naming this node's zone (upstream's `PreferSameZone`).
    SameZone(String),
}

/// The endpoints one service port may use from this node, as upstream's
/// `CategorizeEndpoints` chooses them (`discovery::topology::categorize`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EndpointChoice {
    /// Usable endpoints under `Cluster` policy, topology applied
    /// (upstream's `clusterEndpoints`); `None` when no traffic of this port
    /// uses `Cluster` policy (upstream's `nil`).
    pub cluster: Option<Vec<Endpoint>>,
    /// Usable endpoints on this node (upstream's `localEndpoints`); `None`
    /// when no traffic of this port uses `Local` policy.
    pub local: Option<Vec<Endpoint>>,
    /// Whether any endpoint anywhere in the cluster is usable, even if none
    /// is reachable from here (upstream's `hasAnyEndpoints`): without one,
    /// every address of the port refuses (REJECT).
    pub has_any_endpoints: bool,
    /// The hints that narrowed `cluster`.
    pub topology: Topology,
    /// Why these sets, for people (`/debug/services`): e.g. `zone hints
    /// (zone-a)`, `node-local`, `hints ignored: none for zone-b`.
    pub reason: String,
}

impl EndpointChoice {
    /// The cluster set, empty when not computed.
    pub fn cluster(&self) -> &[Endpoint] {
        self.cluster.as_deref().unwrap_or(&[])
    }

    /// The union of the cluster and local sets by address, a local copy
    /// replacing a cluster one (upstream's `allReachableEndpoints`), sorted
    /// by address. Derived on demand: the data path never needs it.
    pub fn all_reachable(&self) -> Vec<Endpoint> {
        let mut by_addr = BTreeMap::new();
        for ep in self.cluster().iter().chain(self.local()) {
            by_addr.insert(ep.addr, ep.clone());
        }
        by_addr.into_values().collect()
    }

    /// The node-local set, empty when not computed.
    pub fn local(&self) -> &[Endpoint] {
        self.local.as_deref().unwrap_or(&[])
    }

    /// For ClusterIP traffic of `port`: the local set under
    /// `internalTrafficPolicy: Local`, else the cluster set.
    pub fn internal(&self, port: &ServicePort) -> &[Endpoint] {
        if port.internal_local {
            self.local()
        } else {
            self.cluster()
        }
    }

    /// For external traffic of `port` (nodePort, external IPs, LB IPs) from
    /// outside the node: the local set under `externalTrafficPolicy:
    /// Local`, else the cluster set; empty when the port takes none.
    /// Traffic from this node's pods or the host uses [`Self::cluster`].
    pub fn external(&self, port: &ServicePort) -> &[Endpoint] {
        if !port.externally_accessible() {
            &[]
        } else if port.external_local {
            self.local()
        } else {
            self.cluster()
        }
    }
}

/// Upstream's `v1.IPFamily` spellings, in the order of every per-family
/// array here (`[IPv4, IPv6]`).
pub const IP_FAMILIES: [&str; 2] = ["IPv4", "IPv6"];

/// When the endpoints controller last changed a Service's EndpointSlices:
/// per family (`[IPv4, IPv6]`), the latest
/// `endpoints.kubernetes.io/last-change-trigger-time` of its slices of that
/// family, for the network programming latency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TriggerTimes(pub [Option<SystemTime>; 2]);

/// A service port and the endpoints behind it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServiceEntry {
    /// The port's specification.
    pub port: ServicePort,
    /// Every endpoint of the port, sorted by address and deduplicated, in
    /// any condition (what `status` lists).
    pub endpoints: Vec<Endpoint>,
    /// Which of them each kind of traffic uses.
    pub choice: EndpointChoice,
    /// The Service's slice trigger times (the same on each of its ports).
    #[serde(skip)]
    pub triggers: TriggerTimes,
}

/// The full desired state at one moment: what discovery publishes.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// Every service port we serve, ordered for deterministic iteration.
    pub services: BTreeMap<ServicePortName, ServiceEntry>,
    /// This node, as its Node object says (labels, pod CIDRs).
    pub node: NodeInfo,
}
