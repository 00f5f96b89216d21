//! An in-process fake Kubernetes API server (HTTP on 127.0.0.1) speaking
//! the real list/watch protocol for `v1 Service`,
//! `discovery.k8s.io/v1 EndpointSlice` and `v1 Node`, so the real
//! `kube::Client` and watcher can be driven through a kubeconfig:
//!
//! - Nodes are cluster-scoped (no `metadata.namespace`); their lists and
//!   watches honour `fieldSelector=metadata.name=NAME` (the only field
//!   selector the fake knows, as kube-proxy uses it), a list then holding
//!   zero or one item; [`FakeApi::forbid`] answers every request for a kind
//!   with kube-apiserver's 403 (`NewForbidden` with the RBAC authorizer's
//!   reason: `nodes is forbidden: User "..." cannot list resource "nodes"
//!   in API group "" at the cluster scope`, reason `Forbidden`,
//!   `details.kind` the resource);
//! - one global `resourceVersion` counter (like etcd's revision), stamped
//!   on every write; lists report it in `metadata.resourceVersion` and
//!   leave `apiVersion`/`kind` off their items, as the real server does;
//! - `?watch=true&resourceVersion=N` streams chunked JSON events
//!   (`ADDED`/`MODIFIED`/`DELETED`, `BOOKMARK` when
//!   `allowWatchBookmarks=true`) after N; a version older than the
//!   retained history gets an `ERROR` event with a 410 `Expired` Status and
//!   the watch closes; `timeoutSeconds` closes the watch cleanly;
//! - a bearer token is required when configured;
//! - [`FakeApi::stop`] drops every connection mid-stream (a crash),
//!   [`FakeApi::start`] serves again on the same port with history
//!   compacted (a restarted server's watch cache), [`FakeApi::expire`]
//!   closes open watches and compacts (410 on re-watch);
//! - a store restored or started afresh below the versions clients hold:
//!   [`FakeApi::start_fresh`] (a crash, then an empty etcd at a lower
//!   revision), [`FakeApi::restore`] (the same, open watches closed
//!   cleanly), [`FakeApi::rewind`] (open watches stay and go on with the
//!   lower versions, no error);
//! - a watch or list from a version ahead of the store waits up to 3 s
//!   (kube-apiserver's watch cache `blockTimeout`) for the store to reach
//!   it, then fails as kube-apiserver does
//!   (`storage.NewTooLargeResourceVersionError` over
//!   `apierrors.NewTimeoutError`): a `Status` with code 504, reason
//!   `Timeout`, message `Timeout: Too large resource version: N, current:
//!   M`, `details.causes[0].reason` `ResourceVersionTooLarge` and
//!   `retryAfterSeconds: 1`. A list gets it as the HTTP response (with
//!   `Retry-After: 1`, as apiserver's `ErrorNegotiated` adds); a watch
//!   as an `ERROR` event on a 200 stream (the cacher turns errors after the
//!   version parsed into events), or as the HTTP response with
//!   [`TooLarge::Http`]. (A real cacher's *plain* watch from such a
//!   version is accepted and stays silent instead; the client's probe
//!   covers that case.)
//!
//! Objects are stored as raw JSON, so a test can store one that no client
//! can decode.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// The kinds the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn of(obj: &Value) -> Kind {
        match obj["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("Node") => Kind::Node,
            other => panic!("fake API: unsupported kind {other:?}"),
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    /// The resource in URLs and RBAC.
    fn resource(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    /// The API group ("" for the core group).
    fn group(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "",
            Kind::EndpointSlice => "discovery.k8s.io",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }
}

#[derive(Clone, Debug)]
struct Event {
    /// The store's generation: bumped when it is replaced by a lower one.
    epoch: u64,
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

struct Store {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Event>,
    /// Watches from a version below this get 410 Expired.
    floor: u64,
    /// Bumped each time the store is replaced ([`FakeApi::rewind`]...).
    epoch: u64,
}

/// How a watch from a version ahead of the store is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TooLarge {
    /// An `ERROR` event carrying the Status, then the stream closes.
    Event,
    /// The Status as the HTTP response (504), no stream.
    Http,
}

/// kube-apiserver's watch cache `blockTimeout`.
pub const BLOCK_TIMEOUT: Duration = Duration::from_secs(3);

struct Inner {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    token: Option<String>,
    lists: AtomicUsize,
    /// List requests with a `continue` token (pages after the first).
    pages: AtomicUsize,
    watches: AtomicUsize,
    /// Cancelled to close every open watch (expiry), replaced after.
    watch_gen: Mutex<CancellationToken>,
    /// (form, wait) of a too-large answer to a watch.
    too_large: Mutex<(TooLarge, Duration)>,
    /// Too-large answers sent (lists and watches).
    too_large_sent: AtomicUsize,
    /// Lists with `limit=1` and no `continue`: clients probing the store's
    /// version.
    probes: AtomicUsize,
    /// Kinds answered with 403 Forbidden.
    forbidden: Mutex<Vec<Kind>>,
    /// Requests answered with 403 Forbidden.
    forbidden_sent: AtomicUsize,
    /// `fieldSelector` of every request (in arrival order), per kind.
    selectors: Mutex<Vec<(Kind, bool, Option<String>)>>,
}

/// The fake server; serves until dropped or [`FakeApi::stop`]ped.
pub struct FakeApi {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    running: Mutex<Option<CancellationToken>>,
    tls: Option<Arc<Tls>>,
}

/// How a kubeconfig from [`FakeApi::kubeconfig_with`] trusts a TLS server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// `certificate-authority-data`: the fake's CA.
    Ca,
    /// `insecure-skip-tls-verify: true`.
    Insecure,
    /// Nothing: the system roots, which do not know the fake's CA.
    Nothing,
}

/// A CA and a server certificate for 127.0.0.1 made with `openssl`.
pub struct Tls {
    pub ca_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Tls {
    fn new() -> Tls {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let dir = tempfile::tempdir().unwrap();
        let d = |f: &str| dir.path().join(f).display().to_string();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    &d("ca.key"),
                    "-out",
                    &d("ca.crt"),
                    "-days",
                    "2",
                    "-subj",
                    "/CN=fake-api-ca",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    &d("srv.key"),
                    "-out",
                    &d("srv.csr"),
                    "-subj",
                    "/CN=fake-api",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            d("ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &d("srv.csr"),
            "-CA",
            &d("ca.crt"),
            "-CAkey",
            &d("ca.key"),
            "-CAcreateserial",
            "-out",
            &d("srv.crt"),
            "-days",
            "2",
            "-extfile",
            &d("ext"),
        ]);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(d("srv.crt"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(d("srv.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Tls {
            ca_pem: std::fs::read_to_string(d("ca.crt")).unwrap(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }
}

/// The bearer token kubeconfigs from [`FakeApi::kubeconfig`] carry.
pub const TOKEN: &str = "fake-api-token";

impl FakeApi {
    /// A fake requiring [`TOKEN`], serving on a fresh port.
    pub async fn new() -> FakeApi {
        Self::with_token(Some(TOKEN.into())).await
    }

    /// A fake requiring `token` (or nothing), serving on a fresh port.
    pub async fn with_token(token: Option<String>) -> FakeApi {
        Self::build(token, None).await
    }

    /// A fake requiring [`TOKEN`] over HTTPS, with a certificate for
    /// 127.0.0.1 from its own CA.
    pub async fn tls() -> FakeApi {
        Self::build(Some(TOKEN.into()), Some(Arc::new(Tls::new()))).await
    }

    async fn build(token: Option<String>, tls: Option<Arc<Tls>>) -> FakeApi {
        let (events, _) = broadcast::channel(65536);
        let inner = Arc::new(Inner {
            store: Mutex::new(Store {
                rv: 100,
                objects: BTreeMap::new(),
                history: Vec::new(),
                floor: 0,
                epoch: 0,
            }),
            events,
            token,
            lists: AtomicUsize::new(0),
            pages: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
            watch_gen: Mutex::new(CancellationToken::new()),
            too_large: Mutex::new((TooLarge::Event, BLOCK_TIMEOUT)),
            too_large_sent: AtomicUsize::new(0),
            probes: AtomicUsize::new(0),
            forbidden: Mutex::new(Vec::new()),
            forbidden_sent: AtomicUsize::new(0),
            selectors: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = FakeApi {
            addr,
            inner,
            running: Mutex::new(None),
            tls,
        };
        api.serve(listener);
        api
    }

    /// A fake whose port is reserved but not served yet: the API server is
    /// down until [`FakeApi::start`].
    pub async fn down() -> FakeApi {
        let api = Self::new().await;
        api.stop();
        api
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (bearer token auth; over TLS,
    /// trusting its CA) into `dir`.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        self.kubeconfig_with(dir, Trust::Ca)
    }

    /// [`FakeApi::kubeconfig`] with the given TLS trust.
    pub fn kubeconfig_with(&self, dir: &std::path::Path, trust: Trust) -> std::path::PathBuf {
        use base64::Engine;
        let path = dir.join("kubeconfig");
        let token = self.inner.token.clone().unwrap_or_default();
        let trust = match (&self.tls, trust) {
            (Some(tls), Trust::Ca) => format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(&tls.ca_pem)
            ),
            (Some(_), Trust::Insecure) => "    insecure-skip-tls-verify: true\n".into(),
            _ => String::new(),
        };
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n{trust}\
                 users:\n- name: tester\n  user:\n    token: {token}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n\
                 current-context: fake\n",
                self.url()
            ),
        )
        .unwrap();
        path
    }

    /// kubeadm's `kubeconfig.conf` (tests/fixtures/kubeadm) for this
    /// server, written into `dir`: its `server`, and the CA and token files
    /// it names (a pod's service account files) in `dir` too. Over TLS.
    pub fn kubeadm_kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let tls = self
            .tls
            .as_ref()
            .expect("kubeadm's kubeconfig trusts a CA: FakeApi::tls()");
        let (ca, token) = (dir.join("ca.crt"), dir.join("token"));
        std::fs::write(&ca, &tls.ca_pem).unwrap();
        std::fs::write(&token, self.inner.token.clone().unwrap_or_default()).unwrap();
        let text = include_str!("../fixtures/kubeadm/kubeconfig.conf")
            .replace("https://controlplane:6443", &self.url())
            .replace(
                "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
                &ca.display().to_string(),
            )
            .replace(
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
                &token.display().to_string(),
            );
        let path = dir.join("kubeconfig.conf");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let cancel = CancellationToken::new();
        *self.running.lock().unwrap() = Some(cancel.clone());
        let router = router(Arc::clone(&self.inner));
        let tls = self.tls.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(s) => s,
                        Err(_) => continue,
                    },
                };
                let svc = hyper_util::service::TowerToHyperService::new(router.clone());
                let cancel = cancel.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    // Dropping the connection closes the socket mid-stream.
                    match tls {
                        None => {
                            let conn =
                                http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = cancel.cancelled() => {}
                            }
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.acceptor.accept(stream).await else {
                                return;
                            };
                            let conn =
                                http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = cancel.cancelled() => {}
                            }
                        }
                    }
                });
            }
        });
    }

    /// Crashes the server: stops listening and drops every connection.
    pub fn stop(&self) {
        if let Some(c) = self.running.lock().unwrap().take() {
            c.cancel();
        }
    }

    /// Serves again on the same port, with history compacted: a restarted
    /// API server. Retries the bind briefly while the old socket closes.
    pub async fn start(&self) {
        self.stop();
        self.compact();
        self.rebind().await;
    }

    /// A crash, then a restart on an empty store whose revision is `rv`
    /// (below the versions clients hold: an etcd restored or started
    /// afresh). Nothing of the old store remains.
    pub async fn start_fresh(&self, rv: u64) {
        self.stop();
        self.reset_store(rv);
        self.rebind().await;
    }

    /// The store is replaced by an empty one at revision `rv` while the
    /// server runs, and open watches close cleanly (a graceful restart):
    /// clients re-watch from versions the store has not reached.
    pub fn restore(&self, rv: u64) {
        self.reset_store(rv);
        self.close_watches();
    }

    /// The store is replaced by an empty one at revision `rv` and open
    /// watches stay open: later writes reach them with versions below the
    /// ones they already delivered, and no error says so.
    pub fn rewind(&self, rv: u64) {
        self.reset_store(rv);
    }

    /// Sets how watches from a version ahead of the store are refused, and
    /// how long the server first waits for the store to reach it.
    pub fn set_too_large(&self, form: TooLarge, wait: Duration) {
        *self.inner.too_large.lock().unwrap() = (form, wait);
    }

    /// Too-large answers sent so far (lists and watches).
    pub fn too_large_sent(&self) -> usize {
        self.inner.too_large_sent.load(Ordering::Relaxed)
    }

    /// One-item lists (probes of the store's version) served so far.
    pub fn probes(&self) -> usize {
        self.inner.probes.load(Ordering::Relaxed)
    }

    fn reset_store(&self, rv: u64) {
        let mut s = self.inner.store.lock().unwrap();
        s.rv = rv;
        s.objects.clear();
        s.history.clear();
        s.floor = 0;
        s.epoch += 1;
    }

    async fn rebind(&self) {
        for _ in 0..100 {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => return self.serve(l),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        panic!("fake API: cannot re-bind {}", self.addr);
    }

    /// Forgets history: every watch from an older version gets 410.
    pub fn compact(&self) {
        let mut s = self.inner.store.lock().unwrap();
        s.history.clear();
        s.floor = s.rv + 1;
    }

    /// Closes every open watch and compacts: clients must relist.
    pub fn expire(&self) {
        self.compact();
        self.close_watches();
    }

    fn close_watches(&self) {
        let mut g = self.inner.watch_gen.lock().unwrap();
        g.cancel();
        *g = CancellationToken::new();
    }

    /// Answers every request for `kind` with 403 Forbidden (`true`), or
    /// serves it again (`false`).
    pub fn forbid(&self, kind: Kind, forbidden: bool) {
        let mut f = self.inner.forbidden.lock().unwrap();
        f.retain(|k| *k != kind);
        if forbidden {
            f.push(kind);
        }
    }

    /// Requests answered with 403 so far.
    pub fn forbidden_sent(&self) -> usize {
        self.inner.forbidden_sent.load(Ordering::Relaxed)
    }

    /// The `fieldSelector` of every request for `kind` so far, as
    /// (watch, selector), in arrival order.
    pub fn selectors(&self, kind: Kind) -> Vec<(bool, Option<String>)> {
        let all = self.inner.selectors.lock().unwrap();
        all.iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, w, s)| (*w, s.clone()))
            .collect()
    }

    /// Creates or replaces an object (raw JSON: it need not decode).
    /// Namespaced objects without a namespace go to `default`; Nodes have
    /// none.
    pub fn apply(&self, mut obj: Value) {
        let kind = Kind::of(&obj);
        let mut s = self.inner.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let ns = if kind.namespaced() {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if kind.namespaced() {
            obj["metadata"]["namespace"] = json!(ns);
        }
        let key = (kind, ns, name);
        let type_ = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key, obj.clone());
        let ev = Event {
            epoch: s.epoch,
            rv,
            kind,
            type_,
            object: obj,
        };
        s.history.push(ev.clone());
        let _ = self.inner.events.send(ev);
    }

    /// Deletes an object; false when there was none.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> bool {
        let mut s = self.inner.store.lock().unwrap();
        let Some(mut obj) = s.objects.remove(&(kind, ns.into(), name.into())) else {
            return false;
        };
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = Event {
            epoch: s.epoch,
            rv,
            kind,
            type_: "DELETED",
            object: obj,
        };
        s.history.push(ev.clone());
        let _ = self.inner.events.send(ev);
        true
    }

    /// Lists served so far (all kinds).
    pub fn lists(&self) -> usize {
        self.inner.lists.load(Ordering::Relaxed)
    }

    /// Pages after the first served so far.
    pub fn pages(&self) -> usize {
        self.inner.pages.load(Ordering::Relaxed)
    }

    /// Watches opened so far (all kinds).
    pub fn watches(&self) -> usize {
        self.inner.watches.load(Ordering::Relaxed)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route(
            "/api/v1/services",
            get(|s, h, q| handle(s, h, q, Kind::Service)),
        )
        .route(
            "/apis/discovery.k8s.io/v1/endpointslices",
            get(|s, h, q| handle(s, h, q, Kind::EndpointSlice)),
        )
        .route("/api/v1/nodes", get(|s, h, q| handle(s, h, q, Kind::Node)))
        .fallback(|| async {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        })
        .with_state(inner)
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    status_response(code, &body)
}

/// kube-apiserver's answer to a version ahead of its store:
/// `storage.NewTooLargeResourceVersionError(requested, current, 1)`, an
/// `apierrors.NewTimeoutError` ("Timeout: " + message, 504, reason
/// `Timeout`, `retryAfterSeconds`) with a `ResourceVersionTooLarge` cause.
pub fn too_large_status(requested: u64, current: u64) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure",
        "message": format!("Timeout: Too large resource version: {requested}, current: {current}"),
        "reason": "Timeout",
        "details": {
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1
        },
        "code": 504
    })
}

/// Waits up to `wait` for the store to reach `rv`; the current version
/// when it did not.
async fn wait_for_version(inner: &Inner, rv: u64, wait: Duration) -> Option<u64> {
    let end = tokio::time::Instant::now() + wait;
    loop {
        let current = inner.store.lock().unwrap().rv;
        if current >= rv {
            return None;
        }
        if tokio::time::Instant::now() >= end {
            inner.too_large_sent.fetch_add(1, Ordering::Relaxed);
            return Some(current);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Status as the HTTP response; with `Retry-After` when it carries
/// `details.retryAfterSeconds`, as apiserver's `ErrorNegotiated` does.
fn status_response(code: StatusCode, body: &Value) -> Response {
    let mut resp = (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Some(secs) = body["details"]["retryAfterSeconds"].as_u64() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, secs.to_string().parse().unwrap());
    }
    resp
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    kind: Kind,
) -> Response {
    if let Some(token) = &inner.token {
        let want = format!("Bearer {token}");
        if headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            != Some(&want)
        {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
    }
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    inner
        .selectors
        .lock()
        .unwrap()
        .push((kind, flag("watch"), q.get("fieldSelector").cloned()));
    if inner.forbidden.lock().unwrap().contains(&kind) {
        inner.forbidden_sent.fetch_add(1, Ordering::Relaxed);
        return forbidden(kind, if flag("watch") { "watch" } else { "list" });
    }
    let selector = match field_selector(&q) {
        Ok(s) => s,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    if flag("watch") {
        return watch(
            inner,
            q.clone(),
            kind,
            selector,
            flag("allowWatchBookmarks"),
        )
        .await;
    }
    // A list "not older than" a version ahead of the store.
    let min = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok());
    if let Some(min) = min.filter(|m| *m > 0) {
        if let Some(current) = wait_for_version(&inner, min, BLOCK_TIMEOUT).await {
            return status_response(StatusCode::GATEWAY_TIMEOUT, &too_large_status(min, current));
        }
    }
    list(&inner, kind, &selector, &q)
}

/// kube-apiserver's 403 for a verb on a kind's resource at the cluster
/// scope: `apierrors.NewForbidden(resource, "", reason)` (k8s.io/apimachinery
/// pkg/api/errors) with the RBAC authorizer's reason as
/// `responsewriters.forbiddenMessage` words it.
fn forbidden(kind: Kind, verb: &str) -> Response {
    let resource = kind.resource();
    let qualified = if kind.group().is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{}", kind.group())
    };
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure",
        "message": format!(
            "{qualified} is forbidden: User \"system:serviceaccount:kube-system:kube-userspace-proxy\" \
             cannot {verb} resource \"{resource}\" in API group \"{}\" at the cluster scope",
            kind.group()
        ),
        "reason": "Forbidden",
        "details": {"group": kind.group(), "kind": resource},
        "code": 403
    });
    status_response(StatusCode::FORBIDDEN, &body)
}

/// The name a `fieldSelector` asks for: `metadata.name=NAME` (or `==`);
/// none when absent or empty. Any other field is an error (answered with
/// 400), as a real server refuses a field it cannot select on.
fn field_selector(q: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    let Some(sel) = q.get("fieldSelector").filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let name = sel
        .strip_prefix("metadata.name==")
        .or_else(|| sel.strip_prefix("metadata.name="));
    match name {
        Some(n) if !n.contains(',') => Ok(Some(n.to_string())),
        _ => Err(format!(
            "unable to parse requirement: field label not supported: {sel}"
        )),
    }
}

/// Whether `obj` is selected by the name a field selector asks for.
fn selected(name: &Option<String>, obj: &Value) -> bool {
    name.as_deref()
        .is_none_or(|n| obj["metadata"]["name"].as_str() == Some(n))
}

/// Lists, in pages when `limit` is given: `continue` carries the offset and
/// the version of the first page (every page is of that version, as long as
/// no write happens in between; a write in between gets 410, as a real
/// server whose continue token expired).
fn list(
    inner: &Inner,
    kind: Kind,
    selector: &Option<String>,
    q: &BTreeMap<String, String>,
) -> Response {
    let s = inner.store.lock().unwrap();
    let (offset, rv) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            inner.pages.fetch_add(1, Ordering::Relaxed);
            let (o, rv) = c.split_once('/').unwrap_or(("0", "0"));
            let (o, rv): (usize, u64) = (o.parse().unwrap_or(0), rv.parse().unwrap_or(0));
            if rv != s.rv {
                return status(
                    StatusCode::GONE,
                    "Expired",
                    "the provided continue parameter is too old",
                );
            }
            (o, rv)
        }
        None => {
            inner.lists.fetch_add(1, Ordering::Relaxed);
            if q.get("limit").is_some_and(|l| l == "1") {
                inner.probes.fetch_add(1, Ordering::Relaxed);
            }
            (0, s.rv)
        }
    };
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let all: Vec<&Value> = s
        .objects
        .iter()
        .filter(|((k, _, _), o)| *k == kind && selected(selector, o))
        .map(|(_, o)| o)
        .collect();
    let end = offset.saturating_add(limit).min(all.len());
    let next = (end < all.len()).then(|| format!("{end}/{rv}"));
    let items: Vec<Value> = all[offset.min(end)..end]
        .iter()
        .map(|o| {
            let mut o = (*o).clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.name()),
        "metadata": {"resourceVersion": rv.to_string(), "continue": next},
        "items": items,
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn line(type_: &str, object: &Value) -> Result<Bytes, Infallible> {
    let mut s = json!({"type": type_, "object": object}).to_string();
    s.push('\n');
    Ok(Bytes::from(s))
}

async fn watch(
    inner: Arc<Inner>,
    q: BTreeMap<String, String>,
    kind: Kind,
    selector: Option<String>,
    bookmarks: bool,
) -> Response {
    inner.watches.fetch_add(1, Ordering::Relaxed);
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Ahead of the store: wait for it, as the watch cache does, then refuse.
    let (form, wait) = *inner.too_large.lock().unwrap();
    let ahead = from > inner.store.lock().unwrap().rv;
    let mut too_large = None;
    if ahead {
        too_large = wait_for_version(&inner, from, wait)
            .await
            .map(|current| too_large_status(from, current));
        if let (Some(st), TooLarge::Http) = (&too_large, form) {
            return status_response(StatusCode::GATEWAY_TIMEOUT, st);
        }
    }
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1024);
    let gen = inner.watch_gen.lock().unwrap().clone();
    // Subscribe and read the backlog under the lock: no event is missed or
    // sent twice.
    let (backlog, mut live, expired, current, mut epoch) = {
        let s = inner.store.lock().unwrap();
        let live = inner.events.subscribe();
        if from != 0 && from < s.floor {
            (Vec::new(), live, Some(s.floor), s.rv, s.epoch)
        } else {
            let from = if from == 0 { s.rv } else { from };
            let backlog: Vec<Event> = s
                .history
                .iter()
                .filter(|e| e.kind == kind && e.rv > from && selected(&selector, &e.object))
                .cloned()
                .collect();
            (backlog, live, None, from, s.epoch)
        }
    };
    tokio::spawn(async move {
        if let Some(st) = too_large {
            let _ = tx.send(line("ERROR", &st)).await;
            return;
        }
        if let Some(floor) = expired {
            let st = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure",
                "message": format!("too old resource version: {from} ({floor})"),
                "reason": "Expired", "code": 410
            });
            let _ = tx.send(line("ERROR", &st)).await;
            return;
        }
        let mut last = current;
        for e in backlog {
            last = e.rv;
            if tx.send(line(e.type_, &e.object)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                // Expiry wins over events already queued.
                biased;
                _ = gen.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({
                        "kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": last.to_string()}
                    });
                    if tx.send(line("BOOKMARK", &bm)).await.is_err() {
                        return;
                    }
                }
                ev = live.recv() => match ev {
                    Ok(e) => {
                        // A replaced store: its versions start below ours.
                        if e.epoch != epoch {
                            epoch = e.epoch;
                            last = e.rv.saturating_sub(1);
                        }
                        if e.kind == kind && e.rv > last && selected(&selector, &e.object) {
                            last = e.rv;
                            if tx.send(line(e.type_, &e.object)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(_) => return, // lagged or closed: the client re-watches
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

// === object builders ===

/// A Node `name` with these labels and `spec.podCIDRs`, cluster-scoped, as
/// the API serves it (status trimmed to what a kubelet always sets).
pub fn node(name: &str, labels: &[(&str, &str)], pod_cidrs: &[&str]) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut spec = json!({});
    if let Some(first) = pod_cidrs.first() {
        spec = json!({"podCIDR": first, "podCIDRs": pod_cidrs});
    }
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    })
}

/// A ClusterIP Service `ns/name` with one TCP port `http`.
pub fn service(ns: &str, name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]
        }
    })
}

/// The same Service as NodePort `node_port`.
pub fn node_port_service(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    port: u16,
    node_port: u16,
) -> Value {
    let mut s = service(ns, name, cluster_ip, port);
    s["spec"]["type"] = json!("NodePort");
    s["spec"]["ports"][0]["nodePort"] = json!(node_port);
    s
}

/// An IPv4 EndpointSlice of service `svc` with port `http` = `port`;
/// endpoints are (address, ready, nodeName).
pub fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    port: u16,
    eps: &[(&str, bool, Option<&str>)],
) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(a, ready, node)| {
            let mut e = json!({"addresses": [a], "conditions": {"ready": ready, "serving": ready, "terminating": false}});
            if let Some(n) = node {
                e["nodeName"] = json!(n);
            }
            e
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}
