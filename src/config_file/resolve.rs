//! How `--config` is read and applied under the flags (see the module
//! map in `mod.rs`).

use std::fmt::Display;
use std::io::Read;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, ValueEnum};

use super::duration::GoDuration;
use super::schema::KubeProxyConfiguration;
use crate::cli::{Cidrs, Cli, Command, LogFormat, NodePortAddresses, RunArgs};
use crate::cli::{HEALTHZ_PORT, METRICS_PORT};
use crate::proxy::ports::PortRange;
use crate::ConfigError;

/// The one `apiVersion` read (kube-proxy's only external version).
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";

/// The one `kind` read.
pub const KIND: &str = "KubeProxyConfiguration";

/// A configuration file larger than this is refused unread.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Parses the command line (a bad flag exits as clap does) and applies
/// `--config`.
pub fn parse() -> Result<(Cli, Notes), ConfigError> {
    resolve(&Cli::command().get_matches())
}

/// The command line of `matches` with its `--config` file applied (for
/// the proxy and `rules`), and what to log about it once logging is up.
pub fn resolve(matches: &ArgMatches) -> Result<(Cli, Notes), ConfigError> {
    let mut cli = Cli::from_arg_matches(matches).map_err(|e| ConfigError(e.to_string()))?;
    let sub = |name| matches.subcommand_matches(name).unwrap_or(matches);
    let notes = match &mut cli.command {
        None => apply(&mut cli.run, matches)?,
        Some(Command::Run(args)) => apply(args, sub("run"))?,
        Some(Command::Rules(args)) => apply(args, sub("rules"))?,
        Some(Command::Demo(_) | Command::Status(_)) => Notes::default(),
    };
    Ok((cli, notes))
}

/// What [`resolve`] found worth saying; [`Notes::log`] says it.
#[derive(Debug, Default)]
pub struct Notes(Vec<Note>);

/// One thing to log about the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// The file was read; these fields of it set a flag's value.
    Applied {
        /// The `--config` path.
        file: PathBuf,
        /// The fields taken, by path (`iptables.syncPeriod`).
        fields: Vec<&'static str>,
    },
    /// A flag on the command line won over the file's field.
    Overridden {
        /// The flag (`--hostname-override`).
        flag: String,
        /// The file's field (`hostnameOverride`).
        field: &'static str,
    },
    /// A field set to something other than its default that a userspace
    /// proxy has no use for.
    Ignored {
        /// The field's path (`ipvs.scheduler`).
        field: &'static str,
        /// Its value, as read.
        value: String,
    },
    /// `mode` names one of kube-proxy's kernel modes: served in userspace
    /// behind iptables REDIRECT all the same.
    KernelMode {
        /// The file's `mode`.
        mode: String,
    },
}

impl Notes {
    /// The notes, in the order found.
    pub fn as_slice(&self) -> &[Note] {
        &self.0
    }

    /// Logs each note once (info, or warn for what is not honoured).
    pub fn log(&self) {
        for note in &self.0 {
            match note {
                Note::Applied { file, fields } => tracing::info!(
                    file = %file.display(),
                    fields = %fields.join(", "),
                    "configuration file applied (flags on the command line win over its fields)"
                ),
                Note::Overridden { flag, field } => {
                    tracing::info!(flag = %flag, field, "flag given: the config file's field is overridden")
                }
                Note::Ignored { field, value } => tracing::warn!(
                    field,
                    value = %value,
                    "config file: field ignored: it has no meaning for a userspace proxy"
                ),
                Note::KernelMode { mode } => tracing::warn!(
                    mode = %mode,
                    "config file: mode {mode:?} is one of kube-proxy's kernel modes; this proxy serves in userspace behind iptables REDIRECT rules all the same (remove the old proxy's {mode} state from nodes)"
                ),
            }
        }
    }
}

/// Applies `args.config` (if any) to `args`, `m` telling which flags the
/// command line gave.
fn apply(args: &mut RunArgs, m: &ArgMatches) -> Result<Notes, ConfigError> {
    let mut notes = Notes::default();
    if let Some(path) = args.config.clone() {
        let file = load(&path)?;
        let mut merge = Merge {
            matches: m,
            args,
            file: &path,
            fields: Vec::new(),
            from_file: Vec::new(),
            notes: Vec::new(),
        };
        merge.file_fields(&file)?;
        merge.check()?;
        notes.0.push(Note::Applied {
            fields: merge.from_file.iter().map(|(_, field)| *field).collect(),
            file: path.clone(),
        });
        notes.0.append(&mut merge.notes);
        notes.0.extend(
            ignored(&file)
                .into_iter()
                .map(|(field, value)| Note::Ignored { field, value }),
        );
    }
    Ok(notes)
}

/// Reads and decodes the file: YAML (or JSON) within the manifests'
/// parser budgets, `apiVersion` and `kind` checked, then the schema.
fn load(path: &Path) -> Result<KubeProxyConfiguration, ConfigError> {
    let at = |field: &str, msg: &dyn Display| match field {
        "" | "." => ConfigError(format!("{}: {msg}", path.display())),
        _ => ConfigError(format!("{}: {field}: {msg}", path.display())),
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| at("", &e))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(at("", &format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    let value = crate::discovery::manifests::decode(&text).map_err(|e| at("", &e))?;
    if !value.is_object() {
        return Err(at("", &format!("not a {KIND} (a YAML or JSON mapping)")));
    }
    for (field, want) in [("apiVersion", API_VERSION), ("kind", KIND)] {
        match value.get(field) {
            Some(serde_json::Value::String(s)) if s == want => {}
            Some(other) => return Err(at(field, &format!("{other} is not {want:?}"))),
            None => return Err(at(field, &format!("missing (want {want:?})"))),
        }
    }
    serde_path_to_error::deserialize(value).map_err(|e| at(&e.path().to_string(), e.inner()))
}

/// The file's fields going into the flags, one flag at a time.
struct Merge<'a> {
    matches: &'a ArgMatches,
    args: &'a mut RunArgs,
    file: &'a Path,
    /// Every flag id with a field, and the field.
    fields: Vec<(&'static str, &'static str)>,
    /// Flag ids set from the file, with the field each came from.
    from_file: Vec<(&'static str, &'static str)>,
    notes: Vec<Note>,
}

/// `field`'s value from the file goes into the flag named like the
/// `RunArgs` field, unless the command line gave that flag.
macro_rules! set {
    ($merge:expr, $field:literal => $flag:ident, $value:expr) => {
        $merge.set(stringify!($flag), $field, $value, |a| &mut a.$flag)
    };
}

impl Merge<'_> {
    /// Whether the command line (or an environment variable) gave flag `id`.
    fn explicit(&self, id: &str) -> bool {
        matches!(
            self.matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }

    /// Sets flag `id` to the file's `value` (`None`: the field is at its
    /// default) unless the command line gave it.
    fn set<T>(
        &mut self,
        id: &'static str,
        field: &'static str,
        value: Option<T>,
        slot: impl FnOnce(&mut RunArgs) -> &mut T,
    ) {
        self.fields.push((id, field));
        let Some(value) = value else { return };
        if self.explicit(id) {
            self.notes.push(Note::Overridden {
                flag: format!("--{}", id.replace('_', "-")),
                field,
            });
        } else {
            *slot(self.args) = value;
            self.from_file.push((id, field));
        }
    }

    /// An error about `field` of the file.
    fn error(&self, field: &str, msg: impl Display) -> ConfigError {
        ConfigError(format!("{}: {field}: {msg}", self.file.display()))
    }

    /// The file's field that sets flag `id`, unless the command line gave it.
    fn field_of(&self, id: &str) -> Option<&'static str> {
        (!self.explicit(id))
            .then(|| self.fields.iter().find(|(i, _)| *i == id).map(|(_, f)| *f))
            .flatten()
    }

    /// How a message names flag `flag`'s value: by the file's field, unless
    /// the command line gave the flag.
    fn name(&self, flag: &'static str) -> String {
        let id = flag.trim_start_matches('-').replace('-', "_");
        self.field_of(&id).unwrap_or(flag).to_string()
    }

    /// `e`, prefixed with the file when it names one of its fields (any
    /// of `ids` not given on the command line).
    fn named(&self, e: String, ids: &[&str]) -> ConfigError {
        if ids.iter().any(|id| self.field_of(id).is_some()) {
            ConfigError(format!("{}: {e}", self.file.display()))
        } else {
            ConfigError(e)
        }
    }

    /// Every field with a flag here, converted and checked (the error
    /// names the field), then set unless the command line gave the flag.
    fn file_fields(&mut self, f: &KubeProxyConfiguration) -> Result<(), ConfigError> {
        let cc = f.client_connection.clone().unwrap_or_default();
        let ipt = f.iptables.clone().unwrap_or_default();
        let dl = f.detect_local.clone().unwrap_or_default();
        let log = f.logging.clone().unwrap_or_default();

        set!(self, "hostnameOverride" => hostname_override,
            text(&f.hostname_override).map(|s| Some(s.to_string())));
        set!(self, "clientConnection.kubeconfig" => kubeconfig,
            text(&cc.kubeconfig).map(|s| Some(PathBuf::from(s))));

        let bind = text(&f.bind_address)
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|e| self.error("bindAddress", format!("{s:?}: {e}")))
            })
            .transpose()?;
        set!(self, "bindAddress" => bind_address, bind);
        // Upstream's admin defaults follow the file's bindAddress's family.
        let v6 = bind.is_some_and(|ip| ip.is_ipv6()) && !self.explicit("bind_address");
        let healthz = self
            .host_port("healthzBindAddress", &f.healthz_bind_address, HEALTHZ_PORT)?
            .or(v6.then(|| SocketAddr::from((Ipv6Addr::UNSPECIFIED, HEALTHZ_PORT))));
        set!(self, "healthzBindAddress" => healthz_bind_address, healthz);
        let metrics = self
            .host_port("metricsBindAddress", &f.metrics_bind_address, METRICS_PORT)?
            .or(v6.then(|| SocketAddr::from((Ipv6Addr::LOCALHOST, METRICS_PORT))));
        set!(self, "metricsBindAddress" => metrics_bind_address, metrics);

        let cidrs = text(&f.cluster_cidr)
            .map(crate::detect_local::parse_cidrs)
            .transpose()
            .map_err(|e| self.error("clusterCIDR", e))?;
        set!(self, "clusterCIDR" => cluster_cidr, cidrs.map(Cidrs));
        let mode = self.variant("detectLocalMode", &f.detect_local_mode)?;
        set!(self, "detectLocalMode" => detect_local_mode, mode);
        set!(self, "detectLocal.bridgeInterface" => pod_bridge_interface,
            text(&dl.bridge_interface).map(String::from));
        set!(self, "detectLocal.interfaceNamePrefix" => pod_interface_name_prefix,
            text(&dl.interface_name_prefix).map(String::from));

        let sync = self.duration("iptables.syncPeriod", ipt.sync_period)?;
        set!(self, "iptables.syncPeriod" => iptables_sync_period, sync);
        let min_sync = self.duration("iptables.minSyncPeriod", ipt.min_sync_period)?;
        set!(self, "iptables.minSyncPeriod" => iptables_min_sync_period, min_sync);
        let udp = self.duration("udpIdleTimeout", f.udp_idle_timeout)?;
        set!(self, "udpIdleTimeout" => udp_timeout, udp);

        let nodeport = match f.node_port_addresses.as_deref() {
            None | Some([]) => None,
            Some(list) => Some(
                NodePortAddresses::new(list.iter().map(|a| a.trim().to_string()).collect())
                    .map_err(|(i, e)| self.error(&format!("nodePortAddresses[{i}]"), e))?,
            ),
        };
        set!(self, "nodePortAddresses" => nodeport_addresses, nodeport);
        let ports = text(&f.port_range)
            .map(str::parse::<PortRange>)
            .transpose()
            .map_err(|e| self.error("portRange", e))?;
        set!(self, "portRange" => proxy_port_range, ports);

        let format = self.variant::<LogFormat>("logging.format", &log.format)?;
        self.set("log_format", "logging.format", format, |a| {
            &mut a.log.log_format
        });

        match text(&f.mode).unwrap_or_default() {
            "" | "iptables" | "userspace" => Ok(()),
            mode @ ("ipvs" | "nftables") => {
                self.notes.push(Note::KernelMode { mode: mode.into() });
                Ok(())
            }
            "kernelspace" => Err(self.error(
                "mode",
                "\"kernelspace\" is kube-proxy's Windows mode; this proxy runs on Linux (iptables REDIRECT to userspace listeners)",
            )),
            other => Err(self.error(
                "mode",
                unsupported(other, ["iptables", "userspace", "ipvs", "nftables", ""]),
            )),
        }
    }

    /// Checks across fields, on the values in force: the detector's, and
    /// the iptables periods when the file set one of them.
    fn check(&self) -> Result<(), ConfigError> {
        self.args
            .detect_local()
            .validate_named(&|flag| self.name(flag))
            .map_err(|e| {
                self.named(
                    e,
                    &[
                        "detect_local_mode",
                        "cluster_cidr",
                        "pod_bridge_interface",
                        "pod_interface_name_prefix",
                    ],
                )
            })?;
        let (min, period) = (
            self.args.iptables_min_sync_period,
            self.args.iptables_sync_period,
        );
        let ids = ["iptables_min_sync_period", "iptables_sync_period"];
        let from_file = self.from_file.iter().any(|(id, _)| ids.contains(id));
        if min > period && from_file {
            return Err(self.named(
                format!(
                    "{} ({min:?}) is above {} ({period:?})",
                    self.name("--iptables-min-sync-period"),
                    self.name("--iptables-sync-period")
                ),
                &ids,
            ));
        }
        Ok(())
    }

    /// `host:port`, or an address alone with `port` added (upstream's
    /// `AppendPortIfNeeded`); empty: `None`.
    fn host_port(
        &self,
        field: &'static str,
        v: &Option<String>,
        port: u16,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(s) = text(v) else { return Ok(None) };
        let addr = s
            .parse::<SocketAddr>()
            .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, port)))
            .map_err(|_| self.error(field, format!("{s:?} is not IP:port or an IP")))?;
        if addr.port() == 0 {
            return Err(self.error(field, format!("{s:?}: port 0 is not a valid port")));
        }
        Ok(Some(addr))
    }

    /// One of a flag's values, spelled as the flag takes it; blank: `None`.
    fn variant<T: ValueEnum>(
        &self,
        field: &'static str,
        v: &Option<String>,
    ) -> Result<Option<T>, ConfigError> {
        let Some(s) = text(v) else { return Ok(None) };
        T::from_str(s, false).map(Some).map_err(|_| {
            let names: Vec<String> = T::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value())
                .map(|p| p.get_name().to_string())
                .collect();
            self.error(field, unsupported(s, names.iter().map(String::as_str)))
        })
    }

    /// A duration; zero is the default (`None`), negative an error.
    fn duration(
        &self,
        field: &'static str,
        v: Option<GoDuration>,
    ) -> Result<Option<Duration>, ConfigError> {
        match v {
            None | Some(GoDuration(0)) => Ok(None),
            Some(d) => d
                .to_std()
                .map(Some)
                .ok_or_else(|| self.error(field, format!("{d} is negative"))),
        }
    }
}

/// A string field, trimmed; `None` when absent, null or blank.
fn text(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Upstream's `NotSupported` wording.
fn unsupported<'a>(value: &str, valid: impl IntoIterator<Item = &'a str>) -> String {
    let valid: Vec<String> = valid.into_iter().map(|v| format!("{v:?}")).collect();
    format!(
        "unsupported value {value:?}: supported values: {}",
        valid.join(", ")
    )
}

/// Fields a userspace proxy has no use for, with their value, when it is
/// neither zero nor upstream's default (kube-proxy's `defaults.go`, and the
/// logs and client defaults), so that kubeadm's rendering (zeros) and an
/// older one with every default filled in log nothing.
fn ignored(f: &KubeProxyConfiguration) -> Vec<(&'static str, String)> {
    const S: i64 = 1_000_000_000;
    let mut out = Vec::new();
    let mut note = |field: &'static str, value: Option<String>| {
        if let Some(v) = value {
            out.push((field, v));
        }
    };
    let cc = f.client_connection.clone().unwrap_or_default();
    let log = f.logging.clone().unwrap_or_default();
    let ipt = f.iptables.clone().unwrap_or_default();
    let ipvs = f.ipvs.clone().unwrap_or_default();
    let nft = f.nftables.clone().unwrap_or_default();
    let win = f.winkernel.clone().unwrap_or_default();
    let ct = f.conntrack.clone().unwrap_or_default();
    let dur = |v: Option<GoDuration>, default_secs: i64| {
        differs(&v, &[GoDuration(0), GoDuration(default_secs * S)])
    };

    note(
        "featureGates",
        f.feature_gates.as_ref().filter(|g| !g.is_empty()).map(|g| {
            g.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        }),
    );
    note(
        "clientConnection.acceptContentTypes",
        differs_text(&cc.accept_content_types, &[]),
    );
    note(
        "clientConnection.contentType",
        differs_text(&cc.content_type, &["application/vnd.kubernetes.protobuf"]),
    );
    note("clientConnection.qps", differs(&cc.qps, &[0.0, 5.0]));
    note("clientConnection.burst", differs(&cc.burst, &[0, 10]));
    note(
        "logging.flushFrequency",
        differs(
            &log.flush_frequency.map(|f| f.0),
            &[GoDuration(0), GoDuration(5 * S)],
        ),
    );
    note("logging.verbosity", differs(&log.verbosity, &[0]));
    note(
        "logging.vmodule",
        log.vmodule.filter(|v| !v.is_empty()).map(|v| {
            v.iter()
                .map(|m| {
                    format!(
                        "{}={}",
                        m.file_pattern.as_deref().unwrap_or_default(),
                        m.verbosity.unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        }),
    );
    note("logging.sanitization", differs(&log.sanitization, &[false]));
    let opts = log.options.unwrap_or_default();
    for (name, o) in [("text", opts.text), ("json", opts.json)] {
        let o = o.unwrap_or_default();
        let (split, size) = match name {
            "text" => (
                "logging.options.text.splitStream",
                "logging.options.text.infoBufferSize",
            ),
            _ => (
                "logging.options.json.splitStream",
                "logging.options.json.infoBufferSize",
            ),
        };
        note(split, differs(&o.split_stream, &[false]));
        note(size, differs_text(&o.info_buffer_size.map(|q| q.0), &["0"]));
    }
    note(
        "bindAddressHardFail",
        differs(&f.bind_address_hard_fail, &[false]),
    );
    note("enableProfiling", differs(&f.enable_profiling, &[false]));
    note(
        "showHiddenMetricsForVersion",
        differs_text(&f.show_hidden_metrics_for_version, &[]),
    );
    note(
        "iptables.masqueradeBit",
        differs(&ipt.masquerade_bit, &[14]),
    );
    note(
        "iptables.masqueradeAll",
        differs(&ipt.masquerade_all, &[false]),
    );
    note(
        "iptables.localhostNodePorts",
        differs(&ipt.localhost_node_ports, &[true]),
    );
    note(
        "iptables.snatNodeInternalIP",
        differs(&ipt.snat_node_internal_ip, &[false]),
    );
    note("ipvs.syncPeriod", dur(ipvs.sync_period, 30));
    note("ipvs.minSyncPeriod", dur(ipvs.min_sync_period, 0));
    note("ipvs.scheduler", differs_text(&ipvs.scheduler, &[]));
    note(
        "ipvs.excludeCIDRs",
        ipvs.exclude_cidrs
            .filter(|v| !v.is_empty())
            .map(|v| v.join(",")),
    );
    note("ipvs.strictARP", differs(&ipvs.strict_arp, &[false]));
    note("ipvs.tcpTimeout", dur(ipvs.tcp_timeout, 0));
    note("ipvs.tcpFinTimeout", dur(ipvs.tcp_fin_timeout, 0));
    note("ipvs.udpTimeout", dur(ipvs.udp_timeout, 0));
    note(
        "nftables.masqueradeBit",
        differs(&nft.masquerade_bit, &[14]),
    );
    note(
        "nftables.masqueradeAll",
        differs(&nft.masquerade_all, &[false]),
    );
    note("nftables.syncPeriod", dur(nft.sync_period, 30));
    note("nftables.minSyncPeriod", dur(nft.min_sync_period, 1));
    note(
        "winkernel.networkName",
        differs_text(&win.network_name, &[]),
    );
    note("winkernel.sourceVip", differs_text(&win.source_vip, &[]));
    note("winkernel.enableDSR", differs(&win.enable_dsr, &[false]));
    note(
        "winkernel.rootHnsEndpointName",
        differs_text(&win.root_hns_endpoint_name, &[]),
    );
    note(
        "winkernel.forwardHealthCheckVip",
        differs(&win.forward_health_check_vip, &[false]),
    );
    note(
        "windowsRunAsService",
        differs(&f.windows_run_as_service, &[false]),
    );
    note("oomScoreAdj", differs(&f.oom_score_adj, &[-999]));
    note("conntrack.max", differs(&ct.max, &[0]));
    note(
        "conntrack.maxPerCore",
        differs(&ct.max_per_core, &[32 * 1024]),
    );
    note("conntrack.min", differs(&ct.min, &[128 * 1024]));
    note(
        "conntrack.tcpEstablishedTimeout",
        differs(&ct.tcp_established_timeout, &[GoDuration(24 * 3600 * S)]),
    );
    note(
        "conntrack.tcpCloseWaitTimeout",
        differs(&ct.tcp_close_wait_timeout, &[GoDuration(3600 * S)]),
    );
    note(
        "conntrack.tcpBeLiberal",
        differs(&ct.tcp_be_liberal, &[false]),
    );
    note("conntrack.udpTimeout", dur(ct.udp_timeout, 0));
    note("conntrack.udpStreamTimeout", dur(ct.udp_stream_timeout, 0));
    note("configSyncPeriod", dur(f.config_sync_period, 15 * 60));
    note(
        "resourceContainer",
        differs_text(&f.resource_container, &["/kube-proxy"]),
    );
    out
}

/// `v` as text when set to none of `defaults`.
fn differs<T: PartialEq + Display>(v: &Option<T>, defaults: &[T]) -> Option<String> {
    v.as_ref()
        .filter(|v| !defaults.contains(v))
        .map(ToString::to_string)
}

/// A string field when neither blank nor one of `defaults`.
fn differs_text(v: &Option<String>, defaults: &[&str]) -> Option<String> {
    text(v).filter(|s| !defaults.contains(s)).map(String::from)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
