//! Pods on the source: containers that share a network namespace move as
//! one unit, each in a migration of its own (one connection, one journal
//! entry, one freeze guard), held in step by a [`PodBarrier`]:
//!
//! ```text
//!   member:  preflight ─ rootfs sync ─┬─ freeze ─ dump ─ Ready ─┬─ commit-sent ─┬─ Commit ─ CommitAck ─ removal
//!                                     │ (the leader locks the   │   journalled   │
//!   barrier:                  BeforeFreeze  namespace first)   Ready      CommitJournalled
//! ```
//!
//! * **BeforeFreeze**: every member has synced its rootfs; the leader (the
//!   member whose manifest carries the namespace's record) has locked the
//!   namespace. Then each freezes: the pod is frozen together.
//! * **Ready**: every member's copy is restored, stopped, on the
//!   destination. A member that failed before makes every other fail
//!   too: each tells its receiver to abort and thaws.
//! * **CommitJournalled**: every member has journalled `commit-sent`
//!   before any Commit goes out, so a sender killed between two Commits
//!   leaves every member's guard asking the destination, never thawing
//!   one whose sibling committed. The destination commits the whole pod
//!   at the first Commit it gets (and aborts it at the first failure
//!   before that): see `destination::pods`.
//!
//! A member failing after the Commits went out is settled by the
//! destination's word, as for any migration.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use migration_protocol::PodWire;

use crate::MigrationError;

/// The points where a pod's members wait for each other, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    BeforeFreeze,
    /// Every member frozen, before any dumps: their dumps then agree on
    /// what they share (a shared IPC namespace's objects, which each
    /// member's dump holds a copy of).
    Frozen,
    Ready,
    CommitJournalled,
}

/// One member's place in a pod (see [`crate::SendOptions::pod`]).
#[derive(Debug, Clone)]
pub struct PodMember {
    pub barrier: std::sync::Arc<PodBarrier>,
    /// What the destination is told of the pod.
    pub wire: PodWire,
    /// This member's manifest carries the namespace: it records, locks
    /// and (once the pod moved) removes it on this host.
    pub leader: bool,
}

/// Holds a pod's members in step; the first member to fail releases
/// every other with its reason.
#[derive(Debug)]
pub struct PodBarrier {
    members: usize,
    state: Mutex<BarrierState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct BarrierState {
    arrived: BTreeMap<Stage, usize>,
    failed: Option<String>,
    /// The destination accepted the leader's manifest (and built the
    /// namespace the others are restored into): they may connect.
    leader_admitted: bool,
}

impl PodBarrier {
    pub fn new(members: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { members, state: Mutex::new(BarrierState::default()), changed: Condvar::new() })
    }

    /// Waits until every member reached `stage`, calling `still_there`
    /// every second meanwhile (false from it ends the wait). Err when a
    /// member failed (before or while waiting), or after `timeout`; the
    /// caller then fails its own migration, as for a failure of its own.
    pub fn wait(&self, stage: Stage, who: &str, timeout: Duration, still_there: &mut dyn FnMut() -> bool) -> Result<(), MigrationError> {
        {
            let mut state = self.state.lock().unwrap();
            *state.arrived.entry(stage).or_default() += 1;
            self.changed.notify_all();
        }
        let members = self.members;
        let reached = |s: &BarrierState| s.arrived.get(&stage).copied().unwrap_or(0) >= members;
        self.wait_until(&reached, &format!("`{who}` waited {} s for the rest of the pod to reach {stage:?}", timeout.as_secs()), timeout, &mut || {
            still_there().then_some(()).ok_or_else(|| format!("`{who}` lost its receiver while waiting for the rest of the pod"))
        })
    }

    /// The leader's manifest was accepted: the other members connect.
    pub fn leader_admitted(&self) {
        self.state.lock().unwrap().leader_admitted = true;
        self.changed.notify_all();
    }

    /// A member other than the leader waits for its admission before it
    /// connects (the destination admits a member only after its leader).
    pub fn wait_for_leader(&self, who: &str, timeout: Duration) -> Result<(), MigrationError> {
        let admitted = |s: &BarrierState| s.leader_admitted;
        self.wait_until(&admitted, &format!("`{who}` waited {} s for the pod's leader to be accepted", timeout.as_secs()), timeout, &mut || Ok(()))
    }

    /// Waits for `reached`, a member's failure (Err) or `timeout` (Err
    /// `timed_out`, which fails the pod); `between` runs each second
    /// without the lock, and its Err ends the wait.
    fn wait_until(
        &self,
        reached: &dyn Fn(&BarrierState) -> bool,
        timed_out: &str,
        timeout: Duration,
        between: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<(), MigrationError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(why) = &state.failed {
                return Err(MigrationError::Aborted(format!("another container of the pod failed ({why}); the pod moves whole or not at all")));
            }
            if reached(&state) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.failed.get_or_insert(timed_out.to_string());
                self.changed.notify_all();
                return Err(MigrationError::Aborted(timed_out.to_string()));
            }
            state = self.changed.wait_timeout(state, left.min(Duration::from_secs(1))).unwrap().0;
            if state.failed.is_none() && !reached(&state) {
                drop(state);
                between().map_err(MigrationError::Aborted)?;
                state = self.state.lock().unwrap();
            }
        }
    }

    /// A member failed: every member waiting, or about to, fails too.
    pub fn fail(&self, who: &str, why: &str) {
        let mut state = self.state.lock().unwrap();
        state.failed.get_or_insert_with(|| format!("`{who}`: {why}"));
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_pass_a_stage_together() {
        let barrier = PodBarrier::new(3);
        let started = Instant::now();
        let waiters: Vec<_> = (0..3)
            .map(|i| {
                let b = barrier.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(50 * i));
                    b.wait(Stage::Ready, &format!("m{i}"), Duration::from_secs(5), &mut || true).map(|()| started.elapsed())
                })
            })
            .collect();
        for w in waiters {
            // Nobody passed before the last arrived (100 ms).
            assert!(w.join().unwrap().unwrap() >= Duration::from_millis(95));
        }
    }

    #[test]
    fn members_connect_once_the_leader_is_admitted_or_not_at_all() {
        let barrier = PodBarrier::new(2);
        let b = barrier.clone();
        let member = std::thread::spawn(move || b.wait_for_leader("app", Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!member.is_finished());
        barrier.leader_admitted();
        member.join().unwrap().unwrap();
        let refused = PodBarrier::new(2);
        refused.fail("pause", "the receiver refused it");
        assert!(refused.wait_for_leader("app", Duration::from_secs(5)).unwrap_err().to_string().contains("refused"));
    }

    #[test]
    fn a_failed_member_releases_the_others_with_its_reason() {
        let barrier = PodBarrier::new(2);
        let b = barrier.clone();
        let waiting = std::thread::spawn(move || b.wait(Stage::Ready, "app", Duration::from_secs(5), &mut || true));
        std::thread::sleep(Duration::from_millis(30));
        barrier.fail("pause", "restore failed");
        let e = waiting.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("`pause`: restore failed"), "{e}");
        // A member arriving later fails at once too.
        assert!(barrier.wait(Stage::CommitJournalled, "late", Duration::from_secs(5), &mut || true).is_err());
    }

    #[test]
    fn a_member_that_never_comes_fails_the_pod_after_the_timeout() {
        let barrier = PodBarrier::new(2);
        let e = barrier.wait(Stage::BeforeFreeze, "app", Duration::from_millis(50), &mut || true).unwrap_err().to_string();
        assert!(e.contains("waited"), "{e}");
        assert!(barrier.wait(Stage::BeforeFreeze, "pause", Duration::from_secs(5), &mut || true).is_err());
    }

    #[test]
    fn a_waiting_member_keeps_its_receiver_informed_and_stops_when_it_is_gone() {
        let barrier = PodBarrier::new(2);
        let mut calls = 0;
        let e = barrier
            .wait(Stage::Ready, "app", Duration::from_secs(10), &mut || {
                calls += 1;
                calls < 2
            })
            .unwrap_err()
            .to_string();
        assert_eq!(calls, 2);
        assert!(e.contains("lost its receiver"), "{e}");
    }
}
