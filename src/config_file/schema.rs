//! `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration`, every
//! field of upstream's `staging/src/k8s.io/kube-proxy/config/v1alpha1/types.go`
//! (with component-base's `ClientConnectionConfiguration` and logs'
//! `LoggingConfiguration`), plus the fields older releases had, so that an
//! older kubeadm's rendering still reads. A field not listed is an error.
//!
//! Every field is optional: absent, `null` and the zero value all mean
//! "default", as upstream's defaulting treats them.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::duration::GoDuration;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnection>,
    pub logging: Option<Logging>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<Iptables>,
    pub ipvs: Option<Ipvs>,
    pub nftables: Option<Nftables>,
    pub winkernel: Option<Winkernel>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub conntrack: Option<Conntrack>,
    pub config_sync_period: Option<GoDuration>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
    /// Older releases: the userspace mode's UDP idle timeout.
    pub udp_idle_timeout: Option<GoDuration>,
    /// Older releases: the cgroup kube-proxy moved itself into.
    pub resource_container: Option<String>,
}

/// component-base's `ClientConnectionConfiguration`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f32>,
    pub burst: Option<i32>,
}

/// component-base's `LoggingConfiguration` (logs/api/v1).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Logging {
    pub format: Option<String>,
    pub flush_frequency: Option<FlushFrequency>,
    pub verbosity: Option<u32>,
    pub vmodule: Option<Vec<VModule>>,
    pub options: Option<LoggingOptions>,
    /// Older releases (logs v1alpha1).
    pub sanitization: Option<bool>,
}

/// One `vmodule` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct VModule {
    pub file_pattern: Option<String>,
    pub verbosity: Option<u32>,
}

/// `logging.options`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct LoggingOptions {
    pub text: Option<OutputRouting>,
    pub json: Option<OutputRouting>,
}

/// `logging.options.text` and `logging.options.json`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct OutputRouting {
    pub split_stream: Option<bool>,
    pub info_buffer_size: Option<Quantity>,
}

/// `iptables`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Iptables {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

/// `ipvs`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Ipvs {
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<GoDuration>,
    pub tcp_fin_timeout: Option<GoDuration>,
    pub udp_timeout: Option<GoDuration>,
}

/// `nftables`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Nftables {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

/// `winkernel`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Winkernel {
    pub network_name: Option<String>,
    pub source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    pub root_hns_endpoint_name: Option<String>,
    pub forward_health_check_vip: Option<bool>,
}

/// `detectLocal`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

/// `conntrack`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Conntrack {
    /// Older releases.
    pub max: Option<i32>,
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<GoDuration>,
    pub udp_stream_timeout: Option<GoDuration>,
}

/// `logging.flushFrequency`: nanoseconds as a number, or a Go duration
/// string (logs' `TimeOrMetaDuration`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FlushFrequency(pub GoDuration);

impl<'de> Deserialize<'de> for FlushFrequency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FlushFrequency;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("nanoseconds or a Go duration string")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<FlushFrequency, E> {
                Ok(FlushFrequency(GoDuration(n)))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<FlushFrequency, E> {
                i64::try_from(n)
                    .map(|n| FlushFrequency(GoDuration(n)))
                    .map_err(|_| E::custom(format!("{n} nanoseconds is out of range")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FlushFrequency, E> {
                super::duration::parse(s)
                    .map(FlushFrequency)
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A resource quantity (`infoBufferSize`): a string or a number, kept as
/// written (the field is only reported, never used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a quantity such as \"0\" or \"64Ki\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Quantity, E> {
                Ok(Quantity(s.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Quantity, E> {
                Ok(Quantity(n.to_string()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Quantity, E> {
                Ok(Quantity(n.to_string()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Quantity, E> {
                Ok(Quantity(n.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}
