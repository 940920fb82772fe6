//! Both sides of a migration as state machines that do no I/O.
//!
//! The engine drives a machine with what happened ([`SourceEvent`],
//! [`DestinationEvent`]) and asks it what to do: how long the peer may stay
//! silent in the current state ([`SourceMachine::wait_limit`]), what a
//! failure in that state must do to the container
//! ([`SourceMachine::on_failure`]), and, once the migration ends, its fate
//! ([`SourceFate`]), which decides the exit code and the `source_state`
//! reported. No call site picks an outcome of its own.
//!
//! # The source (sender)
//!
//! ```text
//!  Connecting ─HelloAck─▶ Negotiated ─ManifestAccepted─▶ Syncing ─RoundDone(1)─▶ PreCopy{1} ─RoundDone(k+1)─▶ PreCopy{k+1}
//!                                                          │                        │
//!                                                          └────────Froze───────────┴──▶ Frozen ─ImagesSent─▶ AwaitingReady
//!                                                                                                                 │ Ready
//!                                                                                                                 ▼
//!  Migrated ◀─SourceRemoved─ Committed ◀─Running─ CommitSent ◀─CommitSent─ DestinationReady
//!                              ▲                  │ AckLost
//!                              │                  ▼
//!                              └─PeerSays(committed)─ InDoubt ─GaveUp─▶ LeftInDoubt (source frozen, exit 6)
//!                                                     │ PeerSays(aborted)
//!                                                     ▼
//!  failure before Frozen ─▶ Untouched (exit 3)       Thawing ─Thawed─▶ Resumed (exit 4)
//!  failure from Frozen to DestinationReady ─▶ Thawing ─ThawFailed─▶ NotResumed (exit 5)
//! ```
//!
//! The source is frozen from `Frozen` on. Up to `DestinationReady` a
//! failure thaws it: the destination has not been told to run its copy.
//! From `CommitSent` on it may have been, so the source stays frozen until
//! the destination says which it did (`InDoubt`): it is never thawed while
//! the destination might run, and never removed unless the destination
//! said it runs.
//!
//! # The destination (receiver)
//!
//! ```text
//!  AwaitingHello ─Hello─▶ AwaitingManifest ─Admitted─▶ Receiving ─StateVerified─▶ Restoring ─RestoredStopped─▶ ReadyStopped
//!        │                      │                        │                          │                             │   │
//!        └──failure─────────────┴─▶ Refused (nothing     └──failure─────────────────┴──▶ Aborted ◀──Timeout/PeerGone/Abort
//!                                     stored)                  (staging and any restored copy removed)                │
//!                                                                                                         CommitReceived
//!                                                                                                                     ▼
//!                                                          Running ◀─Resumed─ Committed (its tasks are let run; never removed)
//! ```
//!
//! The restored copy's tasks are stopped until `CommitReceived`. Before it
//! the destination may abort on its own (presumed abort): the source keeps
//! its frozen copy until the destination says whether it committed, so an
//! abort here never leaves zero copies, and a commit never two.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A transition the protocol does not allow: a bug in the engine, or a
/// peer that broke the sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} is not expected in state {state}")]
pub struct TransitionError {
    pub state: String,
    pub event: String,
}

fn illegal(state: impl fmt::Debug, event: impl fmt::Debug) -> TransitionError {
    TransitionError { state: format!("{state:?}"), event: format!("{event:?}") }
}

/// What the destination says became of a migration, asked by a source
/// that lost the connection after its Commit ([`crate::Query`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerDecision {
    /// The destination committed: its copy runs (or will, once its
    /// receiver restarts). The source must go.
    Committed,
    /// The destination removed its copy (or never made one). The source
    /// may run again.
    Aborted,
    /// The destination still holds its stopped copy and waits for the
    /// Commit on the original connection: ask again.
    Pending,
    /// The destination cannot tell (no record, but a container of that
    /// id exists there): an operator decides.
    Unknown,
}

// ---------------------------------------------------------------- source

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceState {
    /// Connecting, TLS handshake, Hello sent.
    Connecting,
    /// Version agreed; the manifest is out.
    Negotiated,
    /// The destination accepted the manifest: the rootfs goes while the
    /// container runs.
    Syncing,
    /// Pre-dump round `round` acknowledged; the container still runs.
    PreCopy { round: u32 },
    /// The cgroup is frozen: frozen rootfs pass, dump, images.
    Frozen,
    /// Every image is sent; the destination restores.
    AwaitingReady,
    /// The destination restored its copy with its tasks stopped.
    DestinationReady,
    /// Post-copy: the destination runs its copy on a lease while its
    /// memory arrives; the source stays frozen with its memory whole. A
    /// failure thaws the source only once the lease has run out (the
    /// destination kills its copy by then) or the destination said it
    /// removed its copy.
    PostcopyRunning,
    /// Commit is (being) sent: from here the destination may run.
    CommitSent,
    /// No answer to Commit: asking the destination what it did.
    InDoubt,
    /// The destination runs the container; the source is being removed.
    Committed,
    /// Thawing the source after a failure.
    Thawing,
    /// Done: the destination runs it, the source is gone.
    Migrated,
    /// Failed before the freeze: the source was never touched.
    Untouched,
    /// Failed after the freeze: the source was thawed and runs.
    Resumed,
    /// Failed after the freeze, and the source could not be thawed.
    NotResumed,
    /// The destination could not be asked in time: the source stays
    /// frozen until an operator or `ctmigrate resolve` settles it.
    LeftInDoubt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEvent {
    HelloAck,
    ManifestAccepted,
    /// Pre-dump round `k` was acknowledged by the destination.
    RoundDone(u32),
    Froze,
    ImagesSent,
    /// The destination restored its copy, tasks stopped.
    Ready,
    /// Post-copy: the destination was told it may run its copy.
    PostcopyStarted,
    /// Commit is about to be written (the decision is journalled first).
    CommitSent,
    /// The destination's CommitAck: its copy runs.
    Running,
    /// No CommitAck (timeout, connection lost).
    AckLost,
    /// The destination's answer to a query.
    PeerSays(PeerDecision),
    /// The bounded time for asking the destination is over.
    GaveUp,
    /// The step under way failed (before any commit).
    Failed,
    Thawed,
    ThawFailed,
    SourceRemoved,
}

/// What a failure in the current state must do to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRecovery {
    /// Never frozen: nothing to undo.
    NothingToUndo,
    /// Frozen, and the destination was never told to run: thaw.
    Thaw,
    /// Frozen while the destination's copy runs on a lease: thaw once
    /// the destination removed its copy or the lease ran out.
    ThawAfterLease,
    /// Commit may have reached the destination: keep the source frozen
    /// and ask the destination.
    AskPeer,
    /// The destination runs it: finish removing the source.
    FinishRemoval,
    /// Already ended.
    None,
}

/// How a migration ended for the source; decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFate {
    Migrated,
    Untouched,
    Resumed,
    NotResumed,
    InDoubt,
}

impl SourceFate {
    /// The documented exit codes (README, "Exit codes").
    pub fn exit_code(self) -> i32 {
        match self {
            SourceFate::Migrated => 0,
            SourceFate::Untouched => 3,
            SourceFate::Resumed => 4,
            SourceFate::NotResumed => 5,
            SourceFate::InDoubt => 6,
        }
    }

    /// `source_state` in the result event.
    pub fn source_state(self) -> &'static str {
        match self {
            SourceFate::Migrated => "migrated",
            SourceFate::Untouched => "untouched",
            SourceFate::Resumed => "running",
            SourceFate::NotResumed => "not-resumed",
            SourceFate::InDoubt => "in-doubt",
        }
    }
}

/// The source's timeouts, from its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceTimeouts {
    /// Longest silence from the destination in ordinary steps (`--timeout`).
    pub io: Duration,
    /// Longest wait for the destination's restore (`--restore-timeout`).
    pub restore: Duration,
    /// How long to keep asking the destination when in doubt
    /// (`--in-doubt-timeout`).
    pub in_doubt: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMachine {
    state: SourceState,
}

impl Default for SourceMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl SourceMachine {
    pub fn new() -> Self {
        Self { state: SourceState::Connecting }
    }

    /// A machine resumed in `state` (from a journal).
    pub fn at(state: SourceState) -> Self {
        Self { state }
    }

    pub fn state(&self) -> SourceState {
        self.state
    }

    /// Whether the source's cgroup is frozen by this migration.
    pub fn source_frozen(&self) -> bool {
        use SourceState::*;
        matches!(self.state, Frozen | AwaitingReady | DestinationReady | PostcopyRunning | CommitSent | InDoubt | Committed | Thawing | LeftInDoubt)
    }

    pub fn on(&mut self, event: SourceEvent) -> Result<SourceState, TransitionError> {
        use SourceEvent as E;
        use SourceState as S;
        let next = match (self.state, event) {
            (S::Connecting, E::HelloAck) => S::Negotiated,
            (S::Negotiated, E::ManifestAccepted) => S::Syncing,
            (S::Syncing, E::RoundDone(1)) => S::PreCopy { round: 1 },
            (S::PreCopy { round }, E::RoundDone(k)) if k == round + 1 => S::PreCopy { round: k },
            (S::Syncing | S::PreCopy { .. }, E::Froze) => S::Frozen,
            (S::Frozen, E::ImagesSent) => S::AwaitingReady,
            (S::AwaitingReady, E::Ready) => S::DestinationReady,
            (S::DestinationReady, E::CommitSent) => S::CommitSent,
            (S::DestinationReady, E::PostcopyStarted) => S::PostcopyRunning,
            (S::PostcopyRunning, E::CommitSent) => S::CommitSent,
            (S::CommitSent | S::InDoubt, E::Running | E::PeerSays(PeerDecision::Committed)) => S::Committed,
            (S::CommitSent, E::AckLost) => S::InDoubt,
            (S::InDoubt, E::PeerSays(PeerDecision::Aborted)) => S::Thawing,
            (S::InDoubt, E::PeerSays(PeerDecision::Pending | PeerDecision::Unknown)) => S::InDoubt,
            (S::InDoubt, E::GaveUp) => S::LeftInDoubt,
            (S::Committed, E::SourceRemoved) => S::Migrated,
            (S::Connecting | S::Negotiated | S::Syncing | S::PreCopy { .. }, E::Failed) => S::Untouched,
            (S::Frozen | S::AwaitingReady | S::DestinationReady | S::PostcopyRunning, E::Failed) => S::Thawing,
            (S::Thawing, E::Thawed) => S::Resumed,
            (S::Thawing, E::ThawFailed) => S::NotResumed,
            (state, event) => return Err(illegal(state, event)),
        };
        self.state = next;
        Ok(next)
    }

    /// What a failure of the step under way must do to the source.
    pub fn on_failure(&self) -> SourceRecovery {
        use SourceState::*;
        match self.state {
            Connecting | Negotiated | Syncing | PreCopy { .. } => SourceRecovery::NothingToUndo,
            Frozen | AwaitingReady | DestinationReady | Thawing => SourceRecovery::Thaw,
            PostcopyRunning => SourceRecovery::ThawAfterLease,
            CommitSent | InDoubt => SourceRecovery::AskPeer,
            Committed => SourceRecovery::FinishRemoval,
            Migrated | Untouched | Resumed | NotResumed | LeftInDoubt => SourceRecovery::None,
        }
    }

    /// Longest silence from the destination while in this state.
    pub fn wait_limit(&self, t: &SourceTimeouts) -> Duration {
        match self.state {
            SourceState::AwaitingReady => t.restore,
            SourceState::InDoubt => t.in_doubt,
            _ => t.io,
        }
    }

    /// The fate, once the machine is in an end state.
    pub fn fate(&self) -> Option<SourceFate> {
        Some(match self.state {
            SourceState::Migrated => SourceFate::Migrated,
            SourceState::Untouched => SourceFate::Untouched,
            SourceState::Resumed => SourceFate::Resumed,
            SourceState::NotResumed => SourceFate::NotResumed,
            SourceState::LeftInDoubt => SourceFate::InDoubt,
            _ => return None,
        })
    }
}

// ----------------------------------------------------------- destination

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestinationState {
    AwaitingHello,
    AwaitingManifest,
    /// Admitted: staging exists; rootfs passes and image rounds arrive.
    Receiving,
    /// Everything arrived and was verified; CRIU restores.
    Restoring,
    /// Restored with every task stopped; Ready sent; waiting for Commit.
    ReadyStopped,
    /// Post-copy: the copy runs on the source's lease while its memory
    /// arrives; not committed (a failure removes it).
    RunningOnLease,
    /// Commit received and journalled: the copy is the container now.
    Committed,
    /// Its tasks run; CommitAck sent.
    Running,
    /// Staging and any restored copy removed.
    Aborted,
    /// Refused before anything was stored.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationEvent {
    Hello,
    Admitted,
    StateVerified,
    RestoredStopped,
    /// Post-copy: the source said the copy may run on its lease.
    RunOnLease,
    CommitReceived,
    Resumed,
    /// The step under way failed, the peer vanished, timed out or aborted.
    Failed,
}

/// What a failure in the current state must do on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationRecovery {
    /// Nothing was stored.
    NothingStored,
    /// Remove the staging (and the restored copy, if any).
    RemoveAll,
    /// Committed: the copy stays and is made to run.
    KeepCopy,
    None,
}

/// The destination's timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationTimeouts {
    /// From accept to the end of the handshake (TLS and Hello).
    pub handshake: Duration,
    /// Longest silence from the source otherwise (`--timeout`).
    pub io: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationMachine {
    state: DestinationState,
}

impl Default for DestinationMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl DestinationMachine {
    pub fn new() -> Self {
        Self { state: DestinationState::AwaitingHello }
    }

    pub fn state(&self) -> DestinationState {
        self.state
    }

    pub fn on(&mut self, event: DestinationEvent) -> Result<DestinationState, TransitionError> {
        use DestinationEvent as E;
        use DestinationState as S;
        let next = match (self.state, event) {
            (S::AwaitingHello, E::Hello) => S::AwaitingManifest,
            (S::AwaitingManifest, E::Admitted) => S::Receiving,
            (S::Receiving, E::StateVerified) => S::Restoring,
            (S::Restoring, E::RestoredStopped) => S::ReadyStopped,
            (S::ReadyStopped | S::RunningOnLease, E::CommitReceived) => S::Committed,
            (S::ReadyStopped, E::RunOnLease) => S::RunningOnLease,
            (S::Committed, E::Resumed) => S::Running,
            (S::AwaitingHello | S::AwaitingManifest, E::Failed) => S::Refused,
            (S::Receiving | S::Restoring | S::ReadyStopped | S::RunningOnLease, E::Failed) => S::Aborted,
            (state, event) => return Err(illegal(state, event)),
        };
        self.state = next;
        Ok(next)
    }

    pub fn on_failure(&self) -> DestinationRecovery {
        use DestinationState::*;
        match self.state {
            AwaitingHello | AwaitingManifest => DestinationRecovery::NothingStored,
            Receiving | Restoring | ReadyStopped | RunningOnLease => DestinationRecovery::RemoveAll,
            Committed => DestinationRecovery::KeepCopy,
            Running | Aborted | Refused => DestinationRecovery::None,
        }
    }

    /// Longest silence from the source while in this state.
    pub fn wait_limit(&self, t: &DestinationTimeouts) -> Duration {
        match self.state {
            DestinationState::AwaitingHello => t.handshake,
            _ => t.io,
        }
    }

    /// Whether the restored copy may run.
    pub fn copy_may_run(&self) -> bool {
        matches!(self.state, DestinationState::Committed | DestinationState::Running)
    }
}

impl DestinationState {
    /// The answer to a source's query about a migration last recorded in
    /// this state.
    pub fn answer(self) -> PeerDecision {
        use DestinationState::*;
        match self {
            Committed | Running => PeerDecision::Committed,
            Aborted | Refused => PeerDecision::Aborted,
            AwaitingHello | AwaitingManifest | Receiving | Restoring | ReadyStopped | RunningOnLease => PeerDecision::Pending,
        }
    }

    /// No further transition.
    pub fn is_final(self) -> bool {
        matches!(self, DestinationState::Running | DestinationState::Aborted | DestinationState::Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PeerDecision as P;
    use SourceEvent as E;
    use SourceState as S;

    fn source_at(events: &[SourceEvent]) -> SourceMachine {
        let mut m = SourceMachine::new();
        for e in events {
            m.on(*e).unwrap_or_else(|err| panic!("{err}"));
        }
        m
    }

    const TO_READY: &[SourceEvent] = &[E::HelloAck, E::ManifestAccepted, E::Froze, E::ImagesSent, E::Ready];

    #[test]
    fn a_stop_copy_migration_runs_through_to_migrated() {
        let mut m = source_at(TO_READY);
        assert_eq!(m.state(), S::DestinationReady);
        assert!(m.source_frozen());
        for (e, s) in [(E::CommitSent, S::CommitSent), (E::Running, S::Committed), (E::SourceRemoved, S::Migrated)] {
            assert_eq!(m.on(e).unwrap(), s);
        }
        assert_eq!(m.fate(), Some(SourceFate::Migrated));
        assert_eq!(m.fate().unwrap().exit_code(), 0);
    }

    #[test]
    fn pre_copy_rounds_count_up_one_at_a_time() {
        let mut m = source_at(&[E::HelloAck, E::ManifestAccepted, E::RoundDone(1), E::RoundDone(2)]);
        assert_eq!(m.state(), S::PreCopy { round: 2 });
        assert!(m.on(E::RoundDone(4)).is_err(), "a skipped round is refused");
        assert!(m.on(E::RoundDone(2)).is_err(), "a repeated round is refused");
        assert_eq!(m.on(E::Froze).unwrap(), S::Frozen);
    }

    #[test]
    fn failures_before_the_freeze_touch_nothing() {
        for prefix in [&[][..], &[E::HelloAck], &[E::HelloAck, E::ManifestAccepted], &[E::HelloAck, E::ManifestAccepted, E::RoundDone(1)]] {
            let mut m = source_at(prefix);
            assert!(!m.source_frozen());
            assert_eq!(m.on_failure(), SourceRecovery::NothingToUndo, "{prefix:?}");
            m.on(E::Failed).unwrap();
            // A pre-copy failure is not "failed after the source was frozen".
            assert_eq!(m.fate(), Some(SourceFate::Untouched), "{prefix:?}");
            assert_eq!(m.fate().unwrap().exit_code(), 3);
            assert_eq!(m.fate().unwrap().source_state(), "untouched");
        }
    }

    #[test]
    fn failures_while_frozen_and_before_commit_thaw() {
        for n in 3..=TO_READY.len() {
            let mut m = source_at(&TO_READY[..n]);
            assert_eq!(m.on_failure(), SourceRecovery::Thaw, "after {:?}", TO_READY[n - 1]);
            assert_eq!(m.on(E::Failed).unwrap(), S::Thawing);
            let mut bad = m.clone();
            assert_eq!(m.on(E::Thawed).unwrap(), S::Resumed);
            assert_eq!(m.fate().unwrap().exit_code(), 4);
            assert_eq!(bad.on(E::ThawFailed).unwrap(), S::NotResumed);
            assert_eq!(bad.fate().unwrap().exit_code(), 5);
        }
    }

    #[test]
    fn post_copy_thaws_only_after_the_lease_and_commits_as_stop_copy_does() {
        let mut m = source_at(TO_READY);
        assert_eq!(m.on(E::PostcopyStarted).unwrap(), S::PostcopyRunning);
        assert!(m.source_frozen(), "the source stays frozen while the destination's copy runs");
        assert_eq!(m.on_failure(), SourceRecovery::ThawAfterLease);
        assert!(m.on(E::PostcopyStarted).is_err());
        let mut failed = m.clone();
        assert_eq!(failed.on(E::Failed).unwrap(), S::Thawing);
        assert_eq!(m.on(E::CommitSent).unwrap(), S::CommitSent);
        assert_eq!(m.on_failure(), SourceRecovery::AskPeer);
        // Not before Ready: a copy that was never restored cannot run.
        assert!(source_at(&TO_READY[..4]).on(E::PostcopyStarted).is_err());
    }

    #[test]
    fn a_destination_copy_on_a_lease_is_not_committed_and_is_removed_on_failure() {
        let mut d = DestinationMachine::new();
        for e in [DestinationEvent::Hello, DestinationEvent::Admitted, DestinationEvent::StateVerified, DestinationEvent::RestoredStopped] {
            d.on(e).unwrap();
        }
        assert_eq!(d.on(DestinationEvent::RunOnLease).unwrap(), DestinationState::RunningOnLease);
        assert!(!d.copy_may_run(), "running on a lease is not committed");
        assert_eq!(d.on_failure(), DestinationRecovery::RemoveAll);
        assert_eq!(DestinationState::RunningOnLease.answer(), PeerDecision::Pending);
        let mut failed = d.clone();
        assert_eq!(failed.on(DestinationEvent::Failed).unwrap(), DestinationState::Aborted);
        assert_eq!(d.on(DestinationEvent::CommitReceived).unwrap(), DestinationState::Committed);
        assert_eq!(d.on_failure(), DestinationRecovery::KeepCopy);
    }

    #[test]
    fn after_commit_the_source_is_never_thawed_without_the_destination_saying_so() {
        let mut m = source_at(TO_READY);
        m.on(E::CommitSent).unwrap();
        assert_eq!(m.on_failure(), SourceRecovery::AskPeer);
        assert!(m.on(E::Failed).is_err(), "a failure after Commit cannot roll back");
        assert!(m.on(E::Thawed).is_err());
        m.on(E::AckLost).unwrap();
        assert_eq!(m.state(), S::InDoubt);
        assert!(m.source_frozen());
        // Pending and unknown answers keep it in doubt.
        assert_eq!(m.on(E::PeerSays(P::Pending)).unwrap(), S::InDoubt);
        assert_eq!(m.on(E::PeerSays(P::Unknown)).unwrap(), S::InDoubt);
        let mut aborted = m.clone();
        let mut gave_up = m.clone();
        assert_eq!(m.on(E::PeerSays(P::Committed)).unwrap(), S::Committed);
        assert_eq!(m.on_failure(), SourceRecovery::FinishRemoval);
        assert_eq!(aborted.on(E::PeerSays(P::Aborted)).unwrap(), S::Thawing);
        aborted.on(E::Thawed).unwrap();
        assert_eq!(aborted.fate(), Some(SourceFate::Resumed));
        assert_eq!(gave_up.on(E::GaveUp).unwrap(), S::LeftInDoubt);
        let fate = gave_up.fate().unwrap();
        assert_eq!((fate.exit_code(), fate.source_state()), (6, "in-doubt"));
        assert!(gave_up.source_frozen(), "left in doubt means left frozen, not running");
    }

    #[test]
    fn out_of_order_events_are_refused() {
        let mut m = SourceMachine::new();
        for e in [E::ManifestAccepted, E::Froze, E::Ready, E::CommitSent, E::Running, E::SourceRemoved] {
            assert!(m.on(e).is_err(), "{e:?} from Connecting");
        }
        let mut m = source_at(&[E::HelloAck, E::ManifestAccepted, E::Froze]);
        assert!(m.on(E::Ready).is_err(), "Ready before the images were sent");
        assert!(m.on(E::CommitSent).is_err(), "Commit before Ready");
        assert!(m.on(E::Froze).is_err(), "frozen twice");
        assert_eq!(m.state(), S::Frozen, "a refused event changes nothing");
    }

    #[test]
    fn each_state_waits_for_the_peer_as_long_as_its_timeout_says() {
        let t = SourceTimeouts { io: Duration::from_secs(1), restore: Duration::from_secs(2), in_doubt: Duration::from_secs(3) };
        assert_eq!(SourceMachine::new().wait_limit(&t), t.io);
        let mut m = source_at(&TO_READY[..4]);
        assert_eq!(m.wait_limit(&t), t.restore);
        m.on(E::Ready).unwrap();
        m.on(E::CommitSent).unwrap();
        assert_eq!(m.wait_limit(&t), t.io);
        m.on(E::AckLost).unwrap();
        assert_eq!(m.wait_limit(&t), t.in_doubt);
    }

    use DestinationEvent as DE;
    use DestinationState as DS;

    fn destination_at(events: &[DestinationEvent]) -> DestinationMachine {
        let mut m = DestinationMachine::new();
        for e in events {
            m.on(*e).unwrap_or_else(|err| panic!("{err}"));
        }
        m
    }

    const TO_STOPPED: &[DestinationEvent] = &[DE::Hello, DE::Admitted, DE::StateVerified, DE::RestoredStopped];

    #[test]
    fn the_destination_runs_its_copy_only_after_commit() {
        let mut m = destination_at(TO_STOPPED);
        assert_eq!(m.state(), DS::ReadyStopped);
        assert!(!m.copy_may_run());
        assert_eq!(m.state().answer(), P::Pending);
        m.on(DE::CommitReceived).unwrap();
        assert!(m.copy_may_run());
        assert_eq!(m.state().answer(), P::Committed);
        assert_eq!(m.on_failure(), DestinationRecovery::KeepCopy);
        assert!(m.on(DE::Failed).is_err(), "a committed copy is never removed");
        m.on(DE::Resumed).unwrap();
        assert!(m.state().is_final());
        assert_eq!(m.state().answer(), P::Committed);
    }

    #[test]
    fn the_destination_aborts_on_its_own_until_commit() {
        for n in 0..=TO_STOPPED.len() {
            let mut m = destination_at(&TO_STOPPED[..n]);
            let expected = if n < 2 { DestinationRecovery::NothingStored } else { DestinationRecovery::RemoveAll };
            assert_eq!(m.on_failure(), expected, "after {n} events");
            let end = m.on(DE::Failed).unwrap();
            assert_eq!(end, if n < 2 { DS::Refused } else { DS::Aborted });
            assert_eq!(end.answer(), P::Aborted);
            assert!(!m.copy_may_run());
        }
    }

    #[test]
    fn the_destination_refuses_out_of_order_events() {
        let mut m = DestinationMachine::new();
        for e in [DE::Admitted, DE::StateVerified, DE::RestoredStopped, DE::CommitReceived, DE::Resumed] {
            assert!(m.on(e).is_err(), "{e:?} before Hello");
        }
        let mut m = destination_at(&TO_STOPPED[..2]);
        assert!(m.on(DE::CommitReceived).is_err(), "Commit before the restore");
        assert_eq!(m.state(), DS::Receiving);
    }

    #[test]
    fn the_handshake_has_its_own_deadline() {
        let t = DestinationTimeouts { handshake: Duration::from_secs(1), io: Duration::from_secs(9) };
        let mut m = DestinationMachine::new();
        assert_eq!(m.wait_limit(&t), t.handshake);
        m.on(DE::Hello).unwrap();
        assert_eq!(m.wait_limit(&t), t.io);
    }
}
