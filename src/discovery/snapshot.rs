//! Kubernetes objects → [`Snapshot`]: [`build_snapshot`] validates the
//! `v1 Service` and `discovery.k8s.io/v1 EndpointSlice` objects a source
//! collected (as k8s-openapi types), joins slices to their service by the
//! `kubernetes.io/service-name` label and by port name and protocol, and
//! reports every object it had to skip as a [`Problem`] naming where it came
//! from, the object and the field. One bad object never hides the others.
//!
//! [`Options`] carry what kube-proxy decides per node: which services are
//! ours (`service.kubernetes.io/service-proxy-name`) and which endpoints are
//! local (traffic policy `Local`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::topology;
use crate::model::{
    Affinity, Endpoint, NodeInfo, NodeObject, Protocol, ProxyProtocol, Scheduler, ServicePort,
    ServicePortName, Setting, Snapshot, TriggerTimes, ANNOTATION_PROXY_PROTOCOL,
    ANNOTATION_SCHEDULER, DEFAULT_AFFINITY_TIMEOUT,
};

/// Label joining an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// A Service (or its slices) carrying this label belongs to another proxy,
/// unless the label's value is our `--service-proxy-name`.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// Set by the endpoints controllers on the objects of headless services:
/// nothing to proxy.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// Set by the endpoints controllers on an EndpointSlice: when the change it
/// carries was triggered, RFC 3339 (upstream's `v1.EndpointsLastChangeTriggerTime`).
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Per-node choices of what to serve, as kube-proxy makes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// This node's name (`--hostname-override`, else the hostname): with
    /// traffic policy `Local`, only endpoints whose `nodeName` is this one
    /// are kept. `None` keeps every endpoint (no node to compare with).
    pub node_name: Option<String>,
    /// `--service-proxy-name`: services labelled
    /// `service.kubernetes.io/service-proxy-name` with this value are ours;
    /// services labelled with any other value (or any value, when `None`)
    /// are left to that other proxy. Unlabelled services are always ours.
    pub service_proxy_name: Option<String>,
}

impl Options {
    /// Whether an object with these labels is ours to serve: not claimed by
    /// another proxy, not headless.
    pub fn is_ours(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let Some(labels) = labels else { return true };
        if labels.contains_key(LABEL_HEADLESS) {
            return false;
        }
        match labels.get(LABEL_SERVICE_PROXY_NAME) {
            None => true,
            Some(v) => self.service_proxy_name.as_deref() == Some(v.as_str()),
        }
    }
}

/// An object that was skipped, or a value of a served object that was
/// ignored (an invalid source range, a nodePort taken by another
/// Service), and why: what an operator needs to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where the object came from: a file (with document number) or `api`.
    pub origin: String,
    /// The object, e.g. `Service default/web`.
    pub object: String,
    /// The offending field, as a path (`spec.ports[0].port`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: field {}: {}",
            self.origin, self.object, self.field, self.message
        )
    }
}

/// A Kubernetes object together with where it was read from.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    /// File and document, or `api`.
    pub origin: String,
    /// The object.
    pub object: T,
}

/// Validates services and slices and joins them into a snapshot; skipped
/// objects come back as problems, in input order. A service whose Service or
/// one of whose EndpointSlices is invalid keeps its entries from `previous`
/// (the last good state keeps serving); with no previous entry, only the
/// invalid object is left out. Default [`Options`]: every endpoint kept,
/// services claimed by another proxy skipped.
pub fn build_snapshot(
    services: &[Sourced<Service>],
    slices: &[Sourced<EndpointSlice>],
    previous: &Snapshot,
) -> (Snapshot, Vec<Problem>) {
    build_snapshot_with(services, slices, &[], previous, &Options::default())
}

/// [`build_snapshot`] with per-node [`Options`] and this node's Node object
/// (the one of `nodes` named `options.node_name`, if any): services and
/// slices that are not ours (other proxy, headless) are left out silently,
/// and each port's endpoints are categorized for this node
/// ([`topology::categorize`]: traffic policies, topology hints).
pub fn build_snapshot_with(
    services: &[Sourced<Service>],
    slices: &[Sourced<EndpointSlice>],
    nodes: &[Sourced<Node>],
    previous: &Snapshot,
    options: &Options,
) -> (Snapshot, Vec<Problem>) {
    let node = node_info(options.node_name.as_deref(), nodes, &previous.node);
    let services: Vec<&Sourced<Service>> = services
        .iter()
        .filter(|s| options.is_ours(s.object.metadata.labels.as_ref()))
        .collect();
    let slices: Vec<&Sourced<EndpointSlice>> = slices
        .iter()
        .filter(|s| options.is_ours(s.object.metadata.labels.as_ref()))
        .collect();
    let mut problems = Vec::new();
    // Services with an invalid object: served from `previous` if possible.
    let mut broken: BTreeSet<(String, String)> = BTreeSet::new();

    // (namespace, service) -> slices, validated.
    let mut by_service: BTreeMap<(String, String), Vec<SliceData>> = BTreeMap::new();
    for s in slices {
        match slice_data(&s.object) {
            Ok(Some(d)) => by_service
                .entry((d.namespace.clone(), d.service.clone()))
                .or_default()
                .push(d),
            Ok(None) => {}
            Err((field, message)) => {
                let meta = &s.object.metadata;
                if let Some(svc) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) {
                    broken.insert((namespace_of(meta), svc.clone()));
                }
                problems.push(Problem {
                    origin: s.origin.clone(),
                    object: describe("EndpointSlice", meta),
                    field,
                    message,
                })
            }
        }
    }

    let mut snapshot = Snapshot {
        node,
        ..Snapshot::default()
    };
    let mut seen = BTreeSet::new();
    // Service ports in input order, with their origin: the first of two
    // claiming one nodePort keeps it.
    let mut order: Vec<(ServicePortName, String)> = Vec::new();
    let present: BTreeSet<_> = services
        .iter()
        .map(|s| key_of(&s.object.metadata))
        .collect();
    let in_previous = |(ns, name): &(String, String)| {
        previous
            .services
            .range(ServicePortName::first_of(ns, name)..)
            .next()
            .is_some_and(|(k, _)| k.namespace == *ns && k.name == *name)
    };
    // Broken services that served before keep their last good entries;
    // others are built from whatever is valid.
    broken.retain(|k| present.contains(k) && in_previous(k));
    for s in services.iter().copied() {
        let object = describe("Service", &s.object.metadata);
        let mut ignored = Vec::new();
        let ports = match service_ports(&s.object, &mut ignored) {
            Ok(p) => p,
            Err((field, message)) => {
                problems.push(Problem {
                    origin: s.origin.clone(),
                    object,
                    field,
                    message,
                });
                let key = key_of(&s.object.metadata);
                if in_previous(&key) {
                    broken.insert(key);
                }
                continue;
            }
        };
        // Values left out of a valid Service: reported, the Service served.
        for (field, message) in ignored {
            problems.push(Problem {
                origin: s.origin.clone(),
                object: object.clone(),
                field,
                message,
            });
        }
        let Some(ports) = ports else { continue };
        let key = key_of(&s.object.metadata);
        if broken.contains(&key) {
            continue; // one of its slices is invalid: carried from `previous` below
        }
        if !seen.insert(key.clone()) {
            problems.push(Problem {
                origin: s.origin.clone(),
                object,
                field: "metadata.name".into(),
                message: "a Service of this name was already defined; the first one wins".into(),
            });
            continue;
        }
        let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        let families = ip_families(&s.object);
        let triggers = trigger_times(slices, families);
        for (name, port) in ports {
            let endpoints = join_endpoints(slices, &name.port_name, name.protocol, families);
            order.push((name.clone(), s.origin.clone()));
            let mut entry = topology::entry(port, endpoints, &snapshot.node);
            entry.triggers = triggers;
            snapshot.services.insert(name, entry);
        }
    }
    for (ns, name) in &broken {
        let carried = previous
            .services
            .range(ServicePortName::first_of(ns, name)..)
            .take_while(|(k, _)| k.namespace == *ns && k.name == *name);
        let mut any = false;
        for (k, v) in carried {
            snapshot
                .services
                .entry(k.clone())
                .or_insert_with(|| v.clone());
            any = true;
        }
        if any {
            tracing::warn!(service = %format!("{ns}/{name}"), "invalid object: keeping the last good state of this service");
        }
    }
    resolve_node_port_conflicts(&mut snapshot, &order, previous, &mut problems);
    (snapshot, problems)
}

/// Two service ports may not share a nodePort (per protocol; the API
/// server forbids it, a directory of manifests does not): the one that
/// held it in `previous` keeps it, else the first in input order. The
/// other is reported and served without it (its ClusterIP still works,
/// its listener takes a port from the range).
fn resolve_node_port_conflicts(
    snapshot: &mut Snapshot,
    order: &[(ServicePortName, String)],
    previous: &Snapshot,
    problems: &mut Vec<Problem>,
) {
    let mut owner: BTreeMap<(u16, Protocol), ServicePortName> = BTreeMap::new();
    for (name, entry) in &snapshot.services {
        let np = entry.port.node_port;
        if np.is_some() && previous.services.get(name).and_then(|p| p.port.node_port) == np {
            owner.insert((np.unwrap_or_default(), name.protocol), name.clone());
        }
    }
    for (name, origin) in order {
        let Some(entry) = snapshot.services.get_mut(name) else {
            continue;
        };
        let Some(np) = entry.port.node_port else {
            continue;
        };
        let holder = owner
            .entry((np, name.protocol))
            .or_insert_with(|| name.clone());
        if holder != name {
            problems.push(Problem {
                origin: origin.clone(),
                object: format!("Service {}/{}", name.namespace, name.name),
                field: format!("spec.ports[{}].nodePort", name.port_name),
                message: format!(
                    "nodePort {np}/{} is already used by {holder}; served without a nodePort",
                    name.protocol
                ),
            });
            entry.port.node_port = None;
        }
    }
}

/// This node as endpoint choice and health see it: `name`, and the labels,
/// pod CIDRs, deletion and taints of the Node object of that name among
/// `nodes`. No such object: unknown, unless `previous` had seen it (then it
/// was deleted, and stays so until it comes back).
pub fn node_info(name: Option<&str>, nodes: &[Sourced<Node>], previous: &NodeInfo) -> NodeInfo {
    let object = name.and_then(|n| {
        nodes
            .iter()
            .find(|o| o.object.metadata.name.as_deref() == Some(n))
    });
    let Some(object) = object.map(|o| &o.object) else {
        let seen = previous.name.as_deref() == name && previous.object != NodeObject::Unknown;
        return NodeInfo {
            name: name.map(String::from),
            object: if seen {
                NodeObject::Deleted
            } else {
                NodeObject::Unknown
            },
            ..NodeInfo::default()
        };
    };
    let spec = object.spec.as_ref();
    let pod_cidrs = spec
        .and_then(|s| s.pod_cidrs.clone())
        .filter(|c| !c.is_empty())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default();
    let mut taints: Vec<String> = spec
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .map(|t| t.key.clone())
        .collect();
    taints.sort();
    taints.dedup();
    let status = object.status.as_ref().and_then(|s| s.addresses.as_ref());
    let addresses = ["InternalIP", "ExternalIP"]
        .iter()
        .flat_map(|kind| {
            status
                .into_iter()
                .flatten()
                .filter(move |a| a.type_ == *kind)
                .filter_map(|a| a.address.trim().parse::<IpAddr>().ok())
        })
        .collect();
    NodeInfo {
        name: name.map(String::from),
        labels: object.metadata.labels.clone().unwrap_or_default(),
        pod_cidrs,
        object: NodeObject::Present,
        addresses,
        deletion_timestamp: object
            .metadata
            .deletion_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        taints,
    }
}

/// IP families a service wants endpoints of: `(IPv4, IPv6)`. From
/// `spec.ipFamilies`, else its cluster IPs, else both.
fn ip_families(svc: &Service) -> (bool, bool) {
    let Some(spec) = svc.spec.as_ref() else {
        return (true, true);
    };
    if let Some(f) = spec.ip_families.as_ref().filter(|f| !f.is_empty()) {
        return (f.iter().any(|f| f == "IPv4"), f.iter().any(|f| f == "IPv6"));
    }
    let ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|s| s.parse().ok())
        .collect();
    if ips.is_empty() {
        return (true, true);
    }
    (
        ips.iter().any(IpAddr::is_ipv4),
        ips.iter().any(IpAddr::is_ipv6),
    )
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (namespace_of(meta), name_of(meta))
}

type FieldError = (String, String);

fn describe(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> String {
    format!(
        "{kind} {}/{}",
        namespace_of(meta),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into())
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

fn port_u16(v: i32, field: String) -> Result<u16, FieldError> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err((field, format!("port {v} is out of range 1-65535"))),
    }
}

fn parse_ip(s: &str, field: String) -> Result<IpAddr, FieldError> {
    s.parse()
        .map_err(|_| (field, format!("{s:?} is not an IP address")))
}

fn parse_protocol(p: Option<&str>, field: String) -> Result<Protocol, FieldError> {
    Protocol::parse(p).ok_or_else(|| {
        (
            field,
            format!(
                "unknown protocol {:?} (want TCP, UDP or SCTP)",
                p.unwrap_or("")
            ),
        )
    })
}

/// The service's ports, `Ok(None)` when it is not ours to serve (headless,
/// ExternalName), or the first invalid field. Values that are left out
/// without making the Service invalid (a malformed source range, an
/// unknown `ipMode`) are added to `ignored`.
#[allow(clippy::type_complexity)]
fn service_ports(
    svc: &Service,
    ignored: &mut Vec<FieldError>,
) -> Result<Option<Vec<(ServicePortName, ServicePort)>>, FieldError> {
    let meta = &svc.metadata;
    let name = match meta.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => return Err(("metadata.name".into(), "missing".into())),
    };
    let namespace = namespace_of(meta);
    let Some(spec) = &svc.spec else {
        return Err(("spec".into(), "missing".into()));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        return Ok(None); // headless: DNS only, nothing to proxy
    }
    let mut cluster_ips = Vec::new();
    match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => {
            for (i, ip) in ips.iter().enumerate() {
                cluster_ips.push(parse_ip(ip, format!("spec.clusterIPs[{i}]"))?);
            }
        }
        _ => {
            if let Some(ip) = spec.cluster_ip.as_deref().filter(|s| !s.is_empty()) {
                cluster_ips.push(parse_ip(ip, "spec.clusterIP".into())?);
            }
        }
    }
    let mut external_ips = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        external_ips.push(parse_ip(ip, format!("spec.externalIPs[{i}]"))?);
    }
    let mut load_balancer_ips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let Some(ip) = &ing.ip else { continue };
        if !is_vip_mode(ing.ip_mode.as_deref(), i, ignored) {
            continue;
        }
        load_balancer_ips.push(parse_ip(
            ip,
            format!("status.loadBalancer.ingress[{i}].ip"),
        )?);
    }
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    // Upstream's NeedsHealthCheck: LoadBalancer with eTP=Local.
    let health_check_node_port = match spec.health_check_node_port.filter(|_| external_local) {
        _ if spec.type_.as_deref() != Some("LoadBalancer") => None,
        None | Some(0) => None,
        Some(n) => Some(port_u16(n, "spec.healthCheckNodePort".into())?),
    };
    let (source_ranges, invalid_source_ranges) =
        source_ranges(spec.load_balancer_source_ranges.as_deref(), ignored);
    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") | Some("") => None,
        Some("ClientIP") => {
            let secs = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let timeout = match secs {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(s) if (1..=86400).contains(&s) => Duration::from_secs(s as u64),
                Some(s) => {
                    return Err((
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!("{s} is out of range 1-86400"),
                    ))
                }
            };
            Some(Affinity { timeout })
        }
        Some(other) => {
            return Err((
                "spec.sessionAffinity".into(),
                format!("unknown value {other:?} (want None or ClientIP)"),
            ))
        }
    };
    let scheduler = annotation(meta, ANNOTATION_SCHEDULER, Scheduler::parse);
    let proxy_protocol = annotation(meta, ANNOTATION_PROXY_PROTOCOL, |v| match v {
        "off" => Some(None),
        v => ProxyProtocol::parse(v).map(Some),
    });
    let proxy_protocol = match proxy_protocol {
        Setting::Set(None) | Setting::Default => Setting::Default,
        Setting::Set(Some(v)) => Setting::Set(v),
        Setting::Invalid(v) => Setting::Invalid(v),
    };
    let ports = spec.ports.as_deref().unwrap_or(&[]);
    if ports.is_empty() {
        return Err((
            "spec.ports".into(),
            "a Service needs at least one port".into(),
        ));
    }
    let mut out = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let port = port_u16(p.port, format!("spec.ports[{i}].port"))?;
        let protocol = parse_protocol(p.protocol.as_deref(), format!("spec.ports[{i}].protocol"))?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(port_u16(n, format!("spec.ports[{i}].nodePort"))?),
        };
        let key = ServicePortName {
            namespace: namespace.clone(),
            name: name.clone(),
            port_name: p.name.clone().unwrap_or_default(),
            protocol,
        };
        if out
            .iter()
            .any(|(k, _): &(ServicePortName, ServicePort)| *k == key)
        {
            return Err((
                format!("spec.ports[{i}].name"),
                format!("duplicate port name {:?} for {protocol}", key.port_name),
            ));
        }
        out.push((
            key,
            ServicePort {
                cluster_ips: cluster_ips.clone(),
                port,
                node_port,
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                load_balancer_source_ranges: source_ranges.clone(),
                invalid_load_balancer_source_ranges: invalid_source_ranges.clone(),
                affinity,
                internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                external_local,
                health_check_node_port,
                scheduler: scheduler.clone(),
                proxy_protocol: proxy_protocol.clone(),
            },
        ));
    }
    Ok(Some(out))
}

/// Whether an LB ingress is captured (upstream's `IsVIPMode`): `ipMode`
/// absent or `VIP`. `Proxy` (the load balancer proxies, so its IP is not
/// the destination of the packets we see) is not; neither is an unknown
/// value (upstream compares with `VIP` only; the API server allows no
/// other), which is also added to `ignored` for ingress `i`.
fn is_vip_mode(ip_mode: Option<&str>, i: usize, ignored: &mut Vec<FieldError>) -> bool {
    match ip_mode {
        None | Some("VIP") => true,
        Some("Proxy") => false,
        Some(other) => {
            ignored.push((
                format!("status.loadBalancer.ingress[{i}].ipMode"),
                format!("unknown ipMode {other:?} (want VIP or Proxy): the IP is not captured"),
            ));
            false
        }
    }
}

/// `spec.loadBalancerSourceRanges` as upstream's `newBaseServiceInfo` and
/// `MapCIDRsByIPFamily` read them: each entry trimmed, empty ones skipped,
/// parsed as `ParseCIDRSloppy` does with the host bits cleared; the valid
/// ranges (both families, in order) and the invalid entries, each of which
/// is also added to `ignored` (the other ranges still apply).
fn source_ranges(
    ranges: Option<&[String]>,
    ignored: &mut Vec<FieldError>,
) -> (Vec<IpNet>, Vec<String>) {
    let (mut valid, mut invalid) = (Vec::new(), Vec::new());
    for (i, raw) in ranges.unwrap_or(&[]).iter().enumerate() {
        let range = raw.trim();
        if range.is_empty() {
            continue;
        }
        match parse_cidr_sloppy(range) {
            Some(net) => valid.push(net),
            None => {
                ignored.push((
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{raw:?} is not a CIDR: this range is ignored, the others apply"),
                ));
                invalid.push(raw.clone());
            }
        }
    }
    (valid, invalid)
}

/// A CIDR with its host bits cleared; as Go's (and so upstream's)
/// `ParseCIDRSloppy`, IPv4 octets may have leading zeros (read as decimal).
fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    let (addr, len) = s.split_once('/')?;
    let digits = |t: &str| (1..=3).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(len) {
        return None;
    }
    let octets: Vec<u8> = addr
        .split('.')
        .map(|o| digits(o).then(|| o.parse().ok()).flatten())
        .collect::<Option<_>>()?;
    let octets: [u8; 4] = octets.try_into().ok()?;
    let net = Ipv4Net::new(octets.into(), len.parse().ok()?).ok()?;
    Some(IpNet::V4(net.trunc()))
}

/// A per-Service annotation: absent or empty is the default, a value
/// `parse` rejects is kept as [`Setting::Invalid`] for the proxier to report
/// (an unknown value never makes the Service invalid). Values are trimmed and
/// lowercased.
fn annotation<T>(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Setting<T> {
    let Some(raw) = meta.annotations.as_ref().and_then(|a| a.get(key)) else {
        return Setting::Default;
    };
    let v = raw.trim().to_ascii_lowercase();
    if v.is_empty() {
        return Setting::Default;
    }
    match parse(&v) {
        Some(x) => Setting::Set(x),
        None => Setting::Invalid(raw.clone()),
    }
}

/// A validated EndpointSlice.
struct SliceData {
    namespace: String,
    service: String,
    /// `addressType: IPv6`.
    ipv6: bool,
    /// Its [`ANNOTATION_TRIGGER_TIME`], when present and well-formed.
    trigger: Option<SystemTime>,
    /// (port name, protocol, port number)
    ports: Vec<(String, Protocol, u16)>,
    /// Endpoints with port 0: the port comes from `ports` when joined.
    endpoints: Vec<Endpoint>,
}

/// The slice's data, `Ok(None)` for slices we do not serve (FQDN), or the
/// first invalid field.
fn slice_data(slice: &EndpointSlice) -> Result<Option<SliceData>, FieldError> {
    let meta = &slice.metadata;
    if meta.name.as_deref().unwrap_or("").is_empty() {
        return Err(("metadata.name".into(), "missing".into()));
    }
    let service = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            (
                format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
                "missing: the slice cannot be joined to a Service".into(),
            )
        })?
        .clone();
    let want_v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return Ok(None), // kube-proxy ignores FQDN slices too
        other => {
            return Err((
                "addressType".into(),
                format!("unknown addressType {other:?} (want IPv4 or IPv6)"),
            ))
        }
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(n) = p.port else { continue };
        let port = port_u16(n, format!("ports[{i}].port"))?;
        let protocol = parse_protocol(p.protocol.as_deref(), format!("ports[{i}].protocol"))?;
        ports.push((p.name.clone().unwrap_or_default(), protocol, port));
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        // As upstream's `EndpointSliceCache.addEndpoints`: hint names as a set.
        // k8s-openapi 0.29 (feature v1_33) has `forNodes`; upstream reads it
        // only with the PreferSameTrafficDistribution gate, on by default
        // since 1.34 (the API server drops the field while the gate is off).
        let hints = ep.hints.as_ref();
        let hints_zones = hint_names(hints.and_then(|h| h.for_zones.as_ref()), |z| &z.name);
        let hints_nodes = hint_names(hints.and_then(|h| h.for_nodes.as_ref()), |n| &n.name);
        for (j, a) in ep.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            let ip = parse_ip(a, field.clone())?;
            if ip.is_ipv6() != want_v6 {
                return Err((
                    field,
                    format!("{a} does not match addressType {}", slice.address_type),
                ));
            }
            endpoints.push(Endpoint {
                addr: SocketAddr::new(ip, 0),
                ready,
                serving,
                terminating,
                node_name: ep.node_name.clone(),
                zone: ep.zone.clone(),
                hints_zones: hints_zones.clone(),
                hints_nodes: hints_nodes.clone(),
            });
        }
    }
    Ok(Some(SliceData {
        namespace: namespace_of(meta),
        service,
        ipv6: want_v6,
        trigger: trigger_time(meta),
        ports,
        endpoints,
    }))
}

/// A slice's [`ANNOTATION_TRIGGER_TIME`], as upstream's
/// `getLastChangeTriggerTime` reads it: absent, malformed (logged at
/// debug) or before 1970, there is none; never an error.
fn trigger_time(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<SystemTime> {
    let raw = meta.annotations.as_ref()?.get(ANNOTATION_TRIGGER_TIME)?;
    let parsed = raw
        .parse::<k8s_openapi::jiff::Timestamp>()
        .map_err(|e| e.to_string())
        .and_then(|t| {
            let since_epoch = t.as_duration();
            (!since_epoch.is_negative())
                .then(|| SystemTime::UNIX_EPOCH.checked_add(since_epoch.unsigned_abs()))
                .flatten()
                .ok_or_else(|| "before 1970".to_string())
        });
    match parsed {
        Ok(t) => Some(t),
        Err(error) => {
            tracing::debug!(object = %describe("EndpointSlice", meta), value = %raw, %error, "malformed {ANNOTATION_TRIGGER_TIME}: ignored");
            None
        }
    }
}

/// The latest trigger time per family (`[IPv4, IPv6]`) among a Service's
/// slices of the families it has.
fn trigger_times(slices: &[SliceData], (v4, v6): (bool, bool)) -> TriggerTimes {
    let mut out = TriggerTimes::default();
    for s in slices.iter().filter(|s| if s.ipv6 { v6 } else { v4 }) {
        let latest = &mut out.0[usize::from(s.ipv6)];
        *latest = (*latest).max(s.trigger);
    }
    out
}

/// The names of one kind of hint, sorted and deduplicated (a set, as upstream).
fn hint_names<T>(hints: Option<&Vec<T>>, name: impl Fn(&T) -> &String) -> Vec<String> {
    let mut names: Vec<String> = hints
        .into_iter()
        .flatten()
        .map(|h| name(h).clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Endpoints of one service port across all its slices, deduplicated by
/// address (a copy that is ready wins) and sorted.
fn join_endpoints(
    slices: &[SliceData],
    port_name: &str,
    protocol: Protocol,
    (v4, v6): (bool, bool),
) -> Vec<Endpoint> {
    let mut by_addr: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    for s in slices {
        if !(if s.ipv6 { v6 } else { v4 }) {
            continue; // a family the service does not have
        }
        for (_, _, port) in s
            .ports
            .iter()
            .filter(|(n, p, _)| n == port_name && *p == protocol)
        {
            for template in &s.endpoints {
                let addr = SocketAddr::new(template.addr.ip(), *port);
                let ep = Endpoint {
                    addr,
                    ..template.clone()
                };
                by_addr
                    .entry(addr)
                    .and_modify(|old| {
                        if ep.ready && !old.ready {
                            *old = ep.clone();
                        }
                    })
                    .or_insert(ep);
            }
        }
    }
    by_addr.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Sourced<Service> {
        Sourced {
            origin: "test".into(),
            object: serde_saphyr::from_str(yaml).unwrap(),
        }
    }

    fn eps(yaml: &str) -> Sourced<EndpointSlice> {
        Sourced {
            origin: "test".into(),
            object: serde_saphyr::from_str(yaml).unwrap(),
        }
    }

    #[test]
    fn labels_decide_whose_a_service_is() {
        let labels = |k: &str, v: &str| Some(BTreeMap::from([(k.to_string(), v.to_string())]));
        let none = Options::default();
        let kusp = Options {
            service_proxy_name: Some("kusp".into()),
            ..Options::default()
        };
        assert!(none.is_ours(None));
        assert!(!none.is_ours(labels(LABEL_SERVICE_PROXY_NAME, "kusp").as_ref()));
        assert!(kusp.is_ours(labels(LABEL_SERVICE_PROXY_NAME, "kusp").as_ref()));
        assert!(!kusp.is_ours(labels(LABEL_SERVICE_PROXY_NAME, "other").as_ref()));
        assert!(!kusp.is_ours(labels(LABEL_HEADLESS, "").as_ref()));
        assert!(kusp.is_ours(labels("app", "web").as_ref()));
    }

    #[test]
    fn dual_stack_slices_join_only_the_services_families() {
        let slices = [
            eps("metadata: {name: a, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 80}]\nendpoints: [{addresses: [10.0.0.1]}]\n"),
            eps("metadata: {name: b, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\nports: [{name: http, port: 80}]\nendpoints: [{addresses: [\"fd00::1\"]}]\n"),
        ];
        let count = |families: &str| {
            let s = svc(&format!("metadata: {{name: web, namespace: ns}}\nspec:\n  ipFamilies: {families}\n  ports: [{{name: http, port: 80}}]\n"));
            let (snap, problems) = build_snapshot(&[s], &slices, &Snapshot::default());
            assert!(problems.is_empty(), "{problems:?}");
            snap.services.values().next().unwrap().endpoints.len()
        };
        assert_eq!(count("[IPv4]"), 1);
        assert_eq!(count("[IPv6]"), 1);
        assert_eq!(count("[IPv4, IPv6]"), 2);
    }

    #[test]
    fn trigger_times_are_the_latest_per_family_and_a_malformed_one_is_ignored() {
        let slice = |name: &str, family: &str, addr: &str, time: &str| {
            eps(&format!("metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: web}}, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{time}\"}}}}\naddressType: {family}\nports: [{{name: http, port: 80}}]\nendpoints: [{{addresses: [\"{addr}\"]}}]\n"))
        };
        let slices = [
            slice("a", "IPv4", "10.0.0.1", "2025-03-01T10:00:00Z"),
            slice("b", "IPv4", "10.0.0.2", "2025-03-01T10:00:05.250+00:00"),
            slice("c", "IPv6", "fd00::1", "2025-03-01T12:00:00+02:00"),
            slice("d", "IPv6", "fd00::2", "yesterday"),
        ];
        let at = |secs: u64, millis: u64| {
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
        };
        let build = |families: &str| {
            let s = svc(&format!("metadata: {{name: web, namespace: ns}}\nspec:\n  ipFamilies: {families}\n  ports: [{{name: http, port: 80}}, {{name: https, port: 443}}]\n"));
            let (snap, problems) = build_snapshot(&[s], &slices, &Snapshot::default());
            assert!(
                problems.is_empty(),
                "a malformed time is no problem: {problems:?}"
            );
            snap
        };
        let snap = build("[IPv4, IPv6]");
        // 2025-03-01T10:00:00Z is 1740823200; 12:00+02:00 is 10:00Z.
        let want = TriggerTimes([at(1_740_823_205, 250), at(1_740_823_200, 0)]);
        assert!(snap.services.values().all(|e| e.triggers == want));
        assert_eq!(snap.services.values().next().unwrap().endpoints.len(), 4);
        // A family the Service lacks brings no time.
        let snap = build("[IPv4]");
        let want = TriggerTimes([at(1_740_823_205, 250), None]);
        assert!(snap.services.values().all(|e| e.triggers == want));
    }

    #[test]
    fn endpoint_hints_are_read_as_sets() {
        let s =
            svc("metadata: {name: web, namespace: ns}\nspec:\n  ports: [{name: http, port: 80}]\n");
        let slice = eps("metadata: {name: a, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 80}]\nendpoints:\n- addresses: [10.0.0.1]\n  hints: {forZones: [{name: zone-b}, {name: zone-a}, {name: zone-b}], forNodes: [{name: node-1}]}\n- addresses: [10.0.0.2]\n");
        let (snap, problems) = build_snapshot(&[s], &[slice], &Snapshot::default());
        assert!(problems.is_empty(), "{problems:?}");
        let eps = &snap.services.values().next().unwrap().endpoints;
        assert_eq!(eps[0].hints_zones, ["zone-a", "zone-b"]);
        assert_eq!(eps[0].hints_nodes, ["node-1"]);
        assert!(eps[1].hints_zones.is_empty() && eps[1].hints_nodes.is_empty());
    }

    #[test]
    fn local_policies_apply_each_to_its_own_traffic() {
        let slice = eps("metadata: {name: a, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [10.0.0.1], nodeName: a}\n- {addresses: [10.0.0.2], nodeName: b}\n");
        let choose = |policies: &str, node: Option<&str>| {
            let s = svc(&format!("metadata: {{name: web, namespace: ns}}\nspec:\n  type: NodePort\n  {policies}\n  ports: [{{name: http, port: 80, nodePort: 30000}}]\n"));
            let options = Options {
                node_name: node.map(String::from),
                ..Options::default()
            };
            let (snap, problems) = build_snapshot_with(
                &[s],
                std::slice::from_ref(&slice),
                &[],
                &Snapshot::default(),
                &options,
            );
            assert!(problems.is_empty(), "{problems:?}");
            let e = snap.services.into_values().next().unwrap();
            let addrs = |v: &[Endpoint]| v.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>();
            (
                addrs(e.choice.internal(&e.port)),
                addrs(e.choice.external(&e.port)),
            )
        };
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (all, here) = (
            strings(&["10.0.0.1:8080", "10.0.0.2:8080"]),
            strings(&["10.0.0.1:8080"]),
        );
        assert_eq!(choose("", Some("a")), (all.clone(), all.clone()));
        assert_eq!(
            choose("internalTrafficPolicy: Local", Some("a")),
            (here.clone(), all.clone())
        );
        assert_eq!(
            choose("externalTrafficPolicy: Local", Some("a")),
            (all.clone(), here.clone())
        );
        assert_eq!(
            choose(
                "internalTrafficPolicy: Local\n  externalTrafficPolicy: Local",
                Some("a")
            ),
            (here.clone(), here.clone())
        );
        // Upstream: with no node name, nothing is local.
        assert_eq!(
            choose("externalTrafficPolicy: Local", None),
            (all, Vec::new())
        );
    }

    #[test]
    fn only_vip_mode_ingresses_are_captured() {
        // Upstream's newBaseServiceInfo keeps an ingress IP only when
        // IsVIPMode: ipMode absent or VIP; Proxy and unknown values are not.
        let s = svc("metadata: {name: web, namespace: ns}\nspec:\n  type: LoadBalancer\n  ports: [{name: http, port: 80, nodePort: 30080}]\n\
            status:\n  loadBalancer:\n    ingress:\n    - {ip: 192.0.2.1}\n    - {ip: 192.0.2.2, ipMode: VIP}\n    - {ip: 192.0.2.3, ipMode: Proxy}\n    - {ip: 192.0.2.4, ipMode: Tunnel}\n    - {hostname: lb.example}\n");
        let (snap, problems) = build_snapshot(&[s], &[], &Snapshot::default());
        let port = &snap.services.values().next().unwrap().port;
        let ips: Vec<String> = port
            .load_balancer_ips
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ips, ["192.0.2.1", "192.0.2.2"]);
        // The unknown value is reported; the Service is served.
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object, "Service ns/web");
        assert_eq!(problems[0].field, "status.loadBalancer.ingress[3].ipMode");
        assert!(
            problems[0].message.contains("\"Tunnel\""),
            "{}",
            problems[0]
        );
        // Only Proxy-mode ingresses: no LB IP, so only the nodePort is external.
        let proxied = svc(
            "metadata: {name: web, namespace: ns}\nspec:\n  ports: [{name: http, port: 80}]\n\
            status: {loadBalancer: {ingress: [{ip: 192.0.2.3, ipMode: Proxy}]}}\n",
        );
        let (snap, problems) = build_snapshot(&[proxied], &[], &Snapshot::default());
        assert!(problems.is_empty(), "{problems:?}");
        let port = &snap.services.values().next().unwrap().port;
        assert!(port.load_balancer_ips.is_empty() && !port.externally_accessible());
    }

    #[test]
    fn malformed_source_ranges_are_reported_and_the_valid_ones_apply() {
        // Upstream (newBaseServiceInfo, MapCIDRsByIPFamily): trimmed, empty
        // ones ignored, ParseCIDRSloppy (host bits cleared, leading zeros).
        let s = svc("metadata: {name: web, namespace: ns}\nspec:\n  type: LoadBalancer\n\
            \x20 loadBalancerSourceRanges: [' 10.0.0.0/8 ', 10.0.0.0/33, bogus, '', 192.168.1.7/24, '2001:db8::/32', 010.001.0.0/16]\n\
            \x20 ports: [{name: http, port: 80}, {name: https, port: 443}]\n\
            status: {loadBalancer: {ingress: [{ip: 192.0.2.1}]}}\n");
        let (snap, problems) = build_snapshot(&[s], &[], &Snapshot::default());
        assert_eq!(snap.services.len(), 2, "the Service is still served");
        for entry in snap.services.values() {
            let ranges: Vec<String> = entry
                .port
                .load_balancer_source_ranges
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(
                ranges,
                [
                    "10.0.0.0/8",
                    "192.168.1.0/24",
                    "2001:db8::/32",
                    "10.1.0.0/16"
                ]
            );
            assert_eq!(
                entry.port.invalid_load_balancer_source_ranges,
                ["10.0.0.0/33", "bogus"]
            );
        }
        let fields: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.object.as_str(), p.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("Service ns/web", "spec.loadBalancerSourceRanges[1]"),
                ("Service ns/web", "spec.loadBalancerSourceRanges[2]"),
            ]
        );
        assert!(
            problems[1].message.contains("\"bogus\" is not a CIDR"),
            "{}",
            problems[1]
        );
    }

    #[test]
    fn node_object_supplies_labels_and_pod_cidrs() {
        let node: Node = serde_saphyr::from_str("metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}\nspec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, \"fd00:1::/64\"]}\n").unwrap();
        let other: Node = serde_saphyr::from_str(
            "metadata: {name: n2, labels: {topology.kubernetes.io/zone: z2}}\n",
        )
        .unwrap();
        let nodes = [other, node].map(|object| Sourced {
            origin: "t".into(),
            object,
        });
        let info = node_info(Some("n1"), &nodes, &NodeInfo::default());
        assert_eq!(info.zone(), Some("z1"));
        assert_eq!(info.pod_cidrs, ["10.244.1.0/24", "fd00:1::/64"]);
        assert_eq!(
            node_info(Some("n3"), &nodes, &NodeInfo::default()).zone(),
            None
        );
        assert_eq!(node_info(None, &nodes, &NodeInfo::default()).zone(), None);
    }

    /// Upstream's `NodeEligible`: a deletion timestamp or the autoscaler's
    /// taint makes the node ineligible; so does its Node object going away
    /// once seen; a node never seen stays eligible.
    #[test]
    fn node_eligibility_follows_deletion_and_the_autoscaler_taint() {
        let node = |yaml: &str| {
            [Sourced {
                origin: "t".into(),
                object: serde_saphyr::from_str::<Node>(yaml).unwrap(),
            }]
        };
        let plain = node_info(
            Some("n1"),
            &node("metadata: {name: n1}\n"),
            &NodeInfo::default(),
        );
        assert_eq!(plain.object, NodeObject::Present);
        assert_eq!(plain.ineligible(), None);
        let tainted = node("metadata: {name: n1}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}, {key: other, effect: NoExecute}]}\n");
        let tainted = node_info(Some("n1"), &tainted, &plain);
        assert_eq!(tainted.taints, ["ToBeDeletedByClusterAutoscaler", "other"]);
        assert!(tainted
            .ineligible()
            .unwrap()
            .contains("ToBeDeletedByClusterAutoscaler"));
        let deleting = node("metadata: {name: n1, deletionTimestamp: \"2026-12-01T00:00:00Z\"}\n");
        let deleting = node_info(Some("n1"), &deleting, &plain);
        assert!(deleting.ineligible().unwrap().contains("deletionTimestamp"));
        // Gone after being seen: deleted, until it comes back.
        let gone = node_info(Some("n1"), &[], &plain);
        assert_eq!(gone.object, NodeObject::Deleted);
        assert!(gone.ineligible().is_some());
        assert_eq!(
            node_info(Some("n1"), &[], &gone).object,
            NodeObject::Deleted
        );
        let back = node_info(Some("n1"), &node("metadata: {name: n1}\n"), &gone);
        assert_eq!(back.ineligible(), None);
        // Never seen: eligible.
        assert_eq!(
            node_info(Some("n1"), &[], &NodeInfo::default()).ineligible(),
            None
        );
    }
}
