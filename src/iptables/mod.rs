//! The small iptables redirect: ClusterIP, externalIP and LoadBalancer-IP
//! traffic is REDIRECTed to the listeners from chains we own in the `nat`
//! table (see [`render`] for the rules, [`exec`] for running the tools).
//!
//! Every apply is one `iptables-restore --noflush --wait`: atomic, touching
//! only our chains and our two jump rules (kept at exactly one each). A
//! failed apply leaves the previous rules in place, is logged with the
//! offending line and counted; the proxy keeps serving.

pub mod exec;
pub mod render;

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use exec::{BackendChoice, Tool};
use render::{Portal, PortalKind};

use crate::proxy::Proxier;

/// `--iptables`: whether to manage rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// On when the tools and CAP_NET_ADMIN are there; else off, with a log line.
    #[default]
    Auto,
    /// Required: start-up fails when rules cannot be managed.
    On,
    /// No rules: NodePort traffic only.
    Off,
}

/// Errors of the iptables tools.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command could not be run at all.
    #[error("cannot run {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    /// The command ran and failed.
    #[error("{command} failed: {stderr}{}", line.as_ref().map(|l| format!(" (at: {l})")).unwrap_or_default())]
    Failed {
        /// The command.
        command: String,
        /// What it printed on stderr.
        stderr: String,
        /// The payload line it named, if any.
        line: Option<String>,
    },
}

/// Counters and timings of rule syncs, for metrics and healthz.
#[derive(Clone, Debug, Default)]
pub struct SyncStats {
    /// Applies that succeeded.
    pub syncs: u64,
    /// Applies that failed.
    pub failures: u64,
    /// Wall-clock time of the last successful sync.
    pub last_sync: Option<SystemTime>,
    /// Duration of the last sync attempt.
    pub last_duration: Duration,
}

/// The rule manager: tools per family and what was last applied.
#[derive(Debug)]
pub struct Iptables {
    v4: Tool,
    v6: Option<Tool>,
    bind: IpAddr,
    last: [Option<String>; 2],
    /// Sync counters.
    pub stats: SyncStats,
}

/// Every service address that should reach a bound listener.
pub fn portals(proxier: &Proxier) -> Vec<Portal> {
    let mut out = Vec::new();
    for (service, spec, port) in proxier.services() {
        let Some(listener_port) = port else { continue };
        let kinds = [
            (&spec.cluster_ips, PortalKind::ClusterIp),
            (&spec.external_ips, PortalKind::ExternalIp),
            (&spec.load_balancer_ips, PortalKind::LoadBalancerIp),
        ];
        for (ips, kind) in kinds {
            for ip in ips {
                out.push(Portal {
                    ip: *ip,
                    port: spec.port,
                    protocol: service.name.protocol,
                    listener_port,
                    kind,
                    comment: service.name.to_string(),
                });
            }
        }
    }
    out
}

/// Renders the payloads a fresh start would apply (IPv4, then IPv6 if any
/// IPv6 portal), for `kube-userspace-proxy rules`.
pub fn preview(portals: &[Portal], bind: IpAddr) -> String {
    let none = render::JumpState::default();
    let mut out = format!(
        "# iptables-restore --noflush\n{}",
        render::render(portals, false, bind, &none)
    );
    if portals.iter().any(|p| p.ip.is_ipv6()) {
        out.push_str("# ip6tables-restore --noflush\n");
        out.push_str(&render::render(portals, true, bind, &none));
    }
    out
}

impl Iptables {
    /// Sets up rule management per `--iptables`: `Ok(None)` when off (or
    /// auto without the tools or privileges), an error when `on` cannot work.
    pub async fn setup(
        mode: Mode,
        backend: BackendChoice,
        bind: IpAddr,
    ) -> Result<Option<Self>, Error> {
        if mode == Mode::Off {
            tracing::info!("--iptables off: no rules; only NodePort traffic reaches the proxy");
            return Ok(None);
        }
        let v4 = exec::detect(backend, false).await;
        let probe = if exec::exists(&v4.restore) {
            v4.save_nat().await.map(|_| ())
        } else {
            Err(Error::Spawn(
                v4.restore.clone(),
                std::io::Error::new(std::io::ErrorKind::NotFound, "not found on PATH"),
            ))
        };
        if let Err(e) = probe {
            if mode == Mode::On {
                return Err(e);
            }
            tracing::warn!(error = %e, "--iptables auto: cannot manage rules (tool missing or no CAP_NET_ADMIN); continuing without them, only NodePort traffic reaches the proxy");
            return Ok(None);
        }
        let v6 = exec::detect(backend, true).await;
        let v6 = exec::exists(&v6.restore).then_some(v6);
        tracing::info!(restore = %v4.restore, ipv6 = v6.is_some(), "iptables rules managed");
        Ok(Some(Self {
            v4,
            v6,
            bind,
            last: [None, None],
            stats: SyncStats::default(),
        }))
    }

    /// Makes the live rules match `portals`. Unless `force` (the periodic
    /// repair), a family whose payload is unchanged is skipped.
    pub async fn sync(&mut self, portals: &[Portal], force: bool) -> Result<(), Error> {
        let started = Instant::now();
        let result = self.sync_families(portals, force).await;
        self.stats.last_duration = started.elapsed();
        match &result {
            Ok(()) => {
                self.stats.syncs += 1;
                self.stats.last_sync = Some(SystemTime::now());
            }
            Err(_) => self.stats.failures += 1,
        }
        result
    }

    async fn sync_families(&mut self, portals: &[Portal], force: bool) -> Result<(), Error> {
        let has_v6 = portals.iter().any(|p| p.ip.is_ipv6());
        for (i, v6) in [(0, false), (1, true)] {
            let tool = if v6 {
                match &self.v6 {
                    Some(t) if has_v6 || self.last[1].is_some() => t.clone(),
                    _ => continue,
                }
            } else {
                self.v4.clone()
            };
            let saved = tool.save_nat().await?;
            let jumps = render::find_jumps(&saved);
            let payload = render::render(portals, v6, self.bind, &jumps);
            if !force && self.last[i].as_deref() == Some(payload.as_str()) {
                continue;
            }
            tool.restore(&payload).await?;
            // What a re-render finds next time: the jumps exactly once.
            let settled = render::JumpState {
                found: [vec![String::new()], vec![String::new()]],
            };
            self.last[i] = Some(render::render(portals, v6, self.bind, &settled));
        }
        Ok(())
    }

    /// Removes our chains and jumps, for shutdown.
    pub async fn cleanup(&self) -> Result<(), Error> {
        cleanup_tools(std::iter::once(&self.v4).chain(self.v6.as_ref())).await
    }
}

async fn cleanup_tools<'a>(tools: impl Iterator<Item = &'a Tool>) -> Result<(), Error> {
    for tool in tools {
        let saved = tool.save_nat().await?;
        if let Some(payload) = render::render_cleanup(&saved) {
            tool.restore(&payload).await?;
        }
    }
    Ok(())
}

/// `--cleanup`: removes our chains and jumps (also a crashed run's
/// leftovers) from both families and every backend that has them.
pub async fn cleanup_all(backend: BackendChoice) -> Result<(), Error> {
    let mut tools = Vec::new();
    for v6 in [false, true] {
        let candidates: Vec<Tool> = match backend {
            BackendChoice::Auto => {
                let both = [
                    exec::detect(BackendChoice::Legacy, v6).await,
                    exec::detect(BackendChoice::Nft, v6).await,
                ];
                let found: Vec<Tool> = both.into_iter().filter(|t| exec::exists(&t.save)).collect();
                if found.is_empty() {
                    vec![exec::detect(BackendChoice::Auto, v6).await]
                } else {
                    found
                }
            }
            other => vec![exec::detect(other, v6).await],
        };
        tools.extend(candidates.into_iter().filter(|t| exec::exists(&t.save)));
    }
    if tools.is_empty() {
        return Err(Error::Spawn(
            "iptables-save".into(),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no iptables tools on PATH"),
        ));
    }
    cleanup_tools(tools.iter()).await
}
