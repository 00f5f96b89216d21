//! What changed between two snapshots, Service by Service: the unit of
//! upstream's change trackers (`ServiceChangeTracker` per Service,
//! `EndpointsChangeTracker` per slice of a Service), for kube-proxy's
//! change counters and gauges and for the network programming latency.
//! Pure: the run loop records what it finds here.

use std::cmp::Ordering;
use std::time::SystemTime;

use crate::model::{ServiceEntry, Snapshot, TriggerTimes};

/// How one Service differs between two snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// A port of it was added or removed, or its spec changed (upstream's
    /// Service change).
    pub ports: bool,
    /// The endpoints of one of its ports changed (upstream's Endpoint change).
    pub endpoints: bool,
    /// Per family (`[IPv4, IPv6]`), the new trigger time when it is later
    /// than the old one, or the old one had none.
    pub newer_triggers: [Option<SystemTime>; 2],
}

/// Services changed, each counted once per kind of change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Services whose ports changed.
    pub services: usize,
    /// Services whose endpoints changed.
    pub endpoints: usize,
}

impl Counts {
    /// The counts of `changes`.
    pub fn of(changes: &[Change]) -> Self {
        Self {
            services: changes.iter().filter(|c| c.ports).count(),
            endpoints: changes.iter().filter(|c| c.endpoints).count(),
        }
    }

    /// The counts between `old` and `new` ([`diff`]).
    pub fn between(old: &Snapshot, new: &Snapshot) -> Self {
        Self::of(&diff(old, new))
    }
}

/// A change whose network programming latency is to be observed: the
/// Service (`namespace/name`), the family's index and the trigger time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trigger {
    /// `namespace/name`, for the log.
    pub service: String,
    /// Index into [`crate::model::IP_FAMILIES`].
    pub family: usize,
    /// When the change was triggered.
    pub at: SystemTime,
}

/// The trigger times to observe for `changes`, as upstream's
/// `EndpointsChangeTracker` keeps them: those of Services whose endpoints
/// changed, newer than before, and after `since` (its `trackerStartTime`).
pub fn triggers(changes: &[Change], since: SystemTime) -> Vec<Trigger> {
    let mut out = Vec::new();
    for c in changes.iter().filter(|c| c.endpoints) {
        for (family, at) in c.newer_triggers.iter().enumerate() {
            if let Some(at) = at.filter(|t| *t > since) {
                out.push(Trigger {
                    service: format!("{}/{}", c.namespace, c.name),
                    family,
                    at,
                });
            }
        }
    }
    out
}

/// One Service's ports as the merge meets them.
struct Group<'a> {
    namespace: &'a str,
    name: &'a str,
    ports: bool,
    endpoints: bool,
    old: TriggerTimes,
    new: TriggerTimes,
}

impl Group<'_> {
    fn finish(self, out: &mut Vec<Change>) {
        if !(self.ports || self.endpoints) {
            return;
        }
        let mut newer_triggers = self.new.0;
        for (t, old) in newer_triggers.iter_mut().zip(self.old.0) {
            *t = t.filter(|t| old.is_none_or(|o| *t > o));
        }
        out.push(Change {
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            ports: self.ports,
            endpoints: self.endpoints,
            newer_triggers,
        });
    }
}

/// An entry's endpoints; none for an absent one.
fn endpoints(e: Option<&ServiceEntry>) -> &[crate::model::Endpoint] {
    e.map_or(&[], |e| &e.endpoints)
}

/// The Services that differ between `old` and `new`, in name order: one
/// merge over both sorted maps (linear), nothing for the same snapshot.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Change> {
    let mut out = Vec::new();
    if std::ptr::eq(old, new) {
        return out;
    }
    let (mut a, mut b) = (
        old.services.iter().peekable(),
        new.services.iter().peekable(),
    );
    let mut group: Option<Group> = None;
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((x, _)), Some((y, _))) => x.cmp(y),
        };
        let (o, n): (Option<(_, &ServiceEntry)>, Option<(_, &ServiceEntry)>) = match order {
            Ordering::Less => (a.next(), None),
            Ordering::Greater => (None, b.next()),
            Ordering::Equal => (a.next(), b.next()),
        };
        let Some(key) = o.or(n).map(|(k, _)| k) else {
            break;
        };
        let (o, n) = (o.map(|(_, e)| e), n.map(|(_, e)| e));
        let same = group
            .as_ref()
            .is_some_and(|g| g.namespace == key.namespace && g.name == key.name);
        if !same {
            if let Some(g) = group.take() {
                g.finish(&mut out);
            }
        }
        let g = group.get_or_insert_with(|| Group {
            namespace: &key.namespace,
            name: &key.name,
            ports: false,
            endpoints: false,
            old: TriggerTimes::default(),
            new: TriggerTimes::default(),
        });
        g.ports |= match (o, n) {
            (Some(o), Some(n)) => o.port != n.port,
            _ => true,
        };
        g.endpoints |= endpoints(o) != endpoints(n);
        if let Some(o) = o {
            g.old = o.triggers;
        }
        if let Some(n) = n {
            g.new = n.triggers;
        }
    }
    if let Some(g) = group {
        g.finish(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::model::{Endpoint, Protocol, ServicePort, ServicePortName};

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn key(name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: "ns".into(),
            name: name.into(),
            port_name: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    fn entry(port: u16, endpoints: &[&str], triggers: [Option<u64>; 2]) -> ServiceEntry {
        ServiceEntry {
            port: ServicePort {
                port,
                ..ServicePort::default()
            },
            endpoints: endpoints
                .iter()
                .map(|a| Endpoint {
                    addr: a.parse::<SocketAddr>().unwrap(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: None,
                    zone: None,
                    hints_zones: Vec::new(),
                    hints_nodes: Vec::new(),
                })
                .collect(),
            triggers: TriggerTimes(triggers.map(|t| t.map(at))),
            ..ServiceEntry::default()
        }
    }

    fn snap(entries: Vec<(ServicePortName, ServiceEntry)>) -> Snapshot {
        Snapshot {
            services: entries.into_iter().collect(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_same_snapshot_or_an_equal_one_has_no_change() {
        let s = snap(vec![(
            key("web", "http"),
            entry(80, &["10.0.0.1:80"], [None; 2]),
        )]);
        assert!(diff(&s, &s).is_empty());
        assert!(diff(&s, &s.clone()).is_empty());
        assert_eq!(Counts::between(&s, &s.clone()), Counts::default());
    }

    #[test]
    fn a_service_counts_once_however_many_of_its_ports_changed() {
        let old = Snapshot::default();
        let new = snap(vec![
            (
                key("web", "http"),
                entry(80, &["10.0.0.1:80"], [Some(5), None]),
            ),
            (
                key("web", "https"),
                entry(443, &["10.0.0.1:443"], [Some(5), None]),
            ),
            (key("db", ""), entry(5432, &[], [None; 2])),
        ]);
        let c = diff(&old, &new);
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].name.as_str(), c[0].ports, c[0].endpoints),
            ("db", true, false)
        );
        assert_eq!(
            (c[1].name.as_str(), c[1].ports, c[1].endpoints),
            ("web", true, true)
        );
        assert_eq!(c[1].newer_triggers, [Some(at(5)), None]);
        assert_eq!(
            Counts::of(&c),
            Counts {
                services: 2,
                endpoints: 1
            }
        );
        // Removed: its ports and, having had some, its endpoints.
        let gone = diff(&new, &old);
        assert_eq!(
            Counts::of(&gone),
            Counts {
                services: 2,
                endpoints: 1
            }
        );
        assert_eq!(gone[1].newer_triggers, [None, None]);
    }

    #[test]
    fn endpoints_and_specs_change_apart() {
        let old = snap(vec![
            (key("a", "p"), entry(80, &["10.0.0.1:80"], [Some(1), None])),
            (key("b", "p"), entry(80, &["10.0.0.2:80"], [None; 2])),
            (key("c", "p"), entry(80, &["10.0.0.3:80"], [None; 2])),
        ]);
        let new = snap(vec![
            (key("a", "p"), entry(80, &["10.0.0.9:80"], [Some(2), None])),
            (key("b", "p"), entry(81, &["10.0.0.2:80"], [None; 2])),
            (key("c", "p"), entry(80, &["10.0.0.3:80"], [Some(7), None])),
        ]);
        let c = diff(&old, &new);
        let flags: Vec<_> = c
            .iter()
            .map(|c| (c.name.as_str(), c.ports, c.endpoints))
            .collect();
        // c's trigger time alone moved: nothing to program.
        assert_eq!(flags, [("a", false, true), ("b", true, false)]);
        assert_eq!(
            Counts::of(&c),
            Counts {
                services: 1,
                endpoints: 1
            }
        );
    }

    #[test]
    fn only_newer_trigger_times_after_the_start_are_observed() {
        let old = snap(vec![
            (
                key("a", "p"),
                entry(80, &["10.0.0.1:80"], [Some(10), Some(10)]),
            ),
            (key("b", "p"), entry(80, &["10.0.0.2:80"], [Some(10), None])),
            (key("c", "p"), entry(80, &["10.0.0.3:80"], [None; 2])),
        ]);
        let new = snap(vec![
            // IPv4 newer, IPv6 the same (another family's slice).
            (
                key("a", "p"),
                entry(80, &["10.0.0.9:80"], [Some(20), Some(10)]),
            ),
            // A slice deleted: the rest's time is older. Ignored, as upstream.
            (key("b", "p"), entry(80, &[], [Some(8), None])),
            // New, but from before the start.
            (key("c", "p"), entry(80, &["10.0.0.4:80"], [Some(3), None])),
        ]);
        let t = triggers(&diff(&old, &new), at(5));
        assert_eq!(
            t,
            [Trigger {
                service: "ns/a".into(),
                family: 0,
                at: at(20)
            }]
        );
        assert_eq!(
            triggers(&diff(&old, &new), at(0)).len(),
            2,
            "c counts from 0"
        );
    }
}
