//! Pre-copy: when to stop pre-dumping and freeze.
//!
//! Stopping after round k means a final dump of what the workload dirtied
//! during round k. Round k itself sent what was dirtied during round k-1,
//! which gives the dirty rate (bytes_k / duration_{k-1}); so the final dump
//! is estimated at dirty rate × duration_k bytes, and its frozen time at
//! that divided by the page throughput.
//!
//! The page throughput is the rate at which more bytes cost more time:
//! the slope between round 1 (all memory) and round k. A round's own
//! bytes ÷ duration would not do: every round also pays CRIU's fixed cost
//! (freezing, parasite, page maps, the other images), which no further
//! round can shrink, and small rounds would look slow for it, so pre-copy
//! would go on to the iteration limit, each round lengthening the parent
//! chain the restore reads through. Round 1 has no estimate.
//!
//! Rounds go on until the estimate is within the downtime target, or a
//! round is not at least 1 - [`MIN_SHRINK`] smaller than the one before
//! (memory is dirtied as fast as it is copied, or huge pages make every
//! small write dirty 2 MiB), or the iteration limit is reached.

use serde::Serialize;

/// A round must send at most this fraction of the previous round's bytes
/// for pre-copy to be worth another round.
pub const MIN_SHRINK: f64 = 0.8;

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeRequest {
    Auto,
    Precopy,
    StopCopy,
    /// The copy runs on the destination before its memory arrived.
    Postcopy,
    /// Pre-copy rounds, then post-copy.
    Hybrid,
}

/// One finished round, as reported in events and the result.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub kind: &'static str,
    /// 4 KiB pages written to page images in this round.
    pub pages: u64,
    pub bytes: u64,
    pub duration_ms: u64,
    pub mb_per_s: f64,
    /// Estimated frozen time if pre-copy stopped after this round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_downtime_ms: Option<u64>,
}

impl RoundReport {
    /// `earlier` are the rounds before this one, in order.
    pub fn new(round: u32, kind: &'static str, bytes: u64, duration: std::time::Duration, earlier: &[RoundReport]) -> Self {
        let secs = duration.as_secs_f64().max(1e-3);
        let bytes_per_s = (bytes as f64 / secs).max(1.0);
        let estimated_downtime_ms = earlier.last().map(|prev| {
            let dirty_per_s = bytes as f64 / (prev.duration_ms.max(1) as f64 / 1000.0);
            let final_bytes = dirty_per_s * secs;
            (final_bytes / page_throughput(&earlier[0], bytes, secs, bytes_per_s) * 1000.0).round() as u64
        });
        Self {
            round,
            kind,
            pages: bytes / 4096,
            bytes,
            duration_ms: duration.as_millis() as u64,
            mb_per_s: (bytes_per_s / 1e6 * 10.0).round() / 10.0,
            estimated_downtime_ms,
        }
    }
}

/// Bytes per second that more pages cost: the slope from round 1 to a
/// later round of `bytes` in `secs`. Never below that round's own
/// `average` (a slope under it would mean a negative fixed cost: noise).
fn page_throughput(first: &RoundReport, bytes: u64, secs: f64, average: f64) -> f64 {
    let more_bytes = first.bytes as f64 - bytes as f64;
    let more_secs = first.duration_ms as f64 / 1000.0 - secs;
    if more_bytes <= 0.0 || more_secs <= 0.0 {
        return average;
    }
    (more_bytes / more_secs).max(average)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    DowntimeTarget,
    NotConverging,
    MaxIterations,
}

impl StopReason {
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::DowntimeTarget => "the estimated frozen time is within the downtime target",
            StopReason::NotConverging => "the last round did not shrink by 20% (memory is dirtied as fast as it is copied)",
            StopReason::MaxIterations => "the iteration limit was reached",
        }
    }
}

/// The stopping rule.
#[derive(Debug, Clone, Copy)]
pub struct Convergence {
    pub downtime_target_ms: u64,
    pub max_iterations: u32,
}

impl Convergence {
    /// Whether to stop after the last of `rounds` (pre-dump rounds so far).
    pub fn stop_after(&self, rounds: &[RoundReport]) -> Option<StopReason> {
        let last = rounds.last()?;
        if last.estimated_downtime_ms.is_some_and(|e| e <= self.downtime_target_ms) {
            return Some(StopReason::DowntimeTarget);
        }
        if let [.., prev, last] = rounds {
            if last.bytes as f64 > prev.bytes as f64 * MIN_SHRINK {
                return Some(StopReason::NotConverging);
            }
        }
        if rounds.len() as u32 >= self.max_iterations {
            return Some(StopReason::MaxIterations);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rounds(spec: &[(u64, u64)]) -> Vec<RoundReport> {
        let mut out: Vec<RoundReport> = Vec::new();
        for (i, (mib, ms)) in spec.iter().enumerate() {
            let r = RoundReport::new(i as u32 + 1, "pre-dump", mib << 20, Duration::from_millis(*ms), &out);
            out.push(r);
        }
        out
    }

    const RULE: Convergence = Convergence { downtime_target_ms: 300, max_iterations: 8 };

    #[test]
    fn first_round_has_no_estimate_and_goes_on() {
        let r = rounds(&[(256, 4000)]);
        assert_eq!(r[0].estimated_downtime_ms, None);
        assert_eq!(RULE.stop_after(&r), None);
    }

    #[test]
    fn stops_when_the_estimate_meets_the_target() {
        // 4 MiB dirtied during a 4 s round: 1 MiB/s. Round 2 took 400 ms,
        // so ~0.4 MiB is left; pages cost 252 MiB per 3.6 s (70 MiB/s):
        // ~6 ms frozen for them.
        let r = rounds(&[(256, 4000), (4, 400)]);
        let est = r[1].estimated_downtime_ms.unwrap();
        assert!((5..=7).contains(&est), "{est}");
        assert_eq!(RULE.stop_after(&r), Some(StopReason::DowntimeTarget));
    }

    #[test]
    fn a_fixed_cost_per_round_does_not_count_as_page_time() {
        // Rounds as measured in the emulated guest: each pays ~1.5-2 s of
        // CRIU's fixed cost whatever its size, pages move at ~7 MB/s.
        // Round 4 leaves ~1.5 MB dirty: ~0.2 s of pages. Taken as
        // bytes ÷ duration, it would read ~0.75 s and go on for nothing.
        let r = rounds(&[(256, 40215), (37, 7623), (7, 2939), (3, 1491)]);
        assert_eq!(RULE.stop_after(&r[..3]), None, "{:?}", r[2]);
        let est = r[3].estimated_downtime_ms.unwrap();
        assert!((150..=300).contains(&est), "{est}");
        assert_eq!(RULE.stop_after(&r), Some(StopReason::DowntimeTarget));
        // bytes ÷ duration would have said 1.491² / 2.939 s = 756 ms.
        assert!(est < 756 / 2, "{est}");
    }

    #[test]
    fn slope_under_the_average_falls_back_to_the_average() {
        // A later round slower per byte than round 1 (noise): no negative
        // fixed cost, the round's own rate is used.
        let r = rounds(&[(256, 1000), (128, 4000)]);
        // 128 MiB per 1 s dirtied, × 4 s = 512 MiB at 32 MiB/s: 16 s.
        assert_eq!(r[1].estimated_downtime_ms, Some(16000));
    }

    #[test]
    fn goes_on_while_the_estimate_is_over_the_target() {
        // 64 MiB dirtied in 4 s (16 MiB/s), round 2 took 2 s: 32 MiB
        // left; pages cost 192 MiB per 2 s (96 MiB/s): 333 ms frozen. And
        // round 2 shrank enough to go on.
        let r = rounds(&[(256, 4000), (64, 2000)]);
        assert_eq!(r[1].estimated_downtime_ms, Some(333));
        assert_eq!(RULE.stop_after(&r), None);
    }

    #[test]
    fn stops_when_rounds_do_not_shrink() {
        let r = rounds(&[(256, 4000), (240, 3800)]);
        assert_eq!(RULE.stop_after(&r), Some(StopReason::NotConverging));
    }

    #[test]
    fn stops_at_the_iteration_limit() {
        let rule = Convergence { downtime_target_ms: 1, max_iterations: 3 };
        let r = rounds(&[(256, 4000), (128, 2000), (64, 1000)]);
        assert_eq!(rule.stop_after(&r[..2]), None);
        assert_eq!(rule.stop_after(&r), Some(StopReason::MaxIterations));
    }
}
