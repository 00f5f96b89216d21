//! Discovery from a directory of Kubernetes YAML (or the manifests embedded
//! in the binary): the no-cluster source.
//!
//! Files ending in `.yaml`, `.yml` or `.json` are read in name order; each
//! may hold several documents separated by `---` and `kind: List` wrappers.
//! Documents are parsed one by one, so a broken one costs only itself.
//! The directory is polled: a change is published within [`POLL_INTERVAL`].

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_yaml::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{build_snapshot, Problem, Sourced};
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
}

/// A file's name and contents.
type File = (String, String);

impl Source {
    /// Reads every manifest file; fails only when the directory itself is
    /// unreadable. A file that vanishes or is unreadable mid-read is reported
    /// as a problem.
    fn read(&self) -> Result<(Vec<File>, Vec<Problem>), Error> {
        match self {
            Source::Embedded => Ok((
                EMBEDDED
                    .iter()
                    .map(|(n, t)| (n.to_string(), t.to_string()))
                    .collect(),
                Vec::new(),
            )),
            Source::Dir(dir) => read_dir(dir),
        }
    }
}

fn read_dir(dir: &Path) -> Result<(Vec<File>, Vec<Problem>), Error> {
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
    let mut files = Vec::with_capacity(paths.len());
    let mut problems = Vec::new();
    for path in paths {
        let name = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => files.push((name, text)),
            Err(e) => problems.push(Problem {
                origin: name,
                object: "file".into(),
                field: "-".into(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    Ok((files, problems))
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
    problems: Vec<Problem>,
}

impl Objects {
    /// Adds a file's objects; false when some document of it did not parse.
    fn add_file(&mut self, name: &str, text: &str) -> bool {
        let before = self.problems.len();
        for (line, doc) in documents(text) {
            let origin = format!("{name}:{line}");
            match serde_yaml::from_str::<Value>(&doc) {
                Ok(Value::Null) => {}
                Ok(v) => self.add_value(&origin, v),
                Err(e) => self.problems.push(Problem {
                    origin,
                    object: "document".into(),
                    field: "-".into(),
                    message: format!("not valid YAML: {e}"),
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
                    Some(Value::Sequence(items)) => items.clone(),
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
pub fn parse(files: &[(String, String)], last: &mut LastGood) -> (Snapshot, Vec<Problem>) {
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
        objects.problems.append(&mut file_objects.problems);
    }
    last.files.retain(|n, _| files.iter().any(|(f, _)| f == n));
    let (snapshot, mut problems) =
        build_snapshot(&objects.services, &objects.slices, &last.snapshot);
    objects.problems.append(&mut problems);
    last.snapshot = snapshot.clone();
    (snapshot, objects.problems)
}

/// Reads and parses the source once.
pub fn load(source: &Source) -> Result<(Snapshot, Vec<Problem>), Error> {
    let (files, mut read_problems) = source.read()?;
    let (snapshot, mut problems) = parse(&files, &mut LastGood::default());
    read_problems.append(&mut problems);
    Ok((snapshot, read_problems))
}

fn fingerprint(files: &[(String, String)]) -> u64 {
    let mut h = DefaultHasher::new();
    files.hash(&mut h);
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

/// Loads the source, publishing the first snapshot before returning, then
/// keeps polling it in a task until `cancel` fires. Fails at once when the
/// directory cannot be read at start-up; later read errors keep the last
/// good snapshot and are logged.
pub async fn spawn(
    source: Source,
    cancel: CancellationToken,
) -> Result<watch::Receiver<Arc<Snapshot>>, Error> {
    let (files, read_problems) = source.read()?;
    let mut last_good = LastGood::default();
    let (snapshot, problems) = parse(&files, &mut last_good);
    report(&read_problems);
    report(&problems);
    let mut last = fingerprint(&files);
    tracing::info!(
        source = ?source,
        services = snapshot.services.len(),
        skipped = problems.len() + read_problems.len(),
        "manifests loaded"
    );
    let (tx, rx) = watch::channel(Arc::new(snapshot));
    if matches!(source, Source::Embedded) {
        // Nothing can change: keep the sender alive until cancelled.
        tokio::spawn(async move {
            cancel.cancelled().await;
            drop(tx);
        });
        return Ok(rx);
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let src = source.clone();
            let read = tokio::task::spawn_blocking(move || src.read()).await;
            let (files, read_problems) = match read {
                Ok(Ok(r)) => {
                    failing = false;
                    r
                }
                Ok(Err(e)) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot re-read manifests; keeping the last good state");
                    }
                    failing = true;
                    continue;
                }
                Err(_) => continue,
            };
            let fp = fingerprint(&files);
            if fp == last {
                continue;
            }
            last = fp;
            let (snapshot, problems) = parse(&files, &mut last_good);
            report(&read_problems);
            report(&problems);
            tracing::info!(
                services = snapshot.services.len(),
                skipped = problems.len() + read_problems.len(),
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
    });
    Ok(rx)
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
    fn embedded_manifests_parse_without_problems() {
        let (snap, problems) = load(&Source::Embedded).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert!(!snap.services.is_empty());
    }
}
