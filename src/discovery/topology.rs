//! Endpoint choice for one service port, as upstream kube-proxy makes it:
//! a port of `CategorizeEndpoints` (kubernetes/kubernetes
//! `pkg/proxy/topology.go`, the version with `topologyModeFromHints`, node
//! hints preferred over zone hints), plus what a userspace proxy needs on
//! top: the set for ClusterIP traffic, the set for external traffic, and a
//! short reason for `/debug/services`.
//!
//! Pure: no I/O, no clock, no logging. `build_snapshot` calls it for every
//! service port; the proxier serves what it chose.
//!
//! The rules, upstream's:
//! - An endpoint is usable when ready. When the cluster set has no ready
//!   endpoint, its serving and terminating endpoints are used instead; the
//!   local set falls back the same way, on its own.
//! - Topology hints narrow the cluster set only (`Local` policies never use
//!   them), and only when every *ready* endpoint carries that kind of hint and
//!   at least one names this node (`forNodes`) or this node's zone
//!   (`forZones`); node hints win over zone hints. Otherwise hints are
//!   ignored and every ready endpoint is used.
//! - The cluster set is computed when the port takes traffic under
//!   `Cluster` policy: `internalTrafficPolicy: Cluster`, or any external
//!   traffic (even with `externalTrafficPolicy: Local`, for upstream's
//!   short-circuit of traffic from this node). The local set is computed
//!   when `internalTrafficPolicy` is `Local`, or `externalTrafficPolicy` is
//!   `Local` and the port has external traffic.

use crate::model::{Endpoint, EndpointChoice, NodeInfo, ServiceEntry, ServicePort, Topology};

/// A snapshot entry for `port` over `endpoints` (sorted and deduplicated
/// by the caller), categorized for `node`.
pub fn entry(port: ServicePort, endpoints: Vec<Endpoint>, node: &NodeInfo) -> ServiceEntry {
    let choice = categorize(&port, &endpoints, node);
    ServiceEntry {
        port,
        endpoints,
        choice,
        triggers: Default::default(),
    }
}

/// Where a set of endpoints comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Cluster,
    Local,
}

/// Categorizes `endpoints` of `port` for this `node`: a port of upstream's
/// `CategorizeEndpoints` (`pkg/proxy/topology.go`), with the internal and
/// external sets and a reason added. The input order is kept in `cluster`,
/// `local`, `internal` and `external`.
pub fn categorize(port: &ServicePort, endpoints: &[Endpoint], node: &NodeInfo) -> EndpointChoice {
    // Upstream's nodeName and zone are plain strings, "" when unknown.
    let node_name = node.name.as_deref().unwrap_or("");
    let zone = node.zone().unwrap_or("");
    let externally_accessible = port.externally_accessible();
    let uses_cluster = uses_cluster_endpoints(port);
    let uses_local = uses_local_endpoints(port);
    let is_local = |ep: &Endpoint| is_local(ep, node_name);

    let mut topology = Topology::None;
    let mut hints_ignored = None;
    let mut cluster_fallback = false;
    let mut has_any_endpoints = false;
    let cluster = uses_cluster.then(|| {
        let (mode, why) = topology_mode_from_hints(endpoints, node_name, zone);
        topology = mode;
        hints_ignored = why;
        let mut cluster = filter_endpoints(endpoints, |ep| {
            ep.ready && available_for_topology(ep, &topology)
        });
        // No ready endpoint for the topology means no ready endpoint at all
        // (the mode was chosen so): fall back to serving+terminating ones.
        if cluster.is_empty() {
            cluster = filter_endpoints(endpoints, |ep| ep.serving && ep.terminating);
            cluster_fallback = !cluster.is_empty();
        }
        if !cluster.is_empty() {
            has_any_endpoints = true;
        }
        cluster
    });

    let mut local_fallback = false;
    let local = uses_local.then(|| {
        // Upstream's pre-scan: which kind of local endpoint to use, and
        // whether any endpoint anywhere is usable.
        let (mut local_ready, mut local_serving_terminating) = (false, false);
        for ep in endpoints {
            if ep.ready {
                has_any_endpoints = true;
                local_ready |= is_local(ep);
            } else if ep.serving && ep.terminating {
                has_any_endpoints = true;
                local_serving_terminating |= is_local(ep);
            }
        }
        if local_ready {
            filter_endpoints(endpoints, |ep| is_local(ep) && ep.ready)
        } else if local_serving_terminating {
            local_fallback = true;
            filter_endpoints(endpoints, |ep| is_local(ep) && ep.serving && ep.terminating)
        } else {
            Vec::new()
        }
    });

    let internal_source = if port.internal_local {
        Source::Local
    } else {
        Source::Cluster
    };
    let external_source = externally_accessible.then_some(if port.external_local {
        Source::Local
    } else {
        Source::Cluster
    });
    let explain = |source: Source| -> String {
        match source {
            Source::Cluster => {
                let cluster = cluster.as_deref().unwrap_or(&[]);
                if cluster.is_empty() {
                    "no usable endpoints".into()
                } else if cluster_fallback {
                    "terminating fallback".into()
                } else {
                    match (&topology, &hints_ignored) {
                        (Topology::SameNode(n), _) => format!("node hints ({n})"),
                        (Topology::SameZone(z), _) => format!("zone hints ({z})"),
                        (Topology::None, Some(why)) => format!("hints ignored: {why}"),
                        (Topology::None, None) => "all endpoints".into(),
                    }
                }
            }
            Source::Local => {
                let local = local.as_deref().unwrap_or(&[]);
                if local.is_empty() && node_name.is_empty() {
                    "no local endpoints (node name unknown)".into()
                } else if local.is_empty() {
                    "no local endpoints".into()
                } else if local_fallback {
                    "node-local, terminating fallback".into()
                } else {
                    "node-local".into()
                }
            }
        }
    };
    let reason = if endpoints.is_empty() {
        "no endpoints".into()
    } else {
        match external_source {
            Some(ext) if ext != internal_source => format!(
                "internal: {}; external: {}",
                explain(internal_source),
                explain(ext)
            ),
            _ => explain(internal_source),
        }
    };

    EndpointChoice {
        cluster,
        local,
        has_any_endpoints,
        topology,
        reason,
    }
}

/// Upstream's `UsesClusterEndpoints`: `internalTrafficPolicy: Cluster`, or
/// any external traffic (short-circuit of local traffic under eTP Local).
fn uses_cluster_endpoints(port: &ServicePort) -> bool {
    !port.internal_local || port.externally_accessible()
}

/// Upstream's `UsesLocalEndpoints`: iTP Local, or eTP Local with external traffic.
fn uses_local_endpoints(port: &ServicePort) -> bool {
    port.internal_local || (port.external_local && port.externally_accessible())
}

/// Upstream's `IsLocal`, set by `EndpointSliceCache.isLocal`: the endpoint's
/// `nodeName` is this node's (never when this node's name is unknown).
fn is_local(ep: &Endpoint, node_name: &str) -> bool {
    !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name)
}

/// Upstream's `topologyModeFromHints`: node hints when every ready endpoint
/// has one and one names this node; else zone hints when every ready
/// endpoint has one and one names this node's zone; else none. With no
/// hints in force, the second value says why hints present were ignored
/// (what upstream logs), `None` when no ready endpoint carries any.
fn topology_mode_from_hints(
    endpoints: &[Endpoint],
    node_name: &str,
    zone: &str,
) -> (Topology, Option<String>) {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    // No ready endpoint: no hints to consider.
    if ready.is_empty() {
        return (Topology::None, None);
    }
    let has = |hints: &[String], name: &str| hints.iter().any(|h| h == name);
    let missing_node = ready.iter().find(|e| e.hints_nodes.is_empty());
    let for_node = ready.iter().any(|e| has(&e.hints_nodes, node_name));
    let missing_zone = ready.iter().find(|e| e.hints_zones.is_empty());
    let for_zone = ready.iter().any(|e| has(&e.hints_zones, zone));

    // PreferSameTrafficDistribution is on by default since 1.34 (GA in
    // 1.35), and the API server drops `forNodes` while it is off: node hints
    // are honoured whenever present.
    if missing_node.is_none() && for_node {
        return (Topology::SameNode(node_name.to_string()), None);
    }
    if missing_zone.is_none() && for_zone {
        return (Topology::SameZone(zone.to_string()), None);
    }

    // Why not: zone hints first (the ones upstream falls back to), then node hints.
    let any_zone = ready.iter().any(|e| !e.hints_zones.is_empty());
    let any_node = ready.iter().any(|e| !e.hints_nodes.is_empty());
    let why = if any_zone {
        Some(match missing_zone {
            Some(e) => format!("{} has none", e.addr),
            None if zone.is_empty() => "node has no zone label".to_string(),
            None => format!("none for {zone}"),
        })
    } else if any_node {
        Some(match missing_node {
            Some(e) => format!("{} has none", e.addr),
            None if node_name.is_empty() => "node name unknown".to_string(),
            None => format!("none for {node_name}"),
        })
    } else {
        None
    };
    (Topology::None, why)
}

/// Upstream's `availableForTopology`: whether the endpoint may be used
/// under `topology` (no fallback here: that was decided with the mode).
fn available_for_topology(ep: &Endpoint, topology: &Topology) -> bool {
    match topology {
        Topology::None => true,
        Topology::SameNode(node) => ep.hints_nodes.iter().any(|h| h == node),
        Topology::SameZone(zone) => ep.hints_zones.iter().any(|h| h == zone),
    }
}

/// Upstream's `filterEndpoints`: the endpoints `keep` accepts, in order.
fn filter_endpoints(endpoints: &[Endpoint], keep: impl Fn(&Endpoint) -> bool) -> Vec<Endpoint> {
    endpoints.iter().filter(|e| keep(e)).cloned().collect()
}

#[cfg(test)]
mod tests {
    //! A port of upstream's `TestCategorizeEndpoints`
    //! (`pkg/proxy/topology_test.go`): each case keeps upstream's name and
    //! its expected `clusterEndpoints`, `localEndpoints`, `allEndpoints` and
    //! `hasAnyEndpoints`; ours adds the internal and external sets and the
    //! reason.

    use super::*;
    use crate::model::LABEL_TOPOLOGY_ZONE;

    const THIS_NODE: &str = "this-node";
    const OTHER_NODE: &str = "other-node";

    /// An endpoint as upstream's tests write a `BaseEndpointInfo`: `flags`
    /// names what is true among `ready`, `serving`, `terminating` and
    /// `local` (on [`THIS_NODE`], else on [`OTHER_NODE`]); the rest is
    /// false, as Go's zero values.
    fn ep(addr: &str, flags: &str, zones: &[&str], nodes: &[&str]) -> Endpoint {
        let flags: Vec<&str> = flags.split_whitespace().collect();
        for f in &flags {
            assert!(
                ["ready", "serving", "terminating", "local"].contains(f),
                "unknown flag {f}"
            );
        }
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Endpoint {
            addr: addr.parse().unwrap(),
            ready: flags.contains(&"ready"),
            serving: flags.contains(&"serving"),
            terminating: flags.contains(&"terminating"),
            node_name: Some(
                if flags.contains(&"local") {
                    THIS_NODE
                } else {
                    OTHER_NODE
                }
                .into(),
            ),
            zone: None,
            hints_zones: strings(zones),
            hints_nodes: strings(nodes),
        }
    }

    type Set = Option<&'static [&'static str]>;

    struct Case {
        /// Upstream's case name (`t.Run`), or ours prefixed `kusp:`.
        name: &'static str,
        /// This node's name; `None`: unknown.
        node: Option<&'static str>,
        /// Label `topology.kubernetes.io/zone` of this node; `None`: absent.
        zone: Option<&'static str>,
        /// `internalTrafficPolicy: Local`.
        itp_local: bool,
        /// `externalTrafficPolicy: Local`.
        etp_local: bool,
        /// A nodePort (upstream's `nodePort: 8080`): external traffic.
        node_port: bool,
        endpoints: Vec<Endpoint>,
        /// Upstream's `clusterEndpoints` (`None` = Go's `nil`).
        cluster: Set,
        /// Upstream's `localEndpoints` (`None` = Go's `nil`).
        local: Set,
        /// Upstream's `allEndpoints`; `None`: derived as upstream's test
        /// does (the one of `cluster` and `local` that is set).
        all: Set,
        /// Upstream's `onlyRemoteEndpoints`: `hasAnyEndpoints` although
        /// `allEndpoints` is empty.
        only_remote: bool,
        internal: &'static [&'static str],
        external: &'static [&'static str],
        reason: &'static str,
    }

    fn case(name: &'static str) -> Case {
        Case {
            name,
            node: Some(THIS_NODE),
            zone: None,
            itp_local: false,
            etp_local: false,
            node_port: false,
            endpoints: Vec::new(),
            cluster: None,
            local: None,
            all: None,
            only_remote: false,
            internal: &[],
            external: &[],
            reason: "",
        }
    }

    fn addrs(eps: &[Endpoint]) -> Vec<String> {
        let mut v: Vec<String> = eps.iter().map(|e| e.addr.to_string()).collect();
        v.sort();
        v
    }

    fn want(set: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    fn check(c: &Case) {
        let port = ServicePort {
            port: 80,
            node_port: c.node_port.then_some(8080),
            internal_local: c.itp_local,
            external_local: c.etp_local,
            ..ServicePort::default()
        };
        let node = NodeInfo {
            name: c.node.map(String::from),
            labels: c
                .zone
                .map(|z| (LABEL_TOPOLOGY_ZONE.to_string(), z.to_string()))
                .into_iter()
                .collect(),
            ..NodeInfo::default()
        };
        let got = categorize(&port, &c.endpoints, &node);
        let name = c.name;
        assert_eq!(
            got.cluster.as_deref().map(addrs),
            c.cluster.map(want),
            "{name}: cluster"
        );
        assert_eq!(
            got.local.as_deref().map(addrs),
            c.local.map(want),
            "{name}: local"
        );
        let all = match (c.cluster, c.local) {
            (Some(cl), None) => cl,
            (None, Some(l)) => l,
            _ => c
                .all
                .unwrap_or_else(|| panic!("{name}: allEndpoints needed")),
        };
        assert_eq!(addrs(&got.all_reachable()), want(all), "{name}: all");
        assert_eq!(
            got.has_any_endpoints,
            !all.is_empty() || c.only_remote,
            "{name}: hasAnyEndpoints"
        );
        assert_eq!(
            addrs(got.internal(&port)),
            want(c.internal),
            "{name}: internal"
        );
        assert_eq!(
            addrs(got.external(&port)),
            want(c.external),
            "{name}: external"
        );
        assert_eq!(got.reason, c.reason, "{name}: reason");
    }

    /// Four ready endpoints hinted for zones a, b, c, a: upstream's usual set.
    fn abca() -> Vec<Endpoint> {
        vec![
            ep("10.1.2.3:80", "ready", &["zone-a"], &[]),
            ep("10.1.2.4:80", "ready", &["zone-b"], &[]),
            ep("10.1.2.5:80", "ready", &["zone-c"], &[]),
            ep("10.1.2.6:80", "ready", &["zone-a"], &[]),
        ]
    }

    /// Upstream's `TestCategorizeEndpoints` cases, in upstream's order
    /// (the table of the 1.31+ file, after the hints annotation went away).
    #[test]
    fn categorize_endpoints_upstream_cases() {
        let cases = vec![
            Case {
                zone: Some("zone-a"),
                endpoints: abca(),
                cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                internal: &["10.1.2.3:80", "10.1.2.6:80"],
                reason: "zone hints (zone-a)",
                ..case("should use topology since all endpoints have hints, node has a zone label and and there are endpoints for the node's zone")
            },
            Case {
                zone: Some("zone-a"),
                etp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.1.2.3:80", "ready local", &["zone-a"], &[]),
                    ep("10.1.2.4:80", "ready local", &["zone-b"], &[]),
                    ep("10.1.2.5:80", "ready", &["zone-c"], &[]),
                    ep("10.1.2.6:80", "ready", &["zone-a"], &[]),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                local: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
                all: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
                internal: &["10.1.2.3:80", "10.1.2.6:80"],
                external: &["10.1.2.3:80", "10.1.2.4:80"],
                reason: "internal: zone hints (zone-a); external: node-local",
                ..case("externalTrafficPolicy: Local, topology ignored for Local endpoints")
            },
            Case {
                zone: Some("zone-a"),
                itp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.1.2.3:80", "ready local", &["zone-a"], &[]),
                    ep("10.1.2.4:80", "ready local", &["zone-b"], &[]),
                    ep("10.1.2.5:80", "ready", &["zone-c"], &[]),
                    ep("10.1.2.6:80", "ready", &["zone-a"], &[]),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                local: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
                all: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
                internal: &["10.1.2.3:80", "10.1.2.4:80"],
                external: &["10.1.2.3:80", "10.1.2.6:80"],
                reason: "internal: node-local; external: zone hints (zone-a)",
                ..case("internalTrafficPolicy: Local, topology ignored for Local endpoints")
            },
            Case {
                zone: None,
                endpoints: vec![ep("10.1.2.3:80", "ready", &["zone-a"], &[])],
                cluster: Some(&["10.1.2.3:80"]),
                internal: &["10.1.2.3:80"],
                reason: "hints ignored: node has no zone label",
                ..case("empty node labels")
            },
            Case {
                zone: Some(""),
                endpoints: vec![ep("10.1.2.3:80", "ready", &["zone-a"], &[])],
                cluster: Some(&["10.1.2.3:80"]),
                internal: &["10.1.2.3:80"],
                reason: "hints ignored: node has no zone label",
                ..case("empty zone label")
            },
            Case {
                zone: Some("zone-b"),
                endpoints: vec![ep("10.1.2.3:80", "ready", &["zone-a"], &[])],
                cluster: Some(&["10.1.2.3:80"]),
                internal: &["10.1.2.3:80"],
                reason: "hints ignored: none for zone-b",
                ..case("node in different zone, no endpoint filtering")
            },
            Case {
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.1.2.3:80", "ready", &["zone-a"], &[]),
                    ep("10.1.2.4:80", "ready", &["zone-b"], &[]),
                    ep("10.1.2.5:80", "ready", &["zone-c"], &[]),
                    ep("10.1.2.6:80", "", &["zone-a"], &[]),
                ],
                cluster: Some(&["10.1.2.3:80"]),
                internal: &["10.1.2.3:80"],
                reason: "zone hints (zone-a)",
                ..case("unready endpoint")
            },
            Case {
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.1.2.3:80", "", &["zone-a"], &[]),
                    ep("10.1.2.4:80", "ready", &["zone-b"], &[]),
                    ep("10.1.2.5:80", "ready", &["zone-c"], &[]),
                    ep("10.1.2.6:80", "", &["zone-a"], &[]),
                ],
                cluster: Some(&["10.1.2.4:80", "10.1.2.5:80"]),
                internal: &["10.1.2.4:80", "10.1.2.5:80"],
                reason: "hints ignored: none for zone-a",
                ..case("only unready endpoints in same zone (should not filter)")
            },
            Case {
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.1.2.3:80", "ready", &["zone-a"], &[]),
                    ep("10.1.2.4:80", "ready", &["zone-b"], &[]),
                    ep("10.1.2.5:80", "ready", &[], &[]),
                    ep("10.1.2.6:80", "ready", &["zone-a"], &[]),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"]),
                internal: &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"],
                reason: "hints ignored: 10.1.2.5:80 has none",
                ..case("missing hints, no filtering applied")
            },
            Case {
                zone: Some("zone-c"),
                endpoints: vec![
                    ep("10.1.2.3:80", "ready", &["zone-a", "zone-b", "zone-c"], &[]),
                    ep("10.1.2.4:80", "ready", &["zone-b", "zone-c"], &[]),
                    ep("10.1.2.5:80", "ready", &["zone-b", "zone-d"], &[]),
                    ep("10.1.2.6:80", "ready", &["zone-c"], &[]),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
                internal: &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"],
                reason: "zone hints (zone-c)",
                ..case("multiple hints per endpoint, filtering includes any endpoint with zone included")
            },
            Case {
                zone: Some("zone-a"),
                etp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready local", &["zone-a"], &[]),
                    ep("10.0.0.1:80", "ready local", &["zone-b"], &[]),
                    ep("10.0.0.2:80", "ready", &["zone-a"], &[]),
                    ep("10.0.0.3:80", "ready", &["zone-b"], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.2:80"]),
                local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                all: Some(&["10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"]),
                internal: &["10.0.0.0:80", "10.0.0.2:80"],
                external: &["10.0.0.0:80", "10.0.0.1:80"],
                reason: "internal: zone hints (zone-a); external: node-local",
                ..case("conflicting topology and localness require merging allEndpoints")
            },
            Case {
                itp_local: true,
                // Upstream's newest CategorizeEndpoints returns nil for
                // everything when there is no endpoint; its test accepts
                // that or an empty set. Ours: the empty set.
                local: Some(&[]),
                reason: "no endpoints",
                ..case("internalTrafficPolicy: Local, with empty endpoints")
            },
            Case {
                itp_local: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready", &[], &[]),
                    ep("10.0.0.1:80", "ready", &[], &[]),
                ],
                local: Some(&[]),
                only_remote: true,
                reason: "no local endpoints",
                ..case("internalTrafficPolicy: Local, but all endpoints are remote")
            },
            Case {
                itp_local: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready local", &[], &[]),
                    ep("10.0.0.1:80", "ready local", &[], &[]),
                ],
                local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                internal: &["10.0.0.0:80", "10.0.0.1:80"],
                reason: "node-local",
                ..case("internalTrafficPolicy: Local, all endpoints are local")
            },
            Case {
                itp_local: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready local", &[], &[]),
                    ep("10.0.0.1:80", "ready", &[], &[]),
                ],
                local: Some(&["10.0.0.0:80"]),
                internal: &["10.0.0.0:80"],
                reason: "node-local",
                ..case("internalTrafficPolicy: Local, some endpoints are local")
            },
            Case {
                endpoints: vec![ep("10.0.0.0:80", "", &[], &[]), ep("10.0.0.1:80", "", &[], &[])],
                cluster: Some(&[]),
                reason: "no usable endpoints",
                ..case("Cluster traffic policy, endpoints not Ready")
            },
            Case {
                endpoints: vec![ep("10.0.0.0:80", "", &[], &[]), ep("10.0.0.1:80", "ready", &[], &[])],
                cluster: Some(&["10.0.0.1:80"]),
                internal: &["10.0.0.1:80"],
                reason: "all endpoints",
                ..case("Cluster traffic policy, some endpoints are Ready")
            },
            Case {
                endpoints: vec![
                    ep("10.0.0.0:80", "serving terminating local", &[], &[]),
                    ep("10.0.0.1:80", "serving terminating", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                internal: &["10.0.0.0:80", "10.0.0.1:80"],
                reason: "terminating fallback",
                ..case("Cluster traffic policy, all endpoints are terminating")
            },
            Case {
                itp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready local", &[], &[]),
                    ep("10.0.0.1:80", "ready", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&["10.0.0.0:80"]),
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                internal: &["10.0.0.0:80"],
                external: &["10.0.0.0:80", "10.0.0.1:80"],
                reason: "internal: node-local; external: all endpoints",
                ..case("iTP: Local, eTP: Cluster, some endpoints local")
            },
            Case {
                etp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready local", &[], &[]),
                    ep("10.0.0.1:80", "ready", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&["10.0.0.0:80"]),
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                internal: &["10.0.0.0:80", "10.0.0.1:80"],
                external: &["10.0.0.0:80"],
                reason: "internal: all endpoints; external: node-local",
                ..case("iTP: Cluster, eTP: Local, some endpoints local")
            },
            Case {
                itp_local: true,
                etp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready local", &[], &[]),
                    ep("10.0.0.1:80", "ready", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&["10.0.0.0:80"]),
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                internal: &["10.0.0.0:80"],
                external: &["10.0.0.0:80"],
                reason: "node-local",
                ..case("iTP: Local, eTP: Local, some endpoints local")
            },
            Case {
                itp_local: true,
                etp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready", &[], &[]),
                    ep("10.0.0.1:80", "ready", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&[]),
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                reason: "no local endpoints",
                ..case("iTP: Local, eTP: Local, all endpoints remote")
            },
            Case {
                itp_local: true,
                etp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "serving terminating", &[], &[]),
                    ep("10.0.0.1:80", "serving terminating", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&[]),
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                only_remote: true,
                reason: "no local endpoints",
                ..case("iTP: Local, eTP: Local, all endpoints remote and terminating")
            },
            Case {
                etp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready", &[], &[]),
                    ep("10.0.0.1:80", "local", &[], &[]),
                    ep("10.0.0.2:80", "serving terminating local", &[], &[]),
                    ep("10.0.0.3:80", "serving terminating", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80"]),
                local: Some(&["10.0.0.2:80"]),
                all: Some(&["10.0.0.0:80", "10.0.0.2:80"]),
                internal: &["10.0.0.0:80"],
                external: &["10.0.0.2:80"],
                reason: "internal: all endpoints; external: node-local, terminating fallback",
                ..case("iTP: Cluster, eTP: Local, with terminating endpoints")
            },
            Case {
                etp_local: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready", &[], &[]),
                    ep("10.0.0.1:80", "ready local", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                internal: &["10.0.0.0:80", "10.0.0.1:80"],
                reason: "all endpoints",
                ..case("externalTrafficPolicy ignored if not externally accessible")
            },
            Case {
                itp_local: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready", &[], &[]),
                    ep("10.0.0.1:80", "ready local", &[], &[]),
                ],
                local: Some(&["10.0.0.1:80"]),
                internal: &["10.0.0.1:80"],
                reason: "node-local",
                ..case("no cluster endpoints for iTP:Local internal-only service")
            },
        ];
        assert_eq!(cases.len(), 26);
        for c in &cases {
            check(c);
        }
    }

    /// Node-hint cases (`PreferSameNode`, upstream 1.33+). Upstream's newest
    /// `topology_test.go` was not available to read; these are the cases
    /// with these names in Antrea's port of it
    /// (`antrea-io/antrea` `pkg/agent/proxy/topology_test.go`), feature gate on.
    #[test]
    fn categorize_endpoints_node_hint_cases() {
        let hinted = || {
            vec![
                ep("10.1.2.3:80", "ready", &["zone-a"], &["node-1"]),
                ep("10.1.2.4:80", "ready", &["zone-b"], &["node-2"]),
                ep("10.1.2.5:80", "ready", &["zone-c"], &["node-3"]),
                ep("10.1.2.6:80", "ready", &["zone-a"], &["node-4"]),
            ]
        };
        let cases = vec![
            Case {
                node: Some("node-1"),
                zone: Some("zone-a"),
                endpoints: hinted(),
                cluster: Some(&["10.1.2.3:80"]),
                internal: &["10.1.2.3:80"],
                reason: "node hints (node-1)",
                ..case("PreferSameNode available")
            },
            Case {
                node: Some("node-1"),
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.1.2.3:80", "ready", &["zone-a"], &["node-1"]),
                    ep("10.1.2.4:80", "ready", &[], &[]),
                    ep("10.1.2.5:80", "ready", &["zone-c"], &["node-3"]),
                    ep("10.1.2.6:80", "ready", &["zone-a"], &["node-4"]),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"]),
                internal: &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"],
                reason: "hints ignored: 10.1.2.4:80 has none",
                ..case("PreferSameNode ignored if some endpoints unhinted")
            },
            Case {
                node: Some("node-0"),
                zone: Some("zone-a"),
                endpoints: hinted(),
                cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                internal: &["10.1.2.3:80", "10.1.2.6:80"],
                reason: "zone hints (zone-a)",
                ..case("PreferSameNode falls back to PreferSameZone if no endpoint for node")
            },
        ];
        for c in &cases {
            check(c);
        }
    }

    /// eTP Local on an externally reachable port; from Antrea's port of the
    /// same table (not in the upstream versions read).
    #[test]
    fn categorize_endpoints_external_local_cases() {
        let cases = vec![
            Case {
                etp_local: true,
                node_port: true,
                cluster: Some(&[]),
                local: Some(&[]),
                all: Some(&[]),
                reason: "no endpoints",
                ..case("externalTrafficPolicy: Local, externally accessible, with empty endpoints")
            },
            Case {
                etp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready serving", &[], &[]),
                    ep("10.0.0.1:80", "ready serving", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&[]),
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                internal: &["10.0.0.0:80", "10.0.0.1:80"],
                reason: "internal: all endpoints; external: no local endpoints",
                ..case("externalTrafficPolicy: Local, externally accessible, but all endpoints are remote")
            },
            Case {
                etp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready serving local", &[], &[]),
                    ep("10.0.0.1:80", "ready serving local", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                internal: &["10.0.0.0:80", "10.0.0.1:80"],
                external: &["10.0.0.0:80", "10.0.0.1:80"],
                reason: "internal: all endpoints; external: node-local",
                ..case("externalTrafficPolicy: Local, externally accessible, all endpoints are local")
            },
            Case {
                etp_local: true,
                node_port: true,
                endpoints: vec![
                    ep("10.0.0.0:80", "ready serving local", &[], &[]),
                    ep("10.0.0.1:80", "ready serving", &[], &[]),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&["10.0.0.0:80"]),
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                internal: &["10.0.0.0:80", "10.0.0.1:80"],
                external: &["10.0.0.0:80"],
                reason: "internal: all endpoints; external: node-local",
                ..case("externalTrafficPolicy: Local, externally accessible, some endpoints are local")
            },
        ];
        for c in &cases {
            check(c);
        }
    }

    /// Ours: the reasons upstream only logs, and edges of our inputs.
    #[test]
    fn categorize_endpoints_our_cases() {
        let cases = vec![
            Case {
                node: Some("node-9"),
                endpoints: vec![
                    ep("10.0.0.1:80", "ready", &[], &["node-1"]),
                    ep("10.0.0.2:80", "ready", &[], &["node-2"]),
                ],
                cluster: Some(&["10.0.0.1:80", "10.0.0.2:80"]),
                internal: &["10.0.0.1:80", "10.0.0.2:80"],
                reason: "hints ignored: none for node-9",
                ..case("kusp: node hints for other nodes only, no zone hints")
            },
            Case {
                node: Some("node-1"),
                endpoints: vec![
                    ep("10.0.0.1:80", "ready", &[], &["node-1"]),
                    ep("10.0.0.2:80", "ready", &[], &[]),
                ],
                cluster: Some(&["10.0.0.1:80", "10.0.0.2:80"]),
                internal: &["10.0.0.1:80", "10.0.0.2:80"],
                reason: "hints ignored: 10.0.0.2:80 has none",
                ..case("kusp: node hints missing on one endpoint")
            },
            Case {
                node: Some("node-1"),
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.0.0.1:80", "ready", &["zone-b"], &["node-1"]),
                    ep("10.0.0.2:80", "ready", &["zone-a"], &["node-2"]),
                ],
                cluster: Some(&["10.0.0.1:80"]),
                internal: &["10.0.0.1:80"],
                reason: "node hints (node-1)",
                ..case("kusp: node hints win over zone hints")
            },
            Case {
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.0.0.1:80", "serving terminating", &["zone-a"], &[]),
                    ep("10.0.0.2:80", "serving terminating", &["zone-b"], &[]),
                    ep("10.0.0.3:80", "serving", &["zone-a"], &[]),
                ],
                cluster: Some(&["10.0.0.1:80", "10.0.0.2:80"]),
                internal: &["10.0.0.1:80", "10.0.0.2:80"],
                reason: "terminating fallback",
                ..case("kusp: the terminating fallback ignores hints and needs serving")
            },
            Case {
                node: None,
                itp_local: true,
                endpoints: vec![ep("10.0.0.1:80", "ready local", &[], &[])],
                local: Some(&[]),
                only_remote: true,
                reason: "no local endpoints (node name unknown)",
                ..case("kusp: unknown node name: nothing is local")
            },
            Case {
                itp_local: true,
                endpoints: vec![ep("10.0.0.1:80", "local", &[], &[])],
                local: Some(&[]),
                reason: "no local endpoints",
                ..case("kusp: iTP Local, the local endpoint is not usable")
            },
        ];
        for c in &cases {
            check(c);
        }
    }

    #[test]
    fn zone_label_empty_is_no_zone() {
        let mut node = NodeInfo::default();
        assert_eq!(node.zone(), None);
        node.labels
            .insert(LABEL_TOPOLOGY_ZONE.into(), String::new());
        assert_eq!(node.zone(), None);
        node.labels
            .insert(LABEL_TOPOLOGY_ZONE.into(), "zone-a".into());
        assert_eq!(node.zone(), Some("zone-a"));
    }
}
