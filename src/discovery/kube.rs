//! Discovery from the Kubernetes API: `v1 Service` and
//! `discovery.k8s.io/v1 EndpointSlice` listed and watched cluster-wide by
//! [`list_watch`], joined by [`build_snapshot_with`].
//!
//! Invariants:
//! - Nothing is published before the first complete list of *both* kinds
//!   ([`spawn`] returns only then), so the proxier never starts from half a
//!   cluster and `/readyz` stays 503 until then.
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
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::Event;
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{build_snapshot_with, list_watch, Options, Sourced};
use crate::model::Snapshot;

/// Quiet time after the last watch event before a snapshot is published:
/// long enough to coalesce a relist or a rollout's burst of slice updates,
/// short enough that a new Service is served well within a second.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Longest a change waits under a steady stream of events.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// First retry delay after a failed list or watch; doubles up to
/// [`BACKOFF_MAX`]. Shorter than client-go's 800 ms so an API server restart
/// costs little, jittered so a DaemonSet's pods do not retry in lock-step.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);

/// Longest retry delay while the API server stays unreachable.
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);

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

// === impl Raw ===

/// An object of kind `K` as the API sent it: JSON plus leniently read
/// metadata. Lists and watch events of `Raw` objects never fail on one
/// object's content; [`Raw::decode`] turns each into `K` separately.
pub struct Raw<K> {
    meta: ObjectMeta,
    value: Value,
    _kind: PhantomData<fn() -> K>,
}

impl<K> Raw<K> {
    /// Wraps a JSON object.
    pub fn new(value: Value) -> Self {
        Self {
            meta: lenient_meta(&value),
            value,
            _kind: PhantomData,
        }
    }

    /// `namespace/name`, for logs and as the store key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            namespace: self.meta.namespace.clone().unwrap_or_default(),
            name: self.meta.name.clone().unwrap_or_default(),
        }
    }
}

impl<K: DeserializeOwned> Raw<K> {
    /// Decodes into the typed object, naming the failing field.
    pub fn decode(&self) -> Result<K, String> {
        serde_path_to_error::deserialize(&self.value).map_err(|e| {
            let path = e.path().to_string();
            format!("field {path}: {}", e.into_inner())
        })
    }
}

/// The object's metadata if it decodes, else its name, namespace and
/// resourceVersion read one by one (what the watcher and store need).
fn lenient_meta(v: &Value) -> ObjectMeta {
    let m = v.get("metadata");
    if let Some(Ok(meta)) = m.map(ObjectMeta::deserialize) {
        return meta;
    }
    let s = |k: &str| {
        m.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .map(String::from)
    };
    ObjectMeta {
        name: s("name"),
        namespace: s("namespace"),
        resource_version: s("resourceVersion"),
        ..ObjectMeta::default()
    }
}

impl<K> Clone for Raw<K> {
    fn clone(&self) -> Self {
        Self {
            meta: self.meta.clone(),
            value: self.value.clone(),
            _kind: PhantomData,
        }
    }
}

impl<K> fmt::Debug for Raw<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Raw")
            .field("namespace", &self.meta.namespace)
            .field("name", &self.meta.name)
            .finish_non_exhaustive()
    }
}

impl<'de, K> serde::Deserialize<'de> for Raw<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Self::new)
    }
}

impl<K: k8s_openapi::Resource> kube::Resource for Raw<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        K::KIND.into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        K::GROUP.into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        K::VERSION.into()
    }
    fn api_version(_: &()) -> std::borrow::Cow<'_, str> {
        K::API_VERSION.into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        K::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

/// `namespace/name` of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Namespace (empty for cluster-scoped objects).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
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
    fn trim(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.annotations = None;
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

// === Backoff ===

/// Exponential back-off with jitter between [`BACKOFF_MIN`] and
/// [`BACKOFF_MAX`], reset by the first successful event.
#[derive(Debug)]
pub struct Retry {
    next: Duration,
    seed: u64,
}

impl Default for Retry {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() as u64 | 1);
        Self {
            next: BACKOFF_MIN,
            seed,
        }
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // xorshift: jitter of up to +25%, no need for a real RNG.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let jitter = base.mul_f64((self.seed % 1000) as f64 / 4000.0);
        Some(base + jitter)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

// === the source ===

/// Starts watching and returns once the first complete snapshot (both kinds
/// listed) is published; keeps publishing until `cancel` fires. While the
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
            "Service",
            cancel.clone(),
        );
        let mut slices = list_watch::spawn(
            Api::<Raw<EndpointSlice>>::all(client),
            "EndpointSlice",
            cancel.clone(),
        );
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
                _ = tokio::time::sleep_until(deadline), if pending.is_some() => {
                    // Before both first lists are complete nothing is
                    // published; the second one's InitDone re-arms.
                    if self.services.synced() && self.slices.synced() {
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
        let (snapshot, problems) =
            build_snapshot_with(&services, &slices, &self.last, &self.options);
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
                service_ports = count,
                "first list of services and endpointslices complete"
            );
            let _ = first.send(());
        } else if changed {
            tracing::debug!(service_ports = count, "snapshot published");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_service(v: Value) -> Raw<Service> {
        Raw::new(v)
    }

    #[test]
    fn a_broken_object_decodes_to_a_named_field_error_and_keeps_its_key() {
        let raw = raw_service(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"ports": [{"port": "eighty"}]}
        }));
        let err = raw.decode().unwrap_err();
        assert!(err.contains("spec.ports[0].port"), "{err}");
        assert_eq!(raw.key().to_string(), "ns/web");
        assert_eq!(raw.meta.resource_version.as_deref(), Some("7"));
    }

    #[test]
    fn broken_metadata_still_yields_name_and_resource_version() {
        let raw = raw_service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns", "resourceVersion": "9", "labels": 5}
        }));
        assert_eq!(raw.key().to_string(), "ns/web");
        assert_eq!(raw.meta.resource_version.as_deref(), Some("9"));
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
    fn retry_grows_to_the_cap_and_resets() {
        let mut r = Retry::default();
        let first = r.next().unwrap();
        assert!(first >= BACKOFF_MIN && first <= BACKOFF_MIN.mul_f64(1.25));
        for _ in 0..20 {
            r.next();
        }
        assert!(r.next().unwrap() <= BACKOFF_MAX.mul_f64(1.25));
        r.reset();
        assert!(r.next().unwrap() <= BACKOFF_MIN.mul_f64(1.25));
    }

    #[test]
    fn master_must_be_an_http_url() {
        assert!(parse_master("https://10.0.0.1:6443").is_ok());
        assert!(parse_master("10.0.0.1:6443").is_err());
        assert!(parse_master("ftp://x").is_err());
    }
}
