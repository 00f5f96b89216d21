//! Discovery from a directory of Kubernetes YAML (or the manifests embedded
//! in the binary): the no-cluster source.
//!
//! Files ending in `.yaml`, `.yml` or `.json` are read in name order; each
//! may hold several documents separated by `---` and `kind: List` wrappers.
//! Documents are parsed one by one, so a broken one costs only itself.
//! The directory is polled: a change is published within [`POLL_INTERVAL`].
//!
//! Besides `v1 Service` and `discovery.k8s.io/v1 EndpointSlice`, `v1 Node`
//! documents are read: the one named like this node (`--hostname-override`,
//! else the hostname: [`Options::node_name`]) gives the snapshot its labels
//! and pod CIDRs, as the API source's Node does; others are ignored. The
//! snapshot is built with the node's [`Options`] (traffic policies,
//! `--service-proxy-name`) as in the API source ([`spawn_with`],
//! [`load_with`], [`parse_with`]).
//!
//! Hostile input is bounded: reading, parsing and snapshot building run on
//! a thread of their own (see [`spawn`]), a file over [`MAX_FILE_BYTES`] or
//! past [`MAX_TOTAL_BYTES`] is not parsed, a document nested deeper than
//! [`MAX_DEPTH`] is rejected as soon as the parser gets there, and
//! serde-saphyr's budgets stop alias bombs. A rejected file keeps serving
//! its last good version, the other files apply.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::snapshot::{build_snapshot_with, Options, Problem, Sourced};
use crate::model::Snapshot;

/// How often the directory is re-read for changes (a change applies within
/// this, well inside the 2 s the design promises).
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The example manifests compiled into the binary: the default source.
pub const EMBEDDED: &[(&str, &str)] = &[(
    "examples/manifests/demo.yaml",
    include_str!("../../examples/manifests/demo.yaml"),
)];

/// Where manifests come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory on disk, re-read on change.
    Dir(PathBuf),
    /// The manifests compiled into the binary ([`EMBEDDED`]).
    Embedded,
}

/// Errors that stop the manifests source altogether (as opposed to
/// [`Problem`]s, which skip one object).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory cannot be read.
    #[error("--manifests {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// The thread that reads and parses the files cannot start.
    #[error("cannot run the manifests thread: {0}")]
    Thread(std::io::Error),
}

/// A file's name and contents.
type File = (String, String);

/// Largest manifest file read, in bytes. One Kubernetes object is at most
/// about 1.5 MiB (the API server's request limit) and a node's Services and
/// EndpointSlices fit far below this; a larger file is a mistake or an
/// attack, and only costs memory and parse time.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// Largest sum of the manifest files read in one pass, in bytes: bounds the
/// memory and CPU of one re-read. Files are read in name order; one that
/// would go past it is rejected, the smaller ones after it still fit.
pub const MAX_TOTAL_BYTES: u64 = 64 << 20;

/// Deepest nesting of sequences and mappings in one document. Services and
/// EndpointSlices nest under ten levels and large CRD schemas a few dozen;
/// 128 is serde_json's recursion limit too. The parser stops at this depth,
/// so a deeper document costs no more than reading it.
pub const MAX_DEPTH: usize = 128;

/// What one pass over the source found.
#[derive(Default)]
struct Read {
    /// Files read, in name order.
    files: Vec<File>,
    /// Files rejected by a size limit: they keep their last good version.
    rejected: Vec<String>,
    /// Why files were rejected or could not be read.
    problems: Vec<Problem>,
}

impl Source {
    /// Reads every manifest file; fails only when the directory itself is
    /// unreadable. A file that vanishes or is unreadable mid-read, or is over
    /// a size limit, is reported as a problem.
    fn read(&self) -> Result<Read, Error> {
        match self {
            Source::Embedded => Ok(Read {
                files: EMBEDDED
                    .iter()
                    .map(|(n, t)| (n.to_string(), t.to_string()))
                    .collect(),
                ..Read::default()
            }),
            Source::Dir(dir) => read_dir(dir, MAX_FILE_BYTES, MAX_TOTAL_BYTES),
        }
    }
}

/// Reads the directory's manifests in name order, each file up to
/// `file_cap` bytes and all of them up to `total_cap`.
fn read_dir(dir: &Path, file_cap: u64, total_cap: u64) -> Result<Read, Error> {
    let err = |source| Error::Dir {
        path: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let path = entry.map_err(err)?.path();
        let manifest = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        );
        if manifest && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    let mut read = Read::default();
    let mut total = 0u64;
    for path in paths {
        let name = path.display().to_string();
        let problem = |message: String| Problem {
            origin: name.clone(),
            object: "file".into(),
            field: "-".into(),
            message,
        };
        let left = total_cap.saturating_sub(total);
        match read_capped(&path, file_cap.min(left)) {
            Ok(Capped::Text(text)) => {
                total += text.len() as u64;
                read.files.push((name, text));
            }
            Ok(Capped::Over(size)) => {
                let message = if size > file_cap {
                    format!("{size} bytes or more, over the limit of {file_cap} bytes per file (MAX_FILE_BYTES); not parsed, its last good version stays")
                } else {
                    format!("{size} bytes would take the files read so far over the limit of {total_cap} bytes in total (MAX_TOTAL_BYTES); not parsed, its last good version stays")
                };
                read.problems.push(problem(message));
                read.rejected.push(name);
            }
            Err(e) => read.problems.push(problem(format!("cannot read: {e}"))),
        }
    }
    Ok(read)
}

/// A file's text, or the size that put it over its cap.
enum Capped {
    Text(String),
    Over(u64),
}

/// Reads a file of at most `cap` bytes, never more than `cap + 1`, so a
/// huge file or one still growing costs no more than the cap.
fn read_capped(path: &Path, cap: u64) -> std::io::Result<Capped> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len > cap {
        return Ok(Capped::Over(len));
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(cap + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        return Ok(Capped::Over(buf.len() as u64));
    }
    String::from_utf8(buf)
        .map(Capped::Text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))
}

/// Splits a YAML stream into documents on `---` lines, keeping each
/// document's 1-based starting line for error messages.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            docs.push((start, std::mem::take(&mut cur)));
            // Content after the marker on the same line belongs to the next document.
            let rest = line[3..].trim_start();
            if rest.is_empty() {
                start = i + 2;
            } else {
                start = i + 1;
                cur.push_str(rest);
                cur.push('\n');
            }
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.push((start, cur));
    docs.retain(|(_, d)| !d.trim().is_empty());
    docs
}

/// Parsed objects of all files, plus problems for what could not be parsed.
#[derive(Default)]
struct Objects {
    services: Vec<Sourced<Service>>,
    slices: Vec<Sourced<EndpointSlice>>,
    /// Every Node document; the snapshot uses the one named like this node.
    nodes: Vec<Sourced<Node>>,
    problems: Vec<Problem>,
}

impl Objects {
    /// Adds a file's objects; false when some document of it did not parse.
    fn add_file(&mut self, name: &str, text: &str) -> bool {
        let before = self.problems.len();
        for (line, doc) in documents(text) {
            let origin = format!("{name}:{line}");
            match decode(&doc) {
                Ok(Value::Null) => {}
                Ok(v) => self.add_value(&origin, v),
                Err(message) => self.problems.push(Problem {
                    origin,
                    object: "document".into(),
                    field: "-".into(),
                    message,
                }),
            }
        }
        self.problems.len() == before
    }

    fn add_value(&mut self, origin: &str, v: Value) {
        let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
        let object = || {
            let meta = v.get("metadata");
            let get = |k| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
            format!(
                "{kind} {}/{}",
                get("namespace").unwrap_or("default"),
                get("name").unwrap_or("<unnamed>")
            )
        };
        match (api, kind) {
            ("v1", "List") => {
                let items = match v.get("items") {
                    Some(Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                };
                for (i, item) in items.into_iter().enumerate() {
                    self.add_value(&format!("{origin} items[{i}]"), item);
                }
            }
            ("v1", "Service") => match typed::<Service>(v.clone()) {
                Ok(object) => self.services.push(Sourced {
                    origin: origin.into(),
                    object,
                }),
                Err((field, message)) => self.problems.push(Problem {
                    origin: origin.into(),
                    object: object(),
                    field,
                    message,
                }),
            },
            ("discovery.k8s.io/v1", "EndpointSlice") => match typed::<EndpointSlice>(v.clone()) {
                Ok(object) => self.slices.push(Sourced {
                    origin: origin.into(),
                    object,
                }),
                Err((field, message)) => self.problems.push(Problem {
                    origin: origin.into(),
                    object: object(),
                    field,
                    message,
                }),
            },
            ("v1", "Node") => match typed::<Node>(v.clone()) {
                Ok(object) => self.nodes.push(Sourced {
                    origin: origin.into(),
                    object,
                }),
                Err((field, message)) => self.problems.push(Problem {
                    origin: origin.into(),
                    object: node_name(&v),
                    field,
                    message,
                }),
            },
            ("", _) | (_, "") => self.problems.push(Problem {
                origin: origin.into(),
                object: object(),
                field: if api.is_empty() { "apiVersion" } else { "kind" }.into(),
                message: "missing: not a Kubernetes object".into(),
            }),
            _ => tracing::debug!(
                origin,
                api,
                kind,
                "ignoring object of a kind we do not serve"
            ),
        }
    }
}

/// `Node NAME`: Nodes have no namespace.
fn node_name(v: &Value) -> String {
    let name = v
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    format!("Node {}", name.unwrap_or("<unnamed>"))
}

/// Parses one YAML document within the budgets ([`MAX_DEPTH`], and the
/// parser's own caps on events, nodes, aliases and scalar bytes); the error
/// says which limit was hit (also `--config`'s reader).
pub(crate) fn decode(doc: &str) -> Result<Value, String> {
    use serde_saphyr::budget::BudgetBreach;
    use serde_saphyr::granit_parser::ErrorKind;
    use serde_saphyr::{Error as E, ExternalMessageSource as Source};
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.flow_nesting_limit = MAX_DEPTH;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.with_snippet = false;
    // YAML 1.2 booleans only, as serde_yaml read them: an unquoted `off`
    // (a value of the proxy-protocol annotation) stays a string.
    options.strict_booleans = true;
    serde_saphyr::from_str_with_options::<Value>(doc, options).map_err(|e| {
        // Too deep: the budget's depth count, or the scanner's cap on
        // nested flow collections (it runs ahead of the budget's count).
        // An error met while replaying an alias is wrapped: classify its cause.
        let mut root = e.without_snippet();
        while let E::AliasError { error, .. } = root {
            root = error.without_snippet();
        }
        let too_deep = match root {
            E::Budget {
                breach: BudgetBreach::Depth { .. },
                ..
            } => true,
            E::ExternalMessage { source, .. } => matches!(
                &**source,
                Source::Parser(s) if matches!(s.kind(), ErrorKind::RecursionLimitExceeded)
            ),
            _ => false,
        };
        match root {
            _ if too_deep => {
                format!("nested deeper than the limit of {MAX_DEPTH} levels (MAX_DEPTH)")
            }
            E::Budget { breach, .. } => {
                format!("over a limit of the YAML parser's budget: {breach:?}")
            }
            _ => format!("not valid YAML: {e}"),
        }
    })
}

/// Deserializes into a k8s-openapi type, naming the failing field.
fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        (path, e.into_inner().to_string())
    })
}

/// The last good state, so that a file caught half-written, or an object
/// broken by an edit, does not take down what it served before.
#[derive(Default)]
pub struct LastGood {
    /// Text of each file the last time all its documents parsed.
    files: HashMap<String, String>,
    /// The last published snapshot.
    snapshot: Snapshot,
}

/// Parses a set of files into a snapshot; never fails, problems are returned.
/// A file with an unparseable document is replaced by its last good text.
/// Default [`Options`]: no node (every endpoint kept, no node labels).
pub fn parse(files: &[(String, String)], last: &mut LastGood) -> (Snapshot, Vec<Problem>) {
    parse_with(files, last, &Options::default())
}

/// [`parse`] for this node: `options` as in the API source (the Node
/// document named `options.node_name` gives its labels and pod CIDRs,
/// traffic policies keep its endpoints, `--service-proxy-name`).
pub fn parse_with(
    files: &[(String, String)],
    last: &mut LastGood,
    options: &Options,
) -> (Snapshot, Vec<Problem>) {
    let mut objects = Objects::default();
    for (name, text) in files {
        let mut file_objects = Objects::default();
        if file_objects.add_file(name, text) {
            last.files.insert(name.clone(), text.clone());
        } else if let Some(good) = last.files.get(name).filter(|g| *g != text) {
            tracing::warn!(file = %name, "file does not parse; serving its last good version");
            let problems = std::mem::take(&mut file_objects.problems);
            file_objects = Objects::default();
            file_objects.add_file(name, good);
            file_objects.problems = problems;
        }
        objects.services.append(&mut file_objects.services);
        objects.slices.append(&mut file_objects.slices);
        objects.nodes.append(&mut file_objects.nodes);
        objects.problems.append(&mut file_objects.problems);
    }
    last.files.retain(|n, _| files.iter().any(|(f, _)| f == n));
    let (snapshot, mut problems) = build_snapshot_with(
        &objects.services,
        &objects.slices,
        &objects.nodes,
        &last.snapshot,
        options,
    );
    objects.problems.append(&mut problems);
    last.snapshot = snapshot.clone();
    (snapshot, objects.problems)
}

/// [`parse`] of one pass over the source: files rejected by a size limit
/// are parsed from their last good text, if they had one.
fn parse_read(read: &Read, last: &mut LastGood, options: &Options) -> (Snapshot, Vec<Problem>) {
    let mut files = read.files.clone();
    for name in &read.rejected {
        if let Some(good) = last.files.get(name) {
            tracing::warn!(file = %name, "file over a size limit; serving its last good version");
            files.push((name.clone(), good.clone()));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let (snapshot, mut problems) = parse_with(&files, last, options);
    let mut all = read.problems.clone();
    all.append(&mut problems);
    (snapshot, all)
}

/// Reads and parses the source once, on the calling thread (blocking),
/// with default [`Options`] (no node).
pub fn load(source: &Source) -> Result<(Snapshot, Vec<Problem>), Error> {
    load_with(source, &Options::default())
}

/// [`load`] for this node ([`parse_with`]).
pub fn load_with(source: &Source, options: &Options) -> Result<(Snapshot, Vec<Problem>), Error> {
    let read = source.read()?;
    Ok(parse_read(&read, &mut LastGood::default(), options))
}

fn fingerprint(read: &Read) -> u64 {
    let mut h = DefaultHasher::new();
    read.files.hash(&mut h);
    read.rejected.hash(&mut h);
    h.finish()
}

fn report(problems: &[Problem]) {
    for p in problems {
        tracing::warn!(
            origin = %p.origin,
            object = %p.object,
            field = %p.field,
            "skipped: {}",
            p.message
        );
    }
}

/// What the manifests thread hands back once the first snapshot is built.
type First = Result<watch::Receiver<Arc<Snapshot>>, Error>;

/// Loads the source, publishing the first snapshot before returning, then
/// keeps polling it until `cancel` fires. Fails at once when the directory
/// cannot be read at start-up; later read errors keep the last good
/// snapshot and are logged.
///
/// Reading, parsing and building snapshots all run on a thread of their
/// own (`kusp-manifests`), never on a runtime worker: however long a file
/// takes, accepting and moving bytes go on. Default [`Options`] (no node).
pub async fn spawn(
    source: Source,
    cancel: CancellationToken,
) -> Result<watch::Receiver<Arc<Snapshot>>, Error> {
    spawn_with(source, Options::default(), cancel).await
}

/// [`spawn`] for this node: snapshots are built with `options`
/// ([`parse_with`]).
pub async fn spawn_with(
    source: Source,
    options: Options,
    cancel: CancellationToken,
) -> Result<watch::Receiver<Arc<Snapshot>>, Error> {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<First>();
    std::thread::Builder::new()
        .name("kusp-manifests".into())
        .spawn(move || poll(source, options, cancel, first_tx))
        .map_err(Error::Thread)?;
    first_rx
        .await
        .map_err(|_| Error::Thread(std::io::Error::other("the manifests thread ended")))?
}

/// The manifests thread: first load, then one re-read per [`POLL_INTERVAL`].
fn poll(
    source: Source,
    options: Options,
    cancel: CancellationToken,
    first: tokio::sync::oneshot::Sender<First>,
) {
    let read = match source.read() {
        Ok(r) => r,
        Err(e) => {
            let _ = first.send(Err(e));
            return;
        }
    };
    let mut last_good = LastGood::default();
    let (snapshot, problems) = parse_read(&read, &mut last_good, &options);
    report(&problems);
    let mut last = fingerprint(&read);
    tracing::info!(
        source = ?source,
        services = snapshot.services.len(),
        skipped = problems.len(),
        "manifests loaded"
    );
    let (tx, rx) = watch::channel(Arc::new(snapshot));
    if first.send(Ok(rx)).is_err() {
        return;
    }
    if matches!(source, Source::Embedded) {
        // Nothing can change: keep the sender alive until cancelled.
        futures::executor::block_on(cancel.cancelled());
        return;
    }
    let mut failing = false;
    loop {
        std::thread::sleep(POLL_INTERVAL);
        if cancel.is_cancelled() || tx.is_closed() {
            return;
        }
        let read = match source.read() {
            Ok(r) => {
                failing = false;
                r
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot re-read manifests; keeping the last good state");
                }
                failing = true;
                continue;
            }
        };
        let fp = fingerprint(&read);
        if fp == last {
            continue;
        }
        last = fp;
        let (snapshot, problems) = parse_read(&read, &mut last_good, &options);
        report(&problems);
        tracing::info!(
            services = snapshot.services.len(),
            skipped = problems.len(),
            "manifests changed"
        );
        tx.send_if_modified(|cur| {
            if **cur == snapshot {
                false
            } else {
                *cur = Arc::new(snapshot);
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_keeps_line_numbers() {
        let docs = documents("a: 1\n---\nb: 2\n--- \n\n---\nc: 3\n");
        let starts: Vec<_> = docs.iter().map(|(l, _)| *l).collect();
        assert_eq!(starts, vec![1, 3, 7]);
        assert_eq!(docs[2].1, "c: 3\n");
    }

    #[test]
    fn files_over_a_size_cap_are_rejected_and_keep_their_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let svc = |name: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: 80}}]}}\n")
        };
        let sizes = [("a", 0), ("b", 200), ("c", 0), ("d", 0), ("e", 0)];
        for (name, pad) in sizes {
            let text = format!("{}#{}\n", svc(name), "x".repeat(pad));
            std::fs::write(dir.path().join(format!("{name}.yaml")), text).unwrap();
        }
        let one = svc("a").len() as u64 + 2;
        // Per file: room for one service; in total: for three.
        let read = read_dir(dir.path(), one + 10, 3 * one + 5).unwrap();
        let names = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|n| Path::new(n).file_stem().unwrap().to_string_lossy().into())
                .collect()
        };
        let read_names: Vec<String> = read.files.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names(&read_names), ["a", "c", "d"]);
        assert_eq!(names(&read.rejected), ["b", "e"]);
        assert!(read.problems[0].message.contains("MAX_FILE_BYTES"));
        assert!(read.problems[1].message.contains("MAX_TOTAL_BYTES"));

        // A rejected file that was good before keeps serving.
        let mut last = LastGood::default();
        let e = read.rejected[1].clone();
        last.files.insert(e.clone(), svc("e"));
        let (snap, problems) = parse_read(&read, &mut last, &Options::default());
        let served: Vec<&str> = snap.services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(served, ["a", "c", "d", "e"]);
        assert_eq!(problems.len(), 2);
        assert!(last.files.contains_key(&e), "its last good version is kept");
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings() {
        let v = decode("a: off\nb: yes\nc: true\nd: 80\n").unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": "off", "b": "yes", "c": true, "d": 80})
        );
    }

    #[test]
    fn embedded_manifests_parse_without_problems() {
        let (snap, problems) = load(&Source::Embedded).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert!(!snap.services.is_empty());
    }
}
