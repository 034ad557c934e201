//! Per-port call metrics: fixed, lock-free storage, and its Prometheus text rendering.
//!
//! Why not a recorder's histograms: the Prometheus exporter keeps every latency sample until its
//! next upkeep, which costs an allocation-prone push per call and memory proportional to the call
//! rate. Here a latency lands in one of a fixed set of buckets, so memory per port is constant
//! whatever the rate. Latency is sampled (one call in `run::LATENCY_SAMPLE` per thread is timed):
//! a finished call costs one atomic add (the call count), a timed one two more (its bucket and
//! the latency sum), an error one more. Calls in flight are read from the host's own counter at
//! render time, so they cost nothing per call.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::ErrorCode;

/// Bucket upper bounds, in nanoseconds: from 250 ns (in-process calls) to 30 s.
const BOUNDS_NANOS: [u64; 16] = [
    250,
    1_000,
    5_000,
    25_000,
    100_000,
    250_000,
    1_000_000,
    2_500_000,
    10_000_000,
    25_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
    30_000_000_000,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub(super) struct FixedHistogram {
    /// Non-cumulative counts; the last slot is `+Inf`.
    buckets: [AtomicU64; BOUNDS_NANOS.len() + 1],
    sum_nanos: AtomicU64,
}

impl FixedHistogram {
    fn observe(&self, nanos: u64) {
        let i = BOUNDS_NANOS.iter().position(|b| nanos <= *b).unwrap_or(BOUNDS_NANOS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// The metrics of one port.
#[derive(Debug, Default)]
pub(super) struct PortStats {
    calls: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
    /// Sampled latencies.
    latency: FixedHistogram,
}

impl PortStats {
    /// Records a finished call, and its latency if it was timed.
    pub(super) fn record(&self, elapsed_nanos: Option<u64>, error: Option<ErrorCode>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(nanos) = elapsed_nanos {
            self.latency.observe(nanos);
        }
        if let Some(code) = error {
            let i = ErrorCode::ALL.iter().position(|c| *c == code).unwrap_or(0);
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One port's figures, labelled, for rendering.
pub(super) struct PortSample<'a> {
    pub(super) gear: &'a str,
    pub(super) port: &'a str,
    pub(super) stats: &'a PortStats,
    pub(super) in_flight: usize,
}

/// Renders the per-port families in the Prometheus text format.
pub(super) fn render(out: &mut String, ports: &[PortSample<'_>]) {
    // Writing into a String cannot fail, so the fmt::Results below are ignored on purpose.
    let _ = writeln!(out, "# HELP gearmesh_calls_total Calls to a port that finished, however.");
    let _ = writeln!(out, "# TYPE gearmesh_calls_total counter");
    for p in ports {
        let _ = writeln!(
            out,
            "gearmesh_calls_total{{gear=\"{}\",port=\"{}\"}} {}",
            p.gear,
            p.port,
            p.stats.calls.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP gearmesh_call_errors_total Failed calls to a port, by error code.");
    let _ = writeln!(out, "# TYPE gearmesh_call_errors_total counter");
    for p in ports {
        for (code, n) in ErrorCode::ALL.iter().zip(&p.stats.errors) {
            let _ = writeln!(
                out,
                "gearmesh_call_errors_total{{gear=\"{}\",port=\"{}\",code=\"{code}\"}} {}",
                p.gear,
                p.port,
                n.load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP gearmesh_call_duration_seconds Latency of calls to a port, sampled (one call in {} per thread).",
        super::run::LATENCY_SAMPLE
    );
    let _ = writeln!(out, "# TYPE gearmesh_call_duration_seconds histogram");
    for p in ports {
        let mut cumulative = 0u64;
        for (i, b) in p.stats.latency.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = BOUNDS_NANOS.get(i).map_or_else(|| "+Inf".to_owned(), |n| format!("{}", *n as f64 / 1e9));
            let _ = writeln!(
                out,
                "gearmesh_call_duration_seconds_bucket{{gear=\"{}\",port=\"{}\",le=\"{le}\"}} {cumulative}",
                p.gear, p.port
            );
        }
        let sum = p.stats.latency.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "gearmesh_call_duration_seconds_sum{{gear=\"{}\",port=\"{}\"}} {sum}", p.gear, p.port);
        let _ = writeln!(
            out,
            "gearmesh_call_duration_seconds_count{{gear=\"{}\",port=\"{}\"}} {cumulative}",
            p.gear, p.port
        );
    }
    let _ = writeln!(out, "# HELP gearmesh_calls_in_flight Calls running on a port now.");
    let _ = writeln!(out, "# TYPE gearmesh_calls_in_flight gauge");
    for p in ports {
        let _ = writeln!(out, "gearmesh_calls_in_flight{{gear=\"{}\",port=\"{}\"}} {}", p.gear, p.port, p.in_flight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_their_bucket_and_render_cumulatively() {
        let s = PortStats::default();
        s.record(Some(200), None);
        s.record(Some(3_000), Some(ErrorCode::Timeout));
        s.record(Some(100_000_000_000), None);
        s.record(None, None);
        let mut out = String::new();
        render(&mut out, &[PortSample { gear: "g", port: "p", stats: &s, in_flight: 2 }]);
        assert!(out.contains("gearmesh_calls_total{gear=\"g\",port=\"p\"} 4"), "{out}");
        assert!(out.contains("gearmesh_call_errors_total{gear=\"g\",port=\"p\",code=\"timeout\"} 1"));
        assert!(out.contains("gearmesh_call_errors_total{gear=\"g\",port=\"p\",code=\"internal\"} 0"));
        assert!(out.contains("le=\"0.00000025\"} 1"), "{out}");
        assert!(out.contains("le=\"0.000005\"} 2"), "{out}");
        assert!(out.contains("le=\"30\"} 2"), "{out}");
        assert!(out.contains("le=\"+Inf\"} 3"), "{out}");
        assert!(out.contains("gearmesh_call_duration_seconds_count{gear=\"g\",port=\"p\"} 3"));
        assert!(out.contains("gearmesh_calls_in_flight{gear=\"g\",port=\"p\"} 2"));
    }
}
