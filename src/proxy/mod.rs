//! The data path and the proxier that drives it.
//!
//! The run loop owns a [`Proxier`], which turns each [`crate::model::Snapshot`]
//! into running listeners ([`listener`]): one per service port, each with
//! a [`Service`] (balancers, settings, counters) that its connections
//! share. A TCP connection is accepted on a worker ([`workers`]), dialled
//! with retry ([`connect`] over [`balancer`]), then owned by one
//! [`Connection`] ([`conn`], moved by [`splice`]) until both sides end.
//! Every fd the data path holds is counted in one budget ([`fds`]), which
//! also sets the connection limit. What can travel to the next process is
//! described in [`carry`]; the protocol is the `handover` module's.
//!
//! Nothing here imports the exposition layer (metrics, admin, status).

pub mod balancer;
pub mod carry;
pub mod config;
pub mod conn;
pub mod connect;
mod context;
pub mod dealer;
pub mod fds;
pub mod idle;
pub mod listener;
pub mod origin;
pub mod ports;
mod proxier;
pub mod proxy_protocol;
pub mod service;
pub mod splice;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod workers;

pub use config::{
    Keepalive, ProxyConfig, DEFAULT_TCP_FIN_TIMEOUT, DEFAULT_UDP_MAX_SESSIONS, DEFAULT_UDP_TIMEOUT,
};
pub use conn::{Connection, CopyMode};
pub(crate) use context::is_local_exhaustion;
pub use context::Context;
pub use proxier::{Proxier, SyncReport};
pub use service::{
    Published, Routing, Service, ServiceStats, ServiceView, Traffic, Unserved, UnservedReason,
    CONFIG_ANNOTATIONS,
};
