//! Pure rendering of the payload for `iptables-restore --noflush`: a `nat`
//! section (service addresses → our listeners) and a `filter` section
//! (upstream's REJECT and DROP for ports without endpoints, the DROP of
//! LB-IP traffic from outside `loadBalancerSourceRanges`, and the REJECT
//! of direct traffic to listeners that only redirected traffic may reach).
//! No I/O, deterministic: an unchanged input renders byte-identical text.
//!
//! Declaring our chains (`:KUSP-… - [0:0]`) in a `--noflush` restore creates
//! them or flushes them, so each apply replaces their whole content
//! atomically; built-in chains are only touched by the jump rules the caller
//! asks for.
//!
//! What each service address and nodePort gets follows upstream's
//! `syncProxyRules` (`pkg/proxy/iptables/proxier.go`), see [`Disposition`];
//! where a userspace proxy differs (the nodePort is our listener's own
//! port, not NATed), the rules say why.

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::detect_local::Detector;
use crate::model::Protocol;

/// Prefix of every chain we own: cleanup removes whatever carries it.
pub const CHAIN_PREFIX: &str = "KUSP-";
/// Chain for traffic arriving from pods and other hosts (from `PREROUTING`).
pub const CHAIN_CONTAINER: &str = "KUSP-PORTALS-CONTAINER";
/// Chain for traffic the node itself sends (from `OUTPUT`).
pub const CHAIN_HOST: &str = "KUSP-PORTALS-HOST";
/// `filter` chain for ClusterIP traffic (upstream's `KUBE-SERVICES`), from
/// `FORWARD` and `OUTPUT`.
pub const CHAIN_SERVICES: &str = "KUSP-SERVICES";
/// `filter` chain for external IPs, LB IPs and nodePorts (upstream's
/// `KUBE-EXTERNAL-SERVICES`), from `INPUT` and `FORWARD`.
pub const CHAIN_EXTERNAL: &str = "KUSP-EXTERNAL-SERVICES";
/// `filter` chain dropping LB-IP traffic the `nat` rules did not redirect
/// for `loadBalancerSourceRanges` (upstream's `KUBE-PROXY-FIREWALL`), from
/// `INPUT`, `OUTPUT` and `FORWARD`.
pub const CHAIN_FIREWALL: &str = "KUSP-FIREWALL";
/// `filter` chain refusing nodePort traffic to node addresses outside
/// `--nodeport-addresses` (upstream matches only those addresses in its
/// `KUBE-NODEPORTS` jumps), from [`CHAIN_EXTERNAL`].
pub const CHAIN_NODEPORT_ADDRESSES: &str = "KUSP-NODEPORT-ADDRESSES";
/// `filter` chain closing our internal listeners (service ports without a
/// nodePort) to traffic the `nat` rules did not redirect, from `INPUT`.
pub const CHAIN_LISTENERS: &str = "KUSP-INTERNAL-LISTENERS";
/// Comment on our `nat` jump rules, so they can be found and counted.
pub const JUMP_COMMENT: &str = "kube-userspace-proxy portals";
/// Comment on the jumps to [`CHAIN_SERVICES`].
pub const SERVICES_JUMP_COMMENT: &str = "kube-userspace-proxy service portals";
/// Comment on the jumps to [`CHAIN_EXTERNAL`].
pub const EXTERNAL_JUMP_COMMENT: &str = "kube-userspace-proxy externally-visible service portals";
/// Comment on the jumps to [`CHAIN_FIREWALL`].
pub const FIREWALL_JUMP_COMMENT: &str = "kube-userspace-proxy load balancer firewall";
/// Comment on the jump to [`CHAIN_LISTENERS`].
pub const LISTENERS_JUMP_COMMENT: &str = "kube-userspace-proxy internal listeners";

/// The tables we write, in payload order.
pub const TABLES: [&str; 2] = ["nat", "filter"];

/// One jump from a built-in chain into one of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jump {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// The built-in chain jumping.
    pub builtin: &'static str,
    /// Our chain.
    pub chain: &'static str,
    /// Matches before the comment (empty, or upstream's conntrack match).
    pub matches: &'static str,
    /// The rule's comment.
    pub comment: &'static str,
}

const NEW: &str = "-m conntrack --ctstate NEW";

/// Every jump we install, kept at exactly one each: `nat` as before, and
/// `filter` where upstream jumps to `KUBE-SERVICES` (`FORWARD`, `OUTPUT`),
/// `KUBE-EXTERNAL-SERVICES` (`INPUT`, `FORWARD`) and `KUBE-PROXY-FIREWALL`
/// (`INPUT`, `OUTPUT`, `FORWARD`), new connections only; ours to
/// [`CHAIN_LISTENERS`] from `INPUT` only (the listeners are local).
pub const JUMPS: [Jump; 10] = [
    Jump {
        table: "nat",
        builtin: "PREROUTING",
        chain: CHAIN_CONTAINER,
        matches: "",
        comment: JUMP_COMMENT,
    },
    Jump {
        table: "nat",
        builtin: "OUTPUT",
        chain: CHAIN_HOST,
        matches: "",
        comment: JUMP_COMMENT,
    },
    Jump {
        table: "filter",
        builtin: "INPUT",
        chain: CHAIN_EXTERNAL,
        matches: NEW,
        comment: EXTERNAL_JUMP_COMMENT,
    },
    Jump {
        table: "filter",
        builtin: "FORWARD",
        chain: CHAIN_EXTERNAL,
        matches: NEW,
        comment: EXTERNAL_JUMP_COMMENT,
    },
    Jump {
        table: "filter",
        builtin: "FORWARD",
        chain: CHAIN_SERVICES,
        matches: NEW,
        comment: SERVICES_JUMP_COMMENT,
    },
    Jump {
        table: "filter",
        builtin: "OUTPUT",
        chain: CHAIN_SERVICES,
        matches: NEW,
        comment: SERVICES_JUMP_COMMENT,
    },
    Jump {
        table: "filter",
        builtin: "INPUT",
        chain: CHAIN_FIREWALL,
        matches: NEW,
        comment: FIREWALL_JUMP_COMMENT,
    },
    Jump {
        table: "filter",
        builtin: "OUTPUT",
        chain: CHAIN_FIREWALL,
        matches: NEW,
        comment: FIREWALL_JUMP_COMMENT,
    },
    Jump {
        table: "filter",
        builtin: "FORWARD",
        chain: CHAIN_FIREWALL,
        matches: NEW,
        comment: FIREWALL_JUMP_COMMENT,
    },
    Jump {
        table: "filter",
        builtin: "INPUT",
        chain: CHAIN_LISTENERS,
        matches: NEW,
        comment: LISTENERS_JUMP_COMMENT,
    },
];

/// Our chains of `table`, in declaration order.
fn chains_of(table: &str) -> &'static [&'static str] {
    match table {
        "nat" => &[CHAIN_CONTAINER, CHAIN_HOST],
        _ => &[
            CHAIN_SERVICES,
            CHAIN_EXTERNAL,
            CHAIN_FIREWALL,
            CHAIN_NODEPORT_ADDRESSES,
            CHAIN_LISTENERS,
        ],
    }
}

/// Why a service address is redirected (for ordering and debug output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortalKind {
    /// `spec.clusterIP(s)`.
    ClusterIp,
    /// `spec.externalIPs`.
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancerIp,
}

/// What the rules do with a service address's (or nodePort's) traffic,
/// from the port's endpoints (upstream's `hasEndpoints`,
/// `hasInternalEndpoints`, `hasExternalEndpoints`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Disposition {
    /// Served: `nat` REDIRECTs it to the listener (a nodePort reaches the
    /// listener by itself); nothing in `filter`.
    #[default]
    Redirect,
    /// `externalTrafficPolicy: Local` without a local endpoint: only this
    /// node's pods (the detector's match, in the container chain) and the
    /// host (host chain) are REDIRECTed, as upstream short-circuits them to
    /// the cluster endpoints; everything else is DROPped in `filter`.
    RedirectLocalOnly,
    /// No endpoint for this kind of traffic (`internalTrafficPolicy: Local`
    /// without a local endpoint, or external traffic without one): no
    /// `nat` rule, DROP in `filter` ("has no local endpoints").
    Drop,
    /// No endpoint at all: no `nat` rule, REJECT in `filter` (ICMP port
    /// unreachable: "connection refused"; "has no endpoints").
    Reject,
}

/// One service address and what its traffic gets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Portal {
    /// Address clients dial.
    pub ip: IpAddr,
    /// Port clients dial.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Our listener's port (used by the REDIRECT dispositions only; 0 for
    /// a `Drop` or `Reject` portal of a port without a listener).
    pub listener_port: u16,
    /// Which field of the Service the address came from.
    pub kind: PortalKind,
    /// `namespace/name:port`, put in the rule's comment; with `protocol`
    /// and `port`, it also tells which LB IPs belong to one service port.
    pub comment: String,
    /// What the rules do with its traffic.
    pub disposition: Disposition,
    /// For an LB IP: the service port's `spec.loadBalancerSourceRanges`
    /// (both families; the payload of a family uses its own, see
    /// [`Portal::firewall`]); empty otherwise.
    pub source_ranges: Vec<IpNet>,
}

impl Portal {
    /// The source ranges of its own family when upstream's per-service
    /// firewall applies to it (`usesFWChain`: an LB IP of a port with
    /// endpoints and ranges of that family); empty: every source reaches
    /// it. As upstream's proxier, one per family, a family without ranges
    /// is not filtered even if the other has some.
    pub fn firewall(&self) -> Vec<IpNet> {
        if self.kind != PortalKind::LoadBalancerIp || self.disposition == Disposition::Reject {
            return Vec::new();
        }
        self.source_ranges
            .iter()
            .filter(|r| r.addr().is_ipv6() == self.ip.is_ipv6())
            .copied()
            .collect()
    }
}

/// A nodePort whose traffic `filter` drops or rejects (one not
/// [`Disposition::Redirect`]). NodePort traffic is never NATed: the
/// listener binds the nodePort itself.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodePort {
    /// The node port.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// `namespace/name:port`, put in the rule's comment.
    pub comment: String,
    /// What the rules do with its traffic.
    pub disposition: Disposition,
}

/// A listener of a service port without a nodePort: it serves ClusterIP,
/// external-IP and LB-IP traffic only, so `filter` rejects whatever reaches
/// it without a `nat` rule of ours having redirected it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InternalListener {
    /// The listener's port.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// `namespace/name:port`, put in the rule's comment.
    pub comment: String,
}

/// Everything the payload is rendered from (both families; [`render`]
/// picks one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// Service addresses (ClusterIPs, external IPs, LB IPs).
    pub portals: Vec<Portal>,
    /// NodePorts with a `filter` rule.
    pub node_ports: Vec<NodePort>,
    /// Listeners closed to traffic not redirected (both families: a
    /// listener bound to `::` takes both).
    pub listeners: Vec<InternalListener>,
    /// This node's addresses (upstream's node IP): a source range holding
    /// one of them also lets the port's LB IPs in as sources (upstream's
    /// `allowFromNode`: the node reaching a VIP it holds itself).
    pub node_ips: Vec<IpAddr>,
    /// `--nodeport-addresses` of each family (`[IPv4, IPv6]`): the node
    /// addresses nodePorts answer on; `None`: every one (upstream's
    /// `MatchAll`).
    pub node_port_addresses: [Option<Vec<IpNet>>; 2],
    /// Every port bound for traffic to the node's addresses (nodePorts,
    /// health-check node ports), which [`Self::node_port_addresses`] limits.
    pub node_port_listeners: Vec<(u16, Protocol)>,
}

impl Rules {
    /// Whether `family` (`v6`) has anything to render: an address of it,
    /// or (both families) a nodePort or an internal listener.
    pub fn has_family(&self, v6: bool) -> bool {
        self.portals.iter().any(|p| p.ip.is_ipv6() == v6)
            || !self.node_ports.is_empty()
            || (self.node_port_addresses[usize::from(v6)].is_some()
                && !self.node_port_listeners.is_empty())
            || !self.listeners.is_empty()
    }

    /// Service addresses, nodePorts and internal listeners, for logs.
    pub fn len(&self) -> usize {
        self.portals.len() + self.node_ports.len() + self.listeners.len()
    }

    /// Whether there is nothing to render but our chains and jumps.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<Portal>> for Rules {
    fn from(portals: Vec<Portal>) -> Self {
        Self {
            portals,
            ..Self::default()
        }
    }
}

/// Where matched traffic is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Listeners bind the wildcard (or loopback) address: `REDIRECT` (to the
    /// incoming interface's address, or to loopback for local traffic).
    Redirect,
    /// Listeners bind this address only: `DNAT` to it.
    Dnat(IpAddr),
}

impl Target {
    /// The target for listeners bound to `bind`: REDIRECT reaches a wildcard
    /// listener from anywhere; a specific address needs DNAT, except that
    /// node-local traffic REDIRECTed lands on loopback, so a loopback bind
    /// can use REDIRECT in the host chain.
    pub fn for_bind(bind: IpAddr, host_chain: bool) -> Self {
        if bind.is_unspecified() || (host_chain && bind.is_loopback()) {
            Self::Redirect
        } else {
            Self::Dnat(bind)
        }
    }
}

/// What the caller found of our jump rules in the live tables, per entry
/// of [`JUMPS`], so the payload can make each exist exactly once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JumpState {
    /// For each entry of [`JUMPS`]: the rule specs (after `-A CHAIN `) of
    /// every jump to our chain found in its built-in chain.
    pub found: [Vec<String>; JUMPS.len()],
}

impl JumpState {
    /// Every jump present exactly once: what a re-render after a
    /// successful apply finds.
    pub fn settled() -> Self {
        Self {
            found: std::array::from_fn(|_| vec![String::new()]),
        }
    }
}

/// Makes a comment safe inside double quotes and within iptables' 256
/// byte limit.
pub fn sanitize_comment(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-/:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(255);
    out
}

/// `name` sanitized, then `suffix` (a fixed text of ours, spaces allowed),
/// within the 255-byte limit.
fn comment_with(name: &str, suffix: &str) -> String {
    let mut out = sanitize_comment(name);
    out.truncate(255 - suffix.len());
    out.push_str(suffix);
    out
}

fn jump_spec(j: &Jump) -> String {
    let sep = if j.matches.is_empty() { "" } else { " " };
    format!(
        "{}{sep}-m comment --comment \"{}\" -j {}",
        j.matches, j.comment, j.chain
    )
}

fn proto_name(p: Protocol) -> Option<&'static str> {
    match p {
        Protocol::Tcp => Some("tcp"),
        Protocol::Udp => Some("udp"),
        Protocol::Sctp => None,
    }
}

/// Renders the payload for one address family (`v6` selects IPv6 portals,
/// `/128` masks and the detector's IPv6 match): for `nat` then `filter`,
/// our chains declared (thus flushed), the jumps fixed to exactly one
/// each, then the rules. Both tables go in one `iptables-restore`.
///
/// - `nat`: a REDIRECT (or DNAT, per `bind`) per served portal and chain;
///   a [`Disposition::RedirectLocalOnly`] portal only from this node's pods
///   in the container chain (none when `detector` is not implemented for
///   the family) and from the host. An LB IP with source ranges
///   ([`Portal::firewall`]) gets one such rule per allowed source (`-s`):
///   each range, and the port's LB IPs when a range holds one of
///   [`Rules::node_ips`]; other sources are not redirected.
/// - `filter`: [`CHAIN_SERVICES`] drops or rejects ClusterIPs,
///   [`CHAIN_EXTERNAL`] external and LB IPs (`-d IP`), and nodePorts
///   (`--dst-type LOCAL`). NodePort rules skip NATed traffic
///   (`! --ctstate DNAT`: ClusterIP traffic REDIRECTed to the same listener
///   port), and a `RedirectLocalOnly` nodePort also skips this node's pods
///   and the host, since a userspace proxy cannot short-circuit them
///   before `filter` as upstream's DNAT does. [`CHAIN_FIREWALL`] drops
///   what still goes to an LB IP with source ranges: a REDIRECT rewrote the
///   destination of every allowed connection. [`CHAIN_LISTENERS`] rejects
///   new connections to an [`InternalListener`] that no REDIRECT or DNAT
///   sent there (`! --ctstate DNAT`), as a closed port answers: a TCP
///   reset, an ICMP port unreachable for UDP.
pub fn render(
    rules: &Rules,
    v6: bool,
    bind: IpAddr,
    detector: &Detector,
    jumps: &JumpState,
) -> String {
    let mut portals: Vec<&Portal> = rules
        .portals
        .iter()
        .filter(|p| p.ip.is_ipv6() == v6)
        .collect();
    portals.sort();
    portals.dedup_by(|a, b| a.ip == b.ip && a.port == b.port && a.protocol == b.protocol);
    let mut node_ports: Vec<&NodePort> = rules.node_ports.iter().collect();
    node_ports.sort();
    node_ports.dedup_by(|a, b| a.port == b.port && a.protocol == b.protocol);
    let mut listeners: Vec<&InternalListener> = rules.listeners.iter().collect();
    listeners.sort();
    listeners.dedup_by(|a, b| a.port == b.port && a.protocol == b.protocol);
    let mask = if v6 { 128 } else { 32 };
    let pods = Pods::of(detector, v6);
    let not_local = detector.if_not_local(v6);

    let mut out = String::new();
    for table in TABLES {
        let _ = writeln!(out, "*{table}");
        for chain in chains_of(table) {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for (i, j) in JUMPS.iter().enumerate() {
            if j.table != table {
                continue;
            }
            let found = &jumps.found[i];
            if found.is_empty() {
                let _ = writeln!(out, "-I {} 1 {}", j.builtin, jump_spec(j));
            }
            // Duplicates (e.g. from an older run killed mid-way): keep one.
            for extra in found.iter().skip(1) {
                let _ = writeln!(out, "-D {} {extra}", j.builtin);
            }
        }
        if table == "nat" {
            render_nat(&mut out, &portals, mask, bind, &pods, &rules.node_ips);
        } else {
            render_filter(&mut out, &portals, &node_ports, mask, not_local.as_deref());
            if let Some(cidrs) = &rules.node_port_addresses[usize::from(v6)] {
                render_node_port_addresses(&mut out, cidrs, &rules.node_port_listeners);
            }
            render_listeners(&mut out, &listeners, v6);
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// How the container chain tells this node's pods for a
/// [`Disposition::RedirectLocalOnly`] portal (the detector's `if_local`).
enum Pods {
    /// By source: narrowed with a source range rather than a second `-s`.
    Cidr(IpNet),
    /// By interface: a match written after `-d`.
    Interface(String),
    /// Not implemented for the family: no rule.
    Unknown,
}

impl Pods {
    fn of(detector: &Detector, v6: bool) -> Self {
        match (detector.local_cidr(v6), detector.if_local(v6)) {
            (Some(cidr), _) => Self::Cidr(cidr),
            (None, Some(m)) => Self::Interface(m),
            (None, None) => Self::Unknown,
        }
    }
}

/// The part of two CIDRs both hold (CIDRs are nested or disjoint).
fn narrow(a: IpNet, b: IpNet) -> Option<IpNet> {
    if a.contains(&b) {
        Some(b)
    } else if b.contains(&a) {
        Some(a)
    } else {
        None
    }
}

/// The sources `p` may be reached from (upstream's per-service firewall
/// chain): `None` for every source; else each of its ranges, then, when a
/// range holds a node address (upstream's `allowFromNode`), each LB IP of
/// the same service port: a node reaching a VIP it holds itself has that
/// VIP as its source.
fn allowed_sources(p: &Portal, portals: &[&Portal], node_ips: &[IpAddr]) -> Option<Vec<IpNet>> {
    let mut ranges = p.firewall();
    if ranges.is_empty() {
        return None;
    }
    let allow_from_node = ranges
        .iter()
        .any(|r| node_ips.iter().any(|ip| r.contains(ip)));
    if allow_from_node {
        let vips = portals.iter().filter(|q| {
            q.kind == PortalKind::LoadBalancerIp
                && (&q.comment, q.protocol, q.port) == (&p.comment, p.protocol, p.port)
        });
        ranges.extend(vips.map(|q| IpNet::from(q.ip)));
    }
    Some(ranges)
}

fn render_nat(
    out: &mut String,
    portals: &[&Portal],
    mask: u8,
    bind: IpAddr,
    pods: &Pods,
    node_ips: &[IpAddr],
) {
    for (chain, host) in [(CHAIN_CONTAINER, false), (CHAIN_HOST, true)] {
        for p in portals {
            let Some(proto) = proto_name(p.protocol) else {
                continue;
            };
            let pods_only = match p.disposition {
                Disposition::Redirect => false,
                Disposition::RedirectLocalOnly => !host,
                Disposition::Drop | Disposition::Reject => continue,
            };
            if p.listener_port == 0 {
                continue;
            }
            let target = match Target::for_bind(bind, host) {
                Target::Redirect => format!("REDIRECT --to-ports {}", p.listener_port),
                Target::Dnat(ip) if ip.is_ipv6() => {
                    format!("DNAT --to-destination [{ip}]:{}", p.listener_port)
                }
                Target::Dnat(ip) => format!("DNAT --to-destination {ip}:{}", p.listener_port),
            };
            let sources = match allowed_sources(p, portals, node_ips) {
                None => vec![None],
                Some(all) => all.into_iter().map(Some).collect(),
            };
            for source in sources {
                // Only pods of this node: the detector's match, or no rule.
                // Written where `iptables-save` puts it (`-s` before `-d`,
                // `-i` after), so the saved rule reads as rendered.
                let (source, iface) = match (pods_only, pods) {
                    (false, _) => (source, None),
                    (true, Pods::Cidr(cidr)) => match source {
                        None => (Some(*cidr), None),
                        Some(range) => match narrow(range, *cidr) {
                            Some(both) => (Some(both), None),
                            None => continue,
                        },
                    },
                    (true, Pods::Interface(m)) => (source, Some(m.as_str())),
                    (true, Pods::Unknown) => continue,
                };
                let before = source.map(|s| format!(" -s {s}")).unwrap_or_default();
                let after = iface.map(|m| format!(" {m}")).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "-A {chain}{before} -d {}/{mask}{after} -p {proto} -m {proto} --dport {} -m comment --comment \"{}\" -j {target}",
                    p.ip,
                    p.port,
                    sanitize_comment(&p.comment),
                );
            }
        }
    }
}

/// The `filter` target and comment of a disposition; `None` for served
/// traffic.
fn filter_target(d: Disposition, name: &str) -> Option<(&'static str, String)> {
    match d {
        Disposition::Redirect => None,
        Disposition::RedirectLocalOnly | Disposition::Drop => {
            Some(("DROP", comment_with(name, " has no local endpoints")))
        }
        Disposition::Reject => Some(("REJECT", comment_with(name, " has no endpoints"))),
    }
}

fn render_filter(
    out: &mut String,
    portals: &[&Portal],
    node_ports: &[&NodePort],
    mask: u8,
    not_local: Option<&str>,
) {
    for chain in [CHAIN_SERVICES, CHAIN_EXTERNAL] {
        for p in portals {
            let internal = p.kind == PortalKind::ClusterIp;
            if internal != (chain == CHAIN_SERVICES) {
                continue;
            }
            let (Some(proto), Some((target, comment))) = (
                proto_name(p.protocol),
                filter_target(p.disposition, &p.comment),
            ) else {
                continue;
            };
            let _ = writeln!(
                out,
                "-A {chain} -d {}/{mask} -p {proto} -m {proto} --dport {} -m comment --comment \"{comment}\" -j {target}",
                p.ip, p.port,
            );
        }
    }
    for n in node_ports {
        let (Some(proto), Some((target, comment))) = (
            proto_name(n.protocol),
            filter_target(n.disposition, &n.comment),
        ) else {
            continue;
        };
        // Upstream DNATs this node's pods and the host to the cluster
        // endpoints before `filter`; here they reach the listener
        // un-NATed, so the DROP itself lets them by.
        let (pods, host) = match (n.disposition, not_local) {
            (Disposition::RedirectLocalOnly, m) => (
                m.map(|m| format!(" {m}")).unwrap_or_default(),
                " -m addrtype ! --src-type LOCAL",
            ),
            _ => (String::new(), ""),
        };
        let _ = writeln!(
            out,
            "-A {CHAIN_EXTERNAL}{pods} -p {proto} -m addrtype --dst-type LOCAL{host} -m {proto} --dport {} -m conntrack ! --ctstate DNAT -m comment --comment \"{comment}\" -j {target}",
            n.port,
        );
    }
    // Upstream's KUBE-PROXY-FIREWALL: an allowed connection to an LB IP
    // was REDIRECTed to a local address and our listener's port, so what
    // still goes to the LB IP and port came from elsewhere.
    for p in portals {
        let Some(proto) = proto_name(p.protocol) else {
            continue;
        };
        if p.firewall().is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "-A {CHAIN_FIREWALL} -d {}/{mask} -p {proto} -m {proto} --dport {} -m comment --comment \"{}\" -j DROP",
            p.ip,
            p.port,
            comment_with(&p.comment, " traffic not accepted by loadBalancerSourceRanges"),
        );
    }
}

/// `--nodeport-addresses` (upstream's `NodePortAddresses` in its nodePort
/// jumps): traffic to a port bound for the node's addresses, not
/// REDIRECTed there by our own rules, goes through
/// [`CHAIN_NODEPORT_ADDRESSES`], which returns for the allowed addresses
/// and REJECTs the rest, as a closed port refuses.
fn render_node_port_addresses(out: &mut String, cidrs: &[IpNet], ports: &[(u16, Protocol)]) {
    let mut ports: Vec<_> = ports.to_vec();
    ports.sort();
    ports.dedup();
    for (port, protocol) in ports {
        let Some(proto) = proto_name(protocol) else {
            continue;
        };
        let _ = writeln!(
            out,
            "-A {CHAIN_EXTERNAL} -p {proto} -m addrtype --dst-type LOCAL -m {proto} --dport {port} -m conntrack ! --ctstate DNAT -j {CHAIN_NODEPORT_ADDRESSES}",
        );
    }
    for cidr in cidrs {
        let _ = writeln!(out, "-A {CHAIN_NODEPORT_ADDRESSES} -d {cidr} -j RETURN");
    }
    let _ = writeln!(
        out,
        "-A {CHAIN_NODEPORT_ADDRESSES} -m comment --comment \"not a --nodeport-addresses address\" -j REJECT",
    );
}

/// Closes each internal listener to what our `nat` rules did not send it:
/// a REDIRECT (or DNAT) is a DNAT to conntrack, in `PREROUTING` and in
/// `OUTPUT` alike, so a new connection without it came straight to the
/// listener's port, from outside, a pod or the host (loopback included:
/// it enters `INPUT` too). No `--dst-type LOCAL`: `INPUT` only sees local
/// destinations.
fn render_listeners(out: &mut String, listeners: &[&InternalListener], v6: bool) {
    for l in listeners {
        let Some(proto) = proto_name(l.protocol) else {
            continue;
        };
        let answer = match (l.protocol, v6) {
            (Protocol::Tcp, _) => "tcp-reset",
            (_, false) => "icmp-port-unreachable",
            (_, true) => "icmp6-port-unreachable",
        };
        let _ = writeln!(
            out,
            "-A {CHAIN_LISTENERS} -p {proto} -m {proto} --dport {} -m conntrack ! --ctstate DNAT -m comment --comment \"{}\" -j REJECT --reject-with {answer}",
            l.port,
            comment_with(&l.comment, " takes redirected traffic only"),
        );
    }
}

/// Renders the payload that removes everything of ours from saved `nat`
/// and `filter` tables (`iptables-save` output): every jump into a `KUSP-`
/// chain, then every `KUSP-` chain (flushed, then deleted), per table.
/// `None` when there is nothing of ours.
pub fn render_cleanup(saved: &str) -> Option<String> {
    let mut out = String::new();
    for table in TABLES {
        let mut chains = Vec::new();
        let mut jumps = Vec::new();
        for line in table_lines(saved, table) {
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or("");
                if name.starts_with(CHAIN_PREFIX) {
                    chains.push(name.to_string());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
                let jumps_to_ours = spec
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with(CHAIN_PREFIX));
                if !chain.starts_with(CHAIN_PREFIX) && jumps_to_ours {
                    jumps.push(format!("-D {chain} {spec}"));
                }
            }
        }
        if chains.is_empty() && jumps.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for c in &chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for j in &jumps {
            let _ = writeln!(out, "{j}");
        }
        for c in &chains {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
    (!out.is_empty()).then_some(out)
}

/// The lines of `table`'s section(s) in `iptables-save` output.
fn table_lines<'a>(saved: &'a str, table: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let mut inside = false;
    saved.lines().filter(move |line| {
        if let Some(t) = line.strip_prefix('*') {
            inside = t.trim() == table;
            return false;
        }
        inside
    })
}

/// Finds our jump rules in saved `nat` and `filter` tables, for [`render`].
pub fn find_jumps(saved: &str) -> JumpState {
    let mut state = JumpState::default();
    for table in TABLES {
        for line in table_lines(saved, table) {
            let Some(rule) = line.strip_prefix("-A ") else {
                continue;
            };
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            for (i, j) in JUMPS.iter().enumerate() {
                if j.table == table
                    && chain == j.builtin
                    && spec.ends_with(&format!("-j {}", j.chain))
                {
                    state.found[i].push(spec.to_string());
                }
            }
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    fn portal(ip: &str, port: u16, lp: u16, kind: PortalKind) -> Portal {
        Portal {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            listener_port: lp,
            kind,
            comment: "ns/web:http".into(),
            disposition: Disposition::Redirect,
            source_ranges: Vec::new(),
        }
    }

    fn with(mut p: Portal, d: Disposition) -> Portal {
        p.disposition = d;
        p
    }

    fn node_port(port: u16, protocol: Protocol, d: Disposition) -> NodePort {
        NodePort {
            port,
            protocol,
            comment: "ns/web:http".into(),
            disposition: d,
        }
    }

    const ANY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

    fn none() -> Detector {
        Detector::default()
    }

    fn pods() -> Detector {
        Detector::Cidrs(vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10::/48".parse().unwrap(),
        ])
    }

    /// The lines of `table`'s section that add rules to our chains.
    fn rules_of(out: &str, table: &str) -> Vec<String> {
        table_lines(out, table)
            .filter(|l| l.starts_with("-A KUSP-"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn empty_snapshot_renders_only_chains_and_jumps() {
        let out = render(
            &Rules::default(),
            false,
            ANY,
            &none(),
            &JumpState::default(),
        );
        assert_eq!(
            out,
            "*nat\n\
             :KUSP-PORTALS-CONTAINER - [0:0]\n\
             :KUSP-PORTALS-HOST - [0:0]\n\
             -I PREROUTING 1 -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-CONTAINER\n\
             -I OUTPUT 1 -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-HOST\n\
             COMMIT\n\
             *filter\n\
             :KUSP-SERVICES - [0:0]\n\
             :KUSP-EXTERNAL-SERVICES - [0:0]\n\
             :KUSP-FIREWALL - [0:0]\n\
             :KUSP-NODEPORT-ADDRESSES - [0:0]\n\
             :KUSP-INTERNAL-LISTENERS - [0:0]\n\
             -I INPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy externally-visible service portals\" -j KUSP-EXTERNAL-SERVICES\n\
             -I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy externally-visible service portals\" -j KUSP-EXTERNAL-SERVICES\n\
             -I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy service portals\" -j KUSP-SERVICES\n\
             -I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy service portals\" -j KUSP-SERVICES\n\
             -I INPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy load balancer firewall\" -j KUSP-FIREWALL\n\
             -I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy load balancer firewall\" -j KUSP-FIREWALL\n\
             -I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy load balancer firewall\" -j KUSP-FIREWALL\n\
             -I INPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy internal listeners\" -j KUSP-INTERNAL-LISTENERS\n\
             COMMIT\n"
        );
        let settled = render(
            &Rules::default(),
            false,
            ANY,
            &none(),
            &JumpState::settled(),
        );
        assert!(
            !settled.contains("-I ") && !settled.contains("-D "),
            "{settled}"
        );
    }

    #[test]
    fn cluster_external_and_lb_ips_render_sorted_and_stable() {
        let ps = vec![
            portal("192.0.2.10", 80, 30080, PortalKind::LoadBalancerIp),
            portal("10.96.0.10", 80, 30080, PortalKind::ClusterIp),
            portal("198.51.100.7", 80, 30080, PortalKind::ExternalIp),
        ];
        let jumps = JumpState::settled();
        let out = render(&ps.clone().into(), false, ANY, &none(), &jumps);
        let mut reversed = ps.clone();
        reversed.reverse();
        assert_eq!(
            out,
            render(&reversed.into(), false, ANY, &none(), &jumps),
            "order-independent"
        );
        assert_eq!(
            out,
            "*nat\n\
             :KUSP-PORTALS-CONTAINER - [0:0]\n\
             :KUSP-PORTALS-HOST - [0:0]\n\
             -A KUSP-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             -A KUSP-PORTALS-CONTAINER -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             -A KUSP-PORTALS-CONTAINER -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             -A KUSP-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             -A KUSP-PORTALS-HOST -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             -A KUSP-PORTALS-HOST -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             COMMIT\n\
             *filter\n\
             :KUSP-SERVICES - [0:0]\n\
             :KUSP-EXTERNAL-SERVICES - [0:0]\n\
             :KUSP-FIREWALL - [0:0]\n\
             :KUSP-NODEPORT-ADDRESSES - [0:0]\n\
             :KUSP-INTERNAL-LISTENERS - [0:0]\n\
             COMMIT\n"
        );
    }

    #[test]
    fn no_endpoints_rejects_every_address_and_the_node_port() {
        let rules = Rules {
            portals: vec![
                with(
                    portal("10.96.0.10", 80, 30080, PortalKind::ClusterIp),
                    Disposition::Reject,
                ),
                with(
                    portal("198.51.100.7", 80, 30080, PortalKind::ExternalIp),
                    Disposition::Reject,
                ),
                with(
                    portal("192.0.2.10", 80, 30080, PortalKind::LoadBalancerIp),
                    Disposition::Reject,
                ),
            ],
            node_ports: vec![node_port(30080, Protocol::Udp, Disposition::Reject)],
            ..Rules::default()
        };
        let out = render(&rules, false, ANY, &pods(), &JumpState::settled());
        assert!(rules_of(&out, "nat").is_empty(), "no nat rule: {out}");
        assert_eq!(
            rules_of(&out, "filter"),
            [
                "-A KUSP-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http has no endpoints\" -j REJECT",
                "-A KUSP-EXTERNAL-SERVICES -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http has no endpoints\" -j REJECT",
                "-A KUSP-EXTERNAL-SERVICES -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http has no endpoints\" -j REJECT",
                "-A KUSP-EXTERNAL-SERVICES -p udp -m addrtype --dst-type LOCAL -m udp --dport 30080 -m conntrack ! --ctstate DNAT -m comment --comment \"ns/web:http has no endpoints\" -j REJECT",
            ]
        );
        // A port without a listener is rejected all the same.
        let mut unbound = rules.clone();
        unbound.portals.iter_mut().for_each(|p| p.listener_port = 0);
        assert_eq!(
            rules_of(
                &render(&unbound, false, ANY, &pods(), &JumpState::settled()),
                "filter"
            )
            .len(),
            4
        );
    }

    #[test]
    fn internal_policy_local_without_local_endpoints_drops_the_cluster_ip() {
        let rules: Rules = vec![
            with(
                portal("10.96.0.10", 80, 30080, PortalKind::ClusterIp),
                Disposition::Drop,
            ),
            portal("198.51.100.7", 80, 30080, PortalKind::ExternalIp),
        ]
        .into();
        let out = render(&rules, false, ANY, &none(), &JumpState::settled());
        assert_eq!(
            rules_of(&out, "nat"),
            [
                "-A KUSP-PORTALS-CONTAINER -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080",
                "-A KUSP-PORTALS-HOST -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080",
            ]
        );
        assert_eq!(
            rules_of(&out, "filter"),
            ["-A KUSP-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http has no local endpoints\" -j DROP"]
        );
    }

    #[test]
    fn external_policy_local_without_local_endpoints_serves_only_local_clients() {
        let rules = Rules {
            portals: vec![
                portal("10.96.0.10", 80, 30080, PortalKind::ClusterIp),
                with(
                    portal("198.51.100.7", 80, 30080, PortalKind::ExternalIp),
                    Disposition::RedirectLocalOnly,
                ),
                with(
                    portal("fd00::7", 80, 30080, PortalKind::LoadBalancerIp),
                    Disposition::RedirectLocalOnly,
                ),
            ],
            node_ports: vec![node_port(
                30080,
                Protocol::Tcp,
                Disposition::RedirectLocalOnly,
            )],
            ..Rules::default()
        };
        let v4 = render(&rules, false, ANY, &pods(), &JumpState::settled());
        assert_eq!(
            rules_of(&v4, "nat"),
            [
                "-A KUSP-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080",
                "-A KUSP-PORTALS-CONTAINER -s 10.244.0.0/16 -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080",
                "-A KUSP-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080",
                "-A KUSP-PORTALS-HOST -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080",
            ]
        );
        assert_eq!(
            rules_of(&v4, "filter"),
            [
                "-A KUSP-EXTERNAL-SERVICES -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http has no local endpoints\" -j DROP",
                "-A KUSP-EXTERNAL-SERVICES ! -s 10.244.0.0/16 -p tcp -m addrtype --dst-type LOCAL -m addrtype ! --src-type LOCAL -m tcp --dport 30080 -m conntrack ! --ctstate DNAT -m comment --comment \"ns/web:http has no local endpoints\" -j DROP",
            ]
        );
        // IPv6: its own addresses and the detector's IPv6 CIDR; the
        // nodePort in both families.
        let v6 = render(
            &rules,
            true,
            "::".parse().unwrap(),
            &pods(),
            &JumpState::settled(),
        );
        assert_eq!(
            rules_of(&v6, "nat"),
            [
                "-A KUSP-PORTALS-CONTAINER -s fd00:10::/48 -d fd00::7/128 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080",
                "-A KUSP-PORTALS-HOST -d fd00::7/128 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080",
            ]
        );
        assert_eq!(
            rules_of(&v6, "filter"),
            [
                "-A KUSP-EXTERNAL-SERVICES -d fd00::7/128 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http has no local endpoints\" -j DROP",
                "-A KUSP-EXTERNAL-SERVICES ! -s fd00:10::/48 -p tcp -m addrtype --dst-type LOCAL -m addrtype ! --src-type LOCAL -m tcp --dport 30080 -m conntrack ! --ctstate DNAT -m comment --comment \"ns/web:http has no local endpoints\" -j DROP",
            ]
        );
        // No detector: pods cannot be told apart, so only the host is
        // redirected; the nodePort still exempts the host.
        let bare = render(&rules, false, ANY, &none(), &JumpState::settled());
        assert!(
            !bare.contains("-A KUSP-PORTALS-CONTAINER -d 198.51.100.7"),
            "{bare}"
        );
        assert!(
            bare.contains("-A KUSP-PORTALS-HOST -d 198.51.100.7/32"),
            "{bare}"
        );
        assert!(bare.contains("-A KUSP-EXTERNAL-SERVICES -p tcp -m addrtype --dst-type LOCAL -m addrtype ! --src-type LOCAL -m tcp --dport 30080 "), "{bare}");
        // Interface detectors match the incoming interface.
        let bridge = render(
            &rules,
            false,
            ANY,
            &Detector::Bridge("cbr0".into()),
            &JumpState::settled(),
        );
        assert!(
            bridge.contains("-A KUSP-PORTALS-CONTAINER -d 198.51.100.7/32 -i cbr0 -p tcp"),
            "{bridge}"
        );
        assert!(
            bridge.contains(
                "-A KUSP-EXTERNAL-SERVICES ! -i cbr0 -p tcp -m addrtype --dst-type LOCAL"
            ),
            "{bridge}"
        );
    }

    #[test]
    fn external_policy_cluster_without_external_endpoints_drops_even_local_clients() {
        let rules = Rules {
            portals: vec![with(
                portal("198.51.100.7", 80, 1, PortalKind::ExternalIp),
                Disposition::Drop,
            )],
            node_ports: vec![
                node_port(30080, Protocol::Tcp, Disposition::Drop),
                // Served nodePorts and SCTP render nothing.
                node_port(30081, Protocol::Tcp, Disposition::Redirect),
                node_port(30082, Protocol::Sctp, Disposition::Reject),
            ],
            ..Rules::default()
        };
        let out = render(&rules, false, ANY, &pods(), &JumpState::settled());
        assert!(rules_of(&out, "nat").is_empty(), "{out}");
        assert_eq!(
            rules_of(&out, "filter"),
            [
                "-A KUSP-EXTERNAL-SERVICES -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http has no local endpoints\" -j DROP",
                "-A KUSP-EXTERNAL-SERVICES -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 30080 -m conntrack ! --ctstate DNAT -m comment --comment \"ns/web:http has no local endpoints\" -j DROP",
            ]
        );
    }

    fn ranged(p: Portal, ranges: &[&str]) -> Portal {
        Portal {
            source_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
            ..p
        }
    }

    const RANGES: [&str; 3] = ["203.0.113.0/24", "2001:db8::/32", "10.0.0.0/8"];

    /// A LoadBalancer service port `ns/web:http` with two IPv4 LB IPs and
    /// one IPv6, its ClusterIP, external IP and nodePort, and source ranges
    /// of both families.
    fn load_balancer(d: Disposition) -> Rules {
        let lb = |ip| {
            with(
                ranged(portal(ip, 80, 30080, PortalKind::LoadBalancerIp), &RANGES),
                d,
            )
        };
        Rules {
            portals: vec![
                portal("10.96.0.10", 80, 30080, PortalKind::ClusterIp),
                with(portal("198.51.100.7", 80, 30080, PortalKind::ExternalIp), d),
                lb("192.0.2.10"),
                lb("192.0.2.11"),
                lb("fd00::7"),
            ],
            node_ports: vec![node_port(30080, Protocol::Tcp, d)],
            ..Rules::default()
        }
    }

    #[test]
    fn source_ranges_redirect_allowed_sources_and_drop_the_rest_per_family() {
        // As upstream's syncProxyRules: the LB IPs go through the firewall
        // (one rule per range of the family), KUSP-FIREWALL drops what was
        // not redirected; ClusterIP, external IP and nodePort are untouched.
        let rules = load_balancer(Disposition::Redirect);
        let v4 = render(&rules, false, ANY, &none(), &JumpState::settled());
        let redirect = |chain: &str, src: &str, lb: &str| {
            format!("-A {chain}{src} -d {lb} -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080")
        };
        let v4_nat: Vec<String> = [CHAIN_CONTAINER, CHAIN_HOST]
            .iter()
            .flat_map(|c| {
                [
                    redirect(c, "", "10.96.0.10/32"),
                    redirect(c, " -s 203.0.113.0/24", "192.0.2.10/32"),
                    redirect(c, " -s 10.0.0.0/8", "192.0.2.10/32"),
                    redirect(c, " -s 203.0.113.0/24", "192.0.2.11/32"),
                    redirect(c, " -s 10.0.0.0/8", "192.0.2.11/32"),
                    redirect(c, "", "198.51.100.7/32"),
                ]
            })
            .collect();
        assert_eq!(rules_of(&v4, "nat"), v4_nat);
        assert_eq!(
            rules_of(&v4, "filter"),
            [
                "-A KUSP-FIREWALL -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http traffic not accepted by loadBalancerSourceRanges\" -j DROP",
                "-A KUSP-FIREWALL -d 192.0.2.11/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http traffic not accepted by loadBalancerSourceRanges\" -j DROP",
            ]
        );
        assert!(!v4.contains("2001:db8"), "no IPv6 range in IPv4: {v4}");

        let v6 = render(
            &rules,
            true,
            "::".parse().unwrap(),
            &none(),
            &JumpState::settled(),
        );
        assert_eq!(
            rules_of(&v6, "nat"),
            [
                redirect(CHAIN_CONTAINER, " -s 2001:db8::/32", "fd00::7/128"),
                redirect(CHAIN_HOST, " -s 2001:db8::/32", "fd00::7/128"),
            ]
        );
        assert_eq!(
            rules_of(&v6, "filter"),
            ["-A KUSP-FIREWALL -d fd00::7/128 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http traffic not accepted by loadBalancerSourceRanges\" -j DROP"]
        );
        assert!(
            !v6.contains("203.0.113") && !v6.contains("10.0.0.0"),
            "{v6}"
        );
    }

    #[test]
    fn a_range_holding_the_node_lets_the_ports_lb_ips_in_as_sources() {
        // Upstream's allowFromNode: every LB IP of the port, in its family.
        let mut rules = load_balancer(Disposition::Redirect);
        // Another port's LB IP is none of this port's.
        rules.portals.push(ranged(
            Portal {
                comment: "ns/other:http".into(),
                ..portal("192.0.2.99", 80, 30081, PortalKind::LoadBalancerIp)
            },
            &["198.18.0.0/15"],
        ));
        rules.node_ips = vec!["10.1.2.3".parse().unwrap(), "fe80::1".parse().unwrap()];
        let v4 = render(&rules, false, ANY, &none(), &JumpState::settled());
        let sources = |lb: &str| -> Vec<String> {
            rules_of(&v4, "nat")
                .into_iter()
                .filter(|l| {
                    l.starts_with("-A KUSP-PORTALS-HOST") && l.contains(&format!("-d {lb} "))
                })
                .map(|l| l.split(' ').nth(3).unwrap_or_default().to_string())
                .collect()
        };
        let want = [
            "203.0.113.0/24",
            "10.0.0.0/8",
            "192.0.2.10/32",
            "192.0.2.11/32",
        ];
        assert_eq!(sources("192.0.2.10/32"), want);
        assert_eq!(sources("192.0.2.11/32"), want);
        // No range of ns/other holds a node address.
        assert_eq!(sources("192.0.2.99/32"), ["198.18.0.0/15"]);
        // The IPv6 range holds no node address: no allowFromNode there.
        let v6 = render(
            &rules,
            true,
            "::".parse().unwrap(),
            &none(),
            &JumpState::settled(),
        );
        assert!(!v6.contains("-s fd00::7/128"), "{v6}");
        rules.node_ips.push("2001:db8::5".parse().unwrap());
        let v6 = render(
            &rules,
            true,
            "::".parse().unwrap(),
            &none(),
            &JumpState::settled(),
        );
        assert_eq!(
            v6.matches("-s fd00::7/128 -d fd00::7/128").count(),
            2,
            "{v6}"
        );
    }

    #[test]
    fn source_ranges_need_endpoints_and_ranges_of_the_family() {
        // No endpoints: upstream's usesFWChain is false, REJECT for all.
        let rejected = load_balancer(Disposition::Reject);
        let v4 = render(&rejected, false, ANY, &none(), &JumpState::settled());
        assert!(!v4.contains("-A KUSP-FIREWALL"), "{v4}");
        assert_eq!(
            rules_of(&v4, "filter")
                .iter()
                .filter(
                    |l| l.contains("-d 192.0.2.1") && l.ends_with("has no endpoints\" -j REJECT")
                )
                .count(),
            2
        );
        // Ranges of the other family only: this family is not filtered.
        let mut rules = load_balancer(Disposition::Redirect);
        for p in &mut rules.portals {
            p.source_ranges.retain(|r| r.addr().is_ipv4());
        }
        let v6 = render(
            &rules,
            true,
            "::".parse().unwrap(),
            &none(),
            &JumpState::settled(),
        );
        assert!(
            !v6.contains("-A KUSP-FIREWALL") && !v6.contains(" -s "),
            "{v6}"
        );
        assert!(
            v6.contains("-A KUSP-PORTALS-CONTAINER -d fd00::7/128 -p tcp"),
            "{v6}"
        );
        // A port without a listener keeps the DROP (no nat rule).
        let mut unbound = load_balancer(Disposition::Redirect);
        unbound.portals.iter_mut().for_each(|p| p.listener_port = 0);
        let v4 = render(&unbound, false, ANY, &none(), &JumpState::settled());
        assert!(rules_of(&v4, "nat").is_empty(), "{v4}");
        assert_eq!(rules_of(&v4, "filter").len(), 2, "{v4}");
    }

    #[test]
    fn local_only_lb_ips_take_allowed_sources_that_are_pods_or_the_host() {
        // eTP Local without a local endpoint: upstream's firewall chain
        // jumps to the EXT chain, which takes pods and the host only.
        let mut rules = load_balancer(Disposition::RedirectLocalOnly);
        for p in &mut rules.portals {
            if p.kind == PortalKind::LoadBalancerIp {
                p.source_ranges = ["10.244.1.0/24", "203.0.113.0/24", "10.0.0.0/8"]
                    .iter()
                    .map(|r| r.parse().unwrap())
                    .collect();
            }
        }
        let v4 = render(&rules, false, ANY, &pods(), &JumpState::settled());
        let on = |chain: &str, lb: &str| -> Vec<String> {
            rules_of(&v4, "nat")
                .into_iter()
                .filter(|l| {
                    l.starts_with(&format!("-A {chain} ")) && l.contains(&format!("-d {lb} "))
                })
                .collect()
        };
        // Pods: each range narrowed to the pod CIDR (none for a disjoint one).
        assert_eq!(
            on(CHAIN_CONTAINER, "192.0.2.10/32"),
            [
                "-A KUSP-PORTALS-CONTAINER -s 10.244.1.0/24 -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080",
                "-A KUSP-PORTALS-CONTAINER -s 10.244.0.0/16 -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080",
            ]
        );
        // The host: every range.
        assert_eq!(on(CHAIN_HOST, "192.0.2.10/32").len(), 3);
        let filter = rules_of(&v4, "filter");
        assert!(filter.contains(&"-A KUSP-EXTERNAL-SERVICES -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http has no local endpoints\" -j DROP".to_string()), "{filter:?}");
        assert!(filter.contains(&"-A KUSP-FIREWALL -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http traffic not accepted by loadBalancerSourceRanges\" -j DROP".to_string()), "{filter:?}");
        // Pods told by interface: the range and the interface.
        let bridge = render(
            &rules,
            false,
            ANY,
            &Detector::Bridge("cbr0".into()),
            &JumpState::settled(),
        );
        assert!(
            bridge.contains(
                "-A KUSP-PORTALS-CONTAINER -s 203.0.113.0/24 -d 192.0.2.10/32 -i cbr0 -p tcp"
            ),
            "{bridge}"
        );
        // Pods not told apart: the host only.
        let bare = render(&rules, false, ANY, &none(), &JumpState::settled());
        assert!(!bare.contains("-A KUSP-PORTALS-CONTAINER -s"), "{bare}");
    }

    fn internal(port: u16, protocol: Protocol) -> InternalListener {
        InternalListener {
            port,
            protocol,
            comment: "ns/web:http".into(),
        }
    }

    #[test]
    fn internal_listeners_take_redirected_traffic_only_in_both_families() {
        // Out of order, a duplicate and SCTP (never served): sorted, once,
        // and no rule for SCTP.
        let rules = Rules {
            portals: vec![portal("10.96.0.10", 80, 40000, PortalKind::ClusterIp)],
            listeners: vec![
                internal(40001, Protocol::Udp),
                internal(40000, Protocol::Tcp),
                internal(40000, Protocol::Tcp),
                internal(40002, Protocol::Sctp),
            ],
            ..Rules::default()
        };
        let rule = |proto: &str, port: u16, answer: &str| {
            format!("-A KUSP-INTERNAL-LISTENERS -p {proto} -m {proto} --dport {port} -m conntrack ! --ctstate DNAT -m comment --comment \"ns/web:http takes redirected traffic only\" -j REJECT --reject-with {answer}")
        };
        let v4 = render(&rules, false, ANY, &pods(), &JumpState::settled());
        assert_eq!(
            rules_of(&v4, "filter"),
            [
                rule("tcp", 40000, "tcp-reset"),
                rule("udp", 40001, "icmp-port-unreachable"),
            ]
        );
        // The nat rules are untouched: the listener is their target.
        assert_eq!(rules_of(&v4, "nat").len(), 2, "{v4}");
        // IPv6: the same listeners (a `::` bind takes both families), its
        // own ICMP type.
        let v6 = render(
            &rules,
            true,
            "::".parse().unwrap(),
            &pods(),
            &JumpState::settled(),
        );
        assert_eq!(
            rules_of(&v6, "filter"),
            [
                rule("tcp", 40000, "tcp-reset"),
                rule("udp", 40001, "icmp6-port-unreachable"),
            ]
        );
        assert!(rules_of(&v6, "nat").is_empty(), "{v6}");
        // Listeners alone make a family worth rendering.
        let alone = Rules {
            listeners: vec![internal(40000, Protocol::Tcp)],
            ..Rules::default()
        };
        assert!(alone.has_family(true) && alone.has_family(false));
        assert_eq!(alone.len(), 1);
        // Long names keep the suffix within iptables' limit.
        let long = Rules {
            listeners: vec![InternalListener {
                comment: "a".repeat(300),
                ..internal(40000, Protocol::Tcp)
            }],
            ..Rules::default()
        };
        let out = render(&long, false, ANY, &none(), &JumpState::settled());
        let want = format!("\"{} takes redirected traffic only\"", "a".repeat(255 - 30));
        assert!(out.contains(&want), "{out}");
    }

    #[test]
    fn ipv6_goes_to_its_own_payload() {
        let rules: Rules = vec![
            portal("10.96.0.10", 80, 30080, PortalKind::ClusterIp),
            portal("fd00::10", 80, 30080, PortalKind::ClusterIp),
        ]
        .into();
        let v4 = render(&rules, false, ANY, &none(), &JumpState::settled());
        let v6 = render(
            &rules,
            true,
            "::".parse().unwrap(),
            &none(),
            &JumpState::settled(),
        );
        assert!(v4.contains("-d 10.96.0.10/32") && !v4.contains("fd00"));
        assert!(v6.contains("-d fd00::10/128 -p tcp") && !v6.contains("10.96"));
        assert!(rules.has_family(true) && rules.has_family(false));
        let v4_only: Rules = vec![portal("10.96.0.10", 80, 1, PortalKind::ClusterIp)].into();
        assert!(!v4_only.has_family(true));
        let with_node_port = Rules {
            node_ports: vec![node_port(30080, Protocol::Tcp, Disposition::Reject)],
            ..v4_only
        };
        assert!(
            with_node_port.has_family(true),
            "nodePorts go in both families"
        );
    }

    #[test]
    fn specific_bind_address_uses_dnat() {
        let ps: Rules = vec![portal("10.96.0.10", 80, 30080, PortalKind::ClusterIp)].into();
        let out = render(
            &ps,
            false,
            "192.0.2.1".parse().unwrap(),
            &none(),
            &JumpState::default(),
        );
        assert!(out.contains("-A KUSP-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j DNAT --to-destination 192.0.2.1:30080"));
        assert!(out.contains("-A KUSP-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j DNAT --to-destination 192.0.2.1:30080"));
        let out = render(
            &ps,
            false,
            "127.0.0.1".parse().unwrap(),
            &none(),
            &JumpState::default(),
        );
        assert!(out.contains("-A KUSP-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080"));
    }

    #[test]
    fn comments_are_escaped() {
        let mut p = portal("10.96.0.10", 80, 1, PortalKind::ClusterIp);
        p.comment = "ns/we\"b:h ttp\\x".into();
        let out = render(
            &vec![p.clone()].into(),
            false,
            ANY,
            &none(),
            &JumpState::default(),
        );
        assert!(out.contains("--comment \"ns/we_b:h_ttp_x\""), "{out}");
        assert_eq!(sanitize_comment(&"a".repeat(300)).len(), 255);
        p.comment = "a".repeat(300);
        p.disposition = Disposition::Reject;
        let out = render(&vec![p].into(), false, ANY, &none(), &JumpState::default());
        let long = format!("{} has no endpoints\"", "a".repeat(255 - 17));
        assert!(out.contains(&long), "{out}");
    }

    #[test]
    fn duplicate_jumps_are_removed_and_missing_ones_added() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
            -A PREROUTING -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-CONTAINER\n\
            -A PREROUTING -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-CONTAINER\n\
            -A PREROUTING -j DOCKER\nCOMMIT\n\
            *filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
            -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy externally-visible service portals\" -j KUSP-EXTERNAL-SERVICES\n\
            -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy externally-visible service portals\" -j KUSP-EXTERNAL-SERVICES\n\
            -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy service portals\" -j KUSP-SERVICES\n\
            -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy service portals\" -j KUSP-SERVICES\n\
            -A OUTPUT -j KUSP-PORTALS-HOST\n\
            COMMIT\n";
        let jumps = find_jumps(saved);
        let counts: Vec<usize> = jumps.found.iter().map(Vec::len).collect();
        // The filter OUTPUT rule jumps to a nat chain's name: not ours there.
        assert_eq!(counts, [2, 0, 1, 1, 2, 0, 0, 0, 0, 0]);
        let out = render(&Rules::default(), false, ANY, &none(), &jumps);
        assert!(out.contains("-D PREROUTING -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-CONTAINER\n"));
        assert_eq!(out.matches("-I PREROUTING").count(), 0);
        assert_eq!(out.matches("-I OUTPUT 1").count(), 3, "{out}");
        assert!(out.contains("-D FORWARD -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy service portals\" -j KUSP-SERVICES\n"));
        assert!(out.contains("-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy service portals\" -j KUSP-SERVICES\n"));
        // Only the firewall's and the internal listeners' jumps were
        // missing there.
        assert_eq!(
            out.matches("-I INPUT").count() + out.matches("-I FORWARD").count(),
            3
        );
        assert_eq!(out.matches("-j KUSP-INTERNAL-LISTENERS\n").count(), 1);
        assert_eq!(out.matches("-j KUSP-FIREWALL\n").count(), 3, "{out}");
    }

    #[test]
    fn cleanup_removes_only_ours() {
        let saved = "*filter\n:INPUT ACCEPT [0:0]\n:KUSP-SERVICES - [0:0]\n:KUBE-SERVICES - [0:0]\n\
            -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy service portals\" -j KUSP-SERVICES\n\
            -A OUTPUT -j KUBE-SERVICES\n-A KUSP-SERVICES -j REJECT\nCOMMIT\n\
            *nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n:KUSP-PORTALS-HOST - [0:0]\n:KUSP-OLD - [0:0]\n\
            -A OUTPUT -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-HOST\n\
            -A OUTPUT -j DOCKER\n-A KUSP-OLD -j KUSP-PORTALS-HOST\nCOMMIT\n";
        let out = render_cleanup(saved).unwrap();
        assert_eq!(
            out,
            "*nat\n:KUSP-PORTALS-HOST - [0:0]\n:KUSP-OLD - [0:0]\n\
             -D OUTPUT -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-HOST\n\
             -X KUSP-PORTALS-HOST\n-X KUSP-OLD\nCOMMIT\n\
             *filter\n:KUSP-SERVICES - [0:0]\n\
             -D OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kube-userspace-proxy service portals\" -j KUSP-SERVICES\n\
             -X KUSP-SERVICES\nCOMMIT\n"
        );
        assert_eq!(render_cleanup("*nat\n:DOCKER - [0:0]\nCOMMIT\n"), None);
    }

    /// `--nodeport-addresses` (upstream's `NodePortAddresses`): ports
    /// bound for the node's addresses refuse the others, per family; a
    /// family without CIDRs is not limited.
    #[test]
    fn node_port_addresses_refuse_other_node_addresses_per_family() {
        let rules = Rules {
            node_port_addresses: [Some(vec!["10.0.0.0/8".parse().unwrap()]), None],
            node_port_listeners: vec![
                (32100, Protocol::Tcp),
                (30080, Protocol::Udp),
                (30080, Protocol::Udp),
            ],
            ..Rules::default()
        };
        let v4 = render(
            &rules,
            false,
            "0.0.0.0".parse().unwrap(),
            &none(),
            &JumpState::default(),
        );
        assert_eq!(
            rules_of(&v4, "filter"),
            [
                "-A KUSP-EXTERNAL-SERVICES -p udp -m addrtype --dst-type LOCAL -m udp --dport 30080 -m conntrack ! --ctstate DNAT -j KUSP-NODEPORT-ADDRESSES",
                "-A KUSP-EXTERNAL-SERVICES -p tcp -m addrtype --dst-type LOCAL -m tcp --dport 32100 -m conntrack ! --ctstate DNAT -j KUSP-NODEPORT-ADDRESSES",
                "-A KUSP-NODEPORT-ADDRESSES -d 10.0.0.0/8 -j RETURN",
                "-A KUSP-NODEPORT-ADDRESSES -m comment --comment \"not a --nodeport-addresses address\" -j REJECT",
            ]
        );
        let v6 = render(
            &rules,
            true,
            "::".parse().unwrap(),
            &none(),
            &JumpState::default(),
        );
        assert!(!v6.contains("-j KUSP-NODEPORT-ADDRESSES"), "{v6}");
        assert!(!rules.has_family(true));
    }
}
