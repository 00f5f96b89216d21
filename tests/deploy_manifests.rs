//! Every YAML under deploy/ parses into its Kubernetes type with no field
//! left over (a typo'd field fails), and the proxy's container arguments
//! parse with the real command line, so a flag typo fails CI too;
//! deploy/kubeadm's patch of kubeadm's kube-proxy DaemonSet runs this proxy
//! on kubeadm's own `config.conf`. The Grafana dashboard queries only
//! series the proxy exports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube_userspace_proxy::cli::Cli;
use kube_userspace_proxy::config_file;
use kube_userspace_proxy::discovery::manifests;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Keys of `input` (recursively) that `output` lacks: fields the typed
/// round trip dropped, i.e. unknown to the type.
fn dropped(input: &Value, output: &Value, path: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let p = format!("{path}.{k}");
                match o.get(k) {
                    Some(ov) => dropped(v, ov, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (n, v) in i.iter().enumerate() {
                match o.get(n) {
                    Some(ov) => dropped(v, ov, &format!("{path}[{n}]"), out),
                    None => out.push(format!("{path}[{n}]")),
                }
            }
        }
        _ => {}
    }
}

/// Parses `doc` as `T`, failing with the path of a bad field or of any
/// field `T` does not know.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value, origin: &str) -> T {
    let typed: T = serde_path_to_error::deserialize(doc)
        .unwrap_or_else(|e| panic!("{origin}: field {}: {}", e.path(), e.inner()));
    let back = serde_json::to_value(&typed).unwrap();
    let mut unknown = Vec::new();
    dropped(doc, &back, "", &mut unknown);
    assert!(unknown.is_empty(), "{origin}: unknown fields {unknown:?}");
    typed
}

/// The Prometheus operator's PodMonitor (a CRD, not in k8s-openapi): the
/// fields we use, nothing else allowed.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace_selector: Option<NamespaceSelector>,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    #[serde(skip_serializing_if = "Option::is_none")]
    any: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    match_names: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMetricsEndpoint {
    port: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
}

/// kustomize's Kustomization: the fields we use.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    patches: Vec<KustomizePatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    images: Vec<KustomizeImage>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KustomizePatch {
    path: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KustomizeImage {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_tag: Option<String>,
}

/// Every parsed document of deploy/, by kind.
#[derive(Default)]
struct Parsed {
    daemonsets: Vec<DaemonSet>,
    pods: Vec<Pod>,
    config_maps: Vec<ConfigMap>,
    cluster_roles: Vec<ClusterRole>,
    kustomizations: Vec<Kustomization>,
    kinds: BTreeMap<String, usize>,
}

fn parse_all() -> Parsed {
    let mut parsed = Parsed::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "deploy/ YAML files: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (n, doc) in docs.into_iter().enumerate() {
            let origin = format!("{} document {n}", file.display());
            if doc.is_null() {
                continue;
            }
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let api = doc["apiVersion"].as_str().unwrap_or_default().to_string();
            *parsed.kinds.entry(kind.clone()).or_default() += 1;
            match (api.as_str(), kind.as_str()) {
                ("apps/v1", "DaemonSet") => parsed.daemonsets.push(strict(&doc, &origin)),
                ("v1", "Pod") => parsed.pods.push(strict(&doc, &origin)),
                ("v1", "ConfigMap") => parsed.config_maps.push(strict(&doc, &origin)),
                ("v1", "ServiceAccount") => {
                    strict::<ServiceAccount>(&doc, &origin);
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    parsed.cluster_roles.push(strict(&doc, &origin))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    strict::<ClusterRoleBinding>(&doc, &origin);
                }
                ("monitoring.coreos.com/v1", "PodMonitor") => {
                    strict::<PodMonitor>(&doc, &origin);
                }
                ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                    parsed.kustomizations.push(strict(&doc, &origin))
                }
                _ => panic!("{origin}: unexpected {api} {kind}"),
            }
        }
    }
    parsed
}

/// The container's args with `$(VAR)` expanded as the kubelet would, from
/// the container's env (field references get plausible values).
fn expanded_args(c: &Container) -> Vec<String> {
    let value = |e: &EnvVar| -> String {
        if let Some(v) = &e.value {
            return v.clone();
        }
        let field = e
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        match field {
            Some("spec.nodeName") => "node-a".into(),
            Some("status.hostIP" | "status.podIP") => "10.0.0.7".into(),
            other => panic!(
                "{}: env {} from {other:?}: add a test value",
                c.name, e.name
            ),
        }
    };
    let env: Vec<(String, String)> = c
        .env
        .iter()
        .flatten()
        .map(|e| (format!("$({})", e.name), value(e)))
        .collect();
    let mut args = vec!["kube-userspace-proxy".to_string()];
    for a in c
        .command
        .iter()
        .flatten()
        .skip(1)
        .chain(c.args.iter().flatten())
    {
        let mut a = a.clone();
        for (k, v) in &env {
            a = a.replace(k, v);
        }
        assert!(!a.contains("$("), "{}: unexpanded variable in {a}", c.name);
        args.push(a);
    }
    args
}

fn proxy_container<'a>(containers: &'a [Container], what: &str) -> &'a Container {
    containers
        .iter()
        .find(|c| {
            c.image
                .as_deref()
                .is_some_and(|i| i.starts_with("kube-userspace-proxy"))
        })
        .unwrap_or_else(|| panic!("{what}: no kube-userspace-proxy container"))
}

#[test]
fn every_deploy_yaml_parses_strictly_into_its_kubernetes_type() {
    let parsed = parse_all();
    for kind in [
        "DaemonSet",
        "Pod",
        "ConfigMap",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "PodMonitor",
        "Kustomization",
    ] {
        assert!(
            parsed.kinds.contains_key(kind),
            "no {kind} in deploy/: {:?}",
            parsed.kinds
        );
    }
    // The kustomization lists files that exist.
    for k in &parsed.kustomizations {
        for r in &k.resources {
            assert!(deploy_dir().join(r).is_file(), "kustomization: {r} missing");
        }
    }
}

#[test]
fn the_strict_parse_catches_a_typo() {
    let doc: Value = serde_saphyr::from_str(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers:\n    - name: a\n      imagePullPolicy: Always\n      imagePullPolcy: Always\n",
    )
    .unwrap();
    let r = std::panic::catch_unwind(|| strict::<Pod>(&doc, "typo"));
    let msg = r
        .err()
        .and_then(|e| e.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert!(msg.contains("spec.containers[0].imagePullPolcy"), "{msg}");
}

#[test]
fn daemonset_and_sidecar_args_parse_with_the_real_cli() {
    let parsed = parse_all();
    let ds = &parsed.daemonsets[0];
    let pod_spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = proxy_container(&pod_spec.containers, "DaemonSet");
    let args = expanded_args(c);
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("DaemonSet args {args:?}: {e}"));
    assert_eq!(cli.run.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(cli.run.healthz_bind_address.port(), 10256);

    // What the issue asks of the DaemonSet.
    assert_eq!(pod_spec.host_network, Some(true));
    assert_eq!(
        pod_spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(pod_spec
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    let probe = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
    );
    let res = c.resources.as_ref().unwrap();
    assert!(res.requests.is_some() && res.limits.is_some());
    let sc = c.security_context.as_ref().unwrap();
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_string(), "NET_BIND_SERVICE".to_string()][..])
    );
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    // Non-root; privilege escalation only so the binary's file capabilities
    // (bounded by the two above) apply: see tests/nonroot.rs.
    assert_eq!(sc.run_as_non_root, Some(true));
    assert!(sc.run_as_user.is_some_and(|u| u != 0));
    assert_eq!(sc.allow_privilege_escalation, Some(true));
    assert_ne!(sc.privileged, Some(true));

    // The sidecar: manifests from its ConfigMap, no iptables, non-root.
    let pod = &parsed.pods[0];
    let spec = pod.spec.as_ref().unwrap();
    let c = proxy_container(&spec.containers, "sidecar Pod");
    let args = expanded_args(c);
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("sidecar args {args:?}: {e}"));
    assert!(cli.run.manifests.is_some());
    assert_eq!(
        spec.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root),
        Some(true)
    );
    let ann = pod.metadata.annotations.as_ref().unwrap();
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(
        ann["prometheus.io/port"],
        cli.run.metrics_bind_address.port().to_string()
    );
}

#[test]
fn the_sidecar_manifests_configmap_is_served_without_problems() {
    let parsed = parse_all();
    let cm = &parsed.config_maps[0];
    let files: Vec<(String, String)> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (snapshot, problems) = manifests::parse(&files, &mut manifests::LastGood::default());
    assert!(problems.is_empty(), "{problems:?}");
    assert!(!snapshot.services.is_empty());
}

#[test]
fn rbac_is_read_only() {
    let parsed = parse_all();
    for role in &parsed.cluster_roles {
        for rule in role.rules.iter().flatten() {
            for verb in &rule.verbs {
                assert!(
                    ["get", "list", "watch"].contains(&verb.as_str()),
                    "verb {verb}"
                );
            }
            for r in rule.resources.iter().flatten() {
                assert!(
                    ["services", "endpointslices", "nodes"].contains(&r.as_str()),
                    "resource {r}"
                );
            }
        }
    }
}

/// One YAML document of deploy/kubeadm.
fn kubeadm_doc(file: &str) -> Value {
    let path = deploy_dir().join("kubeadm").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `patch` over `base` as kustomize's strategic merge does for a
/// DaemonSet: mappings merged key by key, lists of named items (containers,
/// volumes, mounts, env) merged by name, anything else replaced.
fn strategic_merge(base: &mut Value, patch: &Value) {
    let named = |v: &Value| {
        v.as_array()
            .is_some_and(|a| a.iter().all(|i| i["name"].is_string()))
    };
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(bv) => strategic_merge(bv, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b @ Value::Array(_), p) if named(b) && named(p) => {
            let items = b.as_array_mut().unwrap();
            for pi in p.as_array().unwrap() {
                match items.iter_mut().find(|i| i["name"] == pi["name"]) {
                    Some(bi) => strategic_merge(bi, pi),
                    None => items.push(pi.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

#[test]
fn kubeadms_daemonset_patched_runs_this_proxy_on_kubeadms_config() {
    let k: Kustomization = strict(
        &kubeadm_doc("kustomization.yaml"),
        "kubeadm/kustomization.yaml",
    );
    assert_eq!(k.resources, ["kube-proxy.yaml"]);
    assert_eq!(
        k.patches
            .iter()
            .map(|p| p.path.as_str())
            .collect::<Vec<_>>(),
        ["patch.yaml"]
    );
    let mut doc = kubeadm_doc("kube-proxy.yaml");
    let base: DaemonSet = strict(&doc, "kubeadm/kube-proxy.yaml");
    let base_spec = base.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        base_spec.containers[0].command.as_ref().unwrap()[0],
        "/usr/local/bin/kube-proxy"
    );
    strategic_merge(&mut doc, &kubeadm_doc("patch.yaml"));
    let ds: DaemonSet = strict(&doc, "kubeadm's DaemonSet with patch.yaml");

    // kubeadm's names: kube-system/kube-proxy, container kube-proxy, its
    // ConfigMap and service account.
    assert_eq!(ds.metadata.name.as_deref(), Some("kube-proxy"));
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("kube-proxy"));
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert_eq!(c.name, "kube-proxy");
    // The image is ours (renamed by the kustomization's `images:`), and it
    // has kube-proxy's path.
    let image = c.image.as_deref().unwrap();
    assert!(image.starts_with("kube-userspace-proxy:"), "{image}");
    assert!(k
        .images
        .iter()
        .any(|i| image.starts_with(&format!("{}:", i.name))));
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("ln -s kube-userspace-proxy /usr/local/bin/kube-proxy"));
    assert_eq!(
        c.command, base_spec.containers[0].command,
        "kubeadm's command, unchanged"
    );

    // --config names the ConfigMap's config.conf where the volume is mounted.
    let args = expanded_args(c);
    let config = args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.config_map
                .as_ref()
                .is_some_and(|m| m.name == "kube-proxy")
        })
        .expect("the kube-proxy ConfigMap volume");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .expect("mounted");
    assert_eq!(config, format!("{}/config.conf", mount.mount_path));

    // The hand-over: the default socket's directory is the node's, and
    // the rollout surges.
    let handover = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "handover")
        .expect("hand-over mount");
    let cli = Cli::try_parse_from(["x"]).unwrap();
    assert_eq!(
        cli.run.handover_socket.parent().unwrap(),
        Path::new(&handover.mount_path)
    );
    let rolling = spec
        .update_strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));

    // The args, with kubeadm's own config.conf at that path, resolve.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kubeadm/config.conf");
    let argv: Vec<String> = args
        .iter()
        .map(|a| match a.strip_prefix("--config=") {
            Some(_) => format!("--config={}", fixture.display()),
            None => a.clone(),
        })
        .collect();
    let matches = Cli::command().try_get_matches_from(&argv).unwrap();
    let (cli, _) = config_file::resolve(&matches).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert_eq!(cli.run.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(
        cli.run.kubeconfig.as_deref(),
        Some(Path::new(&format!("{}/kubeconfig.conf", mount.mount_path)))
    );
}

/// The series names (`kusp_*`, `kubeproxy_*`) an expression queries.
fn series_in(expr: &str) -> impl Iterator<Item = &str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("kusp_") || t.starts_with("kubeproxy_"))
}

#[test]
fn the_dashboard_queries_only_series_the_proxy_exports() {
    let path = deploy_dir().join("grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let known: BTreeMap<&str, &str> = kube_userspace_proxy::metrics::families().collect();
    let mut exprs: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["query"].as_str())
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let id = panel["id"].as_u64().unwrap();
        assert!(ids.insert(id), "panel id {id} twice");
        let mut refs = std::collections::BTreeSet::new();
        for target in panel["targets"].as_array().unwrap() {
            assert!(
                refs.insert(target["refId"].as_str().unwrap()),
                "panel {id}: refId twice"
            );
            exprs.push(target["expr"].as_str().unwrap());
        }
    }
    let mut used = std::collections::BTreeSet::new();
    for expr in exprs {
        for name in series_in(expr) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|base| known.get(base) == Some(&"histogram"))
                .unwrap_or(name);
            assert!(
                known.contains_key(family),
                "{name} in {expr:?} is not exported"
            );
            used.insert(family);
        }
    }
    for wanted in [
        "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
    ] {
        assert!(used.contains(wanted), "the dashboard shows {wanted}");
    }
}
