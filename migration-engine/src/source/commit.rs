//! The commit: after the Commit went out, the source is never thawed
//! unless the destination says it removed its copy, and never removed
//! unless it says it runs (docs/protocol.md, "Exactly one copy").

use super::*;

impl<'a> Migration<'a> {
    /// Sends the Commit, journalled first so that whoever settles the
    /// migration after this process knows the destination may run it.
    /// True when the CommitAck came; false when it was lost and asking the
    /// destination showed it runs the container (the source is removed).
    pub(super) fn commit(&mut self, result: &mut ResultEvent) -> Result<bool, Failure> {
        let commit_started = Instant::now();
        self.rep.phase(Phase::Commit);
        if let Err(e) = failpoint!("sender-before-commit") {
            return Err(self.fail(e));
        }
        if let Err(e) = self.step(SourceEvent::CommitSent) {
            return Err(self.fail(e));
        }
        if let Some(g) = self.guard.as_mut() {
            g.commit_sent();
        }
        // No member's Commit goes out before every member's is journalled:
        // a sender killed between two Commits leaves each member's guard
        // asking the destination, which committed or aborted the pod whole.
        if let Err(e) = self.pod_wait(pod::Stage::CommitJournalled) {
            // This Commit never went out: the receiver is told to drop its
            // copy, and its word settles the journalled commit-sent.
            self.tell_receiver_abort(&e);
            return match self.settle_in_doubt(Some(e)) {
                Ok(()) => Ok(false),
                Err(f) => Err(f),
            };
        }
        let commit = (|| -> Result<(), MigrationError> {
            failpoint!("sender-after-commit-journalled")?;
            self.p.peer.writer.write_frame(MessageKind::Commit, b"")?;
            self.p.peer.flush()?;
            failpoint!("sender-after-commit")?;
            self.p.peer.read_with_timeout(self.opts.io_timeout)?.expect(MessageKind::CommitAck, "CommitAck")?;
            Ok(())
        })();
        match commit {
            Ok(()) => {
                if let Some(phases) = result.frozen_phases.as_mut() {
                    phases.commit_ms = commit_started.elapsed().as_millis() as u64;
                }
                if let Some(g) = self.guard.as_mut() {
                    g.committed();
                }
                if let Err(e) = self.step(SourceEvent::Running) {
                    self.rep.warn(format!("migrated, but {e}"));
                }
                Ok(true)
            }
            Err(e) => {
                self.rep.warn(format!("no commit acknowledgement from the destination ({e}); the source stays frozen until the destination says what it did"));
                self.settle_in_doubt(None)?;
                Ok(false)
            }
        }
    }

    /// After a Commit that got no answer: asks the destination until it
    /// says, for `--in-doubt-timeout` at most. Ok when it committed (the
    /// source is then removed).
    pub(super) fn settle_in_doubt(&mut self, cause: Option<MigrationError>) -> Result<(), Failure> {
        self.p.peer.control.shutdown();
        let limits = crate::resolve::AskLimits { io: self.opts.io_timeout, total: self.opts.in_doubt_timeout };
        let rep = self.rep;
        let metrics = rep.metrics();
        if let Some(m) = metrics {
            m.in_doubt_began(crate::metrics::Role::Sender);
        }
        let (fate, last) = crate::resolve::settle_source(&self.journal, &mut self.entry, limits, &|m: &str| rep.warn(m));
        // Still in doubt: it stays counted until this process exits.
        if let (Some(m), false) = (metrics, fate == SourceFate::InDoubt) {
            m.in_doubt_settled(crate::metrics::Role::Sender);
        }
        // The machine follows the journal that settle_source kept.
        if let Side::Source { state, .. } = &self.entry.side {
            self.machine = SourceMachine::at(*state);
        }
        let cause = cause.map(|c| format!("{c}; ")).unwrap_or_default();
        match fate {
            SourceFate::Migrated => {
                self.rep.warn(format!("{cause}migration {} settled after a lost acknowledgement: {last}", self.entry.id));
                if let Some(g) = self.guard.take() {
                    g.resolved();
                }
                Ok(())
            }
            SourceFate::InDoubt => {
                // Leave the source frozen: the guard must not thaw it.
                if let Some(g) = self.guard.take() {
                    g.resolved();
                }
                Err(Failure { error: MigrationError::Other(format!("{cause}{}", crate::resolve::in_doubt_message(&self.entry, &last))), outcome: Outcome::Uncertain })
            }
            other => Err(Failure {
                error: MigrationError::Other(format!("{cause}the commit did not complete: {last}")),
                outcome: Outcome::from(other),
            }),
        }
    }
}
