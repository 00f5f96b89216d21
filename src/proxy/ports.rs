//! Listener ports for service ports that have no nodePort
//! (`--proxy-port-range`).
//!
//! The default, as upstream with an empty range, is a kernel-chosen
//! ephemeral port: it never collides with another listener and, on Linux,
//! the ephemeral range (32768-60999) lies above the NodePort range
//! (30000-32767), so a later NodePort Service cannot find its port taken.
//! With a range, ports are handed out sequentially from where the last one
//! was taken, wrapping, skipping ports we hold and ports that fail to bind.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

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

/// Hands out ports from a [`PortRange`]; knows which ones we hold.
#[derive(Debug)]
pub struct PortAllocator {
    range: PortRange,
    held: BTreeSet<u16>,
    next: u16,
}

impl PortAllocator {
    /// An allocator with nothing held.
    pub fn new(range: PortRange) -> Self {
        let next = match range {
            PortRange::Ephemeral => 0,
            PortRange::Range(a, _) => a,
        };
        Self {
            range,
            held: BTreeSet::new(),
            next,
        }
    }

    /// Ports to try, in order, skipping held ones and `avoid` (e.g. node ports
    /// of other services). `[0]` for the ephemeral range. Call [`Self::hold`]
    /// with the one that bound.
    pub fn candidates(&self, avoid: &BTreeSet<u16>) -> Vec<u16> {
        match self.range {
            PortRange::Ephemeral => vec![0],
            PortRange::Range(a, b) => (self.next..=b)
                .chain(a..self.next)
                .filter(|p| !self.held.contains(p) && !avoid.contains(p))
                .collect(),
        }
    }

    /// Marks a port as ours (the next allocation starts after it).
    pub fn hold(&mut self, port: u16) {
        if let PortRange::Range(a, b) = self.range {
            self.held.insert(port);
            self.next = if port >= b { a } else { port + 1 };
        }
    }

    /// Gives a port back when its listener closes.
    pub fn release(&mut self, port: u16) {
        self.held.remove(&port);
    }
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
        assert_eq!(a.candidates(&avoid), vec![10, 12, 13]);
        a.hold(10);
        a.hold(12);
        assert_eq!(a.candidates(&avoid), vec![13]);
        a.hold(13);
        assert!(a.candidates(&avoid).is_empty());
        a.release(10);
        assert_eq!(a.candidates(&avoid), vec![10]);
    }
}
