//! Discovery from the Kubernetes API: `v1 Service` and
//! `discovery.k8s.io/v1 EndpointSlice` listed and watched cluster-wide by
//! [`list_watch`], and this node's `v1 Node` (field selector
//! `metadata.name=NODE`, as upstream kube-proxy's node informer), joined by
//! [`build_snapshot_with`].
//!
//! Invariants:
//! - Nothing is published before the first complete list of *every* kind
//!   ([`spawn`] returns only then), so the proxier never starts from half a
//!   cluster and `/readyz` stays 503 until then. The Node list is quick
//!   even when it is empty (no Node of that name: no labels); with no node
//!   name there is no Node loop; a Node list the API forbids (403, RBAC
//!   without `nodes`) is warned about once ([`NODES_FORBIDDEN`]) and counts
//!   as empty, so Services are served without node labels.
//! - A relist (watch expiry with 410 Gone, a resource version ahead of a
//!   restored or fresh store, versions going backwards: see
//!   [`list_watch`]) replaces a kind's objects atomically when its list is
//!   complete: services that still exist keep their listeners and open
//!   connections throughout; services the new list lacks are removed.
//! - Bursts are coalesced: a snapshot is published once the watches have
//!   been quiet for [`DEBOUNCE`] (and at least every [`MAX_DELAY`] under a
//!   steady stream of changes), so a relist of 5,000 objects is one
//!   snapshot.
//! - One object that fails to decode never fails a list: objects are
//!   fetched as [`Raw`] JSON (only their metadata is read, leniently) and
//!   decoded into the k8s-openapi type one by one. One that fails is logged
//!   (kind, namespace/name, field, error) and skipped; if an earlier
//!   version of it decoded, that last good version stays.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::Event;
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::list_watch::{self, Target};
use super::raw::{ObjectKey, Raw};
use super::snapshot::{build_snapshot_with, Options, Sourced, ANNOTATION_TRIGGER_TIME};
use crate::model::Snapshot;

/// Quiet time after the last watch event before a snapshot is published:
/// long enough to coalesce a relist or a rollout's burst of slice updates,
/// short enough that a new Service is served well within a second.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Longest a change waits under a steady stream of events.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// The warning logged (once) when the API forbids listing or watching
/// this node's Node object: Services are still served, without node labels.
pub const NODES_FORBIDDEN: &str = "nodes: list/watch forbidden; topology hints and NodeCIDR need it \
     (grant get, list, watch on nodes, as deploy/clusterrole.yaml does); serving without node labels";

/// Environment variable set in every pod: its presence means in-cluster
/// configuration is available.
pub const IN_CLUSTER_ENV: &str = "KUBERNETES_SERVICE_HOST";

/// Errors that stop the Kubernetes source from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--kubeconfig` cannot be read or used.
    #[error("--kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// The file(s) named by `KUBECONFIG` cannot be read or used.
    #[error("KUBECONFIG: {0}")]
    KubeconfigEnv(kube::config::KubeconfigError),
    /// In-cluster configuration (service account token, CA) is unusable.
    #[error("in-cluster configuration: {0}")]
    InCluster(kube::config::InClusterError),
    /// `--master` is not a URL.
    #[error("--master {url:?}: {message}")]
    Master {
        /// The value given.
        url: String,
        /// Why it is not a URL.
        message: String,
    },
    /// The client cannot be built from the configuration (TLS, auth).
    #[error("cannot create the Kubernetes client: {0}")]
    Client(kube::Error),
    /// Stopped before the first complete list.
    #[error("stopped before the first list of services and endpointslices")]
    Cancelled,
}

/// Whether Kubernetes discovery is configured: `--kubeconfig`, `--master`,
/// a non-empty `KUBECONFIG`, or in-cluster (`KUBERNETES_SERVICE_HOST`).
/// A `~/.kube/config` alone does not count: a workstation run without flags
/// serves the embedded manifests, as documented.
pub fn configured(kubeconfig: Option<&Path>, master: Option<&str>) -> bool {
    let env = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    kubeconfig.is_some() || master.is_some() || env("KUBECONFIG") || env(IN_CLUSTER_ENV)
}

/// The client configuration, like kube-proxy's `BuildConfigFromFlags`:
/// `--kubeconfig PATH`, else `KUBECONFIG`, else in-cluster; `--master`
/// overrides the server URL. `--master` without a kubeconfig uses the
/// in-cluster credentials when in a pod (a DaemonSet replacing kube-proxy
/// must reach the API server directly, not through the `kubernetes`
/// Service it serves itself), and none otherwise. TLS (CA data or file,
/// insecure-skip-tls-verify, client certificates) and credentials (tokens,
/// token files, exec) are kube's own kubeconfig handling.
pub async fn config(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
) -> Result<kube::Config, Error> {
    let opts = KubeConfigOptions::default();
    let env = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let mut config = if let Some(path) = kubeconfig {
        let err = |source| Error::Kubeconfig {
            path: path.to_owned(),
            source,
        };
        let kc = Kubeconfig::read_from(path).map_err(err)?;
        kube::Config::from_custom_kubeconfig(kc, &opts)
            .await
            .map_err(err)?
    } else if env("KUBECONFIG") {
        kube::Config::from_kubeconfig(&opts)
            .await
            .map_err(Error::KubeconfigEnv)?
    } else if let (Some(url), false) = (master, env(IN_CLUSTER_ENV)) {
        kube::Config::new(parse_master(url)?)
    } else {
        kube::Config::incluster().map_err(Error::InCluster)?
    };
    if let Some(url) = master {
        config.cluster_url = parse_master(url)?;
    }
    Ok(config)
}

fn parse_master(url: &str) -> Result<http::Uri, Error> {
    let err = |message: String| Error::Master {
        url: url.into(),
        message,
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| err(e.to_string()))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(err("want http(s)://HOST[:PORT]".into())),
    }
}

/// A client for `config`, without kube's own retries: the list/watch loop
/// classifies and retries every failure itself, and kube's transparent
/// retry of 429/503/504 (up to 15 times, honouring `Retry-After`) would
/// hide a too-large resource version's 504 for a minute.
pub fn client(mut config: kube::Config) -> Result<Client, Error> {
    config.default_retry = false;
    Client::try_from(config).map_err(Error::Client)
}

// === impl Store ===

/// The decoded objects of one kind, fed by its watcher's events.
pub struct Store<K> {
    kind: &'static str,
    objects: BTreeMap<ObjectKey, K>,
    /// Objects of a list in progress; replaces `objects` when complete.
    listing: Option<BTreeMap<ObjectKey, K>>,
    /// A complete list has been seen.
    synced: bool,
}

/// What the API told us about one kind: the objects, trimmed of what the
/// proxy never reads.
pub trait Trim {
    /// Drops large fields the proxy does not use (managed fields,
    /// annotations), to keep a large cluster's stores small.
    fn trim(&mut self);
}

impl Trim for Service {
    fn trim(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.annotations = None;
    }
}

impl Trim for EndpointSlice {
    /// Of the annotations, only [`ANNOTATION_TRIGGER_TIME`] is read.
    fn trim(&mut self) {
        self.metadata.managed_fields = None;
        if let Some(a) = self.metadata.annotations.as_mut() {
            a.retain(|k, _| k == ANNOTATION_TRIGGER_TIME);
        }
    }
}

impl Trim for Node {
    /// Only labels and `spec.podCIDR(s)` are read: the status (images,
    /// conditions, heartbeats) goes too.
    fn trim(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.annotations = None;
        self.status = None;
    }
}

impl<K: DeserializeOwned + Clone + Trim> Store<K> {
    /// An empty, not yet synced store of `kind`.
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            objects: BTreeMap::new(),
            listing: None,
            synced: false,
        }
    }

    /// Whether a complete list has been applied.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The current objects.
    pub fn objects(&self) -> impl Iterator<Item = &K> {
        self.objects.values()
    }

    fn decoded(&self, raw: &Raw<K>) -> Option<K> {
        match raw.decode() {
            Ok(mut obj) => {
                obj.trim();
                Some(obj)
            }
            Err(error) => {
                let key = raw.key();
                let kept = self.objects.contains_key(&key);
                tracing::warn!(
                    kind = self.kind,
                    object = %key,
                    %error,
                    kept_last_good = kept,
                    "cannot decode object; skipped"
                );
                ::metrics::counter!(crate::metrics::DISCOVERY_DECODE_ERRORS, "kind" => self.kind)
                    .increment(1);
                None
            }
        }
    }

    /// Applies one watcher event; true when the visible objects changed
    /// (or may have: a completed list always counts).
    pub fn apply(&mut self, event: Event<Raw<K>>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(raw) => {
                let key = raw.key();
                let obj = self
                    .decoded(&raw)
                    .or_else(|| self.objects.get(&key).cloned());
                if let (Some(obj), Some(listing)) = (obj, self.listing.as_mut()) {
                    listing.insert(key, obj);
                }
                false
            }
            Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    tracing::info!(kind = self.kind, objects = listing.len(), "listed");
                    self.objects = listing;
                }
                self.synced = true;
                true
            }
            Event::Apply(raw) => match self.decoded(&raw) {
                Some(obj) => {
                    self.objects.insert(raw.key(), obj);
                    true
                }
                None => false,
            },
            Event::Delete(raw) => self.objects.remove(&raw.key()).is_some(),
        }
    }
}

// === the source ===

/// Starts watching and returns once the first complete snapshot (every kind
/// listed: Services, EndpointSlices and, when `options.node_name` is set,
/// this node's Node) is published; keeps publishing until `cancel` fires. While the
/// API server is unreachable it retries with back-off and does not return:
/// callers select on their own stop signal (or cancel).
pub async fn spawn(
    client: Client,
    options: Options,
    cancel: CancellationToken,
) -> Result<watch::Receiver<Arc<Snapshot>>, Error> {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let (first_tx, first_rx) = oneshot::channel();
    let source = KubeSource {
        services: Store::new("Service"),
        slices: Store::new("EndpointSlice"),
        nodes: options.node_name.is_some().then(|| Store::new("Node")),
        options,
        last: Snapshot::default(),
        reported: BTreeSet::new(),
        tx,
        first: Some(first_tx),
    };
    tokio::spawn(source.run(client, cancel.clone()));
    tokio::select! {
        r = first_rx => r.map_err(|_| Error::Cancelled)?,
        _ = cancel.cancelled() => return Err(Error::Cancelled),
    }
    // As from the manifests source: the first snapshot counts as seen.
    let mut rx = rx;
    rx.borrow_and_update();
    Ok(rx)
}

struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    /// This node's Node (at most one object); `None` without a node name.
    nodes: Option<Store<Node>>,
    options: Options,
    /// The last snapshot built, for build_snapshot's last-good-state.
    last: Snapshot,
    /// Problems already logged, so each is logged once, not per snapshot.
    reported: BTreeSet<String>,
    tx: watch::Sender<Arc<Snapshot>>,
    first: Option<oneshot::Sender<()>>,
}

impl KubeSource {
    async fn run(mut self, client: Client, cancel: CancellationToken) {
        let mut services = list_watch::spawn(
            Api::<Raw<Service>>::all(client.clone()),
            Target::all("Service"),
            cancel.clone(),
        );
        let mut slices = list_watch::spawn(
            Api::<Raw<EndpointSlice>>::all(client.clone()),
            Target::all("EndpointSlice"),
            cancel.clone(),
        );
        let mut nodes = self.options.node_name.as_ref().map(|name| {
            list_watch::spawn(
                Api::<Raw<Node>>::all(client),
                node_target(name),
                cancel.clone(),
            )
        });
        // (first unpublished change, latest change)
        let mut pending: Option<(Instant, Instant)> = None;
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        loop {
            let deadline = pending.map_or(far, |(first, last)| {
                (last + DEBOUNCE).min(first + MAX_DELAY)
            });
            let changed = tokio::select! {
                _ = cancel.cancelled() => return,
                Some(ev) = services.recv() => self.services.apply(ev),
                Some(ev) = slices.recv() => self.slices.apply(ev),
                Some(ev) = recv_some(&mut nodes) => {
                    self.nodes.as_mut().is_some_and(|n| n.apply(ev))
                }
                _ = tokio::time::sleep_until(deadline), if pending.is_some() => {
                    // Before every first list is complete nothing is
                    // published; the last one's InitDone re-arms.
                    if self.synced() {
                        self.publish();
                    }
                    pending = None;
                    continue;
                }
                else => return,
            };
            if changed {
                let now = Instant::now();
                pending = Some(pending.map_or((now, now), |(first, _)| (first, now)));
            }
        }
    }

    /// Every kind has had a complete first list.
    fn synced(&self) -> bool {
        self.services.synced()
            && self.slices.synced()
            && self.nodes.as_ref().is_none_or(Store::synced)
    }

    fn publish(&mut self) {
        let origin = || "api".to_string();
        let services: Vec<Sourced<Service>> = self
            .services
            .objects()
            .map(|s| Sourced {
                origin: origin(),
                object: s.clone(),
            })
            .collect();
        let slices: Vec<Sourced<EndpointSlice>> = self
            .slices
            .objects()
            .map(|s| Sourced {
                origin: origin(),
                object: s.clone(),
            })
            .collect();
        let nodes: Vec<Sourced<Node>> = self
            .nodes
            .iter()
            .flat_map(Store::objects)
            .map(|n| Sourced {
                origin: origin(),
                object: n.clone(),
            })
            .collect();
        let (snapshot, problems) =
            build_snapshot_with(&services, &slices, &nodes, &self.last, &self.options);
        let now: BTreeSet<String> = problems.iter().map(|p| p.to_string()).collect();
        for p in &problems {
            if !self.reported.contains(&p.to_string()) {
                tracing::warn!(
                    object = %p.object,
                    field = %p.field,
                    "skipped: {}",
                    p.message
                );
            }
        }
        self.reported = now;
        self.last = snapshot.clone();
        let count = snapshot.services.len();
        let changed = self.tx.send_if_modified(|cur| {
            if **cur == snapshot {
                false
            } else {
                *cur = Arc::new(snapshot);
                true
            }
        });
        if let Some(first) = self.first.take() {
            tracing::info!(
                services = services.len(),
                endpointslices = slices.len(),
                node = nodes.len(),
                service_ports = count,
                "first list of services, endpointslices and this node complete"
            );
            let _ = first.send(());
        } else if changed {
            tracing::debug!(service_ports = count, "snapshot published");
        }
    }
}

/// The Node loop's target: this node only (`metadata.name=NAME`), and
/// optional ([`NODES_FORBIDDEN`]).
fn node_target(name: &str) -> Target {
    Target {
        kind: "Node",
        field_selector: Some(format!("metadata.name={name}")),
        if_forbidden: Some(NODES_FORBIDDEN),
    }
}

/// The next event of an optional loop; never ready without one.
async fn recv_some<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn raw_service(v: Value) -> Raw<Service> {
        Raw::new(v)
    }

    #[test]
    fn store_keeps_the_last_good_version_and_swaps_lists_atomically() {
        let good = |port: i64| {
            raw_service(serde_json::json!({
                "metadata": {"name": "web", "namespace": "ns"},
                "spec": {"ports": [{"port": port}]}
            }))
        };
        let bad = raw_service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"ports": [{"port": "x"}]}
        }));
        let mut s = Store::<Service>::new("Service");
        assert!(!s.apply(Event::Init));
        s.apply(Event::InitApply(good(80)));
        assert_eq!(s.objects().count(), 0, "not visible before InitDone");
        assert!(s.apply(Event::InitDone));
        assert!(s.synced());
        assert!(!s.apply(Event::Apply(bad.clone())), "bad update ignored");
        let port = |s: &Store<Service>| {
            s.objects()
                .next()
                .unwrap()
                .spec
                .as_ref()
                .unwrap()
                .ports
                .as_ref()
                .unwrap()[0]
                .port
        };
        assert_eq!(port(&s), 80);
        // A relist where it is undecodable keeps the last good version.
        s.apply(Event::Init);
        s.apply(Event::InitApply(bad));
        s.apply(Event::InitDone);
        assert_eq!(port(&s), 80);
        // A relist without it removes it.
        s.apply(Event::Init);
        s.apply(Event::InitDone);
        assert_eq!(s.objects().count(), 0);
    }

    #[test]
    fn the_node_loop_selects_this_node_only_is_optional_and_drops_status() {
        let t = node_target("node-a");
        assert_eq!(t.kind, "Node");
        assert_eq!(t.field_selector.as_deref(), Some("metadata.name=node-a"));
        assert_eq!(t.if_forbidden, Some(NODES_FORBIDDEN));
        assert!(NODES_FORBIDDEN
            .starts_with("nodes: list/watch forbidden; topology hints and NodeCIDR need it"));

        let mut s = Store::<Node>::new("Node");
        s.apply(Event::Init);
        s.apply(Event::InitApply(Raw::new(serde_json::json!({
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z"},
                "annotations": {"a": "b"}},
            "spec": {"podCIDRs": ["10.244.0.0/24"]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))));
        assert!(s.apply(Event::InitDone));
        let n = s.objects().next().unwrap();
        assert!(n.status.is_none() && n.metadata.annotations.is_none());
        assert_eq!(
            n.metadata.labels.as_ref().unwrap()["topology.kubernetes.io/zone"],
            "z"
        );
        assert_eq!(
            n.spec.as_ref().unwrap().pod_cidrs.as_ref().unwrap()[0],
            "10.244.0.0/24"
        );
    }

    #[test]
    fn a_slice_keeps_only_its_trigger_time_annotation() {
        let mut s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-a", "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": "2025-01-02T03:04:05Z",
                "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "addressType": "IPv4", "endpoints": []
        }))
        .unwrap();
        s.trim();
        let kept: Vec<&String> = s
            .metadata
            .annotations
            .iter()
            .flatten()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kept, [ANNOTATION_TRIGGER_TIME]);
    }

    #[test]
    fn master_must_be_an_http_url() {
        assert!(parse_master("https://10.0.0.1:6443").is_ok());
        assert!(parse_master("10.0.0.1:6443").is_err());
        assert!(parse_master("ftp://x").is_err());
    }
}
