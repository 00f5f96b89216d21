//! Listener ports for service ports that have no nodePort
//! (`--proxy-port-range`).
//!
//! The default, as upstream with an empty range, is a port of the kernel's
//! ephemeral range (`ip_local_port_range`, 32768-60999 by default, above
//! the NodePort range 30000-32767, so a later NodePort Service cannot
//! find its port taken), minus `ip_local_reserved_ports`. We hand those
//! out ourselves rather than binding port 0: the kernel's own choice
//! probes the range at random and, once some 7,000 of its ports are
//! bound, takes about a millisecond a bind (10,000 Service ports took 4
//! to 9 s to bind). Ports are handed out sequentially from where the last
//! one was taken, wrapping, skipping ports we hold and ports that fail to
//! bind. For the ephemeral range one cursor serves the whole process,
//! starting at an offset of the pid (so that two processes seldom try the
//! same ports), and hands each port to one caller only.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;

/// The configured `--proxy-port-range`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRange {
    /// Let the kernel choose (empty, `0` or `0-0`).
    Ephemeral,
    /// Inclusive range `first-last`.
    Range(u16, u16),
}

impl FromStr for PortRange {
    type Err = String;

    /// Accepts `""`, `0`, `0-0` (ephemeral), `a-b`, `a+n` and `a`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let num = |v: &str| {
            v.trim()
                .parse::<u16>()
                .map_err(|_| format!("{v:?} is not a port number (0-65535)"))
        };
        let (a, b) = if s.is_empty() {
            (0, 0)
        } else if let Some((a, b)) = s.split_once('-') {
            (num(a)?, num(b)?)
        } else if let Some((a, n)) = s.split_once('+') {
            let a = num(a)?;
            let last = a
                .checked_add(num(n)?)
                .ok_or_else(|| format!("{s:?} goes past port 65535"))?;
            (a, last)
        } else {
            let a = num(s)?;
            (a, a)
        };
        match (a, b) {
            (0, 0) => Ok(Self::Ephemeral),
            (0, _) => Err(format!("{s:?}: port 0 cannot start a range")),
            (a, b) if a > b => Err(format!("{s:?}: first port is above the last")),
            (a, b) => Ok(Self::Range(a, b)),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ephemeral => f.write_str("ephemeral"),
            Self::Range(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// The kernel's ephemeral range when `/proc` cannot tell.
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);

/// Hands out ports from a [`PortRange`]; knows which ones we hold.
#[derive(Debug)]
pub struct PortAllocator {
    /// First and last port, inclusive.
    range: (u16, u16),
    /// Ports never handed out (`ip_local_reserved_ports` for the
    /// ephemeral range).
    reserved: BTreeSet<u16>,
    held: BTreeSet<u16>,
    /// Where the next search starts: this allocator's own for a
    /// configured range; for the ephemeral range, one cursor shared by the
    /// whole process ([`EPHEMERAL_NEXT`]), so that proxiers in one process
    /// (tests run several) neither hand out the same ports nor reuse one
    /// just released by another, to which a late client may still connect.
    next: Cursor,
}

#[derive(Debug)]
enum Cursor {
    Own(u16),
    Shared,
}

/// The process's cursor into the ephemeral range (0: not set yet).
static EPHEMERAL_NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

impl PortAllocator {
    /// An allocator with nothing held.
    pub fn new(range: PortRange) -> Self {
        match range {
            PortRange::Range(a, b) => Self::within((a, b), BTreeSet::new(), Cursor::Own(a)),
            PortRange::Ephemeral => {
                let (a, b) = sysctl("ip_local_port_range")
                    .and_then(|s| parse_pair(&s))
                    .unwrap_or(DEFAULT_EPHEMERAL);
                let reserved = sysctl("ip_local_reserved_ports")
                    .map(|s| parse_port_list(&s))
                    .unwrap_or_default();
                let span = u32::from(b - a) + 1;
                let start = a + (std::process::id() * 7919 % span) as u16;
                let _ = EPHEMERAL_NEXT.compare_exchange(0, start, Relaxed, Relaxed);
                Self::within((a, b), reserved, Cursor::Shared)
            }
        }
    }

    fn within(range: (u16, u16), reserved: BTreeSet<u16>, next: Cursor) -> Self {
        Self {
            range,
            reserved,
            held: BTreeSet::new(),
            next,
        }
    }

    /// Ports to try, in order, skipping held and reserved ones and `avoid`
    /// (e.g. node ports of other services). Call [`Self::hold`] with the
    /// one that bound.
    pub fn candidates<'a>(&'a self, avoid: &'a BTreeSet<u16>) -> impl Iterator<Item = u16> + 'a {
        let (a, b) = self.range;
        let span = usize::from(b - a) + 1;
        let own = match self.next {
            Cursor::Own(n) => Some(n),
            Cursor::Shared => None,
        };
        (0..span)
            .map(move |k| match own {
                Some(n) => a + ((usize::from(n - a) + k) % span) as u16,
                None => claim_ephemeral(a, b),
            })
            .filter(|p| !self.held.contains(p) && !avoid.contains(p) && !self.reserved.contains(p))
    }

    /// Marks a port as ours (the next allocation starts after it).
    pub fn hold(&mut self, port: u16) {
        let (a, b) = self.range;
        self.held.insert(port);
        let next = if port >= b { a } else { port + 1 };
        if let Cursor::Own(n) = &mut self.next {
            *n = next;
        }
    }

    /// Gives a port back when its listener closes.
    pub fn release(&mut self, port: u16) {
        self.held.remove(&port);
    }
}

/// Takes the next port of the shared ephemeral cursor: each port goes to
/// one caller only, so two proxiers binding at once never try the same.
fn claim_ephemeral(a: u16, b: u16) -> u16 {
    let prev = EPHEMERAL_NEXT.fetch_update(Relaxed, Relaxed, |p| {
        let p = p.clamp(a, b);
        Some(if p >= b { a } else { p + 1 })
    });
    prev.unwrap_or(a).clamp(a, b)
}

/// A value of `/proc/sys/net/ipv4/`.
fn sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).ok()
}

/// `ip_local_port_range`: two numbers, first ≤ last.
fn parse_pair(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    match (it.next()?.ok()?, it.next()?.ok()?) {
        (a, b) if 0 < a && a <= b => Some((a, b)),
        _ => None,
    }
}

/// `ip_local_reserved_ports`: `8080,9000-9010` (empty: none).
fn parse_port_list(s: &str) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
            out.extend(a..=b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_upstream_form() {
        assert_eq!("".parse(), Ok(PortRange::Ephemeral));
        assert_eq!("0-0".parse(), Ok(PortRange::Ephemeral));
        assert_eq!("100-200".parse(), Ok(PortRange::Range(100, 200)));
        assert_eq!("100+5".parse(), Ok(PortRange::Range(100, 105)));
        assert_eq!("100".parse(), Ok(PortRange::Range(100, 100)));
        assert!("200-100".parse::<PortRange>().is_err());
        assert!("65535+1".parse::<PortRange>().is_err());
        assert!("x".parse::<PortRange>().is_err());
    }

    #[test]
    fn hands_out_sequentially_and_wraps() {
        let mut a = PortAllocator::new(PortRange::Range(10, 13));
        let avoid = BTreeSet::from([11]);
        let all = |a: &PortAllocator| a.candidates(&avoid).collect::<Vec<_>>();
        assert_eq!(all(&a), vec![10, 12, 13]);
        a.hold(10);
        a.hold(12);
        assert_eq!(all(&a), vec![13]);
        a.hold(13);
        assert!(all(&a).is_empty());
        a.release(10);
        assert_eq!(all(&a), vec![10]);
    }

    #[test]
    fn the_ephemeral_range_is_the_kernels_minus_its_reserved_ports() {
        assert_eq!(parse_pair("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_pair("0 10"), None);
        assert_eq!(
            parse_port_list("8080, 9000-9002\n"),
            BTreeSet::from([8080, 9000, 9001, 9002])
        );
        assert!(parse_port_list("\n").is_empty());
        let a = PortAllocator::new(PortRange::Ephemeral);
        let (lo, hi) = a.range;
        let first: Vec<u16> = a.candidates(&BTreeSet::new()).take(3).collect();
        assert!(first.iter().all(|p| (lo..=hi).contains(p)), "{first:?}");
        let reserved = a.reserved.range(lo..=hi).count();
        assert_eq!(
            a.candidates(&BTreeSet::new()).count(),
            usize::from(hi - lo) + 1 - reserved
        );
    }
}
