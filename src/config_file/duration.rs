//! Go's `time.ParseDuration`, as `metav1.Duration` fields are written
//! (`30s`, `1m0s`, `1h0m0s`, `500ms`, `0s`): the same grammar, units,
//! overflow checks and fraction arithmetic as Go's `time/format.go`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A Go duration: signed nanoseconds, as `time.Duration`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoDuration(pub i64);

impl GoDuration {
    /// The duration, or `None` when negative.
    pub fn to_std(self) -> Option<Duration> {
        u64::try_from(self.0).ok().map(Duration::from_nanos)
    }
}

impl fmt::Display for GoDuration {
    /// Whole seconds and below as Go would parse them back (`90s`, `1.5s`,
    /// `250ms`): for messages, not Go's `String()` (`1m30s`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_std() {
            Some(d) => write!(f, "{d:?}"),
            None => write!(f, "-{:?}", Duration::from_nanos(self.0.unsigned_abs())),
        }
    }
}

/// Nanoseconds per unit, Go's `unitMap`.
const UNITS: [(&str, u64); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),  // µ, the micro sign
    ("\u{3bc}s", 1_000), // μ, the Greek letter mu
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

const LIMIT: u64 = 1 << 63;

/// Parses a Go duration: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or `0`. The
/// error reads as Go's without its `time: ` prefix (`invalid duration "abc"`).
pub fn parse(orig: &str) -> Result<GoDuration, String> {
    let invalid = || format!("invalid duration {orig:?}");
    let mut s = orig.as_bytes();
    let mut neg = false;
    if let Some((&c, rest)) = s.split_first() {
        if c == b'-' || c == b'+' {
            neg = c == b'-';
            s = rest;
        }
    }
    if s == b"0" {
        return Ok(GoDuration(0));
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut d: u64 = 0;
    while !s.is_empty() {
        if !(s[0] == b'.' || s[0].is_ascii_digit()) {
            return Err(invalid());
        }
        let before = s.len();
        let (v, rest) = leading_int(s).ok_or_else(invalid)?;
        s = rest;
        let pre = before != s.len();
        let (mut f, mut scale, mut post) = (0u64, 1f64, false);
        if let Some(rest) = s.strip_prefix(b".") {
            let before = rest.len();
            let (x, sc, rest) = leading_fraction(rest);
            (f, scale, s) = (x, sc, rest);
            post = before != s.len();
        }
        if !pre && !post {
            return Err(invalid());
        }
        let i = s
            .iter()
            .position(|&c| c == b'.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if i == 0 {
            return Err(format!("missing unit in duration {orig:?}"));
        }
        let (u, rest) = s.split_at(i);
        s = rest;
        let Some(&(_, unit)) = UNITS.iter().find(|(name, _)| name.as_bytes() == u) else {
            return Err(format!(
                "unknown unit {:?} in duration {orig:?}",
                String::from_utf8_lossy(u)
            ));
        };
        if v > LIMIT / unit {
            return Err(invalid());
        }
        let mut v = v * unit;
        if f > 0 {
            // As Go: float64, nanosecond-accurate for fractions of hours.
            v += (f as f64 * (unit as f64 / scale)) as u64;
            if v > LIMIT {
                return Err(invalid());
            }
        }
        d += v;
        if d > LIMIT {
            return Err(invalid());
        }
    }
    if neg {
        // d <= 1<<63: its negation fits (i64::MIN at the edge).
        return Ok(GoDuration((d as i64).wrapping_neg()));
    }
    i64::try_from(d).map(GoDuration).map_err(|_| invalid())
}

/// Go's `leadingInt`: the leading `[0-9]*`, `None` past 1<<63.
fn leading_int(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut x: u64 = 0;
    for &c in &s[..n] {
        if x > LIMIT / 10 {
            return None;
        }
        x = x * 10 + u64::from(c - b'0');
        if x > LIMIT {
            return None;
        }
    }
    Some((x, &s[n..]))
}

/// Go's `leadingFraction`: digits past what fits are consumed and dropped.
fn leading_fraction(s: &[u8]) -> (u64, f64, &[u8]) {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    let (mut x, mut scale, mut overflow) = (0u64, 1f64, false);
    for &c in &s[..n] {
        if overflow {
            continue;
        }
        if x > (LIMIT - 1) / 10 {
            overflow = true;
            continue;
        }
        let y = x * 10 + u64::from(c - b'0');
        if y > LIMIT {
            overflow = true;
            continue;
        }
        x = y;
        scale *= 10.0;
    }
    (x, scale, &s[n..])
}

impl<'de> Deserialize<'de> for GoDuration {
    /// A string only, as `metav1.Duration`: a number is a type error.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a Go duration string such as \"30s\" or \"1m0s\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<GoDuration, E> {
                parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: i64 = 1;
    const US: i64 = 1_000;
    const MS: i64 = 1_000_000;
    const S: i64 = 1_000_000_000;
    const M: i64 = 60 * S;
    const H: i64 = 60 * M;

    /// Go's `parseDurationTests` (time_test.go), every row.
    #[test]
    fn go_forms_parse_as_go_parses_them() {
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("5s", 5 * S),
            ("30s", 30 * S),
            ("1478s", 1478 * S),
            ("-5s", -5 * S),
            ("+5s", 5 * S),
            ("-0", 0),
            ("+0", 0),
            ("5.0s", 5 * S),
            ("5.6s", 5 * S + 600 * MS),
            ("5.s", 5 * S),
            (".5s", 500 * MS),
            ("1.0s", S),
            ("1.00s", S),
            ("1.004s", S + 4 * MS),
            ("1.0040s", S + 4 * MS),
            ("100.00100s", 100 * S + MS),
            ("10ns", 10 * NS),
            ("11us", 11 * US),
            ("12\u{b5}s", 12 * US),
            ("12\u{3bc}s", 12 * US),
            ("13ms", 13 * MS),
            ("14s", 14 * S),
            ("15m", 15 * M),
            ("16h", 16 * H),
            ("3h30m", 3 * H + 30 * M),
            ("10.5s4m", 4 * M + 10 * S + 500 * MS),
            ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
            (
                "1h2m3s4ms5us6ns",
                H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS,
            ),
            ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
            ("52763797000ns", 52_763_797_000),
            ("0.3333333333333333333h", 20 * M),
            ("9007199254740993ns", (1 << 53) + 1),
            ("9223372036854775807ns", i64::MAX),
            ("9223372036854775.807us", i64::MAX),
            ("9223372036s854ms775us807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
            ("-9223372036854775.808us", i64::MIN),
            ("-9223372036s854ms775us808ns", i64::MIN),
            ("-2562047h47m16.854775808s", i64::MIN),
            ("0.100000000000000000000h", 6 * M),
            ("0.830103483285477580700h", 49 * M + 48 * S + 372_539_827),
            // As Go's String() writes them, and so kubeadm renders them.
            ("1m0s", M),
            ("1h0m0s", H),
            ("15m0s", 15 * M),
            ("24h0m0s", 24 * H),
            ("0s", 0),
            ("250ms", 250 * MS),
        ];
        for &(input, want) in cases {
            assert_eq!(parse(input), Ok(GoDuration(want)), "{input:?}");
        }
    }

    /// Go's `parseDurationErrorTests`, with Go's wording.
    #[test]
    fn go_errors_are_errors() {
        let cases: &[(&str, &str)] = &[
            ("", r#"invalid duration """#),
            ("3", r#"missing unit in duration "3""#),
            ("-", r#"invalid duration "-""#),
            ("s", r#"invalid duration "s""#),
            (".", r#"invalid duration ".""#),
            ("-.", r#"invalid duration "-.""#),
            (".s", r#"invalid duration ".s""#),
            ("+.s", r#"invalid duration "+.s""#),
            ("1d", r#"unknown unit "d" in duration "1d""#),
            ("abc", r#"invalid duration "abc""#),
            ("30 s", r#"unknown unit " s" in duration "30 s""#),
            ("1S", r#"unknown unit "S" in duration "1S""#),
            ("\u{fffd}", "invalid duration"),
            ("9223372036854775810ns", "invalid duration"),
            ("9223372036854775808ns", "invalid duration"),
            ("-9223372036854775809ns", "invalid duration"),
            ("9223372036854776us", "invalid duration"),
            ("3000000h", "invalid duration"),
            ("9223372036854775.808us", "invalid duration"),
            ("9223372036854ms775us808ns", "invalid duration"),
        ];
        for &(input, want) in cases {
            let err = parse(input).expect_err(input);
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }

    #[test]
    fn only_strings_deserialize() {
        let d: GoDuration = serde_json::from_value(serde_json::json!("1m0s")).unwrap();
        assert_eq!(d.to_std(), Some(Duration::from_secs(60)));
        let err = serde_json::from_value::<GoDuration>(serde_json::json!(30)).unwrap_err();
        assert!(err.to_string().contains("Go duration string"), "{err}");
        assert_eq!(GoDuration(-S).to_std(), None);
        assert_eq!(GoDuration(-1500 * MS).to_string(), "-1.5s");
    }
}
