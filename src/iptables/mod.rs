//! The small iptables redirect: ClusterIP, externalIP and LoadBalancer-IP
//! traffic is REDIRECTed to the listeners from chains we own in the `nat`
//! table, and traffic of ports without endpoints is REJECTed or DROPped
//! from chains we own in the `filter` table, as upstream's iptables proxier
//! does; listeners without a nodePort take only redirected traffic (see
//! [`render`] for the rules, [`exec`] for running the tools).
//!
//! Every apply is one `iptables-restore --noflush --wait` per family with
//! both tables, touching only our chains and our jump rules (kept at
//! exactly one each). A failed apply leaves the previous rules in place
//! (with the legacy backend, a table committed before the failing one
//! stays applied), is logged with the offending line and counted; the
//! proxy keeps serving.

pub mod exec;
mod portals;
pub mod render;

pub use portals::{dispositions, portals};

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use exec::{BackendChoice, Tool};
use render::Rules;

use crate::detect_local::Detector;

/// `--iptables`: whether to manage rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// On when the tools and CAP_NET_ADMIN are there; else off, with a log line.
    #[default]
    Auto,
    /// Required: start-up fails when rules cannot be managed.
    On,
    /// No rules: only NodePort traffic, and direct connections to every
    /// listener's own port (none is closed: the demo and laptop mode).
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
    /// The family whose apply failed last (`0`: IPv4, `1`: IPv6).
    pub failed_family: usize,
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

/// Renders the payloads a fresh start would apply (IPv4, then IPv6 if any
/// IPv6 portal, or any nodePort rule and an IPv6 `bind`), for
/// `kube-userspace-proxy rules`; `detector` is the one in force.
pub fn preview(rules: &Rules, bind: IpAddr, detector: &Detector) -> String {
    let none = render::JumpState::default();
    let mut out = format!(
        "# iptables-restore --noflush\n{}",
        render::render(rules, false, bind, detector, &none)
    );
    if wants_v6(rules, bind) {
        out.push_str("# ip6tables-restore --noflush\n");
        out.push_str(&render::render(rules, true, bind, detector, &none));
    }
    out
}

/// Whether IPv6 rules are wanted: an IPv6 service address, or nodePort or
/// internal-listener rules while the listeners take IPv6 (`bind` is an
/// IPv6 address, e.g. `::`); with an IPv4 `bind` no IPv6 client reaches a
/// listener anyway.
fn wants_v6(rules: &Rules, bind: IpAddr) -> bool {
    rules.portals.iter().any(|p| p.ip.is_ipv6()) || (bind.is_ipv6() && rules.has_family(true))
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
            tracing::info!("--iptables off: no rules; only NodePort traffic and direct connections to the listeners' ports reach the proxy");
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
            tracing::warn!(error = %e, "--iptables auto: cannot manage rules (tool missing or no CAP_NET_ADMIN); continuing without them, only NodePort traffic and direct connections to the listeners' ports reach the proxy");
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

    /// Makes the live rules match `rules`, pods told apart by `detector`.
    /// Unless `force` (the periodic repair), a family whose payload is
    /// unchanged is skipped.
    pub async fn sync(
        &mut self,
        rules: &Rules,
        detector: &Detector,
        force: bool,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let result = self.sync_families(rules, detector, force).await;
        self.stats.last_duration = started.elapsed();
        match result {
            Ok(()) => {
                self.stats.syncs += 1;
                self.stats.last_sync = Some(SystemTime::now());
                Ok(())
            }
            Err((family, e)) => {
                self.stats.failures += 1;
                self.stats.failed_family = family;
                Err(e)
            }
        }
    }

    /// [`Self::sync`]; an error comes with the index of its family.
    async fn sync_families(
        &mut self,
        rules: &Rules,
        detector: &Detector,
        force: bool,
    ) -> Result<(), (usize, Error)> {
        let has_v6 = wants_v6(rules, self.bind);
        for (i, v6) in [(0, false), (1, true)] {
            let tool = if v6 {
                match &self.v6 {
                    Some(t) if has_v6 || self.last[1].is_some() => t.clone(),
                    _ => continue,
                }
            } else {
                self.v4.clone()
            };
            let saved = tool.save_ours().await.map_err(|e| (i, e))?;
            let jumps = render::find_jumps(&saved);
            let payload = render::render(rules, v6, self.bind, detector, &jumps);
            if !force && self.last[i].as_deref() == Some(payload.as_str()) {
                continue;
            }
            tool.restore(&payload).await.map_err(|e| (i, e))?;
            // What a re-render finds next time: the jumps exactly once.
            let settled = render::JumpState::settled();
            self.last[i] = Some(render::render(rules, v6, self.bind, detector, &settled));
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
        let saved = tool.save_ours().await?;
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

#[cfg(test)]
mod tests {
    use super::render::{Disposition, InternalListener, NodePort, Portal, PortalKind};
    use super::*;

    #[test]
    fn ipv6_rules_only_when_wanted() {
        let v4: Rules = vec![Portal {
            ip: "10.96.0.1".parse().unwrap(),
            port: 80,
            protocol: crate::model::Protocol::Tcp,
            listener_port: 1,
            kind: PortalKind::ClusterIp,
            comment: "ns/a:b".into(),
            disposition: Disposition::Redirect,
            source_ranges: Vec::new(),
        }]
        .into();
        let any4: IpAddr = "0.0.0.0".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        assert!(!wants_v6(&v4, any4) && !wants_v6(&v4, any6));
        let np = Rules {
            node_ports: vec![NodePort {
                port: 30080,
                protocol: crate::model::Protocol::Tcp,
                comment: "ns/a:b".into(),
                disposition: Disposition::Reject,
            }],
            ..v4
        };
        assert!(!wants_v6(&np, any4) && wants_v6(&np, any6));
        // Internal listeners too: a `::` bind takes IPv6 clients.
        let listeners = Rules {
            listeners: vec![InternalListener {
                port: 40000,
                protocol: crate::model::Protocol::Udp,
                comment: "ns/a:b".into(),
            }],
            ..Rules::default()
        };
        assert!(!wants_v6(&listeners, any4) && wants_v6(&listeners, any6));
        let preview = preview(&np, any6, &Detector::default());
        assert!(
            preview.contains("# ip6tables-restore --noflush\n*nat\n"),
            "{preview}"
        );
        assert_eq!(preview.matches("has no endpoints\" -j REJECT").count(), 2);
    }
}
