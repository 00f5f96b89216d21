//! `--config FILE`: kube-proxy's `KubeProxyConfiguration`
//! (`kubeproxy.config.k8s.io/v1alpha1`), as kubeadm renders it into the
//! `kube-proxy` ConfigMap's `config.conf`, read before anything starts.
//!
//! - **Schema** (`schema.rs`): every field upstream has or had; an unknown
//!   field, a wrong type, or a wrong `apiVersion`/`kind` is an error naming
//!   the file and the field's path. Durations are Go's (`duration.rs`).
//! - **Zero means default**, as upstream's defaulting: absent, `null`,
//!   `""`, `0` and `0s` leave the flag's value alone.
//! - **Precedence**: a flag given on the command line wins over the
//!   file's field (clap's `ValueSource`), the field over the default.
//!   Upstream ignores most flags once `--config` is given; kubeadm passes
//!   only `--config` and `--hostname-override` (which wins upstream too),
//!   so the two agree there.
//! - **Fields without a use** in a userspace proxy (conntrack, IPVS,
//!   nftables, Windows, OOM score, feature gates, ...) are logged once by
//!   name when not at their default ([`Note::Ignored`]).
//!
//! [`resolve`] returns the command line with the file applied, or a
//! [`ConfigError`] (exit 64); nothing is applied until it returns.

mod duration;
mod resolve;
mod schema;

pub use resolve::{parse, resolve, Note, Notes, API_VERSION, KIND, MAX_FILE_BYTES};
