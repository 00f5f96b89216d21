use super::*;
use clap::Parser;

/// kubeadm's `config.conf` as a cluster holds it (tests/fixtures/kubeadm).
const KUBEADM: &str = include_str!("../../tests/fixtures/kubeadm/config.conf");

/// A later kubeadm's rendering (logging.options.text, conntrack's UDP
/// fields) with what a cluster operator sets: dual-stack pod CIDRs,
/// metrics on every address, feature gates and a conntrack limit.
const KUBEADM_CUSTOMISED: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: ""
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy-kubeconfig/kubeconfig
  qps: 0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: 524288
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
featureGates:
  Bar: false
  Foo: true
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 0.0.0.0:10249
mode: iptables
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

/// An older rendering with every default filled in (kube-proxy's
/// defaulting then ran before kubeadm wrote it), in IPVS mode, with the
/// fields of that era (`resourceContainer`, `udpIdleTimeout`).
const OLDER_DEFAULTED: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
clusterCIDR: 100.64.0.0/14
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 0s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 30s
kind: KubeProxyConfiguration
metricsBindAddress: 127.0.0.1:10249
mode: ipvs
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
resourceContainer: /kube-proxy
udpIdleTimeout: 250ms
winkernel:
  enableDSR: false
  networkName: ""
  sourceVip: ""
"#;

/// A config file in a temporary directory.
struct File(tempfile::TempDir);

impl File {
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.conf"), text).unwrap();
        Self(dir)
    }

    fn path(&self) -> String {
        self.0.path().join("config.conf").display().to_string()
    }
}

/// Resolves `args` (after the program name) with `--config` on `text`.
fn with(text: &str, args: &[&str]) -> Result<(RunArgs, Vec<Note>), String> {
    let file = File::new(text);
    let path = file.path();
    let mut argv = vec!["kube-proxy", "--config", &path];
    argv.extend_from_slice(args);
    let m = Cli::command().try_get_matches_from(argv).unwrap();
    resolve(&m)
        .map(|(cli, notes)| (cli.run, notes.0))
        .map_err(|e| e.0.replace(&path, "FILE"))
}

fn ignored_of(notes: &[Note]) -> Vec<&'static str> {
    notes
        .iter()
        .filter_map(|n| match n {
            Note::Ignored { field, .. } => Some(*field),
            _ => None,
        })
        .collect()
}

fn defaults() -> RunArgs {
    Cli::try_parse_from(["x"]).unwrap().run
}

#[test]
fn kubeadms_rendering_with_the_daemonsets_flags() {
    let (args, notes) = with(KUBEADM, &["--hostname-override=node-a"]).unwrap();
    assert_eq!(args.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(
        args.kubeconfig.as_deref(),
        Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(args.cluster_cidr.0, ["10.244.0.0/16".parse().unwrap()]);
    // Every zero is a default.
    let d = defaults();
    assert_eq!(args.bind_address, d.bind_address);
    assert_eq!(args.healthz_bind_address, d.healthz_bind_address);
    assert_eq!(args.metrics_bind_address, d.metrics_bind_address);
    assert_eq!(args.iptables_sync_period, Duration::from_secs(30));
    assert_eq!(args.iptables_min_sync_period, Duration::from_secs(1));
    assert_eq!(args.detect_local_mode, d.detect_local_mode);
    assert_eq!(args.proxy_port_range, PortRange::Ephemeral);
    assert_eq!(args.udp_timeout, d.udp_timeout);
    assert!(args.nodeport_addresses.0.is_empty());
    // Nothing to report but what was applied.
    let Some(Note::Applied { fields, .. }) = notes.first() else {
        panic!("{notes:?}")
    };
    assert_eq!(
        fields,
        &["clientConnection.kubeconfig", "bindAddress", "clusterCIDR"]
    );
    assert_eq!(notes.len(), 1, "{notes:?}");
}

#[test]
fn a_customised_rendering_applies_and_reports_what_it_ignores() {
    let (args, notes) = with(KUBEADM_CUSTOMISED, &[]).unwrap();
    assert_eq!(args.metrics_bind_address.to_string(), "0.0.0.0:10249");
    assert_eq!(args.cluster_cidr.0.len(), 2);
    assert_eq!(ignored_of(&notes), ["featureGates", "conntrack.maxPerCore"]);
    assert!(notes.contains(&Note::Ignored {
        field: "featureGates",
        value: "Bar=false,Foo=true".into()
    }));
    assert!(!notes.iter().any(|n| matches!(n, Note::KernelMode { .. })));
}

#[test]
fn an_older_rendering_with_every_default_filled_in_reports_only_its_mode() {
    let (args, notes) = with(OLDER_DEFAULTED, &[]).unwrap();
    assert_eq!(ignored_of(&notes), Vec::<&str>::new());
    assert!(notes.contains(&Note::KernelMode {
        mode: "ipvs".into()
    }));
    assert_eq!(args.udp_timeout, Duration::from_millis(250));
    assert_eq!(args.iptables_sync_period, Duration::from_secs(30));
    assert_eq!(args.iptables_min_sync_period, Duration::from_secs(1));
    assert_eq!(args.healthz_bind_address.to_string(), "0.0.0.0:10256");
    assert_eq!(args.cluster_cidr.0, ["100.64.0.0/14".parse().unwrap()]);
}

#[test]
fn flags_on_the_command_line_win_over_the_file() {
    let text = KUBEADM
        .replace(
            "  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs",
            "  minSyncPeriod: 2s\n  syncPeriod: 1m0s\nipvs",
        )
        .replace("hostnameOverride: \"\"", "hostnameOverride: from-file")
        .replace("bindAddress: 0.0.0.0", "bindAddress: 10.0.0.1");
    let (args, notes) = with(
        &text,
        &[
            "--hostname-override",
            "node-a",
            "--iptables-sync-period",
            "10s",
            "--bind-address=127.0.0.1",
        ],
    )
    .unwrap();
    assert_eq!(args.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(args.iptables_sync_period, Duration::from_secs(10));
    assert_eq!(args.bind_address.to_string(), "127.0.0.1");
    // Not given on the command line: the file's.
    assert_eq!(args.iptables_min_sync_period, Duration::from_secs(2));
    for (flag, field) in [
        ("--hostname-override", "hostnameOverride"),
        ("--iptables-sync-period", "iptables.syncPeriod"),
        ("--bind-address", "bindAddress"),
    ] {
        let n = Note::Overridden {
            flag: flag.into(),
            field,
        };
        assert!(notes.contains(&n), "{n:?} in {notes:?}");
    }
    // Without the flags, the file's values.
    let (args, _) = with(&text, &[]).unwrap();
    assert_eq!(args.hostname_override.as_deref(), Some("from-file"));
    assert_eq!(args.iptables_sync_period, Duration::from_secs(60));
    assert_eq!(args.bind_address.to_string(), "10.0.0.1");
    // A flag's default is not "given": the file wins over it.
    let (args, _) = with(
        &text.replace("portRange: \"\"", "portRange: 30000-30100"),
        &[],
    )
    .unwrap();
    assert_eq!(args.proxy_port_range, PortRange::Range(30000, 30100));
}

#[test]
fn the_subcommands_read_it_too() {
    let file = File::new(&KUBEADM.replace("hostnameOverride: \"\"", "hostnameOverride: n1"));
    let path = file.path();
    for argv in [
        vec!["x", "run", "--config", &path],
        vec!["x", "rules", "--config", &path],
        vec!["x", "--config", &path],
    ] {
        let (cli, _) = resolve(&Cli::command().try_get_matches_from(&argv).unwrap()).unwrap();
        let args = match cli.command {
            Some(Command::Run(a) | Command::Rules(a)) => a,
            _ => cli.run,
        };
        assert_eq!(args.hostname_override.as_deref(), Some("n1"), "{argv:?}");
    }
    let argv = ["x", "run", "--config", &path, "--hostname-override", "n2"];
    let (cli, _) = resolve(&Cli::command().try_get_matches_from(argv).unwrap()).unwrap();
    let Some(Command::Run(a)) = cli.command else {
        panic!()
    };
    assert_eq!(a.hostname_override.as_deref(), Some("n2"));
}

#[test]
fn unknown_fields_are_errors_naming_their_path() {
    let top = with(&format!("{KUBEADM}typoField: 1\n"), &[]).unwrap_err();
    assert!(
        top.starts_with("FILE: ") && top.contains("typoField"),
        "{top}"
    );
    let nested = with(
        &KUBEADM.replace("  masqueradeAll: false\n  masqueradeBit: null\n  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs", "  masqueradeAll: false\n  masqueradBit: 14\n  syncPeriod: 0s\nipvs"),
        &[],
    )
    .unwrap_err();
    assert!(nested.starts_with("FILE: iptables"), "{nested}");
    assert!(nested.contains("masqueradBit"), "{nested}");
    // Even with an empty value.
    let empty = with(&format!("{KUBEADM}hostnameOveride:\n"), &[]).unwrap_err();
    assert!(empty.contains("hostnameOveride"), "{empty}");
}

#[test]
fn wrong_types_are_errors_naming_the_field() {
    for (from, to, field) in [
        (
            "  syncPeriod: 0s\nipvs",
            "  syncPeriod: 30\nipvs",
            "FILE: iptables.syncPeriod: ",
        ),
        (
            "bindAddressHardFail: false",
            "bindAddressHardFail: maybe",
            "FILE: bindAddressHardFail: ",
        ),
        (
            "clusterCIDR: 10.244.0.0/16",
            "clusterCIDR: [10.244.0.0/16]",
            "FILE: clusterCIDR: ",
        ),
        (
            "nodePortAddresses: null",
            "nodePortAddresses: 10.0.0.0/8",
            "FILE: nodePortAddresses: ",
        ),
        (
            "  burst: 0",
            "  burst: lots",
            "FILE: clientConnection.burst: ",
        ),
        ("iptables:\n", "iptables: on\nx:\n", "FILE: iptables: "),
    ] {
        assert!(KUBEADM.contains(from), "{from}");
        let err = with(&KUBEADM.replacen(from, to, 1), &[]).unwrap_err();
        assert!(err.starts_with(field), "{to}: {err}");
        assert!(err.contains("invalid type"), "{to}: {err}");
    }
}

#[test]
fn invalid_values_are_errors_naming_the_field() {
    for (from, to, want) in [
        ("  syncPeriod: 0s\nipvs", "  syncPeriod: abc\nipvs", r#"FILE: iptables.syncPeriod: invalid duration "abc""#),
        ("  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs", "  minSyncPeriod: -1s\n  syncPeriod: 0s\nipvs", "FILE: iptables.minSyncPeriod: -1s is negative"),
        ("  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs", "  minSyncPeriod: 1m0s\n  syncPeriod: 30s\nipvs", "FILE: iptables.minSyncPeriod (60s) is above iptables.syncPeriod (30s)"),
        ("  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs", "  minSyncPeriod: 0s\n  syncPeriod: 1d\nipvs", r#"FILE: iptables.syncPeriod: unknown unit "d" in duration "1d""#),
        ("bindAddress: 0.0.0.0", "bindAddress: node-1", "FILE: bindAddress: "),
        ("healthzBindAddress: \"\"", "healthzBindAddress: 0.0.0.0:0", "FILE: healthzBindAddress: \"0.0.0.0:0\": port 0"),
        ("metricsBindAddress: \"\"", "metricsBindAddress: localhost:10249", "FILE: metricsBindAddress: \"localhost:10249\" is not IP:port or an IP"),
        ("clusterCIDR: 10.244.0.0/16", "clusterCIDR: 10.244.0.0", "FILE: clusterCIDR: \"10.244.0.0\" is not a CIDR"),
        ("clusterCIDR: 10.244.0.0/16", "clusterCIDR: 10.244.0.0/16,10.96.0.0/12", "FILE: clusterCIDR: at most one CIDR per IP family"),
        ("detectLocalMode: \"\"", "detectLocalMode: PodCIDR", "FILE: detectLocalMode: unsupported value \"PodCIDR\": supported values: \"ClusterCIDR\""),
        ("detectLocalMode: \"\"", "detectLocalMode: BridgeInterface", "FILE: detectLocalMode BridgeInterface needs detectLocal.bridgeInterface"),
        ("mode: \"\"", "mode: kernelspace", "FILE: mode: \"kernelspace\" is kube-proxy's Windows mode"),
        ("mode: \"\"", "mode: ebpf", "FILE: mode: unsupported value \"ebpf\""),
        ("nodePortAddresses: null", "nodePortAddresses: [primary, 10.0.0.0/8]", "FILE: nodePortAddresses[0]: can't use both 'primary' and CIDRs"),
        ("nodePortAddresses: null", "nodePortAddresses: [10.0.0.0/8, 10.1.2.3]", "FILE: nodePortAddresses[1]: \"10.1.2.3\" is not a CIDR"),
        ("portRange: \"\"", "portRange: 9-1", "FILE: portRange: \"9-1\": first port is above the last"),
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1", "apiVersion: kubeproxy.config.k8s.io/v1beta1", "FILE: apiVersion: \"kubeproxy.config.k8s.io/v1beta1\" is not \"kubeproxy.config.k8s.io/v1alpha1\""),
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n", "", "FILE: apiVersion: missing"),
        ("kind: KubeProxyConfiguration", "kind: KubeletConfiguration", "FILE: kind: \"KubeletConfiguration\" is not \"KubeProxyConfiguration\""),
        ("logging:\n  flushFrequency: 0", "logging:\n  format: xml\n  flushFrequency: 0", "FILE: logging.format: unsupported value \"xml\""),
    ] {
        assert!(KUBEADM.contains(from), "{from}");
        let err = with(&KUBEADM.replacen(from, to, 1), &[]).unwrap_err();
        assert!(err.starts_with(want), "{to}:\n got {err}\nwant {want}");
    }
    // The detector's flags given on the command line name themselves.
    let err = with(
        &KUBEADM.replace("detectLocalMode: \"\"", "detectLocalMode: BridgeInterface"),
        &["--pod-bridge-interface", ""],
    )
    .unwrap_err();
    assert_eq!(
        err,
        "FILE: detectLocalMode BridgeInterface needs --pod-bridge-interface"
    );
}

#[test]
fn not_a_configuration_at_all() {
    for (text, want) in [
        ("", "FILE: not a KubeProxyConfiguration"),
        ("- a\n- b\n", "FILE: not a KubeProxyConfiguration"),
        ("a: [b\n", "FILE: not valid YAML"),
    ] {
        let err = with(text, &[]).unwrap_err();
        assert!(err.starts_with(want), "{text:?}: {err}");
    }
    let m = Cli::command()
        .try_get_matches_from(["x", "--config", "/nonexistent/config.conf"])
        .unwrap();
    let err = resolve(&m).unwrap_err().0;
    assert!(err.starts_with("/nonexistent/config.conf: "), "{err}");
}

#[test]
fn nulls_blanks_and_json_are_read_as_upstream_reads_them() {
    let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
        hostnameOverride:\nclusterCIDR: null\niptables: null\nconntrack: {}\nfeatureGates: null\n\
        logging: {flushFrequency: 5s, options: {json: {infoBufferSize: 0}}}\n";
    let (args, notes) = with(text, &[]).unwrap();
    assert_eq!(args.hostname_override, None);
    assert!(args.cluster_cidr.0.is_empty());
    assert_eq!(notes.len(), 1, "{notes:?}");
    let json = r#"{"apiVersion":"kubeproxy.config.k8s.io/v1alpha1","kind":"KubeProxyConfiguration",
        "hostnameOverride":"n1","iptables":{"syncPeriod":"1h0m0s"},"logging":{"flushFrequency":1000000000}}"#;
    let (args, notes) = with(json, &[]).unwrap();
    assert_eq!(args.hostname_override.as_deref(), Some("n1"));
    assert_eq!(args.iptables_sync_period, Duration::from_secs(3600));
    assert_eq!(ignored_of(&notes), ["logging.flushFrequency"]);
}

#[test]
fn addresses_take_upstreams_default_ports_and_family() {
    let text = KUBEADM
        .replace("healthzBindAddress: \"\"", "healthzBindAddress: 0.0.0.0")
        .replace("metricsBindAddress: \"\"", "metricsBindAddress: 10.0.0.7");
    let (args, _) = with(&text, &[]).unwrap();
    assert_eq!(args.healthz_bind_address.to_string(), "0.0.0.0:10256");
    assert_eq!(args.metrics_bind_address.to_string(), "10.0.0.7:10249");
    // An IPv6 bindAddress (kubeadm's for an IPv6 advertise address): the
    // admin addresses default to IPv6 as upstream's.
    let (args, _) = with(
        &KUBEADM.replace("bindAddress: 0.0.0.0", "bindAddress: '::'"),
        &[],
    )
    .unwrap();
    assert_eq!(args.bind_address.to_string(), "::");
    assert_eq!(args.healthz_bind_address.to_string(), "[::]:10256");
    assert_eq!(args.metrics_bind_address.to_string(), "[::1]:10249");
    // Unless --bind-address said otherwise.
    let (args, _) = with(
        &KUBEADM.replace("bindAddress: 0.0.0.0", "bindAddress: '::'"),
        &["--bind-address", "127.0.0.1"],
    )
    .unwrap();
    assert_eq!(args.healthz_bind_address.to_string(), "0.0.0.0:10256");
    let (args, _) = with(
        &KUBEADM.replace(
            "metricsBindAddress: \"\"",
            "metricsBindAddress: \"fd00::7\"",
        ),
        &[],
    )
    .unwrap();
    assert_eq!(args.metrics_bind_address.to_string(), "[fd00::7]:10249");
    // Brackets without a port are neither (upstream's validation agrees).
    let err = with(
        &KUBEADM.replace(
            "metricsBindAddress: \"\"",
            "metricsBindAddress: \"[fd00::7]\"",
        ),
        &[],
    )
    .unwrap_err();
    assert!(err.starts_with("FILE: metricsBindAddress: "), "{err}");
}

#[test]
fn the_fields_with_a_flag_here_all_apply() {
    let text = KUBEADM
        .replace(
            "detectLocalMode: \"\"",
            "detectLocalMode: InterfaceNamePrefix",
        )
        .replace("  interfaceNamePrefix: \"\"", "  interfaceNamePrefix: veth")
        .replace("  bridgeInterface: \"\"", "  bridgeInterface: cni0")
        .replace(
            "nodePortAddresses: null",
            "nodePortAddresses: [10.0.0.0/8, \"fd00::/64\"]",
        )
        .replace("portRange: \"\"", "portRange: 40000+99")
        .replace("logging:\n", "logging:\n  format: json\n")
        .replace("mode: \"\"", "mode: userspace");
    let (args, notes) = with(&text, &[]).unwrap();
    assert_eq!(
        args.detect_local_mode,
        crate::detect_local::Mode::InterfaceNamePrefix
    );
    assert_eq!(args.pod_interface_name_prefix, "veth");
    assert_eq!(args.pod_bridge_interface, "cni0");
    assert_eq!(args.nodeport_addresses.0, ["10.0.0.0/8", "fd00::/64"]);
    assert_eq!(args.proxy_port_range, PortRange::Range(40000, 40099));
    assert_eq!(args.log.log_format, LogFormat::Json);
    assert_eq!(ignored_of(&notes), Vec::<&str>::new());
    let (args, _) = with(&text, &["--log-format", "text"]).unwrap();
    assert_eq!(args.log.log_format, LogFormat::Text);
}

#[test]
fn every_field_of_upstream_is_known() {
    // Every field of types.go (and component-base's), set to something
    // other than its default: all read, each reported by its path.
    let text = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
featureGates: {SomeGate: true}
clientConnection: {kubeconfig: /k, acceptContentTypes: a, contentType: application/json, qps: 50, burst: 100}
logging:
  format: text
  flushFrequency: 10s
  verbosity: 4
  vmodule: [{filePattern: proxier, verbosity: 5}]
  options: {text: {splitStream: true, infoBufferSize: 64Ki}, json: {splitStream: true, infoBufferSize: "1Mi"}}
hostnameOverride: n
bindAddress: 10.0.0.1
healthzBindAddress: 10.0.0.1:10256
metricsBindAddress: 10.0.0.1:10249
bindAddressHardFail: true
enableProfiling: true
showHiddenMetricsForVersion: "1.32"
mode: nftables
iptables: {masqueradeBit: 13, masqueradeAll: true, localhostNodePorts: false, snatNodeInternalIP: true, syncPeriod: 1m, minSyncPeriod: 10s}
ipvs: {syncPeriod: 1m, minSyncPeriod: 1s, scheduler: lc, excludeCIDRs: [10.0.0.0/8], strictARP: true, tcpTimeout: 1m, tcpFinTimeout: 1m, udpTimeout: 1m}
nftables: {masqueradeBit: 13, masqueradeAll: true, syncPeriod: 1m, minSyncPeriod: 10s}
winkernel: {networkName: n, sourceVip: 1.2.3.4, enableDSR: true, rootHnsEndpointName: r, forwardHealthCheckVip: true}
detectLocalMode: NodeCIDR
detectLocal: {bridgeInterface: cni0, interfaceNamePrefix: veth}
clusterCIDR: 10.244.0.0/16
nodePortAddresses: [primary]
oomScoreAdj: -500
conntrack: {maxPerCore: 0, min: 1, tcpEstablishedTimeout: 1h, tcpCloseWaitTimeout: 1m, tcpBeLiberal: true, udpTimeout: 1m, udpStreamTimeout: 1m}
configSyncPeriod: 1m
portRange: 30000-30010
windowsRunAsService: true
"#;
    let (args, notes) = with(text, &[]).unwrap();
    assert_eq!(args.detect_local_mode, crate::detect_local::Mode::NodeCidr);
    assert!(notes.contains(&Note::KernelMode {
        mode: "nftables".into()
    }));
    let ignored = ignored_of(&notes);
    for field in [
        "featureGates",
        "clientConnection.acceptContentTypes",
        "clientConnection.contentType",
        "clientConnection.qps",
        "clientConnection.burst",
        "logging.flushFrequency",
        "logging.verbosity",
        "logging.vmodule",
        "logging.options.text.splitStream",
        "logging.options.text.infoBufferSize",
        "logging.options.json.splitStream",
        "logging.options.json.infoBufferSize",
        "bindAddressHardFail",
        "enableProfiling",
        "showHiddenMetricsForVersion",
        "iptables.masqueradeBit",
        "iptables.masqueradeAll",
        "iptables.localhostNodePorts",
        "iptables.snatNodeInternalIP",
        "ipvs.syncPeriod",
        "ipvs.minSyncPeriod",
        "ipvs.scheduler",
        "ipvs.excludeCIDRs",
        "ipvs.strictARP",
        "ipvs.tcpTimeout",
        "ipvs.tcpFinTimeout",
        "ipvs.udpTimeout",
        "nftables.masqueradeBit",
        "nftables.masqueradeAll",
        "nftables.syncPeriod",
        "nftables.minSyncPeriod",
        "winkernel.networkName",
        "winkernel.sourceVip",
        "winkernel.enableDSR",
        "winkernel.rootHnsEndpointName",
        "winkernel.forwardHealthCheckVip",
        "windowsRunAsService",
        "oomScoreAdj",
        "conntrack.maxPerCore",
        "conntrack.min",
        "conntrack.tcpEstablishedTimeout",
        "conntrack.tcpCloseWaitTimeout",
        "conntrack.tcpBeLiberal",
        "conntrack.udpTimeout",
        "conntrack.udpStreamTimeout",
        "configSyncPeriod",
    ] {
        assert!(
            ignored.contains(&field),
            "{field} not reported: {ignored:?}"
        );
    }
    assert_eq!(ignored.len(), 46, "{ignored:?}");
}
