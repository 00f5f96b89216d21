//! Every metric name, label and help text, in one place.
//!
//! Two kinds of series:
//! - **Process and proxier-wide** (kube-proxy-compatible sync metrics,
//!   iptables failures, change counters, process stats): recorded through
//!   the `metrics` facade and rendered by `metrics-exporter-prometheus`.
//! - **Per service port and per backend**: the data path counts with plain
//!   atomics (exact, even for bytes moved by `splice`, and nothing to look up
//!   per connection); at scrape time they are written out here from the live
//!   services, so a deleted service's series disappear with it.
//!
//! kube-proxy's series (`kubeproxy_*`) match upstream's
//! `pkg/proxy/metrics/metrics.go` (1.33+): names, types, help texts (with
//! component-base's `[ALPHA] ` prefix), buckets and labels, `ip_family`
//! included. Our one sync serves both families, so its series carry
//! `ip_family="IPv4"` and `"IPv6"` alike (as `/healthz`'s `status` does).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::changes::{Counts, Trigger};
use crate::model::IP_FAMILIES;
use crate::proxy::connect::DialResult;
use crate::proxy::stats::CONNECT_BUCKETS;
use crate::proxy::Context;
use crate::proxy::{ServiceView, UnservedReason};

// === Proxier-wide (facade) ===

/// Duration of each sync, by `ip_family` (kube-proxy's name; what one sync
/// is: see `runloop`).
pub const SYNC_DURATION: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
/// Duration of each full sync, by `ip_family`: every sync, with iptables on
/// (kube-proxy's iptables mode).
pub const SYNC_FULL_DURATION: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds";
/// Duration of each partial sync, by `ip_family`: registered with iptables
/// on, never observed (we have no partial syncs).
pub const SYNC_PARTIAL_DURATION: &str = "kubeproxy_sync_partial_proxy_rules_duration_seconds";
/// Unix time of the last sync that left nothing pending, by `ip_family`
/// (kube-proxy's name).
pub const SYNC_LAST_TIMESTAMP: &str = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
/// Unix time a change was last queued for sync, by `ip_family`
/// (kube-proxy's name).
pub const SYNC_LAST_QUEUED: &str = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds";
/// From an EndpointSlice's `last-change-trigger-time` to the change being
/// served, by `ip_family` of the slice (kube-proxy's name).
pub const NETWORK_PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";
/// Service ports with a `Local` traffic policy and no local endpoint,
/// whose traffic of that kind is dropped, by `traffic_policy` (`internal`,
/// `external`) and `ip_family` (kube-proxy's name, a gauge).
pub const NO_LOCAL_ENDPOINTS: &str = "kubeproxy_sync_proxy_rules_no_local_endpoints_total";
/// Services whose ports changed in published snapshots (kube-proxy's name).
pub const SERVICE_CHANGES: &str = "kubeproxy_sync_proxy_rules_service_changes_total";
/// Services whose ports changed between the applied and the newest
/// snapshot (kube-proxy's name).
pub const SERVICE_CHANGES_PENDING: &str = "kubeproxy_sync_proxy_rules_service_changes_pending";
/// Services whose endpoints changed in published snapshots (kube-proxy's name).
pub const ENDPOINT_CHANGES: &str = "kubeproxy_sync_proxy_rules_endpoint_changes_total";
/// Services whose endpoints changed between the applied and the newest
/// snapshot (kube-proxy's name).
pub const ENDPOINT_CHANGES_PENDING: &str = "kubeproxy_sync_proxy_rules_endpoint_changes_pending";
/// Failed rule applies, by `ip_family` (kube-proxy's name).
pub const RESTORE_FAILURES: &str = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total";
/// `/healthz` answers, by `code` (kube-proxy's name).
pub const PROXY_HEALTHZ: &str = "kubeproxy_proxy_healthz_total";
/// `/livez` answers, by `code` (kube-proxy's name).
pub const PROXY_LIVEZ: &str = "kubeproxy_proxy_livez_total";
/// Failed lists and watches of the Kubernetes source, by `kind`.
pub const DISCOVERY_WATCH_ERRORS: &str = "kusp_discovery_watch_errors_total";
/// API objects skipped because they did not decode, by `kind`.
pub const DISCOVERY_DECODE_ERRORS: &str = "kusp_discovery_decode_errors_total";
/// Relists forced by an unusable resource version, by kind and reason
/// (`expired`: 410 Gone; `too_large`: ahead of the API server's store;
/// `regressed`: the store's versions went backwards).
pub const DISCOVERY_RELISTS: &str = "kusp_discovery_relists_total";
/// Resource versions seen going backwards without an error (a store
/// restored below what we had seen), by kind; each forces a relist.
pub const DISCOVERY_RV_REGRESSIONS: &str = "kusp_discovery_resource_version_regressions_total";

/// Admin connections accepted, by `listener` (`healthz`, `metrics`).
pub const ADMIN_ACCEPTED: &str = "kusp_admin_connections_accepted_total";
/// Admin connections open now, by `listener`.
pub const ADMIN_ACTIVE: &str = "kusp_admin_connections_active";
/// Admin connections closed at the cap to make room for a new one (the
/// oldest without a complete request, or idle), by `listener`.
pub const ADMIN_SHED: &str = "kusp_admin_connections_shed_total";
/// Times a new admin connection waited in the backlog because every slot
/// was busy answering, by `listener`.
pub const ADMIN_WAITS: &str = "kusp_admin_connection_limit_waits_total";
/// Admin connections closed by a deadline, by `listener` and `phase`
/// (`header`, `response`, `idle`).
pub const ADMIN_TIMED_OUT: &str = "kusp_admin_connections_timed_out_total";

/// The facade's series: name, type, help (kube-proxy's with upstream's
/// text, `[ALPHA] ` included).
const FACADE: &[Family] = &[
    Family(
        SYNC_DURATION,
        "histogram",
        "[ALPHA] SyncProxyRules latency in seconds",
    ),
    Family(
        SYNC_FULL_DURATION,
        "histogram",
        "[ALPHA] SyncProxyRules latency in seconds for full resyncs",
    ),
    Family(
        SYNC_PARTIAL_DURATION,
        "histogram",
        "[ALPHA] SyncProxyRules latency in seconds for partial resyncs",
    ),
    Family(
        SYNC_LAST_TIMESTAMP,
        "gauge",
        "[ALPHA] The last time proxy rules were successfully synced",
    ),
    Family(
        SYNC_LAST_QUEUED,
        "gauge",
        "[ALPHA] The last time a sync of proxy rules was queued",
    ),
    Family(
        NETWORK_PROGRAMMING,
        "histogram",
        "[ALPHA] In Cluster Network Programming Latency in seconds",
    ),
    Family(
        NO_LOCAL_ENDPOINTS,
        "gauge",
        "[ALPHA] Number of services with a Local traffic policy and no endpoints",
    ),
    Family(
        SERVICE_CHANGES,
        "counter",
        "[ALPHA] Cumulative proxy rules Service changes",
    ),
    Family(
        SERVICE_CHANGES_PENDING,
        "gauge",
        "[ALPHA] Pending proxy rules Service changes",
    ),
    Family(
        ENDPOINT_CHANGES,
        "counter",
        "[ALPHA] Cumulative proxy rules Endpoint changes",
    ),
    Family(
        ENDPOINT_CHANGES_PENDING,
        "gauge",
        "[ALPHA] Pending proxy rules Endpoint changes",
    ),
    Family(
        RESTORE_FAILURES,
        "counter",
        "[ALPHA] Cumulative proxy iptables restore failures",
    ),
    Family(
        PROXY_HEALTHZ,
        "counter",
        "[ALPHA] Cumulative proxy healthz HTTP status",
    ),
    Family(
        PROXY_LIVEZ,
        "counter",
        "[ALPHA] Cumulative proxy livez HTTP status",
    ),
    Family(
        DISCOVERY_WATCH_ERRORS,
        "counter",
        "Failed lists and watches of the Kubernetes API, by kind (each is retried with back-off)",
    ),
    Family(
        DISCOVERY_DECODE_ERRORS,
        "counter",
        "API objects skipped because they did not decode, by kind",
    ),
    Family(
        DISCOVERY_RELISTS,
        "counter",
        "Relists because a resource version became unusable, by kind and reason (expired, too_large, regressed)",
    ),
    Family(
        DISCOVERY_RV_REGRESSIONS,
        "counter",
        "Resource versions that went backwards without an error (store restored below the last seen), by kind",
    ),
    Family(
        ADMIN_ACCEPTED,
        "counter",
        "Connections accepted by the admin listeners, by listener (healthz, metrics)",
    ),
    Family(
        ADMIN_ACTIVE,
        "gauge",
        "Connections open on the admin listeners now, by listener",
    ),
    Family(
        ADMIN_SHED,
        "counter",
        "Admin connections closed at the connection cap to make room for a new one (the oldest not yet answered or idle), by listener",
    ),
    Family(
        ADMIN_WAITS,
        "counter",
        "Times a new admin connection waited in the backlog because every slot was busy answering, by listener",
    ),
    Family(
        ADMIN_TIMED_OUT,
        "counter",
        "Admin connections closed by a deadline, by listener and phase (header, response, idle)",
    ),
];

/// kube-proxy's sync duration buckets (upstream's `ExponentialBuckets(0.001,
/// 2, 15)`): 1 ms · 2^n, 15 of them.
fn sync_buckets() -> Vec<f64> {
    (0..15).map(|n| 0.001 * f64::from(1u32 << n)).collect()
}

/// kube-proxy's network programming buckets (upstream's `MergeBuckets`,
/// which starts with a 0): 0, 0.25 s, 0.5 s, 1 to 59 s by 1, 60 to 115 s by
/// 5, 2 to 5 min by 30 s.
fn network_programming_buckets() -> Vec<f64> {
    let linear =
        |start: f64, width: f64, count: u32| (0..count).map(move |i| start + width * f64::from(i));
    std::iter::once(0.0)
        .chain(linear(0.25, 0.25, 2))
        .chain(linear(1.0, 1.0, 59))
        .chain(linear(60.0, 5.0, 12))
        .chain(linear(120.0, 30.0, 7))
        .collect()
}

/// Installs the process-wide recorder once and describes every facade
/// metric; later calls return the same handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let sync = sync_buckets();
            let buckets = [
                (SYNC_DURATION, &sync),
                (SYNC_FULL_DURATION, &sync),
                (SYNC_PARTIAL_DURATION, &sync),
                (NETWORK_PROGRAMMING, &network_programming_buckets()),
            ];
            let recorder = buckets
                .into_iter()
                .try_fold(PrometheusBuilder::new(), |b, (name, buckets)| {
                    b.set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                })
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; proxier-wide metrics may be missing"
                );
            }
            for f in FACADE {
                match f.1 {
                    "counter" => describe_counter!(f.0, f.2),
                    "gauge" => describe_gauge!(f.0, f.2),
                    _ => describe_histogram!(f.0, f.2),
                }
            }
            handle
        })
        .clone()
}

/// Every series name `/metrics` shows besides `process_*` and the fd,
/// pipe and connection-limit gauges, with its type.
pub fn families() -> impl Iterator<Item = (&'static str, &'static str)> {
    FACADE.iter().chain(FAMILIES).map(|f| (f.0, f.1))
}

/// Registers the sync histograms and the restore failures, for both
/// families, so that they show before anything is observed; the iptables
/// mode's (full and partial durations, restore failures) only with
/// `iptables`, as upstream's `RegisterMetrics`. (The change series appear
/// with the first snapshot, the timestamps with the first queue and sync.)
pub fn register_sync(iptables: bool) {
    for family in IP_FAMILIES {
        let _ = ::metrics::histogram!(SYNC_DURATION, "ip_family" => family);
        let _ = ::metrics::histogram!(NETWORK_PROGRAMMING, "ip_family" => family);
        if iptables {
            let _ = ::metrics::histogram!(SYNC_FULL_DURATION, "ip_family" => family);
            let _ = ::metrics::histogram!(SYNC_PARTIAL_DURATION, "ip_family" => family);
            ::metrics::counter!(RESTORE_FAILURES, "ip_family" => family).increment(0);
        }
    }
}

/// Records one sync of `took` (upstream's `syncProxyRules`; what one sync
/// is: see `runloop`) in each family; with `iptables`, as a full one too.
pub fn record_sync(took: Duration, iptables: bool) {
    for family in IP_FAMILIES {
        ::metrics::histogram!(SYNC_DURATION, "ip_family" => family).record(took);
        if iptables {
            ::metrics::histogram!(SYNC_FULL_DURATION, "ip_family" => family).record(took);
        }
    }
}

/// Sets [`SYNC_LAST_TIMESTAMP`] to now, each family (upstream, after a
/// successful `syncProxyRules`).
pub fn set_synced_now() {
    let now = unix_now();
    for family in IP_FAMILIES {
        ::metrics::gauge!(SYNC_LAST_TIMESTAMP, "ip_family" => family).set(now);
    }
}

/// Sets [`SYNC_LAST_QUEUED`] to now, each family (upstream's `Sync()`, and
/// once as its `SyncLoop` starts).
pub fn set_queued_now() {
    let now = unix_now();
    for family in IP_FAMILIES {
        ::metrics::gauge!(SYNC_LAST_QUEUED, "ip_family" => family).set(now);
    }
}

/// Adds the changes of a published snapshot to the `_total` counters
/// (upstream counts each change as its event arrives).
pub fn add_changes(received: Counts) {
    ::metrics::counter!(SERVICE_CHANGES).increment(received.services as u64);
    ::metrics::counter!(ENDPOINT_CHANGES).increment(received.endpoints as u64);
}

/// Sets the `_pending` gauges.
pub fn set_pending(pending: Counts) {
    ::metrics::gauge!(SERVICE_CHANGES_PENDING).set(pending.services as f64);
    ::metrics::gauge!(ENDPOINT_CHANGES_PENDING).set(pending.endpoints as f64);
}

/// Counts a failed rule apply of `family` (index into [`IP_FAMILIES`]).
pub fn restore_failed(family: usize) {
    let family = IP_FAMILIES.get(family).copied().unwrap_or(IP_FAMILIES[0]);
    ::metrics::counter!(RESTORE_FAILURES, "ip_family" => family).increment(1);
}

/// Observes, now, the network programming latency of each of `served`
/// (upstream, in `syncProxyRules` after the rules are applied); a trigger
/// time in the future (clock skew) is a negative latency, as upstream's.
pub fn observe_programming(served: &[Trigger]) {
    let now = SystemTime::now();
    for t in served {
        let latency = match now.duration_since(t.at) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        let family = IP_FAMILIES.get(t.family).copied().unwrap_or(IP_FAMILIES[0]);
        tracing::debug!(service = %t.service, ip_family = family, latency, "network programming");
        ::metrics::histogram!(NETWORK_PROGRAMMING, "ip_family" => family).record(latency);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// === Per service port / backend (rendered from atomics) ===

/// A series family: name, type, help.
struct Family(&'static str, &'static str, &'static str);

/// Client connections accepted.
pub const ACCEPTED: &str = "kusp_connections_accepted_total";
/// Client connections open now.
pub const ACTIVE: &str = "kusp_connections_active";
/// Connections that reached a backend and ended.
pub const COMPLETED: &str = "kusp_connections_completed_total";
/// Connections closed because no backend was reachable.
pub const FAILED: &str = "kusp_connections_failed_total";
/// Dial attempts, label `result`.
pub const DIALS: &str = "kusp_dial_attempts_total";
/// Dial attempts after a connection's first.
pub const RETRIES: &str = "kusp_dial_retries_total";
/// Time from accept to a connected backend (retries included).
pub const CONNECT_LATENCY: &str = "kusp_connect_duration_seconds";
/// Bytes proxied, label `direction`.
pub const BYTES: &str = "kusp_bytes_total";
/// Failed listener binds.
pub const BIND_FAILURES: &str = "kusp_listener_bind_failures_total";
/// Accept errors from fd/memory exhaustion.
pub const ACCEPT_ERRORS: &str = "kusp_accept_errors_total";
/// Listener port of the service port (absent while unbound).
pub const LISTENER_PORT: &str = "kusp_listener_port";
/// Listening sockets of the service port (1, or one per worker once busy).
pub const LISTENER_SOCKETS: &str = "kusp_listener_sockets";
/// Connections closed because TCP keepalive found a peer dead.
pub const PEERS_DEAD: &str = "kusp_connections_peer_dead_total";
/// Service ports without a listener, label `reason` (`fd_limit`, `bind`).
pub const UNSERVED: &str = "kusp_service_ports_unserved";
/// UDP: datagrams, label `direction`.
pub const UDP_DATAGRAMS: &str = "kusp_udp_datagrams_total";
/// UDP: sessions open now.
pub const UDP_SESSIONS_ACTIVE: &str = "kusp_udp_sessions_active";
/// UDP: sessions created.
pub const UDP_SESSIONS_CREATED: &str = "kusp_udp_sessions_created_total";
/// UDP: sessions ended by the idle timeout.
pub const UDP_SESSIONS_EXPIRED: &str = "kusp_udp_sessions_expired_total";
/// UDP: datagrams of new clients dropped at the session cap.
pub const UDP_SESSIONS_DROPPED: &str = "kusp_udp_sessions_dropped_total";
/// Unknown values of our Service annotations, label `annotation`
/// (`scheduler`, `proxy-protocol`); the service runs with the default.
pub const CONFIG_ERRORS: &str = "kusp_service_config_errors_total";
/// Always 1; labels `scheduler` and `proxy_protocol` say what is in force.
pub const SERVICE_INFO: &str = "kusp_service_info";
/// Per backend: connections open now.
pub const BACKEND_ACTIVE: &str = "kusp_backend_connections_active";
/// Per backend: connections established.
pub const BACKEND_TOTAL: &str = "kusp_backend_connections_total";
/// Per backend: failed dials.
pub const BACKEND_DIAL_FAILURES: &str = "kusp_backend_dial_failures_total";
/// Per backend: times ejected.
pub const BACKEND_EJECTIONS: &str = "kusp_backend_ejections_total";
/// Per backend: 1 while ejected.
pub const BACKEND_EJECTED: &str = "kusp_backend_ejected";
/// Per backend: bytes, label `direction`.
pub const BACKEND_BYTES: &str = "kusp_backend_bytes_total";

const FAMILIES: &[Family] = &[
    Family(
        ACCEPTED,
        "counter",
        "Client connections accepted (UDP: sessions created).",
    ),
    Family(
        ACTIVE,
        "gauge",
        "Client connections open now (UDP: sessions).",
    ),
    Family(
        COMPLETED,
        "counter",
        "Connections that reached a backend and ended.",
    ),
    Family(
        FAILED,
        "counter",
        "Connections closed because no backend could be reached.",
    ),
    Family(
        DIALS,
        "counter",
        "Backend dial attempts by result (ok, refused, timeout, unreachable, other).",
    ),
    Family(
        RETRIES,
        "counter",
        "Dial attempts after the first one of a connection.",
    ),
    Family(
        CONNECT_LATENCY,
        "histogram",
        "Time from accept to a connected backend, retries included.",
    ),
    Family(
        BYTES,
        "counter",
        "Bytes proxied, by direction (client_to_backend, backend_to_client).",
    ),
    Family(
        BIND_FAILURES,
        "counter",
        "Failed attempts to bind the service port's listener.",
    ),
    Family(
        ACCEPT_ERRORS,
        "counter",
        "Accept errors from resource exhaustion (EMFILE, ENFILE, ENOBUFS, ENOMEM).",
    ),
    Family(
        LISTENER_PORT,
        "gauge",
        "Port of the service port's listener.",
    ),
    Family(
        LISTENER_SOCKETS,
        "gauge",
        "Listening sockets of the service port: 1, or one per worker once the port is busy.",
    ),
    Family(
        PEERS_DEAD,
        "counter",
        "Connections closed because TCP keepalive (or retransmission) found the client or backend dead.",
    ),
    Family(
        UNSERVED,
        "gauge",
        "Service ports with no listener, by reason (fd_limit: the fd budget holds no more; bind: the port could not be bound).",
    ),
    Family(
        CONFIG_ERRORS,
        "counter",
        "Unknown Service annotation values (the default was used instead), by annotation.",
    ),
    Family(
        SERVICE_INFO,
        "gauge",
        "Scheduler and PROXY protocol version in force for the service port (value 1).",
    ),
    Family(
        BACKEND_ACTIVE,
        "gauge",
        "Connections open to the backend now.",
    ),
    Family(
        BACKEND_TOTAL,
        "counter",
        "Connections established to the backend.",
    ),
    Family(
        BACKEND_DIAL_FAILURES,
        "counter",
        "Failed dials to the backend.",
    ),
    Family(
        BACKEND_EJECTIONS,
        "counter",
        "Times the backend was ejected after a failed dial.",
    ),
    Family(BACKEND_EJECTED, "gauge", "1 while the backend is ejected."),
    Family(
        BACKEND_BYTES,
        "counter",
        "Bytes proxied through the backend, by direction.",
    ),
];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Label set of a service port (no client addresses, ever).
fn service_labels(v: &ServiceView) -> String {
    let n = &v.service.name;
    let port = if n.port_name.is_empty() {
        v.spec.port.to_string()
    } else {
        n.port_name.clone()
    };
    format!(
        "namespace=\"{}\",service=\"{}\",port=\"{}\",protocol=\"{}\"",
        escape(&n.namespace),
        escape(&n.name),
        escape(&port),
        n.protocol
    )
}

/// Renders the per-service and per-backend series of `services`.
pub fn render_services(services: &[ServiceView]) -> String {
    // One sample list per family, in FAMILIES order.
    let mut samples: Vec<Vec<String>> = vec![Vec::new(); FAMILIES.len()];
    let idx = |name: &str| FAMILIES.iter().position(|f| f.0 == name).unwrap_or(0);
    let mut push = |name: &str, line: String| samples[idx(name)].push(line);
    for v in services {
        let l = service_labels(v);
        let s = &v.service.stats;
        push(
            ACCEPTED,
            format!("{ACCEPTED}{{{l}}} {}", s.accepted.load(Relaxed)),
        );
        push(
            ACTIVE,
            format!("{ACTIVE}{{{l}}} {}", s.active.load(Relaxed)),
        );
        push(
            COMPLETED,
            format!("{COMPLETED}{{{l}}} {}", s.completed.load(Relaxed)),
        );
        push(
            FAILED,
            format!("{FAILED}{{{l}}} {}", s.failed.load(Relaxed)),
        );
        for r in DialResult::ALL {
            push(
                DIALS,
                format!("{DIALS}{{{l},result=\"{}\"}} {}", r.as_str(), s.dials(r)),
            );
        }
        push(
            RETRIES,
            format!("{RETRIES}{{{l}}} {}", s.retries.load(Relaxed)),
        );
        let (buckets, count, sum) = s.connect_latency.snapshot();
        for (b, c) in CONNECT_BUCKETS.iter().zip(&buckets) {
            push(
                CONNECT_LATENCY,
                format!("{CONNECT_LATENCY}_bucket{{{l},le=\"{b}\"}} {c}"),
            );
        }
        push(
            CONNECT_LATENCY,
            format!("{CONNECT_LATENCY}_bucket{{{l},le=\"+Inf\"}} {count}"),
        );
        push(
            CONNECT_LATENCY,
            format!("{CONNECT_LATENCY}_sum{{{l}}} {sum}"),
        );
        push(
            CONNECT_LATENCY,
            format!("{CONNECT_LATENCY}_count{{{l}}} {count}"),
        );
        push(
            BYTES,
            format!(
                "{BYTES}{{{l},direction=\"client_to_backend\"}} {}",
                s.bytes_in.load(Relaxed)
            ),
        );
        push(
            BYTES,
            format!(
                "{BYTES}{{{l},direction=\"backend_to_client\"}} {}",
                s.bytes_out.load(Relaxed)
            ),
        );
        push(
            BIND_FAILURES,
            format!("{BIND_FAILURES}{{{l}}} {}", s.bind_failures.load(Relaxed)),
        );
        push(
            ACCEPT_ERRORS,
            format!("{ACCEPT_ERRORS}{{{l}}} {}", s.accept_errors.load(Relaxed)),
        );
        if let Some(p) = v.listener_port {
            push(LISTENER_PORT, format!("{LISTENER_PORT}{{{l}}} {p}"));
            push(
                LISTENER_SOCKETS,
                format!("{LISTENER_SOCKETS}{{{l}}} {}", s.sockets.load(Relaxed)),
            );
        }
        push(
            PEERS_DEAD,
            format!("{PEERS_DEAD}{{{l}}} {}", s.peers_dead.load(Relaxed)),
        );
        for (a, n) in crate::proxy::CONFIG_ANNOTATIONS
            .iter()
            .zip(&s.config_errors)
        {
            push(
                CONFIG_ERRORS,
                format!(
                    "{CONFIG_ERRORS}{{{l},annotation=\"{a}\"}} {}",
                    n.load(Relaxed)
                ),
            );
        }
        push(
            SERVICE_INFO,
            format!(
                "{SERVICE_INFO}{{{l},scheduler=\"{}\",proxy_protocol=\"{}\"}} 1",
                v.service.balancer.scheduler(),
                v.service.proxy_protocol().map_or("off", |p| p.as_str())
            ),
        );
        if v.service.name.protocol == crate::model::Protocol::Udp {
            let load = |a: &AtomicU64| a.load(Relaxed);
            push(
                UDP_DATAGRAMS,
                format!(
                    "{UDP_DATAGRAMS}{{{l},direction=\"client_to_backend\"}} {}",
                    load(&s.datagrams_in)
                ),
            );
            push(
                UDP_DATAGRAMS,
                format!(
                    "{UDP_DATAGRAMS}{{{l},direction=\"backend_to_client\"}} {}",
                    load(&s.datagrams_out)
                ),
            );
            push(
                UDP_SESSIONS_ACTIVE,
                format!("{UDP_SESSIONS_ACTIVE}{{{l}}} {}", load(&s.active)),
            );
            push(
                UDP_SESSIONS_CREATED,
                format!("{UDP_SESSIONS_CREATED}{{{l}}} {}", load(&s.accepted)),
            );
            push(
                UDP_SESSIONS_EXPIRED,
                format!(
                    "{UDP_SESSIONS_EXPIRED}{{{l}}} {}",
                    load(&s.sessions_expired)
                ),
            );
            push(
                UDP_SESSIONS_DROPPED,
                format!(
                    "{UDP_SESSIONS_DROPPED}{{{l}}} {}",
                    load(&s.sessions_dropped)
                ),
            );
        }
        for (ep, b) in v.service.balancer.endpoints() {
            let bl = format!("{l},endpoint=\"{}\"", ep.addr);
            push(
                BACKEND_ACTIVE,
                format!("{BACKEND_ACTIVE}{{{bl}}} {}", b.active.load(Relaxed)),
            );
            push(
                BACKEND_TOTAL,
                format!("{BACKEND_TOTAL}{{{bl}}} {}", b.total.load(Relaxed)),
            );
            push(
                BACKEND_DIAL_FAILURES,
                format!(
                    "{BACKEND_DIAL_FAILURES}{{{bl}}} {}",
                    b.dial_failures.load(Relaxed)
                ),
            );
            push(
                BACKEND_EJECTIONS,
                format!("{BACKEND_EJECTIONS}{{{bl}}} {}", b.ejections.load(Relaxed)),
            );
            let ejected = u8::from(b.ejected_for_ms() > 0);
            push(
                BACKEND_EJECTED,
                format!("{BACKEND_EJECTED}{{{bl}}} {ejected}"),
            );
            push(
                BACKEND_BYTES,
                format!(
                    "{BACKEND_BYTES}{{{bl},direction=\"client_to_backend\"}} {}",
                    b.bytes_in.load(Relaxed)
                ),
            );
            push(
                BACKEND_BYTES,
                format!(
                    "{BACKEND_BYTES}{{{bl},direction=\"backend_to_client\"}} {}",
                    b.bytes_out.load(Relaxed)
                ),
            );
        }
    }
    for (reason, n) in UnservedReason::ALL
        .into_iter()
        .zip(UnservedReason::count(services))
    {
        push(
            UNSERVED,
            format!("{UNSERVED}{{reason=\"{}\"}} {n}", reason.as_str()),
        );
    }
    let mut out = String::new();
    for (f, lines) in FAMILIES.iter().zip(samples) {
        if lines.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {} {}", f.0, f.2);
        let _ = writeln!(out, "# TYPE {} {}", f.0, f.1);
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// Process series (Prometheus' standard names, read from /proc at scrape
/// time), the splice pipe pool and the connection limit.
pub fn render_process(ctx: &Context) -> String {
    let pipes = &ctx.pipes;
    let mut out = String::new();
    if ctx.config.worker_idle == crate::proxy::workers::Idle::Auto {
        let [sleep, yielding] = crate::proxy::idle::policy_seconds();
        let (name, switches) = (
            "kusp_worker_idle_policy_seconds_total",
            "kusp_worker_idle_switches_total",
        );
        let _ = writeln!(
            out,
            "# HELP {name} Seconds the --worker-idle auto workers spent moving traffic under each idle policy (wall clock; the policy is the process').\n\
             # TYPE {name} counter\n{name}{{policy=\"sleep\"}} {sleep}\n{name}{{policy=\"yield\"}} {yielding}\n\
             # HELP {switches} Times the --worker-idle auto workers changed their idle policy.\n\
             # TYPE {switches} counter\n{switches} {}",
            crate::proxy::idle::switches()
        );
    }
    let mut series = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        series(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            dir.count() as f64,
        );
    }
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        series(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            soft as f64,
        );
    }
    let sysconf =
        |v, default: i64| nix::unistd::sysconf(v).ok().flatten().unwrap_or(default) as f64;
    let page = sysconf(nix::unistd::SysconfVar::PAGE_SIZE, 4096);
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(rss) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<f64>().ok())
        {
            series(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                rss * page,
            );
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces) follow ')':
        // utime and stime (fields 14 and 15) are the 12th and 13th there.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let ticks = sysconf(nix::unistd::SysconfVar::CLK_TCK, 100);
        series(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (field(11) + field(12)) / ticks,
        );
    }
    series(
        "kusp_splice_pipes_created_total",
        "counter",
        "Pipes created for splice since start.",
        pipes.created.load(Relaxed) as f64,
    );
    series(
        "kusp_splice_pipes_idle",
        "gauge",
        "Pipes idle in the splice pool.",
        pipes.idle() as f64,
    );
    series(
        "kusp_splice_pipes_open",
        "gauge",
        "Pipes open now, idle or carrying bytes.",
        pipes.live() as f64,
    );
    series(
        "kusp_splice_copy_fallbacks_total",
        "counter",
        "Chunks copied through user memory because no pipe could be had.",
        pipes.fallbacks.load(Relaxed) as f64,
    );
    let fds = &ctx.fds;
    if fds.limit() > 0 {
        series(
            "kusp_fd_limit",
            "gauge",
            "RLIMIT_NOFILE the fd budget splits.",
            fds.limit() as f64,
        );
        series(
            "kusp_fd_reserved",
            "gauge",
            "Fds of the process itself (runtimes, admin servers, control plane), never handed out.",
            fds.fixed() as f64,
        );
    }
    series(
        "kusp_fd_held",
        "gauge",
        "Fds held by listeners, pipes and UDP sessions.",
        fds.held() as f64,
    );
    series(
        "kusp_fd_refused_total",
        "counter",
        "Fds asked of the budget (listener, pipe, UDP session) and refused because it was spent.",
        fds.refused() as f64,
    );
    if let Some(limit) = fds.connections() {
        series(
            "kusp_connection_limit",
            "gauge",
            "Most TCP client connections open at once: --max-connections, or what the fd budget leaves beside the listeners.",
            fds.connection_limit() as f64,
        );
        series(
            "kusp_connection_limit_available",
            "gauge",
            "Connections that may still be accepted under the connection limit.",
            limit.available_permits() as f64,
        );
        series(
            "kusp_connection_limit_waits_total",
            "counter",
            "Times a listener found the connection limit reached and left clients in the backlog.",
            ctx.limit_waits.load(Relaxed) as f64,
        );
    }
    out
}

/// Service ports whose `Local` policy leaves a kind of traffic without an
/// endpoint (while endpoints exist elsewhere), as upstream counts them in
/// `syncProxyRules`: `[internal, external]` per family `[IPv4, IPv6]`
/// (a port counts in each family of its ClusterIPs, IPv4 without one).
pub fn no_local_endpoints(views: &[ServiceView]) -> [[usize; 2]; 2] {
    let mut n = [[0; 2]; 2];
    for v in views {
        let r = v.service.routing();
        if !r.has_any_endpoints {
            continue;
        }
        let missing = [
            r.internal_local && !r.has_internal,
            r.external_local && !r.has_external,
        ];
        let mut families = [false; 2];
        for ip in &v.spec.cluster_ips {
            families[usize::from(ip.is_ipv6())] = true;
        }
        if v.spec.cluster_ips.is_empty() {
            families[0] = true;
        }
        for (f, _) in families.iter().enumerate().filter(|(_, on)| **on) {
            for (p, m) in missing.iter().enumerate() {
                n[f][p] += usize::from(*m);
            }
        }
    }
    n
}

/// Sets [`NO_LOCAL_ENDPOINTS`] from the served ports.
pub fn set_no_local_endpoints(views: &[ServiceView]) {
    let n = no_local_endpoints(views);
    for (f, family) in IP_FAMILIES.into_iter().enumerate() {
        for (p, policy) in ["internal", "external"].into_iter().enumerate() {
            ::metrics::gauge!(NO_LOCAL_ENDPOINTS, "traffic_policy" => policy, "ip_family" => family)
                .set(n[f][p] as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_buckets_match_kube_proxy() {
        let b = sync_buckets();
        assert_eq!(b.len(), 15);
        assert_eq!(b[0], 0.001);
        assert!((b[14] - 16.384).abs() < 1e-9);
    }

    #[test]
    fn network_programming_buckets_match_kube_proxy() {
        let b = network_programming_buckets();
        // 0, then 2 + 59 + 12 + 7 linear ones.
        assert_eq!(b.len(), 81);
        assert_eq!(&b[..5], [0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(b[61], 59.0);
        assert_eq!(&b[62..64], [60.0, 65.0]);
        assert_eq!(b[73], 115.0);
        assert_eq!(&b[74..], [120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0]);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn every_family_is_named_once_and_kube_proxys_are_alpha() {
        let mut names: Vec<&str> = families().map(|(n, _)| n).collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "a name listed twice");
        for f in FACADE.iter().chain(FAMILIES) {
            assert!(matches!(f.1, "counter" | "gauge" | "histogram"), "{}", f.0);
            assert_eq!(
                f.0.starts_with("kubeproxy_"),
                f.2.starts_with("[ALPHA] "),
                "{}",
                f.0
            );
        }
    }
}
