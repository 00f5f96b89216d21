//! The proxy's live state as a document (`/debug/services`) and as a table
//! in the spirit of `ipvsadm -Ln --stats` / `--rate` (`status` subcommand).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proxy::connect::DialResult;
use crate::proxy::{ServiceView, Traffic};

/// The whole of `/debug/services`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// iptables redirect state: `off`, `synced`, `failed` or `pending`.
    pub iptables: String,
    /// When this document was taken (Unix milliseconds): the stats page
    /// divides counter deltas by the difference of two of these.
    #[serde(default)]
    pub now_ms: u64,
    /// When the last sync completed (Unix milliseconds; 0 = none yet).
    #[serde(default)]
    pub last_sync_ms: u64,
    /// Upper bounds (seconds) of the connect-time histogram buckets, for
    /// [`ServiceStatus::connect_buckets`]; the last bucket is `+Inf`.
    #[serde(default)]
    pub connect_buckets_le: Vec<f64>,
    /// Every served service port.
    pub services: Vec<ServiceStatus>,
}

/// One service port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Port name (may be empty).
    pub port_name: String,
    /// TCP or UDP.
    pub protocol: String,
    /// Service port on the cluster IPs.
    pub port: u16,
    /// Cluster IPs.
    pub cluster_ips: Vec<String>,
    /// Node port, if any.
    pub node_port: Option<u16>,
    /// External and load-balancer IPs.
    pub external_ips: Vec<String>,
    /// `spec.loadBalancerSourceRanges` in force (CIDRs): the only sources
    /// the LB IPs take; empty: every source.
    #[serde(default)]
    pub load_balancer_source_ranges: Vec<String>,
    /// Entries of `spec.loadBalancerSourceRanges` that do not parse,
    /// verbatim: ignored.
    #[serde(default)]
    pub invalid_load_balancer_source_ranges: Vec<String>,
    /// Our listener's port, once bound.
    pub listener_port: Option<u16>,
    /// Listening sockets of the port: 1, or one per worker once busy.
    #[serde(default)]
    pub listener_sockets: usize,
    /// TCP: open connections on each worker (one port's), as dealt at
    /// accept: HAProxy's per-thread `thr_conn`.
    #[serde(default)]
    pub worker_connections: Vec<usize>,
    /// Why it has no listener (`fd_limit: …`, `bind: …`), when it has none.
    #[serde(default)]
    pub unserved: Option<String>,
    /// Connections closed because TCP keepalive found a peer dead.
    #[serde(default)]
    pub peers_dead: u64,
    /// Whether redirect rules are in place for its addresses.
    pub rules: bool,
    /// Scheduler in force (`rr`, `lc`, `sh`, `sed`, `nq`, `p2c`, `random`).
    pub scheduler: String,
    /// PROXY protocol header sent to backends: `off`, `v1` or `v2`.
    #[serde(default = "off")]
    pub proxy_protocol: String,
    /// ClientIP affinity timeout, if enabled.
    pub affinity_seconds: Option<u64>,
    /// Client connections accepted.
    pub accepted: u64,
    /// Client connections open.
    pub active: u64,
    /// Connections that reached a backend and ended.
    pub completed: u64,
    /// Connections with no reachable backend.
    pub failed: u64,
    /// Dial attempts after a connection's first.
    pub retries: u64,
    /// Dial attempts by result.
    pub dials: BTreeMap<String, u64>,
    /// Bytes client → backend.
    pub bytes_in: u64,
    /// Bytes backend → client.
    pub bytes_out: u64,
    /// UDP: datagrams client → backend.
    #[serde(default)]
    pub datagrams_in: u64,
    /// UDP: datagrams backend → client.
    #[serde(default)]
    pub datagrams_out: u64,
    /// UDP: sessions ended by the idle timeout.
    #[serde(default)]
    pub sessions_expired: u64,
    /// UDP: new clients dropped at the session cap.
    #[serde(default)]
    pub sessions_dropped: u64,
    /// Connect times, cumulative per bucket of
    /// [`StatusDoc::connect_buckets_le`] (as Prometheus' `le` buckets).
    #[serde(default)]
    pub connect_buckets: Vec<u64>,
    /// Connect times observed (the `+Inf` bucket).
    #[serde(default)]
    pub connect_count: u64,
    /// Backends: every endpoint of the port, in any condition.
    pub endpoints: Vec<EndpointStatus>,
    /// The endpoints (`IP:port`, `[IPv6]:port`) ClusterIP traffic goes to.
    #[serde(default)]
    pub internal_endpoints: Vec<String>,
    /// The endpoints external traffic (nodePort, external IPs, LB IPs) from
    /// outside the node goes to; empty when the port takes none. Traffic
    /// from this node's pods or the host goes to the cluster set.
    #[serde(default)]
    pub external_endpoints: Vec<String>,
    /// Why these endpoints (`zone hints (zone-a)`, `node-local`,
    /// `terminating fallback`, `hints ignored: …`, `no endpoints`, …).
    #[serde(default)]
    pub endpoint_choice: String,
    /// The Service's health-check node port, when it has one (the same on
    /// each of its ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckState>,
}

/// What one health-check node port reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckState {
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// This node's ready endpoints of the Service (distinct IPs): the
    /// answer is 200 when there is one and the proxy is healthy.
    pub local_endpoints: usize,
    /// Whether the port is listening.
    pub listening: bool,
    /// Why it is not, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StatusDoc {
    /// Shows each Service's health-check node port on its ports.
    pub fn attach_health_checks(&mut self, checks: &BTreeMap<(String, String), HealthCheckState>) {
        for s in &mut self.services {
            s.health_check = checks.get(&(s.namespace.clone(), s.name.clone())).cloned();
        }
    }
}

/// One backend of a service port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// ip:port.
    pub address: String,
    /// EndpointSlice conditions.
    pub ready: bool,
    /// Serving condition.
    pub serving: bool,
    /// Terminating condition.
    pub terminating: bool,
    /// Milliseconds of ejection left (0 = healthy).
    pub ejected_for_ms: u64,
    /// Connections open to it.
    pub active: u64,
    /// Connections established.
    pub total: u64,
    /// Failed dials.
    pub dial_failures: u64,
    /// Times ejected.
    pub ejections: u64,
    /// Bytes client → backend.
    pub bytes_in: u64,
    /// Bytes backend → client.
    pub bytes_out: u64,
    /// Smoothed connect time in microseconds (0 until measured).
    #[serde(default)]
    pub connect_us: u64,
}

fn off() -> String {
    "off".into()
}

/// Builds the document from the live services (`last_sync_ms` is the
/// caller's to fill: it lives in [`crate::admin::Health`]).
pub fn collect(services: &[ServiceView], iptables: &str) -> StatusDoc {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let rules_on = iptables == "synced";
    let services = services
        .iter()
        .map(|v| {
            let n = &v.service.name;
            let s = &v.service.stats;
            let spec = &v.spec;
            let (connect_buckets, connect_count, _) = s.connect_latency.snapshot();
            let routing = v.service.routing();
            let used = |t: Traffic| -> Vec<String> {
                v.service
                    .balancer_of(t)
                    .usable()
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            };
            let external: Vec<String> = spec
                .external_ips
                .iter()
                .chain(&spec.load_balancer_ips)
                .map(ToString::to_string)
                .collect();
            ServiceStatus {
                namespace: n.namespace.clone(),
                name: n.name.clone(),
                port_name: n.port_name.clone(),
                protocol: n.protocol.to_string(),
                port: spec.port,
                cluster_ips: spec.cluster_ips.iter().map(ToString::to_string).collect(),
                node_port: spec.node_port,
                rules: rules_on
                    && v.listener_port.is_some()
                    && !(spec.cluster_ips.is_empty() && external.is_empty()),
                external_ips: external,
                load_balancer_source_ranges: spec
                    .load_balancer_source_ranges
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                invalid_load_balancer_source_ranges: spec
                    .invalid_load_balancer_source_ranges
                    .clone(),
                listener_port: v.listener_port,
                listener_sockets: s.sockets.load(Relaxed) as usize,
                worker_connections: s
                    .dealer
                    .load()
                    .as_ref()
                    .map(|d| d.loads())
                    .unwrap_or_default(),
                unserved: v
                    .unserved
                    .as_ref()
                    .map(|u| format!("{}: {}", u.reason.as_str(), u.detail)),
                peers_dead: s.peers_dead.load(Relaxed),
                scheduler: v.service.balancer.scheduler().to_string(),
                proxy_protocol: v
                    .service
                    .proxy_protocol()
                    .map_or("off", |p| p.as_str())
                    .into(),
                affinity_seconds: spec.affinity.map(|a| a.timeout.as_secs()),
                accepted: s.accepted.load(Relaxed),
                active: s.active.load(Relaxed),
                completed: s.completed.load(Relaxed),
                failed: s.failed.load(Relaxed),
                retries: s.retries.load(Relaxed),
                dials: DialResult::ALL
                    .iter()
                    .map(|r| (r.as_str().to_string(), s.dials(*r)))
                    .collect(),
                bytes_in: s.bytes_in.load(Relaxed),
                bytes_out: s.bytes_out.load(Relaxed),
                datagrams_in: s.datagrams_in.load(Relaxed),
                datagrams_out: s.datagrams_out.load(Relaxed),
                sessions_expired: s.sessions_expired.load(Relaxed),
                sessions_dropped: s.sessions_dropped.load(Relaxed),
                connect_buckets,
                connect_count,
                endpoints: v
                    .service
                    .balancer
                    .endpoints()
                    .iter()
                    .map(|(e, b)| EndpointStatus {
                        address: e.addr.to_string(),
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                        ejected_for_ms: b.ejected_for_ms(),
                        active: b.active.load(Relaxed),
                        total: b.total.load(Relaxed),
                        dial_failures: b.dial_failures.load(Relaxed),
                        ejections: b.ejections.load(Relaxed),
                        bytes_in: b.bytes_in.load(Relaxed),
                        bytes_out: b.bytes_out.load(Relaxed),
                        connect_us: b.connect_us.load(Relaxed),
                    })
                    .collect(),
                internal_endpoints: used(Traffic::Internal),
                external_endpoints: if spec.externally_accessible() {
                    used(Traffic::External)
                } else {
                    Vec::new()
                },
                endpoint_choice: routing.reason.clone(),
                health_check: None,
            }
        })
        .collect();
    StatusDoc {
        iptables: iptables.into(),
        now_ms,
        last_sync_ms: 0,
        connect_buckets_le: crate::proxy::stats::CONNECT_BUCKETS.to_vec(),
        services,
    }
}

/// Human-readable byte count (`1.5K`, `20.0M`), as ipvsadm does.
fn human(n: f64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = n;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{}", v.round() as u64)
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// The first column of a service row: `ns/name:port VIP:port -> :listener`.
fn service_label(s: &ServiceStatus) -> String {
    let mut name = format!("{}/{}", s.namespace, s.name);
    if !s.port_name.is_empty() {
        let _ = write!(name, ":{}", s.port_name);
    }
    if let Some(ip) = s.cluster_ips.first() {
        match ip.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let _ = write!(name, " {}", SocketAddr::new(ip, s.port));
            }
            Err(_) => {
                let _ = write!(name, " {ip}:{}", s.port);
            }
        }
    }
    match s.listener_port {
        Some(p) => {
            let _ = write!(name, " -> :{p}");
        }
        None => match s.unserved.as_deref().and_then(|u| u.split(':').next()) {
            Some(reason) => {
                let _ = write!(name, " -> unserved ({reason})");
            }
            None => name.push_str(" -> unbound"),
        },
    }
    name
}

/// What traffic of `s` uses the endpoint at `address`, when not all of
/// it: ` (internal)`, ` (external)`, ` (unused)`, or nothing.
fn endpoint_use(s: &ServiceStatus, address: &str) -> &'static str {
    if s.endpoint_choice.is_empty() {
        return ""; // a document from before the choice was shown
    }
    let internal = s.internal_endpoints.iter().any(|a| a == address);
    let external = s.external_endpoints.iter().any(|a| a == address);
    let takes_external = s.node_port.is_some() || !s.external_ips.is_empty();
    match (internal, external || !takes_external) {
        (true, true) => "",
        (true, false) => " (internal)",
        (false, true) if takes_external => " (external)",
        _ => " (unused)",
    }
}

/// The Sched column of a service row: `rr`, `sh sticky`, `lc pp-v2`.
fn sched_label(s: &ServiceStatus) -> String {
    let mut out = s.scheduler.clone();
    if s.affinity_seconds.is_some() {
        out.push_str(" sticky");
    }
    if !matches!(s.proxy_protocol.as_str(), "" | "off") {
        let _ = write!(out, " pp-{}", s.proxy_protocol);
    }
    out
}

/// Renders the table. With `prev` (an earlier sample and the time between
/// them), the counters become rates per second (`--rate`). The first column
/// is as wide as its longest entry, so rows stay aligned.
pub fn render_table(doc: &StatusDoc, prev: Option<(&StatusDoc, Duration)>) -> String {
    let mut out = String::new();
    let rate = prev.is_some();
    let labels: Vec<String> = doc.services.iter().map(service_label).collect();
    let w = labels
        .iter()
        .map(String::len)
        .chain(
            doc.services
                .iter()
                .flat_map(|s| s.endpoints.iter().map(|e| e.address.len() + 3)),
        )
        .chain([24])
        .max()
        .unwrap_or(24);
    let _ = writeln!(out, "iptables: {}", doc.iptables);
    let (c1, c2, c3) = if rate {
        ("CPS", "InBPS", "OutBPS")
    } else {
        ("Conns", "InBytes", "OutBytes")
    };
    // Sched column: scheduler, then flags as ipvsadm's `persistent`.
    let scheds: Vec<String> = doc.services.iter().map(sched_label).collect();
    let sw = scheds.iter().map(String::len).chain([9]).max().unwrap_or(9);
    let row = |out: &mut String, prot: &str, first: &str, cols: [&str; 7]| {
        let _ = writeln!(
            out,
            "{prot:<5} {first:<w$} {:<sw$} {:>6} {:>8} {:>8} {:>8} {:>9} {:>9}",
            cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6]
        );
    };
    row(
        &mut out,
        "Prot",
        "Service -> Listener",
        ["Sched", "Active", c1, "Failed", "Retries", c2, c3],
    );
    row(
        &mut out,
        "",
        "  -> RemoteAddress:Port",
        ["State", "Active", c1, "DialErr", "Eject", c2, c3],
    );
    let secs = prev.map_or(1.0, |(_, d)| d.as_secs_f64().max(1e-3));
    let delta = |now: u64, before: Option<u64>| -> String {
        match before {
            Some(b) if rate => human(now.saturating_sub(b) as f64 / secs),
            _ if rate => human(0.0),
            _ => human(now as f64),
        }
    };
    for ((s, label), sched) in doc.services.iter().zip(&labels).zip(&scheds) {
        let before = prev.and_then(|(p, _)| {
            p.services.iter().find(|o| {
                o.namespace == s.namespace && o.name == s.name && o.port_name == s.port_name
            })
        });
        row(
            &mut out,
            &s.protocol,
            label,
            [
                sched,
                &s.active.to_string(),
                &delta(s.accepted, before.map(|b| b.accepted)),
                &delta(s.failed, before.map(|b| b.failed)),
                &delta(s.retries, before.map(|b| b.retries)),
                &delta(s.bytes_in, before.map(|b| b.bytes_in)),
                &delta(s.bytes_out, before.map(|b| b.bytes_out)),
            ],
        );
        if !s.endpoint_choice.is_empty() {
            let _ = writeln!(out, "{:5}   endpoint choice: {}", "", s.endpoint_choice);
        }
        if let Some(h) = &s.health_check {
            let state = match (&h.error, h.local_endpoints) {
                (Some(e), _) => format!("not listening: {e}"),
                (None, 0) => "no local ready endpoint: 503".into(),
                (None, n) => format!("{n} local ready endpoints"),
            };
            let _ = writeln!(out, "{:5}   health check :{}: {state}", "", h.port);
        }
        for e in &s.endpoints {
            let eb = before.and_then(|b| b.endpoints.iter().find(|o| o.address == e.address));
            let state = if e.ejected_for_ms > 0 {
                format!("ej {:.1}s", e.ejected_for_ms as f64 / 1000.0)
            } else if e.ready {
                "ready".into()
            } else if e.serving {
                "serving".into()
            } else {
                "down".into()
            };
            row(
                &mut out,
                "",
                &format!("  -> {}{}", e.address, endpoint_use(s, &e.address)),
                [
                    &state,
                    &e.active.to_string(),
                    &delta(e.total, eb.map(|b| b.total)),
                    &delta(e.dial_failures, eb.map(|b| b.dial_failures)),
                    &delta(e.ejections, eb.map(|b| b.ejections)),
                    &delta(e.bytes_in, eb.map(|b| b.bytes_in)),
                    &delta(e.bytes_out, eb.map(|b| b.bytes_out)),
                ],
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_without_a_listener_says_why_in_the_table() {
        let mut s = ServiceStatus {
            namespace: "ns".into(),
            name: "web".into(),
            cluster_ips: vec!["10.96.0.1".into()],
            port: 80,
            listener_port: Some(40_000),
            ..Default::default()
        };
        assert_eq!(service_label(&s), "ns/web 10.96.0.1:80 -> :40000");
        s.listener_port = None;
        assert_eq!(service_label(&s), "ns/web 10.96.0.1:80 -> unbound");
        s.unserved = Some("fd_limit: fd limit: RLIMIT_NOFILE 400 holds no more listeners".into());
        assert_eq!(
            service_label(&s),
            "ns/web 10.96.0.1:80 -> unserved (fd_limit)"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human(999.0), "999");
        assert_eq!(human(1500.0), "1.5K");
        assert_eq!(human(20_000_000.0), "20.0M");
    }
}

/// Fetches `/debug/services` from a running proxy (plain HTTP/1.1 GET).
pub async fn fetch(admin: SocketAddr) -> anyhow::Result<StatusDoc> {
    use anyhow::Context as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(admin),
    )
    .await
    .with_context(|| format!("--admin {admin}: connect timed out"))?
    .with_context(|| {
        format!("--admin {admin}: is the proxy running with this --metrics-bind-address?")
    })?;
    s.write_all(
        format!("GET /debug/services HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .context("reading /debug/services timed out")??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer from the admin address")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "admin address answered: {}",
        head.lines().next().unwrap_or("")
    );
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    serde_json::from_str(&body).context("/debug/services is not the expected JSON")
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `kube-userspace-proxy status`.
pub async fn run(args: crate::cli::StatusArgs) -> anyhow::Result<()> {
    use crate::cli::OutputFormat;
    let mut prev: Option<(StatusDoc, std::time::Instant)> = None;
    if args.rate {
        prev = Some((fetch(args.admin).await?, std::time::Instant::now()));
        tokio::time::sleep(args.interval).await;
    }
    loop {
        let doc = fetch(args.admin).await?;
        let now = std::time::Instant::now();
        let text = match args.output {
            OutputFormat::Json => format!("{}\n", serde_json::to_string_pretty(&doc)?),
            OutputFormat::Table => {
                let p = prev
                    .as_ref()
                    .filter(|_| args.rate)
                    .map(|(d, t)| (d, now.duration_since(*t)));
                render_table(&doc, p)
            }
        };
        if args.watch {
            print!("\x1b[2J\x1b[H");
        }
        print!("{text}");
        if !args.watch {
            return Ok(());
        }
        prev = Some((doc, now));
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = crate::shutdown_signal() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod client_tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"), "Wikipedia");
    }
}
