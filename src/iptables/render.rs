//! Pure rendering of the `nat` table payload for `iptables-restore
//! --noflush`: service addresses → our listeners. No I/O, deterministic:
//! an unchanged input renders byte-identical text.
//!
//! Declaring our chains (`:KUSP-… - [0:0]`) in a `--noflush` restore creates
//! them or flushes them, so each apply replaces their whole content
//! atomically; built-in chains are only touched by the jump rules the caller
//! asks for.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::model::Protocol;

/// Prefix of every chain we own: cleanup removes whatever carries it.
pub const CHAIN_PREFIX: &str = "KUSP-";
/// Chain for traffic arriving from pods and other hosts (from `PREROUTING`).
pub const CHAIN_CONTAINER: &str = "KUSP-PORTALS-CONTAINER";
/// Chain for traffic the node itself sends (from `OUTPUT`).
pub const CHAIN_HOST: &str = "KUSP-PORTALS-HOST";
/// Comment on our jump rules, so they can be found and counted.
pub const JUMP_COMMENT: &str = "kube-userspace-proxy portals";

/// Every (built-in chain, our chain) jump we install in `nat`.
pub const JUMPS: [(&str, &str); 2] = [("PREROUTING", CHAIN_CONTAINER), ("OUTPUT", CHAIN_HOST)];

/// Why a service address is redirected (for ordering and debug output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortalKind {
    /// `spec.clusterIP(s)`.
    ClusterIp,
    /// `spec.externalIPs`.
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancerIp,
}

/// One service address redirected to a local listener.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Portal {
    /// Address clients dial.
    pub ip: IpAddr,
    /// Port clients dial.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Our listener's port.
    pub listener_port: u16,
    /// Which field of the Service the address came from.
    pub kind: PortalKind,
    /// `namespace/name:port`, put in the rule's comment.
    pub comment: String,
}

/// Where matched traffic is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Listeners bind the wildcard (or loopback) address: `REDIRECT` (to the
    /// incoming interface's address, or to loopback for local traffic).
    Redirect,
    /// Listeners bind this address only: `DNAT` to it.
    Dnat(IpAddr),
}

impl Target {
    /// The target for listeners bound to `bind`: REDIRECT reaches a wildcard
    /// listener from anywhere; a specific address needs DNAT, except that
    /// node-local traffic REDIRECTed lands on loopback, so a loopback bind
    /// can use REDIRECT in the host chain.
    pub fn for_bind(bind: IpAddr, host_chain: bool) -> Self {
        if bind.is_unspecified() || (host_chain && bind.is_loopback()) {
            Self::Redirect
        } else {
            Self::Dnat(bind)
        }
    }
}

/// What the caller found of our jump rules in the live table, per built-in
/// chain, so the payload can make each exist exactly once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JumpState {
    /// For each entry of [`JUMPS`]: the rule specs (after `-A CHAIN `) of
    /// every jump to our chain found in the live table.
    pub found: [Vec<String>; 2],
}

/// Makes a comment safe inside double quotes and within iptables' 256
/// byte limit.
pub fn sanitize_comment(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-/:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(255);
    out
}

fn jump_spec(chain: &str) -> String {
    format!("-m comment --comment \"{JUMP_COMMENT}\" -j {chain}")
}

/// Renders the `nat` payload for one address family (`v6` selects IPv6
/// portals and `/128` masks): our chains declared (thus flushed), the jumps
/// fixed to exactly one each, then one rule per portal and chain.
pub fn render(portals: &[Portal], v6: bool, bind: IpAddr, jumps: &JumpState) -> String {
    let mut portals: Vec<&Portal> = portals.iter().filter(|p| p.ip.is_ipv6() == v6).collect();
    portals.sort();
    portals.dedup_by(|a, b| a.ip == b.ip && a.port == b.port && a.protocol == b.protocol);
    let mut out = String::from("*nat\n");
    for (_, chain) in JUMPS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for (i, (builtin, chain)) in JUMPS.iter().enumerate() {
        let found = &jumps.found[i];
        if found.is_empty() {
            let _ = writeln!(out, "-I {builtin} 1 {}", jump_spec(chain));
        }
        // Duplicates (e.g. from an older run killed mid-way): keep one.
        for extra in found.iter().skip(1) {
            let _ = writeln!(out, "-D {builtin} {extra}");
        }
    }
    let mask = if v6 { 128 } else { 32 };
    for (chain, host) in [(CHAIN_CONTAINER, false), (CHAIN_HOST, true)] {
        for p in &portals {
            let proto = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => continue,
            };
            let target = match Target::for_bind(bind, host) {
                Target::Redirect => format!("REDIRECT --to-ports {}", p.listener_port),
                Target::Dnat(ip) if ip.is_ipv6() => {
                    format!("DNAT --to-destination [{ip}]:{}", p.listener_port)
                }
                Target::Dnat(ip) => format!("DNAT --to-destination {ip}:{}", p.listener_port),
            };
            let _ = writeln!(
                out,
                "-A {chain} -d {}/{mask} -p {proto} -m {proto} --dport {} -m comment --comment \"{}\" -j {target}",
                p.ip,
                p.port,
                sanitize_comment(&p.comment),
            );
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// Renders the payload that removes everything of ours from a saved `nat`
/// table (`iptables-save -t nat` output): every jump into a `KUSP-` chain,
/// then every `KUSP-` chain (flushed, then deleted). `None` when there is
/// nothing of ours.
pub fn render_cleanup(saved: &str) -> Option<String> {
    let mut chains = Vec::new();
    let mut jumps = Vec::new();
    let mut in_nat = false;
    for line in saved.lines() {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table.trim() == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if name.starts_with(CHAIN_PREFIX) {
                chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            let jumps_to_ours = spec
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with(CHAIN_PREFIX));
            if !chain.starts_with(CHAIN_PREFIX) && jumps_to_ours {
                jumps.push(format!("-D {chain} {spec}"));
            }
        }
    }
    if chains.is_empty() && jumps.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for c in &chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for j in &jumps {
        let _ = writeln!(out, "{j}");
    }
    for c in &chains {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// Finds our jump rules in a saved `nat` table, for [`render`].
pub fn find_jumps(saved: &str) -> JumpState {
    let mut state = JumpState::default();
    let mut in_nat = false;
    for line in saved.lines() {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table.trim() == "nat";
            continue;
        }
        let Some(rule) = line.strip_prefix("-A ").filter(|_| in_nat) else {
            continue;
        };
        let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
        for (i, (builtin, ours)) in JUMPS.iter().enumerate() {
            if chain == *builtin && spec.ends_with(&format!("-j {ours}")) {
                state.found[i].push(spec.to_string());
            }
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    fn portal(ip: &str, port: u16, lp: u16, kind: PortalKind) -> Portal {
        Portal {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            listener_port: lp,
            kind,
            comment: "ns/web:http".into(),
        }
    }

    const ANY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

    #[test]
    fn empty_snapshot_renders_only_chains_and_jumps() {
        let out = render(&[], false, ANY, &JumpState::default());
        assert_eq!(
            out,
            "*nat\n\
             :KUSP-PORTALS-CONTAINER - [0:0]\n\
             :KUSP-PORTALS-HOST - [0:0]\n\
             -I PREROUTING 1 -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-CONTAINER\n\
             -I OUTPUT 1 -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-HOST\n\
             COMMIT\n"
        );
    }

    #[test]
    fn cluster_external_and_lb_ips_render_sorted_and_stable() {
        let ps = vec![
            portal("192.0.2.10", 80, 30080, PortalKind::LoadBalancerIp),
            portal("10.96.0.10", 80, 30080, PortalKind::ClusterIp),
            portal("198.51.100.7", 80, 30080, PortalKind::ExternalIp),
        ];
        let jumps = JumpState {
            found: [vec!["x".into()], vec!["y".into()]],
        };
        let out = render(&ps, false, ANY, &jumps);
        let mut reversed = ps.clone();
        reversed.reverse();
        assert_eq!(
            out,
            render(&reversed, false, ANY, &jumps),
            "order-independent"
        );
        assert_eq!(
            out,
            "*nat\n\
             :KUSP-PORTALS-CONTAINER - [0:0]\n\
             :KUSP-PORTALS-HOST - [0:0]\n\
             -A KUSP-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             -A KUSP-PORTALS-CONTAINER -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             -A KUSP-PORTALS-CONTAINER -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             -A KUSP-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             -A KUSP-PORTALS-HOST -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             -A KUSP-PORTALS-HOST -d 198.51.100.7/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080\n\
             COMMIT\n"
        );
    }

    #[test]
    fn ipv6_goes_to_its_own_payload() {
        let ps = vec![
            portal("10.96.0.10", 80, 30080, PortalKind::ClusterIp),
            portal("fd00::10", 80, 30080, PortalKind::ClusterIp),
        ];
        let jumps = JumpState {
            found: [vec!["x".into()], vec!["y".into()]],
        };
        let v4 = render(&ps, false, ANY, &jumps);
        let v6 = render(&ps, true, "::".parse().unwrap(), &jumps);
        assert!(v4.contains("-d 10.96.0.10/32") && !v4.contains("fd00"));
        assert!(v6.contains("-d fd00::10/128 -p tcp") && !v6.contains("10.96"));
    }

    #[test]
    fn specific_bind_address_uses_dnat() {
        let ps = vec![portal("10.96.0.10", 80, 30080, PortalKind::ClusterIp)];
        let out = render(
            &ps,
            false,
            "192.0.2.1".parse().unwrap(),
            &JumpState::default(),
        );
        assert!(out.contains("-A KUSP-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j DNAT --to-destination 192.0.2.1:30080"));
        assert!(out.contains("-A KUSP-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j DNAT --to-destination 192.0.2.1:30080"));
        let out = render(
            &ps,
            false,
            "127.0.0.1".parse().unwrap(),
            &JumpState::default(),
        );
        assert!(out.contains("-A KUSP-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http\" -j REDIRECT --to-ports 30080"));
    }

    #[test]
    fn comments_are_escaped() {
        let mut p = portal("10.96.0.10", 80, 1, PortalKind::ClusterIp);
        p.comment = "ns/we\"b:h ttp\\x".into();
        let out = render(&[p], false, ANY, &JumpState::default());
        assert!(out.contains("--comment \"ns/we_b:h_ttp_x\""), "{out}");
        assert_eq!(sanitize_comment(&"a".repeat(300)).len(), 255);
    }

    #[test]
    fn duplicate_jumps_are_removed_and_missing_ones_added() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
            -A PREROUTING -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-CONTAINER\n\
            -A PREROUTING -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-CONTAINER\n\
            -A PREROUTING -j DOCKER\nCOMMIT\n";
        let jumps = find_jumps(saved);
        assert_eq!(jumps.found[0].len(), 2);
        assert!(jumps.found[1].is_empty());
        let out = render(&[], false, ANY, &jumps);
        assert!(out.contains("-D PREROUTING -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-CONTAINER\n"));
        assert_eq!(out.matches("-I PREROUTING").count(), 0);
        assert_eq!(out.matches("-I OUTPUT 1").count(), 1);
    }

    #[test]
    fn cleanup_removes_only_ours() {
        let saved = "*filter\n:KUSP-NOT-NAT - [0:0]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n:KUSP-PORTALS-HOST - [0:0]\n:KUSP-OLD - [0:0]\n\
            -A OUTPUT -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-HOST\n\
            -A OUTPUT -j DOCKER\n-A KUSP-OLD -j KUSP-PORTALS-HOST\nCOMMIT\n";
        let out = render_cleanup(saved).unwrap();
        assert_eq!(
            out,
            "*nat\n:KUSP-PORTALS-HOST - [0:0]\n:KUSP-OLD - [0:0]\n\
             -D OUTPUT -m comment --comment \"kube-userspace-proxy portals\" -j KUSP-PORTALS-HOST\n\
             -X KUSP-PORTALS-HOST\n-X KUSP-OLD\nCOMMIT\n"
        );
        assert_eq!(render_cleanup("*nat\n:DOCKER - [0:0]\nCOMMIT\n"), None);
    }
}
