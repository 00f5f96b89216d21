//! Capabilities for the iptables children of a non-root proxy.
//!
//! The container image gives the binary file capabilities
//! (`cap_net_admin,cap_net_bind_service+ep`) so it runs as a non-root user
//! with just those. The proxy then has CAP_NET_ADMIN, but an exec'd
//! `iptables-restore` would not: a non-root process's capabilities are lost
//! across exec unless they are ambient. So at start-up the ones of
//! [`FOR_CHILDREN`] that we hold are raised into the inheritable and
//! ambient sets, and nothing else is.

use caps::{CapSet, Capability};

/// What iptables needs: NET_ADMIN for netfilter, NET_RAW for the legacy
/// backend's sockets (passed on only if we hold it).
pub const FOR_CHILDREN: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW];

/// Passes the permitted capabilities of [`FOR_CHILDREN`] on to exec'd
/// children (ambient). Nothing to do as root. Returns what was passed on.
pub fn pass_to_children() -> Vec<Capability> {
    if nix::unistd::geteuid().is_root() {
        return Vec::new();
    }
    let mut passed = Vec::new();
    for cap in FOR_CHILDREN {
        if !caps::has_cap(None, CapSet::Permitted, cap).unwrap_or(false) {
            continue;
        }
        let raised = caps::raise(None, CapSet::Inheritable, cap)
            .and_then(|()| caps::raise(None, CapSet::Ambient, cap));
        match raised {
            Ok(()) => passed.push(cap),
            Err(e) => {
                tracing::warn!(capability = %cap, error = %e, "cannot pass the capability on to iptables")
            }
        }
    }
    passed
}
