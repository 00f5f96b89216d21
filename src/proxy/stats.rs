//! Data-path counters that the exposition layer reads: kept here, beside
//! the atomics they live with, so the data path never depends on
//! `metrics`, `admin` or `status` (they depend on it).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Connect-latency buckets (seconds): 0.1 ms to 2 s, the range of a dial
/// on a LAN up to the longest default retry timeout.
pub const CONNECT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
];

/// A fixed-bucket latency histogram of atomics, cheap on the data path.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; CONNECT_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = CONNECT_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Cumulative bucket counts (as Prometheus wants them), count, sum (s).
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Relaxed);
                acc
            })
            .collect();
        (
            cumulative,
            self.count.load(Relaxed),
            self.sum_micros.load(Relaxed) as f64 / 1e6,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(5));
        let (b, count, sum) = h.snapshot();
        assert_eq!(b[0], 1);
        assert_eq!(b[5], 2); // <= 5ms
        assert_eq!(*b.last().unwrap(), 2); // 5 s is only in +Inf
        assert_eq!(count, 3);
        assert!((sum - 5.00305).abs() < 1e-6);
    }
}
