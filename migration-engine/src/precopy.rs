//! Pre-copy: when to stop pre-dumping and freeze.
//!
//! Stopping after round k means a final dump of what the workload dirtied
//! during round k. Round k itself sent what was dirtied during round k-1,
//! which gives the dirty rate (bytes_k / duration_{k-1}); so the final dump
//! is estimated at dirty rate × duration_k bytes, and the frozen time at
//! that divided by the throughput round k achieved (CRIU's own time
//! included). Round 1 has no previous round and so no estimate.
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
    /// `previous` is the round before, if any.
    pub fn new(
        round: u32,
        kind: &'static str,
        bytes: u64,
        duration: std::time::Duration,
        previous: Option<&RoundReport>,
    ) -> Self {
        let secs = duration.as_secs_f64().max(1e-3);
        let bytes_per_s = (bytes as f64 / secs).max(1.0);
        let estimated_downtime_ms = previous.map(|prev| {
            let dirty_per_s = bytes as f64 / (prev.duration_ms.max(1) as f64 / 1000.0);
            let final_bytes = dirty_per_s * secs;
            (final_bytes / bytes_per_s * 1000.0).round() as u64
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
            let r = RoundReport::new(i as u32 + 1, "pre-dump", mib << 20, Duration::from_millis(*ms), out.last());
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
        // 4 MiB dirtied during a 4 s round: 1 MiB/s. Round 2 took 400 ms at
        // 10 MiB/s, so stopping now leaves ~0.4 MiB: ~40 ms frozen.
        let r = rounds(&[(256, 4000), (4, 400)]);
        let est = r[1].estimated_downtime_ms.unwrap();
        assert!((35..=45).contains(&est), "{est}");
        assert_eq!(RULE.stop_after(&r), Some(StopReason::DowntimeTarget));
    }

    #[test]
    fn goes_on_while_the_estimate_is_over_the_target() {
        // 64 MiB dirtied in 4 s (16 MiB/s), round 2 took 2 s at 32 MiB/s:
        // 32 MiB left, 1 s frozen. And round 2 shrank enough to go on.
        let r = rounds(&[(256, 4000), (64, 2000)]);
        assert_eq!(r[1].estimated_downtime_ms, Some(1000));
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
