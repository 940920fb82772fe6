//! What a failure does, as the state machine says: nothing before the
//! freeze, a thaw up to the Commit, the destination's word after it; and
//! the source's removal once the destination runs the container.

use super::*;

impl<'a> Migration<'a> {
    /// The failure of the step under way, handled as the state says:
    /// nothing to undo before the freeze, a thaw up to the Commit, and
    /// after it the destination's word.
    pub(super) fn fail(&mut self, error: MigrationError) -> Failure {
        use migration_protocol::state::SourceRecovery;
        // The rest of a pod fails with this member (a no-op past the
        // stages they waited at together).
        if let Some(member) = &self.opts.pod {
            member.barrier.fail(&self.opts.container, &error.to_string());
        }
        match self.machine.on_failure() {
            SourceRecovery::NothingToUndo => {
                self.tell_receiver_abort(&error);
                let _ = self.step(SourceEvent::Failed);
            }
            SourceRecovery::Thaw => return self.rollback(error),
            SourceRecovery::ThawAfterLease => return self.rollback_after_lease(error),
            // Only a failure after `commit-sent` is on disk gets here, and
            // commit() settles those itself; should one come, the
            // destination's word decides, as for a lost CommitAck.
            SourceRecovery::AskPeer => {
                return match self.settle_in_doubt(Some(error)) {
                    Err(failure) => failure,
                    Ok(()) => Failure {
                        error: MigrationError::Other("the destination runs the container after all; the source was removed".into()),
                        outcome: Outcome::SourceNotResumed,
                    },
                }
            }
            SourceRecovery::FinishRemoval => {
                self.destroy_source();
                let _ = self.step(SourceEvent::SourceRemoved);
            }
            SourceRecovery::None => {}
        }
        let outcome = self.machine.fate().map(Outcome::from).unwrap_or(Outcome::SourceNotResumed);
        Failure { error, outcome }
    }

    /// Tells the receiver to give up, if it still listens.
    pub(super) fn tell_receiver_abort(&mut self, error: &MigrationError) {
        let _ = self.p.peer.writer.write_json(MessageKind::Abort, &migration_protocol::Abort { reason: error.to_string() });
        let _ = self.p.peer.flush();
        self.p.peer.control.shutdown_write();
    }

    /// Tells the receiver to drop its copy, thaws the source and checks it.
    pub(super) fn rollback(&mut self, error: MigrationError) -> Failure {
        self.rep.phase(Phase::Rollback);
        if let Some(lazy) = self.lazy.take() {
            lazy.end();
        }
        self.tell_receiver_abort(&error);
        let _ = self.step(SourceEvent::Failed);
        let thawed = self.host.thaw(source_plan(&self.entry), &self.opts.container);
        if let Some(net) = self.p.network.as_mut() {
            net.locked = thawed.is_err();
        }
        let _ = self.step(if thawed.is_ok() { SourceEvent::Thawed } else { SourceEvent::ThawFailed });
        match thawed {
            Ok(()) => Failure { error, outcome: Outcome::SourceResumed },
            Err(resume) => Failure {
                error: MigrationError::Other(format!(
                    "{error}; AND THE SOURCE COULD NOT BE RESUMED: {resume}. Check `runc --root {} state {}` and thaw {} by hand",
                    self.opts.runtime_root.display(),
                    self.opts.container,
                    self.p.plan.freezer.path.display()
                )),
                outcome: Outcome::SourceNotResumed,
            },
        }
    }

    /// Kills and deletes the (frozen) source after the destination committed.
    pub(super) fn destroy_source(&mut self) {
        for w in self.host.remove(source_plan(&self.entry), &self.opts.container) {
            self.rep.warn(format!("migrated, but {w}"));
        }
        self.p.peer.control.shutdown();
    }

    /// Drops all traffic of the container's namespace, which ctmigrate
    /// moves (it is always external to CRIU's dump).
    pub(super) fn lock_network(&mut self) -> Result<(), MigrationError> {
        let Some(net) = self.p.network.as_mut() else { return Ok(()) };
        // The guard learns of the lock first: killed while locking, this
        // process leaves it a lock to undo (unlocking no lock is nothing).
        if let Some(g) = self.guard.as_mut() {
            g.watch_netns_lock(&net.netns.path());
        }
        self.host.lock_network(&net.netns)?;
        net.locked = true;
        Ok(())
    }

    pub(super) fn unlock_network(&mut self) {
        let Some(net) = self.p.network.as_mut() else { return };
        match self.host.unlock_network(&net.netns) {
            Ok(()) => net.locked = false,
            Err(e) => self.rep.warn(e.to_string()),
        }
    }
}
