//! The proxier: reconciles the desired [`Snapshot`] with running listeners.
//!
//! Each service port gets a [`Service`] (balancers + counters) and a
//! listener on its nodePort, or on a port from `--proxy-port-range`.
//! A new snapshot opens listeners for new ports, swaps endpoint lists into
//! existing balancers in place (open connections untouched), re-homes a
//! listener whose nodePort changed, and closes listeners of deleted ports
//! while their open connections finish. A port that cannot be bound (in
//! use, or no fd left in the budget) is reported on the Service and
//! retried on the next sync; it never affects other services.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::carry::{BackendCounters, Carried, Counters, Exported, Inherited, Kind, ListenerDesc};
use super::config::ProxyConfig;
use super::conn;
use super::context::{housekeeping, Context, MAX_IDLE_PIPES, MAX_LIVE_PIPES};
use super::listener::{Bound, Listener};
use super::ports::PortAllocator;
use super::service::{Published, Service, ServiceView, Unserved, UnservedReason};
use super::splice::PipePool;
use super::workers::Workers;
use crate::model::{Protocol, ServicePort, ServicePortName, Snapshot};

/// Ports of the range tried per listener and sync before giving up until
/// the next sync: a full range costs a bounded number of binds a second.
const MAX_BIND_TRIES: usize = 128;

/// Whether the proxy serves a protocol (SCTP is parsed, never served).
fn served_protocol(p: Protocol) -> bool {
    matches!(p, Protocol::Tcp | Protocol::Udp)
}

/// Index of a protocol's port allocator.
fn proto_index(p: Protocol) -> usize {
    usize::from(p == Protocol::Udp)
}

/// A served service port in the proxier's table.
struct Served {
    spec: ServicePort,
    service: Arc<Service>,
    listener: Option<Listener>,
    /// Why `listener` is none, once a bind was tried.
    unserved: Option<Unserved>,
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
    /// Service ports whose traffic the rules must now treat otherwise
    /// (endpoints appeared or vanished for some kind of traffic).
    pub disposition_changed: usize,
    /// Of `pending`, those the fd budget could not hold.
    pub fd_limited: usize,
    /// The connection limit in force after this sync (0: none).
    pub connection_limit: usize,
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
    inherited: Inherited,
}

impl Proxier {
    /// A proxier serving nothing yet, its fd budget from `config` (an
    /// explicit connection limit the fd limit cannot hold is lowered to
    /// what fits: [`crate::run`] refuses it before).
    pub fn new(config: ProxyConfig) -> Self {
        let fds = config.fd_budget().unwrap_or_else(|e| {
            tracing::error!(error = %e, "connection limit lowered to what the fd limit holds");
            let mut c = config.clone();
            c.max_connections = Some(e.most);
            c.fd_budget()
                .unwrap_or_else(|_| super::fds::FdBudget::unlimited())
        });
        Self::with_fds(config, fds)
    }

    /// A proxier serving nothing yet, accounting its fds in `fds`.
    pub fn with_fds(config: ProxyConfig, fds: Arc<super::fds::FdBudget>) -> Self {
        let ports = [
            PortAllocator::new(config.port_range),
            PortAllocator::new(config.port_range),
        ];
        let workers = match Workers::start(config.workers, config.worker_idle) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot start worker threads; TCP runs on the main runtime");
                None
            }
        };
        let ctx = Arc::new(Context {
            config,
            workers,
            pipes: PipePool::new(MAX_IDLE_PIPES, MAX_LIVE_PIPES, Arc::clone(&fds)),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            fds,
            next_home: AtomicUsize::new(0),
            limit_waits: AtomicU64::new(0),
            closed_since_release: AtomicU64::new(0),
            park: conn::Park::default(),
            parked: std::sync::Mutex::new(None),
            origin: super::origin::Origin::default(),
        });
        ctx.origin.refresh_host();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(housekeeping(Arc::downgrade(&ctx)));
        }
        Self {
            ctx,
            served: BTreeMap::new(),
            ports,
            unserved: BTreeSet::new(),
            published: Published::default(),
            inherited: Inherited::default(),
        }
    }

    /// Takes the service ports' sockets handed over by the previous
    /// process: the next [`Self::sync`] serves each of them from its
    /// socket (same port) instead of binding, and starts its counters
    /// from the old totals. Call [`Self::drop_unadopted`] after it.
    pub fn adopt(&mut self, inherited: &mut Inherited) {
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
        self.inherited = Inherited::default();
        left
    }

    /// Every listening socket (shared, not duplicated) with its
    /// description and counters, for a hand-over to the next process.
    pub fn export(&self) -> Vec<Exported> {
        let mut out = Vec::new();
        for (name, s) in &self.served {
            let Some(listener) = &s.listener else {
                continue;
            };
            let fds = listener.sockets();
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
                        .map(|(_, b)| BackendCounters {
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
    ) -> Option<(Bound, u16, Carried)> {
        let fds = &self.ctx.fds;
        let (bound, port, counters) = match name.protocol {
            Protocol::Udp => {
                let (port, s, c) = self.inherited.udp.remove(name)?;
                (Bound::inherited_udp(s, fds.take_held(1)), port, c)
            }
            _ => {
                let (port, ls, c) = self.inherited.tcp.remove(name)?;
                let lease = fds.take_held(ls.len());
                (Bound::inherited_tcp(ls, lease), port, c)
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
                unserved: s.unserved.clone(),
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

    /// The local-traffic detector in force (`--detect-local-mode`, with the
    /// Node's pod CIDRs of the last snapshot), for the rules.
    pub fn detector(&self) -> crate::detect_local::Detector {
        crate::detect_local::Detector::clone(&self.ctx.origin.detector())
    }

    /// Whether some listener failed to bind and wants a retry.
    pub fn has_pending(&self) -> bool {
        self.served.values().any(|s| s.listener.is_none())
    }

    /// Makes the running state match `snapshot`.
    pub fn sync(&mut self, snapshot: &Snapshot) -> SyncReport {
        let mut report = SyncReport::default();
        let detect = &self.ctx.config.detect_local;
        let detector = detect.detector(&snapshot.node.pod_cidrs);
        // The rules match local pods with it too.
        report.disposition_changed += usize::from(self.ctx.origin.set_detector(detector));
        let wanted = |name: &ServicePortName| {
            served_protocol(name.protocol) && snapshot.services.contains_key(name)
        };

        // Deleted first, so their ports are free for newcomers.
        let gone: Vec<ServicePortName> =
            self.served.keys().filter(|n| !wanted(n)).cloned().collect();
        let removed = gone.len();
        for name in gone {
            if let Some(s) = self.served.remove(&name) {
                report.closed += usize::from(s.listener.is_some());
                self.close(s);
                tracing::info!(service = %name, "service port removed; open connections drain");
            }
        }
        self.unserved.retain(|n| snapshot.services.contains_key(n));

        // Never handed out from the range: node ports of every service port,
        // and service ports (a REDIRECT of a node address to a listener on
        // the very port it was sent to would change nothing, and the rules
        // closing internal listeners would take it for direct traffic).
        let avoid: BTreeSet<u16> = snapshot
            .services
            .values()
            .flat_map(|e| e.port.node_port.into_iter().chain([e.port.port]))
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
                    unserved: None,
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
            let (sets, rules) = served.service.update_endpoints(entry);
            report.endpoints_changed += usize::from(sets);
            report.disposition_changed += usize::from(rules);
        }

        let served_now = self.served.len();
        // Bind what is not listening yet (new, re-homed, or failed before),
        // the connection limit first making room for them.
        let names: Vec<ServicePortName> = self
            .served
            .iter()
            .filter(|(_, s)| s.listener.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        // Handed-over sockets are open already: only new binds want fds.
        let to_bind = names
            .iter()
            .filter(|n| {
                !self.inherited.tcp.contains_key(*n) && !self.inherited.udp.contains_key(*n)
            })
            .count();
        self.ctx.fds.rebalance(to_bind);
        for name in names {
            if self.open(&name, &avoid) {
                report.opened += 1;
            }
        }
        report.connection_limit = self.ctx.fds.rebalance(0);
        for s in self.served.values() {
            match (&s.listener, &s.unserved) {
                (Some(l), _) => {
                    l.set_refusing(!s.service.routing().has_any_endpoints);
                    report.listening += 1;
                }
                (None, Some(u)) if u.reason == UnservedReason::FdLimit => {
                    report.pending += 1;
                    report.fd_limited += 1;
                }
                (None, _) => report.pending += 1,
            }
        }
        // The views carry specs, ports and why a port is unserved; their
        // endpoints and counters are read live. A sync that only swapped
        // endpoints (the common one) need not copy 10,000 specs again.
        let dirty = removed > 0
            || report.spec_changed > 0
            || report.opened > 0
            || report.pending > 0
            || self.published.load().len() != served_now;
        if dirty {
            self.publish();
        }
        report
    }

    /// Binds the listener of `name`; false (reported) when it cannot.
    fn open(&mut self, name: &ServicePortName, avoid: &BTreeSet<u16>) -> bool {
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
        } else if let Some(lease) = self.ctx.fds.try_take_listener() {
            self.bind(name, proto, node_port, lease, avoid)
        } else {
            let fds = &self.ctx.fds;
            Err(Unserved {
                reason: UnservedReason::FdLimit,
                detail: format!(
                    "fd limit: RLIMIT_NOFILE {} holds no more listeners ({} held by listeners, pipes and UDP sessions, room for {} connections, {} for the process itself)",
                    fds.limit(),
                    fds.held(),
                    fds.connection_limit(),
                    fds.fixed()
                ),
            })
        };
        let served = self.served.get_mut(name).expect("looked up above");
        let spawned = result.and_then(|(l, allocated)| {
            l.spawn(Arc::clone(&served.service), Arc::clone(&self.ctx))
                .map(|h| (h, allocated))
                .map_err(|e| Unserved {
                    reason: UnservedReason::Bind,
                    detail: e.to_string(),
                })
        });
        match spawned {
            Ok((handle, allocated)) => {
                if let Some(p) = allocated {
                    self.ports[proto_index(proto)].hold(p);
                }
                tracing::debug!(service = %name, port = handle.port(), endpoints = served.service.balancer.usable_len(), "listening");
                served.allocated = allocated;
                served.listener = Some(handle);
                served.unserved = None;
                true
            }
            Err(e) => {
                served.service.stats.bind_failures.fetch_add(1, Relaxed);
                // Ports the fd limit cannot hold are counted in one line
                // by the run loop, not one each.
                if served.unserved.as_ref() != Some(&e) {
                    if e.reason == UnservedReason::FdLimit {
                        tracing::debug!(service = %name, error = %e.detail, "listener not bound; retrying on the next sync");
                    } else {
                        tracing::warn!(service = %name, reason = e.reason.as_str(), error = %e.detail, "listener not bound; retrying on the next sync");
                    }
                }
                served.unserved = Some(e);
                false
            }
        }
    }

    /// Binds a new socket for `name`: on its nodePort, else on a free port
    /// of the range not in `avoid` (`Some(port)` then, to hold in the
    /// allocator).
    fn bind(
        &self,
        name: &ServicePortName,
        proto: Protocol,
        node_port: Option<u16>,
        lease: super::fds::FdLease,
        avoid: &BTreeSet<u16>,
    ) -> Result<(Bound, Option<u16>), Unserved> {
        let bind_ip = self.ctx.config.bind_address;
        let unserved = |detail: String| Unserved {
            reason: UnservedReason::Bind,
            detail,
        };
        if let Some(np) = node_port {
            let taken = self.served.iter().find(|(n, s)| {
                *n != name
                    && n.protocol == proto
                    && s.listener.as_ref().is_some_and(|l| l.port() == np)
            });
            if let Some((other, _)) = taken {
                return Err(unserved(format!(
                    "nodePort {np}/{proto} is already served for {other}"
                )));
            }
            return Bound::bind(proto, SocketAddr::new(bind_ip, np), lease)
                .map(|l| (l, None))
                .map_err(|e| {
                    unserved(format!(
                        "cannot listen on nodePort {bind_ip}:{np}/{proto}: {e}"
                    ))
                });
        }
        let mut last = format!("no free port in --proxy-port-range ({MAX_BIND_TRIES} tried)");
        let mut lease = Some(lease);
        let tries = self.ports[proto_index(proto)]
            .candidates(avoid)
            .take(MAX_BIND_TRIES);
        for port in tries {
            let Some(l) = lease.take() else { break };
            match Bound::bind(proto, SocketAddr::new(bind_ip, port), l) {
                Ok(bound) => {
                    let port = bound.port().map_err(|e| unserved(e.to_string()))?;
                    return Ok((bound, Some(port)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    last = format!("port {port}/{proto} in use");
                    lease = self.ctx.fds.try_take_listener();
                }
                Err(e) => {
                    last = format!("cannot listen on {bind_ip}:{port}/{proto}: {e}");
                    break;
                }
            }
        }
        Err(unserved(last))
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
