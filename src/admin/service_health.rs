//! Health-check node ports, as upstream's `ServiceHealthServer`
//! (`pkg/proxy/healthcheck/service_health.go`): for every `type:
//! LoadBalancer` Service with `externalTrafficPolicy: Local`, a listener on
//! its `healthCheckNodePort` answers any request with 200 when this node
//! has a local ready endpoint of the Service and the proxy is healthy,
//! else 503, so that the cloud's load balancer sends traffic only to nodes
//! that can serve it locally.
//!
//! The listeners open, close and move with the Service (`SyncServices`),
//! their counts follow the endpoints (`SyncEndpoints`), they are served in
//! one bounded [`Pool`] (cap, shedding, deadlines of the admin listeners),
//! each takes two fds from the budget (its socket and the connection it
//! admits), and they travel with a hand-over. A port that cannot be bound
//! is logged naming the Service, shown on it, and retried; the Service is
//! served either way.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::serve::{self, AdminListener, Pool, SERVICE_HEALTH_CONNECTIONS};
use crate::health::Health;
use crate::model::{Protocol, ServicePortName, Snapshot};
use crate::proxy::carry::{Counters, Exported, Kind, ListenerDesc, SharedFd};
use crate::proxy::fds::{FdBudget, FdLease};
use crate::status::HealthCheckState;

/// Fds a port holds: its socket and the connection it is admitting (the
/// pool's connections are leased once, while some port is open).
const FDS_PER_PORT: usize = 2;

/// How long [`Server::close`] waits for the probes being answered.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A Service: namespace and name.
pub type ServiceName = (String, String);

/// Every health-check node port, by Service, as last synced.
pub type HealthChecks = BTreeMap<ServiceName, HealthCheckState>;

/// What `snapshot` asks for, by Service: its health-check node port and the
/// number of its local ready endpoints, counted by IP across its ports as
/// upstream's `EndpointsMap.LocalReadyEndpoints` does (10.0.0.1:80 and
/// 10.0.0.1:443 are one endpoint; terminating ones do not count: a node
/// whose pods only terminate must fail the check).
pub fn wanted(snapshot: &Snapshot) -> BTreeMap<ServiceName, (u16, usize)> {
    let node = snapshot.node.name.as_deref();
    let mut out: BTreeMap<ServiceName, (u16, std::collections::BTreeSet<IpAddr>)> = BTreeMap::new();
    for (name, entry) in &snapshot.services {
        let Some(port) = entry.port.health_check_node_port else {
            continue;
        };
        let (_, ips) = out
            .entry((name.namespace.clone(), name.name.clone()))
            .or_insert_with(|| (port, Default::default()));
        let local_ready = entry
            .endpoints
            .iter()
            .filter(|e| e.ready && node.is_some() && e.node_name.as_deref() == node);
        ips.extend(local_ready.map(|e| e.addr.ip()));
    }
    out.into_iter()
        .map(|(k, (port, ips))| (k, (port, ips.len())))
        .collect()
}

/// What a probe reads: the Service and its live count.
struct Probe {
    namespace: String,
    name: String,
    local: AtomicUsize,
    health: Arc<Health>,
}

/// Upstream's `hcHandler.ServeHTTP`: any method, any path.
async fn answer(State(p): State<Arc<Probe>>) -> Response {
    let count = p.local.load(Relaxed);
    let healthy = p.health.is_healthy();
    let code = if count != 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    // Upstream's body, byte for byte (its dedented template).
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        quote(&p.namespace),
        quote(&p.name),
    );
    let mut r = (code, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-load-balancing-endpoint-weight", HeaderValue::from(count));
    r
}

/// One Service's health-check node port.
struct Instance {
    port: u16,
    probe: Arc<Probe>,
    /// Serving; `None` until bound (retried at every sync).
    socket: Option<Arc<tokio::net::TcpListener>>,
    /// Its socket's and its admitted connection's fds.
    _fds: Option<FdLease>,
    error: Option<String>,
    stop: CancellationToken,
}

/// The health-check node ports of every Service that needs one.
pub struct Server {
    bind_ip: IpAddr,
    fds: Arc<FdBudget>,
    health: Arc<Health>,
    pool: Pool,
    /// The pool's connections, from the budget while some port is wanted.
    pool_fds: Option<FdLease>,
    stop: CancellationToken,
    instances: BTreeMap<ServiceName, Instance>,
    /// Handed over by the previous process, adopted at the first sync.
    inherited: BTreeMap<ServicePortName, (u16, std::net::TcpListener)>,
    published: Arc<ArcSwap<HealthChecks>>,
}

impl Server {
    /// A server binding health-check node ports on `bind_ip` (where
    /// nodePorts listen), with the fd budget `fds`, answering from `health`,
    /// that adopts the `inherited` sockets of the previous process.
    pub fn new(
        bind_ip: IpAddr,
        fds: Arc<FdBudget>,
        health: Arc<Health>,
        inherited: BTreeMap<ServicePortName, (u16, std::net::TcpListener)>,
    ) -> Self {
        Self {
            bind_ip,
            fds,
            health,
            pool: Pool::new(AdminListener::ServiceHealth, SERVICE_HEALTH_CONNECTIONS),
            pool_fds: None,
            stop: CancellationToken::new(),
            instances: BTreeMap::new(),
            inherited,
            published: Arc::default(),
        }
    }

    /// What `/debug/services` reads.
    pub fn published(&self) -> Arc<ArcSwap<HealthChecks>> {
        Arc::clone(&self.published)
    }

    /// Opens, closes and moves ports to match `snapshot`, and sets each one's
    /// count (upstream's `SyncServices` and `SyncEndpoints`); ports that did
    /// not bind are tried again. Handed-over sockets not adopted now are
    /// closed. Must run inside the tokio runtime.
    pub fn sync(&mut self, snapshot: &Snapshot) {
        let wanted = wanted(snapshot);
        self.instances.retain(|(ns, name), inst| {
            let keep = wanted.get(&(ns.clone(), name.clone())).map(|w| w.0) == Some(inst.port);
            if !keep {
                tracing::info!(service = %format!("{ns}/{name}"), port = inst.port, "closing health-check node port");
                inst.stop.cancel();
            }
            keep
        });
        // Room for the ports to open (a derived connection limit gives way,
        // as it does for service listeners), then the limit recomputed.
        let to_open = wanted
            .iter()
            .filter(|(k, (port, _))| {
                self.instances.get(*k).is_none_or(|i| i.socket.is_none())
                    && self
                        .inherited
                        .get(&service_key(k))
                        .is_none_or(|(p, _)| p != port)
            })
            .count();
        let pool_wanted = if wanted.is_empty() {
            self.pool_fds = None;
            0
        } else if self.pool_fds.is_none() {
            SERVICE_HEALTH_CONNECTIONS
        } else {
            0
        };
        if to_open + pool_wanted > 0 {
            self.fds.rebalance(FDS_PER_PORT * to_open + pool_wanted);
        }
        if pool_wanted > 0 {
            self.pool_fds = self.fds.try_take_listener_fds(pool_wanted);
        }
        for (key, (port, count)) in wanted {
            let inst = self
                .instances
                .entry(key.clone())
                .or_insert_with(|| Instance {
                    port,
                    probe: Arc::new(Probe {
                        namespace: key.0.clone(),
                        name: key.1.clone(),
                        local: AtomicUsize::new(count),
                        health: Arc::clone(&self.health),
                    }),
                    socket: None,
                    _fds: None,
                    error: None,
                    stop: self.stop.child_token(),
                });
            inst.probe.local.store(count, Relaxed);
            if inst.socket.is_none() {
                let adopted = self.inherited.remove(&service_key(&key));
                let pool = self.pool_fds.as_ref().map(|_| &self.pool);
                open(inst, self.bind_ip, &self.fds, pool, adopted);
            }
        }
        self.inherited.clear();
        if to_open + pool_wanted > 0 {
            self.fds.rebalance(0);
        }
        self.publish();
    }

    /// The ports listening now.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.instances
            .values()
            .filter(|i| i.socket.is_some())
            .map(|i| i.port)
    }

    /// Whether some port failed to bind (the run loop retries every second).
    pub fn has_pending(&self) -> bool {
        self.instances.values().any(|i| i.socket.is_none())
    }

    /// The listening sockets, for a hand-over.
    pub fn export(&self) -> Vec<Exported> {
        self.instances
            .iter()
            .filter_map(|(key, inst)| {
                let socket = inst.socket.as_ref()?;
                Some(Exported {
                    desc: ListenerDesc {
                        kind: Kind::HealthCheck,
                        service: Some(service_key(key)),
                        port: inst.port,
                        counters: Counters::default(),
                        backends: Vec::new(),
                    },
                    fds: vec![Arc::clone(socket) as SharedFd],
                })
            })
            .collect()
    }

    /// Stops every port; the probes being answered get their answer
    /// (waited for, at most `CLOSE_GRACE`, 1 s).
    pub async fn close(&mut self) {
        self.stop.cancel();
        self.instances.clear();
        self.publish();
        self.pool.drained(CLOSE_GRACE).await;
    }

    fn publish(&self) {
        let states = self
            .instances
            .iter()
            .map(|(k, i)| {
                let state = HealthCheckState {
                    port: i.port,
                    local_endpoints: i.probe.local.load(Relaxed),
                    listening: i.socket.is_some(),
                    error: i.error.clone(),
                };
                (k.clone(), state)
            })
            .collect();
        self.published.store(Arc::new(states));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How a Service travels in a hand-over: a service port name without port.
fn service_key((namespace, name): &ServiceName) -> ServicePortName {
    ServicePortName {
        namespace: namespace.clone(),
        name: name.clone(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
    }
}

/// Binds (or adopts) and serves `inst`'s port in `pool` (`None`: the
/// pool's connections did not fit in the budget); on failure, records and
/// logs why once per reason.
fn open(
    inst: &mut Instance,
    bind_ip: IpAddr,
    fds: &Arc<FdBudget>,
    pool: Option<&Pool>,
    adopted: Option<(u16, std::net::TcpListener)>,
) {
    let service = format!("{}/{}", inst.probe.namespace, inst.probe.name);
    let addr = SocketAddr::new(bind_ip, inst.port);
    let no_fds = || "the fd limit holds no more listeners".to_string();
    // Without the pool's fds nothing is bound (an adopted socket closes).
    let socket = pool.ok_or_else(no_fds).and_then(|pool| {
        match adopted.filter(|(port, _)| *port == inst.port) {
            // Open already: counted even beyond the budget.
            Some((_, socket)) => Ok((pool, socket, fds.take_held(FDS_PER_PORT))),
            None => fds
                .try_take_listener_fds(FDS_PER_PORT)
                .ok_or_else(no_fds)
                .and_then(|lease| {
                    serve::bind_std(addr)
                        .map(|s| (pool, s, lease))
                        .map_err(|e| format!("cannot listen on {addr}: {e}"))
                }),
        }
    });
    let served = socket.and_then(|(pool, socket, lease)| {
        let socket =
            Arc::new(tokio::net::TcpListener::from_std(socket).map_err(|e| e.to_string())?);
        let router = Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&inst.probe));
        serve::serve_in(Arc::clone(&socket), pool, router, inst.stop.clone())
            .map_err(|e| e.to_string())?;
        Ok((socket, lease))
    });
    match served {
        Ok((socket, lease)) => {
            tracing::info!(service = %service, port = inst.port, "health-check node port listening");
            inst.socket = Some(socket);
            inst._fds = Some(lease);
            inst.error = None;
        }
        Err(e) => {
            if inst.error.as_ref() != Some(&e) {
                tracing::error!(service = %service, port = inst.port, error = %e, "health-check node port not served (the Service is; retried every second)");
            }
            inst.error = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, NodeInfo, ServiceEntry, ServicePort};

    fn ep(addr: &str, ready: bool, node: &str) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            ready,
            serving: ready,
            terminating: !ready,
            node_name: Some(node.into()),
            zone: None,
            hints_zones: Vec::new(),
            hints_nodes: Vec::new(),
        }
    }

    /// Upstream's `LocalReadyEndpoints`: ready and on this node, one per IP
    /// across the Service's ports; only Services that need a check.
    #[test]
    fn local_ready_endpoints_are_counted_by_ip_across_ports() {
        let mut snap = Snapshot {
            node: NodeInfo {
                name: Some("n1".into()),
                ..NodeInfo::default()
            },
            ..Snapshot::default()
        };
        let port = ServicePort {
            health_check_node_port: Some(30100),
            ..ServicePort::default()
        };
        for (pn, eps) in [
            (
                "http",
                vec![ep("10.0.0.1:80", true, "n1"), ep("10.0.0.2:80", true, "n2")],
            ),
            (
                "https",
                vec![
                    ep("10.0.0.1:443", true, "n1"),
                    ep("10.0.0.3:443", false, "n1"),
                ],
            ),
        ] {
            let name = ServicePortName {
                port_name: pn.into(),
                ..service_key(&("ns".into(), "lb".into()))
            };
            let entry = ServiceEntry {
                port: port.clone(),
                endpoints: eps,
                ..ServiceEntry::default()
            };
            snap.services.insert(name, entry);
        }
        snap.services.insert(
            service_key(&("ns".into(), "plain".into())),
            ServiceEntry::default(),
        );
        let w = wanted(&snap);
        assert_eq!(w.len(), 1);
        assert_eq!(w[&("ns".to_string(), "lb".to_string())], (30100, 1));
        snap.node.name = None;
        assert_eq!(w.len(), 1);
        assert_eq!(wanted(&snap)[&("ns".to_string(), "lb".to_string())].1, 0);
    }
}
