//! Discovery turns Kubernetes objects into a [`Snapshot`](crate::model::Snapshot).
//!
//! Two sources collect `v1 Service` and `discovery.k8s.io/v1 EndpointSlice`
//! objects, and this node's `v1 Node` as the third kind: [`manifests`] from
//! a directory of files (or the embedded examples), [`kube`] from the API
//! server. Both hand them to [`build_snapshot_with`] ([`snapshot`]) with
//! the node's [`Options`], which validates and joins them and
//! reports each object it skipped as a [`Problem`], so the two sources agree
//! on every rule. The API source runs one [`list_watch`] loop per kind; the
//! loops carry objects as [`raw::Raw`] JSON, which `kube`'s store decodes
//! one by one.
//!
//! Dependencies run one way: `kube` → `list_watch` → `raw` (`kube` uses
//! `raw` too); `kube`, `manifests` → `snapshot` → `crate::model`.

pub mod kube;
pub mod list_watch;
pub mod manifests;
pub mod raw;
pub mod snapshot;
pub mod topology;

pub use snapshot::{
    build_snapshot, build_snapshot_with, node_info, Options, Problem, Sourced,
    ANNOTATION_TRIGGER_TIME, LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME,
};
