//! One kind's list-then-watch loop against the API server, in place of
//! kube-runtime's `watcher`: that one relists only on 410 Gone and keeps
//! the versions it sees to itself, so a watch from a version the store has
//! not reached (an API server restarted on a restored or fresh etcd) is
//! retried for ever and new objects are never seen.
//!
//! The loop lists (in pages), then watches from the list's
//! `resourceVersion`, resuming from the last version seen after a watch
//! ends. It relists from scratch, and the consumer's store (`kube::Store`)
//! swaps its contents in one step at `InitDone`, when the version is
//! unusable:
//!
//! - **expired**: 410, or reason `Expired`/`Gone` (client-go's
//!   `isExpiredError`), on the list, the watch request or as a watch
//!   `ERROR` event;
//! - **too large**: a cause `ResourceVersionTooLarge`, or reason `Timeout`
//!   with the cause message or status message "Too large resource version"
//!   (client-go's `isTooLargeResourceVersionError`, older servers included);
//! - **regressed**: a version numerically below the highest one this kind's
//!   store has reported (a list, an event, a bookmark, or the probe below),
//!   with no error at all. Versions are opaque, but every API server sends
//!   etcd revisions, which only grow; a version that does not parse as an
//!   integer is never compared.
//!
//! A plain watch from a version ahead of the watch cache is accepted and
//! stays silent until the store catches up, so it can never answer that
//! the version is too large. After a watch ended early (before its timeout)
//! or failed, the next watch is therefore *probed*: if it has delivered
//! nothing after [`PROBE_DELAY`], a one-item list (no `resourceVersion`: the
//! store's current version) is compared with the highest version seen.
//!
//! Other failures are retried from the same version after a [`Retry`]
//! back-off.
//!
//! A [`Target`] may restrict the kind with a field selector (this node's
//! `Node`: `metadata.name=NODE`, on every list, watch and probe) and may be
//! optional: a 403 on an optional kind is warned about once, its first list
//! counts as complete and empty, and the loop keeps retrying at the
//! back-off's pace, so permissions granted later are picked up.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::core::Status;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::Event;
use kube::Resource;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::raw::Raw;

/// `timeoutSeconds` of each watch request, as kube-runtime's (under the
/// API server's own cap, spread by its jitter).
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(290);

/// Objects per list page (client-go's pager default).
pub const PAGE_SIZE: u32 = 500;

/// How long a watch that follows an early end or a failure may stay silent
/// before the store's current version is probed: longer than a 410 or an
/// ERROR event takes to arrive, well under the API server's 3 s wait for a
/// too-large version, so a restored store is caught within a second.
pub const PROBE_DELAY: Duration = Duration::from_millis(500);

/// A watch silent this much longer than its timeout is taken as dead (the
/// server's close never arrived), as kube-runtime does.
const IDLE_MARGIN: Duration = Duration::from_secs(5);

/// A watch that ends this soon without delivering anything counts as a
/// failure and is retried with back-off (client-go's "very short watch").
const SHORT_WATCH: Duration = Duration::from_secs(1);

/// Events buffered between the loop and its consumer.
const CHANNEL: usize = 256;

/// First retry delay after a failed list or watch; doubles up to
/// [`BACKOFF_MAX`]. Shorter than client-go's 800 ms so an API server restart
/// costs little, jittered so a DaemonSet's pods do not retry in lock-step.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);

/// Longest retry delay while the API server stays unreachable.
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Message of the `ResourceVersionTooLarge` cause (and, before 1.17, of
/// the status itself), from k8s.io/apiserver's storage errors.
pub const TOO_LARGE_MESSAGE: &str = "Too large resource version";

/// Why a resource version cannot be used: discovery relists from scratch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// 410 Gone / reason `Expired`: compacted out of the server's history.
    Expired,
    /// Ahead of the server's store (reason `Timeout`, cause
    /// `ResourceVersionTooLarge`).
    TooLarge,
}

impl Unusable {
    /// The `reason` label of [`crate::metrics::DISCOVERY_RELISTS`].
    pub fn label(self) -> &'static str {
        match self {
            Unusable::Expired => "expired",
            Unusable::TooLarge => "too_large",
        }
    }
}

/// Whether `status` says the requested resource version is unusable, and
/// why; `None` for every other error (those are retried from the same
/// version).
pub fn unusable(status: &Status) -> Option<Unusable> {
    if status.code == 410 || status.reason == "Expired" || status.reason == "Gone" {
        return Some(Unusable::Expired);
    }
    let causes = status.details.iter().flat_map(|d| d.causes.iter());
    let mut causes_say = false;
    for c in causes {
        if c.reason == "ResourceVersionTooLarge" {
            return Some(Unusable::TooLarge);
        }
        causes_say |= c.message == TOO_LARGE_MESSAGE;
    }
    let timeout = status.reason == "Timeout";
    if timeout && (causes_say || status.message.contains(TOO_LARGE_MESSAGE)) {
        return Some(Unusable::TooLarge);
    }
    None
}

fn unusable_error(e: &kube::Error) -> Option<(Unusable, String)> {
    match e {
        kube::Error::Api(s) => unusable(s).map(|u| (u, s.message.clone())),
        _ => None,
    }
}

/// Whether the API refused the request for lack of permission (403).
fn forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

/// What one loop lists and watches.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// The kind, in logs and in the `kind` label of the discovery metrics.
    pub kind: &'static str,
    /// `fieldSelector` of every list, watch and probe, e.g.
    /// `metadata.name=node-a`; `None` selects every object.
    pub field_selector: Option<String>,
    /// Set for a kind the proxy can do without: when the API forbids
    /// listing or watching it (403), this warning is logged once (naming
    /// the missing permission), the first list counts as complete and
    /// empty, and the loop keeps retrying with back-off. `None`: a 403 is
    /// retried like any other error and the first list waits for it.
    pub if_forbidden: Option<&'static str>,
}

impl Target {
    /// Every object of `kind`, required.
    pub fn all(kind: &'static str) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }
}

/// A failed list: why, and whether it was a 403.
struct ListError {
    message: String,
    forbidden: bool,
}

impl From<kube::Error> for ListError {
    fn from(e: kube::Error) -> Self {
        Self {
            forbidden: forbidden(&e),
            message: e.to_string(),
        }
    }
}

impl From<&str> for ListError {
    fn from(message: &str) -> Self {
        Self {
            message: message.into(),
            forbidden: false,
        }
    }
}

/// A resource version as a number, when it is one.
fn numeric(rv: &str) -> Option<u64> {
    rv.parse().ok()
}

/// Starts the loop for the objects of `api` that `target` selects; events
/// arrive on the returned channel until `cancel` fires. Errors are logged
/// and counted here (by `target.kind`) and retried; the consumer sees only
/// events.
pub fn spawn<K>(
    api: Api<Raw<K>>,
    target: Target,
    cancel: CancellationToken,
) -> mpsc::Receiver<Event<Raw<K>>>
where
    K: k8s_openapi::Resource + Send + 'static,
    Raw<K>: Resource,
{
    let (tx, rx) = mpsc::channel(CHANNEL);
    let lw = ListWatch {
        api,
        kind: target.kind,
        field_selector: target.field_selector,
        if_forbidden: target.if_forbidden,
        warned_forbidden: false,
        listed: false,
        tx,
        high: None,
        retry: Retry::default(),
        relist_retry: Retry::default(),
        progressed: true,
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = lw.run() => {}
        }
    });
    rx
}

struct ListWatch<K> {
    api: Api<Raw<K>>,
    kind: &'static str,
    field_selector: Option<String>,
    /// The warning of an optional kind forbidden to us ([`Target`]).
    if_forbidden: Option<&'static str>,
    /// The forbidden warning was logged since the last success.
    warned_forbidden: bool,
    /// A list (or, for an optional kind, a forbidden one) was delivered.
    listed: bool,
    tx: mpsc::Sender<Event<Raw<K>>>,
    /// Highest numeric version this kind's store has reported; `None` after
    /// a relist forced by a version ahead of the store, until the next list.
    high: Option<u64>,
    retry: Retry,
    /// Back-off of forced relists that follow each other with no watch
    /// progress in between (a server that keeps refusing the versions it
    /// lists), so they cannot spin.
    relist_retry: Retry,
    /// A watch delivered something since the last forced relist.
    progressed: bool,
}

/// How one watch ended.
enum End {
    /// Closed by the server at (about) its timeout: re-watch.
    Timeout,
    /// Closed before its timeout (restart, expiry, a proxy): re-watch and
    /// probe.
    Early,
    /// Failed: back off, re-watch and probe.
    Failed(String),
    /// An optional kind's watch is forbidden (already warned): back off,
    /// re-watch and probe.
    Forbidden,
    /// The version is unusable: relist (already logged and counted).
    Relist,
    /// The consumer is gone.
    Closed,
}

/// The store's versions went backwards.
struct Regressed {
    seen: u64,
    now: u64,
    at: &'static str,
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

// === impl ListWatch ===

impl<K> ListWatch<K>
where
    K: k8s_openapi::Resource + Send + 'static,
    Raw<K>: Resource,
{
    async fn run(mut self) {
        'list: loop {
            let Some(mut rv) = self.list().await else {
                return;
            };
            // Nothing to verify right after a list: its version is current.
            let mut probe = false;
            loop {
                match self.watch(&mut rv, probe).await {
                    End::Timeout => probe = false,
                    End::Early => probe = true,
                    End::Failed(error) => {
                        self.failed("watch", &error);
                        tokio::time::sleep(self.next_delay()).await;
                        probe = true;
                    }
                    End::Forbidden => {
                        tokio::time::sleep(self.next_delay()).await;
                        probe = true;
                    }
                    End::Relist => {
                        // The first at once (client-go retries at once too).
                        if !self.progressed {
                            let delay = self.relist_retry.next().unwrap_or(BACKOFF_MAX);
                            tokio::time::sleep(delay).await;
                        }
                        self.progressed = false;
                        continue 'list;
                    }
                    End::Closed => return,
                }
            }
        }
    }

    fn next_delay(&mut self) -> Duration {
        self.retry.next().unwrap_or(BACKOFF_MAX)
    }

    fn failed(&self, what: &str, error: &str) {
        tracing::warn!(kind = self.kind, %error, "{what} failed; retrying with back-off");
        ::metrics::counter!(crate::metrics::DISCOVERY_WATCH_ERRORS, "kind" => self.kind)
            .increment(1);
    }

    /// An optional kind refused with 403: the warning once (until the
    /// next success), the error counted every time.
    fn forbidden(&mut self, what: &str, error: &str) {
        let warning = self.if_forbidden.unwrap_or("forbidden");
        if self.warned_forbidden {
            tracing::debug!(kind = self.kind, %error, "{what} still forbidden; retrying with back-off");
        } else {
            tracing::warn!(kind = self.kind, %error, "{warning}");
            self.warned_forbidden = true;
        }
        ::metrics::counter!(crate::metrics::DISCOVERY_WATCH_ERRORS, "kind" => self.kind)
            .increment(1);
    }

    fn relisting(&mut self, why: Unusable, rv: &str, message: &str) {
        match why {
            Unusable::Expired => {
                tracing::info!(kind = self.kind, %message, "watch expired (410 Gone): relisting")
            }
            Unusable::TooLarge => {
                tracing::warn!(
                    kind = self.kind,
                    resource_version = rv,
                    %message,
                    "resource version is ahead of the API server's store \
                     (restored or fresh etcd?): relisting from scratch"
                );
                // The store's timeline is not ours: start over with its own.
                self.high = None;
            }
        }
        ::metrics::counter!(crate::metrics::DISCOVERY_WATCH_ERRORS, "kind" => self.kind)
            .increment(1);
        ::metrics::counter!(
            crate::metrics::DISCOVERY_RELISTS,
            "kind" => self.kind, "reason" => why.label()
        )
        .increment(1);
    }

    fn regressed(&mut self, r: &Regressed, relist: bool) {
        tracing::warn!(
            kind = self.kind,
            highest_seen = r.seen,
            now = r.now,
            seen_in = r.at,
            "resource versions went backwards (store restored below what we had seen){}",
            if relist {
                ": relisting from scratch"
            } else {
                ""
            }
        );
        ::metrics::counter!(crate::metrics::DISCOVERY_RV_REGRESSIONS, "kind" => self.kind)
            .increment(1);
        if relist {
            ::metrics::counter!(
                crate::metrics::DISCOVERY_RELISTS,
                "kind" => self.kind, "reason" => "regressed"
            )
            .increment(1);
            self.high = None;
        }
    }

    /// Notes a version the store reported; `Err` when it is below the
    /// highest seen.
    fn observe(&mut self, rv: &str, at: &'static str) -> Result<(), Regressed> {
        let Some(now) = numeric(rv) else {
            return Ok(());
        };
        match self.high {
            Some(seen) if now < seen => Err(Regressed { seen, now, at }),
            _ => {
                self.high = Some(self.high.map_or(now, |h| h.max(now)));
                Ok(())
            }
        }
    }

    async fn send(&self, ev: Event<Raw<K>>) -> bool {
        self.tx.send(ev).await.is_ok()
    }

    /// Lists until a complete list is delivered (Init, InitApply…,
    /// InitDone); returns its version, or `None` when the consumer is gone.
    async fn list(&mut self) -> Option<String> {
        loop {
            if !self.send(Event::Init).await {
                return None;
            }
            match self.list_pages().await {
                Ok(Some(rv)) => {
                    if !self.send(Event::InitDone).await {
                        return None;
                    }
                    self.listed = true;
                    self.warned_forbidden = false;
                    return Some(rv);
                }
                Ok(None) => return None,
                Err(error) if error.forbidden && self.if_forbidden.is_some() => {
                    self.forbidden("list", &error.message);
                    // The first time, an empty list: nothing to wait for.
                    // Later, what was listed before stays (no InitDone).
                    if !self.listed {
                        if !self.send(Event::InitDone).await {
                            return None;
                        }
                        self.listed = true;
                    }
                    tokio::time::sleep(self.next_delay()).await;
                }
                Err(error) => {
                    self.failed("list", &error.message);
                    tokio::time::sleep(self.next_delay()).await;
                }
            }
        }
    }

    async fn list_pages(&mut self) -> Result<Option<String>, ListError> {
        let mut continue_token = None;
        loop {
            let lp = ListParams {
                limit: Some(PAGE_SIZE),
                continue_token: continue_token.take(),
                field_selector: self.field_selector.clone(),
                ..ListParams::default()
            };
            let page = self.api.list(&lp).await?;
            for item in page.items {
                if !self.send(Event::InitApply(item)).await {
                    return Ok(None);
                }
            }
            continue_token = page.metadata.continue_.filter(|c| !c.is_empty());
            if continue_token.is_some() {
                continue;
            }
            let rv = page
                .metadata
                .resource_version
                .filter(|rv| !rv.is_empty())
                .ok_or("no metadata.resourceVersion in the list")?;
            // A list is the new state whatever its version: a regression
            // is reported, and the list replaces what we had.
            if let Err(r) = self.observe(&rv, "list") {
                self.regressed(&r, false);
                self.high = numeric(&rv);
            }
            self.retry.reset();
            return Ok(Some(rv));
        }
    }

    /// The store's current version: a one-item list without a version.
    async fn probe(&self) -> Option<String> {
        let lp = ListParams {
            limit: Some(1),
            field_selector: self.field_selector.clone(),
            ..ListParams::default()
        };
        match self.api.list(&lp).await {
            Ok(list) => list.metadata.resource_version,
            Err(error) => {
                tracing::debug!(kind = self.kind, %error, "probe of the store's version failed");
                None
            }
        }
    }

    /// Awaits `fut`; meanwhile, once `probe_at` passes, probes the store's
    /// version (once) and gives up on `fut` when it went backwards.
    async fn or_probe<F: Future>(
        &mut self,
        fut: F,
        probe_at: &mut Option<Instant>,
    ) -> Result<F::Output, Regressed> {
        tokio::pin!(fut);
        loop {
            let at = *probe_at;
            tokio::select! {
                out = &mut fut => return Ok(out),
                _ = tokio::time::sleep_until(at.unwrap_or_else(Instant::now)), if at.is_some() => {
                    *probe_at = None;
                    if let Some(rv) = self.probe().await {
                        self.observe(&rv, "probe")?;
                    }
                }
            }
        }
    }

    /// One watch from `rv`, advancing it with every event and bookmark.
    async fn watch(&mut self, rv: &mut String, probe: bool) -> End {
        let wp = WatchParams {
            bookmarks: true,
            timeout: Some(WATCH_TIMEOUT.as_secs() as u32),
            field_selector: self.field_selector.clone(),
            ..WatchParams::default()
        };
        let opened = Instant::now();
        let mut probe_at = probe.then(|| opened + PROBE_DELAY);
        let api = self.api.clone();
        let stream = match self.or_probe(api.watch(&wp, rv), &mut probe_at).await {
            Err(r) => {
                self.regressed(&r, true);
                return End::Relist;
            }
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                if let Some((why, message)) = unusable_error(&e) {
                    self.relisting(why, rv, &message);
                    return End::Relist;
                }
                if forbidden(&e) && self.if_forbidden.is_some() {
                    self.forbidden("watch", &e.to_string());
                    return End::Forbidden;
                }
                return End::Failed(format!("starting the watch: {e}"));
            }
        };
        let mut stream = std::pin::pin!(stream);
        let idle = WATCH_TIMEOUT + IDLE_MARGIN;
        let mut delivered = false;
        loop {
            let next = tokio::time::timeout(idle, stream.next());
            let item = match self.or_probe(next, &mut probe_at).await {
                Err(r) => {
                    self.regressed(&r, true);
                    return End::Relist;
                }
                Ok(Err(_elapsed)) => return End::Failed(format!("no watch event for {idle:?}")),
                Ok(Ok(None)) => {
                    let lasted = opened.elapsed();
                    return if !delivered && lasted < SHORT_WATCH {
                        End::Failed(format!(
                            "very short watch: ended after {lasted:?} with nothing delivered"
                        ))
                    } else if lasted + SHORT_WATCH < WATCH_TIMEOUT {
                        End::Early
                    } else {
                        End::Timeout
                    };
                }
                Ok(Ok(Some(Err(e)))) => {
                    if let Some((why, message)) = unusable_error(&e) {
                        self.relisting(why, rv, &message);
                        return End::Relist;
                    }
                    return End::Failed(format!("watch stream: {e}"));
                }
                Ok(Ok(Some(Ok(ev)))) => ev,
            };
            let (seen, event) = match item {
                WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                    (o.meta().resource_version.clone(), Some(Event::Apply(o)))
                }
                WatchEvent::Deleted(o) => {
                    (o.meta().resource_version.clone(), Some(Event::Delete(o)))
                }
                WatchEvent::Bookmark(bm) => (Some(bm.metadata.resource_version), None),
                WatchEvent::Error(status) => {
                    if let Some(why) = unusable(&status) {
                        self.relisting(why, rv, &status.message);
                        return End::Relist;
                    }
                    // The server closes the watch after an ERROR event.
                    return End::Failed(format!(
                        "watch ERROR event: {} ({} {})",
                        status.message, status.code, status.reason
                    ));
                }
            };
            // The watch moves: nothing left to verify.
            delivered = true;
            probe_at = None;
            if let Some(seen) = seen.filter(|s| !s.is_empty()) {
                if let Err(r) = self.observe(&seen, "watch event") {
                    self.regressed(&r, true);
                    return End::Relist;
                }
                *rv = seen;
            }
            self.progressed = true;
            self.relist_retry.reset();
            self.retry.reset();
            if let Some(event) = event {
                if !self.send(event).await {
                    return End::Closed;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(v: serde_json::Value) -> Status {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn expired_gone_and_too_large_versions_are_unusable_other_errors_are_not() {
        // As kube-apiserver sends them (apimachinery NewResourceExpired,
        // storage.NewTooLargeResourceVersionError over NewTimeoutError).
        let cases = [
            (
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": "too old resource version: 5 (9)",
                    "reason": "Expired", "code": 410}),
                Some(Unusable::Expired),
            ),
            (
                serde_json::json!({"status": "Failure", "reason": "Gone", "code": 410}),
                Some(Unusable::Expired),
            ),
            (
                serde_json::json!({"status": "Failure", "reason": "Expired", "code": 0}),
                Some(Unusable::Expired),
            ),
            (
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure",
                    "message": "Timeout: Too large resource version: 200, current: 7",
                    "reason": "Timeout",
                    "details": {"causes": [{"reason": "ResourceVersionTooLarge",
                        "message": "Too large resource version"}], "retryAfterSeconds": 1},
                    "code": 504}),
                Some(Unusable::TooLarge),
            ),
            // 1.17.0-1.18.5: the cause's message only.
            (
                serde_json::json!({"status": "Failure", "message": "Timeout: x", "reason": "Timeout",
                    "details": {"causes": [{"message": "Too large resource version"}]}, "code": 504}),
                Some(Unusable::TooLarge),
            ),
            // Before 1.17: the message only.
            (
                serde_json::json!({"status": "Failure", "reason": "Timeout", "code": 504,
                    "message": "Timeout: Too large resource version: 200, current: 7"}),
                Some(Unusable::TooLarge),
            ),
            (
                serde_json::json!({"status": "Failure", "reason": "Timeout", "code": 504,
                    "message": "Timeout: request did not complete within 60s"}),
                None,
            ),
            (
                serde_json::json!({"status": "Failure", "reason": "Forbidden", "code": 403,
                    "message": "Too large resource version"}),
                None,
            ),
            (
                serde_json::json!({"status": "Failure", "reason": "InternalError", "code": 500}),
                None,
            ),
        ];
        for (json, want) in cases {
            assert_eq!(unusable(&status(json.clone())), want, "{json}");
        }
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
    fn only_integer_versions_are_compared() {
        assert_eq!(numeric("12345"), Some(12345));
        assert_eq!(numeric(""), None);
        assert_eq!(numeric("abc"), None);
        assert_eq!(numeric("-1"), None);
    }
}
