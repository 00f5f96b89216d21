//! Which traffic comes from this node's pods: upstream's
//! `--detect-local-mode` (`pkg/proxy/util/localdetector.go`,
//! `NewDetectLocalByCIDR`, `NewDetectLocalByBridgeInterface`,
//! `NewDetectLocalByInterfaceNamePrefix`; chosen as `getLocalDetectors` in
//! `cmd/kube-proxy/app/server_linux.go` does). Traffic from a local pod (or
//! from the host itself) to a nodePort, external IP or LB IP is not
//! subject to `externalTrafficPolicy: Local`: it goes to the cluster set.
//!
//! The same detector writes the iptables matches ([`Detector::if_local`],
//! [`Detector::if_not_local`]) and answers for one connection in the data
//! path ([`Detector::is_local`]).

use std::net::IpAddr;

use ipnet::IpNet;

/// `--detect-local-mode`, with upstream's spellings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Pods are sources in `--cluster-cidr` (upstream's default).
    #[default]
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    /// Pods are sources in this node's `spec.podCIDRs`.
    #[value(name = "NodeCIDR")]
    NodeCidr,
    /// Pods are traffic coming in on `--pod-bridge-interface`.
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    /// Pods are traffic coming in on interfaces named
    /// `--pod-interface-name-prefix`*.
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

impl Mode {
    /// Upstream's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterCidr => "ClusterCIDR",
            Self::NodeCidr => "NodeCIDR",
            Self::BridgeInterface => "BridgeInterface",
            Self::InterfaceNamePrefix => "InterfaceNamePrefix",
        }
    }
}

/// The flags that choose the detector (checked at start-up).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `--detect-local-mode`.
    pub mode: Mode,
    /// `--cluster-cidr`: at most one CIDR per family.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--pod-bridge-interface`.
    pub bridge_interface: String,
    /// `--pod-interface-name-prefix`.
    pub interface_name_prefix: String,
}

impl Config {
    /// Checks the flags as upstream's validation does: the interface modes
    /// need their name, `--cluster-cidr` holds at most one CIDR per family.
    /// The message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_named(&|flag| flag.to_string())
    }

    /// [`Config::validate`], the message naming each value `name(flag)`
    /// (e.g. the config file's field it came from).
    pub fn validate_named(&self, name: &dyn Fn(&'static str) -> String) -> Result<(), String> {
        let mode = || name("--detect-local-mode");
        match self.mode {
            Mode::BridgeInterface if self.bridge_interface.is_empty() => {
                return Err(format!(
                    "{} BridgeInterface needs {}",
                    mode(),
                    name("--pod-bridge-interface")
                ))
            }
            Mode::InterfaceNamePrefix if self.interface_name_prefix.is_empty() => {
                return Err(format!(
                    "{} InterfaceNamePrefix needs {}",
                    mode(),
                    name("--pod-interface-name-prefix")
                ))
            }
            _ => {}
        }
        let v4 = self
            .cluster_cidrs
            .iter()
            .filter(|c| c.addr().is_ipv4())
            .count();
        if v4 > 1 || self.cluster_cidrs.len() - v4 > 1 {
            return Err(format!(
                "{}: at most one CIDR per IP family",
                name("--cluster-cidr")
            ));
        }
        Ok(())
    }

    /// Whether the mode tells pods by their interface (listeners then
    /// record each connection's incoming interface).
    pub fn needs_interface(&self) -> bool {
        matches!(self.mode, Mode::BridgeInterface | Mode::InterfaceNamePrefix)
    }

    /// The detector in force for this node (`pod_cidrs`: its Node's
    /// `spec.podCIDRs`, for `NodeCIDR`; unparsable ones are skipped).
    pub fn detector(&self, pod_cidrs: &[String]) -> Detector {
        match self.mode {
            Mode::ClusterCidr => Detector::Cidrs(self.cluster_cidrs.clone()),
            Mode::NodeCidr => Detector::Cidrs(
                pod_cidrs
                    .iter()
                    .filter_map(|c| c.parse::<IpNet>().ok().map(|n| n.trunc()))
                    .collect(),
            ),
            Mode::BridgeInterface => Detector::Bridge(self.bridge_interface.clone()),
            Mode::InterfaceNamePrefix => Detector::Prefix(self.interface_name_prefix.clone()),
        }
    }
}

/// Parses `--cluster-cidr`: comma-separated CIDRs (empty: none).
pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|e| format!("{c:?} is not a CIDR ({e})"))
        })
        .collect()
}

/// How local pods are recognised, resolved for this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detector {
    /// By source address (ClusterCIDR, NodeCIDR); none for a family means
    /// no detection for it (upstream's no-op detector).
    Cidrs(Vec<IpNet>),
    /// By the incoming interface's exact name.
    Bridge(String),
    /// By the incoming interface's name prefix.
    Prefix(String),
}

impl Default for Detector {
    fn default() -> Self {
        Self::Cidrs(Vec::new())
    }
}

impl Detector {
    /// Whether pods of the family (`v6`) can be told at all (upstream's
    /// `IsImplemented`).
    pub fn is_implemented(&self, v6: bool) -> bool {
        match self {
            Self::Cidrs(c) => c.iter().any(|n| n.addr().is_ipv6() == v6),
            Self::Bridge(_) | Self::Prefix(_) => true,
        }
    }

    /// The iptables match for traffic from local pods of the family, as
    /// upstream writes it (`-s CIDR`, `-i NAME`, `-i PREFIX+`); `None` when
    /// not implemented for it.
    pub fn if_local(&self, v6: bool) -> Option<String> {
        match self {
            Self::Cidrs(_) => self.local_cidr(v6).map(|n| format!("-s {n}")),
            Self::Bridge(name) => Some(format!("-i {name}")),
            Self::Prefix(prefix) => Some(format!("-i {prefix}+")),
        }
    }

    /// The source CIDR [`Self::if_local`] matches for the family, when
    /// pods are told by source (ClusterCIDR, NodeCIDR).
    pub fn local_cidr(&self, v6: bool) -> Option<IpNet> {
        match self {
            Self::Cidrs(c) => c.iter().find(|n| n.addr().is_ipv6() == v6).copied(),
            Self::Bridge(_) | Self::Prefix(_) => None,
        }
    }

    /// The negation of [`Self::if_local`] (upstream's `IfNotLocal`).
    pub fn if_not_local(&self, v6: bool) -> Option<String> {
        self.if_local(v6).map(|m| format!("! {m}"))
    }

    /// Whether the interface name matters (the data path then asks the
    /// socket which interface a client came in on).
    pub fn needs_interface(&self) -> bool {
        !matches!(self, Self::Cidrs(_))
    }

    /// Whether a client at `src`, which came in on interface `iface` (when
    /// known), is a local pod.
    pub fn is_local(&self, src: IpAddr, iface: Option<&str>) -> bool {
        let src = src.to_canonical();
        match self {
            Self::Cidrs(c) => c.iter().any(|n| n.contains(&src)),
            Self::Bridge(name) => iface == Some(name.as_str()),
            Self::Prefix(prefix) => iface.is_some_and(|i| i.starts_with(prefix.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_as_upstream_writes_them() {
        let c = Config {
            cluster_cidrs: parse_cidrs("10.244.0.0/16, fd00:10::/48").unwrap(),
            ..Config::default()
        };
        let d = c.detector(&[]);
        assert_eq!(d.if_local(false).as_deref(), Some("-s 10.244.0.0/16"));
        assert_eq!(d.if_not_local(true).as_deref(), Some("! -s fd00:10::/48"));
        assert!(d.is_local("10.244.3.4".parse().unwrap(), None));
        assert!(d.is_local("::ffff:10.244.3.4".parse().unwrap(), None));
        assert!(!d.is_local("10.245.0.1".parse().unwrap(), None));

        let none = Config::default().detector(&[]);
        assert!(!none.is_implemented(false) && none.if_local(false).is_none());

        let node = Config {
            mode: Mode::NodeCidr,
            ..Config::default()
        }
        .detector(&["10.244.1.0/24".into(), "junk".into()]);
        assert_eq!(node.if_local(false).as_deref(), Some("-s 10.244.1.0/24"));
        assert!(!node.is_implemented(true));

        let prefix = Detector::Prefix("veth".into());
        assert_eq!(prefix.if_local(false).as_deref(), Some("-i veth+"));
        assert!(prefix.is_local("1.2.3.4".parse().unwrap(), Some("veth12")));
        assert!(!prefix.is_local("1.2.3.4".parse().unwrap(), Some("eth0")));
        let bridge = Detector::Bridge("cbr0".into());
        assert_eq!(bridge.if_not_local(true).as_deref(), Some("! -i cbr0"));
        assert!(!bridge.is_local("1.2.3.4".parse().unwrap(), None));
    }

    #[test]
    fn flags_are_checked() {
        let bad = Config {
            mode: Mode::BridgeInterface,
            ..Config::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("--pod-bridge-interface"));
        let two = Config {
            cluster_cidrs: parse_cidrs("10.0.0.0/8,10.1.0.0/16").unwrap(),
            ..Config::default()
        };
        assert!(two.validate().is_err());
        assert!(parse_cidrs("10.0.0.0/33")
            .unwrap_err()
            .contains("10.0.0.0/33"));
        assert_eq!(parse_cidrs("").unwrap(), Vec::new());
    }
}
