//! What the rules are made from: every served address, nodePort and
//! internal listener of the proxier, with what the rules do with its
//! traffic.

use super::render::{Disposition, InternalListener, NodePort, Portal, PortalKind, Rules};
use crate::proxy::{Proxier, Routing};

/// What the rules do with a port's ClusterIP traffic and with its
/// external traffic (external IPs, LB IPs, nodePort), as upstream's
/// `syncProxyRules` decides from `hasEndpoints`, `hasInternalEndpoints`
/// and `hasExternalEndpoints`.
pub fn dispositions(routing: &Routing) -> (Disposition, Disposition) {
    if !routing.has_any_endpoints {
        return (Disposition::Reject, Disposition::Reject);
    }
    let internal = if routing.has_internal {
        Disposition::Redirect
    } else {
        Disposition::Drop
    };
    // Upstream short-circuits this node's pods and the host to the cluster
    // endpoints only under `externalTrafficPolicy: Local`.
    let external = if routing.has_external {
        Disposition::Redirect
    } else if routing.external_local {
        Disposition::RedirectLocalOnly
    } else {
        Disposition::Drop
    };
    (internal, external)
}

/// Every service address and nodePort of the served ports, with what the
/// rules do with its traffic ([`dispositions`]), the LB IPs with their
/// source ranges, the listeners not on a nodePort (closed to direct
/// traffic), and the node's addresses (not loopback) for
/// `allowFromNode`. Addresses of a port with no listener yet are left out
/// unless they are dropped or rejected, or are LB IPs with source ranges
/// (their `filter` DROP needs no listener); a nodePort or an internal
/// listener only while our listener holds the port.
pub fn portals(proxier: &Proxier) -> Rules {
    let mut out = Rules {
        node_ips: proxier
            .context()
            .origin
            .host_addresses()
            .into_iter()
            .filter(|ip| !ip.is_loopback())
            .collect(),
        ..Rules::default()
    };
    for (service, spec, port) in proxier.services() {
        let (internal, external) = dispositions(&service.routing());
        let ranges = &spec.load_balancer_source_ranges;
        let needs_no_listener = |d: Disposition, kind: PortalKind| {
            matches!(d, Disposition::Drop | Disposition::Reject)
                || (kind == PortalKind::LoadBalancerIp && !ranges.is_empty())
        };
        let kinds = [
            (&spec.cluster_ips, PortalKind::ClusterIp, internal),
            (&spec.external_ips, PortalKind::ExternalIp, external),
            (
                &spec.load_balancer_ips,
                PortalKind::LoadBalancerIp,
                external,
            ),
        ];
        for (ips, kind, disposition) in kinds {
            if port.is_none() && !needs_no_listener(disposition, kind) {
                continue;
            }
            for ip in ips {
                out.portals.push(Portal {
                    ip: *ip,
                    port: spec.port,
                    protocol: service.name.protocol,
                    listener_port: port.unwrap_or(0),
                    kind,
                    comment: service.name.to_string(),
                    disposition,
                    source_ranges: match kind {
                        PortalKind::LoadBalancerIp => ranges.clone(),
                        PortalKind::ClusterIp | PortalKind::ExternalIp => Vec::new(),
                    },
                });
            }
        }
        // Only while our listener holds the nodePort: without it the port
        // may be someone else's (and the kernel refuses it anyway).
        let node_port = spec
            .node_port
            .filter(|np| port == Some(*np) && external != Disposition::Redirect);
        if let Some(np) = spec.node_port.filter(|np| port == Some(*np)) {
            out.node_port_listeners.push((np, service.name.protocol));
        }
        if let Some(node_port) = node_port {
            out.node_ports.push(NodePort {
                port: node_port,
                protocol: service.name.protocol,
                comment: service.name.to_string(),
                disposition: external,
            });
        }
        // A listener of its own, not the nodePort (which is meant to be
        // reached directly): only what our rules redirect may reach it.
        if let Some(listener) = port.filter(|p| spec.node_port != Some(*p)) {
            out.listeners.push(InternalListener {
                port: listener,
                protocol: service.name.protocol,
                comment: service.name.to_string(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(any: bool, internal: bool, external: bool, external_local: bool) -> Routing {
        Routing {
            external_local,
            has_any_endpoints: any,
            has_internal: internal,
            has_external: external,
            ..Routing::default()
        }
    }

    #[test]
    fn dispositions_follow_upstream() {
        use Disposition::*;
        assert_eq!(
            dispositions(&routing(false, false, false, true)),
            (Reject, Reject)
        );
        assert_eq!(
            dispositions(&routing(true, true, true, false)),
            (Redirect, Redirect)
        );
        // internalTrafficPolicy: Local without a local endpoint.
        assert_eq!(
            dispositions(&routing(true, false, true, false)),
            (Drop, Redirect)
        );
        // externalTrafficPolicy: Local without one: pods and host only.
        assert_eq!(
            dispositions(&routing(true, true, false, true)),
            (Redirect, RedirectLocalOnly)
        );
        // No external endpoint under Cluster policy: no short-circuit.
        assert_eq!(
            dispositions(&routing(true, true, false, false)),
            (Redirect, Drop)
        );
    }
}
