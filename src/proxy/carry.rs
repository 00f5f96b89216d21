//! What the proxy can carry to the next process: descriptions of its
//! listeners and their counters ([`ListenerDesc`], [`Exported`]), and what
//! it received from the previous one ([`Inherited`]). The protocol that
//! moves them is the `handover` module's; the proxy knows nothing of it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::ServicePortName;

/// Counters of a service port carried over so metrics continue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Client connections accepted.
    pub accepted: u64,
    /// Connections that reached a backend and ended.
    pub completed: u64,
    /// Connections closed because no backend could be reached.
    pub failed: u64,
    /// Bytes client → backend.
    pub bytes_in: u64,
    /// Bytes backend → client.
    pub bytes_out: u64,
    /// UDP datagrams from clients.
    pub datagrams_in: u64,
    /// UDP datagrams to clients.
    pub datagrams_out: u64,
}

/// Counters of one endpoint of a service port, carried over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendCounters {
    /// The endpoint.
    pub addr: SocketAddr,
    /// Connections ever established to it.
    pub total: u64,
    /// Dials that failed.
    pub dial_failures: u64,
    /// Bytes sent to it.
    pub bytes_in: u64,
    /// Bytes received from it.
    pub bytes_out: u64,
}

/// What a handed-over socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A TCP service port: one `SO_REUSEPORT` socket per worker of the old process.
    Tcp,
    /// A UDP service port.
    Udp,
    /// The `--metrics-bind-address` listener.
    Metrics,
    /// The `--healthz-bind-address` listener.
    Healthz,
    /// A Service's health-check node port (its service port name has an
    /// empty port name).
    HealthCheck,
}

/// The description of one handed-over listener (its fds travel beside it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListenerDesc {
    /// What it is.
    pub kind: Kind,
    /// The service port, for `Tcp` and `Udp`; the Service, for `HealthCheck`.
    pub service: Option<ServicePortName>,
    /// The port it is bound to.
    pub port: u16,
    /// The service port's counters at the time of the hand-over.
    #[serde(default)]
    pub counters: Counters,
    /// Its endpoints' counters (the internal endpoint set's).
    #[serde(default)]
    pub backends: Vec<BackendCounters>,
}

/// A listener exported by the running process: its description and its
/// sockets, shared with the running listener (no fd is duplicated: the
/// kernel copies them into the message).
pub struct Exported {
    /// What it is.
    pub desc: ListenerDesc,
    /// Its sockets.
    pub fds: Vec<SharedFd>,
}

impl fmt::Debug for Exported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exported")
            .field("desc", &self.desc)
            .field("fds", &self.fds.len())
            .finish()
    }
}

/// A socket shared between its owner and a hand-over in progress.
pub type SharedFd = Arc<dyn AsFd + Send + Sync>;

/// The counters of a service port and of its endpoints, carried over.
pub type Carried = (Counters, Vec<BackendCounters>);

/// The sockets received from the previous process, waiting to be adopted.
#[derive(Debug, Default)]
pub struct Inherited {
    /// TCP service ports: port, sockets, counters.
    pub tcp: BTreeMap<ServicePortName, (u16, Vec<std::net::TcpListener>, Carried)>,
    /// UDP service ports: port, socket, counters.
    pub udp: BTreeMap<ServicePortName, (u16, std::net::UdpSocket, Carried)>,
    /// The admin listeners, by kind.
    pub admin: Vec<(Kind, std::net::TcpListener)>,
    /// Health-check node ports, by Service (empty port name): port, socket.
    pub health_checks: BTreeMap<ServicePortName, (u16, std::net::TcpListener)>,
}

impl Inherited {
    /// Takes the admin listener of `kind` when it is bound where `want`
    /// asks (port 0: any port on that address).
    pub fn take_admin(
        &mut self,
        kind: Kind,
        want: std::net::SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let i = self.admin.iter().position(|(k, l)| {
            *k == kind
                && l.local_addr().is_ok_and(|a| {
                    a.ip() == want.ip() && (want.port() == 0 || a.port() == want.port())
                })
        })?;
        Some(self.admin.swap_remove(i).1)
    }

    /// Service ports received.
    pub fn len(&self) -> usize {
        self.tcp.len() + self.udp.len()
    }

    /// Whether no service port was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
